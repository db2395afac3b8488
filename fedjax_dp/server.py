"""The server step: a pure function over an optax optimizer.

The server treats the negated average client delta as a pseudo-gradient
(Reddi et al. 2021, "Adaptive Federated Optimization"): SGD with learning
rate 1 is FedAvg, momentum gives FedAvgM, Adam FedAdam and Yogi FedYogi.
The learning rate lives in the optimizer state (optax.inject_hyperparams) and
is overwritten each round from an array argument, so sweeps can vary it
without recompiling.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_dp import types

SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")


class ServerState(NamedTuple):
  """What the server carries from one round to the next."""

  params: types.Params
  opt_state: optax.OptState
  round: jax.Array  # int32 scalar: rounds completed
  # The privacy mechanism's own state (adaptive clipping's clip norm,
  # DP-FTRL's tree), from the run's privacy plan; None where the mechanism
  # carries nothing. The round updates it; the server step keeps it.
  privacy: Any = None


def server_optimizer(
    name: str,
    *,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.99,
    eps: float = 1e-3,
) -> optax.GradientTransformation:
  """Server optimizer by name, with an injectable `learning_rate`.

  Adaptive defaults (beta2=0.99, eps=1e-3) follow Reddi et al. 2021.
  """
  if name == "sgd":
    make = lambda learning_rate: optax.sgd(learning_rate)
  elif name == "momentum":
    make = lambda learning_rate: optax.sgd(learning_rate, momentum=momentum)
  elif name == "adam":
    make = lambda learning_rate: optax.adam(learning_rate, b1=beta1, b2=beta2,
                                            eps=eps)
  elif name == "yogi":
    make = lambda learning_rate: optax.yogi(learning_rate, b1=beta1, b2=beta2,
                                            eps=eps)
  elif name == "adagrad":
    make = lambda learning_rate: optax.adagrad(learning_rate, eps=eps)
  else:
    raise ValueError(
        f"server_optimizer must be one of {list(SERVER_OPTIMIZERS)}, got "
        f"{name!r}")
  return optax.inject_hyperparams(make)(learning_rate=1.0)


def init(params: types.Params, optimizer: optax.GradientTransformation,
         privacy: Any = None) -> ServerState:
  """The state before round 0; `privacy` is the plan's
  `PrivacyPlan.initial_state` (None where the mechanism carries nothing)."""
  return ServerState(params, optimizer.init(params), jnp.zeros((), jnp.int32),
                     privacy)


def step(
    state: ServerState,
    average_update: types.Params,
    learning_rate: jax.Array,
    optimizer: optax.GradientTransformation,
) -> ServerState:
  """Applies one aggregated (noisy, averaged) client delta."""
  # A new state with this round's learning rate (the caller's state is
  # never modified in place).
  hyperparams = dict(state.opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.asarray(
      learning_rate, jnp.asarray(hyperparams["learning_rate"]).dtype)
  opt_state = state.opt_state._replace(hyperparams=hyperparams)
  pseudo_grad = jax.tree_util.tree_map(jnp.negative, average_update)
  updates, opt_state = optimizer.update(pseudo_grad, opt_state, state.params)
  return state._replace(params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state, round=state.round + 1)
