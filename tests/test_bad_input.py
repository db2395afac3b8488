"""Bad input at the command line: one line on stderr naming the field or
file, exit status 2, and nothing created or changed on disk."""

import errno
import hashlib
import json
import os
import pathlib

import pytest

from fedjax_dp import checkpoint
from fedjax_dp import cli
from fedjax_dp import config as config_lib
from fedjax_dp import runner

_SMALL = [
    "--set", "dataset=synthetic",
    "--set", 'dataset_kwargs={"num_clients": 30, "max_examples": 10}',
    "--set", "model=logistic", "--set", "cohort_size=5",
    "--set", "rounds=2", "--set", "eval_every=2", "--set", "delta=0.001",
]


def _snapshot(root: pathlib.Path) -> dict:
  """Every path under `root` with its kind and a digest of its bytes."""
  out = {}
  for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    if path.is_dir():
      out[rel] = "dir"
    else:
      out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def _experiment(tmp_path, body: str, suffix: str = ".py") -> str:
  path = tmp_path / "inputs" / f"experiment{suffix}"
  path.write_text(body)
  return str(path)


def _finished_run(tmp_path) -> pathlib.Path:
  run_dir = tmp_path / "inputs" / "run"
  config = config_lib.parse_overrides(config_lib.Config(), _SMALL[1::2])
  runner.run(config.replace(checkpoint_every=1), run_dir=run_dir,
             progress=False, log=lambda s: None)
  return run_dir


def _not_an_object(tmp_path):
  run_dir = _finished_run(tmp_path)
  (run_dir / "config.json").write_text("[1, 2, 3]\n")
  return ["train", "--resume", str(run_dir)]


def _checkpoints_is_a_file(tmp_path):
  run_dir = tmp_path / "inputs" / "new"
  run_dir.mkdir()
  (run_dir / "checkpoints").write_text("not a folder\n")
  return ["train", *_SMALL, "--run-dir", str(run_dir)]


def _run_dir_is_a_file(tmp_path):
  path = tmp_path / "inputs" / "a_file"
  path.write_text("x\n")
  return ["train", *_SMALL, "--run-dir", str(path)]


def _unwritable_run_dir(tmp_path):
  del tmp_path
  # A folder nobody may create folders in, even root: /proc.
  return ["train", *_SMALL, "--run-dir", "/proc/fedjax_dp_test/run"]


# (case id, argv or a function of tmp_path giving it, what the message names)
CASES = [
    ("probability_not_a_number",
     ["train", *_SMALL, "--set", "sampling_probability=abc"],
     "sampling_probability"),
    ("quantile_not_a_number",
     ["train", *_SMALL, "--set", "target_unclipped_quantile=abc"],
     "target_unclipped_quantile"),
    ("unknown_model_argument",
     ["train", *_SMALL, "--set", 'model_kwargs={"bogus": 1}'],
     "model_kwargs"),
    ("model_argument_of_wrong_type",
     ["train", *_SMALL, "--set", "model=mlp_2nn",
      "--set", 'model_kwargs={"hidden": "wide"}'], "model_kwargs"),
    ("file_dataset_without_num_classes",
     ["train", *_SMALL, "--set", "dataset=file",
      "--set", 'dataset_kwargs={"path": "data.npz"}'], "num_classes"),
    ("dataset_argument_of_wrong_type",
     ["train", *_SMALL, "--set", 'dataset_kwargs={"num_clients": "many"}'],
     "num_clients"),
    ("seed_too_large", ["train", *_SMALL, "--set", f"seed={2**70}"], "seed"),
    ("seed_past_32_bits", ["train", *_SMALL, "--set", f"seed={2**32}"],
     "seed"),
    ("batch_too_large", ["train", *_SMALL, "--set", "batch_size=1000000000"],
     "batch_size"),
    ("epochs_too_many", ["train", *_SMALL, "--set", "local_epochs=10000000"],
     "local_epochs"),
    ("too_many_canaries",
     ["train", *_SMALL, "--set", "audit_canaries=1000000000"],
     "audit_canaries"),
    ("unknown_field", ["train", *_SMALL, "--set", "learning_rate=1"],
     "learning_rate"),
    ("override_without_value", ["train", *_SMALL, "--set", "rounds"],
     "field=value"),
    ("config_syntax_error",
     lambda t: ["train", "--config", _experiment(t, "def get_config(:\n")],
     "SyntaxError"),
    ("config_name_error",
     lambda t: ["train", "--config", _experiment(
         t, "def get_config():\n  return undefined_name\n")], "NameError"),
    ("config_getter_raises",
     lambda t: ["train", "--config", _experiment(
         t, "def get_config():\n  raise RuntimeError('no such setup')\n")],
     "no such setup"),
    ("config_unknown_keyword",
     lambda t: ["train", "--config", _experiment(
         t, "from fedjax_dp import config\n"
         "def get_config():\n  return config.Config(bogus=1)\n")], "bogus"),
    ("config_bad_field_value",
     lambda t: ["train", "--config", _experiment(
         t, "from fedjax_dp import config\n"
         "def get_config():\n  return config.Config(rounds=-1)\n")],
     "rounds"),
    ("config_not_python",
     lambda t: ["train", "--config", _experiment(t, "rounds: 3\n", ".yaml")],
     "Python"),
    ("config_binary",
     lambda t: ["train", "--config", _experiment(t, "\x00\x01\x02")],
     "--config"),
    ("config_returns_a_dict",
     lambda t: ["train", "--config", _experiment(
         t, "def get_config():\n  return {'rounds': 3}\n")], "Config"),
    ("config_missing", ["train", "--config", "no_such_experiment.py"],
     "no_such_experiment.py"),
    ("resume_config_not_an_object", _not_an_object, "config.json"),
    ("checkpoints_is_a_file", _checkpoints_is_a_file, "checkpoints"),
    ("run_dir_is_a_file", _run_dir_is_a_file, "a_file"),
    ("run_dir_cannot_be_created", _unwritable_run_dir, "/proc/fedjax_dp_test"),
    ("account_zero_rounds",
     ["account", "--population", "100", "--cohort-size", "10",
      "--noise-multiplier", "1", "--rounds", "0"], "--rounds"),
    ("calibrate_target_below_resolution",
     ["calibrate", "--population", "1000", "--cohort-size", "10",
      "--rounds", "100", "--target-epsilon", "1e-9"], "target_epsilon"),
    ("calibrate_target_needs_no_real_noise",
     ["calibrate", "--population", "1000", "--cohort-size", "10",
      "--rounds", "100", "--target-epsilon", "1e6"], "target_epsilon"),
]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv, names, tmp_path, monkeypatch, capsys):
  (tmp_path / "inputs").mkdir()
  if callable(argv):
    argv = argv(tmp_path)
  # Default run directories ("runs/...") would land here too.
  monkeypatch.chdir(tmp_path)
  capsys.readouterr()
  before = _snapshot(tmp_path)
  code = cli.main([*argv, "--no-progress"] if argv[0] == "train" else argv)
  out, err = capsys.readouterr()
  assert code == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("fedjax-dp: error: "), err
  assert names in lines[0], err
  assert "Traceback" not in out + err
  assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_run_directory_is_one_line_and_unchanged(
    tmp_path, capsys):
  (tmp_path / "inputs").mkdir()
  done = _finished_run(tmp_path)
  before = _snapshot(tmp_path)
  os.chmod(done, 0o555)
  try:
    code = cli.main(["train", "--resume", str(done), "--no-progress"])
    new = cli.main(["train", *_SMALL, "--no-progress", "--run-dir",
                    str(done / "sub")])
  finally:
    os.chmod(done, 0o755)
  err = capsys.readouterr().err
  assert code == new == 2
  assert len(err.strip().splitlines()) == 2 and "Traceback" not in err
  assert _snapshot(tmp_path) == before


def test_full_disk_during_a_checkpoint_loses_nothing(tmp_path, monkeypatch,
                                                     capsys):
  """ENOSPC while a checkpoint is written: one line, exit 2, the earlier
  checkpoint and logs intact, and a resume ends where a run without the
  fault ends."""
  config = config_lib.parse_overrides(config_lib.Config(), _SMALL[1::2])
  config = config.replace(rounds=4, eval_every=2, checkpoint_every=1)
  straight = runner.run(config, run_dir=tmp_path / "straight",
                        progress=False, log=lambda s: None)
  run_dir = tmp_path / "full"
  real_write = checkpoint._write_arrays  # pylint: disable=protected-access
  saves = []

  def write_until_full(path, arrays):
    saves.append(path)
    if len(saves) == 3:
      # Part of the file is written, then the disk is full.
      path.write_bytes(b"PK\x03\x04partial")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    real_write(path, arrays)

  monkeypatch.setattr(checkpoint, "_write_arrays", write_until_full)
  argv = ["train", "--no-progress", "--run-dir", str(run_dir)]
  for assignment in _SMALL[1::2] + ["rounds=4", "checkpoint_every=1"]:
    argv += ["--set", assignment]
  capsys.readouterr()
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0], err
  # Two complete checkpoints; no partial folder; two rows of metrics.
  assert checkpoint.named_steps(run_dir / "checkpoints") == [1, 2]
  assert not [p for p in (run_dir / "checkpoints").iterdir()
              if p.name.startswith(".")]
  rows = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["round"] for r in rows][:2] == [0, 1]
  monkeypatch.setattr(checkpoint, "_write_arrays", real_write)
  assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
  rows = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["round"] for r in rows] == [0, 1, 2, 3]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["epsilon"] == straight.summary["epsilon"]
  assert summary["eval_loss"] == pytest.approx(
      straight.summary["eval_loss"], rel=1e-5)


def test_overrides_are_applied_together(tmp_path, capsys):
  """A config with a fixed multiplier switched to calibration at the
  command line (each --set alone would be invalid)."""
  argv = ["train", "--no-progress", "--json", "--run-dir", str(tmp_path / "r"),
          *_SMALL, "--set", "rounds=1", "--set", "noise_multiplier=null",
          "--set", "target_epsilon=3"]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["epsilon"] <= 3.0
  assert summary["noise_multiplier"] > 0
  # And back: a later assignment of a field wins.
  config = config_lib.parse_overrides(
      config_lib.Config(noise_multiplier=None, target_epsilon=3.0),
      ["target_epsilon=null", "noise_multiplier=2", "noise_multiplier=1.5"])
  assert config.noise_multiplier == 1.5 and config.target_epsilon is None
