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
    name: registry name (e.g. "cnn"), import path or label of the model.
    init: `init(key) -> params`.
    apply: `apply(params, x) -> logits`, `x` of shape [batch, *input_shape].
    input_shape: shape of one example's input, without the batch axis.
    num_classes: number of output logits.
    loss: `loss(logits, labels) -> [batch]`, the per-example loss that
      clients minimise and evaluation reports (None: softmax cross-entropy,
      `losses.cross_entropy`).
    accuracy: `accuracy(logits, labels) -> [batch]`, a per-example score in
      [0, 1] that evaluation reports as accuracy (None: top-1 accuracy,
      `losses.accuracy`).
  """

  name: str
  init: Callable[[PRNGKey], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  num_classes: int
  loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  accuracy: Callable[[jax.Array, jax.Array], jax.Array] | None = None
