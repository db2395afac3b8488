"""Per-group (per-layer) clipping: a clip norm for each parameter group.

Leaves of an update are assigned to groups by a function of their tree path
(default: the top-level key of the params dict, i.e. one group per layer of
the models in `fedjax_dp/models`). Group g is scaled so that its L2 norm is
at most C_g, independently of the other groups.

Privacy: after `clip_per_group`, group g has L2 norm <= C_g, hence the whole
update has L2 norm <= S = sqrt(sum_g C_g^2). The clipped sum therefore has L2
sensitivity S under add/remove-one-client neighbours (2S under replace-one),
and Gaussian noise of std z * S is the Gaussian mechanism with noise
multiplier z, accounted by the sampler's own event with that z, exactly as a
flat clip to S would be. The weights offered here keep S = C.
"""

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.privacy import clipping

GroupFn = Callable[[tuple], str]


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def top_level_group(path: tuple) -> str:
  """The group of a leaf: the name of its top-level key ("" for a bare leaf)."""
  return _key_name(path[0]) if path else ""


def leaf_groups(tree: types.PyTree,
                group_fn: GroupFn = top_level_group) -> list[str]:
  """The group of every leaf of `tree`, in tree_leaves order (static)."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return [group_fn(p) for p in paths]


def group_names(tree: types.PyTree,
                group_fn: GroupFn = top_level_group) -> tuple[str, ...]:
  """Sorted names of the groups of `tree`."""
  return tuple(sorted(set(leaf_groups(tree, group_fn))))


def group_norms(tree: types.PyTree, group_fn: GroupFn = top_level_group
                ) -> dict[str, jax.Array]:
  """float32 L2 norm of each group of `tree`."""
  leaves = jax.tree_util.tree_leaves(tree)
  squares = {}
  for g, x in zip(leaf_groups(tree, group_fn), leaves):
    s = jnp.sum(jnp.square(x.astype(jnp.float32)))
    squares[g] = squares[g] + s if g in squares else s
  return {g: jnp.sqrt(s) for g, s in squares.items()}


class PerGroupClipResult(NamedTuple):
  clipped: types.PyTree
  norms: dict  # group -> pre-clip L2 norm.
  was_clipped: dict  # group -> bool, norm > C_g.


def clip_per_group(tree: types.PyTree, clip_norms: Mapping[str, jax.Array],
                   group_fn: GroupFn = top_level_group) -> PerGroupClipResult:
  """Scales each group of `tree` to L2 norm at most its clip norm.

  Args:
    tree: one client's update.
    clip_norms: group name -> C_g > 0 (arrays or floats, may be +inf); must
      name every group of `tree`.
    group_fn: leaf path -> group name.

  Returns:
    PerGroupClipResult.

  Raises:
    KeyError: a group of `tree` has no clip norm (an unclipped group would
      have unbounded sensitivity).

  Privacy: group g of the result has L2 norm <= C_g, the whole <= sqrt(sum
    C_g^2) (the scale min(1, C_g / norm_g) never exceeds 1).
  """
  groups = leaf_groups(tree, group_fn)
  missing = sorted(set(groups) - set(clip_norms))
  if missing:
    raise KeyError(f"no clip norm for parameter groups {missing}; "
                   f"clip_norms has {sorted(clip_norms)}")
  norms = group_norms(tree, group_fn)
  scales = {}
  for g, n in norms.items():
    c = jnp.asarray(clip_norms[g], jnp.float32)
    scales[g] = clipping.clip_scale(n, c)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  clipped = [(x.astype(jnp.float32) * scales[g]).astype(x.dtype)
             for g, x in zip(groups, leaves)]
  was_clipped = {g: norms[g] > jnp.asarray(clip_norms[g], jnp.float32)
                 for g in norms}
  return PerGroupClipResult(jax.tree_util.tree_unflatten(treedef, clipped),
                            norms, was_clipped)


def overall_clip_norm(clip_norms: Mapping[str, jax.Array]) -> jax.Array:
  """S = sqrt(sum_g C_g^2): the L2 bound on a whole clipped update."""
  cs = [jnp.asarray(c, jnp.float32) for c in clip_norms.values()]
  return jnp.sqrt(sum(jnp.square(c) for c in cs))


def uniform_clip_norms(total_clip_norm: float,
                       groups: tuple[str, ...]) -> dict[str, float]:
  """C_g = C / sqrt(G) for G groups, so that S = C (same noise as flat)."""
  c = float(total_clip_norm) / len(groups) ** 0.5
  return {g: c for g in groups}


def size_proportional_clip_norms(total_clip_norm: float, tree: types.PyTree,
                                 group_fn: GroupFn = top_level_group
                                 ) -> dict[str, float]:
  """C_g = C sqrt(d_g / d), d_g the group's size, so that S = C."""
  sizes = {}
  for g, x in zip(leaf_groups(tree, group_fn),
                  jax.tree_util.tree_leaves(tree)):
    sizes[g] = sizes.get(g, 0) + int(x.size)
  total = sum(sizes.values())
  return {g: float(total_clip_norm) * (d / total) ** 0.5
          for g, d in sizes.items()}
