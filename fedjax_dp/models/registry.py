"""Builds a model by name, the way configs refer to models."""

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import charlm
from fedjax_dp.models import cnn
from fedjax_dp.models import logistic
from fedjax_dp.models import mlp
from fedjax_dp.models import sensor

NAMES = (
    "logistic",
    "mlp_2nn",
    "2nn",
    "cnn",
    "cnn_groupnorm",
    "conv1d",
    "gru_lm",
    "lstm_lm",
    "transformer_lm",
)

_LANGUAGE_MODELS = ("gru_lm", "lstm_lm", "transformer_lm")


def get_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    **kwargs: Any,
) -> types.Model:
  """Builds the model registered under `name`.

  Args:
    name: one of `NAMES` ("2nn" is an alias of "mlp_2nn").
    input_shape: shape of one example without the batch axis. For the
      language models it is `(seq_len,)`.
    num_classes: number of output logits; for the language models, the
      vocabulary size.
    **kwargs: architecture options passed to the builder, e.g. `hidden` for
      "mlp_2nn", `channels` for "conv1d" or `d_model` for "transformer_lm".

  Returns:
    The `types.Model`.

  Raises:
    ValueError: if `name` is unknown, or a language model gets an
      `input_shape` that is not `(seq_len,)`.
  """
  if name not in NAMES:
    raise ValueError(
        f"model: unknown model name {name!r}; allowed names are"
        f" {', '.join(NAMES)}"
    )
  input_shape = tuple(int(d) for d in input_shape)
  if name in _LANGUAGE_MODELS and len(input_shape) != 1:
    raise ValueError(
        f"input_shape for model {name!r} must be (seq_len,), got {input_shape}"
    )
  builder, fixed = _BUILDERS[name]
  allowed = [p for p in inspect.signature(builder).parameters
             if p not in fixed]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f"config field 'model_kwargs': unknown argument {unknown[0]!r} for "
        f"model {name!r}; allowed: {', '.join(allowed) or 'none'}")
  try:
    if name in _LANGUAGE_MODELS:
      return builder(num_classes, seq_len=input_shape[0], **kwargs)
    return builder(input_shape, num_classes, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config field 'model_kwargs' {kwargs} does not build "
                     f"model {name!r}: {e}") from None


# name -> (builder, the parameters get_model itself passes).
_BUILDERS = {
    "logistic": (logistic.logistic_regression, ("input_shape", "num_classes")),
    "mlp_2nn": (mlp.mlp_2nn, ("input_shape", "num_classes")),
    "2nn": (mlp.mlp_2nn, ("input_shape", "num_classes")),
    "cnn": (cnn.cnn_mcmahan, ("input_shape", "num_classes")),
    "cnn_groupnorm": (cnn.cnn_groupnorm, ("input_shape", "num_classes")),
    "conv1d": (sensor.conv1d, ("input_shape", "num_classes")),
    "gru_lm": (charlm.gru_lm, ("vocab_size", "seq_len")),
    "lstm_lm": (charlm.lstm_lm, ("vocab_size", "seq_len")),
    "transformer_lm": (charlm.transformer_lm, ("vocab_size", "seq_len")),
}


# The built-in models a user's model may turn out to be (see
# `builtin_equivalent`): the ones with a faster round of their own.
_EQUIVALENT_CANDIDATES = ("mlp_2nn", "logistic", "cnn")


def builtin_equivalent(model: types.Model, params_shape,
                       input_dtype=jnp.float32) -> str | None:
  """The built-in model that computes exactly what `model` computes, if any.

  Decided from the model itself, not its name: the same parameter tree
  (names and shapes) and the same traced program (jaxpr) for a batch of
  inputs as one of `_EQUIVALENT_CANDIDATES` built for its parameter shapes.
  A model that passes computes the same function of the same parameters,
  so a round specialised to that built-in model trains it exactly.

  Args:
    model: the model, e.g. a user's flax module wrapped by
      `user_model.to_model`.
    params_shape: its parameters' shapes (`jax.eval_shape(model.init, key)`).
    input_dtype: the dtype of its inputs.
  """
  x = jax.ShapeDtypeStruct((2,) + tuple(model.input_shape), input_dtype)
  try:
    program = str(jax.make_jaxpr(model.apply)(params_shape, x))
  except Exception:  # pylint: disable=broad-except
    return None
  target = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params_shape)
  for name in _EQUIVALENT_CANDIDATES:
    kwargs = _kwargs_for(name, params_shape)
    if kwargs is None:
      continue
    try:
      candidate = get_model(name, model.input_shape, model.num_classes,
                            **kwargs)
      shape = jax.eval_shape(candidate.init, jax.random.key(0))
    except (TypeError, ValueError):
      continue
    if jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shape) != target:
      continue
    if str(jax.make_jaxpr(candidate.apply)(shape, x)) == program:
      return name
  return None


def _kwargs_for(name: str, params_shape) -> dict | None:
  """The builder's arguments that give a model these parameter shapes (the
  MLP's hidden widths), or None where `name` cannot have them."""
  if name != "mlp_2nn":
    return {}
  if not isinstance(params_shape, dict) or not params_shape:
    return None
  layers = [params_shape.get(f"Dense_{i}") for i in range(len(params_shape))]
  if any(not isinstance(l, dict) or "kernel" not in l for l in layers):
    return None
  return {"hidden": [int(l["kernel"].shape[1]) for l in layers[:-1]]}
