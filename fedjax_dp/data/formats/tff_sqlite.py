"""TensorFlow Federated's SQLite layout, read lazily without TensorFlow.

Layout (TFF's `sql_client_data`):

  examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
  client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)

one `examples` row per example, holding a serialized `tf.train.Example`.
This module carries a small decoder (and, for tests and tools, an encoder)
of the protobuf wire format of `tf.train.Example`, so neither TensorFlow nor
the `protobuf` package is needed:

  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }   (entries: key 1, value 2)
  Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                           Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed]; }
  Int64List { repeated int64 value = 1 [packed]; }

Packed and unpacked repeated fields are both accepted, unknown fields are
skipped, and repeated embedded messages merge as protobuf specifies.
"""

import os
import sqlite3
import struct
import threading
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fedjax_dp.data import population as population_lib
from fedjax_dp.data.formats import common

BYTES = "bytes_list"
FLOAT = "float_list"
INT64 = "int64_list"

_KIND_OF_FIELD = {1: BYTES, 2: FLOAT, 3: INT64}
_DTYPE_OF_KIND = {
    BYTES: np.dtype(object), FLOAT: np.dtype(np.float32),
    INT64: np.dtype(np.int64)}

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_UINT64_MASK = (1 << 64) - 1

_REQUIRED_COLUMNS = {
    "examples": ("split_name", "client_id", "serialized_example_proto"),
    "client_metadata": ("client_id", "split_name", "num_examples"),
}


class DecodeError(ValueError):
  """Bytes that are not a well-formed serialized tf.train.Example."""


# -- Protobuf wire format: decoding ------------------------------------------


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  """Reads an unsigned varint at `pos`; returns (value, next position)."""
  result = 0
  shift = 0
  while True:
    if pos >= len(buf):
      raise DecodeError("truncated varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise DecodeError("varint longer than 10 bytes")


def _iter_fields(buf: memoryview):
  """Yields (field number, wire type, value) of one message's fields.

  The value is an int for varint and fixed-width fields and a memoryview for
  length-delimited ones.
  """
  pos = 0
  end = len(buf)
  while pos < end:
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if field == 0:
      raise DecodeError("field number 0")
    if wire_type == _VARINT:
      value, pos = _read_varint(buf, pos)
    elif wire_type == _LENGTH_DELIMITED:
      length, pos = _read_varint(buf, pos)
      if pos + length > end:
        raise DecodeError(
            f"field {field}: length {length} runs past the end of the message")
      value = buf[pos:pos + length]
      pos += length
    elif wire_type == _FIXED32:
      if pos + 4 > end:
        raise DecodeError(f"field {field}: truncated 32-bit value")
      value = int.from_bytes(buf[pos:pos + 4], "little")
      pos += 4
    elif wire_type == _FIXED64:
      if pos + 8 > end:
        raise DecodeError(f"field {field}: truncated 64-bit value")
      value = int.from_bytes(buf[pos:pos + 8], "little")
      pos += 8
    else:
      raise DecodeError(f"field {field}: unsupported wire type {wire_type}")
    yield field, wire_type, value


def _decode_packed_varints(buf: memoryview) -> np.ndarray:
  """Decodes concatenated varints into int64 (two's complement), vectorised."""
  data = np.frombuffer(buf, dtype=np.uint8)
  if data.size == 0:
    return np.zeros((0,), np.int64)
  ends = np.flatnonzero(data < 0x80)
  if ends.size == 0 or ends[-1] != data.size - 1:
    raise DecodeError("truncated packed varint")
  starts = np.concatenate([[0], ends[:-1] + 1])
  lengths = ends - starts + 1
  if lengths.max() > 10:
    raise DecodeError("varint longer than 10 bytes")
  position = np.arange(data.size) - np.repeat(starts, lengths)
  # Each byte holds 7 disjoint bits, so a sum is an OR; bits past 64 (only
  # possible in a 10th byte) are dropped by the shift, as protobuf does.
  parts = (data & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
  return np.add.reduceat(parts, starts).view(np.int64)


def _to_int64(value: int) -> int:
  value &= _UINT64_MASK
  return value - (1 << 64) if value >= (1 << 63) else value


def _decode_feature(buf: memoryview) -> tuple[Optional[str], np.ndarray]:
  """Decodes a Feature into (kind, values); kind None for an empty Feature."""
  kind = None
  parts = []
  for field, wire_type, value in _iter_fields(buf):
    if field not in _KIND_OF_FIELD:
      continue  # Unknown field: skipped, as protobuf parsers do.
    if wire_type != _LENGTH_DELIMITED:
      raise DecodeError(f"Feature field {field} has wire type {wire_type}")
    new_kind = _KIND_OF_FIELD[field]
    if new_kind != kind:  # A different oneof member replaces the last one.
      kind = new_kind
      parts = []
    parts.append(_decode_list(kind, value))
  if kind is None:
    return None, np.zeros((0,), np.float32)
  if len(parts) == 1:
    return kind, parts[0]
  return kind, np.concatenate(parts)


def _decode_list(kind: str, buf: memoryview) -> np.ndarray:
  """Decodes a BytesList, FloatList or Int64List message."""
  if kind == BYTES:
    values = [bytes(v) for f, w, v in _iter_fields(buf)
              if f == 1 and w == _LENGTH_DELIMITED]
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
  parts = []
  unpacked = []
  for field, wire_type, value in _iter_fields(buf):
    if field != 1:
      continue
    if wire_type == _LENGTH_DELIMITED:  # Packed.
      if unpacked:
        parts.append(np.array(unpacked, _DTYPE_OF_KIND[kind]))
        unpacked = []
      if kind == FLOAT:
        if len(value) % 4:
          raise DecodeError("packed floats of length not a multiple of 4")
        parts.append(np.frombuffer(value, "<f4").astype(np.float32))
      else:
        parts.append(_decode_packed_varints(value))
    elif kind == FLOAT and wire_type == _FIXED32:
      unpacked.append(struct.unpack("<f", value.to_bytes(4, "little"))[0])
    elif kind == INT64 and wire_type == _VARINT:
      unpacked.append(_to_int64(value))
    else:
      raise DecodeError(f"{kind} value has wire type {wire_type}")
  if unpacked:
    parts.append(np.array(unpacked, _DTYPE_OF_KIND[kind]))
  if not parts:
    return np.zeros((0,), _DTYPE_OF_KIND[kind])
  return parts[0] if len(parts) == 1 else np.concatenate(parts)


def decode_example(
    data: bytes) -> dict[str, tuple[Optional[str], np.ndarray]]:
  """Decodes a serialized tf.train.Example.

  Args:
    data: the serialized proto.

  Returns:
    feature name -> (kind, values), kind one of BYTES, FLOAT, INT64 (None for
    a Feature with no value set) and values a 1-D array: object of `bytes`,
    float32 or int64.

  Raises:
    DecodeError: if `data` is not a well-formed serialization.
  """
  features = {}
  for field, wire_type, value in _iter_fields(memoryview(data)):
    if field != 1:
      continue
    if wire_type != _LENGTH_DELIMITED:
      raise DecodeError(f"Example.features has wire type {wire_type}")
    for f, w, entry in _iter_fields(value):
      if f != 1:
        continue
      if w != _LENGTH_DELIMITED:
        raise DecodeError(f"Features.feature entry has wire type {w}")
      key = b""
      feature = (None, np.zeros((0,), np.float32))
      for ef, ew, ev in _iter_fields(entry):
        if ef in (1, 2) and ew != _LENGTH_DELIMITED:
          raise DecodeError(f"map entry field {ef} has wire type {ew}")
        if ef == 1:
          key = bytes(ev)
        elif ef == 2:
          feature = _decode_feature(ev)
      try:
        name = key.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DecodeError(f"feature name {key!r} is not UTF-8") from e
      features[name] = feature  # Later map entries win, as in protobuf.
  return features


# -- Protobuf wire format: encoding ------------------------------------------


def _varint(value: int) -> bytes:
  value &= _UINT64_MASK  # Negative int64 -> 10-byte two's complement.
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(
      len(payload)) + payload


def _encode_feature(values: Any, packed: bool) -> bytes:
  """Encodes one feature's values as a Feature message."""
  array = np.asarray(values)
  flat = array.reshape(-1)
  if array.dtype.kind in "OSU":
    items = b"".join(
        _field(1, v.encode("utf-8") if isinstance(v, str) else bytes(v))
        for v in flat)
    return _field(1, items)
  if array.dtype.kind == "f":
    floats = flat.astype("<f4")
    if packed:
      items = _field(1, floats.tobytes())
    else:
      key = _varint(1 << 3 | _FIXED32)
      items = b"".join(key + struct.pack("<f", v) for v in floats)
    return _field(2, items)
  if array.dtype.kind in "biu":
    ints = [int(v) for v in flat]
    if packed:
      items = _field(1, b"".join(_varint(v) for v in ints))
    else:
      items = b"".join(_varint(1 << 3 | _VARINT) + _varint(v) for v in ints)
    return _field(3, items)
  raise ValueError(f"cannot encode values of dtype {array.dtype}")


def encode_example(features: Mapping[str, Any], packed: bool = True) -> bytes:
  """Serializes features as a tf.train.Example (what TF would write).

  Args:
    features: feature name -> values of one example (scalar or array): bytes
      or str -> bytes_list, floats -> float_list, ints and bools ->
      int64_list.
    packed: whether to write numeric lists packed (TF's default) or as one
      field per value (also valid; readers must accept both).

  Returns:
    The serialized proto.
  """
  entries = b"".join(
      _field(1, _field(1, name.encode("utf-8")) +
             _field(2, _encode_feature(values, packed)))
      for name, values in sorted(features.items()))
  return _field(1, entries)


# -- The SQLite source --------------------------------------------------------


def _infer_specs(
    path: str, client_id: str,
    examples: Sequence[Mapping[str, tuple[Optional[str], np.ndarray]]],
    feature_shapes: Mapping[str, Sequence[int]],
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Feature specs from the decoded examples of one client."""
  specs = {}
  for name in sorted(examples[0]):
    kinds = {ex[name][0] for ex in examples if name in ex}
    lengths = {ex[name][1].size for ex in examples if name in ex}
    if len(kinds) != 1 or None in kinds:
      raise common.error(
          path, f"client {client_id!r}: feature {name!r} has value kinds "
          f"{sorted(str(k) for k in kinds)}; expected one of bytes_list, "
          "float_list, int64_list throughout")
    if len(lengths) != 1:
      raise common.error(
          path, f"client {client_id!r}: feature {name!r} has a variable "
          f"number of values per example ({min(lengths)} to {max(lengths)}); "
          "only fixed-length features are supported")
    (kind,), (length,) = kinds, lengths
    if name in feature_shapes:
      shape = tuple(int(d) for d in feature_shapes[name])
      if common.num_elements(shape) != length:
        raise common.error(
            path, f"feature {name!r} has {length} values per example, which "
            f"do not fit feature_shapes[{name!r}] = {list(shape)}")
    else:
      shape = () if length == 1 else (length,)
    specs[name] = (shape, _DTYPE_OF_KIND[kind])
  unknown = sorted(set(feature_shapes) - set(specs))
  if unknown:
    raise common.error(
        path, f"feature_shapes names features {unknown} not in the file "
        f"(features: {sorted(specs)})")
  return specs


class TffSqliteSource(common.IndexedSource):
  """One split of a TFF SQLite file as a lazy `ClientSource`.

  Opening reads `client_metadata` (ids and sizes, ids in sorted order) and
  decodes the first non-empty client's examples to learn the features: a
  feature with one value in every example is a scalar, one with L values is
  1-D [L] unless `feature_shapes` gives its shape (e.g. EMNIST
  `{"pixels": (28, 28)}`). Every feature must have the same number of values
  in every example. Examples are read and decoded only by `subset`, in row
  order within a client.
  """

  def __init__(self, path: str, split_name: str = "train",
               feature_shapes: Optional[Mapping[str, Sequence[int]]] = None):
    """Opens the file and reads its index.

    Args:
      path: a TFF SQLite file.
      split_name: which split (e.g. "train", "test", "val") to read.
      feature_shapes: optional feature name -> per-example shape, for
        fixed-length features stored flat.

    Raises:
      FormatError: if the file is missing, not SQLite, lacks the TFF tables,
        has no clients in the split, or its examples do not decode.
    """
    self._path = common.check_file(path)
    self._split_name = split_name
    self._lock = threading.Lock()
    self._connection = common.open_sqlite(self._path)
    try:
      with common.reraise(self._path, "cannot read the client index"):
        self._read_index(dict(feature_shapes or {}))
    except BaseException:
      self._connection.close()
      raise

  def _read_index(self, feature_shapes) -> None:
    path = self._path
    common.require_columns(path, common.sqlite_columns(self._connection),
                           _REQUIRED_COLUMNS, "TFF SQLite")
    rows = self._connection.execute(
        "SELECT client_id, num_examples FROM client_metadata "
        "WHERE split_name = ? ORDER BY client_id", (self._split_name,)
    ).fetchall()
    if not rows:
      splits = [r[0] for r in self._connection.execute(
          "SELECT DISTINCT split_name FROM client_metadata")]
      raise common.error(
          path, f"no clients in split {self._split_name!r} "
          f"(splits in client_metadata: {sorted(map(str, splits))})")
    client_ids = tuple(str(r[0]) for r in rows)
    if len(set(client_ids)) != len(client_ids):
      raise common.error(path, "client_metadata lists a client twice in split "
                               f"{self._split_name!r}")
    try:
      sizes = np.array([int(r[1]) for r in rows], np.int64)
    except (TypeError, ValueError) as e:
      raise common.error(path, "client_metadata.num_examples holds a "
                               "non-integer") from e
    if np.any(sizes < 0):
      raise common.error(path, "client_metadata.num_examples is negative")
    nonempty = np.flatnonzero(sizes > 0)
    if nonempty.size == 0:
      raise common.error(
          path, f"every client of split {self._split_name!r} is empty")
    first = client_ids[nonempty[0]]
    examples = self._decode_client(first)
    if not examples:
      raise common.error(
          path, f"client {first!r} has no rows in table 'examples' although "
          f"client_metadata says {sizes[nonempty[0]]}")
    self._client_ids = client_ids
    self._num_examples = sizes
    self._specs = _infer_specs(path, first, examples, feature_shapes)

  def _decode_client(self, client_id: str):
    rows = self._connection.execute(
        "SELECT serialized_example_proto FROM examples "
        "WHERE split_name = ? AND client_id = ? ORDER BY rowid",
        (self._split_name, client_id)).fetchall()
    decoded = []
    for k, (blob,) in enumerate(rows):
      if not isinstance(blob, (bytes, str)):
        raise common.error(
            self._path, f"client {client_id!r} example {k}: "
            f"serialized_example_proto is {type(blob).__name__}, not a blob")
      try:
        decoded.append(decode_example(
            blob.encode("utf-8") if isinstance(blob, str) else blob))
      except DecodeError as e:
        raise common.error(
            self._path, f"client {client_id!r} example {k}: malformed "
            f"tf.train.Example: {e}") from e
    return decoded

  def _client_arrays(self, client_id: str, examples) -> dict[str, np.ndarray]:
    arrays = {}
    for name, (shape, dtype) in self._specs.items():
      values = []
      for k, example in enumerate(examples):
        if name not in example:
          raise common.error(
              self._path, f"client {client_id!r} example {k} has no feature "
              f"{name!r}")
        kind, array = example[name]
        if kind is None or _DTYPE_OF_KIND[kind] != dtype:
          raise common.error(
              self._path, f"client {client_id!r} example {k}: feature "
              f"{name!r} is a {kind}, expected dtype {dtype}")
        if array.size != common.num_elements(shape):
          raise common.error(
              self._path, f"client {client_id!r} example {k}: feature "
              f"{name!r} has {array.size} values, expected "
              f"{common.num_elements(shape)} (shape {list(shape)})")
        values.append(array)
      if values:
        arrays[name] = np.stack(values).reshape((len(values),) + shape)
      else:
        arrays[name] = np.zeros((0,) + shape, dtype)
    return arrays

  @property
  def split_name(self) -> str:
    return self._split_name

  def subset(
      self, indices: Sequence[int]) -> population_lib.FederatedPopulation:
    """Reads and decodes the clients at `indices`, in that order.

    Args:
      indices: client indices into `client_ids`.

    Returns:
      A FederatedPopulation of exactly these clients.

    Raises:
      FormatError: if an example is malformed or disagrees with the feature
        specs, or a client's row count disagrees with client_metadata.
      IndexError: if an index is out of range.
    """
    indices = common.check_indices(indices, self.num_clients)
    client_ids = [self._client_ids[i] for i in indices]
    client_features = []
    with self._lock:
      for cid in client_ids:
        with common.reraise(self._path, f"cannot read client {cid!r}"):
          examples = self._decode_client(cid)
        client_features.append(self._client_arrays(cid, examples))
    return common.assemble(self._path, client_ids, client_features,
                           self._specs, self._num_examples[indices])

  def close(self) -> None:
    with self._lock:
      self._connection.close()

  def __repr__(self) -> str:
    return (f"TffSqliteSource({self._path!r}, split_name="
            f"{self._split_name!r}, num_clients={self.num_clients})")


def write_tff_sqlite(
    path: str,
    client_ids: Sequence[str],
    client_features: Sequence[Mapping[str, np.ndarray]],
    split_name: str = "train",
    packed: bool = True,
) -> None:
  """Writes (or appends a split to) a file in TFF's SQLite layout.

  Args:
    path: the database file; created if missing, and a split already in it
      is kept, so calling once per split builds a multi-split file.
    client_ids: one id per client.
    client_features: per client, feature name -> array [n_i, ...]; example
      `j` of a client is the tf.train.Example of row `j` of each array,
      flattened.
    split_name: the split these clients belong to.
    packed: whether numeric lists are written packed (see encode_example).

  Raises:
    ValueError: if the arguments differ in length.
  """
  if len(client_ids) != len(client_features):
    raise ValueError("client_ids and client_features differ in length")
  connection = sqlite3.connect(os.fspath(path))
  try:
    with connection:
      connection.execute(
          "CREATE TABLE IF NOT EXISTS examples (split_name TEXT NOT NULL, "
          "client_id TEXT NOT NULL, serialized_example_proto BLOB NOT NULL)")
      connection.execute(
          "CREATE INDEX IF NOT EXISTS idx_examples_client_id_split "
          "ON examples (split_name, client_id)")
      connection.execute(
          "CREATE TABLE IF NOT EXISTS client_metadata (client_id TEXT NOT "
          "NULL, split_name TEXT NOT NULL, num_examples INTEGER NOT NULL)")
      for cid, feats in zip(client_ids, client_features):
        arrays = {n: np.asarray(v) for n, v in feats.items()}
        size = len(next(iter(arrays.values()))) if arrays else 0
        rows = [
            (split_name, str(cid),
             encode_example({n: a[j] for n, a in arrays.items()}, packed))
            for j in range(size)]
        connection.executemany(
            "INSERT INTO examples VALUES (?, ?, ?)", rows)
        connection.execute(
            "INSERT INTO client_metadata VALUES (?, ?, ?)",
            (str(cid), split_name, size))
  finally:
    connection.close()
