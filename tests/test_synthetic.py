"""Tests for fedjax_dp.data.synthetic (FedProx Synthetic(alpha, beta))."""

import numpy as np
import pytest
from scipy import stats

from fedjax_dp.data import synthetic


def test_shapes_dtypes_and_ids():
  pop = synthetic.synthetic(12, 1.0, 1.0, seed=0)
  assert pop.num_clients == 12
  assert pop.client_ids[0] == "synthetic-0000"
  assert pop.client_ids[11] == "synthetic-0011"
  x, y = pop.features["x"], pop.features["y"]
  assert x.dtype == np.float32 and x.shape == (pop.num_examples.sum(), 60)
  assert y.dtype == np.int32 and y.shape == (pop.num_examples.sum(),)
  assert y.min() >= 0 and y.max() < 10
  assert np.all(pop.num_examples >= 50) and np.all(pop.num_examples <= 1000)


def test_other_dims_and_classes():
  pop = synthetic.synthetic(3, 0.5, 0.5, dim=7, num_classes=3, seed=1,
                            num_examples=40)
  assert pop.feature_specs["x"] == ((7,), np.dtype(np.float32))
  np.testing.assert_array_equal(pop.num_examples, [40, 40, 40])
  assert set(np.unique(pop.features["y"])) <= {0, 1, 2}


def test_labels_are_argmax_of_the_clients_own_model():
  pop, models = synthetic.synthetic_with_models(20, 1.0, 1.0, seed=0,
                                                max_examples=300)
  disagree_with_neighbour = []
  for k in range(pop.num_clients):
    client = pop.client(k)
    x = client["x"].astype(np.float64)
    logits = x @ models.weights[k] + models.biases[k]
    np.testing.assert_array_equal(client["y"], np.argmax(logits, axis=1))
    other = (k + 1) % pop.num_clients
    other_labels = np.argmax(
        x @ models.weights[other] + models.biases[other], axis=1)
    disagree_with_neighbour.append(np.mean(other_labels != client["y"]))
  # Non-IID: another user's model labels this user's inputs differently.
  assert np.mean(disagree_with_neighbour) > 0.5


def test_alpha_and_beta_are_variances():
  # Per-user mean of W_k's 600 entries is u_k + N(0, 1/600), so its variance
  # across users is alpha + 1/600; likewise the mean of v_k's 60 entries has
  # variance beta + 1/60. With 400 users the sample variance has relative
  # standard error sqrt(2/399) ~ 0.07. Reading alpha as a std would give
  # 16 and 0.079 instead.
  alpha, beta = 4.0, 0.25
  _, models = synthetic.synthetic_with_models(400, alpha, beta, seed=0,
                                              num_examples=1)
  w_means = models.weights.mean(axis=(1, 2))
  v_means = models.input_means.mean(axis=1)
  assert abs(w_means.var(ddof=1) - (alpha + 1 / 600)) < 1.0
  assert abs(v_means.var(ddof=1) - (beta + 1 / 60)) < 0.08
  # b_k is drawn around the same u_k as W_k.
  b_means = models.biases.mean(axis=1)
  assert np.corrcoef(w_means, b_means)[0, 1] > 0.9


def test_input_covariance_within_a_client():
  n = 20_000
  pop, models = synthetic.synthetic_with_models(1, 1.0, 1.0, seed=3,
                                                num_examples=n)
  x = pop.features["x"].astype(np.float64)
  expected = np.power(np.arange(1, 61), -1.2)
  np.testing.assert_allclose(models.input_variances, expected)
  # Mean: standard error sqrt(Sigma_jj / n); allow 5 of them.
  np.testing.assert_array_less(
      np.abs(x.mean(axis=0) - models.input_means[0]),
      5 * np.sqrt(expected / n))
  # Variance: relative standard error sqrt(2 / n) ~ 0.01; allow 5 of them.
  cov = np.cov(x, rowvar=False)
  np.testing.assert_allclose(np.diag(cov), expected, rtol=5 * np.sqrt(2 / n))
  # Off-diagonal correlations: standard error 1 / sqrt(n) ~ 0.007.
  corr = np.corrcoef(x, rowvar=False)
  off = corr[~np.eye(60, dtype=bool)]
  assert np.abs(off).max() < 6 / np.sqrt(n)


def _label_counts(pop, num_classes=10):
  counts = np.stack([np.bincount(pop.client(k)["y"], minlength=num_classes)
                     for k in range(pop.num_clients)])
  return counts[:, counts.sum(axis=0) > 0]


def test_iid_variant_shares_one_distribution():
  pop, models = synthetic.synthetic_with_models(20, 0.0, 0.0, iid=True,
                                                seed=0, num_examples=500)
  for k in range(1, pop.num_clients):
    np.testing.assert_array_equal(models.weights[k], models.weights[0])
    np.testing.assert_array_equal(models.biases[k], models.biases[0])
  # Inputs ~ N(0, Sigma) for everyone, as in the FedProx code.
  np.testing.assert_array_equal(models.input_means, 0.0)
  # The labels must be spread over classes for the test below to mean much.
  shares = np.bincount(pop.features["y"], minlength=10) / pop.features["y"].size
  assert np.sum(shares > 0.01) >= 5
  # Chi-square test of homogeneity of the label distributions over clients.
  iid_p = stats.chi2_contingency(_label_counts(pop)).pvalue
  assert iid_p > 1e-3
  non_iid = synthetic.synthetic(20, 1.0, 1.0, seed=0, num_examples=500)
  assert stats.chi2_contingency(_label_counts(non_iid)).pvalue < 1e-10


def test_lognormal_sizes_follow_fedprox():
  # int(lognormal(4, 2)) + 50: median int(e^4) + 50 = 104; P(>= 200 before
  # capping) = P(Z > (ln 150 - 4) / 2) ~ 0.31.
  pop = synthetic.synthetic(1000, 1.0, 1.0, seed=0, max_examples=200,
                            dim=5)
  sizes = pop.num_examples
  assert sizes.min() >= 50 and sizes.max() == 200
  assert 90 <= np.median(sizes) <= 125
  assert 0.24 < np.mean(sizes == 200) < 0.37


def test_deterministic_and_seed_dependent():
  a = synthetic.synthetic(5, 1.0, 1.0, seed=7)
  b = synthetic.synthetic(5, 1.0, 1.0, seed=7)
  c = synthetic.synthetic(5, 1.0, 1.0, seed=8)
  np.testing.assert_array_equal(a.offsets, b.offsets)
  np.testing.assert_array_equal(a.features["x"], b.features["x"])
  np.testing.assert_array_equal(a.features["y"], b.features["y"])
  assert (a.offsets.shape != c.offsets.shape
          or not np.array_equal(a.offsets, c.offsets)
          or not np.array_equal(a.features["x"], c.features["x"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_clients=0), "num_clients"),
    (dict(alpha=-1.0), "alpha"),
    (dict(beta=float("inf")), "beta"),
    (dict(num_classes=1), "num_classes"),
    (dict(dim=0), "dim"),
    (dict(max_examples=0), "max_examples"),
    (dict(num_examples=0), "num_examples"),
    (dict(seed=-3), "seed"),
])
def test_rejects_bad_arguments(kwargs, field):
  args = dict(num_clients=3, alpha=1.0, beta=1.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    synthetic.synthetic(**args)
