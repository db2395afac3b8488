"""Laplace mechanism: L1 clip bound, noise distribution, events."""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp import tree_util
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import laplace
from fedjax_dp.privacy import sampling
from helpers import plans

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=30, deadline=None)
@given(a=st.lists(_floats, min_size=1, max_size=7),
       b=st.lists(_floats, min_size=1, max_size=5),
       c=st.floats(1e-3, 1e3))
def test_every_clipped_contribution_has_l1_norm_at_most_c(a, b, c):
  tree = {"a": jnp.asarray(a, jnp.float32),
          "b": {"w": jnp.asarray(b, jnp.float32)}}
  out = clipping.clip_by_l1_norm(tree, c)
  norm = float(clipping.l1_norm(out.clipped))
  assert norm <= c * (1 + 1e-6)
  exact = sum(abs(x) for x in np.float32(a + b).astype(np.float64))
  assert float(out.norm) == pytest.approx(exact, rel=1e-5, abs=1e-6)
  if exact <= c * (1 - 1e-6):  # untouched when within the bound
    assert not bool(out.was_clipped)
    # atol: XLA on CPU flushes float32 subnormals to zero.
    np.testing.assert_allclose(out.clipped["a"], tree["a"], rtol=1e-6,
                               atol=1e-37)
  # Adding this client to any sum moves it by at most C in L1.
  other = {"a": jnp.ones_like(tree["a"]), "b": {"w": jnp.ones_like(
      tree["b"]["w"])}}
  moved = tree_util.tree_sub(tree_util.tree_add(other, out.clipped), other)
  assert float(clipping.l1_norm(moved)) <= c * (1 + 1e-5) + 1e-5


def test_infinite_clip_and_zero_update_are_unchanged():
  tree = {"w": jnp.array([1.0, -2.0, 3.0])}
  out = clipping.clip_by_l1_norm(tree, jnp.inf)
  np.testing.assert_array_equal(out.clipped["w"], tree["w"])
  zero = clipping.clip_by_l1_norm({"w": jnp.zeros(3)}, 1.0)
  np.testing.assert_array_equal(zero.clipped["w"], jnp.zeros(3))
  assert float(laplace.noise_scale(0.0, jnp.inf)) == 0.0
  assert float(laplace.noise_scale(2.0, 0.5)) == 1.0


def test_laplace_noise_has_stated_distribution():
  n = 200_000
  b = 0.3
  tree = {"a": jnp.zeros((n // 2,)), "b": jnp.zeros((n // 4, 2))}
  noisy = laplace.add_laplace_noise(tree, b, jax.random.key(0))
  x = np.concatenate([np.ravel(noisy["a"]), np.ravel(noisy["b"])])
  # KS against Laplace(0, b): fails by accident 1 time in 1000.
  assert stats.kstest(x, "laplace", args=(0.0, b)).pvalue > 1e-3
  # Mean absolute value is b; its standard error is b / sqrt(n).
  assert abs(np.abs(x).mean() - b) < 5 * b / math.sqrt(n)
  # A Gaussian of the same std would be rejected: the test has power.
  g = np.random.default_rng(0).normal(0, math.sqrt(2) * b, n)
  assert stats.kstest(g, "laplace", args=(0.0, b)).pvalue < 1e-6
  # Same key, same noise; leaves independent.
  again = laplace.add_laplace_noise(tree, b, jax.random.key(0))
  np.testing.assert_array_equal(again["a"], noisy["a"])
  a_, b_ = np.ravel(noisy["a"])[:50_000], np.ravel(noisy["b"])[:50_000]
  assert abs(np.corrcoef(a_, b_)[0, 1]) < 5 / math.sqrt(50_000)


def test_local_noise_is_per_client_and_independent():
  clients, dim, b = 400, 500, 1.5
  stacked = {"w": jnp.zeros((clients, dim))}
  noisy = laplace.add_local_laplace_noise(stacked, b, jax.random.key(4))["w"]
  x = np.asarray(noisy)
  assert stats.kstest(x.ravel(), "laplace", args=(0.0, b)).pvalue > 1e-3
  corr = np.corrcoef(x[0], x[1])[0, 1]
  assert abs(corr) < 5 / math.sqrt(dim)
  # Client i's noise does not depend on the block size.
  fewer = laplace.add_local_laplace_noise(
      {"w": jnp.zeros((3, dim))}, b, jax.random.key(4))["w"]
  np.testing.assert_array_equal(fewer, noisy[:3])
  # A chunk of slots 5..7 gets those slots' noise, not slots 0..2's.
  chunk = laplace.add_local_laplace_noise(
      {"w": jnp.zeros((3, dim))}, b, jax.random.key(4),
      slot_ids=jnp.arange(5, 8))["w"]
  np.testing.assert_array_equal(chunk, noisy[5:8])


def _pld_eps(event, count, delta=1e-5, relation=ADD_REMOVE):
  acc = pld.PLDAccountant(relation)
  acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
  return acc.get_epsilon(delta)


def test_central_event_with_poisson_sampling_matches_dp_accounting():
  sampler = sampling.PoissonSampler(1000, 0.05, capacity=1000)
  z = 3.0
  event = plans.plan_for(sampler, mechanism="laplace").event(
        noise_multiplier=z)
  assert event == dp_accounting.PoissonSampledDpEvent(
      0.05, dp_accounting.LaplaceDpEvent(3.0))
  ours = accounting.epsilon_of(
      [event] * 20, 1e-5, accountant="pld",
      relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE)
  assert ours == pytest.approx(_pld_eps(event, 20), rel=1e-6)
  # Amplification helps: below the unsampled Laplace's 20 / z.
  assert ours < 20 / z


def test_central_event_without_amplification_for_other_samplers():
  z = 4.0
  for sampler in (sampling.FixedSizeSampler(1000, 50),
                  sampling.PoissonSampler(1000, 0.05)):  # truncating
    event = plans.plan_for(sampler, mechanism="laplace").event(
        noise_multiplier=z)
    assert event == dp_accounting.LaplaceDpEvent(2.0)
    # Pure epsilon 2 / z per round; the RDP accountant's conversion adds a
    # few percent at delta = 1e-9.
    acc = rdp.RdpAccountant(neighboring_relation=_rel(sampler))
    acc.compose(event)
    assert acc.get_epsilon(1e-9) == pytest.approx(2 / z, rel=0.05)
  assert isinstance(plans.plan_for(sampler, mechanism="laplace").event(
        noise_multiplier=0.0),
                    dp_accounting.NonPrivateDpEvent)
  with pytest.raises(ValueError):
    plans.plan_for(sampler, mechanism="laplace").event(
        noise_multiplier=-1.0)


def _rel(sampler):
  return {clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE: ADD_REMOVE,
          clipping.NeighbouringRelation.REPLACE_ONE:
              dp_accounting.NeighboringRelation.REPLACE_ONE}[sampler.relation]


def test_local_event_is_pure_two_over_z_per_round():
  z = 2.0
  event = plans.plan_for(
      mechanism="laplace", noise_placement="local").event(noise_multiplier=z)
  assert event == dp_accounting.LaplaceDpEvent(1.0)
  # delta = 0 curve: one round is exactly 2 / z.
  assert _pld_eps(event, 1, delta=1e-12) == pytest.approx(2 / z, abs=1e-3)
  # Ten rounds compose to at most 10 * 2 / z.
  assert _pld_eps(event, 10, delta=1e-12) <= 10 * 2 / z + 1e-3


@pytest.mark.parametrize("k", [2, 5])
def test_one_coordinate_shift_is_the_worst_case(k):
  """LaplaceDpEvent(s / C) covers vectors with L1 sensitivity C."""
  one = privacy_loss_distribution.from_laplace_mechanism(1.0)
  spread = privacy_loss_distribution.from_laplace_mechanism(
      float(k)).self_compose(k)
  for eps in (0.0, 0.3, 0.7, 0.95):
    assert spread.get_delta_for_epsilon(eps) <= (
        one.get_delta_for_epsilon(eps) + 1e-9)
