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
from fedjax_dp.algorithms import on_device
from fedjax_dp.data import prefetch
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import ledger_codec


class ModelDivergedError(ValueError):
  """The global model's parameters are no longer finite."""

  @classmethod
  def at_round(cls, r: int) -> "ModelDivergedError":
    return cls(
        f"round {r}: the global model became non-finite (NaN or Inf); the run "
        "stops here and keeps its last good checkpoint. Lower client_lr or "
        "server_lr, or clip_norm.")


class TrainingFailedError(ModelDivergedError):
  """Consecutive rounds failed: every participating client's update was
  non-finite, or the held-out loss was."""

  @classmethod
  def after(cls, r: int, failed: int, reason: str) -> "TrainingFailedError":
    return cls(
        f"round {r}: {failed} consecutive failed rounds (config field "
        f"'max_failed_rounds'), the last because {reason}; training has "
        "diverged. The run stops here and keeps its last checkpoint. Lower "
        "client_lr or server_lr, or clip_norm.")


class RunInterrupted(KeyboardInterrupt):
  """The user interrupted a run (SIGINT) after `rounds_completed` rounds."""

  def __init__(self, rounds_completed: int, run_dir):
    super().__init__(rounds_completed, run_dir)
    self.rounds_completed = rounds_completed
    self.run_dir = run_dir


def failed_round_reason(metrics: dict) -> str | None:
  """Why round `metrics` failed (see `Config.max_failed_rounds`), or None.

  A round with no participant (an empty Poisson draw, everyone dropped out)
  has nothing to fail and is not counted.
  """
  if metrics.get("num_clients") == 0 and metrics.get("num_nonfinite", 0) > 0:
    return (f"all {metrics['num_nonfinite']} participating clients' updates "
            "were non-finite")
  loss = metrics.get("eval_loss")
  if loss is not None and not np.isfinite(loss):
    return f"the held-out loss was {loss}"
  return None


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
  """Replaces `path` by `text` all at once; on failure (a full disk) the old
  file stays and no temporary file is left."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _audit_summary(config, directions, initial_params, final_params,
                   canary_max) -> dict:
  """One-shot empirical privacy estimate from the run's canaries."""
  m = config.audit_canaries
  delta = tree_util.tree_sub(final_params, initial_params)
  final = np.asarray(audit.cosines(directions, delta))
  best = np.asarray(canary_max)
  out = {"canaries": m, "nominal_confidence": 0.95}
  for name, cos in (("final_model", final), ("all_iterates", best)):
    inserted, held_out = cos[:m], cos[m:]
    out[name] = {
        # An estimate, not a bound. Pooled variance: under the Gaussian
        # mechanism both groups carry the same noise, and fitting two
        # variances inflates the estimate on small samples.
        "epsilon_est": audit.estimate_epsilon(
            inserted, held_out, config.delta, equal_variance=True),
        # Thresholding with Clopper-Pearson intervals at a nominal 95%: an
        # estimate too, since one run's canaries are not independent
        # trials (they share its model and noise).
        "epsilon_threshold_est": audit.epsilon_lower_bound(
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
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"--resume: {path} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"--resume: {path} must hold a JSON object of config "
                     f"fields, not {type(data).__name__}")
  data.pop("resolved_noise_multiplier", None)
  return config_lib.Config.from_dict(data)


# Config fields a resumed run may change: they touch neither what the rounds
# compute nor their random streams (simulation.OUTSIDE_RELEASE_IDENTITY,
# without the fields that reach the ledger). `rounds` may grow or shrink; if
# that changes an event of the rounds already run (a calibrated noise
# multiplier, one DP-FTRL tree over the whole run), the ledger check refuses.
RESUMABLE_FIELDS = ("name", "eval_every", "checkpoint_every", "rounds",
                    "epsilon_budget", "stop_at_budget", "max_failed_rounds",
                    "clients_per_chunk",
                    "vmap_clients", "unroll_local_steps", "shard_clients",
                    "round_shape")


def _canonical(value) -> str:
  return json.dumps(value, sort_keys=True, default=repr)


def check_resume_config(started: dict, config: config_lib.Config) -> None:
  """Refuses to resume `config` where it differs from the config the run was
  started with (`started`, as stored in its checkpoint) in anything but
  `RESUMABLE_FIELDS`.

  Raises:
    ValueError: naming every changed field with both values.
  """
  # Through JSON, as the checkpoint stored it (tuples become lists).
  now = json.loads(json.dumps(config.to_dict(), default=repr))
  missing = object()
  changed = [k for k in sorted(set(started) | set(now))
             if k not in RESUMABLE_FIELDS and _canonical(
                 started.get(k, missing)) != _canonical(now.get(k, missing))]
  if changed:
    diffs = ", ".join(f"{k}: {started.get(k)!r} -> {now.get(k)!r}"
                      for k in changed)
    raise ValueError(
        f"--resume: the config differs from the one the run was started "
        f"with ({diffs}); a resumed run must keep every field but "
        f"{', '.join(RESUMABLE_FIELDS)} (its rounds, random streams and "
        "privacy ledger depend on them). Start a new run directory instead.")


def check_resume_ledger(ledger: accounting.PrivacyLedger,
                        sim: simulation.Simulation) -> None:
  """Refuses a restored ledger that is not what this run would record.

  The ledger is the truth: its relation, delta and accountant must be the
  run's, and its events those this run records for the same rounds (so the
  noise multiplier was not recalibrated, and no mechanism changed).

  Raises:
    ValueError: naming what differs.
  """
  want = (sim.plan.relation, sim.config.delta, sim.config.accountant)
  have = (ledger.relation, ledger.delta, ledger.accountant)
  if have != want:
    raise ValueError(
        f"--resume: the checkpoint's privacy ledger has (relation, delta, "
        f"accountant) = {have}, this run {want}; resume with the config the "
        "run was started with")
  for entry in ledger.entries:
    planned = (sim.plan.event(round_index=entry.round)
               if entry.round < sim.config.rounds else None)
    if entry.event != planned:
      raise ValueError(
          f"--resume: round {entry.round} is recorded in the privacy ledger "
          f"as {entry.event!r}, but this run's round would be {planned!r} "
          "(a changed noise multiplier, sampler or mechanism); resume with "
          "the config the run was started with")


def _recorded_events(path: pathlib.Path) -> list:
  """(round, event) of every complete line of a run's ledger.jsonl.

  A line cut short by an interruption (the last one) is ignored.
  """
  if not path.is_file():
    return []
  entries = []
  lines = path.read_text(encoding="utf-8").split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      data = json.loads(line)
      entries.append((data["round"], ledger_codec.decode_event(data["event"])))
    except (ValueError, KeyError, TypeError) as e:
      if i == len(lines) - 1:  # unterminated: written when interrupted
        break
      raise checkpoint.CheckpointError(
          f"{path}: line {i + 1} is not a ledger entry ({e})") from None
  return entries


def _metrics_reach(path: pathlib.Path, offset, size: int) -> bool:
  """Whether metrics.jsonl still holds the `offset` bytes a checkpoint
  recorded, ending at a row's end."""
  if not isinstance(offset, int) or offset < 0 or offset > size:
    return False
  if offset == 0:
    return True
  with open(path, "rb") as f:
    f.seek(offset - 1)
    return f.read(1) == b"\n"


def _check_run_directory(out: pathlib.Path) -> None:
  """Refuses a run directory whose parts have the wrong kind (before
  anything is written)."""
  for path, kind in ((out, "directory"), (out / "checkpoints", "directory"),
                     (out / "metrics.jsonl", "file"),
                     (out / "ledger.jsonl", "file"),
                     (out / "config.json", "file")):
    if path.exists() and (path.is_dir() != (kind == "directory")):
      raise ValueError(f"run directory: {path} exists but is not a {kind}")


def _report_secagg(r: int, metrics: dict, totals: dict,
                   log: Callable[[str], None]) -> None:
  """Secure aggregation's overflow is reported, never silently wrong."""
  for name in totals:
    totals[name] += int(metrics[name])
  if metrics["secagg_wrapped"] or metrics["secagg_near_overflow"]:
    wrapped, near = metrics["secagg_wrapped"], metrics["secagg_near_overflow"]
    log(f"round {r}: secure aggregation wrapped around in {wrapped} "
        f"coordinates ({near} flagged near the modulus): the decoded sum is "
        "wrong there; raise secagg_bits or lower secagg_scale")
  if metrics["secagg_sampler_failures"]:
    log(f"round {r}: {metrics['secagg_sampler_failures']} discrete Gaussian "
        "samples failed (set to 0)")


def run(
    config: config_lib.Config,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dataset=None,
) -> RunResult:
  """Runs DP-FedAvg as configured; writes `run_dir` if given.

  `dataset` (a `data.dataset.FederatedDataset`) trains on in-memory data
  instead of loading `config.dataset`.

  Crash safety: each round's DP event is appended to `ledger.jsonl` (and
  fsync'd) before the round runs, so a result that was computed and logged is
  always accounted. Every `checkpoint_every` rounds the state and the ledger
  are checkpointed atomically; `resume=True` continues from the latest
  complete checkpoint, replaying the rounds after it with the same keys and
  data (so they reproduce the same results, accounted once).

  With `rounds_per_call` K > 1 the rounds run in calls of up to K on the
  device (algorithms/on_device.py; a call also ends at an eval round): all
  of a call's events are appended to `ledger.jsonl` before the call, its
  metrics are written after it, and a checkpoint is written at the end of
  a call that holds a checkpoint round.

  Raises:
    ValueError: invalid configuration (before any compute), a planned run
      over its epsilon budget (unless `stop_at_budget`), or an unusable run
      directory.
    ModelDivergedError: the global model became non-finite; the last good
      checkpoint is kept.
  """
  sim = simulation.build(config, dataset)
  train, sampler, model = sim.train, sim.plan.sampler, sim.model
  noise_multiplier = sim.plan.noise_multiplier
  planned_epsilon = sim.plan.planned_epsilon()
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
  if out is not None:
    _check_run_directory(out)
  if out is not None and not resume and (
      (out / "metrics.jsonl").exists() or checkpoint.named_steps(ckpt_dir)):
    # Never overwrite another run's results or let its checkpoints be
    # mistaken for this run's.
    raise ValueError(
        f"run directory {out} already holds a run; resume it (--resume) or "
        "choose another --run-dir")

  round_fn = jax.jit(sim.round_fn(), donate_argnums=(0,))
  sample_fn = jax.jit(sampler.sample_round)
  multi_round = population = None
  if config.rounds_per_call > 1:
    # Unsupported settings and a population over the memory budget fail
    # here, before anything is computed or written.
    multi_round = jax.jit(on_device.build_multi_round(sim),
                          static_argnames="num_rounds", donate_argnums=(0,))
    population = on_device.device_population(sim)
  hparams = sim.hparams()
  state = sim.initial_state(config.seed)
  ledger = sim.plan.new_ledger()
  secagg = sim.plan.secagg_params()
  secagg_totals = {"secagg_wrapped": 0, "secagg_near_overflow": 0,
                   "secagg_sampler_failures": 0}
  canaries = canary_max = None
  adaptive = sim.plan.adaptive_hparams()
  clip_norm = jnp.float32(config.clip_norm) if adaptive is not None else None
  if config.audit_canaries:
    initial_params = sim.initial_state(config.seed).params  # not donated
    directions = sim.canary_directions(config.seed, initial_params)
    canary_norm = 1e3 * config.clip_norm if config.clip_norm < float("inf") \
        else 1.0
    canary_max = jnp.full((2 * config.audit_canaries,), -1.0, jnp.float32)
  first_round = 0
  metrics_offset = 0
  streams = sim.streams()
  noise_key = streams.noise

  if resume:
    restored = None
    errors = []
    metrics_path = out / "metrics.jsonl"
    metrics_size = metrics_path.stat().st_size if metrics_path.is_file() else 0
    # Newest first; a damaged checkpoint falls back to the one before it, and
    # so does one whose metrics rows are no longer all in metrics.jsonl (they
    # are rebuilt by replaying the rounds after an older checkpoint).
    candidates = sorted(checkpoint.named_steps(ckpt_dir), reverse=True)
    for step in candidates:
      try:
        restored, meta = checkpoint.restore(
            ckpt_dir, step, _checkpoint_state(state, canary_max, clip_norm))
      except checkpoint.CheckpointError as e:
        errors.append(str(e))
        log(f"checkpoint {step} is unusable ({e}); trying an older one")
        continue
      offset = meta.get("metrics_offset")
      if not _metrics_reach(metrics_path, offset, metrics_size):
        log(f"checkpoint {step} records {offset} bytes of metrics, but "
            f"{metrics_path} holds {metrics_size} ending elsewhere (cut short "
            "or edited); rebuilding the missing rows from an older checkpoint")
        restored = None
        continue
      break
    if restored is not None:
      if not isinstance(meta.get("config"), dict):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: checkpoint {step} does not record the config it "
            "was written with")
      check_resume_config(meta["config"], config)
      state = restored["server"]
      canary_max = restored.get("canary_max")
      clip_norm = restored.get("clip_norm")
      try:
        ledger = ledger_codec.decode_ledger(meta["ledger"])
      except ValueError as e:
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: checkpoint {step}: {e}") from None
      if [e.round for e in ledger.entries] != list(range(step)):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: checkpoint {step}'s ledger does not hold rounds "
            f"0..{step - 1} exactly once")
      check_resume_ledger(ledger, sim)
      first_round, metrics_offset = step, int(meta["metrics_offset"])
      log(f"resuming {out} after round {step - 1}")
    elif errors and len(errors) == len(candidates):
      raise checkpoint.CheckpointError(
          "no usable checkpoint to resume from: " + "; ".join(errors))
    else:
      # Rounds that started before the interruption were recorded in
      # ledger.jsonl; the run replays them, so they must be this run's.
      recorded = sim.plan.new_ledger()
      for entry in _recorded_events(out / "ledger.jsonl"):
        recorded.record(*entry)
      check_resume_ledger(recorded, sim)
      log(f"resuming {out}: no usable checkpoint, starting from round 0")

  metrics_file = ledger_file = None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict() | {"resolved_noise_multiplier": noise_multiplier}
    _write_atomic(out / "config.json",
                  json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    # Rounds after the checkpoint will be replayed: drop their lines.
    _write_atomic(out / "ledger.jsonl", "".join(
        json.dumps({"round": e.round,
                    "event": ledger_codec.encode_event(e.event)}) + "\n"
        for e in ledger.entries))
    metrics_path = out / "metrics.jsonl"
    if resume and metrics_path.exists():
      # Never past the end: _metrics_reach checked that the offset fits.
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
    return (r,) + sim.prepare(r, streams, sample_fn)

  def save_checkpoint(rounds_completed: int) -> None:
    if ckpt_dir is None:
      return
    # What the checkpoint points at is durable before the checkpoint is.
    metrics_file.flush()
    os.fsync(metrics_file.fileno())
    checkpoint.save(
        ckpt_dir, rounds_completed,
        _checkpoint_state(state, canary_max, clip_norm),
        {"ledger": ledger_codec.encode_ledger(ledger),
         "metrics_offset": metrics_file.tell(),
         "config": config.to_dict()})

  def record_events(first: int, round_events: list) -> None:
    """Records rounds first, first + 1, ...: ledger, then ledger.jsonl."""
    for i, event in enumerate(round_events):
      ledger.record(first + i, event)
    if ledger_file is not None:
      ledger_file.write("".join(
          json.dumps({"round": first + i,
                      "event": ledger_codec.encode_event(event)}) + "\n"
          for i, event in enumerate(round_events)))
      ledger_file.flush()
      os.fsync(ledger_file.fileno())

  def finish_round(r: int, metrics: dict, num_drawn: int, num_dropped: int,
                   epsilon: float, example_epsilon: float | None) -> dict:
    """Completes round r's metrics (evaluating `state` at eval rounds) and
    writes them."""
    nonlocal eval_metrics
    metrics["round"] = r
    metrics["num_drawn"] = num_drawn
    metrics["num_dropped"] = num_dropped
    metrics["truncated"] = num_drawn > sampler.capacity
    metrics["epsilon"] = epsilon
    if example_epsilon is not None:
      metrics["example_epsilon"] = example_epsilon
    if secagg is not None:
      _report_secagg(r, metrics, secagg_totals, log)
    if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
      eval_metrics = evaluation.evaluate(model, state.params,
                                         sim.eval_population)
      metrics.update(eval_metrics)
    metrics["elapsed_s"] = time.perf_counter() - start
    history.append(metrics)
    if metrics_file is not None:
      metrics_file.write(json.dumps(metrics) + "\n")
      metrics_file.flush()
    failed = failed_round_reason(metrics)
    failures["consecutive"] = failures["consecutive"] + 1 if failed else (
        failures["consecutive"] if metrics.get("num_clients") == 0 else 0)
    failures["total"] += bool(failed)
    if failed and config.max_failed_rounds is not None and \
        failures["consecutive"] >= config.max_failed_rounds:
      raise TrainingFailedError.after(r, failures["consecutive"], failed)
    return metrics

  def run_calls() -> None:
    """The rounds in calls of up to rounds_per_call rounds on the device."""
    nonlocal state, clip_norm, rounds_done, stopped_for_budget
    # The longest call that can occur: the compiled scan's static length.
    max_rounds = min(config.rounds_per_call, config.eval_every, config.rounds)
    keys = on_device.multi_round_keys(streams)
    log(f"rounds_per_call={config.rounds_per_call}: population on the device, "
        f"calls of up to {max_rounds} rounds (a call ends at an eval round)")
    r = first_round
    while r < config.rounds:
      # Ending a call at an eval round evaluates the same models as the host
      # loop; shorter calls reuse the compiled program (it masks the rest).
      end = min(r + max_rounds, config.rounds,
                (r // config.eval_every + 1) * config.eval_every)
      call_events = [sim.plan.event(round_index=q) for q in range(r, end)]
      # The epsilon after each of the call's rounds (its cost does not grow
      # with the rounds already run).
      epsilons = ledger.epsilons_after(call_events)
      if config.epsilon_budget is not None:
        # The host loop's rule, round by round: stop before the first round
        # that would exceed the budget.
        fit = next((i for i, e in enumerate(epsilons)
                    if e > config.epsilon_budget), len(epsilons))
        if fit < len(call_events):
          stopped_for_budget = True
          log(f"stopping before round {r + fit}: it would exceed "
              f"epsilon_budget={config.epsilon_budget:g}")
          end, call_events, epsilons = r + fit, call_events[:fit], \
              epsilons[:fit]
        if end == r:
          break
      # All the call's events are recorded, durably, before any of its
      # results exists.
      record_events(r, call_events)
      call_hparams = hparams
      if adaptive is not None:
        call_hparams = hparams._replace(clip_norm=clip_norm)
      state, next_clip_norm, metrics, aux = multi_round(
          state, call_hparams, population, keys, r, end - r, adaptive, secagg,
          num_rounds=max_rounds)
      # The call runs asynchronously: accounting overlaps it.
      example_epsilons = [
          sim.plan.example_epsilon(n)
          for n in range(ledger.num_rounds - (end - r) + 1,
                         ledger.num_rounds + 1)]
      metrics, aux = jax.device_get((metrics, aux))
      if adaptive is not None:
        clip_norm = next_clip_norm
      for i in range(end - r):
        q = r + i
        if not aux["params_finite"][i]:
          raise ModelDivergedError.at_round(q)
        # Evaluation happens in a call's last round only (calls end at eval
        # rounds), so `state` is that round's.
        finish_round(
            q, _to_python({name: v[i] for name, v in metrics.items()}),
            int(aux["num_drawn"][i]), 0, epsilons[i],
            example_epsilons[i])
      rounds_done = end
      if end == config.rounds or any(
          (q + 1) % config.checkpoint_every == 0 for q in range(r, end)):
        save_checkpoint(rounds_done)
      if bar is not None:
        bar.update(end - r)
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}",
                        eps=f"{history[-1]['epsilon']:.2f}")
      r = end
      if stopped_for_budget:
        break

  history = []
  failures = {"consecutive": 0, "total": 0}
  stopped_for_budget = False
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.rounds, initial=first_round,
                    desc=config.name, unit="round", leave=False)
  start = time.perf_counter()
  rounds_done = first_round
  eval_metrics = {}
  # With rounds_per_call > 1 the host loop below gets no rounds.
  host_rounds = range(first_round, config.rounds) if multi_round is None \
      else range(0)
  cohorts = prefetch.Prefetcher(prepare, host_rounds, depth=2)
  try:
    if multi_round is not None:
      run_calls()
    for r, block, num_drawn, num_dropped, canary_ids in cohorts:
      event = sim.plan.event(round_index=r)
      if config.epsilon_budget is not None and \
          ledger.epsilon_if(event) > config.epsilon_budget:
        stopped_for_budget = True
        log(f"stopping before round {r}: it would exceed epsilon_budget="
            f"{config.epsilon_budget:g}")
        break
      # The round's event is recorded, durably, before its result exists.
      record_events(r, [event])
      if config.audit_canaries:
        canaries = dp_fedavg.Canaries(directions, canary_ids,
                                      jnp.float32(canary_norm))
      round_hparams = hparams
      if adaptive is not None:
        round_hparams = hparams._replace(clip_norm=clip_norm)
      state, metrics = round_fn(
          state, dp_fedavg.CohortBlock(block.features, block.example_mask,
                                       block.client_mask),
          round_hparams, jax.random.fold_in(noise_key, r), canaries, adaptive,
          secagg, sim.plan.tree_state(streams.noise, r))
      # The round runs asynchronously: accounting on the host overlaps it.
      epsilon = ledger.epsilon()
      example_epsilon = sim.plan.example_epsilon(ledger.num_rounds)
      if adaptive is not None:
        metrics["clip_norm"] = clip_norm
        clip_norm = metrics.pop("next_clip_norm")
      if canaries is not None:
        canary_max = audit.max_over_rounds(canary_max,
                                           metrics.pop("canary_cosines"))
      if not bool(tree_util.tree_all_finite(state.params)):
        raise ModelDivergedError.at_round(r)
      metrics = finish_round(
          r, _to_python(jax.device_get(metrics)), num_drawn, num_dropped,
          epsilon, example_epsilon)
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
  except KeyboardInterrupt:
    raise RunInterrupted(rounds_done, out) from None
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
      # Failed rounds this process ran (see Config.max_failed_rounds).
      "failed_rounds": failures["total"],
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
  if adaptive is not None:
    # `clip_norm` above is the initial clip; this is where it ended.
    summary["final_clip_norm"] = float(clip_norm)
  if sim.plan.example_event() is not None:
    summary["example_epsilon"] = sim.plan.example_epsilon(ledger.num_rounds)
  if secagg is not None:
    summary.update(secagg_totals, secagg_scale=sim.plan.secagg.scale,
                   secagg_bits=sim.plan.secagg.bits)
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
