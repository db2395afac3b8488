#!/usr/bin/env python
"""The user's path: `runner.run` on a data file, against the compiled round.

Workloads (`benchmark.py --end-to-end` runs them; this module can run alone):

  A: benchmark.py's workload A (2NN, fixed-size cohorts of 1,000 of 3,400
     clients of 20 EMNIST-shaped examples), read from a TFF-layout HDF5 file
     of those clients written by this script (0.2 GB), RDP ledger;
  A_disk: A with the population left on disk (`in_memory=False`): each
     round reads its cohort from the file on the prefetch thread;
  B: the same with the McMahan CNN and cohorts of 100;
  digits: the default experiment as `fedjax-dp train` runs it (150 rounds,
     evaluated every 10), scikit-learn's digits over 500 clients.

For each, in one fresh process per compilation-cache state (a cold cache,
then the same cache warm):

  * `runner.run` as a user calls it: seconds per round (median of the
    differences of the rows' `elapsed_s` after the first round, the
    evaluation round excluded), the first round's time from the call
    (building, accounting the plan, compiling or loading the round), and the
    host loop's own counters: seconds spent on accounting and waiting for a
    cohort (`host_accounting_s`, `host_data_wait_s`; the first round's wait,
    which includes compiling the sampler and the layout, apart), per round
    and as a share of the rounds' wall time after the first;
  * in the same process, the round the runner compiled, alone: the same
    jitted function timed on one prepared cohort (median), and the host's
    preparation of one cohort (`Simulation.prepare`: sampling, gathering and
    laying out; median), which the runner overlaps with the rounds;
  * the float32 matmul peak and the FLOP bound (benchmark.py's convention).

Usage:
  python scripts/benchmark.py --end-to-end --workloads A,B,digits
  python scripts/end_to_end_benchmark.py --workloads digits --json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchmark  # scripts/benchmark.py: workloads, data, FLOP counting

WORKLOADS = ("A", "A_disk", "B", "digits")


def write_population_file(path: str, population: int, clients=None,
                          seed: int = benchmark.SEED) -> None:
  """A TFF-layout HDF5 file of benchmark clients `clients` (default: all
  of `population`), client k's examples generated as benchmark.py's
  cohorts draw them."""
  import numpy as np
  from fedjax_dp.data.formats import tff_hdf5
  clients = range(population) if clients is None else clients
  ids, feats = [], []
  for k in clients:
    crng = np.random.default_rng([seed, int(k)])
    x = crng.random((benchmark.EXAMPLES_PER_CLIENT,) + benchmark.INPUT_SHAPE,
                    np.float32)
    y = crng.integers(0, benchmark.NUM_CLASSES,
                      benchmark.EXAMPLES_PER_CLIENT).astype(np.int32)
    ids.append(f"client{int(k):06d}")
    feats.append({"pixels": x, "label": y})
  tff_hdf5.write_tff_hdf5(path, ids, feats)


def workload_config(name: str, data_dir: str, rounds: int, quick: bool):
  """The workload's config (the default experiment's for digits)."""
  from fedjax_dp import config as config_lib
  if name == "digits":
    # The default experiment as it is (150 rounds, evaluated every 10).
    del rounds
    return config_lib.Config(name="digits")
  w = benchmark.WORKLOADS[name[0]]
  cohort = w.quick_cohort if quick else w.cohort
  return config_lib.Config(
      name=f"end_to_end_{name}", dataset="file",
      dataset_kwargs={
          "path": os.path.join(data_dir, "train.h5"),
          "eval_path": os.path.join(data_dir, "eval.h5"),
          "num_classes": benchmark.NUM_CLASSES, "x": "pixels", "y": "label",
          "max_eval_clients": 50, "in_memory": not name.endswith("_disk")},
      model=w.model, rounds=rounds, eval_every=rounds,
      sampling="fixed", cohort_size=cohort, sampling_probability=None,
      batch_size=benchmark.BATCH_SIZE, local_epochs=benchmark.LOCAL_EPOCHS,
      client_lr=benchmark.CLIENT_LR, server_lr=benchmark.SERVER_LR,
      clip_norm=benchmark.CLIP_NORM,
      noise_multiplier=benchmark.NOISE_MULTIPLIER, target_epsilon=None,
      accountant="rdp", delta=1e-5)


def _compiled_round_alone(sim, repeats: int):
  """(median s of the round the runner compiles, alone, on one prepared
  cohort; median s of preparing one cohort on the host)."""
  import jax
  streams = sim.streams()
  sample = jax.jit(sim.plan.sampler.sample_round)
  prepare_times, blocks = [], []
  for r in range(repeats + 1):
    t0 = time.perf_counter()
    blocks.append(sim.prepare(r, streams, sample)[0])
    prepare_times.append(time.perf_counter() - t0)
  fn = jax.jit(sim.round_fn(), donate_argnums=(0,))
  state, hparams = sim.initial_state(), sim.hparams()
  block = jax.device_put(blocks[0])
  state, _ = fn(state, block, hparams, jax.random.key(0))
  jax.block_until_ready(state)
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    state, metrics = fn(state, block, hparams, jax.random.key(r + 1))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  # The first preparation also compiled the sampler and the layout.
  return statistics.median(times), statistics.median(prepare_times[1:])


def measure(spec: dict) -> dict:
  """One workload in this process (a child): see the module docstring."""
  from fedjax_dp import compilation_cache
  compilation_cache.enable(spec["cache_dir"])
  import logging  # pylint: disable=g-import-not-at-top
  logging.getLogger("absl").setLevel(logging.ERROR)
  from fedjax_dp import round_calls  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  from fedjax_dp import simulation  # pylint: disable=g-import-not-at-top
  config = workload_config(spec["workload"], spec["data_dir"],
                           spec["rounds"], spec["quick"])
  rounds = config.rounds
  # The wait for each round's cohort (the first includes compiling the
  # sampler and the layout).
  waits = []
  start = round_calls.HostRounds.start

  def timed_start(self, *args, **kwargs):
    before = self.data_wait_s
    out = start(self, *args, **kwargs)
    waits.append(self.data_wait_s - before)
    return out

  round_calls.HostRounds.start = timed_start
  result = runner.run(config, progress=False, log=lambda s: None)
  round_calls.HostRounds.start = start
  elapsed = [row["elapsed_s"] for row in result.history]
  # Rounds 1 .. rounds-2: after the first (compiling), before the last
  # (evaluating); the median leaves out the evaluation rounds.
  steps = [b - a for a, b in zip(elapsed[:-1], elapsed[1:])][:-1]
  summary = result.summary
  sim = simulation.build(config)
  round_s, prepare_s = _compiled_round_alone(sim, spec["repeats"])
  params = sim.initial_params(0)
  examples = sim.slots * sim.num_steps * config.batch_size
  flops = benchmark.flops_per_round(sim.model, params, examples)
  peak = benchmark.matmul_peak_gflops(
      sizes=(1024,) if spec["quick"] else (2048, 4096), reps=3)
  s_per_round = statistics.median(steps)
  timed = elapsed[-1] - elapsed[0]  # rounds 1 .. end
  # Accounting on the host loop's path: recording events (every round) and
  # waiting for reported epsilons (computed ahead on a worker thread).
  accounting = summary["host_accounting_s"]
  return {
      "workload": spec["workload"], "cache": spec["cache"],
      "model": config.model, "cohort_slots": sim.slots,
      "training_clients": sim.train.num_clients,
      "population_in_memory": type(sim.train).__name__ ==
                              "FederatedPopulation",
      "rounds": rounds, "first_round_s": elapsed[0],
      "end_to_end_s_per_round": s_per_round,
      "end_to_end_mean_s_per_round": timed / (rounds - 1),
      "compiled_round_s": round_s,
      "ratio_to_compiled_round": s_per_round / round_s,
      "host_prepare_s": prepare_s,
      "first_data_wait_s": waits[0],
      "host_data_wait_s_per_round": sum(waits[1:]) / (rounds - 1),
      "host_accounting_s_per_round": accounting / rounds,
      # Host preparation and accounting on the critical path, rounds 1 ..
      # end, as a share of their wall time.
      "host_share_of_round": (sum(waits[1:]) + accounting) / timed,
      "matmul_peak_gflops": peak, "flops_per_round": flops,
      "flop_bound_s": flops / (peak * 1e9),
      "ratio_to_flop_bound": s_per_round / (flops / (peak * 1e9)),
      "epsilon": summary["epsilon"],
  }


def run(workloads, rounds: int, repeats: int, quick: bool) -> list[dict]:
  """Every workload with a cold, then a warm, compilation cache; one child
  process each."""
  results = []
  with tempfile.TemporaryDirectory(prefix="fedjax_dp_e2e_") as tmp:
    population = 68 if quick else 3400
    if any(w != "digits" for w in workloads):
      t0 = time.perf_counter()
      write_population_file(os.path.join(tmp, "train.h5"), population)
      # Held-out clients: 50 more, not in the training file.
      write_population_file(os.path.join(tmp, "eval.h5"), population + 50,
                            clients=range(population, population + 50))
      print(f"wrote {population} clients to {tmp}/train.h5 in "
            f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for workload in workloads:
      cache_dir = os.path.join(tmp, f"xla_cache_{workload}")
      for cache in ("cold", "warm"):
        spec = {"workload": workload, "cache": cache, "cache_dir": cache_dir,
                "data_dir": tmp, "rounds": rounds, "repeats": repeats,
                "quick": quick}
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_child",
             json.dumps(spec)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
          raise RuntimeError(f"{workload} ({cache}): {proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"[{workload} {cache}] {r['end_to_end_s_per_round']:.4f} s/round "
              f"end to end, compiled round {r['compiled_round_s']:.4f} s "
              f"({r['ratio_to_compiled_round']:.2f}x), first round "
              f"{r['first_round_s']:.2f} s", file=sys.stderr)
  return results


def print_table(results: list[dict]) -> None:
  print(f"\n{'workload':<8} {'cache':<5} {'e2e s/rd':>9} {'round s':>8} "
        f"{'x round':>7} {'x bound':>7} {'prep s':>7} {'wait/rd':>8} "
        f"{'acct/rd':>8} {'host %':>6} {'1st rd s':>8}")
  for r in results:
    print(f"{r['workload']:<8} {r['cache']:<5} "
          f"{r['end_to_end_s_per_round']:>9.4f} {r['compiled_round_s']:>8.4f} "
          f"{r['ratio_to_compiled_round']:>7.2f} "
          f"{r['ratio_to_flop_bound']:>7.2f} {r['host_prepare_s']:>7.4f} "
          f"{r['host_data_wait_s_per_round']:>8.4f} "
          f"{r['host_accounting_s_per_round']:>8.5f} "
          f"{100 * r['host_share_of_round']:>6.1f} "
          f"{r['first_round_s']:>8.2f}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default=",".join(WORKLOADS))
  p.add_argument("--rounds", type=int, default=None,
                 help="rounds per run (default 12; 4 quick)")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed compiled rounds and preparations (default 5)")
  p.add_argument("--quick", action="store_true", help="small smoke test")
  p.add_argument("--json", action="store_true")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child is not None:  # pylint: disable=protected-access
    print(json.dumps(measure(json.loads(args._child))))  # pylint: disable=protected-access
    return
  rounds = args.rounds or (4 if args.quick else 12)
  repeats = args.repeats or (2 if args.quick else 5)
  workloads = [w.strip() for w in args.workloads.split(",")]
  for w in workloads:
    if w not in WORKLOADS:
      p.error(f"--workloads: {w!r} is not one of {','.join(WORKLOADS)}")
  results = run(workloads, rounds, repeats, args.quick)
  if args.json:
    for r in results:
      print(json.dumps(r))
  else:
    print_table(results)


if __name__ == "__main__":
  main()
