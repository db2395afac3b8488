"""A 16-configuration sweep as one vmapped program vs 16 separate runs.

Runs the default experiment (`fedjax_dp.config.Config()`, digits, MLP) with
fewer rounds over noise multiplier x clip norm x client learning rate x seed
(2 x 2 x 2 x 2), once with `sweep.run_sweep` and once as 16 `runner.run`
calls in the same process (each compiles its own round, as separate jobs
would; separate processes would also pay imports and data loading), and
prints both wall times, their ratio and, per configuration, whether the
sweep's final parameters and epsilon equal the single run's.

  python scripts/sweep_benchmark.py --rounds 20

Both timings include compilation, accounting and evaluation. On a shared
machine, run it when the machine is otherwise idle (see `--repeat`).
"""

import argparse
import json
import time

import jax
import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import sweep

GRID = {
    "noise_multiplier": [0.8, 1.2],
    "clip_norm": [0.5, 1.0],
    "client_lr": [0.1, 0.2],
    "seed": [0, 1],
}


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--max-configs-per-group", type=int, default=None)
  parser.add_argument("--repeat", type=int, default=1,
                      help="time each side this many times (min is kept)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()

  base = config_lib.Config().replace(rounds=args.rounds)
  quiet = {"progress": False, "log": lambda s: None}
  sweep_times, single_times = [], []
  for _ in range(args.repeat):
    t0 = time.perf_counter()
    result = sweep.run_sweep(
        base, GRID, max_configs_per_group=args.max_configs_per_group,
        tuning=False, **quiet)
    sweep_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    singles = [runner.run(c, **quiet) for c in result.configs]
    single_times.append(time.perf_counter() - t0)

  rows = []
  for cid, swept, run, alone in zip(result.config_ids, result.swept,
                                    result.runs, singles):
    rows.append({
        "id": cid, **swept,
        "max_abs_param_diff": _max_abs_diff(run.params, alone.params),
        "epsilon_sweep": run.summary["epsilon"],
        "epsilon_single": alone.summary["epsilon"],
        "eval_accuracy_sweep": run.summary.get("eval_accuracy"),
        "eval_accuracy_single": alone.summary.get("eval_accuracy"),
    })
  worst = max(r["max_abs_param_diff"] for r in rows)
  eps_equal = all(abs(r["epsilon_sweep"] - r["epsilon_single"])
                  <= 1e-9 * max(1.0, abs(r["epsilon_single"])) for r in rows)
  group = result.groups[0]
  report = {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "rounds": args.rounds,
      "configurations": len(result.configs),
      "groups": len(result.groups),
      "vmapped_block_slots": group.slots,
      "single_run_block_slots": group.full_slots,
      "sweep_s": min(sweep_times),
      "separate_runs_s": min(single_times),
      "speedup": min(single_times) / min(sweep_times),
      "all_sweep_s": sweep_times,
      "all_separate_s": single_times,
      "max_abs_param_diff": worst,
      "epsilons_equal": eps_equal,
  }
  if args.json:
    print(json.dumps({"summary": report, "per_config": rows}, indent=1))
    return
  for r in rows:
    print(f"{r['id']} z={r['noise_multiplier']:g} C={r['clip_norm']:g} "
          f"lr={r['client_lr']:g} seed={r['seed']}: max|dparams| "
          f"{r['max_abs_param_diff']:.2e}, epsilon {r['epsilon_sweep']:.4f} "
          f"vs {r['epsilon_single']:.4f}, accuracy "
          f"{r['eval_accuracy_sweep']:.4f} vs {r['eval_accuracy_single']:.4f}")
  print(f"{report['configurations']} configurations, {args.rounds} rounds, "
        f"{report['backend']}: sweep {report['sweep_s']:.1f} s, separate runs "
        f"{report['separate_runs_s']:.1f} s, ratio {report['speedup']:.2f}x "
        f"(block {group.slots} of {group.full_slots} slots); params max abs "
        f"diff {worst:.2e}, epsilons equal: {eps_equal}")


if __name__ == "__main__":
  main()
