"""Everything a run needs, built once from a config, without side effects.

`build(config)` loads the data, builds the model, the sampler (and with it
the round's DP event), resolves the noise multiplier and chooses the round's
execution shape. The runner drives one Simulation; a sweep drives many
configurations of the same shape with one compiled, vmapped round.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import dp_accounting
import jax
import numpy as np
import optax

from fedjax_dp import audit
from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import server as server_lib
from fedjax_dp import types
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.algorithms import factored
from fedjax_dp.data import blocks
from fedjax_dp.data import builtin
from fedjax_dp.data import population as population_lib
from fedjax_dp.models import registry
from fedjax_dp.privacy import accounting
from fedjax_dp import tree_util
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import dp_sgd
from fedjax_dp.privacy import laplace
from fedjax_dp.privacy import placement
from fedjax_dp.privacy import sampling
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.privacy import tree_aggregation

# Independent PRNG streams, folded from a run's root key.
(INIT_STREAM, SAMPLE_STREAM, NOISE_STREAM, DATA_STREAM, DROPOUT_STREAM,
 CANARY_STREAM) = range(6)
# Folded into the noise stream: the root of every DP-FTRL tree node's key.
TREE_STREAM = 1 << 30

# Config fields that change nothing a run computes once its noise multiplier
# is resolved: names, evaluation and checkpoint cadence, when to stop (the
# number of rounds or a budget: runs that differ only there compute the same
# rounds as far as both go, with the same cohorts and noise, so they release
# the same values), how epsilon is reported (delta and the accountant reach
# the computation only through the resolved multiplier), and the round's
# layout (chunking, vmapping, unrolling, sharding and the factored form
# compute the same release up to float32 rounding).
OUTSIDE_RELEASE_IDENTITY = (
    "name", "eval_every", "checkpoint_every", "rounds", "epsilon_budget",
    "stop_at_budget", "accountant", "delta", "target_epsilon",
    "noise_multiplier", "clients_per_chunk", "vmap_clients",
    "unroll_local_steps", "shard_clients", "round_shape", "max_failed_rounds")


def release_identity(config: config_lib.Config,
                     noise_multiplier: float) -> tuple[int, int]:
  """Two 32-bit words that name what a run computes and releases.

  A hash of every config field except `OUTSIDE_RELEASE_IDENTITY`, with the
  resolved noise multiplier. Runs (or sweep lanes) that differ in anything
  they compute -- noise multiplier, clip norm, learning rates, data, model,
  sampling, mechanism, seed, ... -- get different identities and so draw
  independent randomness (`stream_keys`); runs that compute the same thing
  get the same identity and release the same values.
  """
  fields = {k: v for k, v in config.to_dict().items()
            if k not in OUTSIDE_RELEASE_IDENTITY}
  fields["resolved_noise_multiplier"] = float(noise_multiplier)
  digest = hashlib.sha256(json.dumps(
      fields, sort_keys=True, default=repr).encode("utf-8")).digest()
  return (int.from_bytes(digest[:4], "little"),
          int.from_bytes(digest[4:8], "little"))


class StreamKeys(NamedTuple):
  """A run's random streams (see `stream_keys`)."""

  sample: types.PRNGKey  # round r's cohort: sampler.sample_round(sample, r)
  noise: types.PRNGKey  # round r's noise key: fold_in(noise, r)
  data: types.PRNGKey  # on the device, round r's example order
  # Seed words of the host's NumPy streams (example order, dropout).
  host_words: tuple[int, ...]


def stream_keys(config: config_lib.Config,
                noise_multiplier: float) -> StreamKeys:
  """The random streams of a run of `config` with this noise multiplier.

  Derived from the seed and the run's `release_identity`, so two
  configurations never share noise, cohorts or example orders, even with
  the same seed: releasing both is then the composition of two independent
  mechanisms, as the sweep's accounting assumes. (With shared noise, two
  releases that differ in a clip norm or a learning rate would give their
  noiseless difference away.) The model's initialisation and audit canary
  directions depend on the seed alone, so configurations of one seed start
  from the same model.
  """
  words = release_identity(config, noise_multiplier)
  root = jax.random.key(config.seed)
  for word in words:
    root = jax.random.fold_in(root, word)
  return StreamKeys(jax.random.fold_in(root, SAMPLE_STREAM),
                    jax.random.fold_in(root, NOISE_STREAM),
                    jax.random.fold_in(root, DATA_STREAM),
                    (int(config.seed),) + words)


def _cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# Upper bound on the clients traced side by side on CPU: each is a copy of
# the client update in the compiled program (compile time grows with it).
_MAX_CPU_CHUNK = 8


class Execution(NamedTuple):
  """How `dp_fedavg.build_round` lays out the round (results are equal).

  Field names are build_round's keyword arguments.
  """

  clients_per_chunk: int
  unroll_local_steps: bool
  vmap_clients: bool


def default_execution(config: config_lib.Config, capacity: int,
                      factored_features: bool = False) -> Execution:
  """The round's layout for this backend, unless the config sets it.

  On XLA:CPU: chunks of as many clients as there are cores (at most 8),
  traced as independent copies (not vmapped) with unrolled local steps,
  which XLA runs concurrently on the cores; measured fastest for the CNN and
  the MLP (docs/benchmarks.md). Accelerators want wide vmaps.

  `factored_features`: the round is the factored one of a model with
  per-client feature layers (`factored.FEATURE_MODELS`). Its chunk's clients
  meet at every local step (the dense head's shared products), so on CPU
  twice as many clients as cores keep the cores busy in between (measured
  on 2 cores: chunks of 4 beat chunks of 2 by 18%, docs/benchmarks.md).
  """
  on_cpu = jax.default_backend() == "cpu"
  per_core = 2 if factored_features else 1
  chunk = config.clients_per_chunk or (
      min(per_core * _cpu_cores(), per_core * _MAX_CPU_CHUNK, capacity)
      if on_cpu else min(capacity, 256))
  unroll = on_cpu if config.unroll_local_steps is None else bool(
      config.unroll_local_steps)
  vmap = (not on_cpu) if config.vmap_clients is None else bool(
      config.vmap_clients)
  return Execution(chunk, unroll, vmap)


def build_sampler(config: config_lib.Config,
                  population_size: int) -> sampling.Sampler:
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
  capacity = config.capacity
  if config.mechanism == "laplace" and capacity is None:
    # dp_accounting has no truncated-Poisson Laplace event: a block as large
    # as the population never truncates, so the round is exactly
    # PoissonSampledDpEvent(q, LaplaceDpEvent(z)).
    capacity = population_size
  return sampling.make_sampler(
      config.sampling, population_size, cohort_size=config.cohort_size,
      sampling_probability=config.sampling_probability,
      capacity=capacity)


# Default bound on the probability that a round of distributed noise has
# fewer participants than the public minimum (and so aborts).
DEFAULT_ABORT_PROBABILITY = 0.01


def resolve_min_participants(config: config_lib.Config,
                             sampler: sampling.Sampler) -> int:
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


class SecAggSetup(NamedTuple):
  """Public settings of the secure-aggregation simulation (host floats).

  `min_shares` is the public minimum number of participants the shares are
  sized for (a round with fewer aborts), `max_shares` the most a round can
  have (the block's slots).
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


def secagg_setup(config: config_lib.Config, noise_multiplier: float,
                 min_shares: int, max_shares: int, dim: int) -> SecAggSetup:
  """Chooses (or checks) the fixed-point scale for `secagg_bits`.

  Without `secagg_scale`, the largest power of two s whose public bound on
  the integer sum fits the bits (secure_aggregation.required_bits) and whose
  arithmetic the simulation can do exactly (check_params).

  Raises:
    ValueError: naming the field, when no scale fits or the shares are too
      small for the discrete Gaussian guarantee (sigma_c >= 1/2).
  """
  c, bits, z = config.clip_norm, config.secagg_bits, noise_multiplier

  def share(s):
    return secure_aggregation.share_stddev(z, c, s, min_shares)

  def fits(s):
    try:
      secure_aggregation.check_params(max_shares, c, s, share(s), 32)
    except ValueError:
      return False
    return secure_aggregation.required_bits(max_shares, c, s,
                                            share(s)) <= bits

  scale = config.secagg_scale
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


def round_event(config: config_lib.Config, sampler: sampling.Sampler,
                noise_multiplier: float, round_index: int = 0,
                count_stddev: float | None = None,
                secagg: SecAggSetup | None = None):
  """Round `round_index`'s DP event for the run's ledger.

  Built from the module of the mechanism (and placement) with the sampler,
  so the event describes what the round does. Adaptive clipping's two
  Gaussians equal one Gaussian of multiplier z, so calibration may use the
  plain event (`count_stddev` None).
  """
  z = noise_multiplier
  if config.noise_placement == "local":
    return placement.local_dp_event(config.mechanism, z)
  if config.noise_placement == "distributed" and config.secagg_bits:
    if z == 0:
      return dp_accounting.NonPrivateDpEvent()
    return secure_aggregation.dp_event(
        clip_norm=config.clip_norm, scale=secagg.scale,
        share_stddev_=secagg.share_stddev, min_shares=secagg.min_shares,
        max_shares=secagg.max_shares, dim=secagg.dim)
  if config.noise_placement == "distributed":
    return placement.distributed_dp_event(z)
  if config.mechanism == "laplace":
    return laplace.central_dp_event(sampler, z)
  if config.adaptive_clipping and count_stddev is not None:
    return adaptive_clipping.dp_event(sampler, z, count_stddev)
  return sampler.round_event(z, round_index)


def ledger_relation(config: config_lib.Config,
                    sampler: sampling.Sampler) -> clipping.NeighbouringRelation:
  """The relation of the run's ledger: local for local noise, zero-out
  (REPLACE_SPECIAL) for distributed noise (the server sees who takes part),
  else the sampler's."""
  if config.noise_placement == "local":
    return clipping.NeighbouringRelation.LOCAL
  if config.noise_placement == "distributed":
    return clipping.NeighbouringRelation.REPLACE_SPECIAL
  return sampler.relation


def resolve_noise_multiplier(config: config_lib.Config,
                             sampler: sampling.Sampler) -> float:
  if config.noise_multiplier is not None:
    return float(config.noise_multiplier)
  make_event, rounds = (lambda z: round_event(config, sampler, z)), \
      config.rounds
  if config.mechanism == "tree":
    # Rounds differ (a tree's event is recorded when it starts): calibrate
    # on the whole run as one event.
    make_event, rounds = (lambda z: dp_accounting.ComposedDpEvent(tuple(
        round_event(config, sampler, z, r) for r in range(config.rounds)))), 1
  return accounting.calibrate_noise_multiplier(
      make_event, target_epsilon=config.target_epsilon,
      delta=config.delta, rounds=rounds, accountant=config.accountant,
      relation=ledger_relation(config, sampler))


# Local steps up to which "auto" picks the factored round. Its Gram
# corrections read every earlier step's factors, so its cost per step grows
# with the step. Measured against the plain round (2-core CPU, batch 10):
# the CNN (20 clients) 0.82 vs 0.96 s per round at 10 steps, even at 15, 8%
# slower at 20; the 2NN (200 clients) 0.24 vs 0.39 s at 10 steps, 0.46 vs
# 0.56 s at 15, even at 20, 2.3x slower at 50.
_MAX_FACTORED_FEATURE_STEPS = 12
_MAX_FACTORED_DENSE_STEPS = 16


def uses_factored_round(config: config_lib.Config,
                        mesh: jax.sharding.Mesh | None,
                        num_steps: int | None = None) -> bool:
  """Whether the run computes its rounds with `factored.build_factored_round`.

  "auto" picks it where it covers the configuration and the clients take
  few local steps (`num_steps`; None: not known, counted as few): at most
  `_MAX_FACTORED_DENSE_STEPS` for dense models, at most
  `_MAX_FACTORED_FEATURE_STEPS` for models with per-client feature layers
  (the CNN), and for those only on CPU (measured faster there only,
  docs/benchmarks.md; accelerators keep the plain vmapped round). "factored"
  forces it (an error where it does not cover the configuration). Both
  rounds compute the same result.
  """
  c = config
  eligible = (factored.supports(c.model, c.client_optimizer,
                                c.client_momentum)
              and mesh is None and c.per_layer_clipping is None
              and c.mechanism == "gaussian"
              and c.noise_placement == "central"
              and c.example_clip_norm is None)
  if c.round_shape == "factored" and not eligible:
    raise ValueError(
        "config field 'round_shape' is 'factored', but the factored round "
        "covers only dense models (logistic, mlp_2nn) and the McMahan CNN "
        "(cnn) under plain client SGD on one device with central Gaussian "
        "noise, without per-layer clipping or record-level DP")
  if c.model in factored.FEATURE_MODELS:
    eligible_auto = (eligible and jax.default_backend() == "cpu"
                     and (num_steps or 0) <= _MAX_FACTORED_FEATURE_STEPS)
  else:
    eligible_auto = eligible and (num_steps or 0) <= _MAX_FACTORED_DENSE_STEPS
  return c.round_shape == "factored" or (c.round_shape == "auto" and
                                         eligible_auto)


@dataclasses.dataclass
class Simulation:
  """The parts of a DP-FedAvg run (see `build`)."""

  config: config_lib.Config
  dataset: builtin.FederatedDataset
  eval_population: population_lib.FederatedPopulation
  model: types.Model
  sampler: sampling.Sampler
  noise_multiplier: float
  execution: Execution
  slots: int
  num_steps: int
  server_optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh | None = None
  secagg: SecAggSetup | None = None
  # Distributed noise: the public minimum number of participants (1 else).
  min_participants: int = 1

  @property
  def train(self):
    return self.dataset.train

  @property
  def count_stddev(self) -> float:
    """Adaptive clipping's sigma_b (default: expected cohort size / 20)."""
    if self.config.clip_count_stddev is not None:
      return float(self.config.clip_count_stddev)
    return adaptive_clipping.default_count_stddev(
        self.sampler.expected_cohort_size)

  def event(self, noise_multiplier: float | None = None,
            round_index: int = 0):
    """Round `round_index`'s DP event (default: this run's own z)."""
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    return round_event(self.config, self.sampler, z, round_index,
                       self.count_stddev, self.secagg)

  def run_events(self) -> list:
    """The events of every planned round."""
    return [self.event(round_index=r) for r in range(self.config.rounds)]

  def schedule(self) -> list[tuple[Any, int]]:
    """The planned rounds' events as (event, number of rounds) pairs: one
    pair when every round is alike, so accounting the plan costs the same
    for any number of rounds (DP-FTRL: one pair per tree, and one for the
    no-op rounds inside trees). Composition does not depend on order."""
    rounds = self.config.rounds
    if self.config.mechanism != "tree":
      return [(self.event(), rounds)]
    # DP-FTRL records a tree's event when the tree starts and a no-op in its
    # other rounds (tree_aggregation.round_event): one pair per tree.
    runs = []
    for r in range(0, rounds, self.sampler.restart_every):
      event = self.event(round_index=r)
      if runs and runs[-1][0] == event:
        runs[-1] = (event, runs[-1][1] + 1)
      else:
        runs.append((event, 1))
    recorded = sum(count for _, count in runs)
    if recorded < rounds:
      runs.append((self.event(round_index=1), rounds - recorded))
    return runs

  @property
  def relation(self) -> clipping.NeighbouringRelation:
    return ledger_relation(self.config, self.sampler)

  def example_event(self):
    """One round's example-level event for one client (record-level DP),
    or None without it."""
    if self.config.example_clip_norm is None:
      return None
    return dp_sgd.example_dp_event(self.config.example_noise_multiplier,
                                   self.config.local_epochs)

  def example_epsilon(self, num_rounds: int) -> float | None:
    """Record-level DP: one client's example-level epsilon after
    `num_rounds` rounds (every round counted, as if the client took part in
    all of them: no amplification by sampling is credited), or None without
    it. Zero-out neighbours within one client, accounted like add/remove
    (privacy/dp_sgd.py)."""
    event = self.example_event()
    if event is None:
      return None
    if num_rounds == 0:
      return 0.0
    return accounting.epsilon_of_counts(
        [(event, num_rounds)], self.config.delta,
        accountant=self.config.accountant,
        relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE)

  def streams(self) -> StreamKeys:
    """This run's random streams (`stream_keys` of its config and z)."""
    return stream_keys(self.config, self.noise_multiplier)

  def tree_state(self, streams: StreamKeys, round_index: int):
    """DP-FTRL's tree state before round r (None for other mechanisms)."""
    if self.config.mechanism != "tree":
      return None
    return tree_aggregation.state_before_round(
        jax.random.fold_in(streams.noise, TREE_STREAM), round_index,
        self.sampler.restart_every)

  def secagg_params(self):
    return None if self.secagg is None else self.secagg.params()

  def adaptive_hparams(self):
    """Adaptive clipping's round arguments, or None with a fixed clip."""
    if not self.config.adaptive_clipping:
      return None
    return adaptive_clipping.AdaptiveClipHparams.create(
        expected_cohort_size=self.sampler.expected_cohort_size,
        target_quantile=self.config.target_unclipped_quantile,
        learning_rate=self.config.clip_learning_rate,
        count_stddev=self.count_stddev)

  def new_ledger(self) -> accounting.PrivacyLedger:
    return accounting.PrivacyLedger(self.relation, self.config.delta,
                                    self.config.accountant)

  def uses_factored_round(self) -> bool:
    return uses_factored_round(self.config, self.mesh, self.num_steps)

  def round_fn(self):
    """The unjitted round (same for every config of this shape)."""
    if self.uses_factored_round():
      with_features = self.config.model in factored.FEATURE_MODELS
      return factored.build_factored_round(
          self.model,
          client_lib.client_optimizer(self.config.client_optimizer,
                                      self.config.client_momentum),
          self.server_optimizer,
          clients_per_chunk=(self.execution.clients_per_chunk if with_features
                             else self.config.clients_per_chunk),
          vmap_clients=self.execution.vmap_clients)
    return dp_fedavg.build_round(
        self.model,
        client_lib.client_optimizer(self.config.client_optimizer,
                                    self.config.client_momentum),
        self.server_optimizer, **self.execution._asdict(), mesh=self.mesh,
        per_layer_clipping=self.config.per_layer_clipping,
        mechanism=self.config.mechanism,
        noise_placement=self.config.noise_placement,
        secure_aggregation_encoding=self.secagg is not None,
        tree_restart_every=(self.sampler.restart_every
                            if self.config.mechanism == "tree" else None),
        example_dp=self.config.example_clip_norm is not None)

  def hparams(self, config: config_lib.Config | None = None,
              noise_multiplier: float | None = None) -> dp_fedavg.RoundHparams:
    config = config or self.config
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    if config.adaptive_clipping:
      # The update gets z_delta; the count's noise takes the rest of z.
      z = adaptive_clipping.update_noise_multiplier(z, self.count_stddev)
    return dp_fedavg.RoundHparams.create(
        client_lr=config.client_lr, server_lr=config.server_lr,
        clip_norm=config.clip_norm, noise_multiplier=z,
        denominator=self.sampler.expected_cohort_size,
        example_clip_norm=(float("inf") if config.example_clip_norm is None
                           else config.example_clip_norm),
        example_noise_multiplier=config.example_noise_multiplier,
        min_participants=self.min_participants)

  def initial_state(self, seed: int) -> server_lib.ServerState:
    root = jax.random.key(seed)
    params = self.model.init(jax.random.fold_in(root, INIT_STREAM))
    return server_lib.init(params, self.server_optimizer)

  def canary_directions(self, seed: int, params_like) -> types.Params:
    """2 * audit_canaries unit directions: the first half are inserted."""
    return audit.canary_directions(
        jax.random.fold_in(jax.random.key(seed), CANARY_STREAM),
        2 * self.config.audit_canaries, params_like)

  def prepare(self, r: int, streams: StreamKeys,
              sample_fn) -> tuple[blocks.ClientBlock, int, int, np.ndarray]:
    """Samples round r's cohort (from `streams`) and lays out its block.

    Simulated dropout removes each sampled client independently with
    probability `dropout_rate` before it reports. Privacy: dropout is
    randomness independent of the data applied after sampling, so the
    recorded event (sampling with q) remains a valid, conservative account;
    the denominator stays the public expected cohort size.

    Sampled indices >= the number of real clients are audit canaries; they
    take slots after the real clients, with no examples.

    Returns:
      (block, number of clients the sampler drew before any truncation,
      number of sampled clients that dropped out, canary id per slot (-1 for
      real clients and padding)).
    """
    indices, valid, num_drawn = jax.device_get(sample_fn(streams.sample, r))
    chosen = indices[valid]
    num_dropped = 0
    if self.config.dropout_rate > 0:
      stays = np.random.default_rng(
          [*streams.host_words, DROPOUT_STREAM, r]).random(
          chosen.shape[0]) >= self.config.dropout_rate
      num_dropped = int(np.sum(~stays))
      chosen = chosen[stays]
    n = self.train.num_clients
    canaries = chosen[chosen >= n] - n
    cohort = self.train.subset(chosen[chosen < n])
    local_valid = np.arange(self.slots) < cohort.num_clients
    local = np.where(local_valid, np.arange(self.slots), 0)
    block = blocks.make_block(
        cohort, local, local_valid, batch_size=self.config.batch_size,
        epochs=self.config.local_epochs, num_steps=self.num_steps,
        rng=np.random.default_rng([*streams.host_words, DATA_STREAM, r]),
        max_examples_per_client=self.config.max_examples_per_client)
    canary_ids = np.full((self.slots,), -1, np.int32)
    first = cohort.num_clients
    canary_ids[first:first + canaries.size] = canaries
    block.client_mask[first:first + canaries.size] = True
    return block, int(num_drawn), num_dropped, canary_ids


def build(config: config_lib.Config,
          dataset: builtin.FederatedDataset | None = None) -> Simulation:
  """Validates `config` and builds its Simulation (loads data, no compiling).

  Args:
    config: the run's settings.
    dataset: an in-memory federated dataset to train on instead of loading
      `config.dataset` (which then only names it).
  """
  config.validate()
  if dataset is None:
    dataset = builtin.load(config.dataset, seed=config.seed,
                           **config.dataset_kwargs)
  train = dataset.train
  # Audit canaries are clients too: the sampler (and so the accounting) runs
  # over the real clients plus the inserted canaries.
  sampler = build_sampler(config, train.num_clients + config.audit_canaries)
  model = registry.get_model(config.model, dataset.input_shape,
                             dataset.num_classes, **config.model_kwargs)
  try:  # shapes only: a bad architecture option fails here, not mid-run
    params_shape = jax.eval_shape(model.init, jax.random.key(0))
  except (TypeError, ValueError, ArithmeticError) as e:
    raise ValueError(
        f"config field 'model_kwargs' ({config.model_kwargs}) does not build "
        f"model {config.model!r}: {e}") from None
  noise_multiplier = resolve_noise_multiplier(config, sampler)
  shard = config.shard_clients
  if shard is None:
    shard = jax.device_count() > 1
  mesh = dp_fedavg.client_mesh() if shard else None
  max_examples = int(np.max(train.num_examples))
  if config.max_examples_per_client is not None:
    max_examples = min(max_examples, config.max_examples_per_client)
  num_steps = blocks.num_local_steps(max_examples, config.batch_size,
                                     config.local_epochs)
  execution = default_execution(
      config, sampler.capacity,
      factored_features=(config.model in factored.FEATURE_MODELS
                         and uses_factored_round(config, mesh, num_steps)))
  chunk = execution.clients_per_chunk
  # Every device gets a whole number of chunks.
  per_block = chunk * (mesh.size if mesh is not None else 1)
  slots = -(-sampler.capacity // per_block) * per_block
  blocks.check_block_size(train.feature_specs, slots, num_steps,
                          config.batch_size)
  if config.audit_canaries:
    # 2 * audit_canaries float32 directions of the model's size.
    needed = 8 * config.audit_canaries * tree_util.tree_size(params_shape)
    budget = blocks.memory_budget_bytes()
    if budget and needed > budget:
      raise ValueError(
          f"config field 'audit_canaries' ({config.audit_canaries}): the "
          f"canaries' directions take {needed / 2**30:.3g} GiB for this "
          f"model, over the {budget / 2**30:.3g} GiB allowed on this "
          "machine; use fewer canaries")
  eval_population = dataset.eval
  if not isinstance(eval_population, population_lib.FederatedPopulation):
    # Held-out clients are loaded once (a lazy source reads them here).
    eval_population = eval_population.subset(range(eval_population.num_clients))
  min_participants = 1
  if config.noise_placement == "distributed":
    min_participants = resolve_min_participants(config, sampler)
  secagg = None
  if config.secagg_bits is not None:
    dim = tree_util.tree_size(params_shape)
    secagg = secagg_setup(config, noise_multiplier, min_participants, slots,
                          dim)
  return Simulation(
      config=config, dataset=dataset, eval_population=eval_population,
      model=model, sampler=sampler, noise_multiplier=noise_multiplier,
      execution=execution, slots=slots,
      num_steps=num_steps,
      server_optimizer=server_lib.server_optimizer(
          config.server_optimizer, momentum=config.server_momentum),
      mesh=mesh, secagg=secagg, min_participants=min_participants)
