"""How a run's rounds reach the device: calls of one or of K rounds.

The runner's loop (runner.run_rounds) is the same for every caller; it asks
where the call that starts at round r ends (`call_end`), records the call's
DP events, starts the call (`start`, asynchronous: the host accounts while
the device computes), collects one row of metrics per round and lane
(`finish`) and reads each lane's model (`params`). Sweeps add a third
caller, whose lanes are configurations (sweep.py).

  * `HostRounds`: one compiled round per call. The host samples each
    cohort and lays out its block ahead, on a background thread
    (data/prefetch.py), while the device computes the round before. Audit
    canaries and dropout are simulated here.
  * `DeviceRounds`: calls of up to `rounds_per_call` rounds with the
    population on the device (on_device.py); a call also ends
    at an evaluation round, so both callers evaluate the same models.

What the rounds carry from one to the next is a `Carry`: the server state
(with the mechanism's own state: adaptive clipping's clip norm, DP-FTRL's
tree) and the audit's best canary cosines.
"""

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_dp import audit
from fedjax_dp import simulation
from fedjax_dp import tree_util
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp import on_device
from fedjax_dp.data import prefetch


class Carry(NamedTuple):
  """The state the rounds carry (and a checkpoint holds)."""

  state: Any  # server_lib.ServerState, its `privacy` the mechanism's state
  canary_max: jax.Array | None = None  # audit: best cosine per canary

  def clip_norm(self) -> jax.Array | None:
    """Adaptive clipping: the clip norm of the next round (else None)."""
    privacy = self.state.privacy
    return None if privacy is None else privacy.clip_norm

  def tree(self) -> dict:
    """The checkpoint's tree of arrays."""
    tree = {"server": self.state}
    if self.canary_max is not None:
      tree["canary_max"] = self.canary_max
    return tree

  @classmethod
  def from_tree(cls, tree: dict) -> "Carry":
    return cls(tree["server"], tree.get("canary_max"))


class RoundRow(NamedTuple):
  """One round's outputs, on the host."""

  metrics: dict
  num_drawn: int  # clients the sampler drew before any truncation
  num_dropped: int  # sampled clients that dropped out


class Finished(NamedTuple):
  """A call's rounds, in order; `diverged_at` is the round whose global
  model became non-finite (its row and the later ones are not there)."""

  rows: list[RoundRow]
  diverged_at: int | None = None


def _to_python(metrics: dict) -> dict:
  return {k: (v.item() if hasattr(v, "item") else v)
          for k, v in metrics.items()}


class AuditCanaries(NamedTuple):
  """The audit's canary directions and the norm they are submitted with."""

  directions: Any
  norm: float


class _SingleRun:
  """What both callers of a single run share: the round's arguments, and
  the one lane's model."""

  def __init__(self, sim: simulation.Simulation):
    self._hparams = sim.hparams()
    self._adaptive = sim.plan.adaptive_hparams()
    self._secagg = sim.plan.secagg_params()

  def params(self, carry: Carry, lane: int):
    del lane
    return carry.state.params


class HostRounds(_SingleRun):
  """One compiled round per call, cohorts prepared on the host."""

  def __init__(self, sim: simulation.Simulation, first_round: int,
               canaries: AuditCanaries | None = None):
    super().__init__(sim)
    self._sim = sim
    round_fn = sim.round_fn()

    def one_round(state, block, hparams, noise_key, r, canaries, adaptive,
                  secagg):
      # The round's key and the finiteness check inside the program: no
      # eager operations between rounds.
      state, metrics = round_fn(state, block, hparams,
                                jax.random.fold_in(noise_key, r), canaries,
                                adaptive, secagg)
      return state, metrics, tree_util.tree_all_finite(state.params)

    self._round = jax.jit(one_round, donate_argnums=(0,))
    self._streams = sim.streams()
    self._canaries = canaries
    sample_fn = jax.jit(sim.plan.sampler.sample_round)

    def prepare(r: int):
      # Runs ahead on a background thread while the previous round computes,
      # the cohort's copy to the device included.
      prepared = sim.prepare(r, self._streams, sample_fn)
      return (r, jax.device_put(prepared[0])) + prepared[1:]

    self._cohorts = prefetch.Prefetcher(
        prepare, range(first_round, sim.config.rounds), depth=2)
    self._next = iter(self._cohorts)
    # Seconds rounds waited for their cohort: preparation on the critical
    # path (none while it keeps ahead of the rounds).
    self.data_wait_s = 0.0

  def call_end(self, r: int) -> int:
    return r + 1

  def start(self, carry: Carry, r: int, end: int, active=None):
    """Starts round r (end = r + 1); returns the new carry and what
    `finish` collects."""
    del end, active
    started = time.perf_counter()
    q, block, num_drawn, num_dropped, canary_ids = next(self._next)
    self.data_wait_s += time.perf_counter() - started
    if q != r:
      raise AssertionError(f"prepared round {q}, expected {r}")
    canaries = None
    if self._canaries is not None:
      canaries = dp_fedavg.Canaries(self._canaries.directions, canary_ids,
                                    jnp.float32(self._canaries.norm))
    state, metrics, finite = self._round(
        carry.state, block, self._hparams, self._streams.noise, r, canaries,
        self._adaptive, self._secagg)
    canary_max = carry.canary_max
    if canaries is not None:
      canary_max = audit.max_over_rounds(canary_max,
                                         metrics.pop("canary_cosines"))
    return (Carry(state, canary_max),
            (r, metrics, finite, num_drawn, num_dropped))

  def finish(self, pending) -> list[Finished]:
    r, metrics, finite, num_drawn, num_dropped = pending
    if not bool(finite):
      return [Finished([], r)]
    return [Finished([RoundRow(_to_python(jax.device_get(metrics)),
                               int(num_drawn), int(num_dropped))])]

  def close(self) -> None:
    self._cohorts.close()


class DeviceRounds(_SingleRun):
  """Calls of up to `rounds_per_call` rounds, the population on the device.

  Building it refuses what runs on the host only and a population over the
  memory budget, before anything is computed or written.
  """

  def __init__(self, sim: simulation.Simulation):
    super().__init__(sim)
    config = sim.config
    self._multi_round = jax.jit(on_device.build_multi_round(sim),
                                static_argnames="num_rounds",
                                donate_argnums=(0,))
    self._population = on_device.device_population(sim)
    self._keys = on_device.multi_round_keys(sim.streams())
    self._rounds, self._eval_every = config.rounds, config.eval_every
    # The longest call that can occur: the compiled loop's static length.
    self.max_rounds = min(config.rounds_per_call, config.eval_every,
                          config.rounds)
    # Cohorts are sampled and laid out inside the call: no host wait.
    self.data_wait_s = 0.0

  def call_end(self, r: int) -> int:
    # Ending a call at an eval round evaluates the same models as the host
    # loop; shorter calls reuse the compiled program (it masks the rest).
    return min(r + self.max_rounds, self._rounds,
               (r // self._eval_every + 1) * self._eval_every)

  def start(self, carry: Carry, r: int, end: int, active=None):
    del active
    state, metrics, aux = self._multi_round(
        carry.state, self._hparams, self._population, self._keys, r,
        end - r, self._adaptive, self._secagg, num_rounds=self.max_rounds)
    return Carry(state), (r, end, metrics, aux)

  def finish(self, pending) -> list[Finished]:
    r, end, metrics, aux = pending
    metrics, aux = jax.device_get((metrics, aux))
    rows = []
    for i in range(end - r):
      if not aux["params_finite"][i]:
        return [Finished(rows, r + i)]
      rows.append(RoundRow(
          _to_python({name: v[i] for name, v in metrics.items()}),
          int(aux["num_drawn"][i]), 0))
    return [Finished(rows)]

  def close(self) -> None:
    pass
