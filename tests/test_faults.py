"""Faults: dropout, non-finite client updates, a diverging model."""

import json
import math

import jax
import numpy as np
import pytest

from fedjax_dp import cli
from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp import tree_util
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.data import blocks


def _small(**changes):
  return config_lib.Config(
      name="faults", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=3, cohort_size=12, batch_size=10,
      local_epochs=1, eval_every=3, delta=1e-3, noise_multiplier=1.0
  ).replace(**changes)


def test_dropout_removes_clients_but_not_accounting():
  base = runner.run(_small(), progress=False, log=lambda s: None)
  dropped = runner.run(_small(dropout_rate=0.5), progress=False,
                       log=lambda s: None)
  # The two runs draw independent cohorts (dropout changes what a run
  # computes, so it has its own random streams); within each round the
  # clients that report are those drawn minus those that dropped out.
  assert sum(b["num_dropped"] for b in dropped.history) > 0
  for b in dropped.history:
    assert not b["truncated"] and b["num_nonfinite"] == 0
    assert b["num_clients"] == b["num_drawn"] - b["num_dropped"]
  # Dropout is post-sampling randomness: the recorded events are unchanged.
  assert dropped.ledger.events == base.ledger.events
  assert dropped.summary["epsilon"] == base.summary["epsilon"]


def test_nonfinite_client_updates_are_neutralised_and_counted():
  model = registry.get_model("logistic", (4,), 3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 2, 3, 4)).astype(np.float32)
  y = rng.integers(0, 3, (4, 2, 3)).astype(np.int32)
  mask = np.ones((4, 2, 3), bool)
  opt = server_lib.server_optimizer("sgd")
  fn = jax.jit(dp_fedavg.build_round(model, client_lib.client_optimizer("sgd"),
                                     opt))
  params = model.init(jax.random.key(0))
  hp = dp_fedavg.RoundHparams.create(client_lr=0.1, server_lr=1.0,
                                     clip_norm=1.0, noise_multiplier=0.0,
                                     denominator=4.0)
  poisoned = x.copy()
  poisoned[1, 0, 0, 0] = np.nan
  poisoned[3, 1, 2, 1] = np.inf
  state_bad, metrics_bad = fn(
      server_lib.init(params, opt),
      blocks.ClientBlock({"x": poisoned, "y": y}, mask,
                            np.ones((4,), bool)), hp, jax.random.key(1))
  # The same round with the two poisoned clients masked out.
  state_ref, _ = fn(
      server_lib.init(params, opt),
      blocks.ClientBlock({"x": x, "y": y}, mask,
                            np.array([True, False, True, False])), hp,
      jax.random.key(1))
  assert int(metrics_bad["num_nonfinite"]) == 2
  assert int(metrics_bad["num_clients"]) == 2
  assert bool(tree_util.tree_all_finite(state_bad.params))
  for a, b in zip(jax.tree_util.tree_leaves(state_bad.params),
                  jax.tree_util.tree_leaves(state_ref.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_diverging_model_stops_with_a_clear_error(tmp_path):
  # Client updates that overflow are neutralised, so drive the server step
  # itself past float32: noise of std ~4 times a server learning rate of 1e38.
  config = _small(server_lr=1e38, clip_norm=10.0, noise_multiplier=5.0,
                  rounds=5)
  with pytest.raises(runner.ModelDivergedError, match="non-finite"):
    runner.run(config, run_dir=tmp_path, progress=False, log=lambda s: None)
  # Rounds written before the failure are kept.
  assert (tmp_path / "metrics.jsonl").exists()
  assert (tmp_path / "config.json").exists()


@pytest.mark.slow
def test_cli_reports_divergence_and_exits_nonzero(tmp_path, capsys):
  code = cli.main([
      "train", "--config", "experiments/digits_dp_fedavg.py", "--smoke",
      "--no-progress", "--run-dir", str(tmp_path),
      "--set", "server_lr=1e38", "--set", "clip_norm=10",
      "--set", "noise_multiplier=5"])
  assert code == 2
  assert "non-finite" in capsys.readouterr().err


def test_dropout_rate_is_validated():
  with pytest.raises(ValueError, match="'dropout_rate'"):
    _small(dropout_rate=1.0)


def test_an_empty_poisson_draw_is_a_noise_only_round():
  """Poisson sampling may draw nobody; that round still runs (and is
  accounted): the sum is empty and only the noise moves the model."""
  config = config_lib.Config(
      name="empty", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 20},
      model="logistic", rounds=6, cohort_size=1, batch_size=10,
      local_epochs=1, eval_every=6, noise_multiplier=1.0)
  result = runner.run(config, progress=False, log=lambda s: None)
  drawn = [h["num_drawn"] for h in result.history]
  # P(nobody in a round) = (1 - 1/n)^n, about 0.37, for n training clients.
  assert 0 in drawn and len(drawn) == 6
  assert result.ledger.num_rounds == 6
  empty = [h for h in result.history if h["num_drawn"] == 0]
  assert all(h["num_clients"] == 0 and h["clipped_sum_norm"] == 0
             for h in empty)


def test_a_run_whose_clients_all_diverge_stops_instead_of_succeeding(
    tmp_path, capsys):
  # Every client's local training overflows from the first round on, while
  # the global model (whose updates are all excluded) stays finite.
  config = _small(client_lr=1e30, rounds=20, eval_every=5)
  with pytest.raises(runner.TrainingFailedError,
                     match="max_failed_rounds"):
    runner.run(config, run_dir=tmp_path / "a", progress=False,
               log=lambda s: None)
  rows = [json.loads(line) for line in
          (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  # Stopped at the third failed round; no made-up loss of 0.
  assert [r["round"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert r["num_clients"] == 0 and r["num_nonfinite"] > 0
    assert math.isnan(r["train_loss"])
  # From the command line: one line, exit 2.
  code = cli.main(["train", "--no-progress", "--run-dir", str(tmp_path / "b"),
                   "--set", "dataset=synthetic", "--set",
                   'dataset_kwargs={"num_clients": 60, "max_examples": 30}',
                   "--set", "model=logistic", "--set", "cohort_size=12",
                   "--set", "client_lr=1e30", "--set", "rounds=20"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "failed rounds" in err[0]


def test_failed_rounds_are_counted_when_the_policy_is_off():
  result = runner.run(_small(client_lr=1e30, max_failed_rounds=None),
                      progress=False, log=lambda s: None)
  assert result.summary["failed_rounds"] == 3
  assert all(math.isnan(m["train_loss"]) for m in result.history)


def test_failed_round_reason():
  assert runner.failed_round_reason(
      {"num_clients": 0, "num_nonfinite": 3}) is not None
  assert runner.failed_round_reason(
      {"num_clients": 2, "num_nonfinite": 3, "eval_loss": float("nan")})
  # An empty round (nobody drawn) has nothing to fail.
  assert runner.failed_round_reason(
      {"num_clients": 0, "num_nonfinite": 0}) is None
  assert runner.failed_round_reason(
      {"num_clients": 4, "num_nonfinite": 1, "eval_loss": 1.5}) is None


def test_the_loss_watch_warns_once_when_a_loss_explodes():
  watch = runner.LossWatch()
  assert watch.check(0, {"train_loss": 1.0}) is None
  assert watch.check(1, {"train_loss": 0.3, "eval_loss": 0.9}) is None
  # One noisy round of training loss is not an explosion (the default
  # experiment's rounds range over 0.25-1.6) ...
  assert watch.check(2, {"train_loss": 2.5}) is None
  # ... but the held-out loss doubling is.
  warning = watch.check(3, {"train_loss": 0.5, "eval_loss": 1.9})
  assert "round 3: eval_loss 1.9 is over 2x its lowest, 0.9 at round 1" in \
      warning
  assert watch.exploded_at == 3
  assert watch.check(4, {"train_loss": 9.0, "eval_loss": 9.0}) is None
  assert runner.LossWatch().check(0, {"train_loss": float("nan")}) is None
  # Training losses whose recent average passes twice the first round's.
  watch = runner.LossWatch()
  for r, loss in enumerate([1.0, 1.5, 2.0, 3.0]):
    assert watch.check(r, {"train_loss": loss}) is None
  assert "the last 5 rounds, 2.1 on average, is over 2x the first round's" \
      in watch.check(4, {"train_loss": 3.0})


def test_a_run_whose_loss_explodes_warns_and_says_so_in_its_summary(capsys):
  # A server step 10x the default: the training loss climbs from ~1.4 to
  # ~6.6 by round 2 while the model stays finite.
  cfg = config_lib.default_smoke_config().replace(
      rounds=4, eval_every=4, server_lr=10.0, noise_multiplier=0.5)
  lines = []
  result = runner.run(cfg, progress=False, log=lines.append)
  assert any("warning: round" in l and "training is diverging" in l
             for l in lines)
  at = result.summary["loss_exploded_at_round"]
  # The first round whose training loss, averaged over the last 5 rounds,
  # passes twice the first round's (the one held-out eval, at the last
  # round, has no lower one to compare with).
  losses = [row["train_loss"] for row in result.history]
  expected = next(r for r in range(len(losses))
                  if np.mean(losses[max(0, r - 4):r + 1]) > 2 * losses[0])
  assert at == expected
  assert any(f"warning: round {at}:" in l for l in lines)
  cli._print_summary(result.summary, False, "d")
  assert f"the loss exploded at round {at}" in capsys.readouterr().out
