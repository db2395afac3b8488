"""Vectorised sweeps: equal to single runs, one compilation per shape group."""

import csv
import math

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import rdp
import jax
import numpy as np
import pytest
from matplotlib import image as mpl_image

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import sweep
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import tuning
from helpers import cpu_devices

_QUIET = {"progress": False, "log": lambda s: None}


def _tiny(**changes):
  base = config_lib.Config(
      name="tiny", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20},
      model="logistic", rounds=3, cohort_size=6, batch_size=10,
      local_epochs=1, noise_multiplier=1.0, eval_every=2, delta=1e-3)
  return base.replace(**changes)


_GRID = {"noise_multiplier": [0.5, 1.0], "clip_norm": [0.5, 1.0],
         "client_lr": [0.1, 0.2], "seed": [0, 1]}


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("sweep")
  return sweep.run_sweep(_tiny(), _GRID, run_dir=run_dir, **_QUIET)


def _assert_same_as_single_run(swept_run, config):
  alone = runner.run(config, **_QUIET)
  assert swept_run.rounds_completed == alone.rounds_completed
  assert swept_run.summary["stopped_for_budget"] == \
      alone.summary["stopped_for_budget"]
  for a, b in zip(jax.tree_util.tree_leaves(swept_run.params),
                  jax.tree_util.tree_leaves(alone.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert swept_run.summary["epsilon"] == pytest.approx(
      alone.summary["epsilon"], rel=1e-9)
  assert [e.round for e in swept_run.ledger.entries] == \
      [e.round for e in alone.ledger.entries]
  assert swept_run.ledger.events == alone.ledger.events
  assert swept_run.summary["eval_accuracy"] == pytest.approx(
      alone.summary["eval_accuracy"], abs=1e-6)
  return alone


def test_every_configuration_equals_its_single_run(grid_sweep):
  result = grid_sweep
  assert len(result.runs) == 16 and len(result.configs) == 16
  assert all(r.rounds_completed == 3 for r in result.runs)
  assert all(len(r.history) == 3 for r in result.runs)
  # Different hyperparameters really ran: 16 distinct final models.
  kernels = {np.asarray(r.params["Dense_0"]["kernel"]).tobytes()
             for r in result.runs}
  assert len(kernels) == 16
  # The grid's two corners: each noise multiplier, seed, clip and lr once.
  for i in (0, 15):
    config = result.configs[i]
    assert config.noise_multiplier == _GRID["noise_multiplier"][i // 8]
    _assert_same_as_single_run(result.runs[i], config)


def test_compiles_once_per_shape_group(grid_sweep):
  assert len(grid_sweep.groups) == 1
  assert grid_sweep.groups[0].num_traces == 1
  assert grid_sweep.groups[0].slots <= grid_sweep.groups[0].full_slots


@pytest.mark.slow
def test_model_in_grid_forms_two_groups():
  result = sweep.run_sweep(
      _tiny(rounds=1, model_kwargs={}),
      {"model": ["logistic", "mlp_2nn"], "seed": [0, 1]}, tuning=False,
      **_QUIET)
  assert len(result.groups) == 2
  assert [g.config_ids for g in result.groups] == [["000", "001"],
                                                    ["002", "003"]]
  assert all(g.num_traces == 1 for g in result.groups)
  assert "Dense_1" in result.runs[2].params  # the MLP ran in group 2.
  assert all(r.rounds_completed == 1 for r in result.runs)


def test_reports_are_written(grid_sweep):
  out = grid_sweep.run_dir
  for cid in grid_sweep.config_ids:
    for name in ("config.json", "metrics.jsonl", "summary.json",
                 "ledger.jsonl"):
      assert (out / "configs" / cid / name).is_file()
    lines = (out / "configs" / cid / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
  with open(out / "summary.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 16
  for field in ("noise_multiplier", "clip_norm", "client_lr", "seed",
                "eval_accuracy", "epsilon", "rounds_completed"):
    assert field in rows[0]
  md = (out / "summary.md").read_text()
  assert md.count("\n| 0") == 16 and "Privacy cost of tuning" in md
  assert grid_sweep.tuning.advice() in md
  for name in ("frontier.png", "learning_curves.png"):
    img = mpl_image.imread(out / name)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.std(img) > 0  # not blank


@pytest.mark.slow
def test_budget_stops_each_configuration_separately_in_chunks():
  # z=0.5 exceeds the budget after one round, z=4 never does. Four configs
  # in chunks of three: the padded second chunk reuses the compilation.
  base = _tiny(epsilon_budget=5.0, stop_at_budget=True)
  result = sweep.run_sweep(base, {"noise_multiplier": [0.5, 4.0],
                                  "seed": [0, 1]},
                           max_configs_per_group=3, tuning=False, **_QUIET)
  (group,) = result.groups
  assert group.num_chunks == 2 and group.num_traces == 1
  for stopped in result.runs[:2]:
    assert stopped.summary["stopped_for_budget"]
    assert 0 < stopped.rounds_completed < 3
    assert stopped.ledger.num_rounds == stopped.rounds_completed
    assert stopped.summary["epsilon"] <= 5.0
  for free in result.runs[2:]:
    assert not free.summary["stopped_for_budget"]
    assert free.rounds_completed == 3 and free.ledger.num_rounds == 3
  # The stopped configuration ran in the first chunk, the last free one in
  # the padded second chunk.
  _assert_same_as_single_run(result.runs[1], result.configs[1])
  _assert_same_as_single_run(result.runs[3], result.configs[3])


def test_budget_without_stop_is_refused_before_running():
  with pytest.raises(ValueError, match="stop_at_budget"):
    sweep.run_sweep(_tiny(epsilon_budget=5.0),
                    {"noise_multiplier": [0.5, 4.0]}, **_QUIET)


def test_tuning_epsilon_is_dp_accounting_repeat_and_select():
  q, z, rounds = 0.1, 2.0, 5
  round_event = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(z))
  weaker = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(4.0))
  t = tuning.tuning_epsilon(
      [[round_event] * rounds, [weaker] * rounds, [round_event] * rounds],
      1e-5, relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE)
  assert t.mean_num_runs == 3 and math.isinf(t.shape)
  assert "dominates" in t.note
  acc = rdp.RdpAccountant()
  acc.compose(dp_event.RepeatAndSelectDpEvent(
      dp_accounting.SelfComposedDpEvent(round_event, rounds), 3.0, math.inf))
  assert t.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
  assert t.epsilon > t.single_run_epsilon


def test_the_tuning_advice_names_the_cheaper_release():
  relation = clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE

  def rounds(z):
    return [dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(z))] * 5

  # Configurations of the same noise: selecting the best is cheaper.
  same = tuning.tuning_epsilon([rounds(2.0)] * 4, 1e-5, relation=relation)
  assert same.epsilon < same.all_released_epsilon
  assert same.advice().startswith("Releasing only the best")
  # One far less private than the rest (a sweep over noise): selection
  # charges every candidate as that one, so releasing all is cheaper.
  mixed = tuning.tuning_epsilon([rounds(2.0)] + [rounds(100.0)] * 3, 1e-5,
                                relation=relation)
  assert mixed.epsilon > mixed.all_released_epsilon
  assert mixed.advice().startswith("Releasing every configuration")
  assert mixed.to_json()["advice"] == mixed.advice()


def test_parse_grid_types_values_like_overrides():
  grid = sweep.parse_grid(
      _tiny(noise_multiplier=None, target_epsilon=3.0),
      ["noise_multiplier=0.5,1", "seed=0,1", "clip_norm=inf",
       "model=logistic,mlp_2nn"])
  assert grid == {"noise_multiplier": [0.5, 1.0], "seed": [0, 1],
                  "clip_norm": [math.inf], "model": ["logistic", "mlp_2nn"]}
  assert all(isinstance(v, float) for v in grid["noise_multiplier"])
  with pytest.raises(ValueError, match="unknown config field"):
    sweep.parse_grid(_tiny(), ["noise=1"])


# A subprocess with 4 simulated devices (~14 s): run by CI with -m slow.
@pytest.mark.slow
def test_sweep_sharded_over_devices_equals_one_device():
  sharded = cpu_devices.run_json("sharded_sweep.py", 4)
  # Six configurations in lanes padded to a multiple of the 4 devices.
  assert sharded["num_devices"] == [4]
  base = _tiny(eval_every=3)
  here = sweep.run_sweep(
      base, {"noise_multiplier": [0.5, 1.0], "seed": [0, 1, 2]}, **_QUIET)
  assert len(here.runs) == len(sharded["params"]) == 6
  for run, params, eps in zip(here.runs, sharded["params"],
                              sharded["epsilons"]):
    flat = np.concatenate([np.ravel(x) for x in
                           jax.tree_util.tree_leaves(run.params)])
    np.testing.assert_allclose(flat, params, atol=1e-5, rtol=0)
    assert run.summary["epsilon"] == pytest.approx(eps, rel=1e-9)


def test_configurations_of_one_seed_never_share_noise():
  # A learning rate of 1e-30 leaves only the noise in each model's change.
  base = _tiny(rounds=1, client_lr=1e-30, model="mlp_2nn",
               model_kwargs={"hidden": [64]}, eval_every=1)
  result = sweep.run_sweep(
      base, {"clip_norm": [0.5, 1.0], "server_lr": [1.0, 0.5]}, tuning=False,
      **_QUIET)
  init = runner.run(base.replace(noise_multiplier=0.0), **_QUIET).params
  changes = [np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                             for a, b in zip(jax.tree_util.tree_leaves(
                                 r.params), jax.tree_util.tree_leaves(init))])
             for r in result.runs]
  d = changes[0].size
  for i in range(4):
    for j in range(i):
      # Independent N(0, 1/d) correlations; shared noise would give ~1.
      assert abs(np.corrcoef(changes[i], changes[j])[0, 1]) < 6 / math.sqrt(
          d), (i, j)
  # Each lane is still its single run.
  _assert_same_as_single_run(result.runs[3], result.configs[3])


# Every mechanism runs in a sweep; each lane equals its single run.
_MECHANISM_SWEEPS = {
    "adaptive": (dict(adaptive_clipping=True, clip_norm=0.5,
                      clip_count_stddev=2.0),
                 {"noise_multiplier": [0.5, 1.0]}),
    "dp_ftrl": (dict(mechanism="tree", sampling="disjoint", accountant="rdp",
                     tree_restart_every=2, rounds=4),
                {"noise_multiplier": [0.5, 1.0]}),
    "band_mf": (dict(mechanism="band_mf", sampling="cyclic",
                     min_separation=2, rounds=4),
                {"noise_multiplier": [0.5, 1.0]}),
    "blt_banded_poisson": (dict(mechanism="blt", sampling="banded_poisson",
                                min_separation=2, cohort_size=None,
                                sampling_probability=0.4, blt_buffers=2,
                                rounds=4),
                           {"clip_norm": [0.5, 1.0]}),
    "local": (dict(noise_placement="local"), {"clip_norm": [0.5, 1.0]}),
    "distributed": (dict(noise_placement="distributed", min_participants=2),
                    {"noise_multiplier": [0.5, 1.0]}),
    "secagg": (dict(noise_placement="distributed", secagg_bits=32,
                    accountant="rdp", min_participants=2),
               {"clip_norm": [0.5, 1.0]}),
    "dp_sgd": (dict(example_clip_norm=1.0, example_noise_multiplier=0.5),
               {"noise_multiplier": [0.5, 1.0]}),
    "dropout": (dict(dropout_rate=0.3), {"noise_multiplier": [0.5, 1.0]}),
}
# The fast subset runs by default; CI's slow selection runs the rest.
_DEFAULT_MECHANISMS = ("adaptive",)


@pytest.mark.parametrize("name", [
    n if n in _DEFAULT_MECHANISMS else pytest.param(
        n, marks=pytest.mark.slow) for n in _MECHANISM_SWEEPS])
def test_every_mechanism_sweeps_equal_to_single_runs(name):
  changes, grid = _MECHANISM_SWEEPS[name]
  base = _tiny(**changes)
  result = sweep.run_sweep(base, grid, tuning=False, **_QUIET)
  assert len(result.groups) == 1 and result.groups[0].num_traces == 1
  finals = set()
  for swept, config in zip(result.runs, result.configs):
    alone = _assert_same_as_single_run(swept, config)
    finals.add(np.asarray(swept.params["Dense_0"]["kernel"]).tobytes())
    for key in ("final_clip_norm", "example_epsilon"):
      assert (key in swept.summary) == (key in alone.summary), key
      if key in alone.summary:
        assert swept.summary[key] == pytest.approx(alone.summary[key],
                                                   rel=1e-5)
  assert len(finals) == len(result.runs)  # the lanes really differ


def test_audit_canaries_are_refused_by_the_plan_in_a_sweep():
  with pytest.raises(ValueError, match="'audit_canaries' must be 0 in a "
                     "sweep"):
    sweep.run_sweep(_tiny(audit_canaries=4), {"seed": [0, 1]}, **_QUIET)
