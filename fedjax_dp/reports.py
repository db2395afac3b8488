"""A sweep's run directory: per-config files, summary tables, plots, tuning cost.

`write_sweep(result, run_dir)` writes

    run_dir/
      sweep.json            base config, grid, groups, tuning cost
      summary.csv           one row per configuration
      summary.md            the same table, plus the privacy cost of tuning
      frontier.png          final eval accuracy vs epsilon, a point per config
      learning_curves.png   eval accuracy vs round, a line per config
      configs/<id>/         what `runner.run` writes for one run:
        config.json, metrics.jsonl, summary.json, ledger.jsonl

The privacy cost of tuning is computed by `privacy/tuning.py`.
"""

import csv
import dataclasses
import json
import math
import os
import pathlib


from fedjax_dp import run_directory

# ---------------------------------------------------------------------------
# Tables.

SUMMARY_COLUMNS = ("eval_accuracy", "epsilon", "rounds_completed",
                   "stopped_for_budget", "resolved_noise_multiplier", "group")


def summary_rows(result) -> list[dict]:
  """One row per configuration: id, swept fields, outcome columns."""
  group_of = {}
  for g, info in enumerate(result.groups):
    for cid in info.config_ids:
      group_of[cid] = g
  rows = []
  for cid, swept, run in zip(result.config_ids, result.swept, result.runs):
    s = run.summary
    row = {"id": cid, **swept}
    row.update({
        "eval_accuracy": s.get("eval_accuracy", float("nan")),
        "epsilon": s["epsilon"],
        "rounds_completed": s["rounds_completed"],
        "stopped_for_budget": s["stopped_for_budget"],
        "resolved_noise_multiplier": s["noise_multiplier"],
        "group": group_of.get(cid, 0),
    })
    rows.append(row)
  return rows


def _columns(result) -> list[str]:
  swept = [k for k in result.grid if k not in SUMMARY_COLUMNS]
  return ["id"] + swept + list(SUMMARY_COLUMNS)


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, dict):
    return json.dumps(v, sort_keys=True)
  return str(v)


def write_csv(result, path: str | os.PathLike) -> None:
  columns = _columns(result)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in summary_rows(result):
      writer.writerow({k: (json.dumps(v, sort_keys=True)
                           if isinstance(v, dict) else v)
                       for k, v in row.items()})


def markdown_table(result) -> str:
  columns = _columns(result)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in summary_rows(result):
    lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in columns)
                 + " |")
  return "\n".join(lines)


def write_markdown(result, path: str | os.PathLike) -> None:
  base = result.base
  parts = [
      f"# Sweep of {base.name}",
      "",
      f"{len(result.configs)} configurations in {len(result.groups)} shape "
      f"group(s), {result.wall_time_s:.1f} s. Epsilon at delta="
      f"{base.delta:g} ({base.accountant}), per configuration.",
      "",
      markdown_table(result),
      "",
  ]
  t = result.tuning
  if t is not None:
    parts += [
        "## Privacy cost of tuning",
        "",
        f"Releasing only the best configuration of a search with a "
        f"Poisson-distributed number of runs (mean {t.mean_num_runs:g}, "
        f"hyperparameters drawn from this grid; Papernot & Steinke 2022, "
        f"dp_accounting RepeatAndSelectDpEvent, RDP): epsilon = "
        f"{t.epsilon:.4g} at delta={t.delta:g}. One run of the event used: "
        f"{t.single_run_epsilon:.4g} (RDP). Releasing every configuration: "
        f"{t.all_released_epsilon:.4g} (RDP). Event used: {t.note}.",
        "",
    ]
  pathlib.Path(path).write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------
# Plots.


def _label(swept: dict) -> str:
  short = {"noise_multiplier": "z", "clip_norm": "C", "client_lr": "lr_c",
           "server_lr": "lr_s"}
  return ", ".join(f"{short.get(k, k)}={_cell(v)}" for k, v in swept.items())


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_frontier(result, path: str | os.PathLike) -> None:
  """Final eval accuracy vs epsilon, one point per configuration.

  Points are coloured by the first swept field (legend) and, for up to 32
  configurations, annotated with all swept values.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
  rows = summary_rows(result)
  field = next(iter(result.grid), None)
  values = []
  for row in rows:
    v = row.get(field)
    if v not in values:
      values.append(v)
  cmap = plt.get_cmap("viridis" if len(values) > 10 else "tab10")
  for k, v in enumerate(values):
    pts = [(r["epsilon"], r["eval_accuracy"]) for r in rows
           if r.get(field) == v]
    color = cmap(k / max(len(values) - 1, 1)) if len(values) > 10 else cmap(k)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color,
               label=f"{field}={_cell(v)}" if field else None, s=36,
               edgecolors="black", linewidths=0.5)
  if len(rows) <= 32:
    for row, swept in zip(rows, result.swept):
      if math.isfinite(row["epsilon"]) and math.isfinite(row["eval_accuracy"]):
        ax.annotate(_label(swept), (row["epsilon"], row["eval_accuracy"]),
                    fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel(f"epsilon (delta={result.base.delta:g}, "
                f"{result.base.accountant})")
  ax.set_ylabel("final held-out accuracy")
  ax.set_title(f"Privacy-utility frontier: {result.base.name} "
               f"({len(rows)} configurations)")
  ax.grid(True, alpha=0.3)
  if field:
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_learning_curves(result, path: str | os.PathLike) -> None:
  """Held-out accuracy vs round, one line per configuration."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
  for swept, run in zip(result.swept, result.runs):
    pts = [(m["round"] + 1, m["eval_accuracy"]) for m in run.history
           if "eval_accuracy" in m]
    if pts:
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
              linewidth=1, label=_label(swept))
  ax.set_xlabel("rounds completed")
  ax.set_ylabel("held-out accuracy")
  ax.set_title(f"Learning curves: {result.base.name}")
  ax.grid(True, alpha=0.3)
  if len(result.runs) <= 16 and ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=6, loc="best")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The run directory.


def write_run(run, path: str | os.PathLike) -> None:
  """What `runner.run` writes for one run, checkpoints aside (through the
  same writer): config.json (with the resolved noise multiplier),
  ledger.jsonl (one line per accounted round), metrics.jsonl and
  summary.json."""
  directory = run_directory.RunDirectory(path)
  directory.open(run.config.to_dict(), run.noise_multiplier, run.ledger, 0)
  try:
    for row in run.history:
      directory.write_metrics(row)
    directory.write_summary(run.summary)
  finally:
    directory.close()


def write_sweep(result, run_dir: str | os.PathLike) -> pathlib.Path:
  """Writes the sweep's run directory (see the module docstring)."""
  out = pathlib.Path(run_dir)
  out.mkdir(parents=True, exist_ok=True)
  for cid, run in zip(result.config_ids, result.runs):
    write_run(run, out / "configs" / cid)
  meta = {
      "base": result.base.to_dict(),
      "grid": result.grid,
      "configs": [{"id": cid, **swept}
                  for cid, swept in zip(result.config_ids, result.swept)],
      "groups": [dataclasses.asdict(g) for g in result.groups],
      "wall_time_s": result.wall_time_s,
      "tuning": result.tuning.to_json() if result.tuning else None,
  }
  (out / "sweep.json").write_text(
      json.dumps(meta, indent=2, default=repr) + "\n")
  write_csv(result, out / "summary.csv")
  write_markdown(result, out / "summary.md")
  plot_frontier(result, out / "frontier.png")
  plot_learning_curves(result, out / "learning_curves.png")
  return out
