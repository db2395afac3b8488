"""DP-FedAvg: one round as one compiled program over the whole cohort.

    clients (in chunks, on each device's share of the cohort): local
    training -> delta -> clip to C -> masked sum (float32) -> [sum over
    devices] -> + noise (the privatizer's) -> / public denominator ->
    server optimizer step, the mechanism's state moved along.

The block's clipped sum comes from one of two backends, chosen by the
execution layout: every client with its own copy of the weights
(per_client.py), or the factored form of dense layers (factored.py). What
follows the sum is the same for both.

Hyperparameters that sweeps vary (learning rates, clip norm, noise
multiplier, the denominator) are array arguments, never static, so one
compilation serves every value and a sweep can vmap over them.

Privacy: see `fedjax_dp/privacy/`. The round adds noise once, to the sum of
clipped deltas of the clients whose slot is valid; padded slots contribute
exactly zero (selected away, not multiplied). The denominator must be a public
constant (the sampler's expected cohort size), never the realised count.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from fedjax_dp import audit
from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.algorithms import factored as factored_lib
from fedjax_dp.algorithms import per_client
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.data import blocks


class RoundHparams(NamedTuple):
  """Per-round hyperparameters, all float32 scalars (sweepable)."""

  client_lr: jax.Array
  server_lr: jax.Array
  clip_norm: jax.Array
  noise_multiplier: jax.Array
  # Public constant the noisy sum is divided by (expected cohort size).
  denominator: jax.Array
  # Record-level DP-SGD inside each client (used with example_dp only).
  example_clip_norm: jax.Array
  example_noise_multiplier: jax.Array
  # Distributed noise: the public minimum number of participants n_min that
  # shares are sized for; a round with fewer participants is aborted.
  min_participants: jax.Array

  @classmethod
  def create(cls, *, client_lr, server_lr, clip_norm, noise_multiplier,
             denominator, example_clip_norm=float("inf"),
             example_noise_multiplier=0.0,
             min_participants=1.0) -> "RoundHparams":
    f = lambda v: jnp.asarray(v, jnp.float32)
    return cls(f(client_lr), f(server_lr), f(clip_norm), f(noise_multiplier),
               f(denominator), f(example_clip_norm),
               f(example_noise_multiplier), f(min_participants))


CLIENTS_AXIS = "clients"

# The arguments of the round's per-device sum, by name; those split by
# client under a mesh (the rest is replicated to every device).
_ROUND_ARGS = ("params", "features", "example_mask", "client_mask",
               "canary_ids", "slot_ids", "hparams", "canaries", "noise_key",
               "secagg")
_PER_CLIENT_ARGS = frozenset(
    ("features", "example_mask", "client_mask", "canary_ids", "slot_ids"))


def client_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all, across hosts) for the cohort."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (CLIENTS_AXIS,))


class Canaries(NamedTuple):
  """Audit canaries (Andrew et al. 2024) sampled into the round like clients.

  A slot whose id is >= 0 holds canary `id`: instead of training, it submits
  `norm * directions[id]`, which clipping cuts to norm C like any client.
  """

  directions: types.Params  # leading axis: canary
  ids: jax.Array  # int32 [clients]; -1 for real clients and padding
  norm: jax.Array  # float32 scalar, well above the clip norm


def build_round(
    model: types.Model,
    client_optimizer_fn: client_lib.ClientOptimizerFn,
    server_optimizer: optax.GradientTransformation,
    privatizer: plan_lib.Privatizer = plan_lib.Privatizer(),
    *,
    clients_per_chunk: int | None = None,
    vmap_clients: bool = True,
    unroll_local_steps: int | bool = 1,
    factored: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[..., tuple[server_lib.ServerState, dict]]:
  """Builds the (unjitted) round function.

  Args:
    model: pure init/apply model.
    client_optimizer_fn: learning rate -> optax optimizer for local steps.
    server_optimizer: optax optimizer with injectable learning_rate (see
      server.server_optimizer).
    privatizer: the privacy steps of the round, from the run's privacy plan
      (privacy/plan.py): how each update is clipped, what clients send under
      client-side noise, how the sum is noised, what state the mechanism
      carries, and whether each client runs record-level DP-SGD. Default:
      central Gaussian noise.
    clients_per_chunk: clients computed together; chunks are looped over
      and their clipped deltas accumulated, so memory grows with the chunk,
      not the cohort. The per-client backend needs the block's client count
      to be a multiple of it (None: 1); the factored one takes any (None:
      sized from the block, dense models only).
    vmap_clients: True vmaps a chunk's clients into one batched computation
      (accelerators). False traces an independent copy of the client update
      per client of the chunk: XLA:CPU runs them concurrently on its cores
      and keeps each client's convolutions and products unbatched, which is
      the fast shape on CPU (docs/benchmarks.md). Results are equal.
    unroll_local_steps: unroll factor of the local-step scan.
    factored: compute the clipped sum with the factored backend
      (factored.py: dense models and the McMahan CNN, plain client SGD,
      one device); the release is the same up to float32 rounding.
    mesh: optional device mesh with a "clients" axis: the cohort's client
      axis is sharded over it (each device's share must be a multiple of
      `clients_per_chunk`); multi-host meshes work the same way after
      `jax.distributed.initialize()`.

  Returns:
    `round_fn(state, block, hparams, noise_key, canaries=None,
    adaptive=None, secagg=None) -> (new_state, metrics)`. A mechanism that
    carries state (adaptive clipping's clip norm, DP-FTRL's tree) finds it
    in `state.privacy` (the plan's `initial_state` before round 0) and
    returns it moved; adaptive clipping needs `adaptive` and secure
    aggregation `secagg`.
  """
  backend = factored_lib if factored else per_client
  if factored and mesh is not None:
    raise ValueError("the factored round runs on one device (mesh=None)")
  block_sum = backend.make_block_sum(
      model, client_optimizer_fn, privatizer,
      clients_per_chunk=(clients_per_chunk if factored
                         else clients_per_chunk or 1),
      vmap_clients=vmap_clients,
      unroll_local_steps=unroll_local_steps)

  def round_fn(state: server_lib.ServerState, block: blocks.ClientBlock,
               hparams: RoundHparams, noise_key: types.PRNGKey,
               canaries: Canaries | None = None,
               adaptive: adaptive_clipping.AdaptiveClipHparams | None = None,
               secagg: secure_aggregation.SecAggParams | None = None):
    if privatizer.secure_aggregation and secagg is None:
      raise ValueError("this round simulates secure aggregation: pass secagg")
    hparams = hparams._replace(clip_norm=privatizer.round_clip_norm(
        state.privacy, hparams.clip_norm))
    num_clients = block.client_mask.shape[0]
    canary_ids = (canaries.ids if canaries is not None else
                  jnp.full((num_clients,), -1, jnp.int32))
    if canaries is not None:
      canaries = canaries._replace(ids=None)  # travels as canary_ids
    # Block-wide slot numbers: per-slot noise keys differ across chunks and
    # devices.
    slot_ids = jnp.arange(num_clients, dtype=jnp.int32)
    args = (state.params, block.features, block.example_mask,
            block.client_mask, canary_ids, slot_ids, hparams, canaries,
            noise_key, secagg)
    if mesh is None:
      sums, per_client_out = block_sum(*args)
    else:
      # Each device sums the messages of its share of the cohort; one
      # reduction across devices gives the same sums (uint32 wraps, like the
      # modular sum), and central noise is added once, after it.
      def sharded(*args):
        local_sums, local_clients = block_sum(*args)
        return jax.lax.psum(local_sums, CLIENTS_AXIS), local_clients

      by_client, replicated = P(CLIENTS_AXIS), P()
      # The block's arrays are split by client; the rest is replicated.
      in_specs = tuple(
          by_client if name in _PER_CLIENT_ARGS else replicated
          for name in _ROUND_ARGS)
      # check_vma=False: the scan's zero carry starts replicated and becomes
      # per-device; the psum makes the result replicated again.
      sums, per_client_out = jax.shard_map(
          sharded, mesh=mesh, in_specs=in_specs,
          out_specs=(replicated, by_client), check_vma=False)(*args)
    clipped_sum, message_sum, failures = sums
    participants = jnp.sum(block.client_mask.astype(jnp.int32))
    new_state, metrics = noise_and_step(
        state, clipped_sum, per_client_out, block.client_mask, hparams,
        noise_key, server_optimizer, privatizer, canaries, adaptive,
        message_sum=message_sum, failures=failures, secagg=secagg)
    aborted = privatizer.aborted(participants, hparams.min_participants)
    if aborted is not None:
      # Fewer participants than the public minimum the shares are sized for:
      # the aggregation aborts and nothing is released (the state, and so the
      # model, does not move).
      new_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(aborted, old, new), new_state, state)
      metrics["num_participants"] = participants
      metrics["aggregation_aborted"] = aborted
    return new_state, metrics

  return round_fn


def noise_and_step(
    state: server_lib.ServerState,
    clipped_sum: types.Params,
    per_client: tuple,
    client_mask: jax.Array,
    hparams: RoundHparams,
    noise_key: types.PRNGKey,
    server_optimizer: optax.GradientTransformation,
    privatizer: plan_lib.Privatizer,
    canaries: "Canaries | None" = None,
    adaptive: adaptive_clipping.AdaptiveClipHparams | None = None,
    *,
    message_sum: types.Params | None = None,
    failures: jax.Array | None = None,
    secagg: secure_aggregation.SecAggParams | None = None,
) -> tuple[server_lib.ServerState, dict]:
  """The second half of the round: noise, average, server step.

  Privacy: the privatizer releases the sum (`Privatizer.release`: central
  noise added once to the sum of clipped deltas, or the sum of the clients'
  noisy messages), which is divided by the public denominator. With adaptive
  clipping the round also releases the noisy count of unclipped clients
  (`Privatizer.move_clip`).

  Args:
    state: server state before the round (its `privacy` field: the
      mechanism's state).
    clipped_sum: float32 sum of the valid clients' clipped deltas (before any
      noise; diagnostics only under client-side noise).
    per_client: (pre-clip norms, was clipped, non-finite, train loss,
      examples), each [clients].
    client_mask: bool [clients], the block's valid slots.
    hparams: the round's hyperparameters (clip norm: the one this round
      clipped with).
    noise_key: the round's noise key.
    server_optimizer: optax optimizer with an injectable learning rate.
    privatizer: the round's privacy steps (`PrivacyPlan.privatizer`).
    canaries: audit canaries in this round, if any.
    adaptive: adaptive clipping's arguments, if enabled.
    message_sum: the sum of the clients' messages under client-side noise.
    failures: secure aggregation's discrete Gaussian sampler failures.
    secagg: secure aggregation's parameters, if simulated.

  Returns:
    (new server state, with the mechanism's state moved, metrics).
  """
  norms, was_clipped, nonfinite, client_loss, num_examples = per_client
  valid = client_mask & ~nonfinite
  num_valid = jnp.sum(valid.astype(jnp.int32))
  # Client-side noise comes from every participant, finite or not.
  stddev = privatizer.noise_stddev_of_sum(
      hparams.noise_multiplier, hparams.clip_norm, hparams.min_participants,
      jnp.sum(client_mask.astype(jnp.int32)))
  noisy_sum, privacy, release_metrics = privatizer.release(
      clipped_sum, message_sum, failures, stddev, hparams.noise_multiplier,
      hparams.clip_norm, noise_key, state.privacy, secagg)
  privacy, clip_metrics = privatizer.move_clip(privacy, was_clipped, valid,
                                               adaptive, noise_key)
  average = tree_util.tree_scale(noisy_sum, 1.0 / hparams.denominator)
  new_state = server_lib.step(state, average, hparams.server_lr,
                              server_optimizer)._replace(privacy=privacy)

  denom = jnp.maximum(num_valid, 1).astype(jnp.float32)
  masked_norms = jnp.where(valid, norms, jnp.nan)
  metrics = {
      "num_clients": num_valid,
      "num_nonfinite": jnp.sum(nonfinite.astype(jnp.int32)),
      # Means over the valid clients; NaN for a round without one (never a
      # made-up 0).
      "train_loss": jnp.where(
          num_valid > 0, jnp.sum(jnp.where(valid, client_loss, 0.0)) / denom,
          jnp.nan),
      "fraction_clipped": jnp.where(
          num_valid > 0, jnp.sum(valid & was_clipped) / denom, jnp.nan),
      "update_norm_p10": jnp.nanpercentile(masked_norms, 10),
      "update_norm_p50": jnp.nanpercentile(masked_norms, 50),
      "update_norm_p90": jnp.nanpercentile(masked_norms, 90),
      "update_norm_max": jnp.nanmax(masked_norms),
      "clipped_sum_norm": tree_util.global_l2_norm(clipped_sum),
      "noise_stddev": stddev,
      "num_examples": jnp.sum(jnp.where(valid, num_examples, 0)),
      # Norm of the clipped sum over the expected norm of the noise.
      "signal_to_noise": tree_util.global_l2_norm(clipped_sum) / (
          stddev * jnp.sqrt(float(tree_util.tree_size(clipped_sum)))),
      **release_metrics,
      **clip_metrics,
  }
  if canaries is not None:
    # For the all-iterates audit: how well each canary shows in this round's
    # released update.
    metrics["canary_cosines"] = audit.cosines(canaries.directions, average)
  return new_state, metrics
