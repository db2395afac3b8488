"""What a run directory holds for people to read, beside metrics.jsonl.

    tensorboard/    TensorBoard event files (tensorboardX, no TensorFlow):
                    one scalar per numeric, finite metric of every row, tag
                    = its metrics.jsonl key, step = rounds completed (the
                    row's round + 1); written row by row (flushed once a
                    second at most), so `tensorboard --logdir
                    RUN_DIR/tensorboard` follows a running job
    metrics.csv     metrics.jsonl as a table, one row per round
    accuracy.png    held-out accuracy vs rounds completed
    loss.png        training and held-out loss vs rounds completed
    epsilon.png     epsilon so far vs rounds completed
    clip_norm.png   the clip norm vs rounds completed (adaptive clipping)

metrics.jsonl stays the record: the CSV and plots are regenerated from it
when the run directory closes, so a resumed or truncated run never shows a
round twice, and a resumed run's event file purges (TensorBoard's
`purge_step`) the steps it replays. These views are never read back, and
writing them never raises: a failure is logged as a warning and leaves the
run, its metrics, ledger and checkpoints as they were.

matplotlib and tensorboardX are imported when first used, not with the
package.
"""

import csv
import io
import json
import logging
import math
import os
import pathlib
import time

_LOG = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
CSV_NAME = "metrics.csv"

def warn(what: str, path, error: BaseException) -> None:
  """Logs that `what` could not be written at `path` (the run goes on)."""
  _LOG.warning("could not write %s at %s (%s: %s); the run and its "
               "metrics.jsonl are unaffected", what, path,
               type(error).__name__, error)


def step_of(row: dict) -> int:
  """A row's x coordinate everywhere (TensorBoard step, plots): the rounds
  completed once its round is, so step 1 is the first round and the last
  step is the run's number of rounds."""
  return int(row["round"]) + 1


def is_number(value) -> bool:
  """A finite int or float (booleans and NaN/Inf are not plotted)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def read_rows(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl (none if it does not exist).

  A last line cut short by an interruption is ignored, as resuming ignores
  it; so is any line that is not a row with a round.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("round"), int):
      rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# TensorBoard.


class TensorBoardLog:
  """Writes each metrics row as TensorBoard scalars, as the rows arrive.

  Through tensorboardX's synchronous event-file writer, not its
  SummaryWriter: the SummaryWriter writes on a thread that dies on a write
  error (a full disk) and then blocks the next write forever; here a failed
  write raises where it can be caught.
  """

  # A flush also fsyncs: at most one per this many seconds, so that fast
  # rounds do not wait on the disk and TensorBoard lags by about as much.
  FLUSH_EVERY_S = 1.0

  def __init__(self, logdir: str | os.PathLike,
               kept_rows: str | os.PathLike | None = None):
    """Opens a new event file in `logdir`.

    When `logdir` already holds events (a resumed run), TensorBoard is told
    to hide their steps from the first one this writer writes on (the run
    replays those rounds), as SummaryWriter's `purge_step` does: from the
    step after the last row of `kept_rows` (the metrics.jsonl the run
    keeps), or every step without it.

    Args:
      logdir: the run's tensorboard/ directory.
      kept_rows: the metrics.jsonl whose rows the resumed run keeps, or
        None when it keeps none.
    """
    self._logdir = pathlib.Path(logdir)
    self._writer = None
    self._flushed = time.monotonic()
    try:
      from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
      from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
      self._logdir.mkdir(parents=True, exist_ok=True)
      resumed = any(self._logdir.glob("events.out.tfevents.*"))
      self._writer = event_file_writer.EventsWriter(
          str(self._logdir / "events"),
          # File names start with the second they were opened in; two
          # opened in one second (a quick resume) must neither collide nor
          # be read out of order, since a purge applies to earlier files.
          filename_suffix=f".{time.time_ns()}")
      if resumed:
        kept = read_rows(kept_rows) if kept_rows is not None else []
        self._writer.write_event(event_pb2.Event(
            wall_time=time.time(),
            step=step_of(kept[-1]) + 1 if kept else 1,
            session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))
      self._writer.flush()
    except Exception as e:  # pylint: disable=broad-except
      warn("TensorBoard events", self._logdir, e)
      self._abandon()

  def add(self, row: dict) -> None:
    """Writes `row`'s numbers (one event) at its step."""
    if self._writer is None:
      return
    try:
      from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
      from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
      # What tensorboardX's add_scalar writes, a row's values in one event.
      values = [summary_pb2.Summary.Value(tag=key, simple_value=float(x))
                for key, x in row.items() if key != "round" and is_number(x)]
      self._writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=step_of(row),
          summary=summary_pb2.Summary(value=values)))
      if time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:
        self._writer.flush()
        self._flushed = time.monotonic()
    except Exception as e:  # pylint: disable=broad-except
      warn("TensorBoard events", self._logdir, e)
      self._abandon()

  def close(self) -> None:
    writer, self._writer = self._writer, None
    if writer is not None:
      try:
        writer.close()
      except Exception as e:  # pylint: disable=broad-except
        warn("TensorBoard events", self._logdir, e)

  def _abandon(self) -> None:
    """Stops writing after a failure (already reported)."""
    writer, self._writer = self._writer, None
    try:
      if writer is not None:
        writer.close()
    except Exception:  # pylint: disable=broad-except
      pass


# ---------------------------------------------------------------------------
# CSV.


def columns(rows: list[dict]) -> list[str]:
  """Every key of `rows`, in the order first seen, "round" first."""
  seen = {"round": None}
  for row in rows:
    seen.update(dict.fromkeys(row))
  return list(seen)


def _csv_cell(value):
  if isinstance(value, (dict, list)):
    return json.dumps(value, sort_keys=True)
  return value  # None -> empty; a float as repr, so it reads back exactly


def csv_text(rows: list[dict]) -> str:
  """`rows` as CSV text: a header of `columns(rows)`, a line per row, an
  empty cell where a row lacks a column (e.g. eval_accuracy between eval
  rounds)."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=columns(rows), restval="",
                          lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_cell(v) for k, v in row.items()})
  return out.getvalue()


# ---------------------------------------------------------------------------
# Plots.


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def points(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows whose `key` is a finite number."""
  pts = [(step_of(r), float(r[key])) for r in rows if is_number(r.get(key))]
  return [p[0] for p in pts], [p[1] for p in pts]


def new_axes(title: str, ylabel: str, width: float = 7.0):
  """A figure and axes with the layout every run plot shares."""
  plt = pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(width, 4.5), dpi=100)
  ax.set_title(title, fontsize=11)
  ax.set_xlabel("rounds completed")
  ax.set_ylabel(ylabel)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(True, alpha=0.3)
  return fig, ax


def line(ax, xs, ys, label=None, **kwargs) -> None:
  """A curve; markers only where they stay apart."""
  if len(xs) <= 60:
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("markersize", 3.5)
  ax.plot(xs, ys, label=label, linewidth=1.5, **kwargs)


def save(fig, ax, path: str | os.PathLike, x_from_zero: bool = True) -> None:
  """Adds the legend (inside for a few entries, below the axes for many)
  and writes the PNG; the x axis starts at 0 unless `x_from_zero` is
  False."""
  plt = pyplot()
  if x_from_zero:
    ax.set_xlim(left=0)  # after the data, which set the right end
  handles, _ = ax.get_legend_handles_labels()
  if len(handles) > 6:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=2 if len(handles) <= 16 else 3, frameon=False)
  elif handles:
    ax.legend(fontsize=8, loc="best")
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def _plot_accuracy(rows, name, path) -> bool:
  xs, ys = points(rows, "eval_accuracy")
  if not xs:
    return False
  fig, ax = new_axes(f"{name}: held-out accuracy", "accuracy")
  lo = points(rows, "eval_client_accuracy_p10")
  hi = points(rows, "eval_client_accuracy_p90")
  if lo[0] and lo[0] == hi[0]:
    ax.fill_between(lo[0], lo[1], hi[1], alpha=0.15, linewidth=0,
                    label="held-out clients, 10th-90th percentile")
  line(ax, xs, ys, label="all held-out examples" if lo[0] else None)
  save(fig, ax, path)
  return True


def _plot_loss(rows, name, path) -> bool:
  train, held_out = points(rows, "train_loss"), points(rows, "eval_loss")
  if not train[0] and not held_out[0]:
    return False
  fig, ax = new_axes(f"{name}: loss", "loss")
  if train[0]:
    line(ax, *train, label="training (cohort mean)", alpha=0.8)
  if held_out[0]:
    line(ax, *held_out, label="held-out")
  save(fig, ax, path)
  return True


def _plot_epsilon(rows, name, config, path) -> bool:
  xs, ys = points(rows, "epsilon")
  example = points(rows, "example_epsilon")
  if not xs and not example[0]:
    return False
  delta = config.get("delta")
  where = f"delta={delta:g}" if is_number(delta) else ""
  if config.get("accountant"):
    where += f", {config['accountant']}" if where else config["accountant"]
  fig, ax = new_axes(f"{name}: privacy spent",
                     f"epsilon ({where})" if where else "epsilon")
  if xs:
    line(ax, xs, ys, label="client-level" if example[0] else None)
  if example[0]:
    line(ax, *example, label="example-level")
  budget = config.get("epsilon_budget")
  if is_number(budget):
    ax.axhline(budget, color="gray", linestyle="--", linewidth=1,
               label=f"budget {budget:g}")
  ax.set_ylim(bottom=0)
  save(fig, ax, path)
  return True


def _plot_clip_norm(rows, name, config, path) -> bool:
  xs, ys = points(rows, "clip_norm")
  # A fixed clip is a flat line that says nothing.
  if not xs or not (config.get("adaptive_clipping") or len(set(ys)) > 1):
    return False
  fig, ax = new_axes(f"{name}: adaptive clip norm", "clip norm C")
  line(ax, xs, ys)
  save(fig, ax, path)
  return True


def plot_run(rows: list[dict], config: dict,
             out_dir: str | os.PathLike) -> list[pathlib.Path]:
  """Writes the run's PNGs (those its rows have data for) into `out_dir`.

  Args:
    rows: the run's metrics rows.
    config: its config.json (for the name, delta, accountant, budget).
    out_dir: the run directory.

  Returns:
    The paths written.
  """
  out_dir = pathlib.Path(out_dir)
  name = config.get("name") or out_dir.name
  written = []
  for file, plot in (
      ("accuracy.png", lambda p: _plot_accuracy(rows, name, p)),
      ("loss.png", lambda p: _plot_loss(rows, name, p)),
      ("epsilon.png", lambda p: _plot_epsilon(rows, name, config, p)),
      ("clip_norm.png", lambda p: _plot_clip_norm(rows, name, config, p))):
    if plot(out_dir / file):
      written.append(out_dir / file)
  return written


def write_plots(rows: list[dict], config: dict,
                out_dir: str | os.PathLike) -> None:
  """`plot_run`, logging a warning instead of raising."""
  try:
    plot_run(rows, config, out_dir)
  except Exception as e:  # pylint: disable=broad-except
    warn("plots", out_dir, e)
    try:
      pyplot().close("all")  # no half-drawn figure stays in memory
    except Exception:  # pylint: disable=broad-except
      pass
