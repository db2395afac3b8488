"""A sweep's run directory: per-config files, summary tables, plots, tuning cost.

`write_sweep(result, run_dir)` writes

    run_dir/
      sweep.json            base config, grid, groups, tuning cost
      summary.csv           one row per configuration
      summary_by_config.csv one row per configuration over seeds: the mean
                            and standard deviation of its seeds' results
      summary.md            both tables, plus the privacy cost of tuning
      frontier.png          final eval accuracy vs epsilon, a point (mean
                            +- std over seeds) per configuration
      learning_curves.png   eval accuracy vs round, a line (mean, +- std
                            band over seeds) per configuration
      configs/<id>/         what `runner.run` writes for one run:
        config.json, metrics.jsonl, summary.json, ledger.jsonl,
        metrics.csv, tensorboard/ (`tensorboard --logdir run_dir/configs`
        shows every configuration)

Configurations that differ only in `seed` are one configuration over seeds
(`seed_groups`). Standard deviations are over seeds, with Bessel's
correction (0 for a single seed).

The privacy cost of tuning is computed by `privacy/tuning.py`.
"""

import csv
import dataclasses
import json
import math
import os
import pathlib
import statistics

from fedjax_dp import run_directory
from fedjax_dp import run_outputs

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


def _write_rows(path: str | os.PathLike, columns, rows) -> None:
  """`rows` as a CSV of `columns` (dict values as JSON)."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (json.dumps(v, sort_keys=True)
                           if isinstance(v, dict) else v)
                       for k, v in row.items()})


def write_csv(result, path: str | os.PathLike) -> None:
  _write_rows(path, _columns(result), summary_rows(result))


def markdown_table(result) -> str:
  columns = _columns(result)
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in summary_rows(result):
    lines.append("| " + " | ".join(_cell(row.get(k, "")) for k in columns)
                 + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Configurations over seeds.


@dataclasses.dataclass
class SeedGroup:
  """Configurations of a sweep that differ only in their seed."""

  # The swept values they share (every swept field but the seed).
  swept: dict
  # Their indices in the sweep, grid order.
  indices: list[int]


def seed_groups(result) -> list[SeedGroup]:
  """The sweep's configurations grouped over seeds, in order of first
  appearance."""
  groups = {}
  for i, swept in enumerate(result.swept):
    shared = {k: v for k, v in swept.items() if k != "seed"}
    key = json.dumps(shared, sort_keys=True, default=repr)
    groups.setdefault(key, SeedGroup(shared, [])).indices.append(i)
  return list(groups.values())


def mean_std(values) -> tuple[float, float]:
  """Mean and standard deviation (Bessel-corrected; 0 for one value). A
  NaN (a diverged seed) makes both NaN: it is not dropped silently."""
  values = [float(v) for v in values]
  if not values:
    return float("nan"), float("nan")
  if any(math.isnan(v) for v in values):
    return float("nan"), float("nan")
  if len(values) == 1:
    return values[0], 0.0
  if not all(math.isfinite(v) for v in values):
    mean = sum(values) / len(values)  # +-inf where an epsilon is infinite
    return mean, float("nan")
  return statistics.fmean(values), statistics.stdev(values)


def _group_label(result, group: SeedGroup) -> str:
  return fields_label(group.swept) or result.base.name


def summary_by_config_rows(result) -> list[dict]:
  """One row per configuration over seeds: its swept fields (but the
  seed), its seeds, and the mean and std of accuracy and epsilon."""
  rows = []
  for group in seed_groups(result):
    runs = [result.runs[i].summary for i in group.indices]
    acc = mean_std(s.get("eval_accuracy", float("nan")) for s in runs)
    eps = mean_std(s["epsilon"] for s in runs)
    rows.append({
        **group.swept,
        "num_seeds": len(group.indices),
        "seeds": " ".join(str(result.configs[i].seed) for i in group.indices),
        "eval_accuracy_mean": acc[0], "eval_accuracy_std": acc[1],
        "epsilon_mean": eps[0], "epsilon_std": eps[1],
        "rounds_completed_min": min(s["rounds_completed"] for s in runs),
        "ids": " ".join(result.config_ids[i] for i in group.indices),
    })
  return rows


_BY_CONFIG_COLUMNS = ("num_seeds", "seeds", "eval_accuracy_mean",
                      "eval_accuracy_std", "epsilon_mean", "epsilon_std",
                      "rounds_completed_min", "ids")


def write_csv_by_config(result, path: str | os.PathLike) -> None:
  columns = [k for k in result.grid if k != "seed"] + list(_BY_CONFIG_COLUMNS)
  _write_rows(path, columns, summary_by_config_rows(result))


def _pm(mean: float, std: float) -> str:
  return f"{mean:.4g} ± {std:.2g}" if std else f"{mean:.4g}"


def markdown_by_config(result) -> str:
  lines = ["| configuration | seeds | eval accuracy (mean ± std) | "
           "epsilon (mean ± std) | ids |", "|---|---|---|---|---|"]
  for group, row in zip(seed_groups(result), summary_by_config_rows(result)):
    lines.append(
        f"| {_group_label(result, group)} | {row['seeds']} | "
        f"{_pm(row['eval_accuracy_mean'], row['eval_accuracy_std'])} | "
        f"{_pm(row['epsilon_mean'], row['epsilon_std'])} | {row['ids']} |")
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
  if any(len(g.indices) > 1 for g in seed_groups(result)):
    parts += [
        "## Over seeds",
        "",
        "Configurations that differ only in their seed: the mean and "
        "standard deviation (over seeds) of their results "
        "(summary_by_config.csv).",
        "",
        markdown_by_config(result),
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
        t.advice(),
        "",
    ]
  pathlib.Path(path).write_text("\n".join(parts), encoding="utf-8")


# ---------------------------------------------------------------------------
# Plots.


def fields_label(fields: dict) -> str:
  """`fields` as one short legend label: `z=1, C=0.4`."""
  short = {"noise_multiplier": "z", "clip_norm": "C", "client_lr": "lr_c",
           "server_lr": "lr_s"}
  return ", ".join(f"{short.get(k, k)}={_cell(v)}" for k, v in fields.items())


# Up to this many configurations (over seeds) get a legend entry each; more
# are coloured by the first swept field, and summary_by_config.csv names
# them.
_MAX_LABELLED = 20


def _seeds_note(groups: list[SeedGroup]) -> str:
  counts = {len(g.indices) for g in groups}
  if counts == {1}:
    return ""
  n = counts.pop() if len(counts) == 1 else f"{min(counts)}-{max(counts)}"
  return f", mean ± std over {n} seeds"


def _group_styles(result, groups: list[SeedGroup]):
  """(colour, legend label or None) per group: a colour and label each for
  up to `_MAX_LABELLED` groups, else a colour per value of the first swept
  field, labelled once."""
  plt = run_outputs.pyplot()
  if len(groups) <= _MAX_LABELLED:
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return [(cmap(k), _group_label(result, g))
            for k, g in enumerate(groups)]
  field = next((k for k in result.grid if k != "seed"), None)
  values = list(dict.fromkeys(
      json.dumps(g.swept.get(field), default=repr) for g in groups))
  cmap = plt.get_cmap("viridis")
  styles, named = [], set()
  for g in groups:
    k = values.index(json.dumps(g.swept.get(field), default=repr))
    label = f"{field}={_cell(g.swept.get(field))}"
    styles.append((cmap(k / max(len(values) - 1, 1)),
                   None if label in named else label))
    named.add(label)
  return styles


def plot_frontier(result, path: str | os.PathLike) -> None:
  """Final eval accuracy vs epsilon, one point per configuration over
  seeds: the mean, with error bars of one standard deviation over seeds
  (in epsilon too where it varies).

  Up to `_MAX_LABELLED` configurations each have a legend entry (no
  annotation covers a point); more are coloured by the first swept field.
  Configurations at the same epsilon (a grid over anything but the noise)
  are drawn side by side, a few points apart on the page, so that their
  error bars do not hide each other; the x axis still reads the epsilon.
  """
  plt = run_outputs.pyplot()
  from matplotlib import transforms  # pylint: disable=g-import-not-at-top
  groups = seed_groups(result)
  fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
  # A marker per labelled configuration; colour alone (one field) beyond.
  markers = "osD^v<>pP*Xh" if len(groups) <= _MAX_LABELLED else "o"
  stats = []
  for group in groups:
    runs = [result.runs[i].summary for i in group.indices]
    stats.append((mean_std(s["epsilon"] for s in runs),
                  mean_std(s.get("eval_accuracy", float("nan"))
                           for s in runs)))
  at_epsilon = {}
  for k, (eps, _) in enumerate(stats):
    at_epsilon.setdefault(f"{eps[0]:.6g}", []).append(k)
  for k, (group, (color, label)) in enumerate(
      zip(groups, _group_styles(result, groups))):
    eps, acc = stats[k]
    if not (math.isfinite(eps[0]) and math.isfinite(acc[0])):
      continue
    same = at_epsilon[f"{eps[0]:.6g}"]
    # Side by side, 7 points apart, centred on the true epsilon.
    shift = 7 * (same.index(k) - (len(same) - 1) / 2) if len(same) <= 12 else 0
    ax.errorbar(
        eps[0], acc[0], yerr=acc[1] or None, xerr=eps[1] or None,
        fmt=markers[k % len(markers)], color=color, markersize=7,
        markeredgecolor="black", markeredgewidth=0.5, ecolor=color,
        elinewidth=1.2, capsize=4, label=label,
        transform=ax.transData + transforms.ScaledTranslation(
            shift / 72, 0, fig.dpi_scale_trans))
    # A shifted artist does not count for autoscaling: its extent does.
    ax.update_datalim([(eps[0] - eps[1], acc[0] - acc[1]),
                       (eps[0] + eps[1], acc[0] + acc[1])])
  ax.set_xlabel(f"epsilon (delta={result.base.delta:g}, "
                f"{result.base.accountant})")
  ax.set_ylabel("final held-out accuracy")
  ax.set_title(f"Privacy-utility frontier: {result.base.name}\n"
               f"({len(groups)} configurations{_seeds_note(groups)})",
               fontsize=11)
  ax.grid(True, alpha=0.3)
  ax.margins(x=0.15, y=0.15)  # room for the error bars' caps
  ax.autoscale_view()
  run_outputs.save(fig, ax, path, x_from_zero=False)


def plot_learning_curves(result, path: str | os.PathLike) -> None:
  """Held-out accuracy vs rounds completed, one line per configuration
  over seeds: the mean over its seeds at each eval round, in a band of
  +- one standard deviation."""
  groups = seed_groups(result)
  fig, ax = run_outputs.new_axes(
      f"Learning curves: {result.base.name}\n({len(groups)} "
      f"configurations{_seeds_note(groups)})", "held-out accuracy",
      width=7.5)
  for group, (color, label) in zip(groups, _group_styles(result, groups)):
    draw_mean_accuracy(ax, [result.runs[i].history for i in group.indices],
                       color, label, len(groups))
  run_outputs.save(fig, ax, path)


def draw_mean_accuracy(ax, histories: list[list[dict]], color, label,
                       num_lines: int) -> None:
  """Held-out accuracy over seeds on `ax`: the mean at each eval round
  that some seed reached, in a band of +- one standard deviation where
  more than one seed did."""
  by_step = {}
  for history in histories:
    for step, value in zip(*run_outputs.points(history, "eval_accuracy")):
      by_step.setdefault(step, []).append(value)
  if not by_step:
    return
  steps = sorted(by_step)
  stats = [mean_std(by_step[t]) for t in steps]
  run_outputs.line(ax, steps, [m for m, _ in stats], label=label, color=color)
  if len(histories) > 1:
    # Within [0, 1], where an accuracy can be; fainter the more bands
    # overlap, so that the mean lines stay readable.
    ax.fill_between(steps, [max(m - d, 0.0) for m, d in stats],
                    [min(m + d, 1.0) for m, d in stats], color=color,
                    alpha=min(0.2, 0.5 / num_lines), linewidth=0)


# ---------------------------------------------------------------------------
# The run directory.


def write_run(run, path: str | os.PathLike) -> None:
  """What `runner.run` writes for one run, checkpoints aside (through the
  same writer): config.json (with the resolved noise multiplier),
  ledger.jsonl (one line per accounted round), metrics.jsonl,
  summary.json, metrics.csv and tensorboard/ (no plots: the sweep's own
  plot its runs together)."""
  directory = run_directory.RunDirectory(path, plots=False)
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
  write_csv_by_config(result, out / "summary_by_config.csv")
  write_markdown(result, out / "summary.md")
  plot_frontier(result, out / "frontier.png")
  plot_learning_curves(result, out / "learning_curves.png")
  return out
