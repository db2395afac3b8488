"""Hyperparameter sweeps as one compiled, vmapped program per shape group.

A sweep is the Cartesian product of a base config and a grid such as
`{"noise_multiplier": [0.5, 1.0], "clip_norm": [0.1, 1.0], "seed": [0, 1]}`.
Configurations that differ only in the round's array hyperparameters
(`noise_multiplier`, `clip_norm`, `client_lr`, `server_lr`), in `seed`, or in
host-only settings (`HOST_FIELDS`: name, target epsilon, delta, budget,
accountant, evaluation cadence) share one *shape group*: one `jax.jit` of
`jax.vmap(round_fn)` over a leading configuration axis (server state, block,
hparams, noise key, secure aggregation's parameters; the server state holds
what the mechanism carries: adaptive clipping's clip norm, DP-FTRL's tree
from the lane's own noise key) runs every round of all of them at once. Any other
difference (model, cohort size, dataset, mechanism, local epochs, ...)
changes the program, so such configurations form separate groups, run one
after another.

Every mechanism runs in a sweep (the privacy plan says what a sweep refuses:
`plan.refusal(config, "sweep")`, audit canaries). Each configuration keeps
what a single run keeps: its own privacy plan and `PrivacyLedger` with its
own per-round DP events, its own random streams (cohort sampling, example
order and noise from its seed and its own configuration,
`simulation.stream_keys`; the initial model from its seed), its own metrics
and evaluation. The runner's loop (`runner.run_rounds`) drives the lanes, so
a configuration ends with the same parameters and epsilon (within float
tolerance) as `runner.run` of that configuration alone (tested for every
mechanism). A configuration whose model diverges or whose training fails
stops there; the others go on.

The sweep samples every cohort of a group in advance (sampling depends only
on each configuration's keys) and trims the block to the largest cohort any
configuration ever draws (rounded up to the chunk size): one shape, one
compilation, no valid client dropped, and no padded chunk trained.

Privacy: nothing is shared between configurations except compute: two
configurations never share noise (nor cohorts), even with one seed, so
releasing several of them is the composition of independent mechanisms
(`tuning.TuningPrivacy.all_released_epsilon`). Each configuration's epsilon
is that of its own run. Releasing the best of many configurations costs more
privacy than any one of them: see `privacy.tuning.tuning_epsilon`, which
`run_sweep` reports beside the per-config epsilons.
"""

import collections
import dataclasses
import itertools
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp import reports
from fedjax_dp import round_calls
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp import simulation
from fedjax_dp import tree_util
from fedjax_dp.data import prefetch
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import tuning as tuning_lib
from fedjax_dp.data import blocks

# Fields that are arrays of the round (or the seed of its streams): they never
# split a shape group.
ARRAY_FIELDS = ("noise_multiplier", "clip_norm", "client_lr", "server_lr",
                "seed")
# Fields read only by the host loop (accounting, logging, evaluation cadence).
HOST_FIELDS = ("name", "target_epsilon", "delta", "epsilon_budget",
               "stop_at_budget", "accountant", "eval_every",
               "checkpoint_every")


@dataclasses.dataclass
class GroupInfo:
  """One shape group of a sweep."""

  config_ids: list[str]
  # Client slots of the vmapped block (trimmed; see the module docstring) and
  # the slots a single run of these configurations uses.
  slots: int
  full_slots: int
  # How many times the vmapped round was traced (1 per group when nothing
  # forces a retrace), and the number of configuration chunks it ran.
  num_traces: int = 0
  num_chunks: int = 0
  wall_time_s: float = 0.0
  # Devices the configuration lanes were sharded over.
  num_devices: int = 1


@dataclasses.dataclass
class SweepResult:
  """Everything a sweep produced.

  Attributes:
    base: the base config.
    grid: the grid, field -> list of values.
    config_ids: one id per configuration ("000", "001", ...), grid order.
    configs: the configuration of each id.
    swept: each configuration's values of the grid's fields.
    runs: per configuration, what `runner.run` of it alone returns
      (`summary["wall_time_s"]` is the wall time of its configuration chunk).
    groups: the shape groups, in the order they ran.
    tuning: the privacy cost of releasing the best configuration
      (`tuning.TuningPrivacy`), or None when not computed.
    wall_time_s: the whole sweep's wall time.
    run_dir: where the sweep was written, or None.
  """

  base: config_lib.Config
  grid: dict[str, list]
  config_ids: list[str]
  configs: list[config_lib.Config]
  swept: list[dict[str, Any]]
  runs: list[runner.RunResult]
  groups: list[GroupInfo]
  tuning: Any = None
  wall_time_s: float = 0.0
  run_dir: pathlib.Path | None = None


def expand_grid(base: config_lib.Config,
                grid: dict[str, Sequence]) -> list[tuple[dict, config_lib.Config]]:
  """The grid's configurations, last field varying fastest.

  Setting `noise_multiplier` in the grid clears the base's `target_epsilon`
  (the two are exclusive).

  Returns:
    [(swept values, config)], in grid order.

  Raises:
    ValueError: unknown field, empty value list, or an invalid configuration.
  """
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  for name, values in grid.items():
    if name not in fields:
      raise ValueError(
          f"grid field {name!r} is not a config field; fields are "
          f"{sorted(fields)}")
    if isinstance(values, (str, bytes)) or not len(list(values)):
      raise ValueError(f"grid field {name!r} needs a non-empty list of values")
  names = list(grid)
  out = []
  for values in itertools.product(*(list(grid[n]) for n in names)):
    swept = dict(zip(names, values))
    changes = dict(swept)
    if changes.get("noise_multiplier") is not None:
      changes.setdefault("target_epsilon", None)
    out.append((swept, base.replace(**changes)))
  return out


def parse_grid(base: config_lib.Config,
               assignments: Sequence[str]) -> dict[str, list]:
  """Parses CLI grid flags 'field=v1,v2,...' into a grid.

  Each value is parsed as `config.parse_override` parses one (JSON, bare
  words as strings, 'inf', 'none'), so '--grid noise_multiplier=0.5,1'
  gives floats. A field given twice has its values appended. Values that
  contain commas (dicts) are not supported here.

  Raises:
    ValueError: a malformed flag, unknown field or value of the wrong type.
  """
  grid: dict[str, list] = {}
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(
          f"--grid {assignment!r} must look like field=value1,value2")
    name, raw = assignment.split("=", 1)
    name = name.strip().replace("-", "_")
    values = [v for v in raw.split(",") if v.strip()]
    if not values:
      raise ValueError(f"--grid {assignment!r} gives no values")
    # A swept noise multiplier replaces a calibrated one (see expand_grid).
    like = base if name != "noise_multiplier" else base.replace(
        noise_multiplier=1.0, target_epsilon=None)
    for v in values:
      config = config_lib.parse_override(like, f"{name}={v}")
      grid.setdefault(name, []).append(getattr(config, name))
  return grid


def _key(config: config_lib.Config, exclude: Sequence[str]) -> str:
  d = {k: v for k, v in config.to_dict().items() if k not in exclude}
  return json.dumps(d, sort_keys=True, default=repr)


def _structural(config: config_lib.Config) -> config_lib.Config:
  """The config a Simulation is built from: no noise to calibrate.

  With several devices a sweep shards its configurations, not each
  configuration's cohort, over them (`_config_sharding`).
  """
  return config.replace(noise_multiplier=0.0, target_epsilon=None,
                        epsilon_budget=None, shard_clients=False)


CONFIGS_AXIS = "configs"


def _config_sharding() -> jax.sharding.NamedSharding | None:
  """Shards the leading (configuration) axis over every device, if several.

  Configurations never communicate, so each device runs its share of the
  vmapped lanes on its own; results equal the single-device sweep's.
  """
  if jax.device_count() == 1:
    return None
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (CONFIGS_AXIS,))
  return jax.sharding.NamedSharding(mesh,
                                    jax.sharding.PartitionSpec(CONFIGS_AXIS))


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i: int):
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def _make_step(round_fn, counter: list[int]):
  """jit(vmap(round)) with per-configuration masking.

  Each lane carries what its single run carries from round to round: the
  server state, with its mechanism's state (adaptive clipping's clip norm,
  DP-FTRL's tree from the lane's own noise key). A configuration whose
  `active` flag is off (stopped for its budget), or whose new global model
  is not finite (diverged), keeps its state.

  Returns:
    `step(states, block, hparams, base_keys, r, active, adaptive, secagg)
    -> (states, metrics, finite)`; `adaptive` and `secagg` are None where
    the mechanism has none.
  """

  def one_lane(state, block, hparams, key, adaptive, secagg):
    return round_fn(state, block, hparams, key, None, adaptive, secagg)

  def step(states, block, hparams, base_keys, r, active, adaptive, secagg):
    counter[0] += 1  # Runs once per trace.
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base_keys, r)
    new, metrics = jax.vmap(one_lane)(states, block, hparams, keys,
                                      adaptive, secagg)
    finite = jax.vmap(tree_util.tree_all_finite)(new.params)
    update = active & finite

    def keep(n, o):
      return jnp.where(update.reshape(update.shape + (1,) * (n.ndim - 1)),
                       n, o)

    return jax.tree_util.tree_map(keep, new, states), metrics, finite

  return jax.jit(step, donate_argnums=(0,))


@dataclasses.dataclass
class _Member:
  """One configuration of a shape group: its runner lane (plan, ledger,
  metrics) and random streams; its final parameters once run."""

  index: int
  lane: runner.Lane
  # The configuration's own random streams (as its single run's).
  streams: simulation.StreamKeys
  params: Any = None
  # Adaptive clipping: where the lane's clip norm ended.
  final_clip_norm: float | None = None

  @property
  def config(self) -> config_lib.Config:
    return self.lane.config

  @property
  def plan(self) -> plan_lib.PrivacyPlan:
    return self.lane.plan


def run_sweep(
    base: config_lib.Config,
    grid: dict[str, Sequence],
    *,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_configs_per_group: int | None = None,
    tuning: bool = True,
    log: Callable[[str], None] = print,
    dataset=None,
    model=None,
) -> SweepResult:
  """Runs every configuration of `base` x `grid`, vmapped per shape group.

  `dataset` and `model` (the user's, as in `runner.run`) are shared by every
  configuration; `base` then names them (`simulation.name_user_objects`).

  Budgets: with `epsilon_budget` set, each configuration is checked before
  every round as `runner.run` checks a single run; one that would exceed its
  budget stops (its state stops changing and no further event enters its
  ledger) while the others go on. As in `runner.run`, a configuration planned
  past its budget is refused before anything runs unless `stop_at_budget`.
  A configuration whose global model becomes non-finite keeps its last finite
  state and stops (its summary says `"diverged": true`); `runner.run` raises
  `ModelDivergedError` there instead.

  Args:
    base: the base config; its fields not in `grid` are shared.
    grid: config field -> list of values (Cartesian product).
    run_dir: if given, the sweep's run directory (see `reports.write_sweep`).
    progress: show a progress bar per configuration chunk.
    max_configs_per_group: at most this many configurations run in one
      vmapped program (bounds memory); a larger group runs in chunks, the last
      padded with copies so that every chunk reuses the same compilation.
      None: no limit.
    tuning: compute the privacy cost of selecting the best configuration
      (`privacy.tuning.tuning_epsilon`).
    log: where progress lines go.

  Returns:
    The SweepResult (configurations in grid order).

  Raises:
    ValueError: a bad grid or configuration, or a configuration planned
      past its epsilon budget without `stop_at_budget`.
  """
  if max_configs_per_group is not None and max_configs_per_group < 1:
    raise ValueError(
        f"max_configs_per_group must be >= 1 or None, got "
        f"{max_configs_per_group!r}")
  start = time.perf_counter()
  base = simulation.name_user_objects(base, dataset=dataset, model=model)
  expanded = expand_grid(base, grid)
  swept = [s for s, _ in expanded]
  configs = [c for _, c in expanded]
  ids = [f"{i:03d}" for i in range(len(configs))]

  # One Simulation per distinct data/program (seed included: the dataset's
  # partition depends on it); one group per distinct shape.
  sims: dict[str, simulation.Simulation] = {}
  groups: dict[tuple, list[int]] = collections.OrderedDict()
  for i, config in enumerate(configs):
    check_sweepable(config)
    skey = _key(config, ARRAY_FIELDS[:-1] + HOST_FIELDS)
    if skey not in sims:
      sims[skey] = simulation.build(_structural(config), dataset, model)
    sim = sims[skey]
    gkey = (_key(config, ARRAY_FIELDS + HOST_FIELDS), sim.slots,
            sim.num_steps, tuple(sim.dataset.input_shape),
            sim.dataset.num_classes)
    groups.setdefault(gkey, []).append(i)
  log(f"sweep: {len(configs)} configurations in {len(groups)} shape "
      f"group(s)")

  z_cache: dict[tuple, float] = {}
  runs: list[runner.RunResult | None] = [None] * len(configs)
  infos = []
  for g, members in enumerate(groups.values()):
    sim0 = sims[_key(configs[members[0]], ARRAY_FIELDS[:-1] + HOST_FIELDS)]
    group = []
    for i in members:
      config = configs[i]
      sim = sims[_key(config, ARRAY_FIELDS[:-1] + HOST_FIELDS)]
      plan = _member_plan(sim.plan, config, z_cache)
      _check_budget(config, plan)
      named = config.replace(name=f"{config.name}-{ids[i]}")
      group.append(_Member(i, runner.Lane(
          named, sim, plan, plan.new_ledger(), None, log,
          name=f"{named.name}: "),
          simulation.stream_keys(config, plan.noise_multiplier)))
    info = _run_group(g, len(groups), group, sim0, max_configs_per_group,
                      progress, log)
    info.config_ids = [ids[i] for i in members]
    infos.append(info)
    for m in group:
      runs[m.index] = _result(m, info.wall_time_s)

  result = SweepResult(base=base, grid={k: list(v) for k, v in grid.items()},
                       config_ids=ids, configs=configs, swept=swept,
                       runs=runs, groups=infos)
  if tuning and len(configs) > 1:
    try:
      result.tuning = tuning_lib.tuning_epsilon(
          [r.ledger.events for r in runs], base.delta,
          relation=runs[0].ledger.relation)
    except (accounting.UnsupportedAccountingError, ValueError) as e:
      log(f"sweep: privacy cost of tuning not computed: {e}")
  result.wall_time_s = time.perf_counter() - start
  if run_dir is not None:
    result.run_dir = pathlib.Path(run_dir)
    reports.write_sweep(result, run_dir)
    log(f"sweep: wrote {run_dir}")
  return result


def check_sweepable(config: config_lib.Config) -> None:
  """Raises ValueError, naming the field, for what a sweep does not run
  (the privacy plan's `refusal(config, "sweep")`)."""
  refused = plan_lib.refusal(config, "sweep")
  if refused is not None:
    raise refused.error(config)


def _member_plan(plan: plan_lib.PrivacyPlan, config: config_lib.Config,
                 z_cache: dict) -> plan_lib.PrivacyPlan:
  """The privacy plan of one configuration of a shape group: the group's,
  with the configuration's own clip norm, delta, accountant and noise
  multiplier (given, or calibrated to its target epsilon; calibrations are
  shared between configurations that calibrate alike)."""
  plan = dataclasses.replace(plan, clip_norm=float(config.clip_norm),
                             delta=float(config.delta),
                             accountant=config.accountant)
  if config.noise_multiplier is not None:
    z = float(config.noise_multiplier)
  else:
    key = (plan, config.target_epsilon)
    if key not in z_cache:
      z_cache[key] = plan_lib.calibrate_noise_multiplier(
          plan, config.target_epsilon)
    z = z_cache[key]
  plan = dataclasses.replace(plan, noise_multiplier=z)
  if plan.secagg is not None:
    # Secure aggregation's shares depend on this lane's z and clip norm.
    s = plan.secagg
    plan = dataclasses.replace(plan, secagg=plan_lib.secagg_setup(
        plan.clip_norm, s.bits, config.secagg_scale, z, s.min_shares,
        s.max_shares, s.dim))
  return plan


def _check_budget(config: config_lib.Config,
                  plan: plan_lib.PrivacyPlan) -> None:
  """Refuses a configuration planned past its budget (as runner.run does)."""
  if config.epsilon_budget is None or config.stop_at_budget:
    return
  planned = plan.planned_epsilon()
  if planned > config.epsilon_budget:
    raise ValueError(
        f"config field 'epsilon_budget' ({config.epsilon_budget:g}) is below "
        f"the planned epsilon {planned:.4g} of {config.rounds} rounds of the "
        f"configuration with noise_multiplier={plan.noise_multiplier:g}, "
        f"seed={config.seed}; set stop_at_budget=true to stop each "
        "configuration before the round that would exceed it")


def _cohort_sizes(sim, members, sample_fn, rounds: int) -> int:
  """Largest cohort any member draws in any round (same draws as prepare)."""
  largest = 0
  for m in members:
    for r in range(rounds):
      _, valid, _ = sample_fn(m.streams.sample, r)
      largest = max(largest, int(jnp.sum(valid)))
  return largest


def _run_group(g: int, num_groups: int, members: list[_Member],
               sim0: simulation.Simulation, max_configs: int | None,
               progress: bool, log) -> GroupInfo:
  """Runs one shape group, chunk by chunk; fills the members' host state."""
  start = time.perf_counter()
  rounds = sim0.config.rounds
  sample_fn = jax.jit(sim0.plan.sampler.sample_round)
  chunk = sim0.execution.slot_multiple
  largest = _cohort_sizes(sim0, members, sample_fn, rounds)
  slots = min(sim0.slots, max(chunk, -(-largest // chunk) * chunk))
  counter = [0]
  step = _make_step(sim0.round_fn(), counter)
  # Every member's model is sim0's architecture, so one init serves all
  # (each lane's mechanism state is its own plan's).
  init = jax.jit(jax.vmap(lambda seed: server_lib.init(
      sim0.initial_params(seed), sim0.server_optimizer)))
  size = len(members) if max_configs is None else min(max_configs,
                                                       len(members))
  sharding = _config_sharding()
  if sharding is not None:
    # Every device gets the same number of lanes (padding copies included).
    devices = jax.device_count()
    size = -(-size // devices) * devices
  chunks = [members[i:i + size] for i in range(0, len(members), size)]
  log(f"group {g + 1}/{num_groups}: {len(members)} configurations "
      f"({len(chunks)} chunk(s) of {size}), model {sim0.model.name}, block "
      f"{slots} of {sim0.slots} slots")
  for c, part in enumerate(chunks):
    # Pad with copies of the last member so every chunk has one shape; the
    # copies' results are discarded.
    lanes = part + [part[-1]] * (size - len(part))
    desc = f"group {g + 1}/{num_groups}"
    if len(chunks) > 1:
      desc += f" chunk {c + 1}/{len(chunks)}"
    _run_chunk(lanes, len(part), sim0, step, init, sample_fn, slots, rounds,
               progress, desc, sharding)
  return GroupInfo(config_ids=[], slots=slots, full_slots=sim0.slots,
                   num_traces=counter[0], num_chunks=len(chunks),
                   wall_time_s=time.perf_counter() - start,
                   num_devices=jax.device_count() if sharding else 1)


class _LaneRounds:
  """A chunk of a shape group's configurations as lanes of one vmapped
  round per call (the runner's loop drives it; round_calls.py).

  `lanes` may end with padding copies (so every chunk has one shape); only
  the first `num_real` have runner lanes.
  """

  def __init__(self, lanes: list[_Member], num_real: int,
               sim0: simulation.Simulation, step, init, sample_fn,
               slots: int, sharding=None):
    self._num_real, self._size, self._step = num_real, len(lanes), step

    def place(tree):
      # Lanes split over the devices along the configuration axis (the
      # compiled step follows its inputs' sharding).
      return tree if sharding is None else jax.device_put(tree, sharding)

    self._hparams = place(_stack([m.lane.sim.hparams(
        m.config, m.plan.noise_multiplier) for m in lanes]))
    # Every configuration draws its own noise (`simulation.stream_keys`):
    # lanes with one seed but different settings never share it.
    self._noise_keys = place(jnp.stack([m.streams.noise for m in lanes]))
    # What each lane's mechanism carries or needs besides (None: nothing).
    plan0 = lanes[0].plan
    self._adaptive = self._secagg = None
    if plan0.adaptive_clip:
      self._adaptive = place(_stack([m.plan.adaptive_hparams()
                                     for m in lanes]))
    if plan0.secagg is not None:
      self._secagg = place(_stack([m.plan.secagg_params() for m in lanes]))
    states = init(jnp.asarray([m.config.seed for m in lanes], jnp.int32))
    one_lane = jax.tree_util.tree_map(lambda x: x[0], states.params)
    privacy = [m.plan.initial_state(m.streams.noise, one_lane)
               for m in lanes]
    if privacy[0] is not None:
      states = states._replace(privacy=_stack(privacy))
    self.initial_carry = round_calls.Carry(place(states))

    def prepare(r: int):
      cohort_blocks, drawn, dropped = [], [], []
      for m in lanes:
        # (block, drawn, dropped, canary ids): a sweep has no canaries.
        block, num_drawn, num_dropped = m.lane.sim.prepare(
            r, m.streams, sample_fn)[:3]
        if block.client_mask[slots:].any():
          raise AssertionError("a cohort outgrew the sweep's trimmed block")
        cohort_blocks.append(blocks.ClientBlock(
            jax.tree_util.tree_map(lambda x: x[:slots], block.features),
            block.example_mask[:slots], block.client_mask[:slots]))
        drawn.append(num_drawn)
        dropped.append(num_dropped)
      stacked = place(jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                             *cohort_blocks))
      return r, stacked, drawn, dropped

    self._cohorts = prefetch.Prefetcher(prepare, range(sim0.config.rounds),
                                        depth=2)
    self._next = iter(self._cohorts)

  def call_end(self, r: int) -> int:
    return r + 1

  def params(self, carry: round_calls.Carry, lane: int):
    return _take(carry.state.params, lane)

  def start(self, carry: round_calls.Carry, r: int, end: int, active):
    del end
    q, block, drawn, dropped = next(self._next)
    if q != r:
      raise AssertionError(f"prepared round {q}, expected {r}")
    # Padding copies never update.
    mask = list(active) + [False] * (self._size - len(active))
    states, metrics, finite = self._step(
        carry.state, block, self._hparams, self._noise_keys, r,
        jnp.asarray(mask), self._adaptive, self._secagg)
    return (round_calls.Carry(states),
            (r, metrics, finite, drawn, dropped, list(active)))

  def finish(self, pending) -> list[round_calls.Finished]:
    r, metrics, finite, drawn, dropped, active = pending
    metrics, finite = jax.device_get((metrics, finite))
    out = []
    for lane in range(self._num_real):
      if not active[lane]:
        out.append(round_calls.Finished([]))
      elif not finite[lane]:
        out.append(round_calls.Finished([], r))
      else:
        row = {k: np.asarray(v[lane]).item() for k, v in metrics.items()}
        out.append(round_calls.Finished(
            [round_calls.RoundRow(row, drawn[lane], dropped[lane])]))
    return out

  def close(self) -> None:
    self._cohorts.close()


def _run_chunk(lanes: list[_Member], num_real: int, sim0, step, init,
               sample_fn, slots: int, rounds: int, progress: bool, desc: str,
               sharding=None) -> None:
  """Runs one vmapped chunk through the runner's loop; fills the real
  members' final parameters."""
  real = lanes[:num_real]
  calls = _LaneRounds(lanes, num_real, sim0, step, init, sample_fn, slots,
                      sharding)
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=rounds, desc=desc, unit="round", leave=False)
  start = time.perf_counter()
  for m in real:
    m.lane.start = start
  try:
    carry = runner.run_rounds([m.lane for m in real], calls,
                              calls.initial_carry, 0, bar)
  finally:
    calls.close()
    if bar is not None:
      bar.close()
  for lane, m in enumerate(real):
    m.params = jax.device_get(_take(carry.state.params, lane))
    clip_norm = carry.clip_norm()
    if clip_norm is not None:
      m.final_clip_norm = float(clip_norm[lane])


def _result(m: _Member, wall_time_s: float) -> runner.RunResult:
  """The member's RunResult, with the runner's summary (its wall time is
  that of its configuration chunk)."""
  summary = m.lane.summary(m.params, m.final_clip_norm)
  summary["wall_time_s"] = wall_time_s
  lane = m.lane
  return runner.RunResult(lane.config, m.params, lane.ledger,
                          lane.plan.noise_multiplier, lane.rounds_done,
                          lane.history, summary)
