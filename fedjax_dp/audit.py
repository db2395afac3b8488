"""One-shot empirical privacy estimation with random canaries.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar (ICLR 2024), "One-shot
Empirical Privacy Estimation for Federated Learning". Canary clients whose
update is a large multiple of a random unit direction (so that clipping cuts
it to exactly C times the direction) are sampled like real clients. After
training, the cosine between each canary's direction and the final model
delta (or the maximum over rounds of its cosine with each round's update) is
compared with the cosines of canaries that were never inserted: in high
dimension those are nearly N(0, 1/d), and an inserted canary shifts its
cosine's mean by an amount that reflects how much one client can be seen.

This module holds the pure pieces; the simulation that inserts canaries lives
with the round and the runner:

  * `canary_directions` / `canary_update`: random unit directions over the
    whole parameter tree, and a canary client's update;
  * `cosines`: canary directions against a params-shaped vector;
  * `estimate_epsilon`: the paper's estimate epsilon_est from Gaussian fits;
  * `epsilon_lower_bound`: thresholding with Clopper-Pearson bounds on the
    error rates, a lower bound at the stated confidence when its two samples
    are i.i.d. draws (many independent runs).

Privacy: nothing here is private, and nothing here bounds a run's epsilon.
Both numbers a run reports are estimates (Andrew et al. 2024 call theirs an
estimate for this reason): the canaries of one run share its model and its
noise, so their cosines are not independent trials, and the Clopper-Pearson
confidence of `epsilon_lower_bound` does not hold for them. The run summary
therefore names that value `epsilon_threshold_est`. Neither replaces the
accountant.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special
from scipy import stats

from fedjax_dp import types


# ----------------------------------------------------------------------------
# Canaries and cosines.


def canary_directions(key: types.PRNGKey, num_canaries: int,
                      params_like: types.Params) -> types.Params:
  """Independent random unit directions in parameter space.

  Each direction is an isotropic Gaussian over all parameters, normalised to
  global L2 norm 1 over the whole tree (not leaf by leaf).

  Args:
    key: PRNG key.
    num_canaries: number of directions, >= 1.
    params_like: tree of arrays (or ShapeDtypeStructs) with the model's
      parameter shapes.

  Returns:
    A tree like `params_like` whose leaves have a leading axis of size
    `num_canaries` (float32); direction i is `tree_map(lambda x: x[i], ...)`.
  """
  if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or \
      num_canaries < 1:
    raise ValueError(f"num_canaries must be an integer >= 1, got "
                     f"{num_canaries!r}")
  leaves, treedef = jax.tree_util.tree_flatten(params_like)
  if not leaves:
    raise ValueError("params_like has no leaves")
  unit = _unit_directions(key, num_canaries,
                          tuple(tuple(x.shape) for x in leaves))
  return jax.tree_util.tree_unflatten(treedef, unit)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unit_directions(key, num_canaries, shapes):
  # One draw over all parameters, then cut into leaves.
  sizes = [math.prod(s) for s in shapes]
  flat = jax.random.normal(key, (num_canaries, sum(sizes)), jnp.float32)
  flat = flat * jax.lax.rsqrt(jnp.sum(jnp.square(flat), axis=1,
                                      keepdims=True))
  bounds = np.cumsum([0] + sizes)
  return [flat[:, a:b].reshape((num_canaries,) + s)
          for a, b, s in zip(bounds[:-1], bounds[1:], shapes)]


def canary_update(directions: types.Params, index, norm) -> types.Params:
  """Canary `index`'s model delta: `norm` times its direction.

  Pass a norm well above the clip norm C (e.g. 1e3 * C) so that, like a real
  client's, the canary's update goes through clipping and leaves it with norm
  exactly C.
  """
  return jax.tree_util.tree_map(lambda d: norm * d[index], directions)


def cosines(directions: types.Params, vector: types.Params) -> jax.Array:
  """Cosine between each canary direction and a params-shaped vector.

  Args:
    directions: output of `canary_directions` (leading canary axis).
    vector: a tree like one direction, e.g. the final model minus the initial
      model, or one round's aggregated update.

  Returns:
    float32 array [num_canaries] in [-1, 1]; all zeros if `vector` is zero.
  """
  if jax.tree_util.tree_structure(directions) != \
      jax.tree_util.tree_structure(vector):
    raise ValueError("directions and vector have different tree structures")
  d_leaves = jax.tree_util.tree_leaves(directions)
  v_leaves = jax.tree_util.tree_leaves(vector)
  for d, v in zip(d_leaves, v_leaves):
    if d.shape[1:] != v.shape:
      raise ValueError(f"direction leaf shape {d.shape[1:]} does not match "
                       f"vector leaf shape {v.shape}")
  return _cosines(d_leaves, v_leaves)


@jax.jit
def _cosines(d_leaves, v_leaves):
  n = d_leaves[0].shape[0]
  dots = 0.0
  d_sq = 0.0
  v_sq = 0.0
  for d, v in zip(d_leaves, v_leaves):
    d = d.reshape(n, -1).astype(jnp.float32)
    v = v.reshape(-1).astype(jnp.float32)
    dots = dots + jnp.dot(d, v, precision=jax.lax.Precision.HIGHEST)
    d_sq = d_sq + jnp.sum(jnp.square(d), axis=1)
    v_sq = v_sq + jnp.sum(jnp.square(v))
  denom = jnp.sqrt(d_sq) * jnp.sqrt(v_sq)
  cos = jnp.where(denom > 0, dots / jnp.where(denom > 0, denom, 1.0), 0.0)
  return jnp.clip(cos, -1.0, 1.0)


# ----------------------------------------------------------------------------
# Epsilon of a pair of Gaussians.


class GaussianFit(NamedTuple):
  """Means and standard deviations of held-out (0) and inserted (1) cosines."""

  mu0: float
  sigma0: float
  mu1: float
  sigma1: float


def _as_sample(values, name: str) -> np.ndarray:
  x = np.asarray(values, dtype=np.float64).reshape(-1)
  if x.size < 2:
    raise ValueError(f"{name} needs at least 2 values, got {x.size}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds non-finite values")
  return x


def fit_gaussians(inserted_cosines, held_out_cosines) -> GaussianFit:
  """Sample means and (ddof=1) standard deviations of the two groups."""
  x1 = _as_sample(inserted_cosines, "inserted_cosines")
  x0 = _as_sample(held_out_cosines, "held_out_cosines")
  return GaussianFit(float(x0.mean()), float(x0.std(ddof=1)),
                     float(x1.mean()), float(x1.std(ddof=1)))


def _log_mass(intervals, mu: float, sigma: float) -> float:
  """log P(X in union of disjoint intervals) for X ~ N(mu, sigma^2).

  Computed with log-CDFs of the nearer tail, so tiny masses keep precision.
  """
  logs = []
  for lo, hi in intervals:
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    if a >= b:
      continue
    if a > 0:  # both in the right tail: P = sf(a) - sf(b)
      la, lb = stats.norm.logsf(a), stats.norm.logsf(b)
    else:  # P = cdf(b) - cdf(a), with cdf(a) the smaller
      la, lb = stats.norm.logcdf(b), stats.norm.logcdf(a)
    if lb == -math.inf:
      logs.append(la)
    else:
      logs.append(la + math.log1p(-math.exp(min(lb - la, 0.0)))
                  if lb < la else -math.inf)
  return float(special.logsumexp(logs)) if logs else -math.inf


def _hockey_stick(epsilon: float, mu_p: float, s_p: float, mu_q: float,
                  s_q: float) -> float:
  """sup_S P(S) - e^eps Q(S) for P = N(mu_p, s_p^2), Q = N(mu_q, s_q^2).

  The supremum is attained on S = {x : log p(x)/q(x) > eps}; the log
  likelihood ratio is the quadratic A x^2 + B x + C, so S is a half-line, an
  interval or the complement of one, and P(S), Q(S) are normal tail masses.
  """
  a = 0.5 / s_q**2 - 0.5 / s_p**2
  b = mu_p / s_p**2 - mu_q / s_q**2
  c = math.log(s_q / s_p) - 0.5 * mu_p**2 / s_p**2 + 0.5 * mu_q**2 / s_q**2
  c -= epsilon
  inf = math.inf
  if abs(a) <= 1e-12 * (abs(b) + abs(c) + 1.0):  # linear: a half-line
    if b > 0:
      s = [(-c / b, inf)]
    elif b < 0:
      s = [(-inf, -c / b)]
    else:
      s = [(-inf, inf)] if c > 0 else []
  else:
    disc = b * b - 4 * a * c
    if disc <= 0:
      s = [(-inf, inf)] if a > 0 else []
    else:
      # Roots by the numerically stable form.
      q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
      r1, r2 = sorted((q / a, c / q) if q != 0 else (
          -math.sqrt(-c / a), math.sqrt(-c / a)))
      s = [(-inf, r1), (r2, inf)] if a > 0 else [(r1, r2)]
  if not s:
    return 0.0
  log_p = _log_mass(s, mu_p, s_p)
  log_q = _log_mass(s, mu_q, s_q)
  if log_p == -inf:
    return 0.0
  return max(0.0, math.exp(log_p) - math.exp(min(epsilon + log_q, 700.0)))


def gaussian_pair_delta(epsilon: float, fit: GaussianFit) -> float:
  """Smallest delta at which the pair of Gaussians is (epsilon, delta)-close.

  max of the hockey-stick divergences in both directions.
  """
  return max(_hockey_stick(epsilon, fit.mu1, fit.sigma1, fit.mu0, fit.sigma0),
             _hockey_stick(epsilon, fit.mu0, fit.sigma0, fit.mu1, fit.sigma1))


def gaussian_pair_epsilon(fit: GaussianFit, delta: float,
                          tol: float = 1e-9) -> float:
  """Smallest epsilon >= 0 with gaussian_pair_delta(epsilon) <= delta.

  With sigma0 == sigma1 = s this is the epsilon of the Gaussian mechanism with
  mu = |mu1 - mu0| / s, whose delta(eps) = Phi(-eps/mu + mu/2) -
  e^eps Phi(-eps/mu - mu/2) (Balle and Wang 2018).
  """
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  if fit.sigma0 <= 0 or fit.sigma1 <= 0:
    return 0.0 if fit.mu0 == fit.mu1 and fit.sigma0 == fit.sigma1 \
        else math.inf
  if gaussian_pair_delta(0.0, fit) <= delta:
    return 0.0
  lo, hi = 0.0, 1.0
  while gaussian_pair_delta(hi, fit) > delta:
    lo, hi = hi, 2 * hi
    if hi > 1e4:
      return math.inf
  while hi - lo > tol * max(1.0, hi):
    mid = 0.5 * (lo + hi)
    if gaussian_pair_delta(mid, fit) > delta:
      lo = mid
    else:
      hi = mid
  return hi


def estimate_epsilon(inserted_cosines, held_out_cosines, delta: float, *,
                     equal_variance: bool = False) -> float:
  """The one-shot estimate epsilon_est (Andrew et al. 2024).

  Fits N(mu0, s0^2) to the held-out (never inserted) canaries' cosines and
  N(mu1, s1^2) to the inserted ones', and returns the epsilon at `delta` of
  that pair of Gaussians.

  Unequal variances (the default, as in the authors' released code): the pair
  is then not a Gaussian mechanism (its privacy loss is quadratic, not
  linear, in the output), but its epsilon is still exact:
  `gaussian_pair_epsilon` takes the hockey-stick divergence in both
  directions over the region where the quadratic log-likelihood ratio exceeds
  epsilon. This keeps real differences, e.g. the extra spread of inserted
  canaries that were sampled a varying number of times. Its cost: epsilon has
  a kink at s0 = s1 (either inequality widens one tail), so sampling noise in
  the two variance estimates biases epsilon_est upwards, by about
  L * E|s1 - s0| with L ~ 20-40 at delta = 1e-5 (in units of the common sd);
  with a few hundred canaries a group that is about +1. When the variances
  are known to be equal (a plain Gaussian mechanism, the paper's asymptotic
  regime), pass `equal_variance=True` to pool them (s^2 = the average of the
  two): that is the Gaussian mechanism with mu = |mu1 - mu0| / s, a much less
  noisy estimate.

  Args:
    inserted_cosines: statistics of canaries that were inserted.
    held_out_cosines: statistics of canaries that never were.
    delta: in (0, 1).
    equal_variance: pool the two variances.

  Returns:
    epsilon_est >= 0 (may be inf if the fits are degenerate).
  """
  fit = fit_gaussians(inserted_cosines, held_out_cosines)
  if equal_variance:
    pooled = math.sqrt(0.5 * (fit.sigma0**2 + fit.sigma1**2))
    fit = fit._replace(sigma0=pooled, sigma1=pooled)
  return gaussian_pair_epsilon(fit, delta)


# ----------------------------------------------------------------------------
# Lower bound by thresholding.


def clopper_pearson_upper(successes, trials: int, alpha: float) -> np.ndarray:
  """One-sided (1 - alpha) Clopper-Pearson upper bounds on a binomial rate."""
  k = np.asarray(successes, dtype=np.float64)
  upper = stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(trials - k, 1e-300))
  return np.where(k >= trials, 1.0, upper)


def _threshold_epsilons(fpr_hi: np.ndarray, fnr_hi: np.ndarray,
                        delta: float) -> np.ndarray:
  """Epsilon implied by upper bounds on the error rates, per threshold.

  (eps, delta)-DP forces FPR + e^eps FNR >= 1 - delta and
  FNR + e^eps FPR >= 1 - delta for every test; so given upper bounds, eps >=
  log((1 - delta - FNR_hi) / FPR_hi) and eps >= log((1 - delta - FPR_hi) /
  FNR_hi). Clipped at 0.
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    a = np.where((1 - delta - fnr_hi > 0) & (fpr_hi > 0),
                 np.log(np.maximum(1 - delta - fnr_hi, 1e-300) / fpr_hi), 0.0)
    b = np.where((1 - delta - fpr_hi > 0) & (fnr_hi > 0),
                 np.log(np.maximum(1 - delta - fpr_hi, 1e-300) / fnr_hi), 0.0)
  return np.maximum(np.maximum(a, b), 0.0)


def _bounds_at(thresholds: np.ndarray, inserted: np.ndarray,
               held_out: np.ndarray, alpha: float, delta: float) -> np.ndarray:
  """epsilon_lo at each threshold t (test: inserted iff cosine >= t).

  The error rates get alpha / 2 each (Bonferroni), so both bounds hold
  together with probability >= 1 - alpha.
  """
  held_sorted = np.sort(held_out)
  ins_sorted = np.sort(inserted)
  false_pos = held_out.size - np.searchsorted(held_sorted, thresholds, "left")
  false_neg = np.searchsorted(ins_sorted, thresholds, "left")
  fpr_hi = clopper_pearson_upper(false_pos, held_out.size, alpha / 2)
  fnr_hi = clopper_pearson_upper(false_neg, inserted.size, alpha / 2)
  return _threshold_epsilons(fpr_hi, fnr_hi, delta)


def epsilon_lower_bound(inserted_cosines, held_out_cosines, delta: float,
                        confidence: float = 0.95, *, seed: int = 0) -> float:
  """epsilon_lo: a lower bound on epsilon holding with prob. >= confidence.

  Tests "inserted iff cosine >= t": FPR(t) is the fraction of held-out
  canaries at or above t, FNR(t) the fraction of inserted ones below it. Any
  (eps, delta)-DP mechanism makes both FPR + e^eps FNR and FNR + e^eps FPR at
  least 1 - delta, so one-sided Clopper-Pearson upper bounds on FPR and FNR
  (confidence split between the two, Bonferroni) give a lower bound on eps.

  Multiple testing: maximising over every observed threshold and reporting
  that bound as if t had been fixed in advance (as the authors' released code
  does, with Jeffreys intervals) would overstate the confidence.
  Bonferroni over all thresholds is valid but very loose (the per-threshold
  level falls as 1 / number of thresholds). Instead the canaries of each group
  are split at random in two halves (independent of their values): the
  threshold is chosen on the first half (the one maximising the same bound
  computed there) and the bound is reported on the second half only, where t
  is a single, independently chosen test. The price is half the samples.

  Args:
    inserted_cosines: statistics of inserted canaries (>= 2 values).
    held_out_cosines: statistics of never-inserted canaries (>= 2 values).
    delta: in [0, 1).
    confidence: in (0, 1).
    seed: seed of the random split (numpy), for reproducibility.

  Returns:
    epsilon_lo >= 0. Soundness: if each group's statistics are i.i.d. draws
    of the outputs on two neighbouring inputs of an (eps, delta)-DP mechanism,
    P[epsilon_lo > eps] <= 1 - confidence.
  """
  if not 0 <= delta < 1:
    raise ValueError(f"delta must be in [0, 1), got {delta!r}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
  x1 = _as_sample(inserted_cosines, "inserted_cosines")
  x0 = _as_sample(held_out_cosines, "held_out_cosines")
  alpha = 1.0 - confidence
  rng = np.random.default_rng(seed)
  p1, p0 = rng.permutation(x1.size), rng.permutation(x0.size)
  sel1, ev1 = x1[p1[:x1.size // 2]], x1[p1[x1.size // 2:]]
  sel0, ev0 = x0[p0[:x0.size // 2]], x0[p0[x0.size // 2:]]
  candidates = np.unique(np.concatenate([sel0, sel1]))
  scores = _bounds_at(candidates, sel1, sel0, alpha, delta)
  threshold = candidates[int(np.argmax(scores))]
  return float(_bounds_at(np.array([threshold]), ev1, ev0, alpha, delta)[0])


def largest_lower_bound(num_canaries: int, delta: float,
                        confidence: float = 0.95) -> float:
  """The largest epsilon_lo `epsilon_lower_bound` can return with
  `num_canaries` inserted and as many held out: the bound when the two
  groups separate perfectly.

  An audit whose accountant's epsilon is above this cannot test it, and its
  epsilon_lo = 0 is no evidence of privacy: it has no power there.
  """
  alpha = 1.0 - confidence
  # The bound is evaluated on the second half of each group.
  inserted = num_canaries - num_canaries // 2
  fpr_hi = clopper_pearson_upper(np.array([0]), inserted, alpha / 2)
  fnr_hi = clopper_pearson_upper(np.array([0]), inserted, alpha / 2)
  return float(_threshold_epsilons(fpr_hi, fnr_hi, delta)[0])


def max_over_rounds(running: jax.Array | None,
                    round_cosines: jax.Array) -> jax.Array:
  """Running per-canary maximum of cosines over rounds (all-iterates audit)."""
  return round_cosines if running is None else jnp.maximum(running,
                                                           round_cosines)

