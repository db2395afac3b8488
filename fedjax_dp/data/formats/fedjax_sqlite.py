"""FedJAX's SQLite layout, read lazily without FedJAX.

Layout (FedJAX's `SQLiteFederatedData`):

  federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)

one row per client; `data` is `zlib.compress(msgpack_serialize(examples))`
with `examples` a dict feature name -> numpy array [num_examples, ...].

The msgpack scheme mirrors `fedjax/core/serialization.py` (itself derived from
flax's), so files written by FedJAX read here and files written here read in
FedJAX. Arrays are msgpack ExtTypes whose payload is itself msgpack:

  code 1 (ndarray):       packb((shape, dtype.name, arr.tobytes("C")))
  code 2 (complex):       packb((real, imag))
  code 3 (numpy scalar):  as code 1 for the 0-d array, unpacked to a scalar
  code 4 (bytes ndarray): packb((shape, [bytes, ...]))  (object arrays)

The outer message is packed with `strict_types=True` and unpacked with
`raw=False` (str keys); the inner payloads are unpacked with `raw=True` (the
dtype name arrives as bytes, e.g. b"float32").
"""

import concurrent.futures
import os
import sqlite3
import threading
import zlib
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

from fedjax_dp.data import population as population_lib
from fedjax_dp.data.formats import common

EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
EXT_BYTES_NDARRAY = 4

# Subsets of at least this many clients are read by `_READER_THREADS`
# threads (1,000 EMNIST clients: 0.33 s on one thread, 0.27 s on two, on
# the 2-core CPU of docs/benchmarks.md; more with more cores).
_PARALLEL_MIN_CLIENTS = 64
_READER_THREADS = min(4, os.cpu_count() or 1)

_REQUIRED_COLUMNS = {
    "federated_data": ("client_id", "data", "num_examples"),
}


# -- Serialization ------------------------------------------------------------


def _ndarray_to_bytes(array: np.ndarray) -> bytes:
  if array.dtype.hasobject or array.dtype.isalignedstruct:
    raise ValueError("object and structured dtypes are not serializable as "
                     "numeric ndarrays")
  return msgpack.packb(
      (array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
  if isinstance(dtype_name, bytes):
    dtype_name = dtype_name.decode("ascii")
  dtype = np.dtype(dtype_name)
  return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="C")


def _bytes_ndarray_to_bytes(array: np.ndarray) -> bytes:
  flat = [v.encode("utf-8") if isinstance(v, str) else v
          for v in array.reshape(-1)]
  if any(not isinstance(v, bytes) for v in flat):
    raise ValueError("only object arrays of bytes (or str) are serializable")
  return msgpack.packb((array.shape, flat), use_bin_type=True)


def _bytes_ndarray_from_bytes(data: bytes) -> np.ndarray:
  shape, flat = msgpack.unpackb(data, raw=True)
  out = np.empty(len(flat), dtype=object)
  out[:] = flat
  return out.reshape(shape)


def _ext_pack(value: Any) -> msgpack.ExtType:
  if isinstance(value, np.ndarray):
    if value.dtype.hasobject or value.dtype.kind in "SU":
      return msgpack.ExtType(EXT_BYTES_NDARRAY,
                             _bytes_ndarray_to_bytes(value.astype(object)))
    return msgpack.ExtType(EXT_NDARRAY, _ndarray_to_bytes(value))
  if isinstance(value, np.generic):
    return msgpack.ExtType(EXT_NPSCALAR, _ndarray_to_bytes(np.asarray(value)))
  if isinstance(value, complex):
    return msgpack.ExtType(EXT_NATIVE_COMPLEX,
                           msgpack.packb((value.real, value.imag)))
  raise TypeError(f"cannot serialize {type(value).__name__}")


def _ext_unpack(code: int, data: bytes) -> Any:
  if code == EXT_NDARRAY:
    return _ndarray_from_bytes(data)
  if code == EXT_NATIVE_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  if code == EXT_NPSCALAR:
    return _ndarray_from_bytes(data)[()]
  if code == EXT_BYTES_NDARRAY:
    return _bytes_ndarray_from_bytes(data)
  return msgpack.ExtType(code, data)


def serialize(examples: Mapping[str, Any]) -> bytes:
  """zlib-compressed msgpack of `examples`, as FedJAX stores a client."""
  return zlib.compress(
      msgpack.packb(dict(examples), default=_ext_pack, strict_types=True))


def deserialize(data: bytes) -> Any:
  """Inverse of `serialize` (FedJAX's `decompress_and_deserialize`)."""
  return msgpack.unpackb(
      zlib.decompress(data), ext_hook=_ext_unpack, raw=False)


# -- The SQLite source --------------------------------------------------------


def _decode_client_id(raw: Any) -> str:
  """FedJAX stores ids as BLOB; they become str (hex if not UTF-8)."""
  if isinstance(raw, bytes):
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError:
      return raw.hex()
  return str(raw)


class FedjaxSqliteSource(common.IndexedSource):
  """A FedJAX SQLite file as a lazy `ClientSource`.

  Opening reads client ids and `num_examples` (in rowid order, as FedJAX
  iterates) and deserializes the first client's blob to learn the features;
  other clients' blobs are read only by `subset`.
  """

  def __init__(self, path: str):
    """Opens the file and reads its index.

    Args:
      path: a FedJAX SQLite file.

    Raises:
      FormatError: if the file is missing, not SQLite, lacks the
        `federated_data` table, is empty, or its first blob does not decode.
    """
    self._path = common.check_file(path)
    self._lock = threading.Lock()
    self._connection = common.open_sqlite(self._path)
    # Readers for large subsets, opened on first use (`_read_parallel`).
    self._readers: concurrent.futures.ThreadPoolExecutor | None = None
    self._reader_connections: list[sqlite3.Connection] = []
    try:
      with common.reraise(self._path, "cannot read the client index"):
        self._read_index()
    except BaseException:
      self._connection.close()
      raise

  def _read_index(self) -> None:
    path = self._path
    common.require_columns(path, common.sqlite_columns(self._connection),
                           _REQUIRED_COLUMNS, "FedJAX SQLite")
    rows = self._connection.execute(
        "SELECT client_id, num_examples FROM federated_data ORDER BY rowid"
    ).fetchall()
    if not rows:
      raise common.error(path, "table 'federated_data' holds no clients")
    self._raw_ids = [r[0] for r in rows]
    client_ids = tuple(_decode_client_id(r) for r in self._raw_ids)
    if len(set(client_ids)) != len(client_ids):
      raise common.error(path, "table 'federated_data' lists a client twice")
    try:
      sizes = np.array([int(r[1]) for r in rows], np.int64)
    except (TypeError, ValueError) as e:
      raise common.error(
          path, "federated_data.num_examples holds a non-integer") from e
    self._client_ids = client_ids
    self._num_examples = sizes
    first = self._read_client(0)
    self._specs = common.specs_of(first)

  def _read_client(self, index: int,
                   connection: sqlite3.Connection | None = None
                   ) -> dict[str, np.ndarray]:
    cid = self._client_ids[index]
    connection = connection or self._connection
    row = connection.execute(
        "SELECT data FROM federated_data WHERE client_id = ?",
        (self._raw_ids[index],)).fetchone()
    if row is None:
      raise common.error(self._path, f"client {cid!r} vanished from the file")
    try:
      examples = deserialize(row[0])
    except (zlib.error, ValueError, TypeError, KeyError,
            msgpack.UnpackException) as e:
      raise common.error(
          self._path, f"client {cid!r}: data is not zlib-compressed msgpack "
          f"of arrays: {type(e).__name__}: {e}") from e
    if not isinstance(examples, dict) or not examples:
      raise common.error(
          self._path, f"client {cid!r}: data is a {type(examples).__name__}, "
          "expected a non-empty dict feature name -> array")
    for name, array in examples.items():
      if not isinstance(array, np.ndarray) or array.ndim == 0:
        raise common.error(
            self._path, f"client {cid!r}: feature {name!r} is not an array "
            "with a leading example dimension")
    return examples

  def subset(
      self, indices: Sequence[int]) -> population_lib.FederatedPopulation:
    """Reads and deserializes the clients at `indices`, in that order.

    Args:
      indices: client indices into `client_ids`.

    Returns:
      A FederatedPopulation of exactly these clients.

    Raises:
      FormatError: if a blob does not decode or disagrees with the feature
        specs or with its num_examples.
      IndexError: if an index is out of range.
    """
    indices = common.check_indices(indices, self.num_clients)
    with self._lock:
      if len(indices) >= _PARALLEL_MIN_CLIENTS and _READER_THREADS > 1:
        client_features = self._read_parallel(indices)
      else:
        client_features = self._read_clients(indices, self._connection)
    return common.assemble(
        self._path, [self._client_ids[i] for i in indices], client_features,
        self._specs, self._num_examples[indices])

  def _read_clients(self, indices, connection) -> list[dict]:
    out = []
    for i in indices:
      with common.reraise(self._path,
                          f"cannot read client {self._client_ids[i]!r}"):
        out.append(self._read_client(i, connection))
    return out

  def _read_parallel(self, indices) -> list[dict]:
    """The clients read by `_READER_THREADS` threads, each with its own
    connection and a contiguous share of `indices`: decompressing a blob
    (most of the time) releases the GIL."""
    if self._readers is None:
      self._reader_connections = [common.open_sqlite(self._path)
                                  for _ in range(_READER_THREADS)]
      self._readers = concurrent.futures.ThreadPoolExecutor(
          _READER_THREADS, thread_name_prefix="fedjax_dp-sqlite")
    shares = np.array_split(np.asarray(indices), _READER_THREADS)
    futures = [self._readers.submit(self._read_clients, share, connection)
               for share, connection in zip(shares,
                                            self._reader_connections)]
    return [features for f in futures for features in f.result()]

  def close(self) -> None:
    with self._lock:
      if self._readers is not None:
        self._readers.shutdown(wait=True)
      for connection in self._reader_connections:
        connection.close()
      self._connection.close()

  def __repr__(self) -> str:
    return (f"FedjaxSqliteSource({self._path!r}, "
            f"num_clients={self.num_clients})")


def write_fedjax_sqlite(
    path: str,
    client_ids: Sequence[str],
    client_features: Sequence[Mapping[str, np.ndarray]],
) -> None:
  """Writes clients in FedJAX's SQLite layout (replacing any such table).

  Args:
    path: the database file (created if missing).
    client_ids: one id per client, stored as UTF-8 BLOBs like FedJAX's.
    client_features: per client, feature name -> array [n_i, ...]; arrays of
      bytes or str are stored as FedJAX's bytes ndarrays (ext code 4).

  Raises:
    ValueError: if the arguments differ in length.
  """
  if len(client_ids) != len(client_features):
    raise ValueError("client_ids and client_features differ in length")
  connection = sqlite3.connect(os.fspath(path))
  try:
    with connection:
      connection.execute("DROP TABLE IF EXISTS federated_data")
      connection.execute(
          "CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
          "data BLOB NOT NULL, num_examples INTEGER NOT NULL)")
      for cid, feats in zip(client_ids, client_features):
        arrays = {n: np.asarray(v) for n, v in feats.items()}
        size = len(next(iter(arrays.values()))) if arrays else 0
        connection.execute(
            "INSERT INTO federated_data VALUES (?, ?, ?)",
            (str(cid).encode("utf-8"), serialize(arrays), size))
  finally:
    connection.close()
