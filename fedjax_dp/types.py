"""Shared type aliases and small containers used across layers."""

from typing import Any, Callable, Mapping, NamedTuple

import jax

PyTree = Any
Params = PyTree
PRNGKey = jax.Array
# A batch maps feature names ("x", "y", ...) to arrays sharing a leading axis.
Batch = Mapping[str, jax.Array]


class Model(NamedTuple):
  """A model as two pure functions, the only form in which the core sees it.

  Attributes:
    name: registry name, e.g. "cnn".
    init: `init(key) -> params`.
    apply: `apply(params, x) -> logits`, `x` of shape [batch, *input_shape].
    input_shape: shape of one example's input, without the batch axis.
    num_classes: number of output logits.
  """

  name: str
  init: Callable[[PRNGKey], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  num_classes: int
