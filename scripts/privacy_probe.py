"""Black-box privacy probes of fedjax-dp, through its public API.

For every round shape and every mechanism this builds a run as a user would
(`simulation.build` with an in-memory dataset, the Simulation's compiled
round, its hyperparameters, random streams and DP events; `sweep.run_sweep`
for sweeps) and measures what a round releases (the noisy sum of clipped
updates, read off the model: server SGD with learning rate 1):

  clip       one adversarial client (cancelling gradients, inputs of 1e3 to
             1e30, NaN / Inf / 3e38 in an example, or none at all) added to
             a cohort moves the release by at most the sensitivity the
             ledger's event assumes (add/remove neighbours: two datasets);
  noise      with noise on and no signal, the release's std is the one the
             ledger's event implies, and its law is Gaussian (Laplace);
  rounds     two rounds' noise is uncorrelated (two trees' for DP-FTRL);
  configs    two runs of one seed that differ in a setting (two train runs,
             or two sweep configurations) draw uncorrelated noise;
  example    under DP-SGD one example moves a local step by at most
             lr * example_clip_norm / batch.

Prints one line per probe (the measured value against its limit) and exits
with status 1 if any probe fails.

    python scripts/privacy_probe.py            # every shape x mechanism
    python scripts/privacy_probe.py --quick    # the plain round and the
                                               # factored ones, fewer kinds
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python scripts/privacy_probe.py --shapes sharded
"""

import argparse
import math
import sys
import time

import jax
import numpy as np
from scipy import stats

from fedjax_dp import config as config_lib
from fedjax_dp import simulation
from fedjax_dp import sweep
from fedjax_dp import worst_case
from fedjax_dp.privacy import clipping

SHAPE, CLASSES, BATCH, CLIP, LR = (8, 8, 1), 10, 10, 0.5, 0.1

SHAPES = {
    "plain": ("mlp_2nn", dict(round_shape="plain", clients_per_chunk=1)),
    "vmapped": ("mlp_2nn", dict(round_shape="plain", clients_per_chunk=4,
                                vmap_clients=True)),
    "independent": ("cnn", dict(round_shape="plain", clients_per_chunk=2,
                                vmap_clients=False)),
    "factored_dense": ("mlp_2nn", dict(round_shape="factored")),
    "factored_cnn": ("cnn", dict(round_shape="factored",
                                 clients_per_chunk=2, vmap_clients=False)),
    "sharded": ("mlp_2nn", dict(round_shape="plain", shard_clients=True,
                                clients_per_chunk=1)),
}
MECHANISMS = dict(
    worst_case.MECHANISMS,
    per_layer=dict(per_layer_clipping="size_proportional"),
    # Every client in every round (one-round trees): the adversary takes part.
    dp_ftrl=dict(worst_case.MECHANISMS["dp_ftrl"], tree_restart_every=1),
    # One group of the 6 clients (b = 1): every client in every round.
    band_mf=dict(worst_case.MECHANISMS["band_mf"], min_separation=1,
                 mf_bands=1),
    blt=dict(worst_case.MECHANISMS["blt"], min_separation=1))
KINDS = tuple(k for k in worst_case.KINDS if k != "ordinary")


def client(kind, rng, size=6):
  return worst_case.client(kind, rng, size, SHAPE, CLASSES)


def dataset(clients):
  return worst_case.dataset(clients, SHAPE, CLASSES, "probe")


def ordinary(n, seed):
  rng = np.random.default_rng(seed)
  return [client("ordinary", rng, BATCH if i == 0 else
                 int(rng.integers(1, BATCH + 1))) for i in range(n)]


def config(shape, mechanism, **changes):
  model, layout = SHAPES[shape]
  base = config_lib.Config(
      name=f"probe-{shape}-{mechanism}", model=model,
      model_kwargs={"hidden": (32, 16)} if model == "mlp_2nn" else {},
      rounds=4, sampling_probability=1.0, cohort_size=None, capacity=8,
      clip_norm=CLIP, noise_multiplier=0.0, delta=1e-5,
      server_optimizer="sgd", server_lr=1.0, client_lr=LR, local_epochs=1,
      batch_size=BATCH, eval_every=100)
  return base.replace(**layout, **MECHANISMS[mechanism], **changes)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


class Run:
  """One configuration's compiled round, fed cohorts from datasets."""

  def __init__(self, cfg, clients):
    self.cfg = cfg
    self.sim = simulation.build(cfg, dataset(clients))
    self.round = jax.jit(self.sim.round_fn())
    self.sample = jax.jit(self.sim.plan.sampler.sample_round)

  def release(self, clients, *, state=None, round_index=0, kind=None):
    """The release of round `round_index` over a dataset of `clients`."""
    sim = simulation.build(self.cfg, dataset(clients))
    streams = sim.streams()
    block = sim.prepare(round_index, streams, self.sample)[0]
    state = worst_case.at_round(
        sim.plan, worst_case.state_for(sim, kind) if state is None else state,
        round_index)
    hparams = sim.hparams()
    new, metrics = self.round(
        state, block, hparams, jax.random.fold_in(streams.noise, round_index),
        None, sim.plan.adaptive_hparams(), sim.plan.secagg_params())
    release = (flat(new.params) - flat(state.params)) * float(
        hparams.denominator)
    return release, jax.device_get(metrics)


class Report:

  def __init__(self):
    self.failures = 0

  def line(self, shape, mechanism, probe, value, limit, ok, note=""):
    self.failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {shape:15s} {mechanism:12s} "
          f"{probe:24s} {value:12.6g} {'<=' if ok else '> '} {limit:<12.6g} "
          f"{note}", flush=True)


def probe_clip(report, shape, mechanism, kinds):
  base = ordinary(5, seed=1)
  run = Run(config(shape, mechanism), [client(kinds[0], np.random.default_rng(
      0))] + base)
  p, limit = worst_case.contribution_bound(run.sim)
  # The neighbour the ledger's relation names: the adversary removed
  # (add/remove), or replaced by the empty record (zero-out).
  zero_out = run.sim.plan.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  neighbour = [client("empty", np.random.default_rng(0))] + base if zero_out \
      else base
  for kind in kinds:
    adversary = client(kind, np.random.default_rng(0))
    state = worst_case.state_for(run.sim, kind)
    with_it, _ = run.release([adversary] + base, state=state)
    without, _ = run.release(neighbour, state=state)
    moved = float(np.linalg.norm(with_it - without, ord=p))
    ok = bool(np.all(np.isfinite(with_it))) and moved <= limit * (1 + 1e-4)
    report.line(shape, mechanism, f"clip:{kind}", moved, limit, ok)


def probe_noise(report, shape, mechanism):
  cfg = config(shape, mechanism, noise_multiplier=1.0)
  empty = [client("empty", np.random.default_rng(0))] * 6
  run = Run(cfg, empty)
  first, metrics = run.release(empty, kind="ordinary")
  participants = 6
  std = worst_case.release_noise_stddev(run.sim, participants)
  laplace = cfg.mechanism == "laplace"
  rel = 6 * math.sqrt((5.0 if laplace else 2.0) / (4 * first.size)) + 1e-3
  got = float(np.std(first))
  report.line(shape, mechanism, "noise:std/event", abs(got / std - 1), rel,
              abs(got / std - 1) <= rel, f"std {got:.4g} vs {std:.4g}")
  law, scale = ("laplace", std / math.sqrt(2)) if laplace else ("norm", std)
  p = stats.kstest(first / scale, law).pvalue
  report.line(shape, mechanism, "noise:law(ks p)", p, 1e-5, p > 1e-5)
  later = 1  # DP-FTRL here: one-round trees, so the next tree
  second, _ = run.release(empty, kind="ordinary", round_index=later)
  corr = abs(float(np.corrcoef(first, second)[0, 1]))
  limit = 6 / math.sqrt(first.size)
  report.line(shape, mechanism, "rounds:corr", corr, limit, corr <= limit)
  other = Run(cfg.replace(clip_norm=2 * CLIP), empty)
  third, _ = other.release(empty, kind="ordinary")
  corr = abs(float(np.corrcoef(first, third)[0, 1]))
  report.line(shape, mechanism, "configs:corr", corr, limit, corr <= limit)


def probe_sweep(report):
  """Two sweep configurations of one seed draw independent noise."""
  base = config("plain", "gaussian", noise_multiplier=1.0, rounds=1,
                sampling_probability=1.0).replace(round_shape="auto",
                                                  clients_per_chunk=None)
  # The sweep loads data by name: an in-memory population cannot be passed,
  # so the probe uses the built-in digits with a learning rate so small that
  # the clipped sum is negligible against the noise.
  base = base.replace(dataset="digits", dataset_kwargs={"num_clients": 20},
                      client_lr=1e-30, capacity=None)
  result = sweep.run_sweep(base, {"clip_norm": [CLIP, 2 * CLIP]},
                           progress=False, tuning=False, log=lambda s: None)
  sim = simulation.build(base)
  init = flat(sim.initial_state(0).params)
  a, b = (flat(r.params) - init for r in result.runs)
  corr = abs(float(np.corrcoef(a, b)[0, 1]))
  limit = 6 / math.sqrt(a.size)
  report.line("sweep", "gaussian", "lanes:corr", corr, limit, corr <= limit)


def probe_example(report, shape):
  cfg = config(shape, "dp_sgd", clip_norm=float("inf"))
  rng = np.random.default_rng(3)
  run = Run(cfg, [client("ordinary", rng)])
  limit = LR * cfg.example_clip_norm / BATCH
  worst = 0.0
  for kind in ("ordinary", "large", "nan", "max_float"):
    data = client(kind, np.random.default_rng(4))
    full, _ = run.release([data], kind="ordinary")
    for j in range(data["x"].shape[0]):
      keep = np.arange(data["x"].shape[0]) != j
      fewer, _ = run.release([{k: v[keep] for k, v in data.items()}],
                             kind="ordinary")
      worst = max(worst, float(np.linalg.norm(full - fewer)))
  report.line(shape, "dp_sgd", "example:one example", worst, limit,
              worst <= limit * (1 + 1e-4))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="the plain and factored rounds, fewer kinds")
  parser.add_argument("--shapes", default=None,
                      help="comma-separated round shapes (default: all "
                      "that this machine's devices allow)")
  parser.add_argument("--mechanisms", default=None,
                      help="comma-separated mechanisms (default: all)")
  args = parser.parse_args(argv)
  shapes = (args.shapes.split(",") if args.shapes else
            [s for s in SHAPES if s != "sharded" or jax.device_count() > 1])
  if args.quick and not args.shapes:
    shapes = ["plain", "factored_dense", "factored_cnn"]
  mechanisms = (args.mechanisms.split(",") if args.mechanisms
                else list(MECHANISMS))
  kinds = ("cancelling", "cancelling_deep", "nan", "huge") if args.quick \
      else KINDS
  report = Report()
  start = time.perf_counter()
  for shape in shapes:
    for mechanism in mechanisms:
      try:
        cfg = config(shape, mechanism)
        Run(cfg, ordinary(6, 0)).sim.round_fn()
      except ValueError as e:
        print(f"skip {shape:15s} {mechanism:12s} (not supported: {e})")
        continue
      probe_clip(report, shape, mechanism, kinds)
      probe_noise(report, shape, mechanism)
    if "dp_sgd" in mechanisms and not shape.startswith("factored"):
      probe_example(report, shape)
  if not args.shapes:
    probe_sweep(report)
  print(f"{report.failures} failure(s); {time.perf_counter() - start:.0f} s")
  return 1 if report.failures else 0


if __name__ == "__main__":
  sys.exit(main())
