"""Seconds per round: the host loop (rounds_per_call=1) vs K rounds per call.

On one configuration (default: the default experiment,
`fedjax_dp.config.Config()`: digits, 2NN, expected cohort 50), in one
process, `--repeats` times each, median reported with the ratio:

* "runner": `runner.run` with rounds_per_call=1 and =K. A round's time comes
  from the metrics' `elapsed_s` stamps over rounds [K, rounds - K): the
  first call (compilation) and the last (the final evaluation) are left
  out; every per-round cost of a real run is in (sampling, data layout, the
  round, accounting, metrics). Evaluation runs only at the end
  (eval_every = rounds), so calls hold K rounds.
* "rounds only": the same without accounting and logging, after a warm-up
  call: the host loop's sample + layout (on a background thread, as the
  runner does) + round + fetch of the metrics, against one multi-round call
  per K rounds + fetch of its metrics.

  python scripts/multi_round_benchmark.py --rounds 60 --rounds-per-call 10
  python scripts/multi_round_benchmark.py --set model=logistic --json
"""

import argparse
import json
import statistics
import time

import jax

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import simulation
from fedjax_dp import on_device
from fedjax_dp.data import prefetch


def seconds_per_round(config: config_lib.Config, window: int) -> float:
  history = runner.run(config, progress=False, log=lambda s: None).history
  first, last = window - 1, config.rounds - window - 1
  return (history[last]["elapsed_s"] - history[first]["elapsed_s"]) / (
      last - first)


def rounds_only(config: config_lib.Config, k: int, repeats: int
                ) -> tuple[list[float], list[float]]:
  """Seconds per round of the two loops without accounting, per repeat."""
  sim = simulation.build(config)
  hparams = sim.hparams()
  streams = sim.streams()
  noise_key = streams.noise
  round_fn = jax.jit(sim.round_fn(), donate_argnums=(0,))
  sample_fn = jax.jit(sim.plan.sampler.sample_round)

  def host_rounds(state, rounds):
    cohorts = prefetch.Prefetcher(
        lambda r: sim.prepare(r, streams, sample_fn)[0], rounds, depth=2)
    with cohorts:
      for r, block in zip(rounds, cohorts):
        state, metrics = round_fn(
            state, block, hparams, jax.random.fold_in(noise_key, r))
        jax.device_get(metrics)
    return state

  multi_round = jax.jit(on_device.build_multi_round(sim),
                        static_argnames="num_rounds", donate_argnums=(0,))
  population = on_device.device_population(sim)
  keys = on_device.multi_round_keys(streams)

  def device_rounds(state, first, num_calls):
    for c in range(num_calls):
      state, metrics, aux = multi_round(
          state, hparams, population, keys, first + c * k, k,
          num_rounds=k)
      jax.device_get((metrics, aux))
    return state

  host, device = [], []
  state = host_rounds(sim.initial_state(config.seed), range(k))  # warm-up
  for i in range(repeats):
    start = time.perf_counter()
    state = host_rounds(state, range((i + 1) * 2 * k, (i + 2) * 2 * k))
    host.append((time.perf_counter() - start) / (2 * k))
  state = device_rounds(sim.initial_state(config.seed), 0, 1)  # warm-up
  for i in range(repeats):
    start = time.perf_counter()
    state = device_rounds(state, (i + 1) * 2 * k, 2)
    device.append((time.perf_counter() - start) / (2 * k))
  return host, device


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=60)
  parser.add_argument("--rounds-per-call", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--set", action="append", default=[],
                      metavar="FIELD=VALUE", help="config override")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  k = args.rounds_per_call
  if args.rounds < 3 * k:
    parser.error("--rounds must be at least 3 x --rounds-per-call (a warm-up "
                 "call, measured calls, a final call)")

  config = config_lib.Config()
  for assignment in args.set:
    config = config_lib.parse_override(config, assignment)
  config = config.replace(rounds=args.rounds, eval_every=args.rounds,
                          rounds_per_call=1)
  if config.adaptive_clipping or config.secagg_bits or \
      config.mechanism == "tree":
    parser.error("the rounds-only loops pass no adaptive, secagg or tree "
                 "arguments; benchmark such configurations with the runner")
  host, device = [], []
  for _ in range(args.repeats):
    host.append(seconds_per_round(config, k))
    device.append(seconds_per_round(config.replace(rounds_per_call=k), k))
  host_only, device_only = rounds_only(config, k, args.repeats)
  report = {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "config": {name: getattr(config, name) for name in (
          "dataset", "model", "cohort_size", "local_epochs", "batch_size",
          "round_shape")},
      "rounds": args.rounds,
      "rounds_per_call": k,
      "measured_rounds": args.rounds - 2 * k,
      "repeats": args.repeats,
      "host_loop_s_per_round": statistics.median(host),
      "on_device_s_per_round": statistics.median(device),
      "speedup": statistics.median(host) / statistics.median(device),
      "all_host_loop_s_per_round": host,
      "all_on_device_s_per_round": device,
      "rounds_only_host_loop_s_per_round": statistics.median(host_only),
      "rounds_only_on_device_s_per_round": statistics.median(device_only),
      "rounds_only_speedup": (statistics.median(host_only) /
                              statistics.median(device_only)),
      "all_rounds_only_host_loop_s_per_round": host_only,
      "all_rounds_only_on_device_s_per_round": device_only,
  }
  if args.json:
    print(json.dumps(report, indent=1))
    return
  print(f"{config.dataset}/{config.model}, cohort {config.cohort_size}, "
        f"{report['backend']}, medians of {args.repeats}:")
  print(f"  runner:      host loop {report['host_loop_s_per_round']:.4f} "
        f"s/round, rounds_per_call={k} "
        f"{report['on_device_s_per_round']:.4f} s/round, ratio "
        f"{report['speedup']:.2f}x (rounds {k} to {args.rounds - k - 1})")
  print(f"  rounds only: host loop "
        f"{report['rounds_only_host_loop_s_per_round']:.4f} s/round, "
        f"rounds_per_call={k} "
        f"{report['rounds_only_on_device_s_per_round']:.4f} s/round, ratio "
        f"{report['rounds_only_speedup']:.2f}x")


if __name__ == "__main__":
  main()
