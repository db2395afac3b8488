"""The Laplace mechanism with L1 clipping, central or local.

Central: every client's update is clipped to L1 norm C, the server adds
i.i.d. Laplace(0, b) noise with b = z * C to every coordinate of the sum.
Local: every client adds Laplace(0, z * C) noise to its own clipped update
before it leaves the device, and the server sums noisy updates.

Privacy:
  * Sensitivity: after `clip_by_l1_norm(u, C)`, ||u||_1 <= C, so the clipped
    sum has L1 sensitivity C under add/remove-one-client neighbours and 2C
    under replace-one.
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
    what `central_dp_event` returns for them.
  * Local: each client's output u + Laplace(z C) is, on its own, a Laplace
    mechanism whose input can be replaced by any other (L1 distance <= 2C):
    pure epsilon_0 = 2 / z per round in which the client takes part, i.e.
    `LaplaceDpEvent(z / 2)` with no sampling amplification (a client may
    take part in every round). This is a guarantee against the server and
    anyone who sees the client's message, for that client alone.
"""

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import noise
from fedjax_dp.privacy import sampling


def l1_norm(tree: types.PyTree) -> jax.Array:
  """Sum of absolute values of all leaves of `tree`, in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)


def clip_by_l1_norm(tree: types.PyTree, clip_norm: jax.Array
                    ) -> clipping.ClipResult:
  """Scales `tree` so that its L1 norm is at most `clip_norm`.

  Args:
    tree: one client's update.
    clip_norm: L1 bound C > 0 (traced array or float; +inf disables it).

  Returns:
    ClipResult whose `norm` is the pre-clip L1 norm.

  Privacy: the returned tree has L1 norm <= C (the scale min(1, C / norm)
    never exceeds 1; float32 rounding of the product is below 1 ulp per
    coordinate).
  """
  norm = l1_norm(tree)
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  clipped = jax.tree_util.tree_map(
      lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree)
  return clipping.ClipResult(clipped, norm, norm > clip_norm)


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


def _check_noise_multiplier(noise_multiplier: float) -> float:
  z = float(noise_multiplier)
  if not z >= 0 or z == float("inf"):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {z!r}")
  return z


def central_dp_event(sampler: sampling.Sampler,
                     noise_multiplier: float) -> dp_accounting.DpEvent:
  """The DP event of one central-Laplace round with `sampler`.

  Args:
    sampler: the cohort sampler.
    noise_multiplier: z = b / C.

  Returns:
    PoissonSampledDpEvent(q, LaplaceDpEvent(z)) for Poisson sampling without
    truncation (add/remove-one; PLD accountant). Otherwise the unamplified
    LaplaceDpEvent(z / 2) (see the module docstring: a conservative bound
    valid under the sampler's own relation). z = 0 gives a NonPrivateDpEvent.
  """
  z = _check_noise_multiplier(noise_multiplier)
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  if isinstance(sampler, sampling.PoissonSampler) and not sampler.truncates:
    return dp_accounting.PoissonSampledDpEvent(
        sampler.sampling_probability, dp_accounting.LaplaceDpEvent(z))
  worst_case = clipping.sensitivity(
      1.0, clipping.NeighbouringRelation.REPLACE_ONE)
  return dp_accounting.LaplaceDpEvent(z / worst_case)


def local_dp_event(noise_multiplier: float) -> dp_accounting.DpEvent:
  """Per-client event of one round of local Laplace noise: Laplace(z / 2).

  The neighbouring relation is the local one: the client's input replaced
  by any other input, L1 distance <= 2C. Record one such event for every
  round (no amplification: assume the client takes part in all of them).
  Account it with the PLD accountant under ADD_OR_REMOVE_ONE (for an
  unsampled Laplace the PLD depends only on scale / sensitivity, and the
  sensitivity here already is the replacement distance) or with the RDP
  accountant under any relation. One round is pure (2 / z)-DP.
  """
  z = _check_noise_multiplier(noise_multiplier)
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.LaplaceDpEvent(z / 2.0)
