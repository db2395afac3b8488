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
from typing import NamedTuple

import jax
import jax.numpy as jnp

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
  # L2 norm of the update before clipping (float32 scalar).
  norm: jax.Array
  # True where the update was scaled down (norm > clip_norm).
  was_clipped: jax.Array


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
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  # max() guards a zero update: C / tiny is huge, so the scale is 1.
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
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
