"""Wraps a flax.linen module as the core's pure (init, apply) Model."""

import flax.linen as nn
import jax

from fedjax_dp import types


def from_module(
    name: str,
    module: nn.Module,
    dummy_input: jax.Array,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> types.Model:
  """A types.Model whose params are the module's `variables["params"]`.

  Args:
    name: registry name.
    module: a stateless flax module (no batch statistics, no dropout).
    dummy_input: an input batch of one example, used to build the params.
    input_shape: shape of one example.
    num_classes: number of output logits.
  """

  def init(key: types.PRNGKey) -> types.Params:
    return module.init(key, dummy_input)["params"]

  def apply(params: types.Params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  # Jitted so host-side calls (init, evaluation) compile once instead of
  # dispatching op by op; inside a caller's jit, vmap or grad it is inlined.
  return types.Model(name=name, init=jax.jit(init), apply=jax.jit(apply),
                     input_shape=input_shape, num_classes=num_classes)
