"""The runner: the only module with side effects.

It owns the host loop of a DP-FedAvg run: load data, build the sampler and
the ledger, compile the round once, and for every round sample a cohort,
record the round's DP event, run the round, evaluate, log and write the run
directory (resolved config, metrics as JSON lines, final summary).
"""

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import evaluation
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.data import blocks
from fedjax_dp.data import builtin
from fedjax_dp.data import population as population_lib
from fedjax_dp.data import prefetch
from fedjax_dp.models import registry
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import sampling

# Independent PRNG streams, folded from the run's root key.
_INIT_STREAM, _SAMPLE_STREAM, _NOISE_STREAM, _DATA_STREAM = range(4)


@dataclasses.dataclass
class RunResult:
  config: config_lib.Config
  params: dict
  ledger: accounting.PrivacyLedger
  noise_multiplier: float
  rounds_completed: int
  history: list[dict]
  summary: dict


def _default_execution(config: config_lib.Config, capacity: int):
  """(clients_per_chunk, unroll) for this backend, unless the config sets them.

  On XLA:CPU a scan over single clients with unrolled local steps is the
  fastest simple shape measured (docs/benchmarks.md); accelerators want wide
  vmaps.
  """
  on_cpu = jax.default_backend() == "cpu"
  chunk = config.clients_per_chunk or (1 if on_cpu else min(capacity, 256))
  unroll = config.unroll_local_steps
  if unroll is None:
    unroll = on_cpu
  return chunk, unroll


def resolve_noise_multiplier(config: config_lib.Config,
                             sampler: sampling.Sampler) -> float:
  if config.noise_multiplier is not None:
    return float(config.noise_multiplier)
  return accounting.calibrate_noise_multiplier(
      sampler.dp_event, target_epsilon=config.target_epsilon,
      delta=config.delta, rounds=config.rounds,
      accountant=config.accountant, relation=sampler.relation)


def build_sampler(config: config_lib.Config,
                  population_size: int) -> sampling.Sampler:
  if config.cohort_size is not None and config.sampling_probability is None \
      and config.cohort_size > population_size:
    raise ValueError(
        f"config field 'cohort_size' must be in [1, population size "
        f"{population_size}]; got {config.cohort_size}")
  return sampling.make_sampler(
      config.sampling, population_size, cohort_size=config.cohort_size,
      sampling_probability=config.sampling_probability,
      capacity=config.capacity)


def _to_python(metrics: dict) -> dict:
  return {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


def run(
    config: config_lib.Config,
    *,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
  """Runs DP-FedAvg as configured; writes `run_dir` if given."""
  config.validate()
  dataset = builtin.load(config.dataset, seed=config.seed,
                         **config.dataset_kwargs)
  train = dataset.train
  sampler = build_sampler(config, train.num_clients)
  model = registry.get_model(config.model, dataset.input_shape,
                             dataset.num_classes, **config.model_kwargs)
  noise_multiplier = resolve_noise_multiplier(config, sampler)
  ledger = accounting.PrivacyLedger(sampler.relation, config.delta,
                                    config.accountant)
  event = sampler.dp_event(noise_multiplier)
  planned_epsilon = accounting.epsilon_of(
      [event] * config.rounds, config.delta, accountant=config.accountant,
      relation=sampler.relation)

  chunk, unroll = _default_execution(config, sampler.capacity)
  slots = -(-sampler.capacity // chunk) * chunk
  max_examples = int(train.num_examples.max())
  if config.max_examples_per_client is not None:
    max_examples = min(max_examples, config.max_examples_per_client)
  num_steps = blocks.num_local_steps(max_examples, config.batch_size,
                                     config.local_epochs)

  server_opt = server_lib.server_optimizer(
      config.server_optimizer, momentum=config.server_momentum)
  round_fn = jax.jit(
      dp_fedavg.build_round(
          model,
          client_lib.client_optimizer(config.client_optimizer,
                                      config.client_momentum),
          server_opt, clients_per_chunk=chunk, unroll_local_steps=unroll),
      donate_argnums=(0,))
  sample_fn = jax.jit(sampler.sample)
  hparams = dp_fedavg.RoundHparams.create(
      client_lr=config.client_lr, server_lr=config.server_lr,
      clip_norm=config.clip_norm, noise_multiplier=noise_multiplier,
      denominator=sampler.expected_cohort_size)

  root = jax.random.key(config.seed)
  state = server_lib.init(model.init(jax.random.fold_in(root, _INIT_STREAM)),
                          server_opt)
  sample_key = jax.random.fold_in(root, _SAMPLE_STREAM)
  noise_key = jax.random.fold_in(root, _NOISE_STREAM)

  out = pathlib.Path(run_dir) if run_dir is not None else None
  metrics_file = None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict() | {"resolved_noise_multiplier": noise_multiplier}
    (out / "config.json").write_text(json.dumps(resolved, indent=2,
                                                sort_keys=True) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a", encoding="utf-8")

  log(f"{config.name}: {train.num_clients} training clients, "
      f"{dataset.eval.num_clients} held-out clients, model {model.name}, "
      f"{config.sampling} sampling (expected cohort "
      f"{sampler.expected_cohort_size:g}, block {slots} slots), z="
      f"{noise_multiplier:.4g}, C={config.clip_norm:g}, planned epsilon="
      f"{planned_epsilon:.4g} at delta={config.delta:g} ({config.accountant})")

  # Held-out clients are loaded once (a lazy source reads them here).
  eval_population = dataset.eval
  if not isinstance(eval_population, population_lib.FederatedPopulation):
    eval_population = eval_population.subset(range(eval_population.num_clients))

  def prepare(r: int):
    """Samples round r's cohort and lays out its block (runs ahead, on a
    background thread, while the previous round computes)."""
    indices, valid, num_drawn = jax.device_get(
        sample_fn(jax.random.fold_in(sample_key, r)))
    cohort = train.subset(indices[valid])
    local_valid = np.arange(slots) < cohort.num_clients
    local = np.where(local_valid, np.arange(slots), 0)
    block = blocks.make_block(
        cohort, local, local_valid, batch_size=config.batch_size,
        epochs=config.local_epochs, num_steps=num_steps,
        rng=np.random.default_rng([config.seed, _DATA_STREAM, r]),
        max_examples_per_client=config.max_examples_per_client)
    return r, block, int(num_drawn)

  history = []
  stopped_for_budget = False
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.rounds, desc=config.name, unit="round",
                    leave=False)
  start = time.perf_counter()
  rounds_done = 0
  eval_metrics = {}
  cohorts = prefetch.Prefetcher(prepare, range(config.rounds), depth=2)
  try:
    for r, block, num_drawn in cohorts:
      if config.epsilon_budget is not None and \
          ledger.epsilon_if(event) > config.epsilon_budget:
        stopped_for_budget = True
        log(f"stopping before round {r}: it would exceed epsilon_budget="
            f"{config.epsilon_budget:g}")
        break
      # The round's event enters the ledger before its result exists.
      ledger.record(r, event)
      state, metrics = round_fn(
          state, dp_fedavg.CohortBlock(block.features, block.example_mask,
                                       block.client_mask),
          hparams, jax.random.fold_in(noise_key, r))
      metrics = _to_python(jax.device_get(metrics))
      metrics["round"] = r
      metrics["num_drawn"] = num_drawn
      metrics["truncated"] = num_drawn > sampler.capacity
      metrics["epsilon"] = ledger.epsilon()
      if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
        eval_metrics = evaluation.evaluate(model, state.params,
                                           eval_population)
        metrics.update(eval_metrics)
      metrics["elapsed_s"] = time.perf_counter() - start
      history.append(metrics)
      if metrics_file is not None:
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
      rounds_done = r + 1
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                        eps=f"{metrics['epsilon']:.2f}")
      if not math.isfinite(metrics["train_loss"]):
        log(f"round {r}: training loss is not finite; stopping")
        break
  finally:
    cohorts.close()
    if bar is not None:
      bar.close()
    if metrics_file is not None:
      metrics_file.close()

  if history and "eval_accuracy" not in history[-1]:
    eval_metrics = evaluation.evaluate(model, state.params, eval_population)
  final_epsilon = ledger.epsilon()
  summary = {
      "name": config.name,
      "rounds_completed": rounds_done,
      "rounds_planned": config.rounds,
      "stopped_for_budget": stopped_for_budget,
      "noise_multiplier": noise_multiplier,
      "clip_norm": config.clip_norm,
      "delta": config.delta,
      "accountant": config.accountant,
      "epsilon": final_epsilon,
      "epsilon_rdp": ledger.epsilon("rdp"),
      "wall_time_s": time.perf_counter() - start,
      **eval_metrics,
  }
  if config.accountant == "pld" or sampler.relation.value != "replace_one":
    summary["epsilon_pld"] = ledger.epsilon("pld")
  if out is not None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ledger.json").write_text(json.dumps(
        {"relation": sampler.relation.value, "delta": config.delta,
         "rounds": [{"round": e.round, "event": repr(e.event)}
                    for e in ledger.entries]}, indent=1) + "\n")
  log(f"done: {rounds_done} rounds, eval accuracy "
      f"{summary.get('eval_accuracy', float('nan')):.4f}, epsilon "
      f"{final_epsilon:.4g} at delta={config.delta:g}")
  return RunResult(config, jax.device_get(state.params), ledger,
                   noise_multiplier, rounds_done, history, summary)
