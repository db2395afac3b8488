"""End to end: the runner's run directory, the budget, and the CLI."""

import json
import math
import pathlib

import dp_accounting
import pytest

from fedjax_dp import cli
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp.privacy import accounting


def _small(**changes):
  base = config_lib.Config(
      name="tiny", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 40},
      model="logistic", rounds=4, cohort_size=10, batch_size=10,
      noise_multiplier=1.0, local_epochs=1,
      eval_every=2, delta=1e-3)
  return base.replace(**changes)


def test_run_writes_run_directory_and_accounts_every_round(tmp_path):
  result = runner.run(_small(), run_dir=tmp_path, progress=False,
                      log=lambda s: None)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  assert [m["round"] for m in lines] == [0, 1, 2, 3]
  # Evaluation rounds (eval_every=2) and the last report the ledger's
  # epsilon so far; every round is in the ledger.
  assert ["epsilon" in m for m in lines] == [False, True, False, True]
  assert 0 < lines[1]["epsilon"] < lines[3]["epsilon"]
  assert lines[1]["epsilon"] == accounting.epsilon_of(
      result.ledger.events[:2], 1e-3, accountant="pld",
      relation=result.ledger.relation)
  for key in ("train_loss", "fraction_clipped", "update_norm_p50",
              "num_clients"):
    assert key in lines[0]
  assert "eval_accuracy" in lines[1] and "eval_accuracy" in lines[3]
  summary = json.loads((tmp_path / "summary.json").read_text())
  resolved = json.loads((tmp_path / "config.json").read_text())
  assert resolved["rounds"] == 4 and summary["rounds_completed"] == 4
  # The summary's epsilon is dp_accounting's for 4 rounds of the sampler used.
  q = 10 / 48  # 48 training clients (20% of 60 held out)
  assert result.ledger.num_rounds == 4
  acc = dp_accounting.pld.PLDAccountant()
  event = result.ledger.events[0]
  assert isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent)
  assert event.sampling_probability == pytest.approx(q)
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(result.noise_multiplier)), 4)
  assert summary["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
  assert lines[3]["epsilon"] == summary["epsilon"]


def test_cli_account_recomputes_a_runs_epsilon_from_its_ledger(tmp_path,
                                                               capsys):
  result = runner.run(_small(), run_dir=tmp_path, progress=False,
                      log=lambda s: None)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
          .splitlines()]
  assert cli.main(["account", "--run-dir", str(tmp_path), "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] == result.summary["epsilon"]
  assert (out["rounds"], out["delta"], out["accountant"]) == (4, 1e-3, "pld")
  # Any prefix, at another accountant or delta.
  assert cli.main(["account", "--run-dir", str(tmp_path), "--rounds", "2",
                   "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["epsilon"] == rows[1]["epsilon"]
  assert cli.main(["account", "--run-dir", str(tmp_path), "--accountant",
                   "rdp", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["epsilon"] == \
      result.summary["epsilon_rdp"]
  assert cli.main(["account", "--run-dir", str(tmp_path), "--rounds",
                   "5"]) == 2
  assert "--rounds must be an integer in [0, 4]" in capsys.readouterr().err


@pytest.mark.slow
def test_same_seed_same_result_different_seed_different():
  a = runner.run(_small(rounds=2), progress=False, log=lambda s: None)
  b = runner.run(_small(rounds=2), progress=False, log=lambda s: None)
  c = runner.run(_small(rounds=2, seed=1), progress=False, log=lambda s: None)
  wa, wb, wc = (r.params["Dense_0"]["kernel"] for r in (a, b, c))
  assert (wa == wb).all()
  assert not (wa == wc).all()


def test_budget_stops_before_the_round_that_would_exceed_it():
  budget = 1.5
  result = runner.run(_small(rounds=50, epsilon_budget=budget, eval_every=50,
                             stop_at_budget=True),
                      progress=False, log=lambda s: None)
  done = result.rounds_completed
  assert 0 < done < 50
  assert result.summary["stopped_for_budget"]
  assert result.ledger.epsilon() <= budget
  assert result.ledger.epsilon_if(result.ledger.events[0]) > budget


def test_run_planned_past_its_budget_is_refused_before_compute():
  with pytest.raises(ValueError, match="epsilon_budget"):
    runner.run(_small(rounds=50, epsilon_budget=1.5), progress=False,
               log=lambda s: None)


def test_target_epsilon_calibrates_noise():
  result = runner.run(_small(noise_multiplier=None, target_epsilon=2.0),
                      progress=False, log=lambda s: None)
  assert result.summary["epsilon"] <= 2.0
  assert result.summary["epsilon"] == pytest.approx(2.0, rel=0.02)


def test_cli_account_and_calibrate_agree(capsys):
  args = ["--population", "5000", "--cohort-size", "100", "--rounds", "100",
          "--delta", "1e-5", "--json"]
  assert cli.main(["calibrate", *args, "--target-epsilon", "4"]) == 0
  z = json.loads(capsys.readouterr().out)["noise_multiplier"]
  assert cli.main(["account", *args, "--noise-multiplier", str(z)]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["epsilon"] <= 4.0 and out["epsilon"] == pytest.approx(4, rel=0.01)
  assert out["neighbouring_relation"] == "add_or_remove_one"
  assert cli.main(["account", "--population", "5000", "--cohort-size", "100",
                   "--rounds", "10", "--noise-multiplier", "1"]) == 0
  assert "epsilon =" in capsys.readouterr().out


def test_cli_account_of_poisson_sampling_needs_no_population(capsys):
  """Without truncation a Poisson round's event does not depend on the
  population: --q alone accounts it."""
  args = ["account", "--rounds", "100", "--noise-multiplier", "1.1",
          "--json"]
  assert cli.main([*args, "--q", "0.01"]) == 0
  alone = json.loads(capsys.readouterr().out)
  assert cli.main([*args, "--q", "0.01", "--population", "50000",
                   "--capacity", "50000"]) == 0
  assert json.loads(capsys.readouterr().out)["epsilon"] == alone["epsilon"]
  acc = dp_accounting.pld.PLDAccountant()
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      0.01, dp_accounting.GaussianDpEvent(1.1)), 100)
  # dp_accounting's own composition cuts the tails elsewhere: equal to 1e-6
  # (tests/test_pld_composition.py), never below.
  theirs = acc.get_epsilon(1e-5)
  assert theirs <= alone["epsilon"] <= theirs * (1 + 1e-6)
  assert alone["population"] is None and alone["expected_cohort_size"] is None
  # A cohort size (or fixed-size sampling) still needs the population.
  assert cli.main([*args, "--cohort-size", "10"]) == 2
  assert "--population" in capsys.readouterr().err


def test_cli_account_reproduces_published_epsilons(capsys):
  """Two published accountings, as the commands documented in
  docs/reproductions.md run them."""
  # TensorFlow Federated's DP tutorial: EMNIST, 3,383 clients, 120 per
  # round, z = 1.2, 100 rounds, delta 1e-5: epsilon ~1.99 (RDP).
  assert cli.main(["account", "--population", "3383", "--cohort-size", "120",
                   "--rounds", "100", "--noise-multiplier", "1.2", "--delta",
                   "1e-5", "--accountant", "rdp", "--json"]) == 0
  assert round(json.loads(capsys.readouterr().out)["epsilon"], 2) == 1.99
  # Gboard's DP-FTRL: z = 7, one tree of 2,000 rounds, each device at most
  # 6 times at least 313 rounds apart: rho ~0.81, epsilon ~8.90 at 1e-10.
  assert cli.main(["account", "--mechanism", "tree", "--rounds", "2000",
                   "--noise-multiplier", "7", "--max-participations", "6",
                   "--min-separation", "313", "--delta", "1e-10",
                   "--accountant", "rdp", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert round(out["zcdp_rho"], 2) == 0.81 and round(out["epsilon"], 2) == 8.9
  assert out["neighbouring_relation"] == "replace_special"


@pytest.mark.parametrize("argv,field", [
    (["account", "--mechanism", "tree", "--rounds", "20",
      "--noise-multiplier", "1", "--max-participations", "0"],
     "max-participations"),
    (["account", "--population", "100", "--cohort-size", "10", "--rounds", "0",
      "--noise-multiplier", "1"], "rounds"),
    (["account", "--population", "100", "--cohort-size", "10", "--rounds", "5",
      "--noise-multiplier", "-1"], "noise-multiplier"),
    (["account", "--population", "100", "--cohort-size", "200", "--rounds",
      "5", "--noise-multiplier", "1"], "cohort_size"),
    (["account", "--population", "100", "--q", "1.5", "--rounds", "5",
      "--noise-multiplier", "1"], "sampling_probability"),
    (["account", "--population", "100", "--cohort-size", "10", "--rounds", "5",
      "--noise-multiplier", "1", "--delta", "2"], "delta"),
    (["train", "--set", "clip_norm=0"], "clip_norm"),
    (["train", "--set", "dataset=imagenet"], "dataset"),
    (["train", "--rounds", "0"], "rounds"),
])
def test_cli_bad_input_exits_nonzero_naming_the_field(argv, field, capsys):
  assert cli.main(argv) == 2
  assert field in capsys.readouterr().err


_EXPERIMENTS = sorted(
    str(p) for p in pathlib.Path(__file__).resolve().parent.parent.joinpath(
        "experiments").glob("*.py"))


# The default experiment in the default selection; every other one (each
# takes 7-25 s on a 2-core CPU) in the slow selection, which CI runs.
@pytest.mark.parametrize("experiment", [
    pytest.param(e, marks=() if e.endswith("digits_dp_fedavg.py")
                 else pytest.mark.slow) for e in _EXPERIMENTS],
                         ids=lambda p: pathlib.Path(p).stem)
def test_every_experiment_smoke_variant_trains(experiment, tmp_path, capsys):
  code = cli.main(["train", "--config", experiment, "--smoke",
                   "--no-progress", "--run-dir", str(tmp_path)])
  assert code == 0
  out = capsys.readouterr().out
  assert "final held-out accuracy" in out and "epsilon" in out
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rounds_completed"] == summary["rounds_planned"] > 0
  assert math.isfinite(summary["eval_loss"])
  # A record-level DP run's headline shows the guarantee it gives.
  assert ("example-level epsilon" in out) == ("example_epsilon" in summary)


@pytest.mark.slow
def test_default_run_with_moderate_dp_beats_chance_by_far(tmp_path):
  result = runner.run(config_lib.Config(), run_dir=tmp_path, progress=False,
                      log=lambda s: None)
  assert math.isfinite(result.summary["epsilon"])
  assert result.summary["epsilon"] < 10
  # Ten classes: chance is 0.1.
  assert result.summary["eval_accuracy"] > 0.6


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_a_billion_planned_rounds_are_accounted_at_once(accountant, capsys):
  # Planned epsilon is one self-composition, whatever the number of rounds:
  # an O(rounds) plan would exhaust memory here rather than answer.
  config = _small(rounds=10**9, epsilon_budget=1.0, accountant=accountant)
  with pytest.raises(ValueError, match="planned epsilon"):
    runner.run(config, progress=False, log=lambda s: None)
  assert cli.main(["account", "--population", "1000", "--cohort-size", "10",
                   "--noise-multiplier", "100", "--rounds", "1000000000",
                   "--accountant", accountant, "--json"]) == 0
  eps = json.loads(capsys.readouterr().out)["epsilon"]
  # Near 20 for both accountants (privacy/accounting.py's table).
  assert 10 < eps < 40


def _json_commands(tmp):
  data = tmp / "clients.h5"
  from fedjax_dp.data.formats import tff_hdf5  # pylint: disable=g-import-not-at-top
  tff_hdf5.write_tff_hdf5(str(data), ["a", "b"], [
      {"x": [[0.0, 1.0]], "y": [0]}, {"x": [[1.0, 0.0], [0.5, 0.5]],
                                      "y": [1, 0]}])
  return {
      "train": ["train", "--smoke", "--no-progress", "--run-dir",
                str(tmp / "train")],
      "account": ["account", "--q", "0.1", "--rounds", "5",
                  "--noise-multiplier", "1"],
      "calibrate": ["calibrate", "--population", "1000", "--cohort-size",
                    "50", "--rounds", "5", "--target-epsilon", "4"],
      "data inspect": ["data", "inspect", str(data)],
      "audit": ["audit", "--smoke", "--no-progress", "--run-dir",
                str(tmp / "audit")],
      "sweep": ["sweep", "--smoke", "--grid", "noise_multiplier=0.5,1",
                "--no-progress", "--run-dir", str(tmp / "sweep")],
  }


@pytest.mark.parametrize("command", [
    "train", "account", "calibrate", "data inspect",
    pytest.param("audit", marks=pytest.mark.slow),
    pytest.param("sweep", marks=pytest.mark.slow)])
def test_json_flag_prints_nothing_but_json(command, tmp_path, capsys):
  argv = _json_commands(tmp_path)[command] + ["--json"]
  assert cli.main(argv) == 0
  captured = capsys.readouterr()
  out = json.loads(captured.out)  # the whole of stdout
  assert isinstance(out, dict) and out
  if command in ("train", "audit", "sweep"):
    # Progress lines went to stderr; the run directory is in the JSON.
    assert out["run_dir"] == argv[argv.index("--run-dir") + 1]
    assert "run directory" not in captured.out and captured.err
    # --smoke means the same for every command: the default's 3 rounds.
    runs = out["configs"] if command == "sweep" else [out]
    assert [r["rounds_completed"] for r in runs] == [
        config_lib.SMOKE_ROUNDS] * len(runs)
