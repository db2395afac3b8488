"""TensorFlow Federated's HDF5 layout, read lazily with h5py.

Layout (as in TFF's EMNIST, Shakespeare, StackOverflow and CIFAR-100 files):

  /examples/<client_id>/<feature>   one dataset per feature, all datasets of a
                                    client sharing the leading (example) dim.

e.g. EMNIST `pixels` float32 [N, 28, 28] and `label` int32 [N]; Shakespeare
`snippets` variable-length byte strings [N]; CIFAR-100 `image` uint8
[N, 32, 32, 3], `label`, `coarse_label`. Byte strings (variable or fixed
length) come back as numpy object arrays of `bytes`.
"""

import os
import threading
from typing import Mapping, Optional, Sequence

import h5py
import numpy as np

from fedjax_dp.data import population as population_lib
from fedjax_dp.data.formats import common

EXAMPLES_GROUP = "examples"

_OBJECT = np.dtype(object)


def _numpy_dtype(path: str, name: str, dtype: np.dtype) -> np.dtype:
  """The dtype a dataset is returned as (strings become object of bytes)."""
  if h5py.check_string_dtype(dtype) is not None or dtype.kind == "S":
    return _OBJECT
  if h5py.check_vlen_dtype(dtype) is not None:
    raise common.error(
        path, f"feature {name!r} is a variable-length array of "
        f"{h5py.check_vlen_dtype(dtype)}; only strings may vary in length")
  if dtype.kind not in "biuf":
    raise common.error(
        path, f"feature {name!r} has unsupported dtype {dtype}")
  return np.dtype(dtype).newbyteorder("=")  # Big-endian files read native.


def _read_dataset(dataset: h5py.Dataset, dtype: np.dtype) -> np.ndarray:
  array = dataset[()]
  if dtype == _OBJECT and array.dtype != _OBJECT:
    array = array.astype(_OBJECT)  # Fixed-length 'S' strings -> bytes objects.
  return array


class TffHdf5Source(common.IndexedSource):
  """A TFF HDF5 file as a lazy `ClientSource`.

  Opening reads the client ids, the leading dimension of one dataset per
  client and the shapes and dtypes of the first client's datasets; examples
  are read only by `subset`. Client ids are in sorted order (as TFF's
  `ClientData.client_ids`). The file stays open until `close()` (or the end of
  a `with` block); `subset` may be called from another thread (e.g. a
  prefetcher).
  """

  def __init__(self, path: str, features: Optional[Sequence[str]] = None):
    """Opens the file and reads its index.

    Args:
      path: a TFF HDF5 file.
      features: names of the features to load, in this order; None for all
        features of the first client, in sorted order.

    Raises:
      FormatError: if the file is missing, not HDF5, has no `examples` group
        or no clients, or lacks a requested feature.
    """
    self._path = common.check_file(path)
    self._lock = threading.Lock()
    with common.reraise(self._path, "cannot open as HDF5"):
      self._file = h5py.File(self._path, "r")
    try:
      with common.reraise(self._path, "cannot read the client index"):
        self._read_index(features)
    except BaseException:
      self._file.close()
      raise

  def _read_index(self, features: Optional[Sequence[str]]) -> None:
    path = self._path
    examples = self._file.get(EXAMPLES_GROUP)
    if not isinstance(examples, h5py.Group):
      raise common.error(
          path, f"not a TFF HDF5 file: no group {EXAMPLES_GROUP!r} at the "
          f"root (root has {sorted(self._file.keys())[:10]})")
    client_ids = sorted(examples.keys())
    if not client_ids:
      raise common.error(path, f"group {EXAMPLES_GROUP!r} holds no clients")
    first = examples[client_ids[0]]
    if not isinstance(first, h5py.Group):
      raise common.error(
          path, f"/{EXAMPLES_GROUP}/{client_ids[0]} is not a group of "
          "feature datasets")
    available = sorted(first.keys())
    if not available:
      raise common.error(path, f"client {client_ids[0]!r} has no features")
    if features is None:
      features = available
    else:
      features = list(features)
      missing = [n for n in features if n not in available]
      if missing or not features:
        raise common.error(
            path, f"requested features {missing or features} not in the file "
            f"(client {client_ids[0]!r} has {available})")
    specs = {}
    for name in features:
      dataset = first[name]
      if not isinstance(dataset, h5py.Dataset) or dataset.ndim == 0:
        raise common.error(
            path, f"client {client_ids[0]!r}: feature {name!r} is not a "
            "dataset with a leading example dimension")
      specs[name] = (tuple(dataset.shape[1:]),
                     _numpy_dtype(path, name, dataset.dtype))
    # Sizes come from one dataset's shape per client: metadata, not data.
    # The low-level h5d API is faster than h5py.Group.get (docs/benchmarks.md,
    # "Constants chosen by measurement"), which matters with hundreds of
    # thousands of clients (StackOverflow).
    size_feature = features[0]
    sizes = np.empty(len(client_ids), np.int64)
    for i, cid in enumerate(client_ids):
      try:
        shape = h5py.h5d.open(
            examples.id, f"{cid}/{size_feature}".encode("utf-8")).shape
      except (KeyError, ValueError, TypeError, OSError, RuntimeError) as e:
        raise common.error(
            path, f"client {cid!r} has no dataset {size_feature!r}: {e}"
        ) from e
      if not shape:
        raise common.error(
            path, f"client {cid!r}: dataset {size_feature!r} is a scalar; "
            "expected a leading example dimension")
      sizes[i] = shape[0]
    self._examples = examples
    self._client_ids = tuple(client_ids)
    self._num_examples = sizes
    self._specs = specs

  def subset(
      self, indices: Sequence[int]) -> population_lib.FederatedPopulation:
    """Reads the clients at `indices`, in that order.

    Args:
      indices: client indices into `client_ids`.

    Returns:
      A FederatedPopulation of exactly these clients.

    Raises:
      FormatError: if a client's datasets are missing, unreadable, of another
        shape or dtype than announced, or disagree on the number of examples.
      IndexError: if an index is out of range.
    """
    indices = common.check_indices(indices, self.num_clients)
    client_ids = [self._client_ids[i] for i in indices]
    sizes = self._num_examples[indices]
    client_features = []
    with self._lock:
      features = self._read_numeric(client_ids, sizes)
      if features is not None:
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        return population_lib.FederatedPopulation(tuple(client_ids), features,
                                                  offsets)
      for cid in client_ids:
        with common.reraise(self._path, f"cannot read client {cid!r}"):
          group = self._examples[cid]
          feats = {}
          for name, (_, dtype) in self._specs.items():
            dataset = group.get(name)
            if not isinstance(dataset, h5py.Dataset):
              raise common.error(
                  self._path, f"client {cid!r} has no dataset {name!r} "
                  f"(has {sorted(group.keys())})")
            feats[name] = _read_dataset(dataset, dtype)
        client_features.append(feats)
    return common.assemble(self._path, client_ids, client_features,
                           self._specs, sizes)

  def _read_numeric(self, client_ids, sizes) -> dict | None:
    """The clients' numeric features read straight into one array each.

    HDF5's low-level API, with no per-client arrays to concatenate: 1,000
    EMNIST clients in 0.08 s against 0.30 s through h5py's datasets
    (docs/benchmarks.md). None when a feature holds strings, or a client's
    dataset is missing or not exactly of the announced shape and dtype:
    the checked per-client path then reads them (and names what is wrong).
    Threads would not help: h5py serialises every call behind one lock.
    """
    if any(dtype == _OBJECT for _, dtype in self._specs.values()):
      return None
    total = int(np.sum(sizes))
    out = {name: np.empty((total,) + tuple(shape), dtype)
           for name, (shape, dtype) in self._specs.items()}
    offset = 0
    for cid, n in zip(client_ids, sizes):
      n = int(n)
      for name, (shape, dtype) in self._specs.items():
        try:
          dataset = h5py.h5d.open(self._examples.id,
                                  f"{cid}/{name}".encode("utf-8"))
        except (KeyError, ValueError, TypeError, OSError, RuntimeError):
          return None
        if dataset.shape != (n,) + tuple(shape) or dataset.dtype != dtype:
          return None
        if n:
          dataset.read(h5py.h5s.ALL, h5py.h5s.ALL,
                       out[name][offset:offset + n])
      offset += n
    return out

  def close(self) -> None:
    """Closes the file; the source is unusable afterwards."""
    with self._lock:
      self._file.close()

  def __repr__(self) -> str:
    return (f"TffHdf5Source({self._path!r}, num_clients={self.num_clients}, "
            f"features={list(self._specs)})")


def write_tff_hdf5(
    path: str,
    client_ids: Sequence[str],
    client_features: Sequence[Mapping[str, np.ndarray]],
) -> None:
  """Writes clients in TFF's HDF5 layout (overwriting `path`).

  Args:
    path: the file to write.
    client_ids: one id per client (HDF5 group names: no '/').
    client_features: per client, feature name -> array [n_i, ...]. Arrays of
      bytes or str (object, 'S' or 'U' dtype) are stored as variable-length
      byte strings, like TFF's Shakespeare and StackOverflow files.

  Raises:
    ValueError: if the arguments differ in length or a client id has '/'.
  """
  if len(client_ids) != len(client_features):
    raise ValueError("client_ids and client_features differ in length")
  with h5py.File(os.fspath(path), "w") as f:
    examples = f.create_group(EXAMPLES_GROUP)
    for cid, feats in zip(client_ids, client_features):
      if "/" in str(cid):
        raise ValueError(f"client id {cid!r} contains '/'")
      group = examples.create_group(str(cid))
      for name, values in feats.items():
        array = np.asarray(values)
        if array.dtype.kind in "OSU":
          flat = [v.encode("utf-8") if isinstance(v, str) else bytes(v)
                  for v in array.reshape(-1)]
          data = np.empty(len(flat), dtype=_OBJECT)
          data[:] = flat
          group.create_dataset(
              name, data=data.reshape(array.shape),
              dtype=h5py.special_dtype(vlen=bytes))
        else:
          group.create_dataset(name, data=array)
