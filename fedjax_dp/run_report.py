"""`fedjax-dp report`: several run directories side by side.

For each run directory: its config.json, summary.json (absent when the run
did not finish: then its last metrics rows stand in) and metrics.jsonl. The
comparison is a table (one row per run) and overlaid curves, one line per
run: held-out accuracy, loss and epsilon vs rounds completed.

Runs whose configs are equal apart from the seed are one configuration over
seeds: a second table gives each configuration's mean and standard
deviation over its seeds (Bessel-corrected), and report_by_config.png its
mean held-out accuracy curve in a band of +- one standard deviation.
"""

import dataclasses
import json
import math
import os
import pathlib

from fedjax_dp import reports
from fedjax_dp import run_outputs

# Table columns: (key, heading).
COLUMNS = (("run", "run"), ("rounds", "rounds"),
           ("eval_accuracy", "accuracy"), ("epsilon", "epsilon"),
           ("delta", "delta"), ("noise_multiplier", "z"),
           ("clip_norm", "clip C"), ("wall_time_s", "wall s"),
           ("status", "status"), ("run_dir", "directory"))

PLOTS = ("accuracy", "loss", "epsilon")


@dataclasses.dataclass
class Run:
  """What one run directory holds."""

  path: pathlib.Path
  config: dict
  summary: dict | None
  rows: list[dict]
  # The run's line in legends and the table (its name, with its directory
  # where names collide).
  label: str = ""

  @property
  def name(self) -> str:
    return str(self.config.get("name") or self.path.name)


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


def load_run(path: str | os.PathLike) -> Run:
  """Reads a run directory.

  Raises:
    ValueError: `path` is not a run directory (no config.json and no
      metrics.jsonl), or one of its JSON files is damaged.
  """
  path = pathlib.Path(path)
  config_path, summary_path = path / "config.json", path / "summary.json"
  metrics_path = path / "metrics.jsonl"
  if not config_path.is_file() and not metrics_path.is_file():
    raise ValueError(f"{path} is not a run directory (it holds no "
                     "config.json or metrics.jsonl)")
  config = _read_json(config_path) if config_path.is_file() else {}
  summary = _read_json(summary_path) if summary_path.is_file() else None
  for what, value in (("config.json", config), ("summary.json", summary)):
    if value is not None and not isinstance(value, dict):
      raise ValueError(f"{path / what} must hold a JSON object")
  return Run(path, config, summary, run_outputs.read_rows(metrics_path))


def label_runs(runs: list[Run]) -> None:
  """Gives each run a label: its name, followed by as much of its
  directory's path as tells it from the runs of the same name."""
  by_name = {}
  for run in runs:
    by_name.setdefault(run.name, []).append(run)
  for name, same in by_name.items():
    if len(same) == 1:
      same[0].label = name
      continue
    parts = [run.path.resolve().parts for run in same]
    depth = 1
    while depth < max(len(p) for p in parts) and len(
        {p[-depth:] for p in parts}) < len(parts):
      depth += 1
    for run, p in zip(same, parts):
      run.label = f"{name} ({'/'.join(p[-depth:])})"


def _last(rows: list[dict], key: str):
  for row in reversed(rows):
    if key in row:
      return row[key]
  return None


def table_row(run: Run) -> dict:
  """The run's row of the comparison table."""
  config, summary, rows = run.config, run.summary, run.rows
  row = {"run": run.label or run.name, "run_dir": str(run.path)}
  if summary is not None:
    row.update(
        rounds=summary.get("rounds_completed"),
        eval_accuracy=summary.get("eval_accuracy"),
        epsilon=summary.get("epsilon"),
        delta=summary.get("delta", config.get("delta")),
        noise_multiplier=summary.get(
            "noise_multiplier", config.get("resolved_noise_multiplier")),
        clip_norm=summary.get("clip_norm", config.get("clip_norm")),
        final_clip_norm=summary.get("final_clip_norm"),
        wall_time_s=summary.get("wall_time_s"),
        status="diverged" if summary.get("diverged") else "finished")
  else:
    # A run that did not finish: what its rows reached.
    row.update(
        rounds=rows[-1]["round"] + 1 if rows else 0,
        eval_accuracy=_last(rows, "eval_accuracy"),
        epsilon=_last(rows, "epsilon"),
        delta=config.get("delta"),
        noise_multiplier=config.get("resolved_noise_multiplier",
                                    config.get("noise_multiplier")),
        clip_norm=config.get("clip_norm"),
        final_clip_norm=_last(rows, "clip_norm") if config.get(
            "adaptive_clipping") else None,
        wall_time_s=_last(rows, "elapsed_s"),
        status="unfinished (no summary.json)")
  row["rounds_planned"] = config.get("rounds")
  return row


def _text(key: str, row: dict) -> str:
  value = row.get(key)
  if key == "clip_norm" and row.get("final_clip_norm") is not None:
    return f"{value:g}->{row['final_clip_norm']:.3g}"  # adaptive clipping
  if key == "rounds" and row.get("rounds_planned") not in (None, value):
    return f"{value}/{row['rounds_planned']}"
  if value is None:
    return "-"
  if isinstance(value, float):
    if key == "wall_time_s":
      return f"{value:.1f}"
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def _aligned(cells: list[list[str]]) -> str:
  """Rows of cells (the first the headings) as aligned text columns."""
  widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
           for line in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
  """The table as aligned text columns."""
  return _aligned([[heading for _, heading in COLUMNS]] +
                  [[_text(key, row) for key, _ in COLUMNS] for row in rows])


def _plot(runs: list[Run], what: str, path: pathlib.Path) -> bool:
  """One overlaid plot; False (nothing written) when no run has its data."""
  keys = {"accuracy": ("eval_accuracy",), "loss": ("eval_loss", "train_loss"),
          "epsilon": ("epsilon",)}[what]
  if not any(run_outputs.points(run.rows, k)[0] for run in runs for k in keys):
    return False
  names = ", ".join(dict.fromkeys(run.name for run in runs))
  if len(names) > 60:
    names = f"{len(runs)} runs"
  deltas = list(dict.fromkeys(run.config.get("delta") for run in runs))
  at = (f"delta={deltas[0]:g}" if len(deltas) == 1 and
        run_outputs.is_number(deltas[0]) else "each run's delta")
  ylabel = {"accuracy": "held-out accuracy",
            "loss": "loss (solid: held-out, dashed: training)",
            "epsilon": f"epsilon ({at})"}[what]
  title = {"accuracy": "Held-out accuracy", "loss": "Loss",
           "epsilon": "Privacy spent"}[what]
  fig, ax = run_outputs.new_axes(f"{title}: {names}", ylabel, width=7.5)
  plt = run_outputs.pyplot()
  colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  for i, run in enumerate(runs):
    color = colors(i % colors.N)
    xs, ys = run_outputs.points(run.rows, keys[0])
    if xs:
      run_outputs.line(ax, xs, ys, label=run.label, color=color)
    if what == "loss":
      train = run_outputs.points(run.rows, "train_loss")
      if train[0]:
        ax.plot(*train, color=color, linestyle="--", linewidth=1, alpha=0.6,
                label=None if xs else run.label)
  if what == "epsilon":
    ax.set_ylim(bottom=0)
  run_outputs.save(fig, ax, path)
  return True


def write_plots(runs: list[Run], out_dir: str | os.PathLike,
                prefix: str = "report_") -> list[pathlib.Path]:
  """Writes `<prefix>accuracy.png`, `loss.png`, `epsilon.png` (those some
  run has data for) into `out_dir`; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for what in PLOTS:
    path = out_dir / f"{prefix}{what}.png"
    if _plot(runs, what, path):
      written.append(path)
  return written


# Config fields that say where or how a run was launched, not what it
# computes: runs that differ only in these (and the seed) are one
# configuration.
_NOT_CONFIGURATION = ("seed", "name")


def _configuration(run: Run) -> str:
  if not run.config:  # nothing to compare: a configuration of its own
    return str(run.path.resolve())
  return json.dumps({k: v for k, v in run.config.items()
                     if k not in _NOT_CONFIGURATION},
                    sort_keys=True, default=repr)


def config_groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
  """The runs grouped over seeds (equal configs apart from the seed and
  the name), in order of first appearance, each with its label: the config
  fields whose values tell the groups apart (the name alone when nothing
  else does)."""
  by_key = {}
  for run in runs:
    by_key.setdefault(_configuration(run), []).append(run)
  groups = list(by_key.values())
  configs = [group[0].config for group in groups]
  fields = sorted({k for c in configs for k in c} - set(_NOT_CONFIGURATION))
  differing = [k for k in fields if len({json.dumps(c.get(k), sort_keys=True,
                                                    default=repr)
                                         for c in configs}) > 1]
  return [(reports.fields_label({k: c.get(k) for k in differing})
           or group[0].name, group) for c, group in zip(configs, groups)]


def by_config_rows(groups: list[tuple[str, list[Run]]]) -> list[dict]:
  """One row per configuration over seeds (`config_groups`): its seeds, how
  many of its runs finished, and the mean and standard deviation of their
  final accuracy, epsilon and wall time over its finished runs (over all its
  runs, at the round each reached, when none finished: a run still going
  would otherwise pull the mean of the finished ones)."""
  rows = []
  for label, group in groups:
    table = [table_row(run) for run in group]
    finished = [r for r in table if r["status"] == "finished"]
    table = finished or table
    acc = reports.mean_std(_number(r["eval_accuracy"]) for r in table)
    eps = reports.mean_std(_number(r["epsilon"]) for r in table)
    wall = reports.mean_std(_number(r["wall_time_s"]) for r in table)
    rows.append({
        "configuration": label,
        "seeds": [run.config.get("seed") for run in group],
        "num_runs": len(group),
        "num_finished": len(finished),
        "eval_accuracy_mean": acc[0], "eval_accuracy_std": acc[1],
        "epsilon_mean": eps[0], "epsilon_std": eps[1],
        "wall_time_s_mean": wall[0],
        "run_dirs": [str(run.path) for run in group],
    })
  return rows


def _number(value) -> float:
  return float(value) if run_outputs.is_number(value) else float("nan")


def format_by_config(rows: list[dict]) -> str:
  """The configurations over seeds as aligned text columns."""
  def pm(mean, std):
    return f"{mean:.4g} +- {std:.2g}" if std else f"{mean:.4g}"
  cells = [["configuration", "seeds", "finished", "accuracy (mean +- std)",
            "epsilon", "wall s (mean)"]]
  for row in rows:
    cells.append([
        row["configuration"], " ".join(str(s) for s in row["seeds"]),
        f"{row['num_finished']}/{row['num_runs']}",
        pm(row["eval_accuracy_mean"], row["eval_accuracy_std"]),
        pm(row["epsilon_mean"], row["epsilon_std"]),
        f"{row['wall_time_s_mean']:.1f}"])
  return _aligned(cells)


def plot_by_config(groups: list[tuple[str, list[Run]]],
                   path: pathlib.Path) -> bool:
  """Held-out accuracy per configuration over seeds (`config_groups`);
  False (nothing written) when no configuration has more than one run or
  no run has held-out accuracy."""
  if max(len(g) for _, g in groups) < 2 or not any(
      run_outputs.points(run.rows, "eval_accuracy")[0]
      for _, g in groups for run in g):
    return False
  counts = sorted({len(g) for _, g in groups})
  seeds = (f"{counts[0]}" if len(counts) == 1
           else f"{counts[0]}-{counts[-1]}")
  fig, ax = run_outputs.new_axes(
      f"Held-out accuracy: {len(groups)} configurations, mean +- std over "
      f"{seeds} seeds", "held-out accuracy", width=7.5)
  colors = run_outputs.pyplot().get_cmap(
      "tab10" if len(groups) <= 10 else "tab20")
  for k, (label, group) in enumerate(groups):
    reports.draw_mean_accuracy(ax, [run.rows for run in group],
                               colors(k % colors.N),
                               f"{label} ({len(group)} runs)", len(groups))
  run_outputs.save(fig, ax, path)
  return True


def report(run_dirs, out_dir: str | os.PathLike) -> dict:
  """Reads `run_dirs`, writes the overlaid plots into `out_dir`.

  Returns:
    {"runs": the table's rows, "by_config": the rows over seeds
    (`by_config_rows`), "files": the PNGs written}.

  Raises:
    ValueError: a path is not a run directory or holds damaged JSON.
  """
  runs = [load_run(p) for p in run_dirs]
  label_runs(runs)
  files = write_plots(runs, out_dir)
  groups = config_groups(runs)
  if plot_by_config(groups, pathlib.Path(out_dir) / "report_by_config.png"):
    files.append(pathlib.Path(out_dir) / "report_by_config.png")
  return {"runs": [table_row(run) for run in runs],
          "by_config": by_config_rows(groups),
          "files": [str(f) for f in files]}
