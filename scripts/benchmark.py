#!/usr/bin/env python
"""Benchmark of DP-FedAvg rounds on fixed, EMNIST-shaped workloads.

Workloads (synthetic EMNIST-shaped data from a fixed seed: 28x28x1 float32
inputs, 62 classes, 20 examples per client; one local epoch of batch 10, i.e.
2 SGD steps at lr 0.1; L2 clip 1.0; Gaussian noise z = 1.0 on the sum; divide
by the cohort size; server SGD lr 1.0):

  A: 2NN MLP (784-200-200-62), cohort 1,000 of 3,400 clients.
  B: McMahan et al. (2017) CNN, cohort 100 of 3,400 clients.
  C: A with cohort 10,000 of 34,000 clients (memory scaling).

For every workload it runs several *shapes* of the same round, each in a fresh
subprocess so that peak memory does not mix between shapes:

  loop            the baseline: a Python loop over the cohort, one jitted
                  (update + clip + accumulate) call per client, local steps
                  unrolled, then one jitted noise + server step.
  c{K}_{scan|unroll}
                  `dp_fedavg.build_round(clients_per_chunk=K,
                  unroll_local_steps=1|True)` under one `jax.jit`: the
                  chunk's K clients vmapped.
  c{K}_indep      `build_round(clients_per_chunk=K, vmap_clients=False,
                  unroll_local_steps=True)`: the chunk's K clients traced as
                  independent copies (the default on CPU, K = cores).
  factored        `build_round(factored=True)`: the clipped sum in
                  factored form for the MLP; for the CNN its dense head
                  factored and its convolutions trained per client, in
                  chunks laid out as `simulation.default_execution` picks
                  for this backend (on CPU: K = 2 x cores, independent copies).

and reports, per shape: seconds per round (median over `--rounds` rounds after
one warm-up round), client updates per second, compile time, memory, the
machine's float32 matmul peak (a large jitted `jnp.dot` measured in the same
process, after the rounds; the workload's FLOP bound uses the highest peak
its subprocesses measured, since other jobs on a shared machine only ever
lower it), the FLOP bound (FLOPs per round / peak, FLOPs counted as 3x the
forward multiply-adds x 2, the usual forward + backward convention) and the ratio to it, and the speed-up
over the `loop` baseline. CPU seconds per round (all threads) are reported
too: on a machine shared with other jobs they vary less than wall time.

Memory, per shape (all in MiB):
  peak_rss_mb       getrusage maxrss of the subprocess (includes the cohort's
                    input data, which is itself proportional to the cohort);
  round_extra_mb    RSS sampled every 2 ms while rounds run, minus RSS just
                    before the first round (after compilation): the round's
                    working memory as the OS sees it;
  xla_temp_mb       XLA's own memory analysis of the compiled round (temp
                    buffers), the working memory the program asks for.

Usage:
  python scripts/benchmark.py                       # A, B, C, default shapes
  python scripts/benchmark.py --workloads A --shapes loop,factored --rounds 7
  python scripts/benchmark.py --json                # one JSON object a line
  python scripts/benchmark.py --quick --json        # smoke test, small sizes
  python scripts/benchmark.py --end-to-end          # runner.run from a file

The machine may be shared: numbers are medians, and `--repeat N` reruns every
shape N times and keeps the median of the medians.
"""

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

EXAMPLES_PER_CLIENT = 20
BATCH_SIZE = 10
LOCAL_EPOCHS = 1
CLIENT_LR = 0.1
SERVER_LR = 1.0
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 62
SEED = 0


@dataclasses.dataclass(frozen=True)
class Workload:
  name: str
  model: str
  cohort: int
  population: int
  shapes: tuple[str, ...]
  quick_cohort: int
  quick_population: int
  quick_shapes: tuple[str, ...]


_EXISTING = tuple(f"c{k}_{u}" for k in (1, 10, 100) for u in ("scan", "unroll"))
_INDEPENDENT = ("c1_indep", "c2_indep", "c4_indep", "c8_indep")

WORKLOADS = {
    "A": Workload("A", "mlp_2nn", 1000, 3400,
                  ("loop",) + _EXISTING + _INDEPENDENT + ("factored",),
                  20, 68, ("loop", "c2_indep", "factored")),
    "B": Workload("B", "cnn", 100, 3400,
                  ("loop", "c1_scan", "c1_unroll", "c10_unroll")
                  + _INDEPENDENT[:3] + ("factored",),
                  4, 68, ("loop", "c2_indep", "factored")),
    "C": Workload("C", "mlp_2nn", 10000, 34000,
                  ("loop", "c1_scan", "c2_indep", "c8_indep", "factored"),
                  40, 680, ("loop", "factored")),
}

# cK_factored: the factored round with chunks of K clients traced as
# independent copies (for the CNN; `factored` picks K as the simulation does).
_FACTORED_CHUNKS = ("c2_factored", "c4_factored", "c8_factored")
ALL_SHAPES = (("loop",) + _EXISTING + _INDEPENDENT + ("factored",)
              + _FACTORED_CHUNKS)


# --------------------------------------------------------------------------
# Measurement helpers (run inside the child process).
# --------------------------------------------------------------------------


def _current_rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler:
  """Samples this process's RSS in a thread; keeps the maximum."""

  def __init__(self, period_s: float = 0.002):
    self.period_s = period_s
    self.peak = _current_rss()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _current_rss())
      time.sleep(self.period_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _current_rss())


def matmul_peak_gflops(sizes=(2048, 4096), reps: int = 5) -> float:
  """Float32 GFLOP/s of a large jitted jnp.dot (best size, median of reps)."""
  import jax
  import jax.numpy as jnp
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      times.append(time.perf_counter() - t0)
    best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    del a, b
  return best


def forward_macs_per_example(model, params) -> int:
  """Multiply-adds of one example's forward pass (dots and convolutions)."""
  import jax
  import jax.numpy as jnp

  x = jnp.zeros((1,) + tuple(model.input_shape), jnp.float32)
  jaxpr = jax.make_jaxpr(model.apply)(params, x)

  def count(jpr) -> int:
    total = 0
    for eqn in jpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        total += math.prod(out) * math.prod(lhs[d] for d in lc)
      elif name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        dn = eqn.params["dimension_numbers"]
        out_feat = rhs[dn.rhs_spec[0]]
        # Every output value is a dot over (kernel spatial x in-features).
        total += math.prod(out) * (math.prod(rhs) // out_feat)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        total += count(sub)
    return total

  return count(jaxpr.jaxpr)


def flops_per_round(model, params, num_examples: int) -> float:
  """Forward + backward = 3x the forward multiply-adds, x2 FLOPs each."""
  return 6.0 * forward_macs_per_example(model, params) * num_examples


# --------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------


def make_cohort_block(cohort: int, population: int, seed: int = SEED):
  """A full cohort laid out [clients, steps, batch, ...] (numpy).

  Clients are drawn uniformly without replacement from `population`; client
  k's 20 examples come from a generator seeded by (seed, k), so a client's
  data does not depend on the population size or on the other clients, and
  no population-sized array is ever held in memory. Inputs are uniform in
  [0, 1) (EMNIST pixel scale), labels uniform over the 62 classes. One epoch
  in a fresh random order per client gives 2 full batches of 10.
  """
  import numpy as np
  rng = np.random.default_rng([seed, population, cohort])
  clients = np.sort(rng.choice(population, size=cohort, replace=False))
  steps = LOCAL_EPOCHS * math.ceil(EXAMPLES_PER_CLIENT / BATCH_SIZE)
  x = np.empty((cohort, steps * BATCH_SIZE) + INPUT_SHAPE, np.float32)
  y = np.empty((cohort, steps * BATCH_SIZE), np.int32)
  for slot, k in enumerate(clients):
    crng = np.random.default_rng([seed, int(k)])
    cx = crng.random((EXAMPLES_PER_CLIENT,) + INPUT_SHAPE, np.float32)
    cy = crng.integers(0, NUM_CLASSES, EXAMPLES_PER_CLIENT)
    order = crng.permutation(EXAMPLES_PER_CLIENT)
    x[slot] = cx[order]
    y[slot] = cy[order]
  x = x.reshape((cohort, steps, BATCH_SIZE) + INPUT_SHAPE)
  y = y.reshape((cohort, steps, BATCH_SIZE))
  example_mask = np.ones((cohort, steps, BATCH_SIZE), bool)
  client_mask = np.ones((cohort,), bool)
  return {"x": x, "y": y}, example_mask, client_mask


# --------------------------------------------------------------------------
# One (workload, shape) measurement: runs in a child process.
# --------------------------------------------------------------------------


def build_shape_round(shape: str, model, client_opt, server_opt):
  """The unjitted round_fn of a shape name (not "loop")."""
  from fedjax_dp.algorithms import dp_fedavg
  if shape.startswith("c") and shape.endswith("_factored"):
    return dp_fedavg.build_round(
        model, client_opt, server_opt, clients_per_chunk=int(shape[1:-9]),
        vmap_clients=False, factored=True)
  if shape.startswith("c"):
    k, kind = shape[1:].split("_")
    return dp_fedavg.build_round(
        model, client_opt, server_opt, clients_per_chunk=int(k),
        vmap_clients=kind != "indep",
        unroll_local_steps=True if kind in ("unroll", "indep") else 1)
  if shape == "factored":
    from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
    from fedjax_dp import simulation  # pylint: disable=g-import-not-at-top
    from fedjax_dp.algorithms import factored  # pylint: disable=g-import-not-at-top
    if model.name not in factored.FEATURE_MODELS:
      return dp_fedavg.build_round(model, client_opt, server_opt,
                                   factored=True)
    execution = simulation.default_execution(
        config_lib.Config(), capacity=2**31 - 1, factored_features=True)
    return dp_fedavg.build_round(
        model, client_opt, server_opt,
        clients_per_chunk=execution.clients_per_chunk,
        vmap_clients=execution.vmap_clients, factored=True)
  raise ValueError(f"unknown shape {shape!r}")


def measure(spec: dict) -> dict:
  """Measures one shape on one workload; returns a JSON-able dict."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_dp import client as client_lib
  from fedjax_dp import server as server_lib
  from fedjax_dp import tree_util
  from fedjax_dp.algorithms import dp_fedavg
  from fedjax_dp.data import blocks
  from fedjax_dp.models import registry
  from fedjax_dp.privacy import clipping
  from fedjax_dp.privacy import noise

  shape, rounds = spec["shape"], spec["rounds"]
  model = registry.get_model(spec["model"], INPUT_SHAPE, NUM_CLASSES)
  features, example_mask, client_mask = make_cohort_block(
      spec["cohort"], spec["population"])
  block = blocks.ClientBlock(
      jax.device_put(features), jax.device_put(example_mask),
      jax.device_put(client_mask))
  del features, example_mask, client_mask
  jax.block_until_ready(block)
  client_opt = client_lib.client_optimizer("sgd")
  server_opt = server_lib.server_optimizer("sgd")
  params = model.init(jax.random.key(SEED))
  flops = flops_per_round(model, params,
                          spec["cohort"] * EXAMPLES_PER_CLIENT * LOCAL_EPOCHS)
  hparams = dp_fedavg.RoundHparams.create(
      client_lr=CLIENT_LR, server_lr=SERVER_LR, clip_norm=CLIP_NORM,
      noise_multiplier=NOISE_MULTIPLIER, denominator=spec["cohort"])
  state = server_lib.init(params, server_opt)
  noise_key = jax.random.key(SEED + 1)
  xla_temp = None

  if shape == "loop":
    client_update = client_lib.make_client_update(model, client_opt,
                                                  unroll=True)

    def accumulate(total, params, block, k, hparams):
      f, m = jax.tree_util.tree_map(
          lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False),
          (block.features, block.example_mask))
      out = client_update(params, f, m, hparams.client_lr)
      clip = clipping.clip_by_global_norm(out.delta, hparams.clip_norm)
      keep = block.client_mask[k]
      return jax.tree_util.tree_map(
          lambda t, c: t + jnp.where(keep, c, 0.0), total, clip.clipped)

    def finish(state, total, hparams, key):
      stddev = noise.noise_stddev(hparams.noise_multiplier, hparams.clip_norm)
      noisy = noise.add_gaussian_noise(total, stddev, key)
      average = tree_util.tree_scale(noisy, 1.0 / hparams.denominator)
      return server_lib.step(state, average, hparams.server_lr, server_opt)

    t0 = time.perf_counter()
    zeros = tree_util.tree_zeros_like(params)
    acc = jax.jit(accumulate, donate_argnums=(0,)).lower(
        zeros, params, block, 0, hparams).compile()
    fin = jax.jit(finish, donate_argnums=(0, 1)).lower(
        state, zeros, hparams, noise_key).compile()
    compile_s = time.perf_counter() - t0
    cohort = spec["cohort"]

    def one_round(state, key):
      total = tree_util.tree_zeros_like(state.params)
      for k in range(cohort):
        total = acc(total, state.params, block, k, hparams)
      return fin(state, total, hparams, key), None
  else:
    round_fn = build_shape_round(shape, model, client_opt, server_opt)
    t0 = time.perf_counter()
    compiled = jax.jit(round_fn, donate_argnums=(0,)).lower(
        state, block, hparams, noise_key).compile()
    compile_s = time.perf_counter() - t0
    try:
      analysis = compiled.memory_analysis()
      xla_temp = int(analysis.temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
      xla_temp = None

    def one_round(state, key):
      return compiled(state, block, hparams, key)

  rss_before = _current_rss()
  times, cpu_times = [], []
  with _RssSampler() as sampler:
    state, _ = one_round(state, jax.random.fold_in(noise_key, 0))  # warm-up
    jax.block_until_ready(state)
    for r in range(1, rounds + 1):
      t0, c0 = time.perf_counter(), time.process_time()
      state, metrics = one_round(state, jax.random.fold_in(noise_key, r))
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
  finite = bool(np.all([np.all(np.isfinite(np.asarray(x)))
                        for x in jax.tree_util.tree_leaves(state.params)]))
  peak_rss = _max_rss()
  peak = (matmul_peak_gflops(sizes=(1024,), reps=3) if spec.get("quick")
          else matmul_peak_gflops())
  s_per_round = statistics.median(times)
  mib = 1024.0**2
  return {
      "shape": shape,
      "s_per_round": s_per_round,
      "round_times_s": times,
      # CPU seconds the whole process used per round (all threads): less
      # sensitive than wall time to other jobs on a shared machine.
      "cpu_s_per_round": statistics.median(cpu_times),
      "updates_per_s": spec["cohort"] / s_per_round,
      "compile_s": compile_s,
      "peak_rss_mb": peak_rss / mib,
      "round_extra_mb": max(sampler.peak - rss_before, 0) / mib,
      "xla_temp_mb": None if xla_temp is None else xla_temp / mib,
      "matmul_peak_gflops": peak,
      "flops_per_round": flops,
      "params_finite": finite,
  }


# --------------------------------------------------------------------------
# Parent: orchestration and reporting.
# --------------------------------------------------------------------------


def run_child(spec: dict) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--_child",
         json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"shape": spec["shape"], "error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workload(w: Workload, args) -> dict:
  cohort = args.cohort or (w.quick_cohort if args.quick else w.cohort)
  population = args.population or (
      w.quick_population if args.quick else w.population)
  population = max(population, cohort)
  shapes = (args.shapes.split(",") if args.shapes
            else (w.quick_shapes if args.quick else w.shapes))
  if "loop" not in shapes:
    shapes = ["loop"] + list(shapes)
  results = {}
  for shape in shapes:
    runs = []
    for _ in range(args.repeat):
      runs.append(run_child({
          "shape": shape, "model": w.model, "cohort": cohort,
          "population": population, "rounds": args.rounds,
          "quick": bool(args.quick)}))
      if "error" in runs[-1]:
        break
    ok = [r for r in runs if "error" not in r]
    if not ok:
      results[shape] = runs[-1]
      print(f"[{w.name}] {shape}: FAILED\n{runs[-1]['error']}",
            file=sys.stderr)
      continue
    res = dict(min(ok, key=lambda r: abs(
        r["s_per_round"] - statistics.median(x["s_per_round"] for x in ok))))
    res["s_per_round_runs"] = [r["s_per_round"] for r in ok]
    res["s_per_round"] = statistics.median(res["s_per_round_runs"])
    res["updates_per_s"] = cohort / res["s_per_round"]
    results[shape] = res
    if not args.quiet:
      print(f"[{w.name}] {shape}: {res['s_per_round']:.4f} s/round, "
            f"compile {res['compile_s']:.1f} s, round_extra "
            f"{res['round_extra_mb']:.0f} MiB", file=sys.stderr)

  good = {k: v for k, v in results.items() if "error" not in v}
  # Each subprocess measures the peak after its rounds. On a shared machine
  # other jobs only ever lower it, so the highest measurement is the best
  # estimate of what the machine can do (and the strictest bound).
  peak = max(v["matmul_peak_gflops"] for v in good.values())
  flops = next(iter(good.values()))["flops_per_round"]
  flop_bound_s = flops / (peak * 1e9)
  loop_s = good["loop"]["s_per_round"] if "loop" in good else float("nan")
  for v in good.values():
    v["ratio_to_flop_bound"] = v["s_per_round"] / flop_bound_s
    # The same against the peak measured in that shape's own process.
    v["ratio_to_own_flop_bound"] = v["s_per_round"] / (
        flops / (v["matmul_peak_gflops"] * 1e9))
    v["speedup_vs_loop"] = loop_s / v["s_per_round"]
  best_name = min(good, key=lambda k: good[k]["s_per_round"])
  best = good[best_name]
  return {
      "workload": w.name,
      "model": w.model,
      "cohort": cohort,
      "population": population,
      "examples_per_client": EXAMPLES_PER_CLIENT,
      "local_steps": LOCAL_EPOCHS * math.ceil(EXAMPLES_PER_CLIENT / BATCH_SIZE),
      "rounds": args.rounds,
      "quick": bool(args.quick),
      "matmul_peak_gflops": peak,
      "flops_per_round": flops,
      "flop_bound_s": flop_bound_s,
      "loop_s_per_round": loop_s,
      "best_shape": best_name,
      "s_per_round": best["s_per_round"],
      "updates_per_s": best["updates_per_s"],
      "compile_s": best["compile_s"],
      "peak_rss_mb": best["peak_rss_mb"],
      "round_extra_mb": best["round_extra_mb"],
      "xla_temp_mb": best["xla_temp_mb"],
      "ratio_to_flop_bound": best["ratio_to_flop_bound"],
      "speedup_vs_loop": best["speedup_vs_loop"],
      "shapes": results,
  }


def print_table(res: dict):
  print(f"\nWorkload {res['workload']} ({res['model']}, cohort "
        f"{res['cohort']} of {res['population']}); matmul peak "
        f"{res['matmul_peak_gflops']:.0f} GFLOP/s; "
        f"{res['flops_per_round'] / 1e9:.1f} GFLOP/round; FLOP bound "
        f"{res['flop_bound_s']:.4f} s")
  print(f"{'shape':<18} {'s/round':>9} {'cpu s':>7} {'upd/s':>9} {'x bound':>8} "
        f"{'vs loop':>8} {'compile':>8} {'rss MiB':>8} {'extra':>7} "
        f"{'xla tmp':>8}")
  for name, v in res["shapes"].items():
    if "error" in v:
      print(f"{name:<18} FAILED")
      continue
    tmp = "-" if v["xla_temp_mb"] is None else f"{v['xla_temp_mb']:.0f}"
    cpu = v.get("cpu_s_per_round", float("nan"))
    print(f"{name:<18} {v['s_per_round']:>9.4f} {cpu:>7.3f} "
          f"{v['updates_per_s']:>9.0f} "
          f"{v['ratio_to_flop_bound']:>8.2f} {v['speedup_vs_loop']:>8.2f} "
          f"{v['compile_s']:>8.1f} {v['peak_rss_mb']:>8.0f} "
          f"{v['round_extra_mb']:>7.0f} {tmp:>8}")
  print(f"best: {res['best_shape']}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default="A,B,C")
  p.add_argument("--shapes", default=None,
                 help=f"comma-separated, from {','.join(ALL_SHAPES)}; the "
                 "loop baseline is always added")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds after one warm-up (default 5; 2 quick)")
  p.add_argument("--cohort", type=int, default=None)
  p.add_argument("--population", type=int, default=None)
  p.add_argument("--repeat", type=int, default=1,
                 help="fresh subprocesses per shape (median of medians)")
  p.add_argument("--quick", action="store_true", help="small smoke test")
  p.add_argument("--json", action="store_true",
                 help="one JSON object per workload on stdout")
  p.add_argument("--quiet", action="store_true",
                 help="no per-shape progress lines on stderr")
  p.add_argument("--end-to-end", action="store_true",
                 help="the user's path instead: runner.run on a data file "
                 "(workloads A, B, digits; see end_to_end_benchmark.py)")
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.end_to_end:
    import end_to_end_benchmark  # pylint: disable=g-import-not-at-top
    forwarded = ["--workloads", args.workloads]
    if args.workloads == "A,B,C":  # this script's default
      forwarded[1] = ",".join(end_to_end_benchmark.WORKLOADS)
    if args.rounds:
      forwarded += ["--rounds", str(args.rounds)]
    forwarded += ["--quick"] * args.quick + ["--json"] * args.json
    end_to_end_benchmark.main(forwarded)
    return
  if args._child is not None:  # pylint: disable=protected-access
    print(json.dumps(measure(json.loads(args._child))))  # pylint: disable=protected-access
    return
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  for name in args.workloads.split(","):
    res = run_workload(WORKLOADS[name.strip().upper()], args)
    if args.json:
      print(json.dumps(res), flush=True)
    else:
      print_table(res)


if __name__ == "__main__":
  main()
