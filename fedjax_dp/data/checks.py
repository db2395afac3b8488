"""Argument checks of the data loaders: a ValueError that names the argument
and its allowed range."""

import numpy as np


def check_int(name: str, value, low: int, high: int | None = None) -> int:
  """`value` as an int in [low, high] (no upper bound when `high` is None)."""
  allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise ValueError(f"{name} must be an int {allowed}, got {value!r}")
  if value < low or (high is not None and value > high):
    raise ValueError(f"{name} must be {allowed}, got {value}")
  return int(value)


def check_float(name: str, value, low: float, high: float) -> float:
  """`value` as a float in [low, high] (NaN is refused)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a float in [{low}, {high}], got "
                     f"{value!r}") from None
  if not low <= value <= high:
    raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
  return value
