"""Adaptive clipping: the count's noise, convergence, and its accounting."""

import math

import chex
import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import sampling
from helpers import plans

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE = dp_accounting.NeighboringRelation.REPLACE_ONE


def test_defaults_are_the_papers():
  h = adaptive_clipping.AdaptiveClipHparams.create(expected_cohort_size=100)
  assert float(h.target_quantile) == 0.5
  assert float(h.learning_rate) == pytest.approx(0.2)
  assert float(h.count_stddev) == pytest.approx(5.0)  # m / 20
  state = adaptive_clipping.init(jax.random.key(0))
  assert float(state.clip_norm) == pytest.approx(0.1)


def test_noise_split_formula_and_refusal():
  z, sb = 1.0, 5.0
  zd = adaptive_clipping.update_noise_multiplier(z, sb)
  assert zd == pytest.approx((1.0 - 1.0 / 100.0) ** -0.5)
  # The two Gaussians recombine to exactly z.
  assert accounting.effective_noise_multiplier(zd, 2 * sb) == (
      pytest.approx(z, rel=1e-12))
  assert adaptive_clipping.update_noise_multiplier(0.0, 5.0) == 0.0
  with pytest.raises(ValueError, match="too small"):
    adaptive_clipping.update_noise_multiplier(1.0, 0.5)  # 2 * sb == z
  with pytest.raises(ValueError, match="too small"):
    adaptive_clipping.update_noise_multiplier(3.0, 1.0)


def test_shifted_count_has_sensitivity_one_half():
  unclipped = jnp.array([True, False, True, True, False])
  valid = jnp.array([True, True, True, True, False])
  base = adaptive_clipping.shifted_count(unclipped, valid)
  for b in (True, False):  # add client 4, unclipped or clipped
    added = adaptive_clipping.shifted_count(unclipped.at[4].set(b),
                                            valid.at[4].set(True))
    assert abs(float(added - base)) == 0.5
  # Padding contributes nothing, whatever it holds.
  assert float(adaptive_clipping.shifted_count(
      unclipped, jnp.zeros(5, bool))) == 0.0


def test_count_noise_has_stated_stddev():
  m, sigma_b = 100.0, 5.0
  hp = adaptive_clipping.AdaptiveClipHparams.create(
      expected_cohort_size=m, count_stddev=sigma_b)
  unclipped = jnp.arange(80) % 3 == 0
  valid = jnp.arange(80) < 70
  true_shifted = float(adaptive_clipping.shifted_count(unclipped, valid))

  def one(key):
    _, out = adaptive_clipping.update(
        adaptive_clipping.init(key, 1.0), unclipped, valid, hp)
    return out.unclipped_fraction

  n = 20_000
  fractions = np.asarray(jax.vmap(one)(
      jax.random.split(jax.random.key(3), n)), np.float64)
  noise = (fractions - 0.5) * m - true_shifted
  # KS against N(0, sigma_b^2): fails by accident with probability 1e-3.
  assert stats.kstest(noise / sigma_b, "norm").pvalue > 1e-3
  # Sample std within 5 standard errors; a 10% error would be ~20 of them.
  assert abs(noise.std() / sigma_b - 1.0) < 5 / math.sqrt(2 * n)
  assert abs(noise.mean()) < 5 * sigma_b / math.sqrt(n)


def test_update_moves_clip_geometrically():
  hp = adaptive_clipping.AdaptiveClipHparams.create(
      expected_cohort_size=4, count_stddev=0.0)
  state = adaptive_clipping.init(jax.random.key(0), 2.0)
  # All 4 unclipped: b~ = 1, C <- C exp(-0.2 * 0.5).
  new, out = adaptive_clipping.update(
      state, jnp.ones(4, bool), jnp.ones(4, bool), hp)
  assert float(out.unclipped_fraction) == pytest.approx(1.0)
  assert float(out.clip_norm) == 2.0
  assert float(new.clip_norm) == pytest.approx(2.0 * math.exp(-0.1))
  # None unclipped: the clip grows.
  new, out = adaptive_clipping.update(
      state, jnp.zeros(4, bool), jnp.ones(4, bool), hp)
  assert float(new.clip_norm) == pytest.approx(2.0 * math.exp(0.1))
  # The key advances: two rounds get different noise.
  assert not np.array_equal(jax.random.key_data(new.key),
                            jax.random.key_data(state.key))


def test_update_compiles_once_for_all_hparams():
  fn = jax.jit(chex.assert_max_traces(adaptive_clipping.update, n=1))
  state = adaptive_clipping.init(jax.random.key(0), 1.0)
  u, v = jnp.ones(8, bool), jnp.ones(8, bool)
  for gamma, lr in ((0.5, 0.2), (0.9, 0.05)):
    hp = adaptive_clipping.AdaptiveClipHparams.create(
        expected_cohort_size=8, target_quantile=gamma, learning_rate=lr)
    state, _ = fn(state, u, v, hp)


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_converges_to_target_quantile(gamma):
  """Known norms: a fixed lognormal population, Poisson cohorts, noisy count.

  Near the fixed point log C performs an AR(1) walk whose stationary mean
  satisfies E[F(C_t)] = gamma exactly (F = the population's norm CDF). With
  m = 100, sigma_b = 5, eta = 0.2, the per-round std of F(C_t) is about 0.015
  and its 400-round average has std < 0.006; the tolerance 0.03 is > 5 of
  those, while a wrong shift (+0 instead of +1/2) or sign sends the average
  far outside it (checked by the clip's final quantile too).
  """
  pop_size, q = 1000, 0.1
  norms = jnp.asarray(np.random.default_rng(0).lognormal(0.0, 1.0, pop_size),
                      jnp.float32)
  sorted_norms = np.sort(np.asarray(norms))
  hp = adaptive_clipping.AdaptiveClipHparams.create(
      expected_cohort_size=q * pop_size, target_quantile=gamma)
  rounds = 700

  def step(carry, key):
    state = carry
    valid = jax.random.bernoulli(key, q, (pop_size,))
    unclipped = norms <= state.clip_norm
    state, out = adaptive_clipping.update(state, unclipped, valid, hp)
    return state, out.clip_norm

  state0 = adaptive_clipping.init(jax.random.key(7))  # C_0 = 0.1
  _, clips = jax.lax.scan(
      step, state0, jax.random.split(jax.random.key(11), rounds))
  clips = np.asarray(clips)
  cdf = np.searchsorted(sorted_norms, clips[-400:], side="right") / pop_size
  assert abs(cdf.mean() - gamma) < 0.03
  target = np.quantile(sorted_norms, gamma)
  # The geometric mean of the late clips lies within 15% of the quantile.
  assert abs(np.exp(np.log(clips[-400:]).mean()) / target - 1.0) < 0.15
  # It started far below (C_0 = 0.1 is about the 1% quantile).
  assert clips[0] < 0.2 * target


def _rdp_eps(event, relation, delta=1e-5):
  acc = rdp.RdpAccountant(neighboring_relation=relation)
  acc.compose(dp_accounting.SelfComposedDpEvent(event, 100))
  return acc.get_epsilon(delta)


def test_event_costs_exactly_one_gaussian_of_configured_z():
  z, sigma_b = 1.1, 5.0
  poisson = sampling.PoissonSampler(1000, 0.1, capacity=1000)
  event = plans.plan_for(poisson, count_stddev=sigma_b).event(
      noise_multiplier=z)
  zd = adaptive_clipping.update_noise_multiplier(z, sigma_b)
  assert event == dp_accounting.PoissonSampledDpEvent(
      0.1, dp_accounting.ComposedDpEvent((
          dp_accounting.GaussianDpEvent(zd),
          dp_accounting.GaussianDpEvent(2 * sigma_b))))
  single = poisson.dp_event(z)
  assert _rdp_eps(event, ADD_REMOVE) == pytest.approx(
      _rdp_eps(single, ADD_REMOVE), rel=1e-9)
  # The PLD accountant takes the rewritten event, and agrees with the single.
  collapsed = accounting.as_single_gaussian(event)
  assert collapsed.event.noise_multiplier == pytest.approx(z, rel=1e-12)
  a, b = pld.PLDAccountant(ADD_REMOVE), pld.PLDAccountant(ADD_REMOVE)
  a.compose(dp_accounting.SelfComposedDpEvent(collapsed, 50))
  b.compose(dp_accounting.SelfComposedDpEvent(single, 50))
  assert a.get_epsilon(1e-5) == pytest.approx(b.get_epsilon(1e-5), rel=1e-6)
  # Through the project's ledger helper too (rdp takes the composed event).
  ours = accounting.epsilon_of(
      [event] * 100, 1e-5, accountant="rdp",
      relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE)
  assert ours == pytest.approx(_rdp_eps(single, ADD_REMOVE), rel=1e-9)
  # Had the count been accounted with sensitivity 1 (unshifted), it would
  # cost more: the split is what keeps the total at z.
  wrong = dp_accounting.PoissonSampledDpEvent(
      0.1, dp_accounting.ComposedDpEvent([
          dp_accounting.GaussianDpEvent(zd),
          dp_accounting.GaussianDpEvent(sigma_b)]))
  assert _rdp_eps(wrong, ADD_REMOVE) > 1.01 * _rdp_eps(single, ADD_REMOVE)


def test_event_under_replace_one_and_truncation():
  z, sigma_b = 1.1, 5.0
  fixed = sampling.FixedSizeSampler(1000, 100)
  event = plans.plan_for(fixed, count_stddev=sigma_b).event(
      noise_multiplier=z)
  zd = adaptive_clipping.update_noise_multiplier(z, sigma_b)
  assert event.event == dp_accounting.ComposedDpEvent((
      dp_accounting.GaussianDpEvent(zd / 2),
      dp_accounting.GaussianDpEvent(sigma_b)))
  assert _rdp_eps(event, REPLACE) == pytest.approx(
      _rdp_eps(fixed.dp_event(z), REPLACE), rel=1e-9)
  truncating = sampling.PoissonSampler(1000, 0.1)
  assert truncating.truncates
  tevent = plans.plan_for(truncating, count_stddev=sigma_b).event(
      noise_multiplier=z)
  assert isinstance(tevent, dp_accounting.TruncatedSubsampledGaussianDpEvent)
  assert tevent.noise_multiplier == pytest.approx(z, rel=1e-12)
  # No noise: the same non-private event as a fixed-clip round.
  assert plans.plan_for(fixed, count_stddev=sigma_b).event(
      noise_multiplier=0.0) == fixed.dp_event(0.0)
  with pytest.raises(ValueError):
    plans.plan_for(fixed, count_stddev=sigma_b).event(
      noise_multiplier=20.0)
