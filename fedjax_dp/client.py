"""Local training of one client, written to be vmapped over a cohort.

A client runs a fixed number of local steps (`lax.scan` over the step axis of
its block): steps whose batch is entirely padding change neither the
parameters nor the optimizer state, so clients of different sizes share one
shape. The result is the model delta (final minus initial parameters).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dp import losses
from fedjax_dp import tree_util
from fedjax_dp import types

# learning rate (a traced scalar) -> optax optimizer for local training.
ClientOptimizerFn = Callable[[jax.Array], optax.GradientTransformation]


class ClientOutput(NamedTuple):
  delta: types.Params
  # Mean training loss over the client's non-empty local steps.
  loss: jax.Array
  # Number of real examples the client trained on (a simulation diagnostic).
  num_examples: jax.Array


def client_optimizer(name: str, momentum: float = 0.0) -> ClientOptimizerFn:
  """Client optimizers by name: "sgd" (with optional momentum) or "adam"."""
  if name == "sgd":
    return lambda lr: optax.sgd(lr, momentum=momentum or None)
  if name == "adam":
    return lambda lr: optax.adam(lr)
  raise ValueError(f"client_optimizer must be one of ['sgd', 'adam'], got {name!r}")


def masked_mean_loss(model: types.Model, params, features, mask) -> jax.Array:
  """Mean per-example loss over the real examples of one batch (0 if none)."""
  logits = model.apply(params, features["x"])
  per_example = losses.cross_entropy(logits, features["y"])
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_client_update(
    model: types.Model,
    optimizer_fn: ClientOptimizerFn,
    *,
    unroll: int | bool = 1,
) -> Callable[..., ClientOutput]:
  """Builds `client_update(params, features, example_mask, learning_rate)`.

  Args:
    model: the model (pure init/apply).
    optimizer_fn: learning rate -> optax optimizer.
    unroll: `lax.scan` unroll of the local steps (True unrolls fully, which
      XLA:CPU runs much faster for convolutions).

  Returns:
    A pure function of one client's params, features [steps, batch, ...],
    example mask [steps, batch] and learning rate, returning ClientOutput.
  """
  grad_fn = jax.value_and_grad(
      lambda p, f, m: masked_mean_loss(model, p, f, m))

  def client_update(params, features, example_mask, learning_rate):
    optimizer = optimizer_fn(learning_rate)

    def step(carry, batch):
      p, opt_state = carry
      f, m = batch
      loss, grads = grad_fn(p, f, m)
      updates, new_state = optimizer.update(grads, opt_state, p)
      new_p = optax.apply_updates(p, updates)
      active = jnp.any(m)
      # An all-padding step must not move the parameters, not even through
      # momentum or Adam's state.
      keep = lambda new, old: jnp.where(active, new, old)
      p = jax.tree_util.tree_map(keep, new_p, p)
      opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
      return (p, opt_state), (loss * active, active)

    (final, _), (step_losses, active) = jax.lax.scan(
        step, (params, optimizer.init(params)), (features, example_mask),
        unroll=unroll)
    num_active = jnp.sum(active.astype(jnp.float32))
    mean_loss = jnp.sum(step_losses) / jnp.maximum(num_active, 1.0)
    return ClientOutput(
        delta=tree_util.tree_sub(final, params),
        loss=mean_loss,
        num_examples=jnp.sum(example_mask.astype(jnp.int32)))

  return client_update
