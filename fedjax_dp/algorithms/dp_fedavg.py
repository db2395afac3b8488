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

import functools
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
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import laplace
from fedjax_dp.privacy import noise
from fedjax_dp.privacy import per_layer
from fedjax_dp.privacy import placement
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.privacy import tree_aggregation

# Sub-streams of a round's noise key (the key itself noises central sums).
_COUNT_NOISE, _CLIENT_NOISE, _EXAMPLE_NOISE = 1, 2, 3


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


class CohortBlock(NamedTuple):
  """Device view of data.blocks.ClientBlock."""

  features: dict
  example_mask: jax.Array  # [clients, steps, batch]
  client_mask: jax.Array  # [clients]


CLIENTS_AXIS = "clients"


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


def build_round(
    model: types.Model,
    client_optimizer_fn: client_lib.ClientOptimizerFn,
    server_optimizer: optax.GradientTransformation,
    *,
    clients_per_chunk: int = 1,
    vmap_clients: bool = True,
    unroll_local_steps: int | bool = 1,
    mesh: jax.sharding.Mesh | None = None,
    per_layer_clipping: str | None = None,
    mechanism: str = "gaussian",
    noise_placement: str = "central",
    secure_aggregation_encoding: bool = False,
    tree_restart_every: int | None = None,
    example_dp: bool = False,
) -> Callable[..., tuple[server_lib.ServerState, dict]]:
  """Builds the (unjitted) round function.

  Args:
    model: pure init/apply model.
    client_optimizer_fn: learning rate -> optax optimizer for local steps.
    server_optimizer: optax optimizer with injectable learning_rate (see
      server.server_optimizer).
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
    per_layer_clipping: None clips the whole delta to C; "uniform" or
      "size_proportional" clips each top-level parameter group g to
      w_g * C with sum_g w_g^2 = 1 (w_g = 1/sqrt(G), or sqrt(d_g / d)), so the
      whole update still has norm <= C and the noise is unchanged.
    mechanism: "gaussian" (L2 clipping, Gaussian noise), "laplace" (L1
      clipping to C, Laplace noise of scale z * C; privacy/laplace.py) or
      "tree" (L2 clipping, DP-FTRL's tree-aggregation noise with per-node
      std z * C, restarted every `tree_restart_every` rounds;
      privacy/tree_aggregation.py).
    noise_placement: "central", "distributed" or "local"
      (privacy/placement.py).
    secure_aggregation_encoding: with distributed noise, simulate secure
      aggregation's fixed-point encoding and modular sum with discrete
      Gaussian shares (privacy/secure_aggregation.py; round_fn then needs
      `secagg`).
    tree_restart_every: rounds per tree (mechanism "tree").
    example_dp: record-level DP-SGD inside each client (privacy/dp_sgd.py),
      with the hparams' example clip norm and noise multiplier.

  Returns:
    `round_fn(state, block, hparams, noise_key, canaries=None,
    adaptive=None, secagg=None, tree=None) -> (new_state, metrics)`.
  """
  if noise_placement not in placement.PLACEMENTS:
    raise ValueError(f"noise_placement must be one of {placement.PLACEMENTS}"
                     f", got {noise_placement!r}")
  if secure_aggregation_encoding and noise_placement != "distributed":
    raise ValueError("secure_aggregation_encoding needs distributed noise")
  if mechanism == "tree" and (noise_placement != "central"
                              or not tree_restart_every):
    raise ValueError("the tree mechanism adds central noise and needs "
                     "tree_restart_every >= 1")
  if example_dp:
    client_update = client_lib.make_dp_sgd_client_update(
        model, client_optimizer_fn, unroll=unroll_local_steps)
  else:
    client_update = client_lib.make_client_update(
        model, client_optimizer_fn, unroll=unroll_local_steps)
  encoded = secure_aggregation_encoding

  def layer_weights(tree) -> dict[str, float]:
    # Static per-group fractions of C (from shapes only, at trace time).
    if per_layer_clipping == "uniform":
      return per_layer.uniform_clip_norms(
          1.0, per_layer.group_names(tree))
    if per_layer_clipping == "size_proportional":
      return per_layer.size_proportional_clip_norms(1.0, tree)
    raise ValueError(
        "per_layer_clipping must be None, 'uniform' or 'size_proportional', "
        f"got {per_layer_clipping!r}")

  def clip_update(delta, hparams):
    if mechanism == "laplace":
      return laplace.clip_by_l1_norm(delta, hparams.clip_norm)
    if per_layer_clipping is None:
      return clipping.clip_by_global_norm(delta, hparams.clip_norm)
    groups = per_layer.clip_per_group(
        delta, {g: w * hparams.clip_norm
                for g, w in layer_weights(delta).items()})
    return clipping.ClipResult(
        groups.clipped, tree_util.global_l2_norm(delta),
        functools.reduce(jnp.logical_or, groups.was_clipped.values()))

  def message(clipped, participates, finite, slot_id, hparams, noise_key,
              secagg):
    """What one slot sends to the sum under client-side noise, and its
    sampler failures (central noise sums the clipped deltas themselves).

    A participant's message carries its noise whatever its data (a
    non-finite update is replaced by zero first); a slot that takes no part
    sends exactly zero.
    """
    key = jax.random.fold_in(jax.random.fold_in(noise_key, _CLIENT_NOISE),
                             slot_id)
    no_failures = jnp.zeros((), jnp.int32)
    if noise_placement == "local":
      return placement.with_local_noise(
          clipped, participates, finite, mechanism, hparams.noise_multiplier,
          hparams.clip_norm, key), no_failures
    if noise_placement == "distributed" and encoded:
      return secure_aggregation.encode(clipped, participates, finite, secagg,
                                       key)
    stddev = placement.share_stddev(hparams.noise_multiplier,
                                    hparams.clip_norm,
                                    hparams.min_participants)
    return placement.with_gaussian_share(clipped, participates, finite,
                                         stddev, key), no_failures

  def clipped_client(params, features, example_mask, valid, canary_id,
                     slot_id, hparams, canaries, noise_key, secagg):
    if example_dp:
      key = jax.random.fold_in(jax.random.fold_in(noise_key, _EXAMPLE_NOISE),
                               slot_id)
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
    clip = clip_update(delta, hparams)
    # A client whose update is NaN or Inf contributes nothing (it is excluded
    # by `where`, which also keeps NaN out of the sum). Whether to drop it
    # depends only on that client's own data, so the sum's sensitivity is
    # unchanged.
    finite = jnp.isfinite(clip.norm)
    msg, failures = None, jnp.zeros((), jnp.int32)
    if noise_placement != "central":
      msg, failures = message(clip.clipped, valid, finite, slot_id, hparams,
                              noise_key, secagg)
    return clip, msg, failures, finite, out.loss, out.num_examples

  def sum_messages(msgs):
    # uint32 sums wrap around: the modular sum of secure aggregation.
    return tree_util.masked_sum(msgs, None)

  def clipped_sum_of(params, features, example_mask, client_mask, canary_ids,
                     slot_ids, hparams, canaries, noise_key, secagg):
    """Sums of the block's messages (and clipped deltas), and diagnostics."""
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
    separate = noise_placement != "central"
    msg_zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, jnp.uint32 if encoded else jnp.float32),
        params)
    init = (zeros, msg_zeros if separate else None, jnp.zeros((), jnp.int32))

    def train_chunk(i, carry):
      sums, per_client = carry
      index = order[i]
      features, example_mask, valid, ids, slots = chunk_rows(
          block, index, clients_per_chunk)
      clip, msgs, fails, finite, loss, n = vmapped(
          params, features, example_mask, valid, ids, slots, hparams,
          canaries, noise_key, secagg)
      chunk_sums = (tree_util.masked_sum(clip.clipped, valid & finite),
                    sum_messages(msgs) if separate else None, jnp.sum(fails))
      outputs = (clip.norm, clip.was_clipped, valid & ~finite, loss, n)
      # uint32 message sums wrap around like secure aggregation's sum.
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

  def round_fn(state: server_lib.ServerState, block: CohortBlock,
               hparams: RoundHparams, noise_key: types.PRNGKey,
               canaries: Canaries | None = None,
               adaptive: adaptive_clipping.AdaptiveClipHparams | None = None,
               secagg: secure_aggregation.SecAggParams | None = None,
               tree: tree_aggregation.TreeState | None = None):
    if encoded and secagg is None:
      raise ValueError("this round simulates secure aggregation: pass secagg")
    if mechanism == "tree" and tree is None:
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
      # check_vma=False: the scan's zero carry starts replicated and becomes
      # per-device; the psum makes the result replicated again.
      sums, per_client = jax.shard_map(
          sharded, mesh=mesh,
          in_specs=(replicated,) + (by_client,) * 5 + (replicated,) * 4,
          out_specs=(replicated, by_client), check_vma=False)(*args)
    clipped_sum, message_sum, failures = sums
    released = None
    extra = {}
    if noise_placement == "local":
      released = message_sum
    elif noise_placement == "distributed" and encoded:
      decoded = secure_aggregation.decode(message_sum, secagg)
      released = decoded.sum
      extra = {"secagg_near_overflow": decoded.num_near_overflow,
               "secagg_wrapped": decoded.num_wrapped,
               "secagg_sampler_failures": failures}
    elif noise_placement == "distributed":
      released = message_sum
    new_state, metrics = noise_and_step(
        state, clipped_sum, per_client, block.client_mask, hparams, noise_key,
        server_optimizer, canaries, adaptive, mechanism,
        noisy_sum=released, noise_placement=noise_placement, tree=tree,
        tree_restart_every=tree_restart_every)
    if noise_placement == "distributed":
      # Fewer participants than the public minimum the shares are sized for:
      # the aggregation aborts and nothing is released (the state, and so the
      # model, does not move). Whether it aborts depends on the number of
      # participants only, which the server knows anyway.
      participants = jnp.sum(block.client_mask.astype(jnp.int32))
      aborted = participants.astype(jnp.float32) < hparams.min_participants
      new_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(aborted, old, new), new_state, state)
      extra["num_participants"] = participants
      extra["aggregation_aborted"] = aborted
    metrics.update(extra)
    return new_state, metrics

  return round_fn


def _noise_stddev_of_sum(mechanism, noise_placement, hparams,
                         num_participants):
  """Std of the noise in one coordinate of the released sum."""
  per_message = noise.noise_stddev(hparams.noise_multiplier, hparams.clip_norm)
  if mechanism == "laplace":
    per_message = jnp.sqrt(2.0) * per_message  # Laplace(0, b): std sqrt(2) b
  if noise_placement == "local":
    return per_message * jnp.sqrt(num_participants.astype(jnp.float32))
  if noise_placement == "distributed":
    return per_message * jnp.sqrt(
        num_participants.astype(jnp.float32) / hparams.min_participants)
  return per_message


def noise_and_step(
    state: server_lib.ServerState,
    clipped_sum: types.Params,
    per_client: tuple,
    client_mask: jax.Array,
    hparams: RoundHparams,
    noise_key: types.PRNGKey,
    server_optimizer: optax.GradientTransformation,
    canaries: "Canaries | None" = None,
    adaptive: adaptive_clipping.AdaptiveClipHparams | None = None,
    mechanism: str = "gaussian",
    *,
    noisy_sum: types.Params | None = None,
    noise_placement: str = "central",
    tree: tree_aggregation.TreeState | None = None,
    tree_restart_every: int | None = None,
) -> tuple[server_lib.ServerState, dict]:
  """The second half of every round shape: noise, average, server step.

  Privacy: central placement adds N(0, (z C)^2) (or Laplace(z C), or the
  tree's noise increment) once to the sum of clipped deltas; distributed and
  local placements pass the sum of noisy messages as `noisy_sum`. Either is
  divided by the public denominator. With adaptive clipping the round also
  releases the noisy count of unclipped clients (privacy/adaptive_clipping.py).

  Args:
    state: server state before the round.
    clipped_sum: float32 sum of the valid clients' clipped deltas (before any
      noise; diagnostics only when `noisy_sum` is given).
    per_client: (pre-clip norms, was clipped, non-finite, train loss,
      examples), each [clients].
    client_mask: bool [clients], the block's valid slots.
    hparams: the round's hyperparameters.
    noise_key: the round's noise key.
    server_optimizer: optax optimizer with an injectable learning rate.
    canaries: audit canaries in this round, if any.
    adaptive: adaptive clipping's arguments, if enabled.
    mechanism: "gaussian", "laplace" or "tree".
    noisy_sum: the released sum when the clients added the noise.
    noise_placement: "central", "distributed" or "local".
    tree: the tree state before this round (mechanism "tree").
    tree_restart_every: rounds per tree (mechanism "tree").

  Returns:
    (new server state, metrics).
  """
  norms, was_clipped, nonfinite, client_loss, num_examples = per_client
  valid = client_mask & ~nonfinite
  num_valid = jnp.sum(valid.astype(jnp.int32))
  # Client-side noise comes from every participant, finite or not.
  stddev = _noise_stddev_of_sum(mechanism, noise_placement, hparams,
                                jnp.sum(client_mask.astype(jnp.int32)))
  tree_metrics = {}
  if noisy_sum is None and mechanism == "laplace":
    scale = laplace.noise_scale(hparams.noise_multiplier, hparams.clip_norm)
    noisy_sum = laplace.add_laplace_noise(clipped_sum, scale, noise_key)
  elif noisy_sum is None and mechanism == "tree":
    noisy_sum, _, step = tree_aggregation.update(
        tree, clipped_sum, stddev, tree_restart_every,
        levels=tree_aggregation.num_levels(tree_restart_every))
    tree_metrics = {"tree_index": step.tree_index, "tree_step": step.step}
  elif noisy_sum is None:
    noisy_sum = noise.add_gaussian_noise(clipped_sum, stddev, noise_key)
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
      **tree_metrics,
  }
  if adaptive is not None:
    # Andrew et al. 2021: release the noisy count of unclipped clients and
    # move the clip norm for the next round (hparams.noise_multiplier is
    # already the update's share z_delta of the budget).
    next_clip, clip_out = adaptive_clipping.update(
        adaptive_clipping.AdaptiveClipState(
            hparams.clip_norm, jax.random.fold_in(noise_key, _COUNT_NOISE)),
        ~was_clipped, valid, adaptive)
    metrics["unclipped_fraction_noisy"] = clip_out.unclipped_fraction
    metrics["next_clip_norm"] = next_clip.clip_norm
  if canaries is not None:
    # For the all-iterates audit: how well each canary shows in this round's
    # released update.
    metrics["canary_cosines"] = audit.cosines(canaries.directions, average)
  return new_state, metrics
