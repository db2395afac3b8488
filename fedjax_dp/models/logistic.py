"""Multinomial logistic regression: flatten, then one dense layer."""

import math

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types


class _Logistic(nn.Module):
  """Flatten every non-batch axis, then a dense layer to the logits."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


def logistic_regression(
    input_shape: tuple[int, ...], num_classes: int
) -> types.Model:
  """Builds a logistic-regression model.

  Args:
    input_shape: shape of one example without the batch axis, e.g. (28, 28).
    num_classes: number of output logits.

  Returns:
    A `types.Model`; `apply(params, x)` takes float `x` of shape
    [batch, *input_shape] and returns float32 logits [batch, num_classes].
    It has `prod(input_shape) * num_classes + num_classes` parameters.
  """
  input_shape = tuple(int(d) for d in input_shape)
  module = _Logistic(num_classes=num_classes)
  dummy = jnp.zeros((1, math.prod(input_shape)), jnp.float32)

  def init(key: types.PRNGKey) -> types.Params:
    return module.init(key, dummy)["params"]

  def apply(params: types.Params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  # Jitted so host-side calls (init, evaluation) compile once instead of
  # dispatching op by op; inside a caller's jit, vmap or grad it is inlined.
  return types.Model(
      name="logistic",
      init=jax.jit(init),
      apply=jax.jit(apply),
      input_shape=input_shape,
      num_classes=num_classes,
  )
