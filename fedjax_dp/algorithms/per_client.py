"""The round's per-client backend: every client trains its own copy.

Each slot of the block trains locally (plain SGD or another optax
optimizer; record-level DP-SGD under example-level DP), is replaced by its
audit canary where it holds one, is clipped by the privatizer and, under
client-side noise, forms its noisy message. Chunks of clients are vmapped
(accelerators) or traced as independent copies (XLA:CPU) and their sums
accumulated, so memory grows with the chunk, not the cohort.

`dp_fedavg.build_round` adds the rest of the round (sharding, noise, the
server step); factored.py is the other backend, for models whose clients
share enough to compute the same sums with large shared products.

Privacy: every valid slot's clipped update has norm <= C (L2, or L1 for
Laplace); padded slots and clients whose update is NaN or Inf are selected
away (`jnp.where`, never multiplied), so they add exactly zero to the sum,
and whether a client is dropped depends only on its own data.
"""

import jax
import jax.numpy as jnp

from fedjax_dp import client as client_lib
from fedjax_dp import streams
from fedjax_dp import tree_util
from fedjax_dp.algorithms import chunking
from fedjax_dp.privacy import plan as plan_lib


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


def make_block_sum(model, client_optimizer_fn,
                   privatizer: plan_lib.Privatizer, *, clients_per_chunk: int,
                   vmap_clients: bool, unroll_local_steps: int | bool):
  """The block's sums, chunk by chunk, and per-client diagnostics.

  Returns:
    `block_sum(params, features, example_mask, client_mask, canary_ids,
    slot_ids, hparams, canaries, noise_key, secagg) -> ((clipped_sum,
    message_sum, failures), (norms, was_clipped, non_finite, loss,
    examples))`: the float32 sum of the valid, finite clients' clipped
    deltas; under client-side noise the sum of every slot's message (None
    otherwise); secure aggregation's sampler failures; and per slot the
    pre-clip norm, whether it was clipped, whether it was a non-finite
    participant, its training loss and its example count.
  """
  clipped_client = _make_clipped_client(model, client_optimizer_fn,
                                        privatizer, unroll_local_steps)
  separate = privatizer.sends_messages

  def clipped_sum_of(params, features, example_mask, client_mask, canary_ids,
                     slot_ids, hparams, canaries, noise_key, secagg):
    num_clients = client_mask.shape[0]
    if num_clients % clients_per_chunk:
      raise ValueError(
          f"block holds {num_clients} clients (per device), not a multiple "
          f"of clients_per_chunk={clients_per_chunk}")
    block = (features, example_mask, client_mask, canary_ids, slot_ids)
    batch = jax.vmap if vmap_clients else chunking.unrolled_map
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
      features, example_mask, valid, ids, slots = chunking.chunk_rows(
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
    order, num_active = chunking.active_chunks(client_mask,
                                               clients_per_chunk)
    per_client = (jnp.zeros((num_clients,), jnp.float32),
                  jnp.zeros((num_clients,), bool),
                  jnp.zeros((num_clients,), bool),
                  jnp.zeros((num_clients,), jnp.float32),
                  jnp.zeros((num_clients,), jnp.int32))
    return jax.lax.fori_loop(0, num_active, train_chunk, (init, per_client))

  return clipped_sum_of
