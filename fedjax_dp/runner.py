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
import jax.numpy as jnp
import numpy as np

from fedjax_dp import audit
from fedjax_dp import checkpoint
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


def _checkpoint_state(state, canary_max=None, clip_norm=None):
  """The arrays a checkpoint holds: the server's and the mechanisms' state."""
  tree = {"server": state}
  if canary_max is not None:
    tree["canary_max"] = canary_max
  if clip_norm is not None:
    tree["clip_norm"] = clip_norm
  return tree


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _audit_summary(config, directions, initial_params, final_params,
                   canary_max) -> dict:
  """One-shot empirical privacy estimate from the run's canaries."""
  m = config.audit_canaries
  delta = tree_util.tree_sub(final_params, initial_params)
  final = np.asarray(audit.cosines(directions, delta))
  best = np.asarray(canary_max)
  out = {"canaries": m, "confidence": 0.95}
  for name, cos in (("final_model", final), ("all_iterates", best)):
    inserted, held_out = cos[:m], cos[m:]
    out[name] = {
        # An estimate, not a bound. Pooled variance: under the Gaussian
        # mechanism both groups carry the same noise, and fitting two
        # variances inflates the estimate on small samples.
        "epsilon_est": audit.estimate_epsilon(
            inserted, held_out, config.delta, equal_variance=True),
        # A lower bound that holds with the stated confidence.
        "epsilon_lo": audit.epsilon_lower_bound(
            inserted, held_out, config.delta, confidence=0.95),
    }
  return out


def load_run_config(run_dir: str | os.PathLike) -> config_lib.Config:
  """The config a run directory was started with (for --resume)."""
  path = pathlib.Path(run_dir) / "config.json"
  if not path.is_file():
    raise ValueError(f"--resume: {path} does not exist; is {run_dir} a run "
                     "directory?")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"--resume: {path} is not valid JSON ({e})") from e
  data.pop("resolved_noise_multiplier", None)
  return config_lib.Config.from_dict(data)


def run(
    config: config_lib.Config,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RunResult:
  """Runs DP-FedAvg as configured; writes `run_dir` if given.

  Crash safety: each round's DP event is appended to `ledger.jsonl` (and
  fsync'd) before the round runs, so a result that was computed and logged is
  always accounted. Every `checkpoint_every` rounds the state and the ledger
  are checkpointed atomically; `resume=True` continues from the latest
  complete checkpoint, replaying the rounds after it with the same keys and
  data (so they reproduce the same results, accounted once).

  Raises:
    ValueError: invalid configuration (before any compute), a planned run
      over its epsilon budget (unless `stop_at_budget`), or an unusable run
      directory.
    ModelDivergedError: the global model became non-finite; the last good
      checkpoint is kept.
  """
  sim = simulation.build(config)
  train, sampler, model = sim.train, sim.sampler, sim.model
  noise_multiplier = sim.noise_multiplier
  event = sim.event()
  planned_epsilon = accounting.epsilon_of(
      [event] * config.rounds, config.delta, accountant=config.accountant,
      relation=sampler.relation)
  if (config.epsilon_budget is not None and not config.stop_at_budget
      and planned_epsilon > config.epsilon_budget):
    raise ValueError(
        f"config field 'epsilon_budget' ({config.epsilon_budget:g}) is below "
        f"the planned epsilon {planned_epsilon:.4g} of {config.rounds} rounds; "
        "lower rounds, raise noise_multiplier, or set stop_at_budget=true to "
        "stop before the round that would exceed it")
  out = pathlib.Path(run_dir) if run_dir is not None else None
  if resume and out is None:
    raise ValueError("resume needs a run directory")
  ckpt_dir = out / "checkpoints" if out is not None else None
  if out is not None and not resume and (
      (out / "metrics.jsonl").exists() or checkpoint.all_steps(ckpt_dir)):
    # Never overwrite another run's results or let its checkpoints be
    # mistaken for this run's.
    raise ValueError(
        f"run directory {out} already holds a run; resume it (--resume) or "
        "choose another --run-dir")

  round_fn = jax.jit(sim.round_fn(), donate_argnums=(0,))
  sample_fn = jax.jit(sampler.sample)
  hparams = sim.hparams()
  state = sim.initial_state(config.seed)
  ledger = sim.new_ledger()
  canaries = canary_max = None
  adaptive = sim.adaptive_hparams()
  clip_norm = jnp.float32(config.clip_norm) if adaptive is not None else None
  if config.audit_canaries:
    initial_params = sim.initial_state(config.seed).params  # not donated
    directions = sim.canary_directions(config.seed, initial_params)
    canary_norm = 1e3 * config.clip_norm if config.clip_norm < float("inf") \
        else 1.0
    canary_max = jnp.full((2 * config.audit_canaries,), -1.0, jnp.float32)
  first_round = 0
  metrics_offset = 0
  _, noise_key = sim.stream_keys(config.seed)

  if resume:
    restored = None
    errors = []
    # Newest first; a damaged checkpoint falls back to the one before it.
    for step in sorted(checkpoint.all_steps(ckpt_dir), reverse=True):
      try:
        restored, meta = checkpoint.restore(
            ckpt_dir, step, _checkpoint_state(state, canary_max, clip_norm))
        break
      except checkpoint.CheckpointError as e:
        errors.append(str(e))
        log(f"checkpoint {step} is unusable ({e}); trying an older one")
    if restored is not None:
      state = restored["server"]
      canary_max = restored.get("canary_max")
      clip_norm = restored.get("clip_norm")
      ledger = checkpoint.decode_ledger(meta["ledger"])
      if [e.round for e in ledger.entries] != list(range(step)):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: checkpoint {step}'s ledger does not hold rounds "
            f"0..{step - 1} exactly once")
      first_round, metrics_offset = step, int(meta["metrics_offset"])
      log(f"resuming {out} after round {step - 1}")
    elif errors:
      raise checkpoint.CheckpointError(
          "no usable checkpoint to resume from: " + "; ".join(errors))
    else:
      log(f"resuming {out}: no complete checkpoint, starting from round 0")

  metrics_file = ledger_file = None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict() | {"resolved_noise_multiplier": noise_multiplier}
    _write_atomic(out / "config.json",
                  json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    # Rounds after the checkpoint will be replayed: drop their lines.
    _write_atomic(out / "ledger.jsonl", "".join(
        json.dumps({"round": e.round,
                    "event": checkpoint.encode_event(e.event)}) + "\n"
        for e in ledger.entries))
    metrics_path = out / "metrics.jsonl"
    if resume and metrics_path.exists():
      with open(metrics_path, "r+", encoding="utf-8") as f:
        f.truncate(metrics_offset)
    metrics_file = open(metrics_path, "a", encoding="utf-8")
    ledger_file = open(out / "ledger.jsonl", "a", encoding="utf-8")

  log(f"{config.name}: {train.num_clients} training clients, "
      f"{sim.dataset.eval.num_clients} held-out clients, model {model.name}, "
      f"{config.sampling} sampling (expected cohort "
      f"{sampler.expected_cohort_size:g}, block {sim.slots} slots), z="
      f"{noise_multiplier:.4g}, C={config.clip_norm:g}, planned epsilon="
      f"{planned_epsilon:.4g} at delta={config.delta:g} ({config.accountant})")

  def prepare(r: int):
    # Runs ahead on a background thread while the previous round computes.
    return (r,) + sim.prepare(r, config.seed, sample_fn)

  def save_checkpoint(rounds_completed: int) -> None:
    if ckpt_dir is None:
      return
    checkpoint.save(
        ckpt_dir, rounds_completed,
        _checkpoint_state(state, canary_max, clip_norm),
        {"ledger": checkpoint.encode_ledger(ledger),
         "metrics_offset": metrics_file.tell(),
         "config": config.to_dict()})

  history = []
  stopped_for_budget = False
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.rounds, initial=first_round,
                    desc=config.name, unit="round", leave=False)
  start = time.perf_counter()
  rounds_done = first_round
  eval_metrics = {}
  cohorts = prefetch.Prefetcher(prepare, range(first_round, config.rounds),
                                depth=2)
  try:
    for r, block, num_drawn, num_dropped, canary_ids in cohorts:
      if config.epsilon_budget is not None and \
          ledger.epsilon_if(event) > config.epsilon_budget:
        stopped_for_budget = True
        log(f"stopping before round {r}: it would exceed epsilon_budget="
            f"{config.epsilon_budget:g}")
        break
      # The round's event is recorded, durably, before its result exists.
      ledger.record(r, event)
      if ledger_file is not None:
        ledger_file.write(json.dumps(
            {"round": r, "event": checkpoint.encode_event(event)}) + "\n")
        ledger_file.flush()
        os.fsync(ledger_file.fileno())
      if config.audit_canaries:
        canaries = dp_fedavg.Canaries(directions, canary_ids,
                                      jnp.float32(canary_norm))
      round_hparams = hparams
      if adaptive is not None:
        round_hparams = hparams._replace(clip_norm=clip_norm)
      state, metrics = round_fn(
          state, dp_fedavg.CohortBlock(block.features, block.example_mask,
                                       block.client_mask),
          round_hparams, jax.random.fold_in(noise_key, r), canaries, adaptive)
      if adaptive is not None:
        metrics["clip_norm"] = clip_norm
        clip_norm = metrics.pop("next_clip_norm")
      if canaries is not None:
        canary_max = audit.max_over_rounds(canary_max,
                                           metrics.pop("canary_cosines"))
      if not bool(tree_util.tree_all_finite(state.params)):
        raise ModelDivergedError(
            f"round {r}: the global model became non-finite (NaN or Inf); the "
            "run stops here and keeps its last good checkpoint. Lower "
            "client_lr or server_lr, or clip_norm.")
      metrics = _to_python(jax.device_get(metrics))
      metrics["round"] = r
      metrics["num_drawn"] = num_drawn
      metrics["num_dropped"] = num_dropped
      metrics["truncated"] = num_drawn > sampler.capacity
      metrics["epsilon"] = ledger.epsilon()
      if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
        eval_metrics = evaluation.evaluate(model, state.params,
                                           sim.eval_population)
        metrics.update(eval_metrics)
      metrics["elapsed_s"] = time.perf_counter() - start
      history.append(metrics)
      if metrics_file is not None:
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
      rounds_done = r + 1
      if rounds_done % config.checkpoint_every == 0 or \
          rounds_done == config.rounds:
        save_checkpoint(rounds_done)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}",
                        eps=f"{metrics['epsilon']:.2f}")
    if stopped_for_budget:
      save_checkpoint(rounds_done)
  finally:
    cohorts.close()
    if bar is not None:
      bar.close()
    for f in (metrics_file, ledger_file):
      if f is not None:
        f.close()

  if "eval_accuracy" not in (history[-1] if history else {}):
    eval_metrics = evaluation.evaluate(model, state.params,
                                       sim.eval_population)
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
      "wall_time_s": time.perf_counter() - start,
      **eval_metrics,
  }
  for name in accounting.ACCOUNTANTS:
    # Both accountants where both can account these rounds exactly (PLD has
    # no sampling-without-replacement event, RDP no sampled Laplace).
    try:
      summary[f"epsilon_{name}"] = ledger.epsilon(name)
    except accounting.UnsupportedAccountingError:
      summary[f"epsilon_{name}"] = None
  if config.audit_canaries:
    summary["audit"] = _audit_summary(
        config, directions, initial_params, state.params, canary_max)
  if out is not None:
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
  log(f"done: {rounds_done} rounds, eval accuracy "
      f"{summary.get('eval_accuracy', float('nan')):.4f}, epsilon "
      f"{final_epsilon:.4g} at delta={config.delta:g}")
  return RunResult(config, jax.device_get(state.params), ledger,
                   noise_multiplier, rounds_done, history, summary)
