"""Tests for fedjax_dp.data.builtin."""

import dataclasses
import re

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets

from fedjax_dp.data import builtin


def _all_rows(dataset):
  """(x, y) of train and eval together."""
  x = np.concatenate([dataset.train.features["x"], dataset.eval.features["x"]])
  y = np.concatenate([dataset.train.features["y"], dataset.eval.features["y"]])
  return x, y


def _sorted_rows(x, y):
  table = np.concatenate(
      [x.reshape(x.shape[0], -1).astype(np.float64), y[:, None]], axis=1)
  return table[np.lexsort(table.T[::-1])]


def _same_dataset(a, b):
  return (a.train.client_ids == b.train.client_ids
          and a.eval.client_ids == b.eval.client_ids
          and np.array_equal(a.train.offsets, b.train.offsets)
          and np.array_equal(a.train.features["x"], b.train.features["x"])
          and np.array_equal(a.eval.features["y"], b.eval.features["y"]))


def test_names():
  assert set(builtin.NAMES) == {
      "digits", "synthetic", "synthetic_iid", "breast_cancer", "shakespeare",
      "file", "fraud_banks", "iot_sensors"}


def test_digits_shapes_dtypes_ranges():
  ds = builtin.load("digits")
  assert ds.name == "digits"
  assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
  for pop in (ds.train, ds.eval):
    x, y = pop.features["x"], pop.features["y"]
    assert x.dtype == np.float32 and x.shape[1:] == (8, 8, 1)
    assert y.dtype == np.int32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert y.min() >= 0 and y.max() < 10
    assert all(re.fullmatch(r"digits-\d{4}", c) for c in pop.client_ids)
  assert ds.train.num_clients == 400 and ds.eval.num_clients == 100
  assert ds.train.num_examples.min() >= 2 and ds.eval.num_examples.min() >= 2


def test_digits_train_and_eval_disjoint_and_hold_every_example():
  ds = builtin.load("digits")
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  assert ds.train.num_examples.sum() + ds.eval.num_examples.sum() == 1797
  x, y = _all_rows(ds)
  digits = sklearn_datasets.load_digits()
  np.testing.assert_array_equal(
      _sorted_rows(x, y),
      _sorted_rows((digits.images / 16.0).astype(np.float32),
                   digits.target))


def test_digits_clients_are_label_skewed():
  def mean_entropy(ds):
    entropies = []
    for k in range(ds.train.num_clients):
      q = np.bincount(ds.train.client(k)["y"], minlength=10)
      q = q[q > 0] / q.sum()
      entropies.append(-(q * np.log(q)).sum())
    return np.mean(entropies)
  skewed = builtin.load("digits", alpha=0.1, min_client_size=1,
                        num_clients=50)
  mixed = builtin.load("digits", alpha=100.0, num_clients=50)
  assert mean_entropy(skewed) < 0.6 * mean_entropy(mixed)


def test_digits_deterministic_and_seed_dependent():
  assert _same_dataset(builtin.load("digits", seed=3),
                       builtin.load("digits", seed=3))
  assert not _same_dataset(builtin.load("digits", seed=3),
                           builtin.load("digits", seed=4))


def test_held_out_choice_does_not_change_the_partition():
  small = builtin.load("digits", eval_fraction=0.1)
  large = builtin.load("digits", eval_fraction=0.5)
  assert small.eval.num_clients == 50 and large.eval.num_clients == 250
  def by_id(ds):
    out = {}
    for pop in (ds.train, ds.eval):
      for k, cid in enumerate(pop.client_ids):
        out[cid] = pop.client(k)["y"]
    return out
  a, b = by_id(small), by_id(large)
  assert a.keys() == b.keys()
  assert all(np.array_equal(a[c], b[c]) for c in a)


@pytest.mark.parametrize("name", ["synthetic", "synthetic_iid"])
def test_synthetic_datasets(name):
  ds = builtin.load(name, num_clients=30, max_examples=200)
  assert ds.input_shape == (60,) and ds.num_classes == 10
  assert ds.train.num_clients == 24 and ds.eval.num_clients == 6
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  assert all(c.startswith(name + "-") for c in ds.train.client_ids)
  for pop in (ds.train, ds.eval):
    assert pop.features["x"].dtype == np.float32
    assert pop.features["x"].shape[1:] == (60,)
    assert pop.features["y"].dtype == np.int32
    assert pop.num_examples.min() >= 50 and pop.num_examples.max() <= 200
  assert _same_dataset(ds, builtin.load(name, num_clients=30,
                                        max_examples=200))


def test_synthetic_default_size():
  ds = builtin.load("synthetic")
  assert ds.train.num_clients + ds.eval.num_clients == 100


def test_breast_cancer():
  ds = builtin.load("breast_cancer")
  assert ds.input_shape == (30,) and ds.num_classes == 2
  assert ds.train.num_clients == 6 and ds.eval.num_clients == 2
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  x, y = _all_rows(ds)
  assert x.shape == (569, 30) and x.dtype == np.float32
  assert y.dtype == np.int32
  np.testing.assert_array_equal(
      np.bincount(y), np.bincount(sklearn_datasets.load_breast_cancer().target))
  # Standardised with the training clients' statistics only: exactly
  # centred and scaled on train, not on all data.
  train_x = ds.train.features["x"].astype(np.float64)
  np.testing.assert_allclose(train_x.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(train_x.std(axis=0), 1.0, atol=1e-5)
  assert np.abs(x.astype(np.float64).mean(axis=0)).max() > 1e-3
  assert _same_dataset(ds, builtin.load("breast_cancer"))
  assert not _same_dataset(ds, builtin.load("breast_cancer", seed=1))


def test_dataset_is_frozen():
  ds = builtin.load("breast_cancer")
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.name = "other"


def test_unknown_name():
  with pytest.raises(ValueError, match="dataset") as info:
    builtin.load("mnist")
  for name in builtin.NAMES:
    assert name in str(info.value)


@pytest.mark.parametrize("name, kwargs, field", [
    ("digits", dict(beta=1.0), "beta"),
    ("synthetic_iid", dict(alpha=1.0), "alpha"),
    ("breast_cancer", dict(min_client_size=3), "min_client_size"),
    ("digits", dict(eval_fraction=1.0), "eval_fraction"),
    ("synthetic", dict(eval_fraction=0.0), "eval_fraction"),
    ("breast_cancer", dict(num_clients=1), "num_clients"),
    ("digits", dict(num_clients=5000), "num_clients"),
    ("digits", dict(alpha=-1.0), "alpha"),
    ("synthetic", dict(beta=-1.0), "beta"),
    ("synthetic", dict(max_examples=0), "max_examples"),
    ("digits", dict(num_clients=300, alpha=0.1, min_client_size=5,
                         partition_scheme="label_split"),
     "min_client_size"),
    ("digits", dict(seed=-1), "seed"),
])
def test_bad_arguments_name_the_field(name, kwargs, field):
  with pytest.raises(ValueError, match=field):
    builtin.load(name, **kwargs)


def test_digits_label_split_scheme_and_unknown_scheme():
  ds = builtin.load("digits", num_clients=60, partition_scheme="label_split",
                    alpha=0.5, min_client_size=2)
  assert ds.train.num_clients + ds.eval.num_clients == 60
  assert ds.train.num_examples.min() >= 2
  with pytest.raises(ValueError, match="partition_scheme"):
    builtin.load("digits", partition_scheme="bogus")
