"""The runner: the only module with side effects.

It owns the host loop of a DP-FedAvg run: build the run's parts
(simulation.build: data, model, privacy plan), then, call by call (one round
per call, or K rounds on the device: round_calls.py), record the rounds' DP
events in the ledger before their results exist, run them, evaluate, log,
and write the run directory (run_directory.py).
"""

import concurrent.futures
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
from fedjax_dp import epsilon_reports
from fedjax_dp import evaluation
from fedjax_dp import round_calls
from fedjax_dp import run_directory
from fedjax_dp import run_outputs
from fedjax_dp import simulation
from fedjax_dp import tree_util
from fedjax_dp.data import files
from fedjax_dp.data import population as population_lib
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import ledger_codec
from fedjax_dp.privacy import plan as plan_lib


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


def _audit_summary(config, directions, initial_params, final_params,
                   canary_max) -> dict:
  """One-shot empirical privacy estimate from the run's canaries."""
  m = config.audit_canaries
  delta = tree_util.tree_sub(final_params, initial_params)
  final = np.asarray(audit.cosines(directions, delta))
  best = np.asarray(canary_max)
  out = {"canaries": m, "nominal_confidence": 0.95,
         # The largest epsilon_threshold_est these canaries can show.
         "largest_threshold_est": audit.largest_lower_bound(
             m, config.delta, confidence=0.95)}
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
  for derived in run_directory.DERIVED_FIELDS:
    data.pop(derived, None)
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


def _restore(directory: run_directory.RunDirectory,
             sim: simulation.Simulation, carry: round_calls.Carry,
             log: Callable[[str], None]):
  """Where a resumed run continues: (carry, ledger, first round, bytes of
  metrics.jsonl kept).

  Newest checkpoint first; a damaged checkpoint falls back to the one before
  it, and so does one whose metrics rows are no longer all in metrics.jsonl
  (they are rebuilt by replaying the rounds after an older checkpoint).
  Without a usable checkpoint the run starts again from round 0, after
  checking that the rounds ledger.jsonl recorded are this run's.

  Raises:
    checkpoint.CheckpointError: every checkpoint is unusable, or one is
      inconsistent.
    ValueError: the config or ledger differs from the run's.
  """
  ckpt_dir = directory.checkpoints
  errors = []
  size = directory.metrics_size()
  candidates = sorted(checkpoint.named_steps(ckpt_dir), reverse=True)
  for step in candidates:
    try:
      restored, meta = checkpoint.restore(ckpt_dir, step, carry.tree())
    except checkpoint.CheckpointError as e:
      errors.append(str(e))
      log(f"checkpoint {step} is unusable ({e}); trying an older one")
      continue
    offset = meta.get("metrics_offset")
    if not directory.metrics_reach(offset, size):
      log(f"checkpoint {step} records {offset} bytes of metrics, but "
          f"{directory.metrics_path} holds {size} ending elsewhere (cut "
          "short or edited); rebuilding the missing rows from an older "
          "checkpoint")
      continue
    if not isinstance(meta.get("config"), dict):
      raise checkpoint.CheckpointError(
          f"{ckpt_dir}: checkpoint {step} does not record the config it "
          "was written with")
    check_resume_config(meta["config"], sim.config)
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
    log(f"resuming {directory.path} after round {step - 1}")
    return (round_calls.Carry.from_tree(restored), ledger, step,
            int(meta["metrics_offset"]))
  if errors and len(errors) == len(candidates):
    raise checkpoint.CheckpointError(
        "no usable checkpoint to resume from: " + "; ".join(errors))
  # Rounds that started before the interruption were recorded in
  # ledger.jsonl; the run replays them, so they must be this run's.
  recorded = sim.plan.new_ledger()
  for entry in directory.recorded_events():
    recorded.record(*entry)
  check_resume_ledger(recorded, sim)
  log(f"resuming {directory.path}: no usable checkpoint, starting from round "
      "0")
  return carry, sim.plan.new_ledger(), 0, 0


def _elapsed_before(directory: run_directory.RunDirectory) -> float:
  """The last kept metrics row's elapsed_s (0 where it has none)."""
  rows = run_outputs.read_rows(directory.metrics_path)
  elapsed = rows[-1].get("elapsed_s") if rows else None
  return float(elapsed) if run_outputs.is_number(elapsed) else 0.0


@dataclasses.dataclass
class LossWatch:
  """Says, once per run, when its loss explodes: a held-out loss over
  `EVAL_FACTOR` times its lowest so far, or a training loss, averaged over
  the last `TRAIN_WINDOW` rounds, over `TRAIN_FACTOR` times the first
  round's (the model has become worse than it started). One round's
  training loss is too noisy to judge alone (each round has other clients
  and other noise). A model that became non-finite is stopped elsewhere
  (`ModelDivergedError`); this catches the climb before it."""

  EVAL_FACTOR = 2.0
  TRAIN_FACTOR = 2.0
  TRAIN_WINDOW = 5

  lowest_eval: tuple | None = None  # (loss, round)
  first_train: float | None = None
  recent_train: list = dataclasses.field(default_factory=list)
  exploded_at: int | None = None

  def check(self, r: int, metrics: dict) -> str | None:
    """The warning for round r's metrics, if its loss exploded (first time
    only)."""
    warning = None
    advice = ("training is diverging. Lower client_lr or server_lr, or add "
              "clients per round (less noise per client) at the same epsilon")
    value = metrics.get("eval_loss")
    if value is not None and np.isfinite(value):
      low = self.lowest_eval
      if low is not None and low[0] > 0 and value > self.EVAL_FACTOR * low[0]:
        warning = (f"round {r}: eval_loss {value:.4g} is over "
                   f"{self.EVAL_FACTOR:g}x its lowest, {low[0]:.4g} at round "
                   f"{low[1]}: {advice}")
      if low is None or value < low[0]:
        self.lowest_eval = (value, r)
    value = metrics.get("train_loss")
    if value is not None and np.isfinite(value):
      if self.first_train is None:
        self.first_train = value
      self.recent_train = (self.recent_train + [value])[-self.TRAIN_WINDOW:]
      mean = float(np.mean(self.recent_train))
      if (warning is None and self.first_train > 0
          and mean > self.TRAIN_FACTOR * self.first_train):
        warning = (f"round {r}: the train_loss of the last "
                   f"{len(self.recent_train)} rounds, {mean:.4g} on average, "
                   f"is over {self.TRAIN_FACTOR:g}x the first round's, "
                   f"{self.first_train:.4g}: {advice}")
    if warning is None or self.exploded_at is not None:
      return None
    self.exploded_at = r
    return warning


@dataclasses.dataclass
class Lane:
  """One run's host state while its rounds go on: its plan, ledger, run
  directory (or None), metrics and stopping state. A sweep runs several
  lanes through one loop (`run_rounds`); `run` runs one."""

  # The run's own config (a sweep lane's sim may be shared by lanes whose
  # host settings differ) and parts.
  config: config_lib.Config
  sim: simulation.Simulation
  plan: plan_lib.PrivacyPlan
  ledger: accounting.PrivacyLedger
  directory: run_directory.RunDirectory | None
  log: Callable[[str], None]
  # Prefixes this lane's log lines ("" for a single run).
  name: str = ""
  rounds_done: int = 0
  stopped: bool = False
  stopped_for_budget: bool = False
  diverged: bool = False
  history: list = dataclasses.field(default_factory=list)
  eval_metrics: dict = dataclasses.field(default_factory=dict)
  failures: dict = dataclasses.field(
      default_factory=lambda: {"consecutive": 0, "total": 0})
  secagg_totals: dict = dataclasses.field(default_factory=lambda: {
      "secagg_wrapped": 0, "secagg_near_overflow": 0,
      "secagg_sampler_failures": 0})
  start: float = dataclasses.field(default_factory=time.perf_counter)
  # Set by `begin`: how many rounds the budget allows (the config's rounds
  # without a budget), and the epsilons of the report rounds.
  rounds_allowed: int = 0
  reports: epsilon_reports.EpsilonReports | None = None
  last_epsilon: float | None = None
  # Seconds the host loop spent on this lane's accounting (recording
  # events, waiting for reported epsilons): the part on the critical path.
  accounting_s: float = 0.0
  # Watches the losses for a run that is diverging (`LossWatch`).
  loss_watch: LossWatch = dataclasses.field(default_factory=LossWatch)

  def begin(self, first_round: int) -> None:
    """Before the first round to run: the rounds the budget allows (one
    search, not an epsilon per round) and the worker that computes the
    report rounds' epsilons ahead."""
    config = self.config
    self.rounds_allowed = config.rounds
    # Without stop_at_budget a plan over its budget was refused up front.
    if config.epsilon_budget is not None and config.stop_at_budget:
      self.rounds_allowed = epsilon_reports.rounds_within_budget(
          self.plan, self.ledger, config.rounds, config.epsilon_budget)
    self.reports = epsilon_reports.EpsilonReports(
        self.plan, self.ledger, epsilon_reports.report_rounds(
            first_round, self.rounds_allowed, config.eval_every))

  def end(self) -> None:
    if self.reports is not None:
      self.reports.close()

  def plan_call(self, r: int, end: int):
    """(end, events) of this lane's part of the call of rounds r..end-1:
    cut before the first round that would exceed the budget."""
    if end > self.rounds_allowed:
      self.stopped = self.stopped_for_budget = True
      self.log(f"{self.name}stopping before round {self.rounds_allowed}: "
               f"it would exceed epsilon_budget={self.config.epsilon_budget:g}")
      end = max(r, self.rounds_allowed)
    return end, [self.plan.event(q) for q in range(r, end)]

  def record(self, r: int, events) -> None:
    """The call's events, in the ledger and durably in ledger.jsonl, before
    any of its results exists."""
    started = time.perf_counter()
    for i, event in enumerate(events):
      self.ledger.record(r + i, event)
    if self.directory is not None:
      self.directory.record(r, events)
    self.accounting_s += time.perf_counter() - started

  def finish_round(self, r: int, row: round_calls.RoundRow, params) -> None:
    """Completes round r's metrics (evaluating `params` and adding the
    epsilon at eval rounds and the last), writes them, and applies the
    failed-round policy."""
    config = self.config
    metrics = row.metrics
    metrics["round"] = r
    metrics["num_drawn"] = row.num_drawn
    metrics["num_dropped"] = row.num_dropped
    metrics["truncated"] = row.num_drawn > self.plan.sampler.capacity
    if epsilon_reports.is_report_round(r, self.rounds_allowed,
                                       config.eval_every):
      started = time.perf_counter()
      epsilon, example_epsilon = self.reports.epsilon_after(r)
      self.accounting_s += time.perf_counter() - started
      metrics["epsilon"] = self.last_epsilon = epsilon
      if example_epsilon is not None:
        metrics["example_epsilon"] = example_epsilon
    if self.plan.secagg is not None:
      _report_secagg(r, metrics, self.secagg_totals, self.log)
    if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
      self.eval_metrics = evaluation.evaluate(self.sim.model, params,
                                              self.sim.eval_population)
      metrics.update(self.eval_metrics)
    metrics["elapsed_s"] = time.perf_counter() - self.start
    warning = self.loss_watch.check(r, metrics)
    if warning:
      self.log(f"{self.name}warning: {warning}")
    self.history.append(metrics)
    if self.directory is not None:
      self.directory.write_metrics(metrics)
    failed = failed_round_reason(metrics)
    counts = self.failures
    counts["consecutive"] = counts["consecutive"] + 1 if failed else (
        counts["consecutive"] if metrics.get("num_clients") == 0 else 0)
    counts["total"] += bool(failed)
    if failed and config.max_failed_rounds is not None and \
        counts["consecutive"] >= config.max_failed_rounds:
      raise TrainingFailedError.after(r, counts["consecutive"], failed)

  def save_checkpoint(self, carry: round_calls.Carry) -> None:
    if self.directory is not None:
      self.directory.save_checkpoint(self.rounds_done, carry.tree(),
                                     self.ledger, self.config.to_dict())

  def summary(self, params, clip_norm=None) -> dict:
    """The final summary (evaluating `params` if the last round did not)."""
    config, plan, ledger = self.config, self.plan, self.ledger
    if "eval_accuracy" not in (self.history[-1] if self.history else {}):
      self.eval_metrics = evaluation.evaluate(self.sim.model, params,
                                              self.sim.eval_population)
    summary = {
        "name": config.name,
        "rounds_completed": self.rounds_done,
        "rounds_planned": config.rounds,
        "stopped_for_budget": self.stopped_for_budget,
        # Failed rounds this process ran (see Config.max_failed_rounds).
        "failed_rounds": self.failures["total"],
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": config.clip_norm,
        "delta": config.delta,
        "accountant": config.accountant,
        "epsilon": ledger.epsilon(),
        "wall_time_s": time.perf_counter() - self.start,
        "host_accounting_s": self.accounting_s,
        **self.eval_metrics,
    }
    for name in accounting.ACCOUNTANTS:
      # Both accountants where both can account these rounds exactly (PLD
      # has no sampling-without-replacement event, RDP no sampled Laplace).
      try:
        summary[f"epsilon_{name}"] = ledger.epsilon(name)
      except accounting.UnsupportedAccountingError:
        summary[f"epsilon_{name}"] = None
    if clip_norm is not None:
      # `clip_norm` above is the initial clip; this is where it ended.
      summary["final_clip_norm"] = float(clip_norm)
    if plan.example_event() is not None:
      summary["example_epsilon"] = plan.example_epsilon(ledger.num_rounds)
    if plan.secagg is not None:
      summary.update(self.secagg_totals, secagg_scale=plan.secagg.scale,
                     secagg_bits=plan.secagg.bits)
    if self.diverged:
      summary["diverged"] = True
    if self.loss_watch.exploded_at is not None:
      summary["loss_exploded_at_round"] = self.loss_watch.exploded_at
    return summary


def run_rounds(lanes: list[Lane], calls, carry: round_calls.Carry,
               first_round: int, bar=None,
               dispatched: Callable[[], None] | None = None
               ) -> round_calls.Carry:
  """The host loop: runs rounds first_round, ... of every lane, call by
  call (round_calls.py), until the last round or every lane stopped.

  Each call's events are recorded, durably, before any of its results
  exists; its rows are written after it; a checkpoint follows a call that
  holds a checkpoint round. Lanes share calls of one round (a sweep); a
  single lane may take calls of several. A lane stops before the round that
  would exceed its budget. A single run raises when its model diverges or
  training fails; a lane of several stops there and the others go on.
  `dispatched` is called once the first call is on its way (or when there
  was none), i.e. after the rounds' compilation.

  Returns:
    The carry after the last call.
  """
  for lane in lanes:
    lane.begin(first_round)
  try:
    carry = _run_calls(lanes, calls, carry, first_round, bar, dispatched)
  finally:
    for lane in lanes:
      lane.end()
  return carry


def _run_calls(lanes: list[Lane], calls, carry: round_calls.Carry,
               first_round: int, bar, dispatched) -> round_calls.Carry:
  """`run_rounds`' loop over calls."""
  rounds, single = lanes[0].config.rounds, len(lanes) == 1
  r = first_round
  while r < rounds:
    planned = {i: lane.plan_call(r, calls.call_end(r))
               for i, lane in enumerate(lanes) if not lane.stopped}
    ends = {i: p[0] for i, p in planned.items() if p[0] > r}
    if not ends:
      break
    end = max(ends.values())
    for i in ends:
      lanes[i].record(r, planned[i][1])
    carry, pending = calls.start(carry, r, end,
                                 [i in ends for i in range(len(lanes))])
    if dispatched is not None:
      # While the first call runs: the rounds' first reported epsilon
      # needs what this waits for (the plan's PLD) anyway.
      dispatched()
      dispatched = None
    finished = calls.finish(pending)
    for i in ends:
      lane = lanes[i]
      try:
        for k, row in enumerate(finished[i].rows):
          lane.finish_round(r + k, row, calls.params(carry, i))
        if finished[i].diverged_at is not None:
          raise ModelDivergedError.at_round(finished[i].diverged_at)
      except ModelDivergedError as e:
        if single:
          raise
        # A sweep keeps this configuration's last finite state and goes on
        # with the others.
        lane.log(f"{lane.name}{e} (this configuration stops here; the "
                 "others go on)")
        lane.stopped = lane.diverged = True
        continue
      lane.rounds_done = ends[i]
      if ends[i] == rounds or any((q + 1) % lane.config.checkpoint_every == 0
                                  for q in range(r, ends[i])):
        lane.save_checkpoint(carry)
    if bar is not None:
      bar.update(end - r)
      if single and lanes[0].history:
        postfix = {"loss": f"{lanes[0].history[-1]['train_loss']:.3f}"}
        if lanes[0].last_epsilon is not None:
          postfix["eps"] = f"{lanes[0].last_epsilon:.2f}"
        bar.set_postfix(**postfix)
    r = end
  if dispatched is not None:
    dispatched()
  for lane in lanes:
    if lane.stopped_for_budget:
      lane.save_checkpoint(carry)
  return carry


def _planned_epsilon(sim: simulation.Simulation) -> Callable[[], float]:
  """The planned epsilon, as a function returning it.

  With a budget it is computed now and checked (a plan over its budget is
  refused before anything is written, unless the run stops at it). Without
  one it is only reported, so it is computed on a thread while the first
  round compiles (building a PLD takes about 0.5 s).
  """
  config = sim.config
  if config.epsilon_budget is None:
    executor = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="fedjax_dp-planned-epsilon")
    future = executor.submit(sim.plan.planned_epsilon)
    executor.shutdown(wait=False)
    return future.result
  planned = sim.plan.planned_epsilon()
  if not config.stop_at_budget and planned > config.epsilon_budget:
    raise ValueError(
        f"config field 'epsilon_budget' ({config.epsilon_budget:g}) is below "
        f"the planned epsilon {planned:.4g} of {config.rounds} rounds; "
        "lower rounds, raise noise_multiplier, or set stop_at_budget=true to "
        "stop before the round that would exceed it")
  return lambda: planned


def _first_carry(sim: simulation.Simulation):
  """The carry before round 0, the audit's canaries and the initial model
  (or None and None without an audit)."""
  config = sim.config
  state = sim.initial_state()
  if not config.audit_canaries:
    return round_calls.Carry(state), None, None
  initial_params = sim.initial_params(config.seed)  # not donated
  canaries = round_calls.AuditCanaries(
      sim.canary_directions(config.seed, initial_params),
      1e3 * config.clip_norm if config.clip_norm < float("inf") else 1.0)
  canary_max = jnp.full((2 * config.audit_canaries,), -1.0, jnp.float32)
  return round_calls.Carry(state, canary_max), canaries, initial_params


def run(
    config: config_lib.Config,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dataset=None,
    model=None,
) -> RunResult:
  """Runs DP-FedAvg as configured; writes `run_dir` if given.

  `dataset` (a `data.dataset.FederatedDataset`, e.g. from
  `data.in_memory`) trains on the user's data instead of loading
  `config.dataset`; `model` (a flax module, or another form listed in
  `models/user_model.py`) trains the user's model instead of building
  `config.model`. The run records what they were
  (`simulation.name_user_objects`): resuming passes the same objects again,
  or, for a module with an import path, rebuilds it from the run directory.

  Crash safety: each round's DP event is appended to `ledger.jsonl` (and
  fsync'd) before the round runs, so a result that was computed and logged is
  always accounted. Every `checkpoint_every` rounds the state and the ledger
  are checkpointed atomically; `resume=True` continues from the latest
  complete checkpoint, replaying the rounds after it with the same keys and
  data (so they reproduce the same results, accounted once).

  With `rounds_per_call` K > 1 the rounds run in calls of up to K on the
  device (round_calls.py; a call also ends at an eval round): all of a
  call's events are appended to `ledger.jsonl` before the call, its metrics
  are written after it, and a checkpoint is written at the end of a call
  that holds a checkpoint round.

  Raises:
    ValueError: invalid configuration (before any compute), a planned run
      over its epsilon budget (unless `stop_at_budget`), or an unusable run
      directory.
    ModelDivergedError: the global model became non-finite; the last good
      checkpoint is kept.
    RunInterrupted: the user interrupted the run (SIGINT).
  """
  start = time.perf_counter()  # a row's elapsed_s counts from here
  config = simulation.name_user_objects(config, dataset=dataset, model=model)
  sim = simulation.build(config, dataset, model)
  planned_epsilon = _planned_epsilon(sim)
  directory = run_directory.RunDirectory(run_dir) if run_dir else None
  if resume and directory is None:
    raise ValueError("resume needs a run directory")
  if directory is not None:
    directory.check(resume)
  device_calls = (round_calls.DeviceRounds(sim)
                  if config.rounds_per_call > 1 else None)
  carry, canaries, initial_params = _first_carry(sim)
  ledger, first_round, metrics_offset = sim.plan.new_ledger(), 0, 0
  if resume:
    carry, ledger, first_round, metrics_offset = _restore(directory, sim,
                                                          carry, log)
  if directory is not None:
    directory.open(config.to_dict(), sim.plan.noise_multiplier, ledger,
                   metrics_offset)
  if first_round:
    # The clock goes on from the kept rows: a resumed run's elapsed_s and
    # wall_time_s count every segment whose rows it kept (not the time
    # between the interruption and the resume, nor rounds it replays).
    start -= _elapsed_before(directory)
  def started():
    _log_start(sim, planned_epsilon(), log)
    if device_calls is not None:
      log(f"rounds_per_call={config.rounds_per_call}: population on the "
          f"device, calls of up to {device_calls.max_rounds} rounds (a call "
          "ends at an eval round)")

  calls = device_calls or round_calls.HostRounds(sim, first_round, canaries)
  lane = Lane(config, sim, sim.plan, ledger, directory, log,
              rounds_done=first_round, start=start)
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=config.rounds, initial=first_round,
                    desc=config.name, unit="round", leave=False)
  try:
    carry = run_rounds([lane], calls, carry, first_round, bar,
                       dispatched=started)
  except KeyboardInterrupt:
    raise RunInterrupted(lane.rounds_done, run_dir) from None
  finally:
    calls.close()
    if bar is not None:
      bar.close()
    if directory is not None:
      directory.close()
  params = carry.state.params
  summary = lane.summary(params, carry.clip_norm())
  summary["host_data_wait_s"] = calls.data_wait_s
  if canaries is not None:
    summary["audit"] = _audit_summary(config, canaries.directions,
                                      initial_params, params,
                                      carry.canary_max)
  if directory is not None:
    directory.write_summary(summary)
  log(f"done: {lane.rounds_done} rounds, eval accuracy "
      f"{summary.get('eval_accuracy', float('nan')):.4f}, epsilon "
      f"{summary['epsilon']:.4g} at delta={config.delta:g}")
  return RunResult(config, jax.device_get(params), ledger,
                   sim.plan.noise_multiplier, lane.rounds_done, lane.history,
                   summary)


def _log_start(sim: simulation.Simulation, planned_epsilon: float,
               log: Callable[[str], None]) -> None:
  config, plan = sim.config, sim.plan
  log(f"{config.name}: {sim.train.num_clients} training clients, "
      f"{sim.dataset.eval.num_clients} held-out clients, model "
      f"{sim.model.name}, {config.sampling} sampling (expected cohort "
      f"{plan.sampler.expected_cohort_size:g}, block {sim.slots} slots), z="
      f"{plan.noise_multiplier:.4g}, C={config.clip_norm:g}, planned epsilon="
      f"{planned_epsilon:.4g} at delta={config.delta:g} ({config.accountant})")
  log(f"round: {sim.describe_round()}")
  mib = files.decoded_bytes(sim.train) / 2**20
  if isinstance(sim.train, population_lib.FederatedPopulation):
    log(f"training clients in memory ({mib:.4g} MiB): each cohort is "
        "gathered by one index")
  else:
    log(f"training clients on disk ({mib:.4g} MiB): each round's cohort is "
        "read on a background thread")
