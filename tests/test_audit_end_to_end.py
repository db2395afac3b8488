"""The one-shot audit on real runs: detects non-private training, and stays
below the accountant's epsilon when training is private."""

import pytest

from fedjax_dp import cli
from fedjax_dp import config as config_lib
from fedjax_dp import runner


def _config(z, seed):
  # ~18k parameters: canary directions are close to orthogonal, as in the
  # high-dimensional models the method is meant for.
  return config_lib.Config(
      name="audit", dataset="synthetic",
      dataset_kwargs={"num_clients": 100, "max_examples": 30},
      model="mlp_2nn", model_kwargs={"hidden": [256]}, rounds=10,
      cohort_size=None, sampling_probability=0.2, batch_size=10,
      local_epochs=1, eval_every=10, delta=1e-5, noise_multiplier=z,
      clip_norm=1.0, audit_canaries=300, seed=seed)


@pytest.mark.slow
def test_audit_detects_non_private_training():
  result = runner.run(_config(0.0, 0), progress=False, log=lambda s: None)
  a = result.summary["audit"]
  # With 150 canaries per half at a nominal 95%, the thresholding estimate
  # cannot exceed ~3.5 even for a perfect attack; no noise comes close.
  assert a["all_iterates"]["epsilon_threshold_est"] > 2.5
  assert a["final_model"]["epsilon_threshold_est"] > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_estimates_stay_below_accountant_epsilon(seed):
  result = runner.run(_config(1.0, seed), progress=False, log=lambda s: None)
  eps = result.summary["epsilon"]
  assert 3 < eps < 8  # a moderate epsilon
  a = result.summary["audit"]
  for name in ("final_model", "all_iterates"):
    assert a[name]["epsilon_threshold_est"] <= eps


def test_cli_audit_prints_both_epsilons(tmp_path, capsys):
  code = cli.main([
      "audit", "--config", "experiments/digits_dp_fedavg.py", "--smoke",
      "--canaries", "20", "--no-progress", "--run-dir", str(tmp_path)])
  assert code == 0
  out = capsys.readouterr().out
  assert "accountant: epsilon" in out and "epsilon_threshold_est" in out
  # 20 canaries can show at most epsilon ~0.81 at this delta, below the
  # smoke run's ~1.25: the headline says the audit cannot test it.
  assert "can show at most epsilon 0.807" in out
  assert "cannot test that bound" in out


def _audit_summary(epsilon, canaries, ceiling, *estimates):
  return {"epsilon": epsilon, "audit": {
      "canaries": canaries, "largest_threshold_est": ceiling,
      **{name: {"epsilon_threshold_est": e}
         for name, e in zip(("final_model", "all_iterates"), estimates)}}}


def test_an_audit_without_power_says_so():
  lines = cli._audit_power(_audit_summary(2.0, 500, 4.2, 0.0, 0.0))
  assert len(lines) == 1 and "no power" in lines[0]
  # Too few canaries to reach the accountant's epsilon: said too.
  lines = cli._audit_power(_audit_summary(6.0, 500, 4.2, 0.0, 0.0))
  assert len(lines) == 2 and "at most epsilon 4.2" in lines[0]
  # An audit that separated some canaries, under its ceiling: nothing to say.
  assert not cli._audit_power(_audit_summary(2.0, 500, 4.2, 0.0, 0.3))
