"""Experiment configuration: a frozen, self-validating dataclass.

A config holds public settings only. Every field is checked when the config
is built, so bad input fails with a message naming the field and its allowed
values before any data is loaded or anything is compiled.
"""

import dataclasses
import json
import math
import typing
from typing import Any


def _is_int(value: Any) -> bool:
  """An int and not a bool (True would pass isinstance(value, int))."""
  return isinstance(value, int) and not isinstance(value, bool)


def _fail(field: str, allowed: str, value: Any) -> None:
  raise ValueError(f"config field {field!r} must be {allowed}; got {value!r}")


def _check_positive_finite(config, name: str, none_word: str | None = None):
  """Field `name` must be a finite number > 0 (or None, spelled
  `none_word` in the message, where that is allowed)."""
  v = getattr(config, name)
  if none_word is not None and v is None:
    return
  if not (isinstance(v, (int, float)) and 0 < v < math.inf):
    _fail(name, "a finite number > 0" + (
        f" (or {none_word})" if none_word else ""), v)


# The largest seed: JAX's default (threefry) keys are built from 32 bits of
# it, so larger seeds would silently collide with smaller ones.
MAX_SEED = 2**32 - 1

# Canaries are clients the sampler draws from (as many again are held out);
# audits use hundreds to thousands.
MAX_AUDIT_CANARIES = 10**6

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number",
               bool: "true or false", dict: "a dict (JSON object)"}


def _has_type(value: Any, kind: type) -> bool:
  if kind is float:  # an int is a number too; a bool is not
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return _is_int(value)
  return isinstance(value, kind)


def _check_types(config: "Config") -> None:
  """Raises ValueError naming the first field whose value has the wrong type
  (before any range check compares it)."""
  for name, hint in typing.get_type_hints(type(config)).items():
    value = getattr(config, name)
    options = typing.get_args(hint) or (hint,)
    kinds = [k for k in options if k is not type(None)]
    nullable = len(kinds) < len(options)
    if value is None and nullable:
      continue
    if not any(_has_type(value, k) for k in kinds):
      allowed = " or ".join(_TYPE_NAMES[k] for k in kinds)
      allowed += " (or null)" if nullable else (
          " (not null)" if value is None else "")
      _fail(name, allowed, value)


@dataclasses.dataclass(frozen=True)
class Config:
  """Settings of one DP-FedAvg run.

  The defaults are the built-in default experiment
  (experiments/digits_dp_fedavg.py).
  """

  name: str = "digits_dp_fedavg"
  # Data and model: built-in names, or the import paths
  # ("package.module:attribute") of the user's dataset function and model
  # class or builder (README, "Your own model and data").
  dataset: str = "digits"
  dataset_kwargs: dict = dataclasses.field(default_factory=dict)
  model: str = "mlp_2nn"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  # Rounds and client sampling.
  rounds: int = 150
  # "poisson", "fixed", "disjoint" (DP-FTRL's trees), "cyclic" (a (k, b)
  # participation schema: round r's cohort from group r mod b) or
  # "banded_poisson" (Poisson within group r mod b); b = min_separation.
  sampling: str = "poisson"
  cohort_size: int | None = 50  # expected size for poisson
  sampling_probability: float | None = None  # poisson only; overrides cohort
  capacity: int | None = None  # poisson block size; None: automatic
  # Probability that a sampled client drops out before reporting (simulated).
  dropout_rate: float = 0.0
  # Local training.
  client_optimizer: str = "sgd"
  client_lr: float = 0.2
  client_momentum: float = 0.0
  local_epochs: int = 2
  batch_size: int = 5
  max_examples_per_client: int | None = None
  # Server.
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  server_momentum: float = 0.9
  # Privacy.
  clip_norm: float = 1.0
  noise_multiplier: float | None = 1.2  # None: calibrate to target_epsilon
  target_epsilon: float | None = None
  delta: float = 1e-4
  epsilon_budget: float | None = None
  # With a budget: False refuses to start a run planned past it; True runs and
  # stops before the first round that would exceed it.
  stop_at_budget: bool = False
  accountant: str = "pld"
  # The noise mechanism: "gaussian" (L2 clipping, Gaussian noise z * C),
  # "laplace" (L1 clipping to C, Laplace noise of scale z * C) or "tree"
  # (DP-FTRL, Kairouz et al. 2021: L2 clipping, tree-aggregation noise with
  # per-node std z * C; needs sampling="disjoint" and accountant="rdp").
  mechanism: str = "gaussian"
  # Where the noise is added (privacy/placement.py): "central" (the server),
  # "distributed" (each slot adds a share; secure aggregation sums them) or
  # "local" (each client noises its own update; the ledger then holds the
  # per-client local guarantee).
  noise_placement: str = "central"
  # Distributed noise only. None: secure aggregation over the reals with
  # Gaussian shares. An integer in [2, 32]: simulate its fixed-point encoding
  # and sum modulo 2^secagg_bits with discrete Gaussian shares (RDP
  # accountant); secagg_scale is the fixed-point scale s (step 1/s), None
  # picks the largest power of two whose sum fits the bits.
  secagg_bits: int | None = None
  secagg_scale: float | None = None
  # Distributed noise only: the public minimum number of participants n_min.
  # Each participant's share is sized so that n_min shares sum to the central
  # noise z * C; a round with fewer participants is aborted (nothing is
  # released). None: the largest n_min for which a round aborts with
  # probability <= 1%, from the sampler's settings and dropout_rate.
  min_participants: int | None = None
  # DP-FTRL: rounds per tree (None: one tree for the whole run) and whether
  # a client may take part once per tree ("once_per_tree") or once ("once").
  tree_restart_every: int | None = None
  tree_participation: str = "once_per_tree"
  # Participation schemas (sampling "cyclic" or "banded_poisson"): b, the
  # number of client groups; any two rounds of one client are at least b
  # apart, and a client takes part in at most ceil(rounds / b).
  min_separation: int | None = None
  # Matrix-factorization noise (mechanism "band_mf" or "blt"; central, L2
  # clipping, a participation schema): BandMF's bands (None: b) and BLT's
  # buffers. The strategies are optimised for `rounds` prefix sums.
  mf_bands: int | None = None
  blt_buffers: int = 3
  # Record-level DP inside each client (DP-SGD; privacy/plan.py,
  # noisy_batch_gradient): clip each example's gradient to example_clip_norm
  # and add Gaussian noise of std example_noise_multiplier *
  # example_clip_norm to each local step's sum.
  # None disables it. Its example-level guarantee has its own ledger.
  example_clip_norm: float | None = None
  example_noise_multiplier: float = 0.0
  # Per-layer clipping: None clips the whole delta to clip_norm; "uniform"
  # or "size_proportional" splits clip_norm over top-level parameter groups
  # (C_g = C / sqrt(G), or C sqrt(d_g / d)): same overall bound, same noise.
  per_layer_clipping: str | None = None
  # Adaptive clipping (Andrew et al. 2021): clip_norm is the initial clip
  # (the paper starts at 0.1), moved geometrically each round toward the
  # target quantile of unclipped clients; the count's noise sigma_b defaults
  # to expected cohort size / 20, and z is split so the total stays z.
  adaptive_clipping: bool = False
  target_unclipped_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  clip_count_stddev: float | None = None
  # Empirical privacy audit (Andrew et al. 2024): number of canary clients
  # inserted into the population (as many more are held out); 0 disables.
  audit_canaries: int = 0
  # Run.
  seed: int = 0  # in [0, 2**32 - 1]: JAX's default keys hold 32 bits
  eval_every: int = 10
  checkpoint_every: int = 10  # rounds between checkpoints (with a run dir)
  # Divergence: the run stops with an error after this many consecutive
  # failed rounds -- rounds in which every participating client's update was
  # non-finite, or whose held-out loss was non-finite. None never stops.
  max_failed_rounds: int | None = 3
  clients_per_chunk: int | None = None  # None: chosen by backend
  # How the round is computed: "auto" uses the factored round for dense
  # models under plain client SGD on one device with up to 16 local steps,
  # and for the McMahan CNN there on CPU with up to 12 (docs/benchmarks.md),
  # else the plain round; "plain" or "factored" force one (both compute the
  # same round).
  round_shape: str = "auto"
  # Shard the cohort over all devices (jax.devices(), every host after
  # jax.distributed.initialize()); None: whenever there is more than one.
  shard_clients: bool | None = None
  unroll_local_steps: bool | None = None  # None: chosen by backend
  # Whether a chunk's clients are vmapped into one batched computation (True)
  # or traced as independent copies that XLA:CPU runs concurrently (False).
  # None: chosen by backend (False on CPU, True on accelerators).
  vmap_clients: bool | None = None
  # Rounds per compiled call (on_device.py). 1: the host loop, one
  # call per round. K > 1: the training population is kept on the device
  # (it must fit a memory budget) and up to K rounds -- sampling, data layout
  # and training -- run in one call, their K privacy events recorded before
  # it. Calls also end at eval rounds, so evaluation sees the same rounds as
  # with 1. Results are the host loop's up to the order of each client's
  # examples. Not with audit_canaries, dropout_rate or sharded clients.
  rounds_per_call: int = 1

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Checks every field; raises ValueError naming the first bad one."""
    # Imported here: the registries sit in layers below, but importing them
    # at module load would make `config` heavy for the CLI's --help.
    from fedjax_dp.data import builtin  # pylint: disable=g-import-not-at-top
    from fedjax_dp.models import registry  # pylint: disable=g-import-not-at-top
    from fedjax_dp.privacy import accounting  # pylint: disable=g-import-not-at-top
    from fedjax_dp.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
    from fedjax_dp.privacy import sampling as sampling_lib  # pylint: disable=g-import-not-at-top
    from fedjax_dp import import_paths  # pylint: disable=g-import-not-at-top
    from fedjax_dp import server  # pylint: disable=g-import-not-at-top

    def positive_int(name):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        _fail(name, "an integer >= 1", v)

    _check_types(self)

    # Besides the built-in names: an import path of the user's builder
    # ("package.module:attribute"), or the "<name>" label of an object
    # passed to runner.run (import_paths.py).
    for name, names in (("dataset", builtin.NAMES), ("model", registry.NAMES)):
      value = getattr(self, name)
      if not (value in names or import_paths.is_import_path(value)
              or import_paths.is_object_label(value)):
        _fail(name, f"one of {list(names)} or an import path "
              "'package.module:attribute'", value)
    for name in ("rounds", "local_epochs", "batch_size", "eval_every",
                 "checkpoint_every"):
      positive_int(name)
    if self.sampling not in sampling_lib.SCHEMES:
      _fail("sampling", f"one of {list(sampling_lib.SCHEMES)}", self.sampling)
    if self.sampling_probability is not None:
      if self.sampling not in ("poisson", "banded_poisson"):
        _fail("sampling_probability", "unset (None) unless sampling is "
              "'poisson' or 'banded_poisson'", self.sampling_probability)
      if not 0 < self.sampling_probability <= 1:
        _fail("sampling_probability", "in (0, 1]", self.sampling_probability)
    elif self.cohort_size is None:
      _fail("cohort_size", "an integer >= 1 (or set sampling_probability)",
            None)
    for name in ("cohort_size", "capacity", "max_examples_per_client",
                 "clients_per_chunk"):
      if getattr(self, name) is not None:
        positive_int(name)
    if self.client_optimizer not in ("sgd", "adam"):
      _fail("client_optimizer", "one of ['sgd', 'adam']", self.client_optimizer)
    if self.server_optimizer not in server.SERVER_OPTIMIZERS:
      _fail("server_optimizer", f"one of {list(server.SERVER_OPTIMIZERS)}",
            self.server_optimizer)
    for name in ("client_lr", "server_lr"):
      _check_positive_finite(self, name)
    if not (isinstance(self.dropout_rate, (int, float))
            and 0 <= self.dropout_rate < 1):
      _fail("dropout_rate", "in [0, 1)", self.dropout_rate)
    for name in ("client_momentum", "server_momentum"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and 0 <= v < 1):
        _fail(name, "in [0, 1)", v)
    if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
      _fail("clip_norm", "a number > 0 (inf disables clipping)", self.clip_norm)
    if self.noise_multiplier is None:
      if self.target_epsilon is None:
        _fail("noise_multiplier", "a number >= 0, or None with target_epsilon "
              "set", None)
    elif not (isinstance(self.noise_multiplier, (int, float))
              and 0 <= self.noise_multiplier < math.inf):
      _fail("noise_multiplier", "a finite number >= 0", self.noise_multiplier)
    for name in ("target_epsilon", "epsilon_budget"):
      _check_positive_finite(self, name, "None")
    if self.target_epsilon is not None and self.noise_multiplier is not None:
      _fail("target_epsilon", "None when noise_multiplier is given (set "
            "noise_multiplier=None to calibrate it)", self.target_epsilon)
    if not (isinstance(self.delta, float) and 0 < self.delta < 1):
      _fail("delta", "in (0, 1)", self.delta)
    if self.accountant not in accounting.ACCOUNTANTS:
      _fail("accountant", f"one of {list(accounting.ACCOUNTANTS)}",
            self.accountant)
    if self.sampling == "fixed" and self.accountant == "pld":
      _fail("accountant", "'rdp' for fixed-size sampling (dp_accounting's PLD "
            "has no event for sampling without replacement)", self.accountant)
    # Which mechanisms, placements and samplers combine: the privacy plan's
    # rules, in one place.
    plan_lib.check_combination(self)
    self._validate_placement()
    self._validate_tree()
    self._validate_example_dp()
    self._validate_clipping()
    if not _is_int(self.audit_canaries) or not (
        0 <= self.audit_canaries <= MAX_AUDIT_CANARIES):
      _fail("audit_canaries", f"an integer in [0, {MAX_AUDIT_CANARIES}]",
            self.audit_canaries)
    if self.round_shape not in ("auto", "plain", "factored"):
      _fail("round_shape", "one of ['auto', 'plain', 'factored']",
            self.round_shape)
    for name in ("shard_clients", "unroll_local_steps", "vmap_clients"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, bool):
        _fail(name, "true, false or null", value)
    if not isinstance(self.stop_at_budget, bool):
      _fail("stop_at_budget", "true or false", self.stop_at_budget)
    if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
      _fail("seed", f"an integer in [0, {MAX_SEED}] (2**32 - 1)", self.seed)
    if self.max_failed_rounds is not None:
      positive_int("max_failed_rounds")
    for name in ("dataset_kwargs", "model_kwargs"):
      if not isinstance(getattr(self, name), dict):
        _fail(name, "a dict", getattr(self, name))
    # Last: it checks combinations with fields validated above.
    self._validate_rounds_per_call()

  def _validate_clipping(self) -> None:
    if self.per_layer_clipping not in (None, "uniform", "size_proportional"):
      _fail("per_layer_clipping", "null, 'uniform' or 'size_proportional'",
            self.per_layer_clipping)
    if not isinstance(self.adaptive_clipping, bool):
      _fail("adaptive_clipping", "true or false", self.adaptive_clipping)
    if not 0 < self.target_unclipped_quantile < 1:
      _fail("target_unclipped_quantile", "in (0, 1)",
            self.target_unclipped_quantile)
    _check_positive_finite(self, "clip_learning_rate")
    _check_positive_finite(self, "clip_count_stddev", "None")
    if self.adaptive_clipping and math.isinf(self.clip_norm):
      _fail("clip_norm", "finite with adaptive_clipping (it is the initial "
            "clip)", self.clip_norm)

  def _validate_placement(self) -> None:
    if self.secagg_bits is not None:
      if not _is_int(self.secagg_bits) or not 2 <= self.secagg_bits <= 32:
        _fail("secagg_bits", "an integer in [2, 32]", self.secagg_bits)
      if math.isinf(self.clip_norm):
        _fail("clip_norm", "finite with secure aggregation's fixed-point "
              "encoding", self.clip_norm)
      if self.accountant != "rdp":
        _fail("accountant", "'rdp' with secagg_bits (the distributed discrete "
              "Gaussian is accounted as zCDP)", self.accountant)
      if self.noise_multiplier is None:
        _fail("noise_multiplier", "a number with secagg_bits (calibration to "
              "a target epsilon is not offered for it)", None)
    if self.min_participants is not None:
      if not _is_int(self.min_participants) or self.min_participants < 1:
        _fail("min_participants", "an integer >= 1 (or null)",
              self.min_participants)
    if self.secagg_scale is not None:
      if self.secagg_bits is None:
        _fail("secagg_scale", "null unless secagg_bits is set",
              self.secagg_scale)
      _check_positive_finite(self, "secagg_scale", "null")

  def _validate_tree(self) -> None:
    for name in ("tree_restart_every", "min_separation", "mf_bands"):
      value = getattr(self, name)
      if value is not None and (not _is_int(value) or value < 1):
        _fail(name, "an integer >= 1 (or null)", value)
    if not _is_int(self.blt_buffers) or not 1 <= self.blt_buffers <= 15:
      _fail("blt_buffers", "an integer in [1, 15]", self.blt_buffers)

  def _validate_example_dp(self) -> None:
    if self.example_clip_norm is not None and not (
        isinstance(self.example_clip_norm, (int, float))
        and self.example_clip_norm > 0):
      _fail("example_clip_norm", "a number > 0 (inf: no clipping) or null",
            self.example_clip_norm)
    z = self.example_noise_multiplier
    if not (isinstance(z, (int, float)) and 0 <= z < math.inf):
      _fail("example_noise_multiplier", "a finite number >= 0", z)
    if z > 0 and (self.example_clip_norm is None
                  or math.isinf(self.example_clip_norm)):
      _fail("example_clip_norm", "a finite number > 0 when "
            "example_noise_multiplier > 0", self.example_clip_norm)

  def _validate_rounds_per_call(self) -> None:
    v = self.rounds_per_call
    if not _is_int(v) or v < 1:
      _fail("rounds_per_call", "an integer >= 1", v)
    from fedjax_dp.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
    refused = plan_lib.refusal(self, "rounds_per_call") if v > 1 else None
    if refused is not None:
      raise refused.error(self)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown config fields: {sorted(unknown)}")
    return cls(**d)


# What `--smoke` means for every command: an experiment's small variant,
# which for the built-in default is this many rounds (evaluated at the end).
SMOKE_ROUNDS = 3


def default_smoke_config() -> Config:
  """The default experiment's smoke variant (`--smoke` without --config)."""
  return Config().replace(name=Config().name + "_smoke", rounds=SMOKE_ROUNDS,
                          eval_every=SMOKE_ROUNDS)


def _parse_value(name: str, raw: str) -> Any:
  """The value of field `name` written as `raw` on a command line."""
  value = _parse_json(raw)
  hint = typing.get_type_hints(Config)[name]
  kinds = typing.get_args(hint) + (hint,)
  if float in kinds and _is_int(value):
    value = float(value)
  elif (int in kinds and float not in kinds and isinstance(value, float)
        and value.is_integer()):
    value = int(value)  # rounds=1e6
  return value


def parse_overrides(config: Config, assignments) -> Config:
  """Applies 'field=value' overrides together, validating the result once.

  Applied together, a config can be switched between fields that must change
  at once (e.g. noise_multiplier=null with target_epsilon=3). JSON syntax is
  accepted for values (numbers, null, true/false, {...}); a bare word is
  taken as a string. 'inf' is accepted for floats. A later assignment of the
  same field wins.

  Dict fields (`dataset_kwargs`, `model_kwargs`): `field.key=value` sets one
  key and keeps the others (the config's, and earlier overrides');
  `field={...}` replaces the whole dict.

  Raises:
    ValueError: a malformed assignment, an unknown field, or an invalid
      resulting config (naming the field).
  """
  fields = {f.name for f in dataclasses.fields(Config)}
  changes = {}
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(f"override {assignment!r} must look like field=value")
    name, raw = assignment.split("=", 1)
    name, _, key = name.strip().replace("-", "_").partition(".")
    if name not in fields:
      raise ValueError(
          f"unknown config field {name!r}; fields are {sorted(fields)}")
    if not key:
      changes[name] = _parse_value(name, raw)
      continue
    merged = changes.get(name, getattr(config, name))
    if not isinstance(merged, dict):
      raise ValueError(
          f"override {assignment!r}: config field {name!r} is not a dict, so "
          f"it has no key {key!r}; set it as {name}=value")
    changes[name] = {**merged, key: _parse_json(raw)}
  return config.replace(**changes) if changes else config


def _parse_json(raw: str) -> Any:
  """A value written on a command line: JSON, or else a bare string."""
  raw = raw.strip()
  if raw.lower() in ("inf", "+inf", "infinity"):
    return math.inf
  if raw.lower() in ("none", "null"):
    return None
  try:
    return json.loads(raw)
  except json.JSONDecodeError:
    return raw


def parse_override(config: Config, assignment: str) -> Config:
  """Applies one 'field=value' override (see `parse_overrides`)."""
  return parse_overrides(config, [assignment])
