"""Tree aggregation for DP-FTRL: noise law, restarts, and accounting."""

import functools
import itertools
import math

import dp_accounting
from dp_accounting import rdp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import sampling
from fedjax_dp.privacy import tree_aggregation as ta

SIGMA = 0.7
_cumulative_noise = jax.jit(ta.cumulative_noise, static_argnames=("levels",))


@functools.partial(jax.jit, static_argnames=("steps", "levels"))
def _run(key, values, restart_every, *, steps, levels):
  """Applies `update` for `steps` rounds; returns increments and states."""

  def step(state, g):
    noisy, state, info = ta.update(state, {"w": g}, SIGMA, restart_every,
                                   levels=levels)
    return state, (noisy["w"] - g, info.step, info.tree_index, info.restarted)

  _, out = jax.lax.scan(step, ta.init(key), values[:steps])
  return out


def test_prefix_noise_has_std_sigma_sqrt_popcount():
  d, steps = 20_000, 15
  values = jnp.zeros((steps, d))
  inc, t, _, _ = _run(jax.random.key(0), values, jnp.int32(16), steps=steps,
                      levels=ta.num_levels(16))
  prefix_noise = np.cumsum(np.asarray(inc, np.float64), axis=0)
  for i in range(steps):
    step = i + 1
    assert int(t[i]) == step
    want = SIGMA * math.sqrt(bin(step).count("1"))
    got = prefix_noise[i].std()
    # 5 standard errors of a sample std (se = std / sqrt(2 d)); popcounts
    # 1, 2, 3, 4 differ by > 40 of them.
    assert abs(got / want - 1) < 5 / math.sqrt(2 * d), (step, got, want)
    assert abs(prefix_noise[i].mean()) < 5 * want / math.sqrt(d)


def test_increments_sum_to_the_tree_noise_and_prefix_sums_are_unbiased():
  d, steps, r = 5000, 12, 16
  levels = ta.num_levels(r)
  g = jax.random.uniform(jax.random.key(1), (steps, d))
  key = jax.random.key(2)
  inc, _, _, _ = _run(key, g, jnp.int32(r), steps=steps, levels=levels)
  for t in (1, 2, 3, 7, 8, 12):
    direct = _cumulative_noise(key, jnp.int32(0), jnp.int32(t),
                                 {"w": g[0]}, SIGMA, levels=levels)["w"]
    np.testing.assert_allclose(np.asarray(inc[:t]).sum(0), direct,
                               atol=1e-5)
  # The released prefix sums: true prefix sums + noise of mean 0.
  released = np.cumsum(np.asarray(g) + np.asarray(inc), axis=0)
  truth = np.cumsum(np.asarray(g), axis=0)
  for i in range(steps):
    sd = SIGMA * math.sqrt(bin(i + 1).count("1"))
    assert abs((released[i] - truth[i]).mean()) < 5 * sd / math.sqrt(d)


def test_noise_correlation_follows_shared_nodes():
  d, levels = 20_000, 4
  key = jax.random.key(3)
  noise = {t: np.asarray(_cumulative_noise(
      key, jnp.int32(0), jnp.int32(t), {"w": jnp.zeros(d)}, SIGMA,
      levels=levels)["w"]) for t in (4, 5, 6, 7)}
  # N_5 = n(2,0) + n(0,4) and N_7 = n(2,0) + n(1,2) + n(0,6): one shared node.
  cov = np.mean(noise[5] * noise[7])
  assert abs(cov / SIGMA ** 2 - 1.0) < 5 * math.sqrt(6) / math.sqrt(d)
  # N_4 = n(2,0) is inside N_5, N_6, N_7.
  np.testing.assert_allclose(np.mean(noise[4] * noise[6]), SIGMA ** 2,
                             rtol=0.05)


def test_restarts_reset_the_tree():
  d, r, steps = 20_000, 4, 9
  inc, t, tree, restarted = _run(jax.random.key(4), jnp.zeros((steps, d)),
                                 jnp.int32(r), steps=steps,
                                 levels=ta.num_levels(r))
  np.testing.assert_array_equal(np.asarray(t), [1, 2, 3, 4, 1, 2, 3, 4, 1])
  np.testing.assert_array_equal(np.asarray(tree), [0, 0, 0, 0, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(np.asarray(restarted),
                                [0, 0, 0, 0, 1, 0, 0, 0, 1])
  inc = np.asarray(inc, np.float64)
  # Within the new tree, N_1 has std sigma again (one node), not that of
  # step 5 of one big tree (popcount(5) = 2)...
  first_of_second = inc[4]
  assert abs(first_of_second.std() / SIGMA - 1) < 5 / math.sqrt(2 * d)
  # ... and is independent of the first tree's noise.
  first_tree_total = inc[:4].sum(0)
  assert abs(np.corrcoef(first_of_second, first_tree_total)[0, 1]) < (
      5 / math.sqrt(d))
  # The second tree's prefix noise at its step 3 has std sigma sqrt(2).
  second = inc[4:7].sum(0)
  assert abs(second.std() / (SIGMA * math.sqrt(2)) - 1) < 5 / math.sqrt(2 * d)


def test_same_key_same_noise_and_compiles_once_for_all_restarts():
  d = 100
  a = _run(jax.random.key(5), jnp.zeros((6, d)), jnp.int32(4), steps=6,
           levels=3)[0]
  b = _run(jax.random.key(5), jnp.zeros((6, d)), jnp.int32(4), steps=6,
           levels=3)[0]
  np.testing.assert_array_equal(a, b)
  c = _run(jax.random.key(5), jnp.zeros((6, d)), jnp.int32(3), steps=6,
           levels=3)[0]  # same compiled program, other restart_every
  np.testing.assert_array_equal(a[:3], c[:3])
  assert not np.allclose(a[3], c[3])


def test_disjoint_cohorts_within_a_tree():
  # The sampler and the tree's events name participation the same way.
  assert sampling.PARTICIPATIONS == ta.PARTICIPATIONS
  n, m, r = 100, 8, 12
  sampling.check_participation(n, m, r, 50, "once_per_tree")
  key = jax.random.key(6)
  cohorts = [np.asarray(sampling.disjoint_cohort(key, 0, t, n, m))
             for t in range(1, r + 1)]
  flat = np.concatenate(cohorts)
  assert len(set(flat.tolist())) == r * m
  other_tree = np.asarray(sampling.disjoint_cohort(key, 1, 1, n, m))
  assert not np.array_equal(other_tree, cohorts[0])
  with pytest.raises(ValueError, match="distinct clients"):
    sampling.check_participation(n, m, 13, 50, "once_per_tree")
  with pytest.raises(ValueError, match="distinct clients"):
    sampling.check_participation(n, m, 12, 13, "once")


def _rdp_eps(event, delta=1e-5):
  acc = rdp.RdpAccountant(neighboring_relation=ta.RELATION)
  acc.compose(event)
  return acc.get_epsilon(delta)


def test_events_match_dp_accounting_called_directly():
  z, rounds, r = 2.0, 100, 32
  event = ta.dp_event(z, rounds, r, "once_per_tree")
  assert ta.tree_sizes(rounds, r) == [32, 32, 32, 4]
  direct = dp_accounting.ComposedDpEvent([
      dp_accounting.SingleEpochTreeAggregationDpEvent(z, 32)] * 3 + [
          dp_accounting.SingleEpochTreeAggregationDpEvent(z, 4)])
  assert _rdp_eps(event) == pytest.approx(_rdp_eps(direct), rel=1e-12)
  # Per-round events compose to the same thing (the ledger's view).
  per_round = dp_accounting.ComposedDpEvent(
      [ta.round_event(i, z, rounds, r) for i in range(rounds)])
  assert _rdp_eps(per_round) == pytest.approx(_rdp_eps(event), rel=1e-12)
  # The RDP is alpha * depth / (2 z^2) per tree: depth 6 for 32 steps, 3 for 4.
  acc = rdp.RdpAccountant(orders=[2.0], neighboring_relation=ta.RELATION)
  acc.compose(event)
  assert acc._rdp[0] == pytest.approx(2.0 * (3 * 6 + 3) / (2 * z ** 2))
  assert ta.tree_depth(32) == 6 and ta.tree_depth(4) == 3
  # "once": a single event over all trees, costing one tree of depth 6.
  once = ta.dp_event(z, rounds, r, "once")
  assert _rdp_eps(once) == pytest.approx(_rdp_eps(
      dp_accounting.SingleEpochTreeAggregationDpEvent(z, [32, 32, 32, 4])))
  assert _rdp_eps(once) < _rdp_eps(event)
  once_rounds = dp_accounting.ComposedDpEvent(
      [ta.round_event(i, z, rounds, r, "once") for i in range(rounds)])
  assert _rdp_eps(once_rounds) == pytest.approx(_rdp_eps(once), rel=1e-12)


def test_event_requires_replace_special():
  event = ta.dp_event(1.0, 10, 4)
  for rel in (dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
              dp_accounting.NeighboringRelation.REPLACE_ONE):
    assert not rdp.RdpAccountant(neighboring_relation=rel).supports(event)
  with pytest.raises(ValueError):
    ta.dp_event(1.0, 10, 4, "twice")


def _nodes(steps):
  """The released nodes of a tree of `steps` steps: complete dyadic ranges
  [start, end)."""
  size, out = 1, []
  while size <= steps:
    out += [(s, s + size) for s in range(0, steps - size + 1, size)]
    size *= 2
  return out


def _exhaustive_sensitivity_squared(steps, k, b):
  nodes, best = _nodes(steps), 0
  for m in range(1, k + 1):
    for pattern in itertools.combinations(range(steps), m):
      if all(j - i >= b for i, j in zip(pattern, pattern[1:])):
        best = max(best, sum(sum(s <= t < e for t in pattern) ** 2
                             for s, e in nodes))
  return best


@pytest.mark.parametrize("b", [1, 2, 3, 5])
def test_multi_participation_sensitivity_equals_exhaustive_search(b):
  for steps in range(1, 14):
    for k in (1, 2, 3):
      assert ta.max_sensitivity_squared(steps, k, b) == \
          _exhaustive_sensitivity_squared(steps, k, b), (steps, k, b)


def test_multi_participation_sensitivity_limits():
  # Once: the most nodes above one step, the tree's depth.
  for steps in (1, 7, 8, 2000):
    assert ta.max_sensitivity_squared(steps, 1, 1) == ta.tree_depth(steps)
    assert ta.max_sensitivity_squared(steps, 5, steps) == \
        ta.tree_depth(steps)
  # In every step: each node counts its whole size.
  for steps in (6, 8, 13):
    assert ta.max_sensitivity_squared(steps, steps, 1) == sum(
        (e - s) ** 2 for s, e in _nodes(steps))
  with pytest.raises(ValueError, match="min_separation"):
    ta.max_sensitivity_squared(10, 2, 0)


def test_gboard_dp_ftrl_accounting_is_reproduced():
  """Gboard's DP-FTRL accounting (google-research/federated,
  dp_ftrl/blogpost_supplemental_privacy_accounting.ipynb): z = 7, one tree
  of 2,000 rounds, each device at most 6 times at least 313 rounds apart:
  rho ~0.81 zCDP, epsilon ~8.90 at delta 1e-10."""
  s = ta.max_sensitivity_squared(2000, 6, 313)
  rho = s / (2 * 7.0 ** 2)
  assert round(rho, 2) == 0.81
  event = ta.multi_participation_event(7.0, 2000, 6, 313)
  eps = accounting.epsilon_of([event], 1e-10, accountant="rdp",
                              relation=clipping.NeighbouringRelation
                              .REPLACE_SPECIAL)
  assert round(eps, 2) == 8.90
  assert isinstance(ta.multi_participation_event(0.0, 10, 2, 3),
                    dp_accounting.NonPrivateDpEvent)
