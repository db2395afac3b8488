"""Client samplers and the DP events that describe their sampling.

Each sampler both draws the cohort (`sample`) and builds the dp_accounting
event of a Gaussian round that uses it (`dp_event`), or wraps another
mechanism's event in its sampling (`sampled`). Keeping the two in one class,
and building every round's event in the privacy plan from the sampler the
simulation uses (privacy/plan.py), is what makes it impossible for the
simulation and the ledger to disagree about how clients were chosen.

Privacy:
  * `PoissonSampler`: each client is included independently with
    probability q; the guarantee is for add/remove-one-client neighbours. The
    cohort lives in a block of fixed `capacity`. If more than `capacity`
    clients are drawn, a uniformly random subset of `capacity` of them is kept
    (truncated Poisson sampling). With `capacity >= population_size` nothing is
    ever truncated and the event is `PoissonSampledDpEvent(q, Gaussian(z))`.
    Otherwise the event is dp_accounting's `TruncatedSubsampledGaussianDpEvent`
    for a dataset of `population_size + 1` clients (the larger of the two
    neighbours, which is the worse case); `accounting.py` says how it is
    accounted.
  * `FixedSizeSampler`: exactly m of n clients uniformly without replacement;
    the guarantee is for replace-one-client neighbours (n is public). Replacing
    one client moves the clipped sum by up to 2C, so the event's noise
    multiplier is sigma / (2C) = z / 2 (Wang, Balle, Kasiviswanathan 2019, as
    implemented by dp_accounting's RDP accountant).
  * `DisjointSampler` (DP-FTRL, Kairouz et al. 2021): no sampling is credited;
    each client takes part at most once per tree of tree-aggregation noise
    (or once per run), and the events are tree_aggregation's, under
    replace-special neighbours.
  * `CyclicSampler`: the (k, b) min-separation schema of correlated-noise
    mechanisms (each client in at most k rounds, any two at least b apart);
    no sampling credited, replace-special neighbours.
  * `BandedPoissonSampler`: b-banded Poisson sampling (Poisson within the
    group whose turn it is); add/remove neighbours, amplification credited
    for b-banded strategies.

Every sampler draws round r's cohort with `sample_round(stream_key, r)`.
"""

import dataclasses
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fedjax_dp import types
from fedjax_dp.privacy import clipping

# How often a client may take part under disjoint sampling (DP-FTRL): at most
# once in each tree, or at most once in the whole run (tree_aggregation's
# events take the same names).
PARTICIPATIONS = ("once_per_tree", "once")

# The sampler names (config field `sampling`).
SCHEMES = ("poisson", "fixed", "disjoint", "cyclic", "banded_poisson")

# Default bound on the per-round probability that a Poisson draw overflows
# its block, used to size the block when no capacity is given.
DEFAULT_OVERFLOW_PROBABILITY = 1e-30


def _check_population_size(population_size: int) -> None:
  if not isinstance(population_size, (int, np.integer)) or population_size < 1:
    raise ValueError(
        f"population_size must be an integer >= 1, got {population_size!r}")


def _check_noise_multiplier(noise_multiplier: float) -> None:
  if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
    raise ValueError(
        "noise_multiplier must be a finite number >= 0, got "
        f"{noise_multiplier!r}")


def poisson_capacity(
    population_size: int,
    sampling_probability: float,
    overflow_probability: float = DEFAULT_OVERFLOW_PROBABILITY,
) -> int:
  """Smallest block size c with P[Binomial(n + 1, q) > c] <= overflow_probability.

  Uses n + 1 so that the bound also holds for the larger neighbour. Capped at
  the population size (a block that large never truncates).
  """
  n, q = population_size, sampling_probability
  # Bisection on the monotone tail; scipy's isf is inexact this far out.
  lo, hi = 0, n
  while lo < hi:
    mid = (lo + hi) // 2
    if stats.binom.sf(mid, n + 1, q) <= overflow_probability:
      hi = mid
    else:
      lo = mid + 1
  c = lo
  return max(1, min(c, n))


class _EveryRoundAlike:
  """Samplers whose rounds are all alike: round r folds r into the key."""

  def sample_round(self, stream_key: types.PRNGKey, round_index: jax.Array):
    """Round `round_index`'s cohort: `sample(fold_in(stream_key, r))`."""
    return self.sample(jax.random.fold_in(stream_key, round_index))



@dataclasses.dataclass(frozen=True)
class PoissonSampler(_EveryRoundAlike):
  """Poisson sampling of clients into a block of fixed capacity.

  Attributes:
    population_size: number of clients n.
    sampling_probability: q in (0, 1].
    capacity: block size (client slots per round); None picks
      `poisson_capacity(n, q)`.
  """

  population_size: int
  sampling_probability: float
  capacity: int | None = None
  relation = clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE

  def __post_init__(self):
    _check_population_size(self.population_size)
    q = self.sampling_probability
    if not 0 < q <= 1:
      raise ValueError(f"sampling_probability must be in (0, 1], got {q!r}")
    if self.capacity is None:
      object.__setattr__(
          self, "capacity", poisson_capacity(self.population_size, q))
    elif not 1 <= self.capacity:
      raise ValueError(f"capacity must be >= 1, got {self.capacity!r}")
    object.__setattr__(
        self, "capacity", int(min(self.capacity, self.population_size)))

  @property
  def expected_cohort_size(self) -> float:
    """q * n: the public denominator of the average update."""
    return self.sampling_probability * self.population_size

  @property
  def truncates(self) -> bool:
    """Whether a draw can ever exceed the block (capacity < n)."""
    return self.capacity < self.population_size

  def overflow_probability(self) -> float:
    """P[a round's draw is truncated], for the larger neighbour (n + 1)."""
    if not self.truncates:
      return 0.0
    return float(stats.binom.sf(
        self.capacity, self.population_size + 1, self.sampling_probability))

  def sample(self, key: types.PRNGKey) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws one round's cohort.

    Args:
      key: this round's sampling key.

    Returns:
      (indices int32 [capacity], valid bool [capacity], num_drawn int32):
      client indices (padding slots hold 0 and valid=False) and how many
      clients the Poisson draw chose before truncation.
    """
    n = self.population_size
    k_include, k_order = jax.random.split(key)
    included = jax.random.bernoulli(k_include, self.sampling_probability, (n,))
    # Visit clients in a random order so that truncation, when it happens,
    # keeps a uniformly random subset of the drawn clients.
    order = jax.random.permutation(k_order, n)
    included_in_order = included[order]
    num_drawn = jnp.sum(included, dtype=jnp.int32)
    (positions,) = jnp.nonzero(
        included_in_order, size=self.capacity, fill_value=0)
    valid = jnp.arange(self.capacity) < num_drawn
    indices = jnp.where(valid, order[positions], 0).astype(jnp.int32)
    return indices, valid, num_drawn

  def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The DP event of one round: this sampling, then Gaussian noise z * C.

    Args:
      noise_multiplier: z = sigma / C, with C the clip norm (the add/remove
        sensitivity of the clipped sum).
    """
    _check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
      return dp_accounting.NonPrivateDpEvent()
    if not self.truncates:
      return dp_accounting.PoissonSampledDpEvent(
          self.sampling_probability,
          dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=self.population_size + 1,
        sampling_probability=self.sampling_probability,
        truncated_batch_size=self.capacity,
        noise_multiplier=noise_multiplier)

  def sampled(self, event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """`event` run on this sampler's cohort: PoissonSampledDpEvent(q, event).

    Raises:
      ValueError: the sampler truncates (dp_accounting's only truncated
        event is the Gaussian one, `dp_event`).
    """
    if self.truncates:
      raise ValueError(
          f"dp_accounting has no truncated Poisson event around {event}; "
          "only the Gaussian one (dp_event)")
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
      return event
    return dp_accounting.PoissonSampledDpEvent(self.sampling_probability,
                                               event)


def _check_cohort(sampler) -> None:
  _check_population_size(sampler.population_size)
  if not 1 <= sampler.cohort_size <= sampler.population_size:
    raise ValueError(
        f"cohort_size must be in [1, population_size="
        f"{sampler.population_size}], got {sampler.cohort_size!r}")


class _ExactCohort:
  """Samplers that always fill exactly `cohort_size` slots."""

  truncates = False

  @property
  def capacity(self) -> int:
    return self.cohort_size

  @property
  def expected_cohort_size(self) -> float:
    return float(self.cohort_size)

  def overflow_probability(self) -> float:
    return 0.0


@dataclasses.dataclass(frozen=True)
class FixedSizeSampler(_ExactCohort, _EveryRoundAlike):
  """Uniform sampling of exactly `cohort_size` clients without replacement.

  Attributes:
    population_size: number of clients n (public under replace-one).
    cohort_size: m, 1 <= m <= n.
  """

  population_size: int
  cohort_size: int
  relation = clipping.NeighbouringRelation.REPLACE_ONE

  def __post_init__(self):
    _check_cohort(self)

  @property
  def sampling_probability(self) -> float:
    return self.cohort_size / self.population_size

  def sample(self, key: types.PRNGKey) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws `cohort_size` distinct clients; same return shape as Poisson's."""
    order = jax.random.permutation(key, self.population_size)
    indices = order[:self.cohort_size].astype(jnp.int32)
    valid = jnp.ones((self.cohort_size,), bool)
    return indices, valid, jnp.asarray(self.cohort_size, jnp.int32)

  def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
    """The DP event of one round under replace-one neighbours.

    Args:
      noise_multiplier: z = sigma / C. The event carries
        sigma / sensitivity = z / 2, since replace-one sensitivity is 2C.
    """
    _check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
      # dp_accounting's RDP divides by z here; no noise is not private.
      return dp_accounting.NonPrivateDpEvent()
    sens_in_units_of_c = clipping.sensitivity(1.0, self.relation)
    return self.sampled(dp_accounting.GaussianDpEvent(
        noise_multiplier / sens_in_units_of_c))

  def sampled(self, event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """`event` run on this sampler's cohort (its multiplier already divided
    by the replace-one sensitivity): SampledWithoutReplacementDpEvent."""
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
      return event
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=self.population_size,
        sample_size=self.cohort_size, event=event)


@dataclasses.dataclass(frozen=True)
class DisjointSampler(_ExactCohort):
  """DP-FTRL's cohorts: disjoint within each tree, no sampling credited.

  Round r belongs to tree r // restart_every, as its step
  (r % restart_every) + 1; the tree's cohorts are consecutive blocks of one
  random permutation of the population (`disjoint_cohort`),
  so no client takes part twice in a tree ("once_per_tree"), or, with one
  permutation for the whole run, twice in the run ("once").

  Privacy: replace-special neighbours (one client's data replaced by the
  empty record, whose clipped update is 0; sensitivity C per step it takes
  part in). Which client is in which step is data-independent; the
  guarantee does not rely on it being secret. The privacy plan records a
  whole tree's `SingleEpochTreeAggregationDpEvent` when the tree starts
  (tree_aggregation.round_event); RDP accountant only.
  """

  population_size: int
  cohort_size: int
  num_rounds: int
  restart_every: int
  participation: str = "once_per_tree"
  relation = clipping.NeighbouringRelation.REPLACE_SPECIAL

  def __post_init__(self):
    _check_cohort(self)
    if not 1 <= self.restart_every:
      raise ValueError(
          f"restart_every must be >= 1, got {self.restart_every!r}")
    check_participation(
        self.population_size, self.cohort_size,
        min(self.restart_every, self.num_rounds), self.num_rounds,
        self.participation)

  def tree_position(self, round_index):
    """(tree index, 1-based step in the tree) of round `round_index`."""
    return (round_index // self.restart_every,
            round_index % self.restart_every + 1)

  def sample_round(self, stream_key: types.PRNGKey, round_index: jax.Array):
    """Round r's cohort; same return shape as the other samplers'."""
    tree_index, step = self.tree_position(jnp.asarray(round_index, jnp.int32))
    if self.participation == "once":
      # One permutation for the whole run, cut into consecutive cohorts.
      tree_index, step = jnp.zeros((), jnp.int32), round_index + 1
    indices = disjoint_cohort(
        stream_key, tree_index, step, self.population_size, self.cohort_size)
    return (indices, jnp.ones((self.cohort_size,), bool),
            jnp.asarray(self.cohort_size, jnp.int32))


def disjoint_cohort(key: types.PRNGKey, tree_index: jax.Array,
                    step: jax.Array, population_size: int,
                    cohort_size: int) -> jax.Array:
  """Cohort of step t (1-based) of a tree: disjoint from the tree's others.

  A permutation of the population per tree (key folded with tree_index; pass
  tree_index = 0 always for participation "once"), cut into consecutive
  blocks of `cohort_size`. Needs restart_every * cohort_size <=
  population_size (or num_rounds * cohort_size for "once"; see
  `check_participation`). Data-independent, so it costs no privacy.
  """
  perm = jax.random.permutation(jax.random.fold_in(key, tree_index),
                                population_size)
  start = (jnp.asarray(step, jnp.int32) - 1) * cohort_size
  return jax.lax.dynamic_slice(perm, (start,), (cohort_size,)).astype(
      jnp.int32)


def check_participation(population_size: int, cohort_size: int,
                        restart_every: int, num_rounds: int,
                        participation: str) -> None:
  """Raises ValueError if disjoint cohorts cannot cover the needed steps."""
  if participation not in PARTICIPATIONS:
    raise ValueError(
        f"participation must be one of {PARTICIPATIONS}, got {participation!r}")
  steps = restart_every if participation == "once_per_tree" else num_rounds
  if steps * cohort_size > population_size:
    raise ValueError(
        f"{steps} steps of {cohort_size} distinct clients need "
        f"{steps * cohort_size} clients, population has {population_size}")


# Folded into the sampling stream for a run's fixed group assignment (never
# a round index, which is folded into the same stream).
_GROUPS = 2**31 - 1


def _ceil_div(a: int, b: int) -> int:
  return -(-int(a) // int(b))


@dataclasses.dataclass(frozen=True)
class CyclicSampler(_ExactCohort):
  """A (k, b) min-separation schema (as used for Gboard's DP-FTRL and
  matrix-factorization models): the population is split once into
  b = `min_separation` groups, and round r's cohort is `cohort_size`
  clients of group r mod b, uniformly without replacement.

  A client takes part only in rounds of its group, so any two of its
  rounds are at least b apart, and it takes part in at most
  k = ceil(T / b) rounds (`max_participations`). Groups are a random
  partition of the population into b groups of floor(n / b) clients (the
  n mod b clients left over never take part), fixed for the run.

  Privacy: replace-special neighbours (one client's data replaced by the
  empty record); no sampling is credited, so who takes part when need not
  be secret. The plan's event is the correlated-noise mechanism's under
  the schema (correlated_noise.minsep_sensitivity_squared;
  tree_aggregation.max_sensitivity_squared for the tree).
  """

  population_size: int
  cohort_size: int
  num_rounds: int
  min_separation: int
  relation = clipping.NeighbouringRelation.REPLACE_SPECIAL

  def __post_init__(self):
    _check_cohort(self)
    if not 1 <= self.min_separation <= self.population_size:
      raise ValueError(
          f"min_separation must be in [1, population_size="
          f"{self.population_size}], got {self.min_separation!r}")
    if self.cohort_size > self.group_size:
      raise ValueError(
          f"cohort_size {self.cohort_size} exceeds a group's "
          f"{self.group_size} clients ({self.population_size} clients in "
          f"min_separation={self.min_separation} groups)")

  @property
  def group_size(self) -> int:
    return self.population_size // self.min_separation

  @property
  def max_participations(self) -> int:
    """k: the most rounds one client takes part in."""
    return _ceil_div(self.num_rounds, self.min_separation)

  def sample_round(self, stream_key: types.PRNGKey, round_index: jax.Array):
    """Round r's cohort; same return shape as the other samplers'."""
    b, size = self.min_separation, self.group_size
    order = jax.random.permutation(jax.random.fold_in(stream_key, _GROUPS),
                                   self.population_size)
    group = jnp.asarray(round_index, jnp.int32) % b
    members = order[group + b * jnp.arange(size)]
    pick = jax.random.permutation(jax.random.fold_in(stream_key, round_index),
                                  size)[:self.cohort_size]
    return (members[pick].astype(jnp.int32),
            jnp.ones((self.cohort_size,), bool),
            jnp.asarray(self.cohort_size, jnp.int32))


@dataclasses.dataclass(frozen=True)
class BandedPoissonSampler:
  """b-banded (cyclic) Poisson sampling (Choquette-Choo et al. 2023,
  "(Amplified) Banded Matrix Factorization"): each client is assigned once
  to one of b = `min_separation` groups, independently and uniformly
  (balls in bins), and round r includes each client of group r mod b
  independently with probability q.

  Any two rounds of one client are at least b apart, and it is eligible in
  at most k = ceil(T / b) of them (`max_participations`). The block holds
  the whole population, so no draw is ever truncated (slots without a
  client cost no compute: rounds skip empty chunks).

  Privacy: add/remove-one-client neighbours (group assignments are
  independent per client, so adding or removing one changes no other's).
  A b-banded C (at most b bands; plain Gaussian noise is C = I) under this
  sampling is as private as k Poisson-sampled Gaussian mechanisms
  (PoissonSampledDpEvent(q, Gaussian(z / max column norm)), one in each
  cycle of b rounds; their Theorem 4), `dp_event`. Other strategies are
  accounted without amplification, under the (k, b) schema.
  """

  population_size: int
  sampling_probability: float
  num_rounds: int
  min_separation: int
  relation = clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE
  truncates = False

  def __post_init__(self):
    _check_population_size(self.population_size)
    q = self.sampling_probability
    if not 0 < q <= 1:
      raise ValueError(f"sampling_probability must be in (0, 1], got {q!r}")
    if not 1 <= self.min_separation:
      raise ValueError(
          f"min_separation must be >= 1, got {self.min_separation!r}")

  @property
  def capacity(self) -> int:
    return self.population_size

  @property
  def expected_cohort_size(self) -> float:
    """q n / b: the public denominator of the average update."""
    return (self.sampling_probability * self.population_size
            / self.min_separation)

  @property
  def max_participations(self) -> int:
    """k: the most rounds one client is eligible in."""
    return _ceil_div(self.num_rounds, self.min_separation)

  def overflow_probability(self) -> float:
    return 0.0

  def groups(self, stream_key: types.PRNGKey) -> jax.Array:
    """Each client's group, i.i.d. uniform in [0, b), fixed for the run."""
    root = jax.random.fold_in(stream_key, _GROUPS)
    return jax.vmap(lambda i: jax.random.randint(
        jax.random.fold_in(root, i), (), 0, self.min_separation))(
            jnp.arange(self.population_size))

  def sample_round(self, stream_key: types.PRNGKey, round_index: jax.Array):
    """Round r's cohort; same return shape as the other samplers'."""
    n = self.population_size
    eligible = self.groups(stream_key) == (
        jnp.asarray(round_index, jnp.int32) % self.min_separation)
    included = eligible & jax.random.bernoulli(
        jax.random.fold_in(stream_key, round_index),
        self.sampling_probability, (n,))
    num_drawn = jnp.sum(included, dtype=jnp.int32)
    (indices,) = jnp.nonzero(included, size=n, fill_value=0)
    valid = jnp.arange(n) < num_drawn
    return indices.astype(jnp.int32), valid, num_drawn

  def dp_event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
    """One cycle's event for a b-banded C of column norm 1: the sampled
    Gaussian of multiplier z."""
    _check_noise_multiplier(noise_multiplier)
    if noise_multiplier == 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.PoissonSampledDpEvent(
        self.sampling_probability,
        dp_accounting.GaussianDpEvent(noise_multiplier))


Sampler = (PoissonSampler | FixedSizeSampler | DisjointSampler
           | CyclicSampler | BandedPoissonSampler)


def make_sampler(
    scheme: str,
    population_size: int,
    *,
    cohort_size: int | None = None,
    sampling_probability: float | None = None,
    capacity: int | None = None,
    num_rounds: int | None = None,
    restart_every: int | None = None,
    participation: str = "once_per_tree",
    min_separation: int | None = None,
) -> Sampler:
  """Builds a sampler by name: "poisson" (q, or m / n), "fixed" (m) or
  "disjoint" (m, with the run's rounds and the tree's restart period),
  "cyclic" (m per round from group r mod b, b = `min_separation`) or
  "banded_poisson" (q within group r mod b).

  For "poisson", give `sampling_probability` or `cohort_size` (then
  q = cohort_size / population_size); for "banded_poisson" a
  `cohort_size` is the expected cohort q n / b.
  """
  if scheme == "poisson":
    if sampling_probability is None:
      if cohort_size is None:
        raise ValueError("poisson sampling needs sampling_probability or "
                         "cohort_size")
      if not 1 <= cohort_size <= population_size:
        raise ValueError(
            f"cohort_size must be in [1, population_size={population_size}], "
            f"got {cohort_size!r}")
      sampling_probability = cohort_size / population_size
    return PoissonSampler(population_size, sampling_probability, capacity)
  if scheme == "fixed":
    if cohort_size is None:
      if sampling_probability is None:
        raise ValueError("fixed sampling needs cohort_size")
      cohort_size = max(1, round(sampling_probability * population_size))
    return FixedSizeSampler(population_size, cohort_size)
  if scheme == "disjoint":
    if cohort_size is None or num_rounds is None:
      raise ValueError("disjoint sampling needs cohort_size and num_rounds")
    return DisjointSampler(population_size, cohort_size, num_rounds,
                           restart_every or num_rounds, participation)
  if scheme in ("cyclic", "banded_poisson"):
    if num_rounds is None or min_separation is None:
      raise ValueError(f"{scheme} sampling needs num_rounds and "
                       "min_separation")
    if scheme == "cyclic":
      if cohort_size is None:
        raise ValueError("cyclic sampling needs cohort_size")
      return CyclicSampler(population_size, cohort_size, num_rounds,
                           min_separation)
    if sampling_probability is None:
      if cohort_size is None:
        raise ValueError("banded_poisson sampling needs sampling_probability "
                         "or cohort_size")
      # cohort_size is the expected cohort of a round: q n / b.
      sampling_probability = min(
          1.0, cohort_size * min_separation / population_size)
    return BandedPoissonSampler(population_size, sampling_probability,
                                num_rounds, min_separation)
  raise ValueError(f"sampling must be one of {list(SCHEMES)}, got {scheme!r}")
