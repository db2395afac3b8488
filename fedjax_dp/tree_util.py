"""Tree helpers: global norms, masked sums and arithmetic on parameter trees."""

import functools

import jax
import jax.numpy as jnp

from fedjax_dp import types


def global_l2_norm(tree: types.PyTree) -> jax.Array:
  """L2 norm of all leaves of `tree` taken together, in float32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
  return jnp.sqrt(sum(squares))


def tree_add(a: types.PyTree, b: types.PyTree) -> types.PyTree:
  return jax.tree_util.tree_map(jnp.add, a, b)


def tree_sub(a: types.PyTree, b: types.PyTree) -> types.PyTree:
  return jax.tree_util.tree_map(jnp.subtract, a, b)


def tree_scale(tree: types.PyTree, scalar) -> types.PyTree:
  return jax.tree_util.tree_map(lambda x: x * scalar, tree)


def tree_zeros_like(tree: types.PyTree, dtype=jnp.float32) -> types.PyTree:
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, dtype), tree)


# Leading axes up to this long are summed by adding rows (see masked_sum).
_UNROLLED_SUM_ROWS = 8


def masked_sum(stacked: types.PyTree, mask: jax.Array | None) -> types.PyTree:
  """Sums `stacked` over its leading axis, counting only rows where `mask`.

  Rows with a false mask contribute exactly zero, even if they hold NaN or
  Inf (`jnp.where` selects, it does not multiply). `mask=None` counts every
  row. The sum keeps each leaf's dtype (uint32 sums wrap around).
  """

  def _sum(x):
    if x.shape[0] <= _UNROLLED_SUM_ROWS:
      # A few rows: plain adds. XLA:CPU reduces a short leading axis of a
      # large array an order of magnitude slower than it adds the rows
      # (docs/benchmarks.md, "Constants chosen by measurement"). Rows are
      # sliced before selecting, so that rows stacked just before are never
      # materialised as one array.
      rows = [x[i] for i in range(x.shape[0])]
      if mask is not None:
        rows = [jnp.where(mask[i], r, jnp.zeros_like(r))
                for i, r in enumerate(rows)]
      return functools.reduce(jnp.add, rows)
    if mask is not None:
      x = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x,
                    jnp.zeros_like(x))
    return jnp.sum(x, axis=0, dtype=x.dtype)

  return jax.tree_util.tree_map(_sum, stacked)


def tree_size(tree: types.PyTree) -> int:
  """Total number of scalars in `tree`."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def tree_all_finite(tree: types.PyTree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
