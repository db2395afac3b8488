"""Laplace noise for the Laplace mechanism with L1 clipping, central or local.

Central: every client's update is clipped to L1 norm C
(`clipping.clip_by_l1_norm`), the server adds
i.i.d. Laplace(0, b) noise with b = z * C to every coordinate of the sum.
Local: every client adds Laplace(0, z * C) noise to its own clipped update
before it leaves the device, and the server sums noisy updates.

Privacy:
  * Sensitivity: after `clipping.clip_by_l1_norm(u, C)`, ||u||_1 <= C, so
    the clipped sum has L1 sensitivity C under add/remove-one-client
    neighbours and 2C under replace-one.
  * dp_accounting's `LaplaceDpEvent(noise_multiplier)` is defined for
    sum_i v_i + Laplace noise of scale s with ||v_i||_1 <= C and
    noise_multiplier = s / C, i.e. scale over L1 sensitivity (dp_event.py;
    its PLD is the one-dimensional Laplace mechanism with shift 1, and
    spreading the same L1 shift over several coordinates only lowers the
    privacy loss, which tests/test_laplace.py checks on its PLDs).
  * Central, Poisson sampling without truncation, add/remove-one-client:
    `PoissonSampledDpEvent(q, LaplaceDpEvent(z))` (PLD accountant; the RDP
    accountant takes no sampled Laplace).
  * Central, fixed-size or truncated Poisson sampling: dp_accounting has no
    event for Laplace under these samplers. Both couple neighbouring cohorts
    so that their clipped sums differ by at most 2C in L1 (a replacement at
    worst), so the round is at least as private as the unsampled
    `LaplaceDpEvent(z / 2)`; that conservative event (no amplification) is
    what the privacy plan records for them.
  * Local: each client's output u + Laplace(z C) is, on its own, a Laplace
    mechanism whose input can be replaced by any other (L1 distance <= 2C):
    pure epsilon_0 = 2 / z per round in which the client takes part, i.e.
    `LaplaceDpEvent(z / 2)` with no sampling amplification (a client may
    take part in every round). This is a guarantee against the server and
    anyone who sees the client's message, for that client alone.
"""

import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.privacy import noise


def noise_scale(noise_multiplier, clip_norm) -> jax.Array:
  """b = z * C, the Laplace scale; exactly 0 when z = 0 (also for C = inf)."""
  # The same product as the Gaussian's sigma, with the same z = 0 guard.
  return noise.noise_stddev(noise_multiplier, clip_norm)


def add_laplace_noise(tree: types.PyTree, scale: jax.Array,
                      key: types.PRNGKey) -> types.PyTree:
  """Adds i.i.d. Laplace(0, scale) float32 noise to every scalar of `tree`.

  The density of Laplace(0, b) is exp(-|x| / b) / (2 b); its std is sqrt(2) b.
  """
  return noise.add_iid_noise(tree, scale, key, jax.random.laplace)


def add_local_laplace_noise(stacked: types.PyTree, scale: jax.Array,
                            key: types.PRNGKey,
                            slot_ids: jax.Array | None = None
                            ) -> types.PyTree:
  """Each client (leading axis) noises its own update with its own key.

  Client i's noise uses `fold_in(key, slot_ids[i])` (default slot_ids =
  0..n-1), so it does not depend on the other slots; when the round
  processes the block in chunks, pass the slots' block-wide indices so that
  chunks do not reuse noise. Padding slots get noise too; mask them out of
  the sum (tree_util.masked_sum selects them away).
  """
  num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  if slot_ids is None:
    slot_ids = jnp.arange(num)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(slot_ids)
  return jax.vmap(add_laplace_noise, in_axes=(0, None, 0))(stacked, scale,
                                                           keys)
