"""Tests for fedjax_dp.data.partition."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from fedjax_dp.data import partition


def _balanced_labels(num_classes=10, per_class=100, seed=0):
  labels = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(labels)


def _assert_disjoint_cover(parts, num_examples):
  everything = np.concatenate(parts)
  assert everything.dtype == np.int64
  np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))


def _assert_disjoint(parts, num_examples):
  everything = np.concatenate(parts)
  assert np.unique(everything).size == everything.size
  assert everything.min() >= 0 and everything.max() < num_examples


def _mean_label_entropy(labels, parts, num_classes):
  """Mean over non-empty clients of the entropy (nats) of their labels."""
  entropies = []
  for part in parts:
    if part.size == 0:
      continue
    q = np.bincount(labels[part], minlength=num_classes) / part.size
    q = q[q > 0]
    entropies.append(-(q * np.log(q)).sum())
  return float(np.mean(entropies))


def _same(parts_a, parts_b):
  return len(parts_a) == len(parts_b) and all(
      np.array_equal(a, b) for a, b in zip(parts_a, parts_b))


# --- iid --------------------------------------------------------------------


def test_iid_is_disjoint_cover_with_near_equal_sizes():
  parts = partition.iid(1003, 10, seed=0)
  assert len(parts) == 10
  _assert_disjoint_cover(parts, 1003)
  sizes = [p.size for p in parts]
  assert max(sizes) - min(sizes) <= 1


def test_iid_is_shuffled():
  parts = partition.iid(1000, 10, seed=0)
  # A client of a contiguous slice would have a span of ~100 indices.
  assert all(p.max() - p.min() > 500 for p in parts)


def test_iid_deterministic_and_seed_dependent():
  assert _same(partition.iid(500, 7, 3), partition.iid(500, 7, 3))
  assert not _same(partition.iid(500, 7, 3), partition.iid(500, 7, 4))
  assert _same(partition.iid(500, 7, np.random.default_rng(3)),
               partition.iid(500, 7, np.random.default_rng(3)))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_examples=10, num_clients=0), "num_clients"),
    (dict(num_examples=10, num_clients=11), "num_clients"),
    (dict(num_examples=0, num_clients=1), "num_examples"),
    (dict(num_examples=10, num_clients=2.5), "num_clients"),
])
def test_iid_rejects_bad_arguments(kwargs, field):
  with pytest.raises(ValueError, match=field):
    partition.iid(seed=0, **kwargs)


def test_rejects_bad_seed():
  with pytest.raises(ValueError, match="seed"):
    partition.iid(10, 2, seed=-1)
  with pytest.raises(ValueError, match="seed"):
    partition.iid(10, 2, seed="zero")


# --- dirichlet_label_split -------------------------------------------------


def test_label_split_is_disjoint_cover():
  labels = _balanced_labels()
  parts = partition.dirichlet_label_split(labels, 20, 0.5, seed=0)
  assert len(parts) == 20
  _assert_disjoint_cover(parts, labels.size)


def test_label_split_deterministic_and_seed_dependent():
  labels = _balanced_labels()
  a = partition.dirichlet_label_split(labels, 20, 0.5, seed=1)
  b = partition.dirichlet_label_split(labels, 20, 0.5, seed=1)
  c = partition.dirichlet_label_split(labels, 20, 0.5, seed=2)
  assert _same(a, b)
  assert not _same(a, c)


def test_label_split_skew_grows_as_alpha_shrinks():
  labels = _balanced_labels(per_class=200)
  skewed = partition.dirichlet_label_split(labels, 20, 0.1, seed=0)
  uniform = partition.dirichlet_label_split(labels, 20, 100.0, seed=0)
  h_skewed = _mean_label_entropy(labels, skewed, 10)
  h_uniform = _mean_label_entropy(labels, uniform, 10)
  assert h_uniform > 0.95 * np.log(10)
  assert h_skewed < 0.5 * h_uniform
  # Sizes vary a lot at small alpha, little at large alpha.
  sizes_skewed = np.array([p.size for p in skewed])
  sizes_uniform = np.array([p.size for p in uniform])
  assert sizes_skewed.std() > 3 * sizes_uniform.std()


def test_label_split_min_client_size_respected():
  labels = _balanced_labels(per_class=100)
  # Without a minimum this setting leaves some clients tiny ...
  free = partition.dirichlet_label_split(labels, 50, 0.3, seed=0,
                                         min_client_size=0)
  assert min(p.size for p in free) < 5
  # ... with one, every client reaches it and nothing is lost.
  for seed in range(5):
    parts = partition.dirichlet_label_split(labels, 50, 0.3, seed=seed,
                                            min_client_size=5)
    assert min(p.size for p in parts) >= 5
    _assert_disjoint_cover(parts, labels.size)


def test_label_split_raises_when_min_size_unreachable():
  labels = _balanced_labels(per_class=180)
  with pytest.raises(ValueError, match="min_client_size=5"):
    partition.dirichlet_label_split(labels, 300, 0.1, seed=0,
                                    min_client_size=5, max_tries=5)


def test_label_split_self_balancing_caps_client_sizes():
  labels = _balanced_labels(per_class=100)
  plain = partition.dirichlet_label_split(labels, 20, 0.01, seed=0,
                                          min_client_size=0)
  balanced = partition.dirichlet_label_split(labels, 20, 0.01, seed=0,
                                             min_client_size=0,
                                             self_balancing=True)
  _assert_disjoint_cover(balanced, labels.size)
  # A client stops receiving classes once it holds >= N / K = 50, so it can
  # exceed 50 by at most one class (100 examples).
  assert max(p.size for p in balanced) <= 150
  assert max(p.size for p in plain) > 150


def test_label_split_small_classes_are_not_biased_to_the_last_client():
  # Every example its own class: it goes to client 0 iff p_0 rounds to it,
  # which for Dir(1, 1) happens half the time. (Flooring the cut points
  # would give client 0 nothing.)
  labels = np.arange(2000)
  parts = partition.dirichlet_label_split(labels, 2, 1.0, seed=0,
                                          min_client_size=0)
  assert abs(parts[0].size / labels.size - 0.5) < 0.05


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_clients=0, alpha=1.0), "num_clients"),
    (dict(num_clients=1001, alpha=1.0), "num_clients"),
    (dict(num_clients=10, alpha=0.0), "alpha"),
    (dict(num_clients=10, alpha=-1.0), "alpha"),
    (dict(num_clients=10, alpha=float("nan")), "alpha"),
    (dict(num_clients=10, alpha=1.0, min_client_size=101), "min_client_size"),
    (dict(num_clients=10, alpha=1.0, min_client_size=-1), "min_client_size"),
])
def test_label_split_rejects_bad_arguments(kwargs, field):
  with pytest.raises(ValueError, match=field):
    partition.dirichlet_label_split(_balanced_labels(), seed=0, **kwargs)


def test_rejects_bad_labels():
  with pytest.raises(ValueError, match="labels"):
    partition.dirichlet_label_split(np.zeros((4, 2)), 2, 1.0, seed=0)
  with pytest.raises(ValueError, match="labels"):
    partition.dirichlet_client_mixture(np.zeros((0,)), 1, 1.0, seed=0)


# --- dirichlet_client_mixture ----------------------------------------------


def test_mixture_default_sizes_cover_everything():
  labels = _balanced_labels()
  parts = partition.dirichlet_client_mixture(labels, 7, 0.5, seed=0)
  _assert_disjoint_cover(parts, labels.size)
  sizes = [p.size for p in parts]
  assert max(sizes) - min(sizes) <= 1


def test_mixture_exhaustion_still_fills_every_client():
  # Tiny alpha: clients want single classes, which run out; later clients
  # must be filled from what is left, and all examples must be used.
  labels = _balanced_labels(num_classes=5, per_class=40)
  parts = partition.dirichlet_client_mixture(labels, 10, 0.01, seed=0)
  _assert_disjoint_cover(parts, labels.size)
  assert all(p.size == 20 for p in parts)


def test_mixture_explicit_sizes():
  labels = _balanced_labels()
  parts = partition.dirichlet_client_mixture(
      labels, 4, 1.0, seed=0, examples_per_client=[10, 20, 30, 40])
  assert [p.size for p in parts] == [10, 20, 30, 40]
  _assert_disjoint(parts, labels.size)
  parts = partition.dirichlet_client_mixture(
      labels, 5, 1.0, seed=0, examples_per_client=100)
  assert [p.size for p in parts] == [100] * 5
  _assert_disjoint(parts, labels.size)


def test_mixture_large_alpha_approaches_global_prior():
  prior = np.array([0.5, 0.3, 0.2])
  labels = np.repeat(np.arange(3), (30_000 * prior).astype(int))
  labels = np.random.default_rng(0).permutation(labels)
  parts = partition.dirichlet_client_mixture(
      labels, 10, 1e4, seed=0, examples_per_client=1000)
  # q ~ Dir(1e4 p) has std <= 0.005 per class; 1000 draws add <= 0.016.
  for part in parts:
    q = np.bincount(labels[part], minlength=3) / part.size
    np.testing.assert_allclose(q, prior, atol=0.07)
  # And small alpha is far from the prior on some client.
  parts = partition.dirichlet_client_mixture(
      labels, 10, 0.1, seed=0, examples_per_client=1000)
  gaps = [np.abs(np.bincount(labels[p], minlength=3) / p.size - prior).max()
          for p in parts]
  assert max(gaps) > 0.3


def test_mixture_concentration_is_around_the_prior_not_uniform():
  # At small alpha each client is almost single-class, the class drawn with
  # probability p_c (Dir(alpha * p)), not 1 / num_classes (Dir(alpha * 1)).
  prior = np.array([0.6, 0.3, 0.1])
  labels = np.repeat(np.arange(3), (30_000 * prior).astype(int))
  parts = partition.dirichlet_client_mixture(
      labels, 1000, 0.05, seed=0, examples_per_client=10)
  shares = np.bincount(labels[np.concatenate(parts)], minlength=3) / 10_000
  # ~1000 nearly independent single-class clients: std of a share <= 0.016.
  np.testing.assert_allclose(shares, prior, atol=0.06)


def test_mixture_skew_grows_as_alpha_shrinks():
  labels = _balanced_labels(per_class=200)
  skewed = partition.dirichlet_client_mixture(
      labels, 20, 0.1, seed=0, examples_per_client=50)
  uniform = partition.dirichlet_client_mixture(
      labels, 20, 100.0, seed=0, examples_per_client=50)
  h_uniform = _mean_label_entropy(labels, uniform, 10)
  assert h_uniform > 0.85 * np.log(10)
  assert _mean_label_entropy(labels, skewed, 10) < 0.5 * h_uniform


def test_mixture_deterministic_and_seed_dependent():
  labels = _balanced_labels()
  a = partition.dirichlet_client_mixture(labels, 10, 0.5, seed=5)
  b = partition.dirichlet_client_mixture(labels, 10, 0.5, seed=5)
  c = partition.dirichlet_client_mixture(labels, 10, 0.5, seed=6)
  assert _same(a, b)
  assert not _same(a, c)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_clients=0, alpha=1.0), "num_clients"),
    (dict(num_clients=10, alpha=0.0), "alpha"),
    (dict(num_clients=10, alpha=1.0, examples_per_client=101),
     "examples_per_client"),
    (dict(num_clients=10, alpha=1.0, examples_per_client=0),
     "examples_per_client"),
    (dict(num_clients=2, alpha=1.0, examples_per_client=[10]),
     "examples_per_client"),
    (dict(num_clients=2, alpha=1.0, examples_per_client=[600, 500]),
     "examples_per_client"),
])
def test_mixture_rejects_bad_arguments(kwargs, field):
  with pytest.raises(ValueError, match=field):
    partition.dirichlet_client_mixture(_balanced_labels(), seed=0, **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    num_examples=st.integers(1, 200),
    num_classes=st.integers(1, 6),
    clients_fraction=st.floats(0.01, 1.0),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_partitions_are_disjoint_covers_property(
    num_examples, num_classes, clients_fraction, alpha, seed):
  labels = np.random.default_rng(seed).integers(0, num_classes, num_examples)
  num_clients = max(1, int(clients_fraction * num_examples))
  _assert_disjoint_cover(
      partition.dirichlet_label_split(labels, num_clients, alpha, seed,
                                      min_client_size=0),
      num_examples)
  _assert_disjoint_cover(
      partition.dirichlet_client_mixture(labels, num_clients, alpha, seed),
      num_examples)
  _assert_disjoint_cover(
      partition.iid(num_examples, num_clients, seed), num_examples)


# --- by_key and to_population ----------------------------------------------


def test_by_key_one_client_per_key():
  keys = np.array(["bob", "amy", "bob", "cy", "amy", "bob"])
  client_keys, parts = partition.by_key(keys)
  np.testing.assert_array_equal(client_keys, ["amy", "bob", "cy"])
  np.testing.assert_array_equal(parts[0], [1, 4])
  np.testing.assert_array_equal(parts[1], [0, 2, 5])
  np.testing.assert_array_equal(parts[2], [3])
  _assert_disjoint_cover(parts, keys.size)


def test_by_key_rejects_bad_keys():
  with pytest.raises(ValueError, match="keys"):
    partition.by_key(np.array([]))
  with pytest.raises(ValueError, match="keys"):
    partition.by_key(np.zeros((2, 2)))


def test_to_population_gathers_rows():
  x = np.arange(20, dtype=np.float32).reshape(10, 2)
  y = np.arange(10, dtype=np.int32)
  parts = [np.array([3, 1]), np.array([], np.int64), np.array([0, 9, 5])]
  pop = partition.to_population({"x": x, "y": y}, parts, ["a", "b", "c"])
  np.testing.assert_array_equal(pop.num_examples, [2, 0, 3])
  np.testing.assert_array_equal(pop.client(0)["y"], [3, 1])
  np.testing.assert_array_equal(pop.client(2)["x"], x[[0, 9, 5]])
  with pytest.raises(ValueError, match="client_ids"):
    partition.to_population({"x": x}, parts, ["a"])
  with pytest.raises(ValueError, match="outside"):
    partition.to_population({"x": x}, [np.array([10])], ["a"])
