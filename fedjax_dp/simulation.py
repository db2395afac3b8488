"""Everything a run needs, built once from a config, without side effects.

`build(config)` loads the data, builds the model, the sampler (and with it
the round's DP event), resolves the noise multiplier and chooses the round's
execution shape. The runner drives one Simulation; a sweep drives many
configurations of the same shape with one compiled, vmapped round.
"""

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from fedjax_dp import audit
from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import import_paths
from fedjax_dp import server as server_lib
from fedjax_dp import streams as streams_lib
from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.algorithms import factored
from fedjax_dp.data import blocks
from fedjax_dp.data import builtin
from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import population as population_lib
from fedjax_dp.models import registry
from fedjax_dp.models import user_model
from fedjax_dp.privacy import plan as plan_lib

# Config fields that change nothing a run computes once its noise multiplier
# is resolved: names, evaluation and checkpoint cadence, when to stop (the
# number of rounds or a budget: runs that differ only there compute the same
# rounds as far as both go, with the same cohorts and noise, so they release
# the same values), how epsilon is reported (delta and the accountant reach
# the computation only through the resolved multiplier), and the round's
# layout (chunking, vmapping, unrolling, sharding, the factored form and
# rounds on the device compute the same release up to float32 rounding).
OUTSIDE_RELEASE_IDENTITY = (
    "name", "eval_every", "checkpoint_every", "rounds", "epsilon_budget",
    "stop_at_budget", "accountant", "delta", "target_epsilon",
    "noise_multiplier", "clients_per_chunk", "vmap_clients",
    "unroll_local_steps", "shard_clients", "round_shape", "max_failed_rounds",
    "rounds_per_call")
# Data-loading keys of `dataset_kwargs` that change where examples are read
# from (memory or the file), not which: outside the identity too.
DATA_KWARGS_OUTSIDE_RELEASE_IDENTITY = ("in_memory", "in_memory_max_gib")
# Fields added after the first release of the identity: they enter the hash
# only when set away from their default, so adding a field never changes the
# randomness (and so the results) of runs that do not use it.
OMITTED_AT_DEFAULT = ("min_separation", "mf_bands", "blt_buffers")


def release_identity(config: config_lib.Config,
                     noise_multiplier: float) -> tuple[int, int]:
  """Two 32-bit words that name what a run computes and releases.

  A hash of every config field except `OUTSIDE_RELEASE_IDENTITY` (and the
  `OMITTED_AT_DEFAULT` ones at their defaults, and the
  `DATA_KWARGS_OUTSIDE_RELEASE_IDENTITY` keys of `dataset_kwargs`), with the
  resolved noise multiplier. Runs (or sweep lanes) that differ in anything
  they compute -- noise multiplier, clip norm, learning rates, data, model,
  sampling, mechanism, seed, ... -- get different identities and so draw
  independent randomness (`stream_keys`); runs that compute the same thing
  get the same identity and release the same values.
  """
  defaults = config_lib.Config()
  fields = {k: v for k, v in config.to_dict().items()
            if k not in OUTSIDE_RELEASE_IDENTITY and not (
                k in OMITTED_AT_DEFAULT and v == getattr(defaults, k))}
  fields["dataset_kwargs"] = {
      k: v for k, v in fields["dataset_kwargs"].items()
      if k not in DATA_KWARGS_OUTSIDE_RELEASE_IDENTITY}
  fields["resolved_noise_multiplier"] = float(noise_multiplier)
  if plan_lib.noise_depends_on_rounds(config):
    # Runs of different lengths compute different noise from the same
    # draws, so they must not share them.
    fields["rounds"] = int(config.rounds)
  digest = hashlib.sha256(json.dumps(
      fields, sort_keys=True, default=repr).encode("utf-8")).digest()
  return (int.from_bytes(digest[:4], "little"),
          int.from_bytes(digest[4:8], "little"))


class StreamKeys(NamedTuple):
  """A run's random streams (see `stream_keys`)."""

  sample: types.PRNGKey  # round r's cohort: sampler.sample_round(sample, r)
  noise: types.PRNGKey  # round r's noise key: fold_in(noise, r)
  data: types.PRNGKey  # round r's example order: fold_in(data, r)
  # Seed words of the host's NumPy stream (dropout).
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
  return StreamKeys(jax.random.fold_in(root, streams_lib.SAMPLE),
                    jax.random.fold_in(root, streams_lib.NOISE),
                    jax.random.fold_in(root, streams_lib.DATA),
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

  The first four fields are build_round's keyword arguments.
  """

  clients_per_chunk: int | None
  unroll_local_steps: bool
  vmap_clients: bool
  # The factored backend computes the clipped sum (`uses_factored_round`).
  factored: bool = False
  # Each device's share of the block is a whole number of these clients.
  slot_multiple: int = 1


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
  twice as many clients as cores keep the cores busy in between
  (docs/benchmarks.md).
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
  return Execution(chunk, unroll, vmap, slot_multiple=chunk)


# Local steps up to which "auto" picks the factored round. Its Gram
# corrections read every earlier step's factors, so its cost per step grows
# with the step; these are where it stops beating the plain round
# (docs/benchmarks.md, "Which shape won, and why").
_MAX_FACTORED_FEATURE_STEPS = 12
_MAX_FACTORED_DENSE_STEPS = 16


def uses_factored_round(config: config_lib.Config,
                        mesh: jax.sharding.Mesh | None,
                        num_steps: int | None = None,
                        kind: str | None = None) -> bool:
  """Whether the run's round computes its clipped sum with the factored
  backend (algorithms/factored.py).

  "auto" picks it where it covers the configuration and the clients take
  few local steps (`num_steps`; None: not known, counted as few): at most
  `_MAX_FACTORED_DENSE_STEPS` for dense models, at most
  `_MAX_FACTORED_FEATURE_STEPS` for models with per-client feature layers
  (the CNN), and for those only on CPU (measured faster there only,
  docs/benchmarks.md; accelerators keep the plain vmapped round). "factored"
  forces it (an error where it does not cover the configuration). Both
  rounds compute the same result.

  `kind`: the built-in model the run's model computes (`round_kind`;
  default the config's model).
  """
  c = config
  kind = kind or c.model
  eligible = (factored.supports(kind, c.client_optimizer,
                                c.client_momentum)
              and mesh is None and plan_lib.refusal(c, "factored") is None)
  if c.round_shape == "factored" and not eligible:
    raise ValueError(
        "config field 'round_shape' is 'factored', but the factored round "
        "covers only dense models (logistic, mlp_2nn) and the McMahan CNN "
        "(cnn) under plain client SGD on one device with central Gaussian "
        "or tree noise, without per-layer clipping or record-level DP")
  if kind in factored.FEATURE_MODELS:
    eligible_auto = (eligible and jax.default_backend() == "cpu"
                     and (num_steps or 0) <= _MAX_FACTORED_FEATURE_STEPS)
  else:
    eligible_auto = eligible and (num_steps or 0) <= _MAX_FACTORED_DENSE_STEPS
  return c.round_shape == "factored" or (c.round_shape == "auto" and
                                         eligible_auto)


def layout(config: config_lib.Config, capacity: int,
           mesh: jax.sharding.Mesh | None, num_steps: int,
           kind: str | None = None) -> Execution:
  """The round's whole layout, decided here only: backend (per-client or
  factored), chunking, vmapped or independent clients, unrolling. `kind`:
  as in `uses_factored_round`."""
  kind = kind or config.model
  factored_round = uses_factored_round(config, mesh, num_steps, kind)
  with_features = factored_round and kind in factored.FEATURE_MODELS
  execution = default_execution(config, capacity,
                                factored_features=with_features)
  if factored_round and not with_features:
    # A dense model's factored chunks are sized from the block unless the
    # config sets them.
    execution = execution._replace(clients_per_chunk=config.clients_per_chunk)
  return execution._replace(factored=factored_round)


@dataclasses.dataclass
class Simulation:
  """The parts of a DP-FedAvg run (see `build`): data, model, the privacy
  plan, and the round's layout."""

  config: config_lib.Config
  dataset: dataset_lib.FederatedDataset
  eval_population: population_lib.FederatedPopulation
  model: types.Model
  plan: plan_lib.PrivacyPlan
  execution: Execution
  slots: int
  num_steps: int
  server_optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh | None = None
  # The built-in model whose round shapes apply (`round_kind`); "" means
  # the config's model.
  kind: str = ""

  @property
  def train(self):
    return self.dataset.train

  @functools.cached_property
  def example_width(self) -> int:
    """The width every block's example order is drawn in
    (`blocks.example_width` of the training population)."""
    return blocks.example_width(self.train.num_examples)

  def streams(self) -> StreamKeys:
    """This run's random streams (`stream_keys` of its config and z)."""
    return stream_keys(self.config, self.plan.noise_multiplier)

  def round_fn(self):
    """The unjitted round (same for every config of this shape)."""
    e = self.execution
    model = self.model
    if e.factored:
      # The factored backend is specialised by model: a user's model that
      # computes a built-in one's program runs as that one (`round_kind`).
      model = model._replace(name=self.kind or self.config.model)
    return dp_fedavg.build_round(
        model,
        client_lib.client_optimizer(self.config.client_optimizer,
                                    self.config.client_momentum),
        self.server_optimizer, self.plan.privatizer,
        clients_per_chunk=e.clients_per_chunk, vmap_clients=e.vmap_clients,
        unroll_local_steps=e.unroll_local_steps, factored=e.factored,
        mesh=self.mesh)

  def describe_round(self) -> str:
    """The round's layout in words, for the log: which backend and why."""
    e = self.execution
    kind = self.kind or self.config.model
    if e.factored:
      shape = "factored (clipped sums from per-example factors)"
      if kind != self.config.model:
        shape += f": the model computes exactly the built-in {kind!r}"
    else:
      shape = "per-client"
      if not factored.supports(kind):
        covered = factored.DENSE_MODELS + tuple(factored.FEATURE_MODELS)
        shape += (" (the factored round covers the built-in models "
                  f"{', '.join(covered)} and models that compute exactly "
                  f"what one of them computes; not {self.model.name})")
    return (f"{shape}, chunks of {e.clients_per_chunk or self.slots} "
            f"{'vmapped' if e.vmap_clients else 'independent'} clients, "
            f"{self.num_steps} local steps")

  def hparams(self, config: config_lib.Config | None = None,
              noise_multiplier: float | None = None) -> dp_fedavg.RoundHparams:
    """The round's array hyperparameters for `config` (default: this run's)
    with noise multiplier z (default: this run's resolved one)."""
    config = config or self.config
    plan = self.plan
    z = plan.noise_multiplier if noise_multiplier is None else noise_multiplier
    return dp_fedavg.RoundHparams.create(
        client_lr=config.client_lr, server_lr=config.server_lr,
        clip_norm=config.clip_norm,
        noise_multiplier=plan.update_noise_multiplier(z),
        denominator=plan.denominator,
        example_clip_norm=(float("inf") if config.example_clip_norm is None
                           else config.example_clip_norm),
        example_noise_multiplier=config.example_noise_multiplier,
        min_participants=plan.min_participants)

  @functools.cached_property
  def _init(self):
    # One compiled program (kept by the compilation cache) instead of an
    # operation at a time: the same values, a fraction of the start-up.
    return jax.jit(self.model.init)

  def initial_params(self, seed: int | jax.Array) -> types.Params:
    """The model initialised from `seed` (the same for every run of it)."""
    return self._init(jax.random.fold_in(jax.random.key(seed),
                                         streams_lib.INIT))

  def initial_state(self, seed: int | None = None) -> server_lib.ServerState:
    """The server state before round 0: the model initialised from `seed`
    (default: the config's), the optimizer's state, and the mechanism's
    state from this run's noise stream (`PrivacyPlan.initial_state`)."""
    seed = self.config.seed if seed is None else seed
    params = self.initial_params(seed)
    return server_lib.init(params, self.server_optimizer,
                           self.plan.initial_state(self.streams().noise,
                                                   params))

  def canary_directions(self, seed: int, params_like) -> types.Params:
    """2 * audit_canaries unit directions: the first half are inserted."""
    return audit.canary_directions(
        jax.random.fold_in(jax.random.key(seed), streams_lib.CANARY),
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
          [*streams.host_words, streams_lib.DROPOUT, r]).random(
          chosen.shape[0]) >= self.config.dropout_rate
      num_dropped = int(np.sum(~stays))
      chosen = chosen[stays]
    n = self.train.num_clients
    canaries = chosen[chosen >= n] - n
    real = chosen[chosen < n]
    if isinstance(self.train, population_lib.FederatedPopulation):
      # In memory: the block is gathered from the population directly.
      population, indices = self.train, real
    else:
      population, indices = self.train.subset(real), np.arange(real.size)
    local_valid = np.arange(self.slots) < real.size
    local = np.zeros((self.slots,), np.int64)
    local[:real.size] = indices
    block = blocks.make_block(
        population, local, local_valid, batch_size=self.config.batch_size,
        epochs=self.config.local_epochs, num_steps=self.num_steps,
        key=jax.random.fold_in(streams.data, r),
        width=self.example_width,
        max_examples_per_client=self.config.max_examples_per_client)
    canary_ids = np.full((self.slots,), -1, np.int32)
    first = real.size
    canary_ids[first:first + canaries.size] = canaries
    block.client_mask[first:first + canaries.size] = True
    return block, int(num_drawn), num_dropped, canary_ids


def name_user_objects(config: config_lib.Config, *, dataset=None,
                      model=None) -> config_lib.Config:
  """`config` with its `dataset` and `model` fields naming the objects a
  user passes in (what the run directory records and the release identity
  hashes).

  A flax module whose class has an import path is recorded by that path and
  its constructor arguments (`model_kwargs`), so the run can be rebuilt from
  its directory; any other model object by the label "<name>". A dataset
  object keeps a config's import path or label; otherwise it is recorded as
  "<dataset.name>" (a built-in name would say the run read that dataset).
  """
  if model is not None:
    described = (user_model.describe(model)
                 if isinstance(model, nn.Module) else None)
    if described is not None:
      if config.model != described[0]:
        # (Where the config already names the class, its `model_kwargs`
        # stand, e.g. a sweep's grid over them.)
        config = config.replace(model=described[0],
                                model_kwargs=described[1])
    elif not _names_object(config.model):
      label = (type(model).__name__ if isinstance(model, nn.Module)
               else getattr(model, "name", None) or type(model).__name__)
      config = config.replace(model=import_paths.object_label(label),
                              model_kwargs={})
  if dataset is not None and not _names_object(config.dataset):
    config = config.replace(
        dataset=import_paths.object_label(dataset.name), dataset_kwargs={})
  return config


def _names_object(value: str) -> bool:
  return import_paths.is_import_path(value) or import_paths.is_object_label(
      value)


def _passed_object(field: str, value: str) -> ValueError:
  return ValueError(
      f"config field {field!r} is {value!r}, the label of a {field} passed "
      f"as a Python object: pass the same object again ({field}=...), or "
      "name it by the import path of its builder, 'package.module:attribute'")


def load_dataset(config: config_lib.Config) -> dataset_lib.FederatedDataset:
  """The config's dataset: built in, or built by the function its import
  path names (called with `dataset_kwargs`, and `seed` where it takes one).

  Raises:
    ValueError: naming `dataset` or `dataset_kwargs`.
  """
  name = config.dataset
  if import_paths.is_object_label(name):
    raise _passed_object("dataset", name)
  if not import_paths.is_import_path(name):
    return builtin.load(name, seed=config.seed, **config.dataset_kwargs)
  fn = import_paths.resolve(name, "dataset")
  kwargs = dict(config.dataset_kwargs)
  try:
    if "seed" in inspect.signature(fn).parameters and "seed" not in kwargs:
      kwargs["seed"] = config.seed
  except (TypeError, ValueError):
    pass
  try:
    dataset = fn(**kwargs)
  except TypeError as e:
    raise ValueError(f"config field 'dataset_kwargs' {config.dataset_kwargs}"
                     f" does not build dataset {name!r}: {e}") from None
  if not isinstance(dataset, dataset_lib.FederatedDataset):
    raise ValueError(
        f"config field 'dataset': {name!r} returned a "
        f"{type(dataset).__name__}, not a fedjax_dp.data.dataset."
        "FederatedDataset (see fedjax_dp.data.in_memory to build one)")
  return dataset


def _model_and_shape(config: config_lib.Config,
                     dataset: dataset_lib.FederatedDataset, model_obj=None):
  """The config's model for `dataset` (or `model_obj`, the user's), and its
  parameters' shapes.

  Raises:
    ValueError: naming `model` or `model_kwargs`, for an architecture that
      does not build (checked on shapes only, before anything runs).
  """
  name = config.model
  if model_obj is None and import_paths.is_object_label(name):
    raise _passed_object("model", name)
  if model_obj is None and not import_paths.is_import_path(name):
    model = registry.get_model(name, dataset.input_shape,
                               dataset.num_classes, **config.model_kwargs)
  else:
    if model_obj is None:
      model_obj, kwargs = import_paths.resolve(name, "model"), dict(
          config.model_kwargs)
    else:
      # An object's arguments are already in it (`name_user_objects`).
      kwargs = {}
      if isinstance(model_obj, nn.Module) and user_model.describe(model_obj):
        model_obj = type(model_obj)
        kwargs = dict(config.model_kwargs)
    model = user_model.to_model(
        model_obj, name=name, input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        input_dtype=dataset.train.feature_specs["x"][1], kwargs=kwargs)
  try:
    return model, jax.eval_shape(model.init, jax.random.key(0))
  except (TypeError, ValueError, ArithmeticError) as e:
    raise ValueError(
        f"config field 'model_kwargs' ({config.model_kwargs}) does not "
        f"build model {config.model!r}: {e}") from None


def round_kind(config: config_lib.Config, model: types.Model, params_shape,
               input_dtype) -> str:
  """The model whose round shapes apply to this run: a built-in model's own
  name; for a user's model, the built-in model it computes exactly
  (`registry.builtin_equivalent`: same parameters, same program), else its
  own name. A model with its own loss keeps its own: the factored round
  computes softmax cross-entropy."""
  if config.model in registry.NAMES or model.loss is not None:
    return config.model
  return registry.builtin_equivalent(model, params_shape,
                                     input_dtype) or config.model


def build(config: config_lib.Config,
          dataset: dataset_lib.FederatedDataset | None = None,
          model=None) -> Simulation:
  """Validates `config` and builds its Simulation (loads data, no compiling).

  Args:
    config: the run's settings.
    dataset: an in-memory federated dataset to train on instead of loading
      `config.dataset` (which then only names it, see `name_user_objects`).
    model: the user's model (`models/user_model.py` lists the forms) to
      train instead of building `config.model` (which then only names it).
  """
  config = name_user_objects(config, dataset=dataset, model=model)
  config.validate()
  if dataset is None:
    dataset = load_dataset(config)
  train = dataset.train
  # The model is built after the sampler's settings are checked (a cohort
  # larger than the population fails before anything is traced), once.
  model_and_shape = functools.cache(
      lambda: _model_and_shape(config, dataset, model))
  # Audit canaries are clients too: the sampler (and so the accounting) runs
  # over the real clients plus the inserted canaries.
  plan = plan_lib.build(
      config, train.num_clients + config.audit_canaries,
      lambda: tree_util.tree_size(model_and_shape()[1]))
  model, params_shape = model_and_shape()
  num_params = tree_util.tree_size(params_shape)
  sampler = plan.sampler
  shard = config.shard_clients
  if shard is None:
    shard = jax.device_count() > 1
  mesh = dp_fedavg.client_mesh() if shard else None
  max_examples = int(np.max(train.num_examples))
  if config.max_examples_per_client is not None:
    max_examples = min(max_examples, config.max_examples_per_client)
  num_steps = blocks.num_local_steps(max_examples, config.batch_size,
                                     config.local_epochs)
  kind = round_kind(config, model, params_shape,
                    train.feature_specs["x"][1])
  execution = layout(config, sampler.capacity, mesh, num_steps, kind)
  # Every device gets a whole number of chunks.
  per_block = execution.slot_multiple * (mesh.size if mesh is not None else 1)
  slots = -(-sampler.capacity // per_block) * per_block
  blocks.check_block_size(train.feature_specs, slots, num_steps,
                          config.batch_size)
  if config.audit_canaries:
    # 2 * audit_canaries float32 directions of the model's size.
    needed = 8 * config.audit_canaries * num_params
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
  return Simulation(
      config=config, dataset=dataset, eval_population=eval_population,
      model=model, plan=plan, execution=execution, slots=slots,
      num_steps=num_steps,
      server_optimizer=server_lib.server_optimizer(
          config.server_optimizer, momentum=config.server_momentum),
      mesh=mesh, kind=kind)
