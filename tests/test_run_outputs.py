"""What a run directory holds for people: TensorBoard events, metrics.csv,
plots; `fedjax-dp report`; a sweep's results over seeds."""

import csv
import errno
import json
import logging
import math
import os
import pathlib
import shutil
import struct

import numpy as np
import pytest
from matplotlib import image as mpl_image
from tensorboardX import crc32c
from tensorboardX.proto import event_pb2

from fedjax_dp import cli
from fedjax_dp import config as config_lib
from fedjax_dp import reports
from fedjax_dp import run_outputs
from fedjax_dp import runner
from fedjax_dp import sweep

_QUIET = {"progress": False, "log": lambda s: None}
_PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def _tiny(**changes):
  # z < 1: adaptive clipping's count noise (cohort / 20) must leave some of
  # the noise for the update.
  base = config_lib.Config(
      name="tiny", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=4, cohort_size=10, batch_size=10,
      noise_multiplier=0.5, local_epochs=1, eval_every=1,
      checkpoint_every=2, delta=1e-3)
  return base.replace(**changes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two finished runs of one name: a fixed clip and an adaptive one."""
  root = tmp_path_factory.mktemp("runs")
  fixed = runner.run(_tiny(), run_dir=root / "a", **_QUIET)
  adaptive = runner.run(_tiny(adaptive_clipping=True), run_dir=root / "b",
                        **_QUIET)
  return root, fixed, adaptive


def _rows(run_dir) -> list[dict]:
  return [json.loads(line) for line in
          (run_dir / "metrics.jsonl").read_text().splitlines()]


def _masked_crc(data: bytes) -> int:
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def _records(path: pathlib.Path):
  """The records of a TFRecord file: 8-byte length, its masked CRC-32C, the
  data, its masked CRC-32C (checked, as TensorBoard checks them). A record
  cut short (a killed writer) ends it."""
  data = path.read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    end = pos + 12 + length + 4
    if end > len(data):
      return
    record = data[pos + 12:pos + 12 + length]
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == \
        _masked_crc(header), path
    assert struct.unpack("<I", data[end - 4:end])[0] == \
        _masked_crc(record), path
    yield record
    pos = end


def _scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value)] as TensorBoard shows them: event files in name
  order, and a SessionLog START at step s (tensorboardX's `purge_step`)
  hides the steps >= s read before it."""
  scalars = {}
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert files, f"no event files in {logdir}"
  for path in files:
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      if (event.HasField("session_log") and
          event.session_log.status == event_pb2.SessionLog.START):
        for tag, points in scalars.items():
          scalars[tag] = [(s, v) for s, v in points if s < event.step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step,
                                                  value.simple_value))
  return scalars


def _purge_steps(logdir: pathlib.Path) -> list[int]:
  return [event.step
          for path in sorted(logdir.glob("events.out.tfevents.*"))
          for event in map(event_pb2.Event.FromString, _records(path))
          if event.HasField("session_log")]


def _assert_tensorboard_equals_metrics(run_dir: pathlib.Path) -> None:
  rows = _rows(run_dir)
  scalars = _scalars(run_dir / "tensorboard")
  for key in ("eval_accuracy", "train_loss", "epsilon"):
    # Step = rounds completed (round + 1), each step once; float32 values.
    want = [(r["round"] + 1, r[key]) for r in rows if key in r]
    got = scalars[key]
    assert [s for s, _ in got] == [s for s, _ in want], key
    assert [v for _, v in got] == pytest.approx([v for _, v in want],
                                                rel=1e-6), key


def _assert_png(path: pathlib.Path) -> None:
  assert path.read_bytes()[:8] == _PNG_HEADER, path
  img = mpl_image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert np.std(img) > 0  # not blank


def test_tensorboard_scalars_are_the_metrics_rows(runs):
  root, fixed, _ = runs
  _assert_tensorboard_equals_metrics(root / "a")
  scalars = _scalars(root / "a" / "tensorboard")
  assert [v for _, v in scalars["eval_accuracy"]] == pytest.approx(
      [r["eval_accuracy"] for r in fixed.history], rel=1e-6)
  # Numbers only: the round is the step, a boolean is no scalar.
  assert "round" not in scalars and "truncated" not in scalars
  assert "clip_norm" in _scalars(root / "b" / "tensorboard")


def _csv_rows(path: pathlib.Path):
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _assert_csv_equals_metrics(run_dir: pathlib.Path) -> None:
  rows = _rows(run_dir)
  header, table = _csv_rows(run_dir / "metrics.csv")
  assert header[0] == "round"
  assert set(header) == set().union(*rows)
  assert len(table) == len(rows)
  for row, line in zip(rows, table):
    for key in header:
      value, cell = row.get(key), line[key]
      if value is None:
        assert cell == "", key
      elif isinstance(value, bool) or isinstance(value, str):
        assert cell == str(value), key
      elif isinstance(value, float) and math.isnan(value):
        assert math.isnan(float(cell)), key
      else:
        assert float(cell) == value, key  # exactly: floats as repr


def test_metrics_csv_is_metrics_jsonl(runs):
  root, _, _ = runs
  for name in ("a", "b"):
    _assert_csv_equals_metrics(root / name)
  _, table = _csv_rows(root / "a" / "metrics.csv")
  assert [int(line["round"]) for line in table] == [0, 1, 2, 3]


def test_plots_are_written(runs):
  root, _, _ = runs
  for name in ("accuracy.png", "loss.png", "epsilon.png"):
    _assert_png(root / "a" / name)
    _assert_png(root / "b" / name)
  # A fixed clip has no trajectory to plot; an adaptive one has.
  assert not (root / "a" / "clip_norm.png").exists()
  _assert_png(root / "b" / "clip_norm.png")


def test_a_resumed_run_shows_each_round_once(tmp_path):
  config = _tiny()
  runner.run(config, run_dir=tmp_path, **_QUIET)
  # As if the run had died before its last checkpoint: rounds 2 and 3 are
  # replayed from the checkpoint after round 1.
  shutil.rmtree(tmp_path / "checkpoints" / "ckpt_4")
  kept_elapsed = _rows(tmp_path)[1]["elapsed_s"]
  resumed = runner.run(config, run_dir=tmp_path, resume=True, **_QUIET)
  assert [r["round"] for r in _rows(tmp_path)] == [0, 1, 2, 3]
  # The clock goes on from the kept rows instead of starting again at 0.
  elapsed = [r["elapsed_s"] for r in _rows(tmp_path)]
  assert elapsed == sorted(elapsed) and elapsed[2] > kept_elapsed
  assert resumed.summary["wall_time_s"] > elapsed[3] > kept_elapsed
  _assert_csv_equals_metrics(tmp_path)
  _, table = _csv_rows(tmp_path / "metrics.csv")
  assert [int(line["round"]) for line in table] == [0, 1, 2, 3]
  # Two event files; the second hides steps 3 and 4 of the first.
  assert len(list((tmp_path / "tensorboard").iterdir())) == 2
  assert _purge_steps(tmp_path / "tensorboard") == [3]
  _assert_tensorboard_equals_metrics(tmp_path)


def test_failing_views_never_break_the_run(tmp_path, monkeypatch, caplog):
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top

  def broken(*args, **kwargs):
    raise RuntimeError("broken on purpose")

  monkeypatch.setattr(run_outputs, "pyplot", broken)
  monkeypatch.setattr(run_outputs, "csv_text", broken)
  monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", broken)
  with caplog.at_level(logging.WARNING, logger=run_outputs.__name__):
    result = runner.run(_tiny(), run_dir=tmp_path, **_QUIET)
  assert result.rounds_completed == 4
  assert _rows(tmp_path) == json.loads(json.dumps(result.history))
  assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 4
  assert (tmp_path / "checkpoints" / "ckpt_4").is_dir()
  assert json.loads((tmp_path / "summary.json").read_text())[
      "rounds_completed"] == 4
  assert not list(tmp_path.glob("*.png"))
  assert not (tmp_path / "metrics.csv").exists()
  warned = " ".join(r.getMessage() for r in caplog.records)
  for what in ("TensorBoard events", "metrics.csv", "plots"):
    assert f"could not write {what}" in warned, warned


def test_a_full_disk_stops_the_events_without_stopping_the_run(
    tmp_path, monkeypatch, caplog):
  from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
  log = run_outputs.TensorBoardLog(tmp_path)
  real_write = event_file_writer.EventsWriter.write_event
  written = []

  def fill_up(self, event):
    if written:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    written.append(event.step)
    return real_write(self, event)

  monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", fill_up)
  with caplog.at_level(logging.WARNING, logger=run_outputs.__name__):
    for r in range(5):  # returns at once: nothing waits on a dead thread
      log.add({"round": r, "train_loss": 1.0})
    log.close()
  assert written == [1]
  assert sum("could not write TensorBoard events" in r.getMessage()
             for r in caplog.records) == 1
  assert _scalars(tmp_path) == {"train_loss": [(1, 1.0)]}


def test_report_compares_runs(runs, tmp_path, capsys):
  root, fixed, adaptive = runs
  out = tmp_path / "out"
  assert cli.main(["report", str(root / "a"), str(root / "b"), "--out",
                   str(out)]) == 0
  text = capsys.readouterr().out
  # One name twice: told apart by directory.
  assert "tiny (a)" in text and "tiny (b)" in text
  assert f"{fixed.summary['eval_accuracy']:.4g}" in text
  assert f"{adaptive.summary['epsilon']:.4g}" in text
  for name in ("accuracy", "loss", "epsilon"):
    _assert_png(out / f"report_{name}.png")


def test_report_json_is_all_of_stdout(runs, tmp_path, capsys):
  root, fixed, _ = runs
  # A run that did not finish: its last rows stand in for the summary.
  crashed = tmp_path / "crashed"
  shutil.copytree(root / "a", crashed)
  (crashed / "summary.json").unlink()
  assert cli.main(["report", str(root / "a"), str(crashed), "--out",
                   str(tmp_path), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  finished, unfinished = result["runs"]
  assert finished["eval_accuracy"] == fixed.summary["eval_accuracy"]
  assert finished["epsilon"] == fixed.summary["epsilon"]
  assert finished["noise_multiplier"] == 0.5 and finished["delta"] == 1e-3
  assert unfinished["rounds"] == 4 and "unfinished" in unfinished["status"]
  assert unfinished["eval_accuracy"] == fixed.history[-1]["eval_accuracy"]
  assert unfinished["epsilon"] == fixed.history[-1]["epsilon"]
  # The copy is the same configuration: one row, its finished run's.
  (by_config,) = result["by_config"]
  assert (by_config["num_runs"], by_config["num_finished"]) == (2, 1)
  assert by_config["eval_accuracy_mean"] == fixed.summary["eval_accuracy"]
  assert sorted(pathlib.Path(f).name for f in result["files"]) == [
      "report_accuracy.png", "report_by_config.png", "report_epsilon.png",
      "report_loss.png"]
  for f in result["files"]:
    _assert_png(pathlib.Path(f))


def test_report_groups_runs_that_differ_only_in_their_seed(
    runs, tmp_path, capsys):
  root, fixed, adaptive = runs
  fixed_1 = runner.run(_tiny(seed=1), run_dir=tmp_path / "a1", **_QUIET)
  # A run of the adaptive configuration still going: counted, not averaged.
  going = tmp_path / "b_going"
  shutil.copytree(root / "b", going)
  (going / "summary.json").unlink()
  config = json.loads((going / "config.json").read_text())
  (going / "config.json").write_text(json.dumps({**config, "seed": 7}))
  out = tmp_path / "out"
  assert cli.main(["report", str(root / "a"), str(root / "b"),
                   str(tmp_path / "a1"), str(going), "--out", str(out),
                   "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  fixed_row, adaptive_row = result["by_config"]
  # Labelled by what tells the configurations apart.
  assert fixed_row["configuration"] == "adaptive_clipping=False"
  assert adaptive_row["configuration"] == "adaptive_clipping=True"
  assert fixed_row["seeds"] == [0, 1] and fixed_row["num_finished"] == 2
  accs = [fixed.summary["eval_accuracy"], fixed_1.summary["eval_accuracy"]]
  assert fixed_row["eval_accuracy_mean"] == pytest.approx(np.mean(accs))
  assert fixed_row["eval_accuracy_std"] == pytest.approx(
      np.std(accs, ddof=1))
  assert adaptive_row["seeds"] == [0, 7]
  assert (adaptive_row["num_runs"], adaptive_row["num_finished"]) == (2, 1)
  assert adaptive_row["eval_accuracy_mean"] == adaptive.summary[
      "eval_accuracy"]
  assert adaptive_row["eval_accuracy_std"] == 0.0
  assert str(out / "report_by_config.png") in result["files"]
  _assert_png(out / "report_by_config.png")
  # The text output prints the table over seeds only when there is one.
  assert cli.main(["report", str(root / "a"), str(tmp_path / "a1"),
                   "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert "over seeds:" in text and "0 1" in text and "2/2" in text
  assert cli.main(["report", str(root / "a"), str(root / "b"), "--out",
                   str(tmp_path / "out2")]) == 0
  assert "over seeds:" not in capsys.readouterr().out
  assert not (tmp_path / "out2" / "report_by_config.png").exists()


def test_report_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
  assert cli.main(["report", str(tmp_path), "--out", str(tmp_path)]) == 2
  assert "not a run directory" in capsys.readouterr().err


def test_sweep_results_over_seeds(tmp_path):
  base = _tiny(rounds=3, eval_every=1, noise_multiplier=1.0,
               dataset_kwargs={"num_clients": 40, "max_examples": 20},
               cohort_size=6)
  result = sweep.run_sweep(base, {"seed": [0, 1], "clip_norm": [0.5, 1.0]},
                           run_dir=tmp_path, tuning=False, **_QUIET)
  groups = reports.seed_groups(result)
  assert [g.swept for g in groups] == [{"clip_norm": 0.5},
                                       {"clip_norm": 1.0}]
  by_config = reports.summary_by_config_rows(result)
  with open(tmp_path / "summary_by_config.csv", newline="",
            encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert len(by_config) == len(table) == 2
  for group, row, line in zip(groups, by_config, table):
    accs = [result.runs[i].summary["eval_accuracy"] for i in group.indices]
    assert [result.configs[i].seed for i in group.indices] == [0, 1]
    assert row["eval_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert row["eval_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert float(line["eval_accuracy_mean"]) == pytest.approx(np.mean(accs))
    assert int(line["num_seeds"]) == 2 and "seed" not in line
    assert float(line["clip_norm"]) == group.swept["clip_norm"]
  assert "## Over seeds" in (tmp_path / "summary.md").read_text()
  for name in ("frontier.png", "learning_curves.png"):
    _assert_png(tmp_path / name)
  # Each configuration's directory has its table and events; the sweep
  # plots them together.
  one = tmp_path / "configs" / "000"
  _assert_csv_equals_metrics(one)
  _assert_tensorboard_equals_metrics(one)
  assert not list(one.glob("*.png"))
