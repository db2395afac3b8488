"""The one writer of a run directory.

    config.json     the resolved config (with the resolved noise multiplier)
    ledger.jsonl    one line per round: its DP event, written (and fsync'd)
                    before the round's result exists
    metrics.jsonl   one line of metrics per completed round
    checkpoints/    atomic, checksummed checkpoints (checkpoint.py) of the
                    state the rounds carry, the ledger and the byte offset
                    of metrics.jsonl they cover
    summary.json    the final summary
    tensorboard/, metrics.csv, *.png
                    views of metrics.jsonl for people (run_outputs.py):
                    TensorBoard events written row by row, the table and
                    plots when the directory closes

Every file is replaced atomically or appended to; a failure (a full disk, an
interruption) leaves what was already written readable. The views are never
read back, and a failure to write them is a warning, not an error.
"""

import json
import os
import pathlib

from fedjax_dp import checkpoint
from fedjax_dp import run_outputs
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import ledger_codec


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Replaces `path` by `text` all at once; on failure (a full disk) the old
  file stays and no temporary file is left."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _ledger_lines(first: int, events) -> str:
  return "".join(
      json.dumps({"round": first + i,
                  "event": ledger_codec.encode_event(event)}) + "\n"
      for i, event in enumerate(events))


# What config.json holds beside the config's fields, fixed when the run
# started: the noise multiplier it ran with (calibrated or given) and what
# reading ledger.jsonl needs (`read_ledger`).
DERIVED_FIELDS = ("resolved_noise_multiplier", "neighbouring_relation")


class RunDirectory:
  """A run directory, read for resuming and written while a run goes on."""

  def __init__(self, path: str | os.PathLike, plots: bool = True):
    """`plots=False` leaves out the PNGs (a sweep plots its runs
    together)."""
    self.path = pathlib.Path(path)
    self.checkpoints = self.path / "checkpoints"
    self.metrics_path = self.path / "metrics.jsonl"
    self.ledger_path = self.path / "ledger.jsonl"
    self._metrics = self._ledger = self._tensorboard = None
    self._plots = plots
    self._config = {}

  # --- Before anything is written. ------------------------------------------

  def check(self, resume: bool) -> None:
    """Refuses a directory whose parts have the wrong kind, or (without
    `resume`) one that already holds a run.

    Raises:
      ValueError: naming the path.
    """
    for path, kind in ((self.path, "directory"),
                       (self.checkpoints, "directory"),
                       (self.metrics_path, "file"), (self.ledger_path, "file"),
                       (self.path / "config.json", "file")):
      if path.exists() and (path.is_dir() != (kind == "directory")):
        raise ValueError(f"run directory: {path} exists but is not a {kind}")
    if not resume and (self.metrics_path.exists() or
                       checkpoint.named_steps(self.checkpoints)):
      # Never overwrite another run's results or let its checkpoints be
      # mistaken for this run's.
      raise ValueError(
          f"run directory {self.path} already holds a run; resume it "
          "(--resume) or choose another --run-dir")

  def metrics_size(self) -> int:
    return (self.metrics_path.stat().st_size
            if self.metrics_path.is_file() else 0)

  def metrics_reach(self, offset, size: int) -> bool:
    """Whether metrics.jsonl (of `size` bytes) still holds the `offset`
    bytes a checkpoint recorded, ending at a row's end."""
    if not isinstance(offset, int) or offset < 0 or offset > size:
      return False
    if offset == 0:
      return True
    with open(self.metrics_path, "rb") as f:
      f.seek(offset - 1)
      return f.read(1) == b"\n"

  def read_ledger(self) -> accounting.PrivacyLedger:
    """The privacy ledger of the rounds ledger.jsonl records (at the run's
    delta and accountant, under its neighbouring relation).

    Raises:
      ValueError: the directory holds no run's config.json, or one written
        before it recorded the relation.
      checkpoint.CheckpointError: a line of ledger.jsonl is damaged.
    """
    path = self.path / "config.json"
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
      relation = accounting.relation_named(config["neighbouring_relation"])
      ledger = accounting.PrivacyLedger(relation, config["delta"],
                                        config["accountant"])
    except FileNotFoundError:
      raise ValueError(f"{path} does not exist; is {self.path} a run "
                       "directory?") from None
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}: not a run's config with its neighbouring "
                       f"relation ({type(e).__name__}: {e})") from None
    for round_index, event in self.recorded_events():
      ledger.record(round_index, event)
    return ledger

  def recorded_events(self) -> list:
    """(round, event) of every complete line of ledger.jsonl.

    A line cut short by an interruption (the last one) is ignored.

    Raises:
      checkpoint.CheckpointError: another line is not a ledger entry.
    """
    if not self.ledger_path.is_file():
      return []
    entries = []
    lines = self.ledger_path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        data = json.loads(line)
        entries.append((data["round"],
                        ledger_codec.decode_event(data["event"])))
      except (ValueError, KeyError, TypeError) as e:
        if i == len(lines) - 1:  # unterminated: written when interrupted
          break
        raise checkpoint.CheckpointError(
            f"{self.ledger_path}: line {i + 1} is not a ledger entry "
            f"({e})") from None
    return entries

  # --- While the run goes on. -----------------------------------------------

  def open(self, config: dict, noise_multiplier: float,
           ledger: accounting.PrivacyLedger, metrics_offset: int) -> None:
    """Writes config.json (the config's fields and `DERIVED_FIELDS`),
    rewrites ledger.jsonl to `ledger`'s rounds (the rounds after a
    checkpoint will be replayed and recorded again), cuts metrics.jsonl to
    `metrics_offset` bytes, and opens both for appending."""
    self.path.mkdir(parents=True, exist_ok=True)
    resolved = self._config = config | {
        "resolved_noise_multiplier": noise_multiplier,
        "neighbouring_relation": ledger.relation.value}
    write_atomic(self.path / "config.json",
                 json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    write_atomic(self.ledger_path, "".join(
        _ledger_lines(e.round, [e.event]) for e in ledger.entries))
    if self.metrics_path.exists():
      # Never past the end: the caller checked that the offset fits.
      with open(self.metrics_path, "r+", encoding="utf-8") as f:
        f.truncate(metrics_offset)
    self._metrics = open(self.metrics_path, "a", encoding="utf-8")
    self._ledger = open(self.ledger_path, "a", encoding="utf-8")
    self._tensorboard = run_outputs.TensorBoardLog(
        self.path / run_outputs.TENSORBOARD_DIR,
        kept_rows=self.metrics_path if metrics_offset else None)

  def record(self, first: int, events) -> None:
    """Appends rounds first, first + 1, ...'s events, durably."""
    self._ledger.write(_ledger_lines(first, events))
    self._ledger.flush()
    os.fsync(self._ledger.fileno())

  def write_metrics(self, row: dict) -> None:
    self._metrics.write(json.dumps(row) + "\n")
    self._metrics.flush()
    self._tensorboard.add(row)

  def save_checkpoint(self, rounds_completed: int, tree,
                      ledger: accounting.PrivacyLedger, config: dict) -> None:
    # What the checkpoint points at is durable before the checkpoint is.
    self._metrics.flush()
    os.fsync(self._metrics.fileno())
    checkpoint.save(
        self.checkpoints, rounds_completed, tree,
        {"ledger": ledger_codec.encode_ledger(ledger),
         "metrics_offset": self._metrics.tell(), "config": config})

  def write_summary(self, summary: dict) -> None:
    write_atomic(self.path / "summary.json",
                 json.dumps(summary, indent=2) + "\n")

  def close(self) -> None:
    """Closes the files, then regenerates the views of metrics.jsonl."""
    opened = self._metrics is not None
    for f in (self._metrics, self._ledger, self._tensorboard):
      if f is not None:
        f.close()
    self._metrics = self._ledger = self._tensorboard = None
    if opened:
      self._write_views()

  def _write_views(self) -> None:
    try:
      rows = run_outputs.read_rows(self.metrics_path)
    except Exception as e:  # pylint: disable=broad-except
      run_outputs.warn("metrics.csv or plots", self.path, e)
      return
    try:
      write_atomic(self.path / run_outputs.CSV_NAME,
                   run_outputs.csv_text(rows))
    except Exception as e:  # pylint: disable=broad-except
      run_outputs.warn(run_outputs.CSV_NAME, self.path, e)
    if self._plots:
      run_outputs.write_plots(rows, self._config, self.path)
