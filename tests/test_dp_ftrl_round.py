"""DP-FTRL (tree-aggregation noise, disjoint cohorts) as a round configuration."""

import math

import dp_accounting
from dp_accounting import rdp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import sampling
from fedjax_dp.privacy import tree_aggregation as ta
from fedjax_dp.privacy import plan as plan_lib
from helpers import tiny_blocks

_MODEL = registry.get_model("logistic", (5,), 3)



def _block(clients=4, seed=0, valid=None):
  return tiny_blocks.cohort_block(clients, seed, valid)


def _round_fn(mechanism, restart_every=None):
  return jax.jit(dp_fedavg.build_round(
      _MODEL, client_lib.client_optimizer("sgd"),
      server_lib.server_optimizer("sgd"),
      plan_lib.Privatizer.create(mechanism=mechanism,
                                 tree_restart_every=restart_every),
      clients_per_chunk=2))


def _tree_state(tree: ta.TreeState) -> plan_lib.PrivacyState:
  return plan_lib.PrivacyState(correlated=tree)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def test_state_before_round_equals_iterated_updates():
  key, restart = jax.random.key(0), 3
  state = ta.init(key)
  for r in range(10):
    want = ta.state_before_round(key, r, restart)
    assert int(want.step) == int(state.step)
    assert int(want.tree_index) == int(state.tree_index)
    _, state, _ = ta.update(state, {"w": jnp.zeros(2)}, 1.0, restart,
                            levels=ta.num_levels(restart))


def test_model_carries_each_finished_tree_and_the_current_prefix_noise():
  """Zero updates: after K rounds the model moved by exactly the released
  noise: the last noise N_R of every finished tree plus N_t of the current
  one (restarts keep the old tree's noise in the model), over the
  denominator."""
  restart, rounds, z, clip, denom = 3, 7, 1.3, 0.5, 4.0
  opt = server_lib.server_optimizer("sgd")
  params = _MODEL.init(jax.random.key(0))
  key = jax.random.key(5)
  # The round carries the tree in the server state from round to round.
  state = server_lib.init(params, opt, _tree_state(ta.init(key)))
  fn = _round_fn("tree", restart)
  hp = dp_fedavg.RoundHparams.create(
      client_lr=0.0, server_lr=1.0, clip_norm=clip, noise_multiplier=z,
      denominator=denom)
  for r in range(rounds):
    state, metrics = fn(state, _block(), hp, jax.random.key(100 + r))
    assert int(metrics["tree_step"]) == r % restart + 1
    assert int(metrics["tree_index"]) == r // restart
    want = ta.state_before_round(key, r + 1, restart)
    assert int(state.privacy.correlated.step) == int(want.step)
    assert int(state.privacy.correlated.tree_index) == int(want.tree_index)
  levels = ta.num_levels(restart)
  expected = sum(
      _flat(ta.cumulative_noise(key, jnp.int32(j), jnp.int32(t), params,
                                z * clip, levels))
      for j, t in ((0, 3), (1, 3), (2, 1)))
  np.testing.assert_allclose(_flat(state.params) - _flat(params),
                             expected / denom, atol=1e-5)
  assert np.std(expected) > 0.5 * z * clip


def test_without_noise_the_tree_round_is_the_clipped_fedavg_round():
  opt = server_lib.server_optimizer("sgd")
  params = _MODEL.init(jax.random.key(0))
  for clip in (0.05, math.inf):
    hp = dp_fedavg.RoundHparams.create(
        client_lr=0.3, server_lr=1.0, clip_norm=clip, noise_multiplier=0.0,
        denominator=4.0)
    tree, _ = _round_fn("tree", 4)(
        server_lib.init(params, opt, _tree_state(
            ta.state_before_round(jax.random.key(2), 2, 4))),
        _block(), hp, jax.random.key(1))
    plain, _ = _round_fn("gaussian")(server_lib.init(params, opt), _block(),
                                     hp, jax.random.key(1))
    np.testing.assert_allclose(_flat(tree.params), _flat(plain.params),
                               atol=1e-6)


def test_replacing_a_client_by_the_empty_record_moves_the_sum_at_most_c():
  """Replace-special: the client's data becomes the empty record (no
  examples), its update 0; the clipped sum moves by at most C."""
  opt = server_lib.server_optimizer("sgd")
  params = _MODEL.init(jax.random.key(0))
  clip = 0.05
  hp = dp_fedavg.RoundHparams.create(
      client_lr=0.3, server_lr=1.0, clip_norm=clip, noise_multiplier=0.0,
      denominator=1.0)
  block = _block()
  empty = block._replace(example_mask=block.example_mask.copy())
  empty.example_mask[2] = False
  out = []
  for b in (block, empty):
    state, _ = _round_fn("tree", 4)(
        server_lib.init(params, opt, _tree_state(ta.init(jax.random.key(2)))),
        b, hp, jax.random.key(1))
    out.append(_flat(state.params))
  change = np.linalg.norm(out[0] - out[1])
  assert 0.5 * clip < change <= clip * (1 + 1e-5)


@pytest.mark.parametrize("participation", ["once_per_tree", "once"])
def test_disjoint_cohorts_never_repeat_a_client_where_the_event_forbids_it(
    participation):
  sampler = sampling.DisjointSampler(
      population_size=50, cohort_size=6, num_rounds=8, restart_every=4,
      participation=participation)
  sample = jax.jit(sampler.sample_round)
  key = jax.random.key(3)
  cohorts = [np.asarray(sample(key, r)[0]) for r in range(8)]
  for c in cohorts:
    assert len(set(c.tolist())) == 6 and c.min() >= 0 and c.max() < 50
  trees = ([cohorts[:4], cohorts[4:]] if participation == "once_per_tree"
           else [cohorts])
  for tree in trees:
    seen = np.concatenate(tree)
    assert len(set(seen.tolist())) == seen.size
  if participation == "once_per_tree":
    # A new tree draws a new permutation: clients come back.
    assert set(np.concatenate(cohorts[:4])) & set(np.concatenate(cohorts[4:]))
  with pytest.raises(ValueError, match="need"):
    sampling.DisjointSampler(50, 6, 10, 10, participation)


def test_tree_run_ledger_equals_dp_accounting_under_replace_special():
  config = config_lib.Config(
      rounds=5, cohort_size=10, eval_every=5, mechanism="tree",
      sampling="disjoint", accountant="rdp", tree_restart_every=2,
      noise_multiplier=2.0)
  result = runner.run(config, progress=False, log=lambda s: None)
  ledger = result.ledger
  assert ledger.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  for size in (2, 2, 1):
    acc.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(2.0, size))
  assert result.summary["epsilon"] == pytest.approx(
      acc.get_epsilon(config.delta), rel=1e-6)
  # Recorded when each tree starts (rounds 0, 2, 4), before its results.
  kinds = [type(e).__name__ for e in ledger.events]
  assert kinds == ["SingleEpochTreeAggregationDpEvent", "NoOpDpEvent"] * 2 + [
      "SingleEpochTreeAggregationDpEvent"]
  assert [h["tree_step"] for h in result.history] == [1, 2, 1, 2, 1]
  assert result.summary["epsilon_pld"] is None  # PLD has no tree events


def test_tree_config_is_validated_before_anything_runs():
  with pytest.raises(ValueError, match="'sampling'"):
    config_lib.Config(mechanism="tree", accountant="rdp")
  with pytest.raises(ValueError, match="'accountant'"):
    config_lib.Config(mechanism="tree", sampling="disjoint")
  with pytest.raises(ValueError, match="'tree_restart_every'"):
    config_lib.Config(tree_restart_every=5)
  with pytest.raises(ValueError, match="'noise_placement'"):
    config_lib.Config(mechanism="tree", sampling="disjoint",
                      accountant="rdp", noise_placement="local")


@pytest.mark.parametrize("restart_every,participation", [
    (2, "once_per_tree"), (1, "once_per_tree"), (3, "once"), (None, "once")])
def test_tree_schedule_holds_every_rounds_event(restart_every, participation):
  from fedjax_dp import simulation  # pylint: disable=g-import-not-at-top
  import collections  # pylint: disable=g-import-not-at-top
  config = config_lib.Config(
      rounds=7, cohort_size=10, eval_every=7, mechanism="tree",
      sampling="disjoint", accountant="rdp", tree_restart_every=restart_every,
      tree_participation=participation, noise_multiplier=2.0)
  sim = simulation.build(config)
  counts = collections.Counter()
  for event, count in sim.plan.schedule():
    counts[event] += count
  assert counts == collections.Counter(
      sim.plan.event(r) for r in range(sim.config.rounds))
