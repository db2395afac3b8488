"""The privacy plan: the one place where a run's privacy pieces are joined.

`build(config, population_size, model_size)` turns a run's public settings
into a `PrivacyPlan`, which holds, and alone decides:

  * the sampler that draws every round's cohort, and from it the round's DP
    event (`event`, `schedule`): the ledger's events and the simulation's
    cohorts come from the same object, so they cannot disagree;
  * the neighbouring relation of the guarantee (`relation`) and the public
    denominator of the average (`denominator`);
  * the noise multiplier, given or calibrated to a target epsilon on the
    same events (`calibrate_noise_multiplier`);
  * how the compiled round clips (`clip`), what each client sends under
    client-side noise (`message`), and how the released sum is noised
    (`release`), including correlated noise (DP-FTRL's tree, BandMF, BLT:
    `strategy`), secure aggregation's encoding and distributed noise's
    abort rule;
  * the state mechanisms carry from round to round in the server state
    (`initial_state`, `PrivacyState`: adaptive clipping's clip norm,
    correlated noise's key, step and buffers), and adaptive clipping's
    hyperparameters;
  * which combinations of mechanism and execution it supports
    (`check_combination`, `refusal`).

The other modules of `fedjax_dp/privacy/` are flat pieces (clipping, noise,
sampling, events, accounting, ...) that import at most one other privacy
module; only this one joins them. Rounds, runners and sweeps ask the plan
and never dispatch on the mechanism themselves.

Privacy: every guarantee is stated under `relation`:
  * central Gaussian (and per-layer clipping, whose groups keep the whole
    update's L2 norm <= C): the sampler's own event and relation
    (add/remove-one for Poisson, replace-one for fixed-size sampling);
  * central Laplace: PoissonSampledDpEvent(q, LaplaceDpEvent(z)) under
    add/remove-one without truncation, else the unamplified LaplaceDpEvent(
    z / 2) (privacy/laplace.py);
  * adaptive clipping: the update's and the count's Gaussians, together
    exactly a Gaussian of multiplier z (privacy/adaptive_clipping.py);
  * DP-FTRL: the tree's event when it starts, under replace-special
    (privacy/tree_aggregation.py);
  * participation schemas (cyclic, banded Poisson samplers) with the tree,
    BandMF, BLT or independent Gaussian noise: the whole run's Gaussian of
    the schema's sensitivity in round 0 (privacy/correlated_noise.py), or,
    amplified (b-banded C under banded Poisson), one sampled Gaussian per
    cycle of b rounds, under the sampler's relation;
  * local noise: one client's messages under the LOCAL relation;
  * distributed noise and secure aggregation: zero-out (replace-special)
    neighbours among the participants, no amplification by sampling
    (privacy/placement.py, privacy/secure_aggregation.py);
  * record-level DP-SGD inside each client: one client's example-level
    guarantee under zero-out neighbours (`noisy_batch_gradient`).
"""

import dataclasses
import enum
import functools
import math
from typing import Any, Callable, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import streams
from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import correlated_noise
from fedjax_dp.privacy import events
from fedjax_dp.privacy import laplace
from fedjax_dp.privacy import noise
from fedjax_dp.privacy import per_layer
from fedjax_dp.privacy import placement
from fedjax_dp.privacy import sampling
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.privacy import tree_aggregation


class Noise(enum.Enum):
  """The noise mechanism (config field `mechanism`)."""

  GAUSSIAN = "gaussian"  # L2 clipping, Gaussian noise.
  LAPLACE = "laplace"  # L1 clipping, Laplace noise.
  TREE = "tree"  # L2 clipping, DP-FTRL's tree-aggregation noise.
  BAND_MF = "band_mf"  # L2 clipping, banded matrix-factorization noise.
  BLT = "blt"  # L2 clipping, buffered-linear-Toeplitz MF noise.


# Mechanisms whose noise is correlated across rounds (a strategy carried in
# the server state), and the samplers of participation schemas.
CORRELATED = (Noise.TREE, Noise.BAND_MF, Noise.BLT)
SCHEMA_SAMPLINGS = ("cyclic", "banded_poisson")


class Placement(enum.Enum):
  """Who adds the noise (config field `noise_placement`)."""

  CENTRAL = "central"
  DISTRIBUTED = "distributed"
  LOCAL = "local"


# Default bound on the probability that a round of distributed noise has
# fewer participants than the public minimum (and so aborts).
DEFAULT_ABORT_PROBABILITY = 0.01


def _must_be(field: str, allowed: str, value: Any) -> ValueError:
  """The error for a config field outside what it is allowed to be (the
  wording of the config's own validation)."""
  return ValueError(f"config field {field!r} must be {allowed}; got "
                    f"{value!r}")


def _fail(field: str, allowed: str, value: Any) -> None:
  raise _must_be(field, allowed, value)


def check_combination(config) -> None:
  """Refuses, naming the field, the combinations of privacy settings the
  plan does not build (the config's own validation calls this; each field
  on its own was checked before).

  Raises:
    ValueError: naming the field and what it must be.
  """
  c = config
  names = [m.value for m in Noise]
  if c.mechanism not in names:
    _fail("mechanism", f"one of {names}", c.mechanism)
  noise_kind = Noise(c.mechanism)
  if noise_kind is Noise.LAPLACE and (c.adaptive_clipping or
                                      c.per_layer_clipping):
    _fail("mechanism", "'gaussian' with adaptive or per-layer clipping "
          "(both are L2 mechanisms)", c.mechanism)
  _check_placement(c, noise_kind)
  _check_tree(c, noise_kind)
  _check_schema(c, noise_kind)


def _check_placement(c, noise_kind: Noise) -> None:
  names = [p.value for p in Placement]
  if c.noise_placement not in names:
    _fail("noise_placement", f"one of {names}", c.noise_placement)
  where = Placement(c.noise_placement)
  if where is not Placement.CENTRAL:
    if noise_kind in CORRELATED:
      _fail("noise_placement", f"'central' with mechanism={c.mechanism!r}",
            c.noise_placement)
    if c.adaptive_clipping:
      _fail("noise_placement", "'central' with adaptive clipping (its "
            "count is noised by the server)", c.noise_placement)
  if where is Placement.DISTRIBUTED and noise_kind is Noise.LAPLACE:
    _fail("mechanism", "'gaussian' with distributed noise (a sum of Laplace "
          "shares is not a Laplace mechanism)", c.mechanism)
  if c.secagg_bits is not None:
    if where is not Placement.DISTRIBUTED:
      _fail("secagg_bits", "null unless noise_placement='distributed'",
            c.secagg_bits)
  if c.min_participants is not None and where is not Placement.DISTRIBUTED:
    _fail("min_participants", "null unless noise_placement='distributed'",
          c.min_participants)


def _check_tree(c, noise_kind: Noise) -> None:
  tree = noise_kind is Noise.TREE
  if (c.sampling == "disjoint") and not tree:
    _fail("sampling", "'disjoint' only with mechanism='tree' (DP-FTRL "
          "credits no sampling; its cohorts are disjoint within a tree)",
          c.sampling)
  if tree and c.sampling not in ("disjoint", "cyclic"):
    _fail("sampling", "'disjoint' (trees with restarts) or 'cyclic' (one "
          "tree under a participation schema) with mechanism='tree'",
          c.sampling)
  if tree and c.sampling == "disjoint" and c.accountant != "rdp":
    _fail("accountant", "'rdp' with sampling='disjoint' (only "
          "dp_accounting's RDP accountant takes tree-aggregation events)",
          c.accountant)
  if tree and (c.adaptive_clipping or c.sampling_probability is not None
               or c.cohort_size is None):
    _fail("mechanism", "'tree' with a fixed cohort_size and without "
          "adaptive clipping", c.mechanism)
  if c.tree_restart_every is not None and (
      not tree or c.sampling != "disjoint"):
    _fail("tree_restart_every", "null unless mechanism='tree' with "
          "sampling='disjoint'", c.tree_restart_every)
  if c.tree_participation not in sampling.PARTICIPATIONS:
    _fail("tree_participation", f"one of {list(sampling.PARTICIPATIONS)}",
          c.tree_participation)


def _check_schema(c, noise_kind: Noise) -> None:
  """Matrix-factorization noise and the participation-schema samplers."""
  schema = c.sampling in SCHEMA_SAMPLINGS
  if noise_kind in (Noise.BAND_MF, Noise.BLT) and not schema:
    _fail("sampling", f"one of {list(SCHEMA_SAMPLINGS)} with mechanism="
          f"{c.mechanism!r} (its sensitivity needs a participation schema)",
          c.sampling)
  if schema != (c.min_separation is not None):
    _fail("min_separation", f"set exactly when sampling is one of "
          f"{list(SCHEMA_SAMPLINGS)}", c.min_separation)
  if c.mf_bands is not None and noise_kind is not Noise.BAND_MF:
    _fail("mf_bands", "null unless mechanism='band_mf'", c.mf_bands)
  if not schema:
    return
  if noise_kind is Noise.LAPLACE:
    _fail("mechanism", f"'gaussian', 'tree', 'band_mf' or 'blt' with "
          f"sampling={c.sampling!r}", c.mechanism)
  if c.adaptive_clipping:
    _fail("adaptive_clipping", f"false with sampling={c.sampling!r}",
          c.adaptive_clipping)
  if c.noise_placement != "central":
    _fail("noise_placement", f"'central' with sampling={c.sampling!r}",
          c.noise_placement)
  if c.sampling == "cyclic" and (c.cohort_size is None or
                                 c.sampling_probability is not None):
    _fail("cohort_size", "an integer (the clients of each round) with "
          "sampling='cyclic'", c.cohort_size)
  if c.sampling == "banded_poisson" and c.capacity is not None:
    _fail("capacity", "null with sampling='banded_poisson' (its block holds "
          "the population: never truncated)", c.capacity)


@dataclasses.dataclass(frozen=True)
class SecAggSetup:
  """Public settings of the secure-aggregation simulation (host floats).

  `min_shares` is the public minimum number of participants the shares are
  sized for (a round with fewer aborts), `max_shares` the most a round can
  have (the sampler's capacity).
  """

  scale: float
  share_stddev: float
  bits: int
  min_shares: int
  max_shares: int
  dim: int

  def params(self) -> secure_aggregation.SecAggParams:
    return secure_aggregation.SecAggParams.create(
        scale=self.scale, share_stddev=self.share_stddev, bits=self.bits)


def secagg_setup(clip_norm: float, bits: int, scale: float | None,
                 noise_multiplier: float, min_shares: int, max_shares: int,
                 dim: int) -> SecAggSetup:
  """Chooses (or checks) the fixed-point scale for `secagg_bits`.

  Without a `scale`, the largest power of two s whose public bound on the
  integer sum fits the bits (secure_aggregation.required_bits) and whose
  arithmetic the simulation can do exactly (check_params).

  Raises:
    ValueError: naming the field, when no scale fits or the shares are too
      small for the discrete Gaussian guarantee (sigma_c >= 1/2).
  """
  c, z = clip_norm, noise_multiplier

  def share(s):
    return secure_aggregation.share_stddev(z, c, s, min_shares)

  def fits(s):
    try:
      secure_aggregation.check_params(max_shares, c, s, share(s), 32)
    except ValueError:
      return False
    return secure_aggregation.required_bits(max_shares, c, s,
                                            share(s)) <= bits

  if scale is None:
    candidates = [2.0 ** k for k in range(40, -41, -1) if fits(2.0 ** k)]
    if not candidates:
      raise ValueError(
          f"config field 'secagg_bits' = {bits} is too small for "
          f"{max_shares} shares of updates clipped to {c:g}; raise it")
    scale = candidates[0]
  secure_aggregation.check_params(max_shares, c, scale, share(scale), bits)
  if z > 0 and share(scale) < 0.5:
    raise ValueError(
        f"secure aggregation shares of std {share(scale):.3g} (integer units) "
        "are below 1/2, outside the discrete Gaussian guarantee; raise "
        "noise_multiplier, secagg_bits or secagg_scale")
  return SecAggSetup(float(scale), share(scale), int(bits), int(min_shares),
                     int(max_shares), int(dim))


def build_sampler(config, population_size: int) -> sampling.Sampler:
  """The run's cohort sampler over `population_size` clients (audit
  canaries included)."""
  if config.cohort_size is not None and config.sampling_probability is None \
      and config.cohort_size > population_size:
    raise ValueError(
        f"config field 'cohort_size' must be in [1, population size "
        f"{population_size}]; got {config.cohort_size}")
  if config.sampling == "disjoint":
    return sampling.make_sampler(
        "disjoint", population_size, cohort_size=config.cohort_size,
        num_rounds=config.rounds, restart_every=config.tree_restart_every,
        participation=config.tree_participation)
  if config.sampling in SCHEMA_SAMPLINGS:
    return sampling.make_sampler(
        config.sampling, population_size, cohort_size=config.cohort_size,
        sampling_probability=config.sampling_probability,
        num_rounds=config.rounds, min_separation=config.min_separation)
  capacity = config.capacity
  if Noise(config.mechanism) is Noise.LAPLACE and capacity is None:
    # dp_accounting has no truncated-Poisson Laplace event: a block as large
    # as the population never truncates, so the round is exactly
    # PoissonSampledDpEvent(q, LaplaceDpEvent(z)).
    capacity = population_size
  return sampling.make_sampler(
      config.sampling, population_size, cohort_size=config.cohort_size,
      sampling_probability=config.sampling_probability,
      capacity=capacity)


def resolve_min_participants(config, sampler: sampling.Sampler) -> int:
  """Distributed noise's public minimum number of participants n_min.

  `config.min_participants`, or the largest n_min with which a round aborts
  with probability <= DEFAULT_ABORT_PROBABILITY: participants are the
  sampled clients that do not drop out, Binomial(N, q (1 - dropout_rate))
  under Poisson sampling (at most the block's capacity), Binomial(M, 1 -
  dropout_rate) under fixed-size sampling. Public settings only.

  Raises:
    ValueError: naming `min_participants`, above the block's capacity.
  """
  if config.min_participants is not None:
    n_min = config.min_participants
  else:
    stays = 1.0 - config.dropout_rate
    if isinstance(sampler, sampling.PoissonSampler):
      n_min = placement.min_participants_for(
          sampler.population_size, sampler.sampling_probability * stays,
          DEFAULT_ABORT_PROBABILITY)
    else:
      n_min = placement.min_participants_for(
          int(sampler.capacity), stays, DEFAULT_ABORT_PROBABILITY)
    n_min = min(n_min, sampler.capacity)
  if n_min > sampler.capacity:
    raise ValueError(
        f"config field 'min_participants' must be in [1, {sampler.capacity}] "
        f"(the most clients a round can have); got {n_min}")
  return int(n_min)


class Refusal(NamedTuple):
  """Why an execution path cannot run a configuration: the config field
  and what it must be there."""

  field: str
  must_be: str

  def error(self, config) -> ValueError:
    return _must_be(self.field, self.must_be, getattr(config, self.field))


def refusal(config, path: str) -> Refusal | None:
  """Why execution path `path` cannot run `config`, or None: the one place
  that says which paths take which mechanisms and features.

  Paths:
    "factored": the factored round of dense and CNN models covers central
      noise (Gaussian, adaptive clipping, DP-FTRL's tree) after
      whole-update L2 clipping, without record-level DP.
    "sweep": a sweep's vmapped lanes run every mechanism (each lane carries
      its own clip norm, tree state, secure-aggregation parameters and
      ledger); audit canaries run with `runner.run` only.
    "rounds_per_call": rounds on the device (rounds_per_call > 1) run
      every mechanism; canaries and dropout are simulated by the host loop
      only, and the population stays on one device.
  """
  noise_kind, where = Noise(config.mechanism), Placement(
      config.noise_placement)
  if path == "factored":
    if noise_kind is Noise.LAPLACE:
      return Refusal("mechanism", "'gaussian' or 'tree' in the factored "
                     "round (L2 clipping)")
    if where is not Placement.CENTRAL:
      return Refusal("noise_placement", "'central' in the factored round")
    if config.per_layer_clipping is not None:
      return Refusal("per_layer_clipping", "null in the factored round")
    if config.example_clip_norm is not None:
      return Refusal("example_clip_norm", "null in the factored round "
                     "(no record-level DP-SGD there)")
    return None
  if path == "sweep":
    if config.audit_canaries:
      return Refusal("audit_canaries", "0 in a sweep (audits run with "
                     "runner.run)")
    return None
  if path == "rounds_per_call":
    if config.audit_canaries:
      return Refusal("audit_canaries", "0 with rounds_per_call > 1 (canaries "
                     "take part in the host loop only)")
    if config.dropout_rate:
      return Refusal("dropout_rate", "0 with rounds_per_call > 1 (dropout is "
                     "simulated on the host)")
    if config.shard_clients:
      return Refusal("shard_clients", "false or null with rounds_per_call > "
                     "1 (the population is kept on one device)")
    return None
  raise ValueError(f"unknown execution path {path!r}")


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """Every privacy decision of one run (see the module docstring).

  Built by `build`; frozen and hashable (sweeps cache calibrations by it).
  The compiled round closes over its static part, `privatizer`; the array
  hyperparameters that sweeps vary (clip norm, noise multiplier) reach the
  round as arguments.
  """

  noise: Noise
  placement: Placement
  sampler: sampling.Sampler
  noise_multiplier: float
  clip_norm: float
  delta: float
  accountant: str
  num_rounds: int
  per_layer_clipping: str | None = None
  adaptive_clip: bool = False
  target_unclipped_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  # Adaptive clipping's sigma_b (resolved; 0 without adaptive clipping).
  count_stddev: float = 0.0
  example_clip_norm: float | None = None
  example_noise_multiplier: float = 0.0
  local_epochs: int = 1
  # Distributed noise: the public minimum number of participants (1 else).
  min_participants: int = 1
  secagg: SecAggSetup | None = None
  # Correlated noise: the strategy the round carries (DP-FTRL's tree,
  # BandMF, BLT; None for independent noise).
  strategy: Any = None

  # --- Host side: relation, events, ledger. ---------------------------------

  @property
  def relation(self) -> clipping.NeighbouringRelation:
    """The ledger's relation: local for local noise, zero-out
    (REPLACE_SPECIAL) for distributed noise (the server sees who takes
    part), else the sampler's."""
    if self.placement is Placement.LOCAL:
      return clipping.NeighbouringRelation.LOCAL
    if self.placement is Placement.DISTRIBUTED:
      return clipping.NeighbouringRelation.REPLACE_SPECIAL
    return self.sampler.relation

  @property
  def denominator(self) -> float:
    """The public constant the noisy sum is divided by: the sampler's
    expected cohort size (never the realised count, which is private)."""
    return self.sampler.expected_cohort_size

  @property
  def restart_every(self) -> int | None:
    """DP-FTRL: rounds per tree (None for other mechanisms)."""
    if isinstance(self.strategy, tree_aggregation.TreeNoise):
      return self.strategy.restart_every
    return None

  @property
  def schema(self) -> bool:
    """Whether the sampler is a participation schema's (cyclic or banded
    Poisson): rounds then differ in what they record."""
    return isinstance(self.sampler, (sampling.CyclicSampler,
                                     sampling.BandedPoissonSampler))

  @property
  def amplified(self) -> bool:
    """Amplified BandMF: banded Poisson sampling with at most b bands
    (plain Gaussian noise has one): one sampled event per cycle of b rounds
    (sampling.BandedPoissonSampler)."""
    if not isinstance(self.sampler, sampling.BandedPoissonSampler):
      return False
    return self.strategy is None or (
        isinstance(self.strategy, correlated_noise.BandedToeplitz) and
        self.strategy.bands <= self.sampler.min_separation)

  def schema_sensitivity_squared(self) -> float:
    """s: the squared L2 sensitivity, in units of C^2, of everything the run
    releases under the sampler's (k, b) schema (one client in at most k
    rounds, any two at least b apart): the tree's exact count, the matrix
    factorization's `minsep_sensitivity_squared`, or k for independent
    Gaussian noise."""
    k, b = self.sampler.max_participations, self.sampler.min_separation
    if isinstance(self.strategy, tree_aggregation.TreeNoise):
      return tree_aggregation.max_sensitivity_squared(self.num_rounds, k, b)
    if self.strategy is None:
      return float(k)
    return correlated_noise.sensitivity_squared(self.strategy,
                                                self.num_rounds, k, b)

  def _round_class(self, round_index: int) -> int:
    """Rounds that record the same event share a class (the cache's key)."""
    if self.amplified:
      return int(round_index % self.sampler.min_separation != 0)
    if self.schema:
      return int(round_index != 0)
    if self.noise is Noise.TREE:
      return int(round_index)
    return 0

  def event(self, round_index: int = 0,
            noise_multiplier: float | None = None) -> dp_accounting.DpEvent:
    """Round `round_index`'s DP event (default: this plan's own z), under
    `relation` (see the module docstring for each mechanism's).

    Cached: the loop asks for every round's event, and only DP-FTRL's and
    the participation schemas' rounds differ (building a
    secure-aggregation event walks every possible number of participants).
    """
    return _cached_event(self, self._round_class(int(round_index)),
                         noise_multiplier)

  def _event(self, round_index: int,
             noise_multiplier: float | None) -> dp_accounting.DpEvent:
    z = self.noise_multiplier if noise_multiplier is None else float(
        noise_multiplier)
    unit = clipping.sensitivity(1.0, self.relation)
    if self.placement is Placement.LOCAL:
      if self.noise is Noise.LAPLACE:
        return events.laplace(z, unit)
      return events.gaussian(z, unit)
    if self.placement is Placement.DISTRIBUTED:
      if self.secagg is None:
        return events.gaussian(z, unit)
      if events.check_noise_multiplier(z) == 0:
        return dp_accounting.NonPrivateDpEvent()
      s = self.secagg
      return secure_aggregation.dp_event(
          clip_norm=self.clip_norm, scale=s.scale, share_stddev_=s.share_stddev,
          min_shares=s.min_shares, max_shares=s.max_shares, dim=s.dim)
    if self.schema:
      return self._schema_event(round_index, z)
    if self.noise is Noise.TREE:
      if events.check_noise_multiplier(z) == 0:
        return dp_accounting.NonPrivateDpEvent()
      return tree_aggregation.round_event(
          round_index, z, self.num_rounds, self.sampler.restart_every,
          self.sampler.participation)
    if self.noise is Noise.LAPLACE:
      if isinstance(self.sampler, sampling.PoissonSampler) and \
          not self.sampler.truncates:
        return self.sampler.sampled(events.laplace(z))
      # No event for Laplace under fixed-size or truncated sampling: both
      # couple neighbouring cohorts within an L1 distance of 2C, so the round
      # is at least as private as the unsampled Laplace of sensitivity 2C.
      return events.laplace(z, clipping.sensitivity(
          1.0, clipping.NeighbouringRelation.REPLACE_ONE))
    if self.adaptive_clip:
      return self._adaptive_event(z)
    return self.sampler.dp_event(z)

  def _schema_event(self, round_class: int,
                    z: float) -> dp_accounting.DpEvent:
    """Under a participation schema. Amplified: the sampled Gaussian of
    multiplier z / (largest column norm) in the first round of each cycle
    of b rounds, nothing in the others. Otherwise the whole run is one
    Gaussian mechanism of L2 sensitivity sqrt(s) C, recorded in round 0
    (before anything is released; a run stopped early has accounted for at
    least what it released, as a shorter run's s is never larger)."""
    if round_class != 0:
      return dp_accounting.NoOpDpEvent()
    if events.check_noise_multiplier(z) == 0:
      return dp_accounting.NonPrivateDpEvent()
    if self.amplified:
      column_norm = 1.0 if self.strategy is None else math.sqrt(
          float(np.sum(self.strategy.strategy_coefs(self.num_rounds) ** 2)))
      return self.sampler.dp_event(z / column_norm)
    return dp_accounting.GaussianDpEvent(
        z / math.sqrt(self.schema_sensitivity_squared()))

  def _adaptive_event(self, z: float) -> dp_accounting.DpEvent:
    z_update = adaptive_clipping.update_noise_multiplier(z, self.count_stddev)
    if z_update == 0:
      return self.sampler.dp_event(0.0)
    if self.sampler.truncates:
      # dp_accounting has no truncated event with a composition inside: the
      # single equivalent Gaussian (exactly z) in the truncated event.
      return self.sampler.dp_event(accounting.effective_noise_multiplier(
          z_update, 2.0 * self.count_stddev))
    return self.sampler.sampled(events.adaptive_clipping_parts(
        z_update, self.count_stddev,
        clipping.sensitivity(1.0, self.sampler.relation)))

  def schedule(self,
               noise_multiplier: float | None = None
               ) -> list[tuple[dp_accounting.DpEvent, int]]:
    """The planned rounds' events as (event, number of rounds) pairs: one
    pair when every round is alike, so accounting the plan costs the same
    for any number of rounds (DP-FTRL: one pair per tree, and one for the
    no-op rounds inside trees). Composition does not depend on order."""
    rounds = self.num_rounds
    if self.schema:
      recording = (self.sampler.max_participations if self.amplified
                   else 1)
      runs = [(self.event(0, noise_multiplier), recording),
              (dp_accounting.NoOpDpEvent(), rounds - recording)]
      return [(e, n) for e, n in runs if n > 0]
    if self.noise is not Noise.TREE:
      return [(self.event(0, noise_multiplier), rounds)]
    runs = []
    for r in range(0, rounds, self.sampler.restart_every):
      event = self.event(r, noise_multiplier)
      if runs and runs[-1][0] == event:
        runs[-1] = (event, runs[-1][1] + 1)
      else:
        runs.append((event, 1))
    recorded = sum(count for _, count in runs)
    if recorded < rounds:
      runs.append((self.event(1, noise_multiplier), rounds - recorded))
    return runs

  def new_ledger(self) -> accounting.PrivacyLedger:
    return accounting.PrivacyLedger(self.relation, self.delta,
                                    self.accountant)

  def planned_epsilon(self) -> float:
    """Epsilon after every planned round."""
    return accounting.epsilon_of_counts(
        self.schedule(), self.delta, accountant=self.accountant,
        relation=self.relation)

  def example_event(self) -> dp_accounting.DpEvent | None:
    """One round's example-level event for one client (record-level DP),
    or None without it."""
    if self.example_clip_norm is None:
      return None
    return events.example_level(self.example_noise_multiplier,
                                self.local_epochs)

  def example_epsilon(self, num_rounds: int) -> float | None:
    """Record-level DP: one client's example-level epsilon after
    `num_rounds` rounds (every round counted, as if the client took part in
    all of them: no amplification by sampling is credited), or None without
    it. Zero-out neighbours within one client, accounted like add/remove."""
    event = self.example_event()
    if event is None:
      return None
    if num_rounds == 0:
      return 0.0
    return accounting.epsilon_of_counts(
        [(event, num_rounds)], self.delta, accountant=self.accountant,
        relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE)

  # --- Round arguments and carried state. -----------------------------------

  def update_noise_multiplier(self, noise_multiplier: float) -> float:
    """The multiplier of the update's noise: z, or with adaptive clipping
    its share z_delta (the count's noise takes the rest of z)."""
    if self.adaptive_clip:
      return adaptive_clipping.update_noise_multiplier(noise_multiplier,
                                                       self.count_stddev)
    return float(noise_multiplier)

  def adaptive_hparams(self) -> adaptive_clipping.AdaptiveClipHparams | None:
    """Adaptive clipping's round arguments, or None with a fixed clip."""
    if not self.adaptive_clip:
      return None
    return adaptive_clipping.AdaptiveClipHparams.create(
        expected_cohort_size=self.sampler.expected_cohort_size,
        target_quantile=self.target_unclipped_quantile,
        learning_rate=self.clip_learning_rate,
        count_stddev=self.count_stddev)

  def secagg_params(self) -> secure_aggregation.SecAggParams | None:
    return None if self.secagg is None else self.secagg.params()

  def initial_state(self, noise_root: types.PRNGKey,
                    params: types.PyTree = None) -> "PrivacyState | None":
    """What the mechanism carries into round 0 (`PrivacyState`), or None
    where it carries nothing. `noise_root` is the run's noise stream
    (correlated noise draws from a key folded from it); `params` gives the
    shapes of matrix-factorization noise's buffers.

    Raises:
      ValueError: matrix-factorization noise without `params`.
    """
    adaptive, strategy = self.adaptive_clip, self.strategy
    if not (adaptive or strategy is not None):
      return None
    if strategy is not None and params is None and not isinstance(
        strategy, tree_aggregation.TreeNoise):
      raise ValueError("matrix-factorization noise needs the model's "
                       "parameters for its buffers: initial_state(noise_root, "
                       "params)")
    return PrivacyState(
        clip_norm=jnp.float32(self.clip_norm) if adaptive else None,
        correlated=None if strategy is None else strategy.init(
            jax.random.fold_in(noise_root, streams.CORRELATED), params))

  @property
  def privatizer(self) -> "Privatizer":
    """The compiled round's privacy steps for this plan."""
    return Privatizer(
        noise=self.noise, placement=self.placement,
        per_layer_clipping=self.per_layer_clipping,
        secure_aggregation=self.secagg is not None,
        correlated=self.strategy,
        example_dp=self.example_clip_norm is not None,
        adaptive_clip=self.adaptive_clip)


class PrivacyState(NamedTuple):
  """What a mechanism carries from one round to the next, inside the server
  state (`ServerState.privacy`), and so in every checkpoint.

  Fields are None where the mechanism has no such state.
  """

  # Adaptive clipping: the clip norm this round's updates are clipped to
  # (moved by the round's noisy count of unclipped clients).
  clip_norm: jax.Array | None = None
  # Correlated noise: the strategy's state (DP-FTRL's tree: its key, step
  # and index; matrix factorizations: key, step and buffers).
  correlated: Any = None


@dataclasses.dataclass(frozen=True)
class Privatizer:
  """The privacy steps of the compiled round: clip each update, form each
  client's message under client-side noise, release the noisy sum.

  Static (hashable) settings only; the clip norm, noise multiplier and
  minimum number of participants arrive as the round's array
  hyperparameters, so one compilation serves every value. A run gets its
  privatizer from its plan (`PrivacyPlan.privatizer`); `create` builds one
  from the config's names for a round used on its own.
  """

  noise: Noise = Noise.GAUSSIAN
  placement: Placement = Placement.CENTRAL
  per_layer_clipping: str | None = None
  # Distributed noise only: simulate secure aggregation's fixed-point
  # encoding and modular sum with discrete Gaussian shares.
  secure_aggregation: bool = False
  # Correlated noise: the strategy (tree_aggregation.TreeNoise,
  # correlated_noise.BandedToeplitz or BufferedInverse), or None.
  correlated: Any = None
  # Record-level DP-SGD inside each client (noisy_batch_gradient).
  example_dp: bool = False
  # Adaptive clipping: the clip norm is carried in the state and moved
  # every round (Andrew et al. 2021).
  adaptive_clip: bool = False

  @classmethod
  def create(cls, *, mechanism: str = "gaussian",
             noise_placement: str = "central",
             per_layer_clipping: str | None = None,
             secure_aggregation_encoding: bool = False,
             tree_restart_every: int | None = None,
             example_dp: bool = False,
             adaptive_clipping: bool = False) -> "Privatizer":
    """A privatizer from the config's names (`mechanism`,
    `noise_placement`, ...).

    Raises:
      ValueError: an unknown name or a combination no round runs.
    """
    names = [p.value for p in Placement]
    if noise_placement not in names:
      raise ValueError(f"noise_placement must be one of {names}, got "
                       f"{noise_placement!r}")
    noise_kind, where = Noise(mechanism), Placement(noise_placement)
    if secure_aggregation_encoding and where is not Placement.DISTRIBUTED:
      raise ValueError("secure_aggregation_encoding needs distributed noise")
    if noise_kind is Noise.TREE and (where is not Placement.CENTRAL
                                     or not tree_restart_every):
      raise ValueError("the tree mechanism adds central noise and needs "
                       "tree_restart_every >= 1")
    if adaptive_clipping and (noise_kind is not Noise.GAUSSIAN
                              or where is not Placement.CENTRAL):
      raise ValueError("adaptive clipping needs central Gaussian noise")
    if noise_kind in (Noise.BAND_MF, Noise.BLT):
      raise ValueError(f"mechanism {mechanism!r} needs a strategy optimised "
                       "for its run: take the privatizer from the plan "
                       "(plan.build(...).privatizer)")
    return cls(noise_kind, where, per_layer_clipping,
               bool(secure_aggregation_encoding),
               tree_aggregation.TreeNoise(tree_restart_every)
               if noise_kind is Noise.TREE else None,
               bool(example_dp), bool(adaptive_clipping))

  def __post_init__(self):
    if self.noise in CORRELATED and self.correlated is None:
      raise ValueError(f"mechanism {self.noise.value!r} needs its strategy "
                       "(Privatizer.correlated)")

  @property
  def carries_state(self) -> bool:
    """Whether the round needs the server state's `PrivacyState`."""
    return self.adaptive_clip or self.correlated is not None

  def round_clip_norm(self, state: "PrivacyState | None",
                      clip_norm: jax.Array) -> jax.Array:
    """The clip norm of this round: the carried one under adaptive
    clipping, else the hyperparameter `clip_norm`.

    Raises:
      ValueError: at trace time, for a mechanism that carries state given
        none (the server state was not built with the plan's
        `initial_state`).
    """
    if self.carries_state and state is None:
      raise ValueError(
          "this mechanism carries state from round to round: build the "
          "server state with server.init(params, optimizer, "
          "plan.initial_state(noise_root, params))")
    return state.clip_norm if self.adaptive_clip else clip_norm

  @property
  def sends_messages(self) -> bool:
    """Whether clients noise their own updates (local or distributed)."""
    return self.placement is not Placement.CENTRAL

  @property
  def message_dtype(self):
    """Secure aggregation's messages are integers mod 2^32."""
    return jnp.uint32 if self.secure_aggregation else jnp.float32

  def clip(self, delta: types.PyTree, clip_norm: jax.Array
           ) -> clipping.ClipResult:
    """One client's clipped update: L1 for Laplace, per group with
    per-layer clipping (whole-update L2 norm still <= C), else L2."""
    if self.noise is Noise.LAPLACE:
      return clipping.clip_by_l1_norm(delta, clip_norm)
    if self.per_layer_clipping is None:
      return clipping.clip_by_global_norm(delta, clip_norm)
    groups = per_layer.clip_per_group(
        delta, {g: w * clip_norm
                for g, w in self._layer_weights(delta).items()})
    return clipping.ClipResult(
        groups.clipped, tree_util.global_l2_norm(delta),
        jnp.any(jnp.stack(list(groups.was_clipped.values()))))

  def _layer_weights(self, tree) -> dict[str, float]:
    # Static per-group fractions of C (from shapes only, at trace time).
    if self.per_layer_clipping == "uniform":
      return per_layer.uniform_clip_norms(1.0, per_layer.group_names(tree))
    if self.per_layer_clipping == "size_proportional":
      return per_layer.size_proportional_clip_norms(1.0, tree)
    raise ValueError(
        "per_layer_clipping must be None, 'uniform' or 'size_proportional', "
        f"got {self.per_layer_clipping!r}")

  def message(self, clipped: types.PyTree, participates: jax.Array,
              finite: jax.Array, key: types.PRNGKey, noise_multiplier,
              clip_norm, min_participants, secagg
              ) -> tuple[types.PyTree, jax.Array]:
    """What one slot sends under client-side noise, and its sampler
    failures (secure aggregation's discrete Gaussian).

    A participant's message carries its noise whatever its data (a
    non-finite update is replaced by zero first); a slot that takes no part
    sends exactly zero. `key` is the slot's own key.
    """
    no_failures = jnp.zeros((), jnp.int32)
    if self.placement is Placement.LOCAL:
      scale = noise.noise_stddev(noise_multiplier, clip_norm)
      if self.noise is Noise.LAPLACE:
        add = lambda u: laplace.add_laplace_noise(u, scale, key)
      else:
        add = lambda u: noise.add_gaussian_noise(u, scale, key)
      return placement.message(clipped, participates, finite,
                               add), no_failures
    if self.secure_aggregation:
      return secure_aggregation.encode(clipped, participates, finite, secagg,
                                       key)
    stddev = placement.share_stddev(noise_multiplier, clip_norm,
                                    min_participants)
    return placement.with_gaussian_share(clipped, participates, finite,
                                         stddev, key), no_failures

  def noise_stddev_of_sum(self, noise_multiplier, clip_norm, min_participants,
                          num_participants: jax.Array) -> jax.Array:
    """Std of the noise in one coordinate of the released sum."""
    per_message = noise.noise_stddev(noise_multiplier, clip_norm)
    if self.noise is Noise.LAPLACE:
      per_message = jnp.sqrt(2.0) * per_message  # Laplace(b): std sqrt(2) b
    participants = num_participants.astype(jnp.float32)
    if self.placement is Placement.LOCAL:
      return per_message * jnp.sqrt(participants)
    if self.placement is Placement.DISTRIBUTED:
      return per_message * jnp.sqrt(participants / min_participants)
    return per_message

  def release(self, clipped_sum: types.PyTree, message_sum: types.PyTree,
              failures: jax.Array, stddev: jax.Array, noise_multiplier,
              clip_norm, noise_key: types.PRNGKey,
              state: "PrivacyState | None", secagg
              ) -> tuple[types.PyTree, "PrivacyState | None", dict]:
    """The released (noisy) sum of the round, the mechanism's state after
    it (DP-FTRL's tree moves one step) and the release's metrics.

    Central placement adds the noise once to the sum of clipped updates
    (Gaussian of std `stddev`, Laplace of scale z C, or the tree's noise
    increment); client-side placements release the sum of the messages
    (decoded from secure aggregation's modular sum).
    """
    if self.placement is Placement.LOCAL or (
        self.placement is Placement.DISTRIBUTED and
        not self.secure_aggregation):
      return message_sum, state, {}
    if self.secure_aggregation:
      decoded = secure_aggregation.decode(message_sum, secagg)
      return decoded.sum, state, {
          "secagg_near_overflow": decoded.num_near_overflow,
          "secagg_wrapped": decoded.num_wrapped,
          "secagg_sampler_failures": failures}
    key = jax.random.fold_in(noise_key, streams.CENTRAL_NOISE)
    if self.noise is Noise.LAPLACE:
      scale = laplace.noise_scale(noise_multiplier, clip_norm)
      return laplace.add_laplace_noise(clipped_sum, scale, key), state, {}
    if self.correlated is not None:
      increment, moved = self.correlated.noise(state.correlated, clipped_sum,
                                               stddev)
      noisy = jax.tree_util.tree_map(
          lambda x, n: (x.astype(jnp.float32) + n).astype(x.dtype),
          clipped_sum, increment)
      metrics = (self.correlated.metrics(moved) if isinstance(
          self.correlated, tree_aggregation.TreeNoise) else {})
      return noisy, state._replace(correlated=moved), metrics
    return noise.add_gaussian_noise(clipped_sum, stddev, key), state, {}

  def move_clip(self, state: "PrivacyState | None", was_clipped: jax.Array,
                valid: jax.Array,
                adaptive: adaptive_clipping.AdaptiveClipHparams | None,
                noise_key: types.PRNGKey
                ) -> tuple["PrivacyState | None", dict]:
    """Adaptive clipping (Andrew et al. 2021): releases the noisy count of
    unclipped clients among `valid` and moves the carried clip norm for the
    next round; other mechanisms return `state` as it is.

    Privacy: the count has add/remove sensitivity 1/2 and noise of std
    `adaptive.count_stddev`; the plan's event accounts it with the update's
    noise (together exactly a Gaussian of multiplier z).
    """
    if not self.adaptive_clip:
      return state, {}
    if adaptive is None:
      raise ValueError("adaptive clipping needs its round arguments "
                       "(plan.adaptive_hparams())")
    moved, out = adaptive_clipping.update(
        adaptive_clipping.AdaptiveClipState(
            state.clip_norm,
            jax.random.fold_in(noise_key, streams.COUNT_NOISE)),
        ~was_clipped, valid, adaptive)
    return state._replace(clip_norm=moved.clip_norm), {
        "unclipped_fraction_noisy": out.unclipped_fraction,
        "clip_norm": out.clip_norm}

  def aborted(self, num_participants: jax.Array,
              min_participants: jax.Array) -> jax.Array | None:
    """Distributed noise: whether the round aborts (fewer participants than
    the public minimum its shares are sized for; nothing is released). It
    depends on the number of participants only, which the server knows
    anyway. None for the other placements."""
    if self.placement is not Placement.DISTRIBUTED:
      return None
    return num_participants.astype(jnp.float32) < min_participants


@functools.lru_cache(maxsize=4096)
def _cached_event(plan: PrivacyPlan, round_index: int,
                  noise_multiplier: float | None) -> dp_accounting.DpEvent:
  return plan._event(round_index, noise_multiplier)  # pylint: disable=protected-access


def calibrate_noise_multiplier(plan: PrivacyPlan, target_epsilon: float
                               ) -> float:
  """The smallest noise multiplier whose planned rounds reach
  `target_epsilon` at the plan's delta (the same events the ledger will
  record)."""
  if plan.noise is Noise.TREE or plan.schema:
    # Rounds differ (a tree's event is recorded when it starts, a schema's
    # once per run or cycle): calibrate on the whole run as one event.
    make_event, rounds = (lambda z: dp_accounting.ComposedDpEvent(tuple(
        dp_accounting.SelfComposedDpEvent(event, count)
        for event, count in plan.schedule(z)))), 1
  elif plan.adaptive_clip:
    # Adaptive clipping's two Gaussians together are exactly one Gaussian of
    # multiplier z (privacy/adaptive_clipping.py): calibrate on that one.
    make_event, rounds = plan.sampler.dp_event, plan.num_rounds
  else:
    make_event, rounds = (lambda z: plan.event(0, z)), plan.num_rounds
  return accounting.calibrate_noise_multiplier(
      make_event, target_epsilon=target_epsilon, delta=plan.delta,
      rounds=rounds, accountant=plan.accountant, relation=plan.relation)


class SchemaSchedule(NamedTuple):
  """A correlated-noise mechanism over a whole run under a participation
  schema, accounted as one Gaussian mechanism."""

  event: dp_accounting.DpEvent
  relation: clipping.NeighbouringRelation
  sensitivity_squared: float  # in units of C^2
  zcdp_rho: float


def schema_schedule(mechanism: str, noise_multiplier: float, num_rounds: int,
                    max_participations: int, min_separation: int, *,
                    bands: int | None = None,
                    buffers: int = 3) -> SchemaSchedule | None:
  """For the correlated mechanisms ("tree": one tree without restarts;
  "band_mf" of `bands` bands, default b; "blt" of `buffers` buffers) over
  `num_rounds` rounds, each client in at most `max_participations` rounds
  at least `min_separation` apart (Gboard's schema), accounted exactly as a
  Gaussian mechanism of L2 sensitivity sqrt(s) C; None for "gaussian",
  whose event comes from its sampler.

  Privacy: under REPLACE_SPECIAL (one client's data replaced by the empty
  record), no amplification credited.
  """
  kind = Noise(mechanism)
  k, b, t = int(max_participations), int(min_separation), int(num_rounds)
  if kind is Noise.TREE:
    s = tree_aggregation.max_sensitivity_squared(t, k, b)
  elif kind is Noise.BAND_MF:
    s = correlated_noise.sensitivity_squared(
        correlated_noise.band_mf(t, int(bands or b)), t, k, b)
  elif kind is Noise.BLT:
    s = correlated_noise.sensitivity_squared(
        correlated_noise.blt(t, k, b, int(buffers)), t, k, b)
  else:
    return None
  z = events.check_noise_multiplier(float(noise_multiplier))
  event = (dp_accounting.GaussianDpEvent(z / math.sqrt(s)) if z > 0
           else dp_accounting.NonPrivateDpEvent())
  return SchemaSchedule(event, clipping.NeighbouringRelation.REPLACE_SPECIAL,
                        s, s / (2 * z * z) if z > 0 else float("inf"))


def noise_depends_on_rounds(config) -> bool:
  """Whether the run's noise in round r depends on the number of rounds:
  BandMF's and BLT's strategies are optimised for it (the tree's nodes and
  independent noise are not)."""
  return Noise(config.mechanism) in (Noise.BAND_MF, Noise.BLT)


def build_strategy(config, sampler: sampling.Sampler):
  """The correlated-noise strategy of `config`'s mechanism, or None.

  DP-FTRL's tree restarts with its disjoint sampler's trees, or is one tree
  under a participation schema. BandMF has `mf_bands` bands (default b, the
  most that amplified accounting takes); BLT has `blt_buffers` buffers,
  optimised for the sampler's (k, b) schema. Both are optimised for T =
  `rounds` on the host (a few seconds; once per setting in a process).
  """
  kind = Noise(config.mechanism)
  if kind is Noise.TREE:
    return tree_aggregation.TreeNoise(
        sampler.restart_every
        if isinstance(sampler, sampling.DisjointSampler) else config.rounds)
  if kind is Noise.BAND_MF:
    return correlated_noise.band_mf(
        int(config.rounds), int(config.mf_bands or sampler.min_separation))
  if kind is Noise.BLT:
    return correlated_noise.blt(
        int(config.rounds), sampler.max_participations,
        sampler.min_separation, int(config.blt_buffers))
  return None


def build(config, population_size: int,
          model_size: Callable[[], int]) -> PrivacyPlan:
  """The privacy plan of a run of `config` over `population_size` clients
  (audit canaries included).

  `config` is the run's `fedjax_dp.config.Config` (any object with its
  fields). The noise multiplier is the config's, or calibrated to its
  `target_epsilon`. `model_size()` gives the model's number of parameters;
  it is called only for secure aggregation, after the sampler's settings
  were checked.

  Raises:
    ValueError: naming the config field, for settings the plan cannot
      build (a cohort larger than the population, a minimum number of
      participants above the block, secure-aggregation bits too small).
  """
  check_combination(config)
  sampler = build_sampler(config, population_size)
  count_stddev = 0.0
  if config.adaptive_clipping:
    count_stddev = (float(config.clip_count_stddev)
                    if config.clip_count_stddev is not None else
                    adaptive_clipping.default_count_stddev(
                        sampler.expected_cohort_size))
  where = Placement(config.noise_placement)
  min_participants = 1
  if where is Placement.DISTRIBUTED:
    min_participants = resolve_min_participants(config, sampler)
  plan = PrivacyPlan(
      noise=Noise(config.mechanism), placement=where, sampler=sampler,
      noise_multiplier=(0.0 if config.noise_multiplier is None
                        else float(config.noise_multiplier)),
      clip_norm=float(config.clip_norm), delta=float(config.delta),
      accountant=config.accountant, num_rounds=int(config.rounds),
      per_layer_clipping=config.per_layer_clipping,
      adaptive_clip=bool(config.adaptive_clipping),
      target_unclipped_quantile=float(config.target_unclipped_quantile),
      clip_learning_rate=float(config.clip_learning_rate),
      count_stddev=count_stddev,
      example_clip_norm=(None if config.example_clip_norm is None
                         else float(config.example_clip_norm)),
      example_noise_multiplier=float(config.example_noise_multiplier),
      local_epochs=int(config.local_epochs),
      min_participants=min_participants,
      strategy=build_strategy(config, sampler))
  if config.noise_multiplier is None:
    plan = dataclasses.replace(plan, noise_multiplier=(
        calibrate_noise_multiplier(plan, config.target_epsilon)))
  if config.secagg_bits is not None:
    plan = dataclasses.replace(plan, secagg=secagg_setup(
        plan.clip_norm, config.secagg_bits, config.secagg_scale,
        plan.noise_multiplier, min_participants, sampler.capacity,
        model_size()))
  return plan


# ---------------------------------------------------------------------------
# Record-level DP-SGD inside each client.


class NoisyGradient(NamedTuple):
  # (sum of clipped real-example gradients + noise) / batch_size.
  gradient: types.PyTree
  # float32 [batch] pre-clip L2 norm per example; 0 for padding slots.
  norms: jax.Array
  # bool [batch] True where a real example was scaled down; False for padding.
  was_clipped: jax.Array


def noisy_batch_gradient(
    per_example_grads: types.PyTree,
    example_mask: jax.Array,
    clip_norm: jax.Array,
    noise_multiplier: jax.Array,
    batch_size: int,
    key: types.PRNGKey,
) -> NoisyGradient:
  """One DP-SGD step's gradient: clip per example, sum, add noise, divide.

  Args:
    per_example_grads: gradients with a leading batch axis on every leaf.
    example_mask: bool [batch]; False for padding slots, whose gradients are
      ignored (selected away, so even NaN contributes exactly 0).
    clip_norm: per-example L2 bound C > 0 (traced or float; +inf disables
      clipping exactly).
    noise_multiplier: z >= 0; the noise stddev is z * C (0 when z = 0).
    batch_size: the public divisor, the static batch size B; never the count
      of real examples.
    key: the key of this step's noise.

  Returns:
    NoisyGradient; with C = inf and z = 0 the gradient is exactly the masked
    sum of `per_example_grads` divided by `batch_size`.

  Privacy (record-level, for the examples of one client):
    * Neighbouring relation, "zero-out": one example of one client is
      replaced by a padding slot; every other example keeps its place in the
      block's layout into steps and batches (the layout is drawn from the
      host rng and the client sizes, which do not change). Under it one
      noisy step's clipped sum moves by at most C in L2, so each step holding
      the example is a Gaussian mechanism of noise multiplier z, and a step
      not holding it has the same distribution on both sides. A Gaussian
      shift of at most C is accounted exactly like dp_accounting's
      `GaussianDpEvent(z)` under ADD_OR_REMOVE_ONE (whose worst case is a
      shift of one sensitivity), so an example ledger uses that accountant
      relation. (Zero-out is Kairouz et al. 2021's replacement by the special
      empty record; dp_accounting's REPLACE_SPECIAL gives the same epsilon
      for these events, while its PLD under REPLACE_ONE would assume a shift
      of 2C: not this claim.) This holds for every input: an example whose
      gradient is not finite contributes 0 (norm <= C), and no example's
      value can change another's contribution. The division by the public B
      is post-processing.
    * Steps per example: `fedjax_dp.data.blocks.make_block` writes a
      client's used examples (all of them, or a fresh subset of
      `max_examples_per_client` of them) once per epoch, each epoch into its
      own run of steps, so an example appears in at most `local_epochs`
      steps of a round. One round is therefore `SelfComposedDpEvent(
      GaussianDpEvent(z), local_epochs)` for the example
      (`events.example_level`), by adaptive composition; the round's model
      delta, the cohort aggregate and the server's noise are post-processing
      of the noisy steps.
    * Every step runs and is noised, including steps that are all padding:
      the number of noisy steps (the block's `num_steps`, from public
      settings) must not depend on a client's data. Under zero-out, a step
      whose only real example is the changed one is all padding on one side;
      skipping it there would release the parameters unmoved (a point mass)
      against a noisy move on the other side, which no finite epsilon
      covers. The non-private client update skips such steps; this one must
      not.
    * No amplification is credited: not from client sampling (a client may
      take part in every round), nor from batching (batches come from
      shuffling, not Poisson sampling of examples).
    * Not covered: the client's training loss, its example count and the
      per-example norms and clip flags are computed from the raw data; they
      are simulation diagnostics and must not be released as private
      outputs.
  """
  clipped = jax.vmap(clipping.clip_by_global_norm, in_axes=(0, None))(
      per_example_grads, clip_norm)
  # An example whose gradient norm is NaN or Inf (NaN features, or finite
  # ones large enough to overflow) contributes exactly zero -- a value that
  # does not depend on its data -- instead of making the step's sum NaN and
  # with it the whole client non-finite. Selected, never multiplied.
  counted = example_mask & jnp.isfinite(clipped.norm)
  summed = tree_util.masked_sum(clipped.clipped, counted)
  stddev = noise.noise_stddev(noise_multiplier, clip_norm)
  noisy = noise.add_gaussian_noise(summed, stddev, key)
  gradient = jax.tree_util.tree_map(
      lambda x: x / jnp.asarray(batch_size, x.dtype), noisy)
  norms = jnp.where(example_mask, clipped.norm, 0.0)
  was_clipped = jnp.logical_and(example_mask, clipped.was_clipped)
  return NoisyGradient(gradient, norms, was_clipped)

