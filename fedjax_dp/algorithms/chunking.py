"""How a round walks over its cohort: chunks of clients, the active ones
only, vmapped or as independent copies.

Shared by the round's two backends (per_client.py, factored.py).
"""

import jax
import jax.numpy as jnp


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


def unrolled_map(fn, in_axes):
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
