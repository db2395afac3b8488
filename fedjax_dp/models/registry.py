"""Builds a model by name, the way configs refer to models."""

import inspect
from typing import Any

from fedjax_dp import types
from fedjax_dp.models import charlm
from fedjax_dp.models import cnn
from fedjax_dp.models import logistic
from fedjax_dp.models import mlp

NAMES = (
    "logistic",
    "mlp_2nn",
    "2nn",
    "cnn",
    "cnn_groupnorm",
    "gru_lm",
    "transformer_lm",
)

_LANGUAGE_MODELS = ("gru_lm", "transformer_lm")


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
      "mlp_2nn" or `d_model` for "transformer_lm".

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
    "gru_lm": (charlm.gru_lm, ("vocab_size", "seq_len")),
    "transformer_lm": (charlm.transformer_lm, ("vocab_size", "seq_len")),
}
