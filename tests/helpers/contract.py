"""The privacy contract's harness: every round variant x every mechanism.

A `Case` builds one configuration of the simulator through the public
pieces a run uses (`simulation.build` with an in-memory dataset, the
Simulation's own round function, hyperparameters, streams and mechanism
arguments) and measures what one round *releases*: the noisy sum of the
cohort's clipped updates before the division by the public denominator,
read off the server step (SGD, learning rate 1: new params - old params =
release / denominator).

Round variants (`VARIANTS`): the plain round one client at a time, vmapped
chunks, independent (unrolled) chunks, the factored round of a dense model
and of the McMahan CNN, the round sharded over simulated CPU devices, the
on-device multi-round loop and vmapped sweep lanes. Mechanisms
(`MECHANISMS`): central Gaussian, Laplace, adaptive clipping, per-layer
clipping, local, distributed, secure aggregation, DP-FTRL, record-level
DP-SGD, BandMF and BLT (under a cyclic participation schema). What a variant does not run is listed once, in `UNSUPPORTED`, with
the library's reason; the suite checks that the library refuses exactly
those.

Worst-case clients (`fedjax_dp.worst_case`): cancelling gradients, inputs
of 1e3..1e30, NaN, Inf and 3e38 in an example, empty clients; the cohort
puts one at the first slot and one further in, between ordinary clients,
with padding slots after them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp import worst_case
from fedjax_dp import simulation
from fedjax_dp import sweep
from fedjax_dp import on_device
from fedjax_dp.data import blocks
from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import population as population_lib

INPUT_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
# Every client holds at most BATCH examples and trains one epoch: one local
# step, so the round's block has one shape for every cohort below.
BATCH = 10
CLIP = 0.5
POPULATION = 12
SLOTS = 8

# Layout settings per round variant (config fields), and the model.
VARIANTS = {
    "plain": ("mlp_2nn", dict(round_shape="plain", clients_per_chunk=1,
                              vmap_clients=True)),
    "vmapped_chunks": ("mlp_2nn", dict(round_shape="plain",
                                       clients_per_chunk=4,
                                       vmap_clients=True)),
    "independent_chunks": ("cnn", dict(round_shape="plain",
                                       clients_per_chunk=2,
                                       vmap_clients=False,
                                       unroll_local_steps=True)),
    "factored_dense": ("mlp_2nn", dict(round_shape="factored")),
    "factored_cnn": ("cnn", dict(round_shape="factored", clients_per_chunk=2,
                                 vmap_clients=False)),
    # Run in a subprocess with 4 simulated CPU devices (contract_sharded.py).
    "sharded": ("mlp_2nn", dict(round_shape="plain", clients_per_chunk=1,
                                shard_clients=True)),
    "on_device": ("mlp_2nn", dict(rounds_per_call=2)),
    "sweep_lanes": ("mlp_2nn", dict(round_shape="auto")),
}

MECHANISMS = dict(
    worst_case.MECHANISMS,
    # A block as large as the population: never truncated, so the event is
    # the sampled Laplace (a truncating block is accounted unamplified).
    laplace=dict(mechanism="laplace", capacity=None))

# (variant, mechanism) -> why the library refuses it. The one list; the
# suite checks that building exactly these raises ValueError.
UNSUPPORTED = {
    **{(variant, m): "the factored round covers central noise after "
       "whole-update L2 clipping, without record-level DP"
       for variant in ("factored_dense", "factored_cnn")
       for m in ("laplace", "per_layer", "local", "distributed", "secagg",
                 "dp_sgd")},
}

KINDS = worst_case.KINDS


def fresh_draw(plan, release_0: np.ndarray,
               release_1: np.ndarray) -> np.ndarray:
  """Round 1's own noise draw from the releases of rounds 0 and 1: the
  release itself, or under matrix-factorization noise (correlated by
  construction, w = C^{-1} z) z_1 = c_0 w_1 + c_1 w_0, which must be
  independent of round 0's."""
  if plan.strategy is None or not hasattr(plan.strategy, "strategy_coefs"):
    return release_1
  c0, c1 = plan.strategy.strategy_coefs(2)
  return c0 * release_1 + c1 * release_0


def client_data(kind: str, rng: np.random.Generator, size: int = 6) -> dict:
  """One client of a worst-case kind (`worst_case.client`) for digits-shaped
  data."""
  return worst_case.client(kind, rng, size, INPUT_SHAPE, NUM_CLASSES)


def cohort(kind: str, seed: int = 0) -> list[dict]:
  """Six clients: `kind` first and fourth, ordinary ones of various sizes
  between and after them, an empty one last."""
  rng = np.random.default_rng(seed)
  return [client_data(kind, rng), client_data("ordinary", rng, 3),
          client_data("ordinary", rng, 10), client_data(kind, rng),
          client_data("ordinary", rng, 1), client_data("empty", rng)]


def ordinary_population(seed: int = 0, size: int = POPULATION) -> list[dict]:
  """Ordinary clients of 1..BATCH examples (the first holds BATCH)."""
  rng = np.random.default_rng(seed)
  return [client_data("ordinary", rng,
                      BATCH if i == 0 else int(rng.integers(1, BATCH + 1)))
          for i in range(size)]


def device_population_clients(kind: str, seed: int = 0) -> list[dict]:
  """The on-device variant's population: `cohort(kind)` first, then
  ordinary clients up to POPULATION."""
  clients = cohort(kind, seed)
  return clients + ordinary_population(seed + 1, POPULATION - len(clients))


def dataset_of(clients: list[dict]) -> dataset_lib.FederatedDataset:
  return worst_case.dataset(clients, INPUT_SHAPE, NUM_CLASSES, "contract")


def config_for(variant: str, mechanism: str, **changes) -> config_lib.Config:
  model, layout = VARIANTS[variant]
  base = config_lib.Config(
      name=f"contract-{variant}-{mechanism}", dataset="digits", model=model,
      model_kwargs={"hidden": (32, 16)} if model == "mlp_2nn" else {},
      rounds=4, sampling="poisson", sampling_probability=0.5,
      cohort_size=None, capacity=SLOTS, clip_norm=CLIP, noise_multiplier=0.0,
      delta=1e-5, server_optimizer="sgd", server_lr=1.0, client_lr=0.1,
      local_epochs=1, batch_size=BATCH, eval_every=100, seed=0)
  fields = {**layout, **MECHANISMS[mechanism]}
  if variant == "on_device" and fields.get("sampling") not in (
      "disjoint", "cyclic"):
    # Every client of the population takes part in every round.
    fields.update(sampling_probability=1.0, capacity=None)
  return base.replace(**{**fields, **changes})


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


state_for = worst_case.state_for
at_round = worst_case.at_round


class Case:
  """One (variant, mechanism) of the round, built as a run builds it."""

  def __init__(self, variant: str, mechanism: str, **changes):
    self.variant, self.mechanism = variant, mechanism
    self.config = config_for(variant, mechanism, **changes)
    self.sim = simulation.build(self.config,
                                dataset_of(ordinary_population()))
    self.slots = self.sim.slots
    self.streams = self.sim.streams()
    if variant == "on_device":
      self._multi_round = jax.jit(on_device.build_multi_round(self.sim),
                                  static_argnames="num_rounds")
    elif variant == "sweep_lanes":
      sweep.check_sweepable(self.config)
      # Two lanes of one seed: this clip norm and twice it, each with its
      # own privacy plan (as a sweep builds them).
      self.lane_configs = [self.config,
                           self.config.replace(clip_norm=2 * CLIP)]
      self.lane_sims = [
          dataclasses.replace(self.sim, plan=sweep._member_plan(  # pylint: disable=protected-access
              self.sim.plan, c, {})) for c in self.lane_configs]
      self._step = sweep._make_step(self.sim.round_fn(), [0])  # pylint: disable=protected-access
    else:
      self._round = jax.jit(self.sim.round_fn())

  # -- What the ledger assumes -------------------------------------------

  def contribution_bound(self, clip_norm: float = CLIP) -> tuple[int, float]:
    """(p, bound): the L_p norm of one client's contribution to the
    release that the ledger's event assumes is at most `bound`."""
    return worst_case.contribution_bound(self.sim, clip_norm)

  # -- Blocks --------------------------------------------------------------

  def block(self, clients: list[dict], valid=None, *, padding_fill=None,
            seed: int = 0) -> blocks.ClientBlock:
    """The block of a cohort (slot i holds clients[i]; `valid` masks slots),
    laid out by data.blocks.make_block as a run lays it out."""
    n = len(clients)
    population = population_lib.FederatedPopulation.from_client_arrays(
        [f"k{i}" for i in range(n)], clients)
    indices = np.zeros((self.slots,), np.int64)
    indices[:n] = np.arange(n)
    mask = np.arange(self.slots) < n
    # Laid out with every client present, then the slots outside `valid`
    # become padding: each client keeps its example order whoever else
    # takes part (the order changes float32 rounding, which for cancelling
    # clients is all of their update).
    made = blocks.make_block(
        population, indices, mask, batch_size=BATCH, epochs=1,
        num_steps=self.sim.num_steps, key=jax.random.key(seed))
    if valid is not None:
      mask[:n] = np.asarray(valid, bool)
      made = blocks.ClientBlock(
          {k: np.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)), v,
                       np.zeros((), v.dtype))
           for k, v in made.features.items()},
          made.example_mask & mask[:, None, None], mask)
    features = dict(made.features)
    if padding_fill is not None:
      # Whatever a block holds in padding must not matter (labels: an
      # index far out of range).
      def fill(v):
        garbage = (np.asarray(padding_fill, v.dtype)
                   if np.issubdtype(v.dtype, np.floating)
                   else np.asarray(2 ** 30, v.dtype))
        keep = made.example_mask.reshape(made.example_mask.shape + (1,) * (
            v.ndim - 3))
        return np.where(keep, v, garbage)
      features = {k: fill(v) for k, v in features.items()}
    return blocks.ClientBlock(features, made.example_mask, made.client_mask)

  # -- Releases ------------------------------------------------------------

  def _args(self):
    return (None, self.sim.plan.adaptive_hparams(),
            self.sim.plan.secagg_params())

  def state_at(self, round_index: int, state=None):
    """`state` (default: the initial one) with the mechanism's state of
    round `round_index` (DP-FTRL: the tree after that many rounds)."""
    state = self.sim.initial_state(0) if state is None else state
    return at_round(self.sim.plan, state, round_index)

  def release(self, block: blocks.ClientBlock, *, state=None,
              round_index: int = 0, hparams=None) -> np.ndarray:
    """The round's released sum (float64, flattened) for this block."""
    state = self.state_at(round_index, state)
    hparams = self.sim.hparams() if hparams is None else hparams
    key = jax.random.fold_in(self.streams.noise, round_index)
    new, _ = self._round(state, block, hparams, key, *self._args())
    return (flat(new.params) - flat(state.params)) * float(
        hparams.denominator)

  def release_and_metrics(self, block, *, state=None, round_index=0):
    state = self.state_at(round_index, state)
    hparams = self.sim.hparams()
    key = jax.random.fold_in(self.streams.noise, round_index)
    new, metrics = self._round(state, block, hparams, key, *self._args())
    release = (flat(new.params) - flat(state.params)) * float(
        hparams.denominator)
    return release, jax.device_get(metrics)

  def lane_releases(self, block: blocks.ClientBlock, *, state=None,
                    round_index: int = 0) -> list[np.ndarray]:
    """Sweep lanes: each lane's release, one vmapped step over the lanes."""
    lanes = self.lane_configs
    state = self.sim.initial_state(0) if state is None else state
    stack = lambda trees: jax.tree_util.tree_map(  # pylint: disable=g-long-lambda
        lambda *xs: jnp.stack(xs), *trees)
    hparams = [self.sim.hparams(c, self.sim.plan.noise_multiplier)
               for c in lanes]
    plans = [s.plan for s in self.lane_sims]
    keys = [simulation.stream_keys(c, self.sim.plan.noise_multiplier).noise
            for c in lanes]
    # Each lane's mechanism state from its own plan and noise key, as a
    # sweep starts it.
    states = stack([at_round(p, state._replace(
        privacy=p.initial_state(k, state.params)), round_index)
                    for p, k in zip(plans, keys)])
    adaptive = secagg = None
    if self.sim.plan.adaptive_clip:
      adaptive = stack([p.adaptive_hparams() for p in plans])
    if self.sim.plan.secagg is not None:
      secagg = stack([p.secagg_params() for p in plans])
    blocks_ = jax.tree_util.tree_map(lambda x: np.stack([x] * len(lanes)),
                                     block)
    new, _, _ = self._step(states, blocks_, stack(hparams), jnp.stack(keys),
                           round_index, jnp.ones((len(lanes),), bool),
                           adaptive, secagg)
    before = flat(state.params)
    return [(flat(jax.tree_util.tree_map(lambda x, i=i: x[i], new.params))
             - before) * float(hp.denominator)
            for i, hp in enumerate(hparams)]

  def device_release(self, clients: list[dict], keep=None, *, state=None,
                     round_index: int = 0) -> np.ndarray:
    """On-device rounds: the release of one round (one call of the
    multi-round program) over a population of these POPULATION clients;
    clients outside `keep` hold no examples (the zero-out neighbour)."""
    sim = dataclasses.replace(self.sim, dataset=dataset_of(clients))
    population = on_device.device_population(sim)
    if keep is not None:
      counts = np.asarray(population.counts)
      counts = np.where(np.asarray(keep, bool), counts, 0).astype(np.int32)
      population = population._replace(counts=jnp.asarray(counts))
    state = self.state_at(round_index, state)
    hparams = sim.hparams()
    keys = on_device.multi_round_keys(self.streams)
    new, _, _ = self._multi_round(
        state, hparams, population, keys, round_index, 1,
        sim.plan.adaptive_hparams(), sim.plan.secagg_params(), num_rounds=1)
    return (flat(new.params) - flat(state.params)) * float(
        hparams.denominator)


def norm(x: np.ndarray, p: float) -> float:
  return float(np.linalg.norm(x, ord=p))
