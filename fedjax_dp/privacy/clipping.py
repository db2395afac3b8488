"""Clipping of client contributions.

Privacy: clipping is what bounds one client's influence on the sum. After
`clip_by_global_norm(delta, C)` the whole update has L2 norm <= C, so under
add/remove-one-client neighbours the clipped sum has L2 sensitivity C, and
under replace-one-client neighbours 2C. `sensitivity` returns these values and
is the only place the noise scale's sensitivity comes from. Two more
relations serve the other mechanisms: replace-special (DP-FTRL: one client's
data replaced by the special empty record, so its clipped update becomes 0:
sensitivity C) and local (one client's message on its own, its input replaced
by any other input: sensitivity 2C).
"""

import enum
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import tree_util
from fedjax_dp import types


class NeighbouringRelation(enum.Enum):
  """Which pairs of client populations the guarantee distinguishes."""

  # One population is the other plus one client (user-level, Poisson sampling).
  ADD_OR_REMOVE_ONE = "add_or_remove_one"
  # Same size; one client's data replaced by anything (fixed-size sampling).
  REPLACE_ONE = "replace_one"
  # One client's data replaced by the special empty record, which contributes
  # a zero update (Kairouz et al. 2021, Definition 1.1; DP-FTRL).
  REPLACE_SPECIAL = "replace_special"
  # Local DP: one client's own message, whose input may be replaced by any
  # other input; a guarantee for that client against everyone who sees it.
  LOCAL = "local"


class ClipResult(NamedTuple):
  clipped: types.PyTree
  # Norm of the update before clipping (float32 scalar; L2, or L1 for
  # clip_by_l1_norm).
  norm: jax.Array
  # True where the update was scaled down (norm > clip_norm).
  was_clipped: jax.Array


def clip_scale(norm: jax.Array, clip_norm: jax.Array) -> jax.Array:
  """min(1, C / norm): the factor that brings an update of norm `norm` (or a
  certified upper bound of it) within C. Never above 1; exactly 1 for a
  zero update (the max() guard makes C / tiny huge) and for C = inf."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  return jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))


def clip_by_global_norm(tree: types.PyTree, clip_norm: jax.Array) -> ClipResult:
  """Scales `tree` so that its global L2 norm is at most `clip_norm`.

  `clip_norm` may be a traced array (sweeps vary it) and may be +inf, which
  disables clipping exactly (the scale is then 1, also for a zero tree).

  Args:
    tree: one client's update.
    clip_norm: positive scalar C.

  Returns:
    ClipResult with the clipped tree, the pre-clip norm and whether it was
    scaled down.

  Privacy: the returned tree has L2 norm <= C (up to float32 rounding of the
    scale, which is computed as min(1, C / norm) and so never exceeds 1).
  """
  norm = tree_util.global_l2_norm(tree)
  scale = clip_scale(norm, clip_norm)
  clipped = jax.tree_util.tree_map(
      lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree)
  return ClipResult(clipped, norm, norm > clip_norm)


def l1_norm(tree: types.PyTree) -> jax.Array:
  """Sum of absolute values of all leaves of `tree`, in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)


def clip_by_l1_norm(tree: types.PyTree, clip_norm: jax.Array) -> ClipResult:
  """Scales `tree` so that its L1 norm is at most `clip_norm` (Laplace).

  Args:
    tree: one client's update.
    clip_norm: L1 bound C > 0 (traced array or float; +inf disables it).

  Returns:
    ClipResult whose `norm` is the pre-clip L1 norm.

  Privacy: the returned tree has L1 norm <= C (the scale min(1, C / norm)
    never exceeds 1; float32 rounding of the product is below 1 ulp per
    coordinate), so the clipped sum has L1 sensitivity C under
    add/remove-one-client neighbours and 2C under replace-one.
  """
  norm = l1_norm(tree)
  scale = clip_scale(norm, clip_norm)
  clipped = jax.tree_util.tree_map(
      lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree)
  return ClipResult(clipped, norm, norm > clip_norm)


def sensitivity(clip_norm, relation: NeighbouringRelation):
  """L2 sensitivity of a sum of updates each clipped to `clip_norm`.

  Args:
    clip_norm: the clip bound C (float or array).
    relation: the neighbouring relation of the guarantee.

  Returns:
    C under add/remove-one (the sum gains or loses one vector of norm <= C)
    and replace-special (u becomes 0); 2C under replace-one (u replaced by
    -u moves the sum by up to 2C) and local (one message, u replaced by -u).
  """
  if relation in (NeighbouringRelation.ADD_OR_REMOVE_ONE,
                  NeighbouringRelation.REPLACE_SPECIAL):
    return clip_norm
  if relation in (NeighbouringRelation.REPLACE_ONE,
                  NeighbouringRelation.LOCAL):
    return 2.0 * clip_norm
  raise ValueError(f"unknown neighbouring relation {relation!r}")


# ---------------------------------------------------------------------------
# Certified norms of updates given in factored form.

# float32 unit roundoff.
_UNIT_ROUNDOFF = 2.0 ** -24
# Relative margin that covers the few roundings of assembling a bound (a
# handful of float32 operations on non-negative values, each <= 2^-24).
_ASSEMBLY_MARGIN = 2.0 ** -18


def _gamma(m: int) -> float:
  """Higham's gamma_m = m u / (1 - m u): the worst-case relative error bound
  of a float32 sum of m terms (of their absolute values), in any order."""
  mu = m * _UNIT_ROUNDOFF
  if not mu < 0.5:
    raise ValueError(f"a sum of {m} float32 terms has no useful error bound")
  return mu / (1.0 - mu)


def _round_up32(x: float) -> np.float32:
  """The smallest float32 >= x."""
  y = np.float32(x)
  return y if float(y) >= x else np.nextafter(y, np.float32(np.inf))


def gram_norm_sq_upper_bound(gram_a: jax.Array, gram_g: jax.Array,
                             inner_a: int, inner_g: int) -> jax.Array:
  """A certified upper bound of ||A^T G||_F^2 from float32 Gram matrices.

  The squared Frobenius norm of a product A^T G (A: [n, p], G: [n, q]; e.g.
  a dense layer's SGD delta, inputs times output gradients over a client's
  examples) equals sum((A A^T) * (G G^T)). Computed in float32, that sum can
  cancel catastrophically (examples whose contributions nearly cancel) and
  come out far below the true value, even 0; clipping with it would let the
  update through unclipped. This returns B >= ||A^T G||_F^2 for the exact
  product of the given factors, whatever their values:

    B = min(S + K T^2, T^2) * (1 + margin),

  where S is the computed Gram sum, T >= sum_i |a_i| |g_i| (the triangle
  inequality bounds the norm by it; row norms from the Gram diagonals,
  inflated for their rounding), and K T^2 bounds |S - ||A^T G||_F^2| from
  the worst-case float32 error of every dot product and of the final sum:
  with gamma_m = m u / (1 - m u), every computed Gram entry is within
  gamma_p |a_i| |a_j| (gamma_q |g_i| |g_j|) of the exact one (Cauchy-Schwarz
  on the standard bound gamma_m sum_k |x_k y_k|, any summation order, FMA or
  not), and summing the n^2 rounded products adds gamma_{n^2} of the sum of
  their magnitudes, <= T^2. So K = (gamma_p + gamma_q + gamma_p gamma_q) +
  (u + gamma_{n^2} (1 + u)) (1 + gamma_p) (1 + gamma_q). On ordinary data
  B exceeds the true value by about K T^2 (relative 1e-5..1e-4: an update
  clipped with it shrinks that much more than with its exact norm).

  The Gram matrices must have been computed in float32 with full-precision
  products (`jax.lax.Precision.HIGHEST`; TF32 would void K).

  Args:
    gram_a: [..., n, n] computed A A^T (any constant column, such as a bias's
      ones, included in A).
    gram_g: [..., n, n] computed G G^T.
    inner_a: p, the length of A's rows (the dot products' length).
    inner_g: q, the length of G's rows.

  Returns:
    [...] float32 upper bounds (inf or NaN where the factors are not finite
    or the bound overflows: such a client must be dropped, not clipped).
  """
  n = gram_a.shape[-1]
  u = _UNIT_ROUNDOFF
  ga, gg = _gamma(inner_a), _gamma(inner_g)
  k = (ga + gg + ga * gg) + (u + _gamma(n * n) * (1.0 + u)) * (1.0 + ga) * (
      1.0 + gg)
  # Each |a_i| |g_i| from the computed diagonals: two square roots and a
  # product (u each), the diagonal sums (gamma_p, gamma_q), the sum over i
  # (gamma_n) and the product with this factor (u).
  t_factor = 1.0 / ((1.0 - _gamma(n)) * (1.0 - u) ** 4 * math.sqrt(
      (1.0 - ga) * (1.0 - gg)))
  diag_a = jnp.diagonal(gram_a, axis1=-2, axis2=-1)
  diag_g = jnp.diagonal(gram_g, axis1=-2, axis2=-1)
  t = jnp.sum(jnp.sqrt(diag_a) * jnp.sqrt(diag_g), axis=-1) * _round_up32(
      t_factor)
  t_sq = jnp.square(t)
  gram_sum = jnp.sum(gram_a * gram_g, axis=(-2, -1))
  # K is rounded up and widened by 4u so that the float32 product and sum
  # below stay above the exact S + K T^2 >= ||A^T G||_F^2 >= 0.
  bound = jnp.minimum(gram_sum + _round_up32(k * (1.0 + 4.0 * u)) * t_sq,
                      t_sq)
  return bound * _round_up32(1.0 + _ASSEMBLY_MARGIN)


def certified_norm(norm_sq_bounds: Sequence[jax.Array],
                   scale: jax.Array) -> jax.Array:
  """sqrt(scale^2 * sum(norm_sq_bounds)), widened to stay an upper bound.

  Args:
    norm_sq_bounds: upper bounds of squared norms of the parts of an update
      (e.g. `gram_norm_sq_upper_bound` per layer).
    scale: the factor the parts are multiplied by (e.g. a learning rate).

  Returns:
    An upper bound of the whole update's L2 norm: the roundings of the sum,
    the product and the square root (a few u) are covered by a relative
    margin of 2^-18.
  """
  total = sum(norm_sq_bounds[1:], norm_sq_bounds[0])
  norm = jnp.abs(scale) * jnp.sqrt(total)
  return norm * _round_up32(1.0 + _ASSEMBLY_MARGIN)
