"""Pieces shared by the federated file format readers.

`FormatError` is the one exception the readers raise for a bad file;
`assemble` turns per-client feature dicts read from a file into a
`FederatedPopulation`, checking them against the specs announced when the
file was opened, so that a lazy source never hands the runner data of a shape
it did not promise.
"""

import abc
import contextlib
import math
import os
import pathlib
import sqlite3
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from fedjax_dp.data import population as population_lib

FeatureSpecs = dict[str, tuple[tuple[int, ...], np.dtype]]

# Exceptions that libraries (h5py, sqlite3, msgpack, zlib, json, numpy) raise
# for unreadable or inconsistent content. Caught only around file access and
# parsing, and always re-raised as FormatError chained to the original.
_CONTENT_ERRORS = (
    OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError,
    EOFError, sqlite3.Error)


class FormatError(ValueError):
  """A federated data file is missing, unreadable or not in its layout.

  The message starts with the path of the file and says what is wrong.
  """


def error(path: str, message: str) -> FormatError:
  """A FormatError whose message names `path`."""
  return FormatError(f"{path}: {message}")


@contextlib.contextmanager
def reraise(path: str, what: str) -> Iterator[None]:
  """Re-raises library errors inside the block as FormatError.

  Args:
    path: the file being read, named in the message.
    what: what the block was doing, e.g. "cannot read client 'f0001'".

  Yields:
    nothing; wraps the block.

  Raises:
    FormatError: for any content error raised inside the block.
  """
  try:
    yield
  except FormatError:
    raise
  except _CONTENT_ERRORS as e:
    raise error(path, f"{what}: {type(e).__name__}: {e}") from e


def check_file(path: str) -> str:
  """Returns `path` as a str; raises FormatError unless it is a file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise error(path, "no such file")
  if not os.path.isfile(path):
    raise error(path, "not a regular file")
  return path


def open_sqlite(path: str) -> sqlite3.Connection:
  """Opens an SQLite file read-only (never creating it) for any thread.

  Callers serialise access with their own lock; the connection may be used
  from a prefetching thread.

  Args:
    path: path of an existing SQLite database.

  Returns:
    A read-only connection.

  Raises:
    FormatError: if the file is missing or not an SQLite database.
  """
  path = check_file(path)
  uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
  with reraise(path, "cannot open as an SQLite database"):
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
      # Opening is lazy in SQLite: read the schema now so that a file that is
      # not a database fails here rather than at the first query.
      connection.execute("SELECT name FROM sqlite_master").fetchall()
    except BaseException:
      connection.close()
      raise
  return connection


def sqlite_columns(connection: sqlite3.Connection) -> dict[str, set[str]]:
  """Table name -> column names of an open database."""
  tables = [r[0] for r in connection.execute(
      "SELECT name FROM sqlite_master WHERE type = 'table'")]
  columns = {}
  for table in tables:
    quoted = table.replace('"', '""')
    columns[table] = {
        r[1] for r in connection.execute(f'PRAGMA table_info("{quoted}")')}
  return columns


def require_columns(path: str, columns: Mapping[str, set[str]],
                    required: Mapping[str, Sequence[str]],
                    layout: str) -> None:
  """Raises FormatError unless every required table has its columns."""
  for table, names in required.items():
    if table not in columns:
      raise error(
          path, f"not a {layout} file: no table {table!r} "
          f"(tables: {sorted(columns)})")
    missing = [n for n in names if n not in columns[table]]
    if missing:
      raise error(
          path, f"not a {layout} file: table {table!r} lacks columns "
          f"{missing} (has {sorted(columns[table])})")


def check_indices(indices: Sequence[int], num_clients: int) -> np.ndarray:
  """Client indices as int64, negatives counted from the end like Python."""
  indices = np.asarray(indices, dtype=np.int64).reshape(-1)
  if np.any(indices >= num_clients) or np.any(indices < -num_clients):
    raise IndexError(
        f"client indices must be in [-{num_clients}, {num_clients}), got "
        f"{indices[(indices >= num_clients) | (indices < -num_clients)][:5]}")
  return np.where(indices < 0, indices + num_clients, indices)


def specs_of(arrays: Mapping[str, np.ndarray]) -> FeatureSpecs:
  """Feature specs (shape of one example, dtype) of one client's arrays."""
  return {n: (tuple(a.shape[1:]), a.dtype) for n, a in arrays.items()}


def assemble(
    path: str,
    client_ids: Sequence[str],
    client_features: Sequence[Mapping[str, np.ndarray]],
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    expected_sizes: Optional[Sequence[int]] = None,
) -> population_lib.FederatedPopulation:
  """Checks clients read from `path` against `specs` and concatenates them.

  Args:
    path: the file the data came from, named in errors.
    client_ids: ids of the clients, in order.
    client_features: per client, feature name -> array [n_i, ...].
    specs: feature name -> (shape of one example, dtype) that every client
      must have; a safe cast (e.g. int32 -> int64) is applied silently.
    expected_sizes: if given, the number of examples the file's index claims
      for each client; a client whose data disagrees is a FormatError.

  Returns:
    A FederatedPopulation of these clients, in order.

  Raises:
    FormatError: if a client lacks a feature, has one of another shape or an
      incompatible dtype, or its features disagree on the number of examples.
  """
  columns = {n: [] for n in specs}
  sizes = []
  for k, (cid, feats) in enumerate(zip(client_ids, client_features)):
    size = None
    for name, (shape, dtype) in specs.items():
      if name not in feats:
        raise error(path, f"client {cid!r} has no feature {name!r} "
                          f"(has {sorted(feats)})")
      array = np.asarray(feats[name])
      if array.ndim == 0 or tuple(array.shape[1:]) != tuple(shape):
        raise error(
            path, f"client {cid!r}: feature {name!r} has per-example shape "
            f"{list(array.shape[1:]) if array.ndim else 'scalar'}, expected "
            f"{list(shape)}")
      if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="safe"):
          raise error(
              path, f"client {cid!r}: feature {name!r} has dtype "
              f"{array.dtype}, expected {np.dtype(dtype)}")
        array = array.astype(dtype)
      if size is None:
        size = array.shape[0]
        first = name
      elif array.shape[0] != size:
        raise error(
            path, f"client {cid!r}: features disagree on the number of "
            f"examples ({first!r} has {size}, {name!r} has {array.shape[0]})")
      columns[name].append(array)
    if expected_sizes is not None and size != expected_sizes[k]:
      raise error(
          path, f"client {cid!r} has {size} examples, but the file's index "
          f"says {expected_sizes[k]}")
    sizes.append(size)
  features = {}
  for name, (shape, dtype) in specs.items():
    if columns[name]:
      features[name] = np.concatenate(columns[name], axis=0)
    else:
      features[name] = np.zeros((0,) + tuple(shape), dtype)
  offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
  return population_lib.FederatedPopulation(
      tuple(client_ids), features, offsets.astype(np.int64))


def num_elements(shape: Sequence[int]) -> int:
  return math.prod(int(d) for d in shape)


class IndexedSource(abc.ABC):
  """Shared read interface of the lazy sources (see data/source.py).

  Subclasses set `_path`, `_client_ids`, `_num_examples` (int64) and `_specs`
  when opened, and implement `subset` and `close`.
  """

  _path: str
  _client_ids: tuple[str, ...]
  _num_examples: np.ndarray
  _specs: dict

  @property
  def path(self) -> str:
    return self._path

  @property
  def client_ids(self) -> tuple[str, ...]:
    return self._client_ids

  @property
  def num_clients(self) -> int:
    return len(self._client_ids)

  @property
  def num_examples(self) -> np.ndarray:
    """Examples per client, int64 [num_clients] (from the file's index)."""
    return self._num_examples.copy()

  @property
  def feature_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return dict(self._specs)

  @abc.abstractmethod
  def close(self) -> None:
    """Releases the file; the source is unusable afterwards."""

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
