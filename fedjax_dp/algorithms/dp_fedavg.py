"""DP-FedAvg: one round as one compiled program over the whole cohort.

    clients (vmapped in chunks, scanned over chunks): local training -> delta
    -> clip to C -> masked sum (float32) -> + N(0, (z C)^2) -> / public
    denominator -> server optimizer step.

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
from fedjax_dp import streams
from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.privacy import tree_aggregation
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


def chunk_rows(tree, index, size: int):
  """Rows [index * size, (index + 1) * size) of every leaf.

  The scan over chunks runs over chunk *indices* and slices the block inside
  the body: scanning over the block reshaped into chunks made XLA copy the
  whole block into the loop, so memory grew with the cohort
  (docs/benchmarks.md, workload C).
  """
  return jax.tree_util.tree_map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, index * size, size), tree)


def active_chunks(client_mask: jax.Array, size: int):
  """(order, count): chunk indices, those holding a valid client first (in
  block order), and how many hold one.

  Rounds loop over `order[:count]` only, with a dynamic trip count, instead
  of a `lax.cond` per chunk (a cond copied its outputs on every chunk on
  XLA:CPU). Skipping changes nothing that is released: a chunk without a
  valid client adds zero to the clipped sum.
  """
  active = jnp.any(client_mask.reshape(-1, size), axis=1)
  order = jnp.argsort(jnp.logical_not(active), stable=True)
  return order, jnp.sum(active.astype(jnp.int32))


def _unrolled_map(fn, in_axes):
  """Like `jax.vmap(fn, in_axes)` over a short leading axis, but traces one
  independent copy of `fn` per element and stacks the results.

  XLA:CPU runs independent copies concurrently on its cores, and each copy
  keeps its own unbatched operations: vmapping clients that hold their own
  weights turns their convolutions into grouped convolutions and their
  matrix products into small batched ones, both slow on CPU.
  """

  def mapped(*args):
    mapped_args = [x for x, axis in zip(args, in_axes) if axis == 0]
    size = jax.tree_util.tree_leaves(mapped_args)[0].shape[0]
    outs = [fn(*(jax.tree_util.tree_map(lambda a: a[i], x) if ax == 0 else x
                 for x, ax in zip(args, in_axes)))
            for i in range(size)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

  return mapped


def _make_clipped_client(model, client_optimizer_fn,
                         privatizer: plan_lib.Privatizer, unroll_local_steps):
  """One slot's part of the round: local training (DP-SGD with record-level
  DP), the audit canary in its place, the privatizer's clip, and under
  client-side noise the slot's message."""
  example_dp = privatizer.example_dp
  if example_dp:
    client_update = client_lib.make_dp_sgd_client_update(
        model, client_optimizer_fn, plan_lib.noisy_batch_gradient,
        unroll=unroll_local_steps)
  else:
    client_update = client_lib.make_client_update(
        model, client_optimizer_fn, unroll=unroll_local_steps)

  def clipped_client(params, features, example_mask, valid, canary_id,
                     slot_id, hparams, canaries, noise_key, secagg):
    if example_dp:
      key = jax.random.fold_in(
          jax.random.fold_in(noise_key, streams.EXAMPLE_NOISE), slot_id)
      out = client_update(params, features, example_mask, hparams.client_lr,
                          hparams.example_clip_norm,
                          hparams.example_noise_multiplier, key)
    else:
      out = client_update(params, features, example_mask, hparams.client_lr)
    delta = out.delta
    if canaries is not None:
      canary_delta = jax.tree_util.tree_map(
          lambda d: canaries.norm * d[jnp.maximum(canary_id, 0)],
          canaries.directions)
      delta = jax.tree_util.tree_map(
          lambda c, d: jnp.where(canary_id >= 0, c, d), canary_delta, delta)
    clip = privatizer.clip(delta, hparams.clip_norm)
    # A client whose update is NaN or Inf contributes nothing (it is excluded
    # by `where`, which also keeps NaN out of the sum). Whether to drop it
    # depends only on that client's own data, so the sum's sensitivity is
    # unchanged.
    finite = jnp.isfinite(clip.norm)
    msg, failures = None, jnp.zeros((), jnp.int32)
    if privatizer.sends_messages:
      key = jax.random.fold_in(
          jax.random.fold_in(noise_key, streams.CLIENT_NOISE), slot_id)
      msg, failures = privatizer.message(
          clip.clipped, valid, finite, key, hparams.noise_multiplier,
          hparams.clip_norm, hparams.min_participants, secagg)
    return clip, msg, failures, finite, out.loss, out.num_examples

  return clipped_client


def _make_block_sum(clipped_client, privatizer: plan_lib.Privatizer,
                    clients_per_chunk: int, vmap_clients: bool):
  """The sums of a block's clipped deltas and messages, chunk by chunk
  (vmapped, or independent copies per client), and per-client diagnostics."""
  separate = privatizer.sends_messages

  def clipped_sum_of(params, features, example_mask, client_mask, canary_ids,
                     slot_ids, hparams, canaries, noise_key, secagg):
    num_clients = client_mask.shape[0]
    if num_clients % clients_per_chunk:
      raise ValueError(
          f"block holds {num_clients} clients (per device), not a multiple "
          f"of clients_per_chunk={clients_per_chunk}")
    block = (features, example_mask, client_mask, canary_ids, slot_ids)
    batch = jax.vmap if vmap_clients else _unrolled_map
    vmapped = batch(
        clipped_client,
        in_axes=(None, 0, 0, 0, 0, 0, None, None, None, None))
    zeros = tree_util.tree_zeros_like(params)
    msg_zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, privatizer.message_dtype), params)
    init = (zeros, msg_zeros if separate else None, jnp.zeros((), jnp.int32))

    def train_chunk(i, carry):
      sums, per_client = carry
      index = order[i]
      features, example_mask, valid, ids, slots = chunk_rows(
          block, index, clients_per_chunk)
      clip, msgs, fails, finite, loss, n = vmapped(
          params, features, example_mask, valid, ids, slots, hparams,
          canaries, noise_key, secagg)
      # uint32 message sums wrap around: the modular sum of secure
      # aggregation.
      chunk_sums = (tree_util.masked_sum(clip.clipped, valid & finite),
                    tree_util.masked_sum(msgs, None) if separate else None,
                    jnp.sum(fails))
      outputs = (clip.norm, clip.was_clipped, valid & ~finite, loss, n)
      sums = jax.tree_util.tree_map(jnp.add, sums, chunk_sums)
      per_client = jax.tree_util.tree_map(
          lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
              acc, x, index * clients_per_chunk, 0), per_client, outputs)
      return sums, per_client

    # Only chunks holding a valid client are trained (their per-client
    # outputs stay zero). Padding slots send nothing under any placement,
    # so skipping their chunks changes nothing.
    order, num_active = active_chunks(client_mask, clients_per_chunk)
    per_client = (jnp.zeros((num_clients,), jnp.float32),
                  jnp.zeros((num_clients,), bool),
                  jnp.zeros((num_clients,), bool),
                  jnp.zeros((num_clients,), jnp.float32),
                  jnp.zeros((num_clients,), jnp.int32))
    return jax.lax.fori_loop(0, num_active, train_chunk, (init, per_client))

  return clipped_sum_of


def build_round(
    model: types.Model,
    client_optimizer_fn: client_lib.ClientOptimizerFn,
    server_optimizer: optax.GradientTransformation,
    privatizer: plan_lib.Privatizer = plan_lib.Privatizer(),
    *,
    clients_per_chunk: int = 1,
    vmap_clients: bool = True,
    unroll_local_steps: int | bool = 1,
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
      client-side noise, how the sum is noised, and whether each client runs
      record-level DP-SGD. Default: central Gaussian noise.
    clients_per_chunk: clients vmapped together; chunks are scanned over and
      their clipped deltas accumulated, so memory grows with the chunk, not
      the cohort. The block's client count must be a multiple of it.
    vmap_clients: True vmaps a chunk's clients into one batched computation
      (accelerators). False traces an independent copy of the client update
      per client of the chunk: XLA:CPU runs them concurrently on its cores
      and keeps each client's convolutions and products unbatched, which is
      the fast shape on CPU (docs/benchmarks.md). Results are equal.
    unroll_local_steps: unroll factor of the local-step scan.
    mesh: optional device mesh with a "clients" axis: the cohort's client
      axis is sharded over it (each device's share must be a multiple of
      `clients_per_chunk`); multi-host meshes work the same way after
      `jax.distributed.initialize()`.

  Returns:
    `round_fn(state, block, hparams, noise_key, canaries=None,
    adaptive=None, secagg=None, tree=None) -> (new_state, metrics)`;
    secure aggregation needs `secagg` and DP-FTRL its tree state.
  """
  clipped_client = _make_clipped_client(model, client_optimizer_fn,
                                        privatizer, unroll_local_steps)
  clipped_sum_of = _make_block_sum(clipped_client, privatizer,
                                   clients_per_chunk, vmap_clients)

  def round_fn(state: server_lib.ServerState, block: blocks.ClientBlock,
               hparams: RoundHparams, noise_key: types.PRNGKey,
               canaries: Canaries | None = None,
               adaptive: adaptive_clipping.AdaptiveClipHparams | None = None,
               secagg: secure_aggregation.SecAggParams | None = None,
               tree: tree_aggregation.TreeState | None = None):
    if privatizer.secure_aggregation and secagg is None:
      raise ValueError("this round simulates secure aggregation: pass secagg")
    if privatizer.restart_every is not None and tree is None:
      raise ValueError("the tree mechanism needs the round's tree state")
    params = state.params
    num_clients = block.client_mask.shape[0]
    canary_ids = (canaries.ids if canaries is not None else
                  jnp.full((num_clients,), -1, jnp.int32))
    if canaries is not None:
      canaries = canaries._replace(ids=None)  # travels as canary_ids
    # Block-wide slot numbers: per-slot noise keys differ across chunks and
    # devices.
    slot_ids = jnp.arange(num_clients, dtype=jnp.int32)
    args = (params, block.features, block.example_mask, block.client_mask,
            canary_ids, slot_ids, hparams, canaries, noise_key, secagg)
    if mesh is None:
      sums, per_client = clipped_sum_of(*args)
    else:
      # Each device sums the messages of its share of the cohort; one
      # reduction across devices gives the same sums (uint32 wraps, like the
      # modular sum), and central noise is added once, after it.
      def sharded(*args):
        local_sums, local_clients = clipped_sum_of(*args)
        return jax.lax.psum(local_sums, CLIENTS_AXIS), local_clients

      by_client, replicated = P(CLIENTS_AXIS), P()
      # The block's arrays are split by client; the rest is replicated.
      in_specs = tuple(
          by_client if name in _PER_CLIENT_ARGS else replicated
          for name in _ROUND_ARGS)
      # check_vma=False: the scan's zero carry starts replicated and becomes
      # per-device; the psum makes the result replicated again.
      sums, per_client = jax.shard_map(
          sharded, mesh=mesh, in_specs=in_specs,
          out_specs=(replicated, by_client), check_vma=False)(*args)
    clipped_sum, message_sum, failures = sums
    participants = jnp.sum(block.client_mask.astype(jnp.int32))
    new_state, metrics = noise_and_step(
        state, clipped_sum, per_client, block.client_mask, hparams, noise_key,
        server_optimizer, privatizer, canaries, adaptive,
        message_sum=message_sum, failures=failures, tree=tree, secagg=secagg)
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
    tree: tree_aggregation.TreeState | None = None,
    secagg: secure_aggregation.SecAggParams | None = None,
) -> tuple[server_lib.ServerState, dict]:
  """The second half of every round shape: noise, average, server step.

  Privacy: the privatizer releases the sum (`Privatizer.release`: central
  noise added once to the sum of clipped deltas, or the sum of the clients'
  noisy messages), which is divided by the public denominator. With adaptive
  clipping the round also releases the noisy count of unclipped clients
  (privacy/adaptive_clipping.py).

  Args:
    state: server state before the round.
    clipped_sum: float32 sum of the valid clients' clipped deltas (before any
      noise; diagnostics only under client-side noise).
    per_client: (pre-clip norms, was clipped, non-finite, train loss,
      examples), each [clients].
    client_mask: bool [clients], the block's valid slots.
    hparams: the round's hyperparameters.
    noise_key: the round's noise key.
    server_optimizer: optax optimizer with an injectable learning rate.
    privatizer: the round's privacy steps (`PrivacyPlan.privatizer`).
    canaries: audit canaries in this round, if any.
    adaptive: adaptive clipping's arguments, if enabled.
    message_sum: the sum of the clients' messages under client-side noise.
    failures: secure aggregation's discrete Gaussian sampler failures.
    tree: the tree state before this round (DP-FTRL).
    secagg: secure aggregation's parameters, if simulated.

  Returns:
    (new server state, metrics).
  """
  norms, was_clipped, nonfinite, client_loss, num_examples = per_client
  valid = client_mask & ~nonfinite
  num_valid = jnp.sum(valid.astype(jnp.int32))
  # Client-side noise comes from every participant, finite or not.
  stddev = privatizer.noise_stddev_of_sum(
      hparams.noise_multiplier, hparams.clip_norm, hparams.min_participants,
      jnp.sum(client_mask.astype(jnp.int32)))
  noisy_sum, release_metrics = privatizer.release(
      clipped_sum, message_sum, failures, stddev, hparams.noise_multiplier,
      hparams.clip_norm, noise_key, tree, secagg)
  average = tree_util.tree_scale(noisy_sum, 1.0 / hparams.denominator)
  new_state = server_lib.step(state, average, hparams.server_lr,
                              server_optimizer)

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
  }
  if adaptive is not None:
    # Andrew et al. 2021: release the noisy count of unclipped clients and
    # move the clip norm for the next round (hparams.noise_multiplier is
    # already the update's share z_delta of the budget).
    next_clip, clip_out = adaptive_clipping.update(
        adaptive_clipping.AdaptiveClipState(
            hparams.clip_norm,
            jax.random.fold_in(noise_key, streams.COUNT_NOISE)),
        ~was_clipped, valid, adaptive)
    metrics["unclipped_fraction_noisy"] = clip_out.unclipped_fraction
    metrics["next_clip_norm"] = next_clip.clip_norm
  if canaries is not None:
    # For the all-iterates audit: how well each canary shows in this round's
    # released update.
    metrics["canary_cosines"] = audit.cosines(canaries.directions, average)
  return new_state, metrics
