"""Multinomial logistic regression: flatten, then one dense layer."""

import math

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import flax_model


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
  return flax_model.from_module(
      "logistic", module, jnp.zeros((1, math.prod(input_shape)), jnp.float32),
      input_shape, num_classes)
