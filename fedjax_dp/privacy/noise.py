"""Gaussian noise for the aggregate.

Privacy: adding N(0, sigma^2 I) with sigma = z * S to a sum whose L2
sensitivity is S is the Gaussian mechanism with noise multiplier z (the ratio
dp_accounting's GaussianDpEvent takes). `noise_stddev` is the one place that
turns (z, clip norm) into sigma.
"""

import jax
import jax.numpy as jnp

from fedjax_dp import types


def noise_stddev(noise_multiplier, clip_norm) -> jax.Array:
  """sigma = z * C, the central noise scale for a sum of updates clipped to C.

  z = 0 gives exactly 0, also when C = inf (no clipping, no noise: plain
  FedAvg), where the product would be NaN.

  Args:
    noise_multiplier: z >= 0, the ratio of sigma to the clip norm.
    clip_norm: C > 0, possibly inf.

  Returns:
    float32 scalar sigma.
  """
  z = jnp.asarray(noise_multiplier, jnp.float32)
  c = jnp.asarray(clip_norm, jnp.float32)
  return jnp.where(z == 0, 0.0, z * c)


def add_iid_noise(tree: types.PyTree, scale: jax.Array, key: types.PRNGKey,
                  sample=jax.random.normal) -> types.PyTree:
  """Adds `scale * sample(key, shape)` float32 noise to every scalar of `tree`.

  Each leaf gets its own key split from `key`, so leaves are independent.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [
      (x.astype(jnp.float32)
       + scale * sample(k, x.shape, jnp.float32)).astype(x.dtype)
      for x, k in zip(leaves, keys)
  ]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def add_gaussian_noise(
    tree: types.PyTree, stddev: jax.Array, key: types.PRNGKey
) -> types.PyTree:
  """Adds independent N(0, stddev^2) float32 noise to every scalar of `tree`."""
  return add_iid_noise(tree, stddev, key, jax.random.normal)
