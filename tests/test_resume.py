"""Kill a run with SIGKILL at random points, resume it, get the same result."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fedjax_dp import checkpoint
from fedjax_dp.privacy import ledger_codec
from fedjax_dp import runner

_SETTINGS = [
    "dataset=synthetic", 'dataset_kwargs={"num_clients": 60, "max_examples": 30}',
    "model=logistic", "rounds=8", "cohort_size=10", "batch_size=10",
    "local_epochs=1", "eval_every=4", "checkpoint_every=1", "delta=0.001",
]


def _cmd(*extra):
  return [sys.executable, "-m", "fedjax_dp.cli", "train", "--no-progress",
          *extra]


def _train_args(run_dir):
  args = ["--run-dir", str(run_dir)]
  for s in _SETTINGS:
    args += ["--set", s]
  return args


def _final_params(run_dir):
  run_dir = pathlib.Path(run_dir)
  config = runner.load_run_config(run_dir)
  from fedjax_dp import simulation  # pylint: disable=g-import-not-at-top
  sim = simulation.build(config)
  step = checkpoint.latest(run_dir / "checkpoints")
  state, meta = checkpoint.restore(run_dir / "checkpoints", step,
                                   {"server": sim.initial_state(config.seed)})
  return step, state["server"].params, meta


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  straight = tmp_path / "straight"
  subprocess.run(_cmd(*_train_args(straight)), check=True, env=env,
                 capture_output=True, timeout=300)

  killed = tmp_path / "killed"
  rng = np.random.default_rng(1234)
  kills = 0
  command = _cmd(*_train_args(killed))
  metrics = killed / "metrics.jsonl"

  def rounds_logged():
    try:
      return len(metrics.read_text().splitlines())
    except FileNotFoundError:
      return 0

  for attempt in range(12):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if attempt < 5:
      # Kill at a random point after a random number of logged rounds: during
      # a round, a metrics write, a checkpoint write or start-up, whatever the
      # machine's speed.
      target = int(rng.integers(0, 8))
      deadline = time.monotonic() + 120
      while (proc.poll() is None and rounds_logged() < target
             and time.monotonic() < deadline):
        time.sleep(0.01)
      time.sleep(float(rng.uniform(0.0, 0.5)))
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills += 1
    code = proc.wait(timeout=300)
    if code == 0:
      break
    command = _cmd("--resume", str(killed))
  assert code == 0
  assert kills >= 3

  step_a, params_a, meta_a = _final_params(straight)
  step_b, params_b, meta_b = _final_params(killed)
  assert step_a == step_b == 8
  for a, b in zip(jax_leaves(params_a), jax_leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  sa = json.loads((straight / "summary.json").read_text())
  sb = json.loads((killed / "summary.json").read_text())
  assert sa["epsilon"] == sb["epsilon"]
  # Each round accounted and logged exactly once.
  ledger_rounds = [json.loads(l)["round"] for l in
                   (killed / "ledger.jsonl").read_text().splitlines()]
  assert ledger_rounds == list(range(8))
  metric_rounds = [json.loads(l)["round"] for l in
                   (killed / "metrics.jsonl").read_text().splitlines()]
  assert metric_rounds == list(range(8))
  assert [e.round for e in ledger_codec.decode_ledger(
      meta_b["ledger"]).entries] == list(range(8))


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.Config(
      name="r", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20}, model="logistic",
      rounds=3, cohort_size=8, eval_every=3, checkpoint_every=2, delta=1e-3)
  first = runner.run(cfg, run_dir=tmp_path, progress=False, log=lambda s: None)
  again = runner.run(runner.load_run_config(tmp_path), run_dir=tmp_path,
                     resume=True, progress=False, log=lambda s: None)
  assert again.ledger.num_rounds == 3
  assert again.summary["epsilon"] == first.summary["epsilon"]
  for a, b in zip(jax_leaves(first.params), jax_leaves(again.params)):
    np.testing.assert_array_equal(a, b)


def test_resume_rejects_a_directory_without_config(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    runner.load_run_config(tmp_path)


def test_a_new_run_never_overwrites_an_existing_run_directory(tmp_path):
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.Config(
      name="r", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20}, model="logistic",
      rounds=2, cohort_size=8, eval_every=2, delta=1e-3)
  runner.run(cfg, run_dir=tmp_path, progress=False, log=lambda s: None)
  before = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(ValueError, match="already holds a run"):
    runner.run(cfg, run_dir=tmp_path, progress=False, log=lambda s: None)
  assert (tmp_path / "metrics.jsonl").read_text() == before


def _resumable_run(tmp_path, **changes):
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.Config(
      name="r", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20}, model="logistic",
      rounds=4, cohort_size=8, eval_every=2, checkpoint_every=2, delta=1e-3,
      **changes)
  runner.run(cfg.replace(rounds=2), run_dir=tmp_path, progress=False,
             log=lambda s: None)
  return cfg


def _files(run_dir):
  return {p.name: p.read_bytes() for p in pathlib.Path(run_dir).iterdir()
          if p.is_file()}


@pytest.mark.parametrize("field,value", [
    ("delta", 1e-4), ("noise_multiplier", 2.0),
    *(pytest.param(f, v, marks=pytest.mark.slow) for f, v in (
        ("seed", 3), ("sampling", "fixed"), ("cohort_size", 9),
        ("clip_norm", 2.0),
        ("dataset_kwargs", {"num_clients": 41, "max_examples": 20})))])
def test_resume_refuses_a_changed_privacy_setting(tmp_path, field, value):
  cfg = _resumable_run(tmp_path)
  extra = {"accountant": "rdp"} if field == "sampling" else {}
  changed = cfg.replace(**{field: value}, **extra)
  before = _files(tmp_path)
  with pytest.raises(ValueError, match=f"--resume.*{field}"):
    runner.run(changed, run_dir=tmp_path, resume=True, progress=False,
               log=lambda s: None)
  assert _files(tmp_path) == before  # nothing written


@pytest.mark.slow
def test_resume_extends_a_run_but_refuses_a_recalibrated_one(tmp_path):
  cfg = _resumable_run(tmp_path / "a")
  # More rounds of the same mechanism: allowed, the ledger is unchanged.
  result = runner.run(cfg, run_dir=tmp_path / "a", resume=True,
                      progress=False, log=lambda s: None)
  assert result.rounds_completed == 4
  # A noise multiplier calibrated to a target epsilon depends on the number
  # of rounds: resuming with more rounds would recalibrate it, and the
  # ledger's recorded rounds would no longer be this run's. Refused.
  cfg = _resumable_run(tmp_path / "b", noise_multiplier=None,
                       target_epsilon=5.0)
  with pytest.raises(ValueError, match="--resume.*(ledger|noise)"):
    runner.run(cfg, run_dir=tmp_path / "b", resume=True, progress=False,
               log=lambda s: None)


@pytest.mark.slow
def test_cli_resume_after_config_json_was_edited_is_one_line_exit_2(
    tmp_path, capsys):
  from fedjax_dp import cli  # pylint: disable=g-import-not-at-top
  _resumable_run(tmp_path)
  path = tmp_path / "config.json"
  data = json.loads(path.read_text())
  data["delta"] = 1e-6
  path.write_text(json.dumps(data))
  assert cli.main(["train", "--resume", str(tmp_path), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "delta" in err and "Traceback" not in err


def _four_round_run(run_dir):
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.Config(
      name="r", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20}, model="logistic",
      rounds=4, cohort_size=8, eval_every=2, checkpoint_every=1, delta=1e-3)
  return cfg, runner.run(cfg, run_dir=run_dir, progress=False,
                         log=lambda s: None)


def _rows(run_dir):
  text = (pathlib.Path(run_dir) / "metrics.jsonl").read_text()
  assert "\x00" not in text
  return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("damage", [
    "cut_short", pytest.param("deleted", marks=pytest.mark.slow)])
def test_resume_rebuilds_metrics_rows_it_no_longer_has(tmp_path, damage):
  cfg, first = _four_round_run(tmp_path)
  want = _rows(tmp_path)
  metrics = tmp_path / "metrics.jsonl"
  if damage == "cut_short":
    # Shorter than the newest checkpoint records: the last row and a half.
    data = metrics.read_bytes()
    metrics.write_bytes(data[:len(data) - len(data.splitlines()[-1]) - 30])
  else:
    metrics.unlink()
  messages = []
  again = runner.run(cfg, run_dir=tmp_path, resume=True, progress=False,
                     log=messages.append)
  assert any("rebuilding the missing rows" in m for m in messages), messages
  got = _rows(tmp_path)
  assert [r["round"] for r in got] == [0, 1, 2, 3]
  assert any("epsilon" in a for a in want)
  for a, b in zip(want, got):
    assert a.get("epsilon") == b.get("epsilon")
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
  assert again.summary["epsilon"] == first.summary["epsilon"]
  for a, b in zip(jax_leaves(first.params), jax_leaves(again.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("damage", [
    "arrays_truncated", pytest.param("manifest_deleted", marks=pytest.mark.slow),
    pytest.param("manifest_garbled", marks=pytest.mark.slow)])
def test_a_damaged_checkpoint_is_reported_and_an_older_one_used(
    tmp_path, damage):
  cfg, first = _four_round_run(tmp_path)
  newest = tmp_path / "checkpoints" / "ckpt_4"
  if damage == "arrays_truncated":
    data = (newest / "arrays.npz").read_bytes()
    (newest / "arrays.npz").write_bytes(data[:len(data) // 2])
  elif damage == "manifest_deleted":
    (newest / "manifest.json").unlink()
  else:
    (newest / "manifest.json").write_text("{not json")
  messages = []
  again = runner.run(cfg, run_dir=tmp_path, resume=True, progress=False,
                     log=messages.append)
  name = "arrays.npz" if damage == "arrays_truncated" else "manifest.json"
  assert any(m.startswith("checkpoint 4 is unusable") and name in m
             for m in messages), messages
  assert any("resuming" in m and "after round 2" in m for m in messages)
  assert [r["round"] for r in _rows(tmp_path)] == [0, 1, 2, 3]
  for a, b in zip(jax_leaves(first.params), jax_leaves(again.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  if damage == "arrays_truncated":
    # Every checkpoint damaged: a clear error naming the file.
    for step in checkpoint.named_steps(tmp_path / "checkpoints"):
      arrays = tmp_path / "checkpoints" / f"ckpt_{step}" / "arrays.npz"
      data = bytearray(arrays.read_bytes())
      data[len(data) // 2] ^= 0xFF
      arrays.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="arrays.npz"):
      runner.run(cfg, run_dir=tmp_path, resume=True, progress=False,
                 log=lambda s: None)


@pytest.mark.slow
def test_sigint_is_one_line_exit_130_and_the_run_resumes(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  run_dir = tmp_path / "run"
  settings = [s.replace("rounds=8", "rounds=40") for s in _SETTINGS]
  args = ["--run-dir", str(run_dir)]
  for s in settings:
    args += ["--set", s]
  proc = subprocess.Popen(_cmd(*args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("fedjax-dp: interrupted at round ")
  assert f"fedjax-dp train --resume {run_dir}" in lines[0]
  done = subprocess.run(_cmd("--resume", str(run_dir)), env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert [r["round"] for r in _rows(run_dir)] == list(range(40))
