"""The runner: the only module with side effects.

It owns the host loop of a DP-FedAvg run: load data, build the sampler and
the ledger, compile the round once, and for every round sample a cohort,
record the round's DP event, run the round, evaluate, log and write the run
directory (resolved config, metrics as JSON lines, final summary).
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Callable

import jax

from fedjax_dp import config as config_lib
from fedjax_dp import evaluation
from fedjax_dp import simulation
from fedjax_dp import tree_util
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.data import prefetch
from fedjax_dp.privacy import accounting


class ModelDivergedError(ValueError):
  """The global model's parameters are no longer finite."""


@dataclasses.dataclass
class RunResult:
  config: config_lib.Config
  params: dict
  ledger: accounting.PrivacyLedger
  noise_multiplier: float
  rounds_completed: int
  history: list[dict]
  summary: dict


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
  sim = simulation.build(config)
  train, sampler, model = sim.train, sim.sampler, sim.model
  noise_multiplier = sim.noise_multiplier
  ledger = sim.new_ledger()
  event = sim.event()
  planned_epsilon = accounting.epsilon_of(
      [event] * config.rounds, config.delta, accountant=config.accountant,
      relation=sampler.relation)
  round_fn = jax.jit(sim.round_fn(), donate_argnums=(0,))
  sample_fn = jax.jit(sampler.sample)
  hparams = sim.hparams()
  state = sim.initial_state(config.seed)
  _, noise_key = sim.stream_keys(config.seed)
  eval_population = sim.eval_population
  dataset = sim.dataset
  slots = sim.slots

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

  def prepare(r: int):
    # Runs ahead on a background thread while the previous round computes.
    return (r,) + sim.prepare(r, config.seed, sample_fn)

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
    for r, block, num_drawn, num_dropped in cohorts:
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
      metrics["num_dropped"] = num_dropped
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
      if not bool(tree_util.tree_all_finite(state.params)):
        raise ModelDivergedError(
            f"round {r}: the global model became non-finite (NaN or Inf); "
            "the run stops here. Lower client_lr or server_lr, or clip_norm.")
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
