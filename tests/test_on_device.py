"""Several rounds per compiled call (on_device.py) vs host loop."""

import json
import shutil

import jax
import numpy as np
import pytest

from fedjax_dp import checkpoint
from fedjax_dp import config as config_lib
from fedjax_dp import on_device
from fedjax_dp import runner
from fedjax_dp import simulation
from fedjax_dp.privacy import accounting

QUIET = {"progress": False, "log": lambda s: None}


def _config(**changes):
  # Several local steps and two epochs (clients hold up to 40 examples, in
  # batches of 8): the two paths place every example alike. Adaptive
  # clipping checks that the clip norm is carried from round to round.
  base = config_lib.Config(
      name="on_device", dataset="synthetic",
      dataset_kwargs={"num_clients": 25, "max_examples": 40},
      model="logistic", rounds=7, cohort_size=5, batch_size=8,
      local_epochs=2, noise_multiplier=1.0, adaptive_clipping=True,
      clip_count_stddev=2.0, capacity=20,
      eval_every=3, checkpoint_every=2, delta=1e-3)
  return base.replace(**changes)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The host loop and rounds_per_call=4 on one config: 7 rounds, eval every
  3, so calls [0, 3), [3, 6) (cut at eval rounds: 3 is the scan's length)
  and [6, 7) (the run's remainder, masked). Also counts the multi-round
  function's traces."""
  host = runner.run(_config(), **QUIET)
  run_dir = tmp_path_factory.mktemp("on_device")
  traces = []
  build = on_device.build_multi_round

  def counted(sim):
    multi_round = build(sim)

    def traced(*args, **kwargs):
      traces.append(kwargs["num_rounds"])
      return multi_round(*args, **kwargs)

    return traced

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(on_device, "build_multi_round", counted)
    device = runner.run(_config(rounds_per_call=4), run_dir=run_dir, **QUIET)
  return host, device, run_dir, traces


def test_cohorts_and_blocks_equal_the_host_path():
  # Several steps per epoch, two epochs and a cap of 100 examples (clients
  # hold 51-200): the host's block, example for example; each slot's epoch
  # holds all of a client's examples when it has at most 100, else a
  # subset of 100 of them, the same in both epochs.
  cap = 100
  cfg = _config(dataset_kwargs={"num_clients": 60, "max_examples": 200},
                batch_size=16, local_epochs=2, max_examples_per_client=cap,
                adaptive_clipping=False)
  sim = simulation.build(cfg)
  population = on_device.device_population(sim)
  streams = sim.streams()
  keys = on_device.multi_round_keys(streams)
  cohort_block = jax.jit(on_device.build_cohort_block(sim))
  sample_fn = jax.jit(sim.plan.sampler.sample_round)
  sizes = sim.train.num_examples
  assert sizes.min() <= cap < sizes.max(), sizes
  for r in range(3):
    host, num_drawn, _, _ = sim.prepare(r, streams, sample_fn)
    indices, valid, _ = jax.device_get(sample_fn(keys.sample, r))
    device, device_drawn = jax.device_get(cohort_block(population, keys, r))
    assert int(device_drawn) == num_drawn
    np.testing.assert_array_equal(device.client_mask, host.client_mask)
    np.testing.assert_array_equal(device.example_mask, host.example_mask)
    for name in host.features:
      np.testing.assert_array_equal(device.features[name],
                                    host.features[name])
    assert host.client_mask.sum() > 0
    for slot, client in enumerate(indices[valid]):
      every_row = sim.train.client(client)["x"]
      steps = -(-min(sizes[client], cap) // cfg.batch_size)  # per epoch
      epochs = []
      for e in range(cfg.local_epochs):
        part = slice(e * steps, (e + 1) * steps)
        mask = device.example_mask[slot, part]
        b = device.features["x"][slot, part][mask]
        b = b[np.lexsort(b.T)]
        if sizes[client] <= cap:
          np.testing.assert_array_equal(b, every_row[np.lexsort(every_row.T)])
        epochs.append(b)
      np.testing.assert_array_equal(epochs[0], epochs[1])
      assert {tuple(x) for x in epochs[0]} <= {tuple(x) for x in every_row}
      assert len({tuple(x) for x in epochs[0]}) == min(sizes[client], cap)
    # Padding is zeros, and masked away.
    assert not device.features["x"][~device.example_mask].any()


def test_k_rounds_equal_the_host_loop(runs):
  host, device, _, _ = runs
  for a, b in zip(_leaves(host.params), _leaves(device.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert [(e.round, e.event) for e in device.ledger.entries] == \
      [(e.round, e.event) for e in host.ledger.entries]
  assert device.summary["epsilon"] == host.summary["epsilon"]
  for a, b in zip(host.history, device.history):
    assert b["round"] == a["round"]
    assert b["num_drawn"] == a["num_drawn"]
    assert b["num_clients"] == a["num_clients"]
    assert b.get("epsilon") == a.get("epsilon")
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert b["clip_norm"] == pytest.approx(a["clip_norm"], rel=1e-5)
    assert ("eval_accuracy" in b) == ("eval_accuracy" in a)
    if "eval_accuracy" in a:
      assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_run_dir_holds_every_round_once_and_the_final_eval(runs):
  _, device, run_dir, _ = runs
  metrics = _lines(run_dir / "metrics.jsonl")
  assert [m["round"] for m in metrics] == list(range(7))
  assert [m["round"] for m in metrics if "eval_accuracy" in m] == [2, 5, 6]
  assert [l["round"] for l in _lines(run_dir / "ledger.jsonl")] == \
      list(range(7))
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["rounds_completed"] == 7 and "eval_accuracy" in summary
  # Checkpoints at the ends of calls that hold a checkpoint round (3, 6 and
  # 7; the newest two are kept).
  assert checkpoint.all_steps(run_dir / "checkpoints") == [6, 7]
  assert device.rounds_completed == 7


def test_multi_round_compiles_once_for_every_call(runs):
  # Three calls of 3, 3 and 1 rounds: one trace (so one compilation) of a
  # scan of 3 rounds.
  traces = runs[3]
  assert traces == [3]


def test_resume_replays_the_rounds_after_the_checkpoint(runs, tmp_path):
  _, device, run_dir, _ = runs
  crashed = tmp_path / "crashed"
  shutil.copytree(run_dir, crashed)
  # As if killed during the last call, after its events were recorded.
  step_dir = checkpoint._step_dir  # pylint: disable=protected-access
  shutil.rmtree(step_dir(crashed / "checkpoints", 7))
  (crashed / "summary.json").unlink()
  resumed = runner.run(runner.load_run_config(crashed), run_dir=crashed,
                       resume=True, **QUIET)
  for a, b in zip(_leaves(device.params), _leaves(resumed.params)):
    np.testing.assert_array_equal(b, a)
  assert [m["round"] for m in _lines(crashed / "metrics.jsonl")] == \
      list(range(7))
  assert [l["round"] for l in _lines(crashed / "ledger.jsonl")] == \
      list(range(7))
  assert resumed.summary["epsilon"] == device.summary["epsilon"]


def test_stop_at_budget_stops_before_the_same_round(runs):
  host, _, _, _ = runs
  # A budget between the epsilons after rounds 3 and 4: the host loop would
  # stop before round 4, inside the second call.
  eps = [accounting.epsilon_of(host.ledger.events[:n], host.ledger.delta,
                               accountant=host.ledger.accountant,
                               relation=host.ledger.relation)
         for n in range(1, 8)]
  budget = (eps[3] + eps[4]) / 2
  result = runner.run(_config(rounds_per_call=4, epsilon_budget=budget,
                              stop_at_budget=True), **QUIET)
  assert result.rounds_completed == 4
  assert result.summary["stopped_for_budget"]
  assert [e.round for e in result.ledger.entries] == [0, 1, 2, 3]
  assert result.summary["epsilon"] == eps[3]


def test_bad_configs_name_the_field():
  for bad in (0, -1, 2.0, True, "2"):
    with pytest.raises(ValueError, match="'rounds_per_call'"):
      _config(rounds_per_call=bad)
  with pytest.raises(ValueError, match="'audit_canaries'.*rounds_per_call"):
    _config(rounds_per_call=2, audit_canaries=4)
  with pytest.raises(ValueError, match="'dropout_rate'.*rounds_per_call"):
    _config(rounds_per_call=2, dropout_rate=0.1)
  with pytest.raises(ValueError, match="'shard_clients'.*rounds_per_call"):
    _config(rounds_per_call=2, shard_clients=True)
  # The host loop still takes them.
  _config(audit_canaries=4, dropout_rate=0.1)
  sim = simulation.build(_config(rounds_per_call=2))
  with pytest.raises(ValueError, match="'rounds_per_call'.*MiB"):
    on_device.device_population(sim, memory_budget_bytes=1000)
  # Called directly, the builder refuses what the config would have.
  with pytest.raises(ValueError, match="'audit_canaries'"):
    on_device.build_multi_round(simulation.build(_config(audit_canaries=2)))


@pytest.mark.parametrize("changes", [
    # DP-FTRL: the tree state comes from the traced round index; two trees.
    # (About 20 s each on a loaded 2-core machine, hence slow: CI runs them.)
    pytest.param(dict(mechanism="tree", sampling="disjoint", accountant="rdp",
                      tree_restart_every=2, capacity=None), id="tree",
                 marks=pytest.mark.slow),
    # Secure aggregation's arguments reach the round.
    pytest.param(dict(noise_placement="distributed", secagg_bits=20,
                      accountant="rdp", noise_multiplier=8.0), id="secagg",
                 marks=pytest.mark.slow),
    # Client-side noise: each slot's own key on the device as on the host.
    pytest.param(dict(noise_placement="local"), id="local",
                 marks=pytest.mark.slow),
    pytest.param(dict(noise_placement="distributed", min_participants=2),
                 id="distributed", marks=pytest.mark.slow),
    # Record-level DP-SGD inside each client.
    pytest.param(dict(example_clip_norm=1.0, example_noise_multiplier=0.5),
                 id="dp_sgd", marks=pytest.mark.slow),
])
def test_other_mechanisms_equal_the_host_loop(changes):
  cfg = _config(rounds=4, eval_every=4, adaptive_clipping=False, **changes)
  host = runner.run(cfg, **QUIET)
  device = runner.run(cfg.replace(rounds_per_call=4), **QUIET)
  for a, b in zip(_leaves(host.params), _leaves(device.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert [(e.round, e.event) for e in device.ledger.entries] == \
      [(e.round, e.event) for e in host.ledger.entries]
  for name in ("tree_index", "tree_step", "secagg_wrapped"):
    assert [m.get(name) for m in device.history] == \
        [m.get(name) for m in host.history]
