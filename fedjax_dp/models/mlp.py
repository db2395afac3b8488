"""The "2NN" multilayer perceptron of McMahan et al. (2017).

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017: on MNIST, 784-200-200-10 with ReLU
(199,210 parameters).
"""

import math
from typing import Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import flax_model


class _MLP(nn.Module):
  """Flatten, then dense + ReLU per hidden width, then dense logits."""

  hidden: tuple[int, ...]
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32).reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def mlp_2nn(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (200, 200),
) -> types.Model:
  """Builds the 2NN (a ReLU MLP; two hidden layers of 200 by default).

  Args:
    input_shape: shape of one example without the batch axis; the input
      layer has `prod(input_shape)` units (784 for 28x28).
    num_classes: number of output logits.
    hidden: widths of the hidden layers.

  Returns:
    A `types.Model`; `apply(params, x)` takes float `x` of shape
    [batch, *input_shape] and returns float32 logits [batch, num_classes].
  """
  input_shape = tuple(int(d) for d in input_shape)
  hidden = tuple(int(h) for h in hidden)
  if any(h < 1 for h in hidden):
    raise ValueError(f"hidden widths must be integers >= 1, got {hidden}")
  module = _MLP(hidden=hidden, num_classes=num_classes)
  return flax_model.from_module(
      "mlp_2nn", module, jnp.zeros((1, math.prod(input_shape)), jnp.float32),
      input_shape, num_classes)
