"""Noise mechanisms side by side at equal epsilon, over several seeds.

Every arm trains the same task (the digits experiment: 400 training
clients, 2NN, server momentum 0.9) for the same rounds with the same
expected cohort, and is calibrated to the same (epsilon, delta) by the
events its own ledger records:

  * dp_fedavg_poisson: independent Gaussian noise, Poisson sampling of the
    whole population (amplification credited);
  * dp_fedavg_cyclic: independent Gaussian noise under the (k, b) schema
    (no amplification): the baseline the correlated mechanisms must beat
    under the same participation constraint;
  * dp_ftrl_tree: one tree over all rounds (Kairouz et al. 2021) under the
    schema;
  * band_mf: BandMF of b bands under the schema;
  * blt: BLT under the schema;
  * band_mf_amplified: BandMF of b bands under b-banded Poisson sampling
    (amplified; Choquette-Choo et al. 2023).

The schema: b = `--groups` groups, round r draws `--cohort` clients from
group r mod b (cyclic), so each client takes part at most ceil(T / b)
times, at least b rounds apart.

Writes DIR/results.json (every run), DIR/table.md (mean and standard
deviation of the final held-out accuracy per arm, the calibrated noise
multiplier, wall time) and DIR/accuracy.png.

  python scripts/compare_mechanisms.py --out /tmp/mechanisms
  python scripts/compare_mechanisms.py --out /tmp/m --rounds 20 --seeds 1
"""

import argparse
import json
import os
import statistics
import sys
import time

from fedjax_dp import config as config_lib
from fedjax_dp import runner


def arms(groups: int, cohort: int, population: int) -> dict[str, dict]:
  """Each arm's config changes."""
  schema = dict(sampling="cyclic", min_separation=groups, cohort_size=cohort)
  within_group = min(1.0, cohort * groups / population)
  return {
      "dp_fedavg_poisson": dict(mechanism="gaussian", sampling="poisson",
                                cohort_size=cohort),
      "dp_fedavg_cyclic": dict(mechanism="gaussian", **schema),
      "dp_ftrl_tree": dict(mechanism="tree", **schema),
      "band_mf": dict(mechanism="band_mf", **schema),
      "blt": dict(mechanism="blt", **schema),
      "band_mf_amplified": dict(
          mechanism="band_mf", sampling="banded_poisson",
          min_separation=groups, cohort_size=None,
          sampling_probability=within_group),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--groups", type=int, default=10)
  parser.add_argument("--cohort", type=int, default=20)
  parser.add_argument("--epsilon", type=float, default=4.0)
  parser.add_argument("--delta", type=float, default=1e-4)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--only", help="comma-separated arm names")
  parser.add_argument("--report-only", action="store_true",
                      help="rewrite table and plot from DIR/results.json")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.report_only:
    with open(os.path.join(args.out, "results.json")) as f:
      saved = json.load(f)
    _report(saved["runs"], argparse.Namespace(**saved["settings"]), args.out)
    return 0
  base = config_lib.Config(
      rounds=args.rounds, noise_multiplier=None, target_epsilon=args.epsilon,
      delta=args.delta, accountant="rdp", eval_every=args.rounds)
  population = 400  # the digits experiment's training clients
  chosen = arms(args.groups, args.cohort, population)
  if args.only:
    chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
  results = []
  for name, changes in chosen.items():
    for seed in range(args.seeds):
      config = base.replace(name=f"{name}-seed{seed}", seed=seed, **changes)
      start = time.perf_counter()
      result = runner.run(config, run_dir=os.path.join(args.out, config.name),
                          progress=False)
      row = dict(arm=name, seed=seed,
                 accuracy=result.summary["eval_accuracy"],
                 epsilon=result.summary["epsilon"],
                 noise_multiplier=result.noise_multiplier,
                 wall_s=time.perf_counter() - start)
      results.append(row)
      print(json.dumps(row), flush=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(dict(settings=vars(args), runs=results), f, indent=1)
  _report(results, args, args.out)
  return 0


def _report(results, args, out: str) -> None:
  table = _table(results, args)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  _plot(results, args, os.path.join(out, "accuracy.png"))


def _summary(results):
  by_arm = {}
  for row in results:
    by_arm.setdefault(row["arm"], []).append(row)
  for arm, rows in by_arm.items():
    acc = [r["accuracy"] for r in rows]
    yield arm, rows, statistics.mean(acc), (
        statistics.stdev(acc) if len(acc) > 1 else 0.0)


def _table(results, args) -> str:
  lines = [f"Digits, {args.rounds} rounds, expected cohort {args.cohort}, "
           f"b = {args.groups}, epsilon = {args.epsilon:g} at delta = "
           f"{args.delta:g} (RDP), {args.seeds} seeds", "",
           "| arm | accuracy (mean +- std) | z | epsilon | wall s/run |",
           "|---|---|---|---|---|"]
  for arm, rows, mean, std in _summary(results):
    lines.append(
        f"| {arm} | {mean:.4f} +- {std:.4f} | "
        f"{rows[0]['noise_multiplier']:.4g} | {rows[0]['epsilon']:.4g} | "
        f"{statistics.mean(r['wall_s'] for r in rows):.1f} |")
  return "\n".join(lines) + "\n"


def _plot(results, args, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = list(_summary(results))
  fig, ax = plt.subplots(figsize=(8, 4.5))
  names = [arm.replace("_", " ") for arm, *_ in summary]
  means = [m for *_, m, _ in summary]
  stds = [s for *_, s in summary]
  ax.bar(range(len(summary)), means, yerr=stds, capsize=5, color="#4C72B0")
  for i, (mean, std) in enumerate(zip(means, stds)):
    ax.annotate(f"{mean:.3f}", (i, mean + std), textcoords="offset points",
                xytext=(0, 4), ha="center", fontsize=9)
  for i, (arm, rows, *_) in enumerate(summary):
    ax.scatter([i] * len(rows), [r["accuracy"] for r in rows], color="black",
               s=12, zorder=3)
  ax.set_xticks(range(len(summary)))
  ax.set_xticklabels(names, rotation=20, ha="right")
  ax.set_ylabel("held-out accuracy")
  top = max(m + s for m, s in zip(means, stds))
  ax.set_ylim(0.0, min(1.0, top + 0.08))
  ax.set_title(f"Equal privacy: epsilon = {args.epsilon:g}, delta = "
               f"{args.delta:g}; {args.rounds} rounds, b = {args.groups}, "
               f"{args.seeds} seeds (bars: mean +- std)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main())
