"""A user's own model as the core's `types.Model`.

Accepted forms (`to_model`):
  * a flax `nn.Module` instance, stateless (no batch statistics, no dropout
    collections): its `params` are the model's parameters;
  * a flax `nn.Module` class, built with the config's `model_kwargs`;
  * a `types.Model` (init/apply pair with optional loss and accuracy);
  * an `(init, apply)` pair: `init(key) -> params`, `apply(params, x) ->
    logits`;
  * a function returning any of these, called with the config's
    `model_kwargs` (and `input_shape`, `num_classes` where it takes them).

A module instance's constructor arguments (`describe`) are what the run
records, with its class's import path, so that the run can be rebuilt from
its directory.
"""

import dataclasses
import inspect
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import import_paths
from fedjax_dp import types
from fedjax_dp.models import flax_model

# Dataclass fields every flax module has that are not its architecture.
_FLAX_FIELDS = ("parent", "name")


def to_model(obj: Any, *, name: str, input_shape: tuple[int, ...],
             num_classes: int, input_dtype=np.float32,
             kwargs: dict | None = None) -> types.Model:
  """`obj` (see the module docstring) as a `types.Model`.

  Args:
    obj: the user's model in one of the accepted forms.
    name: the name the run records for it (import path or label).
    input_shape: shape of one example's "x", without the batch axis.
    num_classes: number of labels.
    input_dtype: dtype of "x" (integer tokens for language models).
    kwargs: the config's `model_kwargs`, for a class or a builder function.

  Raises:
    ValueError: naming `model` or `model_kwargs`, when `obj` is none of the
      accepted forms or does not build with these arguments.
  """
  kwargs = dict(kwargs or {})
  if isinstance(obj, type) and issubclass(obj, nn.Module):
    try:
      obj = obj(**kwargs)
    except TypeError as e:
      raise ValueError(f"config field 'model_kwargs' {kwargs} does not "
                       f"build {name}: {e}") from None
    kwargs = {}
  elif (callable(obj) and not isinstance(obj, (nn.Module, types.Model))
        and not isinstance(obj, type)):
    obj = _call_builder(obj, name, kwargs, input_shape, num_classes)
    kwargs = {}
  if kwargs:
    raise ValueError(
        f"config field 'model_kwargs' must be empty for a model passed as "
        f"an object ({name}), got {kwargs}")
  if isinstance(obj, nn.Module):
    dummy = jnp.zeros((1,) + tuple(input_shape), input_dtype)
    return flax_model.from_module(name, obj, dummy, tuple(input_shape),
                                  num_classes)
  if isinstance(obj, types.Model):
    return obj._replace(name=name, input_shape=tuple(input_shape),
                        num_classes=num_classes)
  if (isinstance(obj, tuple) and len(obj) == 2
      and all(callable(f) for f in obj)):
    init, apply = obj
    return types.Model(name=name, init=jax.jit(init), apply=jax.jit(apply),
                       input_shape=tuple(input_shape),
                       num_classes=num_classes)
  raise ValueError(
      f"config field 'model': {name} is a {type(obj).__name__}; expected a "
      "flax nn.Module (instance or class), a fedjax_dp.types.Model, an "
      "(init, apply) pair, or a function returning one of these")


def _call_builder(fn, name, kwargs, input_shape, num_classes):
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  extra = {"input_shape": tuple(input_shape), "num_classes": num_classes}
  given = {k: v for k, v in extra.items() if k in params and k not in kwargs}
  try:
    return fn(**kwargs, **given)
  except TypeError as e:
    raise ValueError(f"config field 'model_kwargs' {kwargs} does not build "
                     f"{name}: {e}") from None


def describe(module: nn.Module) -> tuple[str, dict] | None:
  """(import path of the module's class, its constructor arguments), from
  which `to_model` rebuilds the same module; None where either cannot be
  recorded (a class without an import path, or arguments that are not
  JSON values)."""
  path = import_paths.path_of(type(module))
  if path is None:
    return None
  kwargs = {}
  for field in dataclasses.fields(module):
    if field.name in _FLAX_FIELDS or not field.init:
      continue
    value = getattr(module, field.name)
    if field.default is not dataclasses.MISSING and (
        value is field.default or _same(value, field.default)):
      continue
    kwargs[field.name] = value
  try:
    recorded = json.loads(json.dumps(kwargs))
    rebuilt = type(module)(**recorded)
  except (TypeError, ValueError):
    return None
  # What config.json gives back must build the module again.
  if not all(_same(getattr(rebuilt, k), getattr(module, k)) for k in kwargs):
    return None
  return path, recorded


def _same(a, b) -> bool:
  """Equal as JSON values (a tuple and a list of the same items are)."""
  try:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  except (TypeError, ValueError):
    return False
