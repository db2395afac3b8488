"""One-shot privacy estimation: statistical tests with fixed seeds.

Ground truth is the Gaussian mechanism: inserted canaries' statistics
~ N(mu, 1), held-out ones' ~ N(0, 1), whose epsilon at delta comes from
dp_accounting (independently of the module's own formula).
"""

import functools
import math

from dp_accounting.pld import privacy_loss_mechanism
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from fedjax_dp import audit
from fedjax_dp import tree_util
from fedjax_dp.privacy import clipping

DELTA = 1e-5


@functools.lru_cache(maxsize=None)
def _true_epsilon(mu: float, delta: float) -> float:
  """dp_accounting's epsilon of the Gaussian mechanism with mu = sens / std."""
  if mu == 0:
    return 0.0
  loss = privacy_loss_mechanism.GaussianPrivacyLoss(standard_deviation=1.0,
                                                    sensitivity=mu)
  lo, hi = 0.0, 200.0
  for _ in range(80):
    mid = 0.5 * (lo + hi)
    if loss.get_delta_for_epsilon(mid) > delta:
      lo = mid
    else:
      hi = mid
  return hi


def _samples(seed, mu, n_inserted, n_held_out):
  rng = np.random.default_rng(seed)
  return rng.normal(mu, 1.0, n_inserted), rng.normal(0.0, 1.0, n_held_out)


# ---------------------------------------------------------------------------
# The epsilon of a pair of Gaussians.


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-2])
def test_equal_variance_pair_is_the_gaussian_mechanism(mu, delta):
  fit = audit.GaussianFit(mu0=0.3, sigma0=0.5, mu1=0.3 + 0.5 * mu, sigma1=0.5)
  assert audit.gaussian_pair_epsilon(fit, delta) == pytest.approx(
      _true_epsilon(mu, delta), rel=1e-6)


@pytest.mark.parametrize("fit", [
    audit.GaussianFit(0.0, 1.0, 1.0, 1.3),
    audit.GaussianFit(0.0, 1.0, 0.5, 0.8),
    audit.GaussianFit(0.2, 0.9, 0.1, 1.1),
])
def test_unequal_variance_delta_matches_numerical_integration(fit):
  """The quadratic-region formula against integrating max(0, p - e^eps q)."""
  p = stats.norm(fit.mu1, fit.sigma1)
  q = stats.norm(fit.mu0, fit.sigma0)
  for eps in (0.0, 0.5, 2.0):
    def hockey(a, b, eps=eps):
      return integrate.quad(lambda x: max(0.0, a.pdf(x) - math.exp(eps)
                                          * b.pdf(x)), -40, 40, limit=400,
                            points=[-5, 0, 5], epsabs=1e-13)[0]
    expected = max(hockey(p, q), hockey(q, p))
    assert audit.gaussian_pair_delta(eps, fit) == pytest.approx(
        expected, rel=1e-6, abs=1e-12)
  # Symmetric in the two groups, and epsilon solves delta(epsilon) = DELTA.
  swapped = audit.GaussianFit(fit.mu1, fit.sigma1, fit.mu0, fit.sigma0)
  eps = audit.gaussian_pair_epsilon(fit, DELTA)
  assert audit.gaussian_pair_epsilon(swapped, DELTA) == pytest.approx(eps)
  assert audit.gaussian_pair_delta(eps, fit) == pytest.approx(DELTA, rel=1e-4)


# ---------------------------------------------------------------------------
# (a) epsilon_est recovers the mechanism's epsilon.


def _estimation_tolerance(mu: float, n: int, equal_variance: bool) -> float:
  """4 standard errors of epsilon_est for n samples a group (delta method).

  The fit (mu0, s0, mu1, s1) has standard errors (1, 1/sqrt(2), 1, 1/sqrt(2))
  / sqrt(n). epsilon is smooth in the means and the common scale; with
  separate variances it also has a kink at s0 = s1 (either inequality widens
  the tails), contributing up to L * |s1 - s0| with L its one-sided slope and
  sd(s1 - s0) = 1 / sqrt(n).
  """
  base = audit.GaussianFit(0.0, 1.0, mu, 1.0)
  h = 1e-4
  eps = lambda f: audit.gaussian_pair_epsilon(f, DELTA)
  d_mu = (eps(base._replace(mu1=mu + h)) - eps(base._replace(mu1=mu - h))) / (
      2 * h)
  scaled = lambda s: base._replace(mu1=mu * s, sigma0=s, sigma1=s)
  d_scale = (eps(scaled(1 + h)) - eps(scaled(1 - h))) / (2 * h)
  # Means: both groups (var 1/n each); common scale: pooled sd has var 1/4n.
  linear_sd = math.sqrt(2 * d_mu**2 / n + d_scale**2 / (4 * n))
  tol = 4 * linear_sd
  if not equal_variance:
    k = 1e-3
    slope = max(abs(eps(base._replace(sigma1=1 + s * k)) - eps(base)) / k
                for s in (1, -1))
    tol += 4 * slope / math.sqrt(n)
  return tol


@pytest.mark.parametrize("equal_variance", [False, True])
@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_estimate_recovers_gaussian_mechanism_epsilon(mu, equal_variance):
  n = 80_000
  truth = _true_epsilon(mu, DELTA)
  tol = _estimation_tolerance(mu, n, equal_variance)
  assert tol < 0.2 * truth  # the test is not vacuous
  for seed in range(3):
    inserted, held_out = _samples(seed, mu, n, n)
    est = audit.estimate_epsilon(inserted, held_out, DELTA,
                                 equal_variance=equal_variance)
    assert abs(est - truth) < tol, (seed, est, truth, tol)


def test_estimate_uses_shifted_and_scaled_groups():
  """Only the standardised shift matters: cosines are ~1/sqrt(d) in scale."""
  inserted, held_out = _samples(7, 1.0, 5000, 5000)
  a = audit.estimate_epsilon(inserted, held_out, DELTA)
  b = audit.estimate_epsilon(0.01 * inserted + 3, 0.01 * held_out + 3, DELTA)
  assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------------------
# epsilon_lo.


def test_lower_bound_is_large_without_privacy():  # (b)
  # Perfect separation with 1000 canaries a group in the evaluation half:
  # FPR_hi = FNR_hi = 1 - 0.025^(1/1000) = 0.0037, so epsilon_lo ~ 5.6.
  for seed in range(3):
    inserted, held_out = _samples(seed, 20.0, 2000, 2000)
    assert audit.epsilon_lower_bound(inserted, held_out, DELTA) > 5.0


def test_lower_bound_is_zero_when_nothing_leaks():  # (c)
  for seed in range(10):
    inserted, held_out = _samples(seed, 0.0, 1000, 1000)
    assert audit.epsilon_lower_bound(inserted, held_out, DELTA,
                                     seed=seed) == 0.0


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
def test_lower_bound_below_true_epsilon_on_fixed_seeds(mu):  # (d)
  truth = _true_epsilon(mu, DELTA)
  values = []
  for seed in range(5):
    inserted, held_out = _samples(seed, mu, 1000, 1000)
    values.append(audit.epsilon_lower_bound(inserted, held_out, DELTA,
                                            seed=seed))
  assert max(values) <= truth
  assert np.median(values) > 0  # and it usually detects the leak


@pytest.mark.parametrize("confidence", [0.95, 0.5])
@pytest.mark.parametrize("mu,delta", [(0.0, 1e-5), (0.25, 0.05), (0.5, 0.05),
                                      (1.0, 0.05), (1.0, 1e-5)])
def test_lower_bound_coverage(mu, delta, confidence):  # (d), statistically
  """P[epsilon_lo > epsilon] <= 1 - confidence, counted over 60 trials.

  Passes unless the violation count exceeds the binomial 99.99% quantile for
  the allowed rate, so a sound bound fails with probability < 1e-4.
  """
  truth = _true_epsilon(mu, delta)
  trials = 60
  violations = 0
  for seed in range(trials):
    inserted, held_out = _samples(1000 + seed, mu, 400, 400)
    violations += audit.epsilon_lower_bound(
        inserted, held_out, delta, confidence, seed=seed) > truth
  assert violations <= stats.binom.ppf(1 - 1e-4, trials, 1 - confidence)


@pytest.mark.parametrize("m", [20, 41, 300])
def test_largest_lower_bound_is_the_bound_of_a_perfect_separation(m):
  perfect = audit.epsilon_lower_bound(np.ones(m), np.zeros(m), 1e-5)
  assert audit.largest_lower_bound(m, 1e-5) == pytest.approx(perfect,
                                                              rel=1e-12)
  # No separation of these canaries can give more.
  rng = np.random.default_rng(m)
  for _ in range(5):
    got = audit.epsilon_lower_bound(rng.normal(1, 0.5, m),
                                    rng.normal(0, 0.5, m), 1e-5)
    assert got <= audit.largest_lower_bound(m, 1e-5)
  assert audit.largest_lower_bound(2 * m, 1e-5) > audit.largest_lower_bound(
      m, 1e-5)


def test_clopper_pearson_upper_bound():
  # k = 0: 1 - alpha^(1/n); k = n: 1; and covers p at the stated level.
  assert audit.clopper_pearson_upper(0, 100, 0.05) == pytest.approx(
      1 - 0.05**(1 / 100))
  assert audit.clopper_pearson_upper(100, 100, 0.05) == 1.0
  rng = np.random.default_rng(0)
  k = rng.binomial(50, 0.1, size=4000)
  covered = np.mean(audit.clopper_pearson_upper(k, 50, 0.05) >= 0.1)
  assert covered >= 0.95


def test_bad_arguments():
  with pytest.raises(ValueError, match="at least 2"):
    audit.epsilon_lower_bound([0.1], [0.2, 0.3], DELTA)
  with pytest.raises(ValueError, match="non-finite"):
    audit.estimate_epsilon([0.1, np.nan], [0.2, 0.3], DELTA)
  with pytest.raises(ValueError, match="confidence"):
    audit.epsilon_lower_bound([0.1, 0.2], [0.2, 0.3], DELTA, confidence=1.0)


# ---------------------------------------------------------------------------
# (e) Canaries and cosines, and the pipeline on a simulated mechanism.

_PARAMS = {"dense": {"w": jnp.zeros((100, 150)), "b": jnp.zeros((150,))},
           "out": jnp.zeros((4850,), jnp.bfloat16)}  # d = 20,000
_NUM_CANARIES = 400  # one shape for every test: compiled once


def test_canary_directions_are_unit_and_cosines_bounded():
  n = _NUM_CANARIES
  dirs = audit.canary_directions(jax.random.key(0), n, _PARAMS)
  assert jax.tree_util.tree_structure(dirs) == jax.tree_util.tree_structure(
      _PARAMS)
  assert dirs["dense"]["w"].shape == (n, 100, 150)
  squares = sum(np.sum(np.square(np.asarray(x, np.float64)).reshape(n, -1),
                       axis=1) for x in jax.tree_util.tree_leaves(dirs))
  np.testing.assert_allclose(np.sqrt(squares), 1.0, rtol=1e-5)

  rng = np.random.default_rng(1)
  vector = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape), _PARAMS)
  cos = audit.cosines(dirs, vector)
  assert cos.shape == (n,)
  assert bool(jnp.all((cos >= -1) & (cos <= 1)))
  # Random directions are nearly orthogonal in d = 20,000: cos ~ N(0, 1/d).
  assert float(jnp.std(cos)) == pytest.approx(1 / math.sqrt(20_000), rel=0.3)

  first = jax.tree_util.tree_map(lambda d: -3.0 * d[0], dirs)
  cos = audit.cosines(dirs, first)
  assert float(cos[0]) == pytest.approx(-1.0, abs=1e-5)
  assert bool(jnp.all((cos >= -1) & (cos <= 1)))
  np.testing.assert_array_equal(
      audit.cosines(dirs, jax.tree_util.tree_map(jnp.zeros_like, first)), 0.0)


def test_canary_update_is_clipped_to_exactly_c():
  dirs = audit.canary_directions(jax.random.key(2), _NUM_CANARIES, _PARAMS)
  update = audit.canary_update(dirs, 1, 1e3 * 0.7)
  clipped = clipping.clip_by_global_norm(update, 0.7).clipped
  assert float(tree_util.global_l2_norm(clipped)) == pytest.approx(0.7,
                                                                   rel=1e-3)
  cos = audit.cosines(dirs, clipped)
  assert float(cos[1]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_pipeline_on_a_gaussian_mechanism_in_parameter_space(noise_multiplier):
  """Release = sum of k inserted canaries' clipped updates + N(0, (zC)^2 I).

  Each canary's presence is then a Gaussian mechanism with mu = 1 / z (the
  other canaries add variance k C^2 / d, about 1% here). Without noise the
  audit must detect the leak; with z = 1 (epsilon 4.4 at 1e-5) epsilon_lo
  must stay below the accountant's epsilon and epsilon_est be near it.
  """
  c, k = 0.5, _NUM_CANARIES // 2
  dirs = audit.canary_directions(jax.random.key(3), 2 * k, _PARAMS)
  rng = np.random.default_rng(4)
  release = jax.tree_util.tree_map(
      lambda x: c * np.sum(np.asarray(x[:k]), 0)
      + noise_multiplier * c * rng.normal(size=x.shape[1:]), dirs)
  cos = np.asarray(audit.cosines(dirs, release))
  inserted_cos, held_out_cos = cos[:k], cos[k:]
  lo = audit.epsilon_lower_bound(inserted_cos, held_out_cos, DELTA)
  est = audit.estimate_epsilon(inserted_cos, held_out_cos, DELTA,
                               equal_variance=True)
  if noise_multiplier == 0:
    # Separation sqrt(d / k) = 10 sd: perfect with 100 a group in the
    # evaluation half, where epsilon_lo can reach log(1 / 0.036) = 3.3.
    assert lo > 3.0
    assert est > 30
  else:
    truth = _true_epsilon(1 / noise_multiplier, DELTA)
    assert 0 < lo <= truth
    # With 200 canaries a group only the pooled fit is precise enough to
    # check (see estimate_epsilon on separate variances).
    assert abs(est - truth) < _estimation_tolerance(1.0, k, True)
