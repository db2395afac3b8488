"""Tests for reading federated benchmark file formats without TensorFlow."""

import json
import os
import sqlite3
import struct
import warnings
import zlib

import h5py
import msgpack
import numpy as np
import pytest

from fedjax_dp.data import formats
from fedjax_dp.data import population as population_lib
from fedjax_dp.data import prefetch
from fedjax_dp.data import source as source_lib
from fedjax_dp.data.formats import detect
from fedjax_dp.data.formats import fedjax_sqlite
from fedjax_dp.data.formats import leaf_json
from fedjax_dp.data.formats import tff_hdf5
from fedjax_dp.data.formats import tff_sqlite

# Ragged client sizes, an empty client included.
_SIZES = (3, 0, 5, 1, 4)
_IDS = ("f0000_14", "f0001_41", "f0002_00", "zz/x".replace("/", "_"), "é-1")


def _emnist_like(rng, sizes=_SIZES):
  return [{
      "pixels": rng.random((n, 28, 28), dtype=np.float32),
      "label": rng.integers(0, 62, size=n).astype(np.int32),
  } for n in sizes]


def _text_like(rng, sizes=_SIZES):
  """Byte strings of varying length, including empty and non-ASCII."""
  out = []
  for n in sizes:
    snippets = np.empty(n, dtype=object)
    snippets[:] = [
        bytes(rng.integers(32, 127, size=rng.integers(0, 30)).astype(np.uint8))
        + ("ü" * int(rng.integers(0, 2))).encode("utf-8") for _ in range(n)]
    out.append({"snippets": snippets})
  return out


def _cifar_like(rng, sizes=_SIZES):
  return [{
      "image": rng.integers(0, 256, size=(n, 32, 32, 3)).astype(np.uint8),
      "label": rng.integers(0, 100, size=n).astype(np.int64),
      "coarse_label": rng.integers(0, 20, size=n).astype(np.int64),
  } for n in sizes]


def _assert_population_equal(population, ids, feats, dtypes=None):
  """`population` holds exactly clients `ids` with features `feats`."""
  assert population.client_ids == tuple(ids)
  np.testing.assert_array_equal(
      population.num_examples,
      [len(next(iter(f.values()))) for f in feats])
  for i, expected in enumerate(feats):
    got = population.client(i)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
      value = np.asarray(value)
      if dtypes and name in dtypes:
        assert got[name].dtype == dtypes[name]
      if value.dtype == object:
        assert got[name].dtype == object
        assert list(got[name].reshape(-1)) == list(value.reshape(-1))
      else:
        np.testing.assert_array_equal(got[name].reshape(value.shape), value)


def _assert_format_error(path, fn, match=None):
  with pytest.raises(formats.FormatError) as info:
    fn()
  assert str(path) in str(info.value)
  if match:
    assert match in str(info.value), str(info.value)
  return info.value


def _truncate(path, fraction=0.5):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(int(size * fraction))


class _ReadCounter:
  """Counts the datasets whose contents h5py reads: through h5py's Dataset,
  and (once `count_opens` is set) those opened by the low-level API, which
  the numeric fast path reads and opening a source uses for sizes."""

  def __init__(self, monkeypatch):
    self.count = 0
    self.count_opens = False
    original = h5py.Dataset.__getitem__
    original_open = h5py.h5d.open

    def counting_getitem(dataset, *args, **kwargs):
      self.count += 1
      return original(dataset, *args, **kwargs)

    def counting_open(*args, **kwargs):
      self.count += self.count_opens
      return original_open(*args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting_getitem)
    monkeypatch.setattr(h5py.h5d, "open", counting_open)


def test_format_error_is_value_error():
  assert issubclass(formats.FormatError, ValueError)


def test_population_is_a_client_source():
  population = population_lib.FederatedPopulation.from_client_arrays(
      ["a"], [{"x": np.zeros((2, 3))}])
  assert isinstance(population, source_lib.ClientSource)


# -- TFF HDF5 -----------------------------------------------------------------


@pytest.mark.parametrize("make", [_emnist_like, _text_like, _cifar_like])
def test_tff_hdf5_round_trip(tmp_path, make):
  path = tmp_path / "data.h5"
  feats = make(np.random.default_rng(0))
  tff_hdf5.write_tff_hdf5(path, _IDS, feats)
  with tff_hdf5.TffHdf5Source(path) as source:
    assert isinstance(source, source_lib.ClientSource)
    order = np.argsort(_IDS)  # TFF lists clients sorted by id.
    assert source.client_ids == tuple(_IDS[i] for i in order)
    assert source.num_clients == len(_IDS)
    np.testing.assert_array_equal(source.num_examples,
                                  np.array(_SIZES)[order])
    assert source.num_examples.dtype == np.int64
    for name, value in feats[0].items():
      shape, dtype = source.feature_specs[name]
      assert shape == value.shape[1:]
      assert dtype == value.dtype
    everything = source.subset(np.arange(len(_IDS))[::-1])
    _assert_population_equal(
        everything, [source.client_ids[i] for i in range(len(_IDS))[::-1]],
        [feats[order[i]] for i in range(len(_IDS))[::-1]])


def test_tff_hdf5_emnist_dtypes(tmp_path):
  path = tmp_path / "emnist.h5"
  feats = _emnist_like(np.random.default_rng(1))
  tff_hdf5.write_tff_hdf5(path, _IDS, feats)
  with tff_hdf5.TffHdf5Source(path) as source:
    assert source.feature_specs == {
        "label": ((), np.dtype(np.int32)),
        "pixels": ((28, 28), np.dtype(np.float32))}
    population = source.subset([source.client_ids.index("f0002_00")])
    _assert_population_equal(population, ["f0002_00"], [feats[2]],
                             {"pixels": np.float32, "label": np.int32})


def test_tff_hdf5_features_argument(tmp_path):
  path = tmp_path / "cifar.h5"
  feats = _cifar_like(np.random.default_rng(2))
  tff_hdf5.write_tff_hdf5(path, _IDS, feats)
  with tff_hdf5.TffHdf5Source(path, features=["label", "image"]) as source:
    assert list(source.feature_specs) == ["label", "image"]
    population = source.subset([0])
    assert sorted(population.features) == ["image", "label"]
  _assert_format_error(
      path, lambda: tff_hdf5.TffHdf5Source(path, features=["pixels"]),
      "pixels")


def test_tff_hdf5_fixed_length_strings_become_bytes(tmp_path):
  path = tmp_path / "fixed.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("examples/a/tokens", data=np.array([b"ab", b"cde"]))
    f.create_dataset("examples/b/tokens", data=np.array([b"x"]))
  with tff_hdf5.TffHdf5Source(path) as source:
    assert source.feature_specs == {"tokens": ((), np.dtype(object))}
    tokens = source.subset([1, 0]).features["tokens"]
    assert tokens.dtype == object
    assert list(tokens) == [b"x", b"ab", b"cde"]


def test_tff_hdf5_lazy_reads_only_requested_clients(tmp_path, monkeypatch):
  path = tmp_path / "big.h5"
  rng = np.random.default_rng(3)
  sizes = rng.integers(0, 4, size=1000)
  ids = [f"client_{i:04d}" for i in range(1000)]
  feats = [{"x": rng.random((n, 3), dtype=np.float32),
            "y": np.arange(n, dtype=np.int64) + 10 * i}
           for i, n in enumerate(sizes)]
  tff_hdf5.write_tff_hdf5(path, ids, feats)
  reads = _ReadCounter(monkeypatch)
  with tff_hdf5.TffHdf5Source(path) as source:
    assert reads.count == 0  # Opening touches only metadata.
    reads.count_opens = True
    assert source.num_clients == 1000
    np.testing.assert_array_equal(source.num_examples, sizes)
    population = source.subset([993, 7])
    assert reads.count == 2 * 2  # Two clients x two features.
    _assert_population_equal(population, [ids[993], ids[7]],
                             [feats[993], feats[7]])
    assert source.subset([]).num_clients == 0
    assert source.subset([-1]).client_ids == (ids[-1],)
    with pytest.raises(IndexError):
      source.subset([1000])


def test_tff_hdf5_missing_file(tmp_path):
  path = tmp_path / "absent.h5"
  _assert_format_error(path, lambda: tff_hdf5.TffHdf5Source(path),
                       "no such file")


def test_tff_hdf5_not_hdf5(tmp_path):
  path = tmp_path / "garbage.h5"
  path.write_bytes(b"this is not an HDF5 file" * 10)
  _assert_format_error(path, lambda: tff_hdf5.TffHdf5Source(path))


def test_tff_hdf5_truncated(tmp_path):
  path = tmp_path / "truncated.h5"
  tff_hdf5.write_tff_hdf5(path, _IDS, _emnist_like(np.random.default_rng(4)))
  _truncate(path)

  def open_and_read():
    with tff_hdf5.TffHdf5Source(path) as source:
      source.subset(range(source.num_clients))

  _assert_format_error(path, open_and_read)


def test_tff_hdf5_without_examples_group(tmp_path):
  path = tmp_path / "other.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("data", data=np.zeros(3))
  _assert_format_error(path, lambda: tff_hdf5.TffHdf5Source(path),
                       "'examples'")


def test_tff_hdf5_no_clients(tmp_path):
  path = tmp_path / "empty.h5"
  with h5py.File(path, "w") as f:
    f.create_group("examples")
  _assert_format_error(path, lambda: tff_hdf5.TffHdf5Source(path),
                       "no clients")


def test_tff_hdf5_leading_dimensions_disagree(tmp_path):
  path = tmp_path / "ragged.h5"
  tff_hdf5.write_tff_hdf5(path, ["a", "b"], [
      {"label": np.zeros(2, np.int32), "pixels": np.zeros((2, 4), np.float32)},
      {"label": np.zeros(3, np.int32), "pixels": np.zeros((2, 4), np.float32)},
  ])
  with tff_hdf5.TffHdf5Source(path) as source:
    source.subset([0])  # The consistent client reads fine.
    _assert_format_error(path, lambda: source.subset([1]), "'b'")


def test_tff_hdf5_client_missing_feature(tmp_path):
  path = tmp_path / "missing.h5"
  tff_hdf5.write_tff_hdf5(path, ["a", "b"], [
      {"label": np.zeros(2, np.int32), "pixels": np.zeros((2, 4), np.float32)},
      {"label": np.zeros(2, np.int32)},
  ])
  with tff_hdf5.TffHdf5Source(path) as source:
    _assert_format_error(path, lambda: source.subset([1]), "pixels")
  # The dataset that gives client sizes is checked when opening.
  tff_hdf5.write_tff_hdf5(path, ["a", "b"], [
      {"label": np.zeros(2, np.int32), "pixels": np.zeros((2, 4), np.float32)},
      {"pixels": np.zeros((2, 4), np.float32)},
  ])
  _assert_format_error(path, lambda: tff_hdf5.TffHdf5Source(path), "'b'")


def test_tff_hdf5_other_feature_shape(tmp_path):
  path = tmp_path / "shape.h5"
  tff_hdf5.write_tff_hdf5(path, ["a", "b"], [
      {"pixels": np.zeros((2, 4), np.float32)},
      {"pixels": np.zeros((2, 5), np.float32)},
  ])
  with tff_hdf5.TffHdf5Source(path) as source:
    _assert_format_error(path, lambda: source.subset([0, 1]), "shape")


# -- Protobuf tf.train.Example ------------------------------------------------


def test_encode_example_matches_hand_computed_bytes():
  # Example{features{feature{key: "x" value{float_list{value: [1.0]}}}}}.
  expected = b"\n\x0f\n\r\n\x01x\x12\x08\x12\x06\n\x04\x00\x00\x80?"
  assert tff_sqlite.encode_example({"x": np.float32(1.0)}) == expected
  kind, values = tff_sqlite.decode_example(expected)["x"]
  assert kind == tff_sqlite.FLOAT
  np.testing.assert_array_equal(values, [1.0])


@pytest.mark.parametrize("packed", [True, False])
def test_example_round_trip(packed):
  ints = np.array([0, 1, -1, 127, 128, 300, 2**62, -2**63, 2**63 - 1])
  floats = np.array([0.0, -1.5, 3.25e10, np.inf], np.float32)
  data = tff_sqlite.encode_example(
      {"i": ints, "f": floats, "b": [b"", b"\x00\xff", "ü".encode()]},
      packed=packed)
  decoded = tff_sqlite.decode_example(data)
  assert decoded["i"][0] == tff_sqlite.INT64
  np.testing.assert_array_equal(decoded["i"][1], ints)
  assert decoded["i"][1].dtype == np.int64
  np.testing.assert_array_equal(decoded["f"][1], floats)
  assert decoded["f"][1].dtype == np.float32
  assert list(decoded["b"][1]) == [b"", b"\x00\xff", "ü".encode()]


def test_decode_example_skips_unknown_fields_and_merges():
  feature = (b"\x1a\x03\x0a\x01\x05"      # int64_list [5]
             + b"\x20\x07"                # unknown varint field 4
             + b"\x1a\x03\x0a\x01\x06")   # int64_list [6], merged
  entry = b"\x0a\x01a" + b"\x12" + bytes([len(feature)]) + feature
  features = b"\x0a" + bytes([len(entry)]) + entry
  unknown_fixed32 = b"\x15\x00\x00\x00\x00"  # Example field 2: skipped.
  example = b"\x0a" + bytes([len(features)]) + features + unknown_fixed32
  kind, values = tff_sqlite.decode_example(example)["a"]
  assert kind == tff_sqlite.INT64
  np.testing.assert_array_equal(values, [5, 6])


@pytest.mark.parametrize("data", [
    b"\x0a",                      # length missing
    b"\x0a\x05\x0a\x01",          # length past the end
    b"\x0a\x80",                  # truncated varint
    b"\x0b",                      # group wire type
    b"\x0a\x02\x0a\x80",          # inner truncated varint
    b"\x0a" + b"\xff" * 11,       # varint longer than 10 bytes
    b"\x00",                      # field number 0
])
def test_decode_example_rejects_malformed(data):
  with pytest.raises(tff_sqlite.DecodeError):
    tff_sqlite.decode_example(data)


def _tf_example_classes():
  """tf.train.Example built from a descriptor with the protobuf package."""
  descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
  descriptor_pool = pytest.importorskip("google.protobuf.descriptor_pool")
  message_factory = pytest.importorskip("google.protobuf.message_factory")
  if not hasattr(message_factory, "GetMessageClass"):
    pytest.skip("protobuf too old")
  f = descriptor_pb2.FieldDescriptorProto
  file = descriptor_pb2.FileDescriptorProto(
      name="fedjax_dp_test_example.proto", package="fedjax_dp_test",
      syntax="proto3")

  def message(name, fields, nested=()):
    m = file.message_type.add(name=name)
    for fname, number, ftype, label, type_name, oneof in fields:
      field = m.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        field.type_name = type_name
      if oneof is not None:
        field.oneof_index = oneof
    return m

  rep, opt = f.LABEL_REPEATED, f.LABEL_OPTIONAL
  message("BytesList", [("value", 1, f.TYPE_BYTES, rep, None, None)])
  message("FloatList", [("value", 1, f.TYPE_FLOAT, rep, None, None)])
  message("Int64List", [("value", 1, f.TYPE_INT64, rep, None, None)])
  feature = message("Feature", [
      ("bytes_list", 1, f.TYPE_MESSAGE, opt, ".fedjax_dp_test.BytesList", 0),
      ("float_list", 2, f.TYPE_MESSAGE, opt, ".fedjax_dp_test.FloatList", 0),
      ("int64_list", 3, f.TYPE_MESSAGE, opt, ".fedjax_dp_test.Int64List", 0),
  ])
  feature.oneof_decl.add(name="kind")
  features = message("Features", [
      ("feature", 1, f.TYPE_MESSAGE, rep,
       ".fedjax_dp_test.Features.FeatureEntry", None)])
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=f.TYPE_MESSAGE, label=opt,
                  type_name=".fedjax_dp_test.Feature")
  message("Example", [("features", 1, f.TYPE_MESSAGE, opt,
                       ".fedjax_dp_test.Features", None)])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName("fedjax_dp_test.Example"))


def test_example_codec_agrees_with_protobuf_library():
  example_class = _tf_example_classes()
  rng = np.random.default_rng(5)
  ints = [int(v) for v in rng.integers(-2**63, 2**63 - 1, size=20)]
  floats = rng.standard_normal(7).astype(np.float32)
  reference = example_class()
  reference.features.feature["i"].int64_list.value.extend(ints)
  reference.features.feature["f"].float_list.value.extend(floats.tolist())
  reference.features.feature["b"].bytes_list.value.extend([b"ab", b""])
  decoded = tff_sqlite.decode_example(reference.SerializeToString())
  np.testing.assert_array_equal(decoded["i"][1], ints)
  np.testing.assert_array_equal(decoded["f"][1], floats)
  assert list(decoded["b"][1]) == [b"ab", b""]
  for packed in (True, False):
    parsed = example_class.FromString(tff_sqlite.encode_example(
        {"i": np.array(ints), "f": floats, "b": [b"ab", b""]}, packed))
    assert list(parsed.features.feature["i"].int64_list.value) == ints
    np.testing.assert_array_equal(
        np.array(parsed.features.feature["f"].float_list.value, np.float32),
        floats)
    assert list(parsed.features.feature["b"].bytes_list.value) == [b"ab", b""]


# -- TFF SQLite ---------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
def test_tff_sqlite_round_trip_with_feature_shapes(tmp_path, packed):
  path = tmp_path / "emnist.sqlite"
  rng = np.random.default_rng(6)
  train, test = _emnist_like(rng), _emnist_like(rng, sizes=(2, 1, 1, 2, 3))
  tff_sqlite.write_tff_sqlite(path, _IDS, train, "train", packed=packed)
  tff_sqlite.write_tff_sqlite(path, _IDS, test, "test", packed=packed)
  for split, feats in (("train", train), ("test", test)):
    with tff_sqlite.TffSqliteSource(
        path, split_name=split, feature_shapes={"pixels": (28, 28)}) as source:
      assert isinstance(source, source_lib.ClientSource)
      order = np.argsort(_IDS)
      assert source.client_ids == tuple(_IDS[i] for i in order)
      np.testing.assert_array_equal(
          source.num_examples,
          [len(feats[i]["label"]) for i in order])
      assert source.feature_specs == {
          "label": ((), np.dtype(np.int64)),
          "pixels": ((28, 28), np.dtype(np.float32))}
      indices = [4, 0, 2]
      _assert_population_equal(
          source.subset(indices), [source.client_ids[i] for i in indices],
          [feats[order[i]] for i in indices])


def test_tff_sqlite_flat_and_byte_features(tmp_path):
  path = tmp_path / "so.sqlite"
  rng = np.random.default_rng(7)
  text = _text_like(rng)
  feats = [{"tokens": t["snippets"],
            "score": np.arange(len(t["snippets"]), dtype=np.int64) - 2,
            "vector": rng.random((len(t["snippets"]), 6)).astype(np.float32)}
           for t in text]
  tff_sqlite.write_tff_sqlite(path, _IDS, feats)
  with tff_sqlite.TffSqliteSource(path) as source:
    assert source.feature_specs == {
        "score": ((), np.dtype(np.int64)),
        "tokens": ((), np.dtype(object)),
        "vector": ((6,), np.dtype(np.float32))}
    order = np.argsort(_IDS)
    _assert_population_equal(
        source.subset(range(len(_IDS))), [_IDS[i] for i in order],
        [feats[i] for i in order])


def test_tff_sqlite_lazy_decodes_only_requested_clients(tmp_path,
                                                        monkeypatch):
  path = tmp_path / "big.sqlite"
  rng = np.random.default_rng(8)
  sizes = rng.integers(1, 3, size=1000)
  ids = [f"c{i:04d}" for i in range(1000)]
  feats = [{"x": rng.random((n, 2)).astype(np.float32),
            "y": np.full(n, i, np.int64)} for i, n in enumerate(sizes)]
  tff_sqlite.write_tff_sqlite(path, ids, feats)
  calls = []
  original = tff_sqlite.decode_example
  monkeypatch.setattr(tff_sqlite, "decode_example",
                      lambda data: calls.append(1) or original(data))
  with tff_sqlite.TffSqliteSource(path) as source:
    # Only the first client is decoded, to learn the features.
    assert len(calls) == sizes[0]
    np.testing.assert_array_equal(source.num_examples, sizes)
    del calls[:]
    population = source.subset([900, 5])
    assert len(calls) == sizes[900] + sizes[5]
    _assert_population_equal(population, [ids[900], ids[5]],
                             [feats[900], feats[5]])


def test_tff_sqlite_missing_and_garbage_files(tmp_path):
  absent = tmp_path / "absent.sqlite"
  _assert_format_error(absent, lambda: tff_sqlite.TffSqliteSource(absent),
                       "no such file")
  assert not absent.exists()  # Opening never creates a database.
  garbage = tmp_path / "garbage.sqlite"
  garbage.write_bytes(b"definitely not sqlite " * 100)
  _assert_format_error(garbage, lambda: tff_sqlite.TffSqliteSource(garbage))


def test_tff_sqlite_truncated(tmp_path):
  path = tmp_path / "truncated.sqlite"
  rng = np.random.default_rng(9)
  tff_sqlite.write_tff_sqlite(path, _IDS, _emnist_like(rng))
  _truncate(path, 0.3)

  def open_and_read():
    with tff_sqlite.TffSqliteSource(path) as source:
      source.subset(range(source.num_clients))

  _assert_format_error(path, open_and_read)


def test_tff_sqlite_without_tables(tmp_path):
  path = tmp_path / "other.sqlite"
  with sqlite3.connect(path) as connection:
    connection.execute("CREATE TABLE something (a INTEGER)")
  connection.close()
  _assert_format_error(path, lambda: tff_sqlite.TffSqliteSource(path),
                       "no table")


def test_tff_sqlite_unknown_split(tmp_path):
  path = tmp_path / "data.sqlite"
  tff_sqlite.write_tff_sqlite(path, ["a"], [{"y": np.arange(2)}], "train")
  _assert_format_error(
      path, lambda: tff_sqlite.TffSqliteSource(path, split_name="val"),
      "'train'")


def test_tff_sqlite_malformed_proto(tmp_path):
  path = tmp_path / "bad.sqlite"
  tff_sqlite.write_tff_sqlite(path, ["a", "b"], [
      {"y": np.arange(2)}, {"y": np.arange(3)}])
  connection = sqlite3.connect(path)
  with connection:
    connection.execute(
        "UPDATE examples SET serialized_example_proto = ? WHERE rowid = ("
        "SELECT MAX(rowid) FROM examples WHERE client_id = 'b')",
        (b"\x0a\x05\x0a",))
  connection.close()
  with tff_sqlite.TffSqliteSource(path) as source:
    source.subset([0])
    _assert_format_error(path, lambda: source.subset([1]),
                         "malformed tf.train.Example")


def test_tff_sqlite_metadata_disagrees_with_rows(tmp_path):
  path = tmp_path / "meta.sqlite"
  tff_sqlite.write_tff_sqlite(path, ["a", "b"], [
      {"y": np.arange(2)}, {"y": np.arange(3)}])
  connection = sqlite3.connect(path)
  with connection:
    connection.execute(
        "UPDATE client_metadata SET num_examples = 7 WHERE client_id = 'b'")
  connection.close()
  with tff_sqlite.TffSqliteSource(path) as source:
    _assert_format_error(path, lambda: source.subset([1]), "'b'")


def test_tff_sqlite_feature_shapes_must_fit(tmp_path):
  path = tmp_path / "shape.sqlite"
  tff_sqlite.write_tff_sqlite(path, ["a"], [{"x": np.zeros((2, 6))}])
  _assert_format_error(
      path, lambda: tff_sqlite.TffSqliteSource(
          path, feature_shapes={"x": (4, 2)}), "feature_shapes")
  with tff_sqlite.TffSqliteSource(
      path, feature_shapes={"x": (3, 2)}) as source:
    assert source.feature_specs["x"] == ((3, 2), np.dtype(np.float32))


def test_tff_sqlite_variable_length_feature(tmp_path):
  path = tmp_path / "var.sqlite"
  connection = sqlite3.connect(path)
  with connection:
    connection.execute("CREATE TABLE examples (split_name TEXT, client_id "
                       "TEXT, serialized_example_proto BLOB)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT, "
                       "split_name TEXT, num_examples INTEGER)")
    connection.executemany("INSERT INTO examples VALUES ('train', 'a', ?)", [
        (tff_sqlite.encode_example({"x": np.arange(n)}),) for n in (1, 3)])
    connection.execute("INSERT INTO client_metadata VALUES ('a', 'train', 2)")
  connection.close()
  _assert_format_error(path, lambda: tff_sqlite.TffSqliteSource(path),
                       "variable number of values")


# -- FedJAX SQLite ------------------------------------------------------------


def test_fedjax_serialization_round_trip():
  examples = {
      "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
      "f64": np.array([1.5, -2.0]),
      "i8": np.array([-3, 4], np.int8),
      "u16": np.array([[1], [65535]], np.uint16),
      "flag": np.array([True, False]),
      "text": np.array([b"ab", b""], dtype=object),
      "empty": np.zeros((0, 4), np.int32),
      "scalar": np.float32(2.5),
      "z": complex(1, -2),
  }
  decoded = fedjax_sqlite.deserialize(fedjax_sqlite.serialize(examples))
  assert sorted(decoded) == sorted(examples)
  for name, value in examples.items():
    if isinstance(value, np.ndarray):
      assert decoded[name].dtype == value.dtype, name
      assert decoded[name].shape == value.shape, name
      assert decoded[name].tolist() == value.tolist(), name
  assert decoded["scalar"] == np.float32(2.5)
  assert isinstance(decoded["scalar"], np.float32)
  assert decoded["z"] == complex(1, -2)


def test_fedjax_deserializes_fedjax_scheme_written_by_hand():
  # What fedjax.core.serialization writes: ext 1 = packb((shape, dtype name,
  # C-order bytes)), ext 4 = packb((shape, [bytes...])), all zlib-compressed.
  pixels = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
  payload = msgpack.packb({
      "x": msgpack.ExtType(1, msgpack.packb(
          ((2, 2, 2), "float32", pixels.tobytes("C")), use_bin_type=True)),
      "y": msgpack.ExtType(1, msgpack.packb(
          ((2,), "int32", np.array([3, 4], np.int32).tobytes()),
          use_bin_type=True)),
      "s": msgpack.ExtType(4, msgpack.packb(((2,), [b"a", b"bc"]),
                                            use_bin_type=True)),
  }, use_bin_type=True)
  decoded = fedjax_sqlite.deserialize(zlib.compress(payload))
  np.testing.assert_array_equal(decoded["x"], pixels)
  assert decoded["y"].dtype == np.int32
  assert list(decoded["s"]) == [b"a", b"bc"]
  # And our encoder writes exactly that nested structure.
  ours = msgpack.unpackb(zlib.decompress(fedjax_sqlite.serialize(
      {"x": pixels})), raw=False)
  assert ours["x"].code == 1
  shape, dtype_name, buffer = msgpack.unpackb(ours["x"].data, raw=False)
  assert (shape, dtype_name, buffer) == ([2, 2, 2], "float32",
                                         pixels.tobytes())


@pytest.mark.parametrize("make", [_emnist_like, _text_like, _cifar_like])
def test_fedjax_sqlite_round_trip(tmp_path, make):
  path = tmp_path / "data.sqlite"
  feats = make(np.random.default_rng(10))
  fedjax_sqlite.write_fedjax_sqlite(path, _IDS, feats)
  with fedjax_sqlite.FedjaxSqliteSource(path) as source:
    assert isinstance(source, source_lib.ClientSource)
    assert source.client_ids == _IDS  # Row order, as FedJAX iterates.
    np.testing.assert_array_equal(source.num_examples, _SIZES)
    for name, value in feats[0].items():
      assert source.feature_specs[name] == (value.shape[1:], value.dtype)
    _assert_population_equal(source.subset([3, 1, 0]),
                             [_IDS[3], _IDS[1], _IDS[0]],
                             [feats[3], feats[1], feats[0]])


def test_fedjax_sqlite_lazy_reads_only_requested_clients(tmp_path,
                                                         monkeypatch):
  path = tmp_path / "big.sqlite"
  rng = np.random.default_rng(11)
  ids = [f"c{i}" for i in range(1000)]
  feats = [{"x": rng.random((int(n), 2)).astype(np.float32)}
           for n in rng.integers(0, 4, size=1000)]
  fedjax_sqlite.write_fedjax_sqlite(path, ids, feats)
  calls = []
  original = fedjax_sqlite.deserialize
  monkeypatch.setattr(fedjax_sqlite, "deserialize",
                      lambda data: calls.append(1) or original(data))
  with fedjax_sqlite.FedjaxSqliteSource(path) as source:
    assert len(calls) == 1  # The first client, for the feature specs.
    population = source.subset([998, 3])
    assert len(calls) == 3
    _assert_population_equal(population, [ids[998], ids[3]],
                             [feats[998], feats[3]])


def test_large_subsets_read_in_parallel_equal_the_sequential_read(
    tmp_path, monkeypatch):
  """Numeric HDF5 features read by the low-level API, and SQLite subsets
  read by several threads, give what the per-client reads give; a damaged
  client is still named."""
  rng = np.random.default_rng(12)
  ids = [f"c{i:03d}" for i in range(300)]
  feats = [{"x": rng.random((int(n), 2, 3)).astype(np.float32),
            "y": rng.integers(0, 9, int(n)).astype(np.int32)}
           for n in rng.integers(0, 5, size=300)]
  indices = rng.permutation(300)[:200]
  want = ([ids[i] for i in indices], [feats[i] for i in indices])
  fedjax_sqlite.write_fedjax_sqlite(tmp_path / "d.sqlite", ids, feats)
  tff_hdf5.write_tff_hdf5(tmp_path / "d.h5", ids, feats)
  monkeypatch.setattr(fedjax_sqlite, "_READER_THREADS", 3)
  with fedjax_sqlite.FedjaxSqliteSource(tmp_path / "d.sqlite") as source:
    _assert_population_equal(source.subset(indices), *want)
    assert len(source._reader_connections) == 3  # pylint: disable=protected-access
  with tff_hdf5.TffHdf5Source(tmp_path / "d.h5") as source:
    order = {cid: k for k, cid in enumerate(source.client_ids)}
    fast = source.subset([order[c] for c in want[0]])
    _assert_population_equal(fast, *want)
  # A damaged blob in the last thread's share.
  connection = sqlite3.connect(tmp_path / "d.sqlite")
  with connection:
    connection.execute("UPDATE federated_data SET data = ? WHERE client_id = ?",
                       (b"not zlib", ids[indices[-1]].encode()))
  connection.close()
  with fedjax_sqlite.FedjaxSqliteSource(tmp_path / "d.sqlite") as source:
    _assert_format_error(tmp_path / "d.sqlite",
                         lambda: source.subset(indices), ids[indices[-1]])


def test_fedjax_sqlite_errors(tmp_path):
  absent = tmp_path / "absent.sqlite"
  _assert_format_error(absent, lambda: fedjax_sqlite.FedjaxSqliteSource(absent),
                       "no such file")
  other = tmp_path / "other.sqlite"
  tff_sqlite.write_tff_sqlite(other, ["a"], [{"y": np.arange(2)}])
  _assert_format_error(other, lambda: fedjax_sqlite.FedjaxSqliteSource(other),
                       "federated_data")

  path = tmp_path / "data.sqlite"
  fedjax_sqlite.write_fedjax_sqlite(path, ["a", "b", "c"], [
      {"y": np.arange(2)}, {"y": np.arange(3)}, {"y": np.arange(1)}])
  connection = sqlite3.connect(path)
  with connection:
    connection.execute("UPDATE federated_data SET data = ? WHERE client_id = ?",
                       (b"not zlib", b"b"))
    connection.execute(
        "UPDATE federated_data SET num_examples = 5 WHERE client_id = ?",
        (b"c",))
  connection.close()
  with fedjax_sqlite.FedjaxSqliteSource(path) as source:
    source.subset([0])
    _assert_format_error(path, lambda: source.subset([1]), "zlib")
    _assert_format_error(path, lambda: source.subset([2]), "'c'")


def test_fedjax_sqlite_blob_that_is_not_a_dict_of_arrays(tmp_path):
  path = tmp_path / "data.sqlite"
  fedjax_sqlite.write_fedjax_sqlite(path, ["a"], [{"y": np.arange(2)}])
  connection = sqlite3.connect(path)
  with connection:
    connection.execute("UPDATE federated_data SET data = ?",
                       (zlib.compress(msgpack.packb([1, 2])),))
  connection.close()
  _assert_format_error(path, lambda: fedjax_sqlite.FedjaxSqliteSource(path),
                       "expected a non-empty dict")


# -- LEAF JSON ----------------------------------------------------------------


def _leaf_femnist(rng, sizes=_SIZES):
  return [{"x": rng.random((n, 784)).astype(np.float32),
           "y": rng.integers(0, 62, size=n)} for n in sizes]


def _leaf_shakespeare(rng, sizes=_SIZES):
  letters = np.array(list("abcdefgh ,.!"))
  out = []
  for n in sizes:
    x = np.array(["".join(rng.choice(letters, 80)) for _ in range(n)],
                 dtype=object)
    y = np.array(["".join(rng.choice(letters, 1)) for _ in range(n)],
                 dtype=object)
    out.append({"x": x, "y": y})
  return out


def _leaf_sent140(rng, sizes=_SIZES):
  return [{"x": np.array([[str(rng.integers(10**9)), "Mon Apr 06 2009",
                           "NO_QUERY", f"tweet {i} ü"] for i in range(n)],
                         dtype=object).reshape(n, 4),
           "y": rng.integers(0, 2, size=n)} for n in sizes]


def _leaf_synthetic(rng, sizes=_SIZES):
  return [{"x": rng.standard_normal((n, 60)), "y": rng.integers(0, 10, n)}
          for n in sizes]


@pytest.mark.parametrize("make", [_leaf_femnist, _leaf_shakespeare,
                                  _leaf_sent140, _leaf_synthetic])
def test_leaf_json_round_trip(tmp_path, make):
  path = tmp_path / "data.json"
  feats = make(np.random.default_rng(12))
  leaf_json.write_leaf_json(path, _IDS, feats)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Consistent num_samples: no warning.
    population = leaf_json.load_leaf_json(path)
  assert isinstance(population, population_lib.FederatedPopulation)
  _assert_population_equal(population, _IDS, [
      {n: (v.astype(np.float32) if v.dtype.kind == "f" else v)
       for n, v in f.items()} for f in feats])
  x_shape, x_dtype = population.feature_specs["x"]
  assert x_shape == feats[0]["x"].shape[1:]
  assert x_dtype in (np.float32, object)
  assert population.feature_specs["y"][1] in (np.int64, object)


def test_leaf_json_directory_of_files(tmp_path):
  rng = np.random.default_rng(13)
  feats = _leaf_femnist(rng)
  leaf_json.write_leaf_json(tmp_path / "all_data_1.json", _IDS[3:], feats[3:])
  leaf_json.write_leaf_json(tmp_path / "all_data_0.json", _IDS[:3], feats[:3])
  (tmp_path / "README.txt").write_text("not json")
  population = leaf_json.load_leaf_json(tmp_path)
  _assert_population_equal(population, _IDS, feats)


def test_leaf_json_trusts_data_over_num_samples(tmp_path):
  path = tmp_path / "shakespeare.json"
  feats = _leaf_shakespeare(np.random.default_rng(14))
  claimed = list(_SIZES)
  claimed[2] += 7
  leaf_json.write_leaf_json(path, _IDS, feats, num_samples=claimed)
  with pytest.warns(UserWarning, match="f0002_00"):
    population = leaf_json.load_leaf_json(path)
  np.testing.assert_array_equal(population.num_examples, _SIZES)


def test_leaf_json_errors(tmp_path):
  absent = tmp_path / "absent.json"
  _assert_format_error(absent, lambda: leaf_json.load_leaf_json(absent),
                       "no such file")
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  _assert_format_error(empty_dir, lambda: leaf_json.load_leaf_json(empty_dir),
                       "*.json")

  no_users = tmp_path / "no_users.json"
  no_users.write_text(json.dumps({"num_samples": [1], "user_data": {}}))
  _assert_format_error(no_users, lambda: leaf_json.load_leaf_json(no_users),
                       "'users'")

  truncated = tmp_path / "truncated.json"
  leaf_json.write_leaf_json(truncated, _IDS,
                            _leaf_femnist(np.random.default_rng(15)))
  _truncate(truncated)
  _assert_format_error(truncated, lambda: leaf_json.load_leaf_json(truncated),
                       "JSON")

  missing_user = tmp_path / "missing_user.json"
  missing_user.write_text(json.dumps(
      {"users": ["a", "b"], "num_samples": [1, 1],
       "user_data": {"a": {"x": [1.0], "y": [0]}}}))
  _assert_format_error(
      missing_user, lambda: leaf_json.load_leaf_json(missing_user), "'b'")

  ragged = tmp_path / "ragged.json"
  ragged.write_text(json.dumps(
      {"users": ["a"], "num_samples": [2],
       "user_data": {"a": {"x": [[1.0, 2.0], [3.0]], "y": [0, 1]}}}))
  _assert_format_error(ragged, lambda: leaf_json.load_leaf_json(ragged),
                       "ragged")

  shapes = tmp_path / "shapes.json"
  shapes.write_text(json.dumps(
      {"users": ["a", "b"], "num_samples": [1, 1],
       "user_data": {"a": {"x": [[1.0, 2.0]], "y": [0]},
                     "b": {"x": [[1.0, 2.0, 3.0]], "y": [0]}}}))
  _assert_format_error(shapes, lambda: leaf_json.load_leaf_json(shapes), "'b'")

  xy = tmp_path / "xy.json"
  xy.write_text(json.dumps(
      {"users": ["a"], "num_samples": [2],
       "user_data": {"a": {"x": [1.0, 2.0], "y": [0]}}}))
  _assert_format_error(xy, lambda: leaf_json.load_leaf_json(xy), "disagree")

  duplicated = tmp_path / "dup"
  duplicated.mkdir()
  for name in ("0.json", "1.json"):
    leaf_json.write_leaf_json(duplicated / name, ["a"], [{"x": [1.0],
                                                          "y": [0]}])
  _assert_format_error(duplicated / "1.json",
                       lambda: leaf_json.load_leaf_json(duplicated), "twice")


# -- Detection, open_source, inspect ------------------------------------------


@pytest.fixture(name="files")
def _files(tmp_path):
  rng = np.random.default_rng(16)
  paths = {
      "tff_hdf5": tmp_path / "emnist.h5",
      "tff_sqlite": tmp_path / "emnist.sqlite",
      "fedjax_sqlite": tmp_path / "emnist_fedjax.sqlite",
      "leaf_json": tmp_path / "leaf",
  }
  feats = _emnist_like(rng)
  tff_hdf5.write_tff_hdf5(paths["tff_hdf5"], _IDS, feats)
  tff_sqlite.write_tff_sqlite(paths["tff_sqlite"], _IDS, feats)
  fedjax_sqlite.write_fedjax_sqlite(paths["fedjax_sqlite"], _IDS, feats)
  paths["leaf_json"].mkdir()
  leaf_json.write_leaf_json(
      paths["leaf_json"] / "data.json", _IDS,
      [{"x": f["pixels"].reshape(-1, 784), "y": f["label"]} for f in feats])
  return paths


def test_detect_format(files):
  for name, path in files.items():
    assert detect.detect_format(path) == name
    assert detect.detect_format(str(path)) == name
  assert detect.detect_format(files["leaf_json"] / "data.json") == "leaf_json"


def test_open_source(files):
  expected = {
      "tff_hdf5": tff_hdf5.TffHdf5Source,
      "tff_sqlite": tff_sqlite.TffSqliteSource,
      "fedjax_sqlite": fedjax_sqlite.FedjaxSqliteSource,
      "leaf_json": population_lib.FederatedPopulation,
  }
  for name, path in files.items():
    source = detect.open_source(path)
    assert isinstance(source, expected[name])
    assert isinstance(source, source_lib.ClientSource)
    assert sorted(source.client_ids) == sorted(_IDS)
    assert source.subset([0]).num_clients == 1
    if hasattr(source, "close"):
      source.close()
  source = detect.open_source(files["tff_sqlite"],
                              feature_shapes={"pixels": [28, 28]})
  assert source.feature_specs["pixels"][0] == (28, 28)
  source.close()
  with pytest.raises(ValueError):
    detect.open_source(files["tff_hdf5"], format_name="csv")


def test_inspect(files, monkeypatch):
  reads = _ReadCounter(monkeypatch)
  summary = detect.inspect(files["tff_hdf5"])
  assert reads.count == 0  # From metadata only.
  assert summary == {
      "format": "tff_hdf5",
      "path": str(files["tff_hdf5"]),
      "num_clients": len(_IDS),
      "num_examples": {"total": sum(_SIZES), "min": 0, "median": 3.0,
                       "max": 5},
      "features": {"label": {"shape": [], "dtype": "int32"},
                   "pixels": {"shape": [28, 28], "dtype": "float32"}},
  }
  json.dumps(summary)  # Serialisable as is.
  for name, path in files.items():
    summary = detect.inspect(path)
    assert summary["format"] == name
    assert summary["num_clients"] == len(_IDS)
    assert summary["num_examples"]["total"] == sum(_SIZES)
    json.dumps(summary)
  flat = detect.inspect(files["tff_sqlite"])["features"]
  assert flat["pixels"] == {"shape": [784], "dtype": "float32"}
  assert flat["label"] == {"shape": [], "dtype": "int64"}
  assert detect.inspect(files["leaf_json"])["features"]["x"] == {
      "shape": [784], "dtype": "float32"}


def test_detect_errors(tmp_path):
  absent = tmp_path / "absent"
  _assert_format_error(absent, lambda: detect.detect_format(absent),
                       "no such file")
  _assert_format_error(absent, lambda: detect.inspect(absent))
  empty = tmp_path / "empty.bin"
  empty.write_bytes(b"")
  _assert_format_error(empty, lambda: detect.detect_format(empty), "empty")
  binary = tmp_path / "data.bin"
  binary.write_bytes(struct.pack("<4i", 1, 2, 3, 4))
  _assert_format_error(binary, lambda: detect.open_source(binary),
                       "unrecognised")
  other_sqlite = tmp_path / "other.sqlite"
  connection = sqlite3.connect(other_sqlite)
  with connection:
    connection.execute("CREATE TABLE t (a INTEGER)")
  connection.close()
  _assert_format_error(other_sqlite, lambda: detect.detect_format(other_sqlite),
                       "neither")
  no_json = tmp_path / "no_json"
  no_json.mkdir()
  _assert_format_error(no_json, lambda: detect.detect_format(no_json))
  not_leaf = tmp_path / "list.json"
  not_leaf.write_text("[1, 2, 3]")
  _assert_format_error(not_leaf, lambda: detect.open_source(not_leaf))
  bad_hdf5 = tmp_path / "bad.h5"
  with h5py.File(bad_hdf5, "w") as f:
    f.create_group("something_else")
  assert detect.detect_format(bad_hdf5) == "tff_hdf5"
  _assert_format_error(bad_hdf5, lambda: detect.inspect(bad_hdf5),
                       "'examples'")


def test_lazy_sources_read_from_a_prefetch_thread(files):
  # The runner prefetches cohorts on a background thread.
  for name in ("tff_hdf5", "tff_sqlite", "fedjax_sqlite"):
    with detect.open_source(files[name]) as source:
      with prefetch.Prefetcher(lambda i, s=source: s.subset([i]),
                               range(source.num_clients)) as cohorts:
        got = [c.client_ids[0] for c in cohorts]
      assert tuple(got) == source.client_ids
