"""Per-example losses and metrics for classification and sequence prediction."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _per_example_mean(values: jax.Array) -> jax.Array:
  """Averages over all axes but the first (sequence positions, if any)."""
  if values.ndim == 1:
    return values
  return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example, [batch].

  logits [batch, ..., classes], labels int [batch, ...]; for sequences the
  per-position losses are averaged within each example.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32))
  return _per_example_mean(losses)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of correct predictions per example, [batch]."""
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return _per_example_mean(correct)


def loss_of(model) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The model's per-example loss (`types.Model.loss`; default
  `cross_entropy`)."""
  return model.loss or cross_entropy


def accuracy_of(model) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The model's per-example accuracy (`types.Model.accuracy`; default
  `accuracy`)."""
  return model.accuracy or accuracy
