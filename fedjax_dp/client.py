"""Local training of one client, written to be vmapped over a cohort.

A client runs a fixed number of local steps (`lax.scan` over the step axis of
its block): in non-private training, steps whose batch is entirely padding
change neither the parameters nor the optimizer state, so clients of different
sizes share one shape. DP-SGD training (example-level DP, see
`privacy.plan.noisy_batch_gradient`) runs and noises every step instead. The
result is the model delta (final minus initial parameters).
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


def select_examples(features, mask):
  """`features` with every padded example (mask False) replaced by zeros.

  Selected, not multiplied: NaN or Inf in a padded position never reaches
  the model, so neither the loss nor, through autodiff, the gradient of a
  real example can see it (a zero cotangent times a NaN partial is NaN).
  """
  def select(x):
    keep = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))
  return jax.tree_util.tree_map(select, features)


def masked_mean_loss(model: types.Model, params, features, mask) -> jax.Array:
  """Mean per-example loss over the real examples of one batch (0 if none)."""
  features = select_examples(features, mask)
  logits = model.apply(params, features["x"])
  per_example = losses.loss_of(model)(logits, features["y"])
  total = jnp.sum(jnp.where(mask, per_example, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _single_example_loss(model: types.Model, params, example) -> jax.Array:
  """Loss of one example (features without a batch axis), as a scalar."""
  batch = jax.tree_util.tree_map(lambda x: x[None], example)
  return masked_mean_loss(model, params, batch, jnp.ones((1,), bool))


def _train_locally(
    step_gradient: Callable[..., tuple[jax.Array, types.Params]],
    optimizer: optax.GradientTransformation,
    params,
    features,
    example_mask,
    *,
    skip_empty_steps: bool,
    unroll: int | bool,
) -> ClientOutput:
  """The local loop shared by the client updates: a scan of optimizer steps.

  Args:
    step_gradient: (params, batch features, batch mask, step index) ->
      (loss of the batch, gradient).
    optimizer: the local optax optimizer.
    params: the initial parameters.
    features: feature name -> [steps, batch, ...].
    example_mask: bool [steps, batch].
    skip_empty_steps: whether an all-padding step leaves parameters and
      optimizer state untouched (non-private training) or runs like any other
      step (DP-SGD, whose step count must not depend on the data).
    unroll: `lax.scan` unroll.

  Returns:
    ClientOutput: delta, mean loss over steps with real examples, and the
    number of real examples.
  """

  def step(carry, batch):
    p, opt_state = carry
    f, m, index = batch
    loss, grads = step_gradient(p, f, m, index)
    updates, new_state = optimizer.update(grads, opt_state, p)
    new_p = optax.apply_updates(p, updates)
    active = jnp.any(m)
    if skip_empty_steps:
      # An all-padding step must not move the parameters, not even through
      # momentum or Adam's state.
      keep = lambda new, old: jnp.where(active, new, old)
      new_p = jax.tree_util.tree_map(keep, new_p, p)
      new_state = jax.tree_util.tree_map(keep, new_state, opt_state)
    return (new_p, new_state), (jnp.where(active, loss, 0.0), active)

  num_steps = example_mask.shape[0]
  (final, _), (step_losses, active) = jax.lax.scan(
      step, (params, optimizer.init(params)),
      (features, example_mask, jnp.arange(num_steps)), unroll=unroll)
  num_active = jnp.sum(active.astype(jnp.float32))
  mean_loss = jnp.sum(step_losses) / jnp.maximum(num_active, 1.0)
  return ClientOutput(
      delta=tree_util.tree_sub(final, params),
      loss=mean_loss,
      num_examples=jnp.sum(example_mask.astype(jnp.int32)))


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
    return _train_locally(
        lambda p, f, m, _: grad_fn(p, f, m), optimizer_fn(learning_rate),
        params, features, example_mask, skip_empty_steps=True, unroll=unroll)

  return client_update


def make_dp_sgd_client_update(
    model: types.Model,
    optimizer_fn: ClientOptimizerFn,
    noisy_batch_gradient: Callable,
    *,
    unroll: int | bool = 1,
) -> Callable[..., ClientOutput]:
  """Builds a DP-SGD client update (example-level DP inside the client).

  The returned function is
  `update(params, features, example_mask, learning_rate, example_clip_norm,
  example_noise_multiplier, key) -> ClientOutput`, pure and vmappable over
  clients (features [steps, batch, ...], example_mask [steps, batch], key).
  Each step takes per-example gradients (vmap over the batch), passes them
  through `noisy_batch_gradient` (the privacy plan's, privacy/plan.py) with key
  `fold_in(key, step_index)`, and feeds the noisy gradient to the optimizer.
  Every step runs, all-padding ones included (pure noise).

  Args:
    model: the model (pure init/apply); its `apply` must treat examples
      independently (no batch statistics), or per-example gradients would
      not bound one example's influence.
    optimizer_fn: learning rate -> optax optimizer (post-processing of the
      noisy gradients, so any optimizer keeps the guarantee).
    noisy_batch_gradient: `privacy.plan.noisy_batch_gradient`: clips every
      example's gradient, sums, noises and divides by the batch size.
    unroll: `lax.scan` unroll of the local steps.

  Returns:
    The update function. Its ClientOutput's delta is the private output;
    `loss` (mean masked loss over steps with real examples) and
    `num_examples` are raw-data diagnostics, not covered by the guarantee.

  Privacy: `privacy.events.example_level(z, local_epochs)` per round,
    under zero-out neighbours, given a block from `data.blocks.make_block`
    whose num_steps comes from public settings (see
    `privacy.plan.noisy_batch_gradient`).
  """
  per_example_grads = jax.vmap(
      jax.value_and_grad(lambda p, ex: _single_example_loss(model, p, ex)),
      in_axes=(None, 0))

  def update(params, features, example_mask, learning_rate,
             example_clip_norm, example_noise_multiplier, key):

    def step_gradient(p, f, m, index):
      losses_, grads = per_example_grads(p, f)
      noisy = noisy_batch_gradient(
          grads, m, example_clip_norm, example_noise_multiplier,
          m.shape[0], jax.random.fold_in(key, index))
      # Diagnostic only, over the examples that count (the noisy gradient
      # leaves out examples whose gradient is not finite).
      counted = m & jnp.isfinite(losses_)
      loss = jnp.sum(jnp.where(counted, losses_, 0.0)) / jnp.maximum(
          jnp.sum(counted.astype(jnp.float32)), 1.0)
      return loss, noisy.gradient

    return _train_locally(
        step_gradient, optimizer_fn(learning_rate), params, features,
        example_mask, skip_empty_steps=False, unroll=unroll)

  return update
