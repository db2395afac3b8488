"""Noise: the stated distribution and scale, per-key determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp.privacy import noise


def test_noise_stddev_and_zero_noise_with_infinite_clip():
  assert float(noise.noise_stddev(1.5, 2.0)) == pytest.approx(3.0)
  assert float(noise.noise_stddev(0.0, jnp.inf)) == 0.0


def test_gaussian_noise_has_stated_distribution():
  n = 200_000
  tree = {"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n // 4, 2))}
  sigma = 0.7
  noisy = noise.add_gaussian_noise(tree, sigma, jax.random.key(0))
  x = np.concatenate([np.ravel(noisy["a"]), np.ravel(noisy["b"])]) / sigma
  # KS test against N(0, 1): p > 1e-3 fails by accident 1 time in 1000.
  assert stats.kstest(x, "norm").pvalue > 1e-3
  # Sample std within 5 standard errors (se = 1 / sqrt(2n)).
  assert abs(x.std() - 1.0) < 5 / np.sqrt(2 * n)
  # Leaves are independent: correlation between the two leaves' first halves.
  a, b = np.ravel(noisy["a"])[:50_000], np.ravel(noisy["b"])[:50_000]
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(50_000)


def test_same_key_same_noise_different_key_different_noise():
  tree = {"w": jnp.zeros((1000,))}
  a = noise.add_gaussian_noise(tree, 1.0, jax.random.key(1))["w"]
  b = noise.add_gaussian_noise(tree, 1.0, jax.random.key(1))["w"]
  c = noise.add_gaussian_noise(tree, 1.0, jax.random.key(2))["w"]
  np.testing.assert_array_equal(a, b)
  assert abs(np.corrcoef(a, c)[0, 1]) < 0.2


def test_zero_stddev_adds_exactly_nothing():
  tree = {"w": jnp.arange(5.0)}
  out = noise.add_gaussian_noise(tree, noise.noise_stddev(0.0, 1.0),
                                 jax.random.key(0))
  np.testing.assert_array_equal(out["w"], tree["w"])
