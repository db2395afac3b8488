"""The privacy ledger and its DP events as JSON (checkpoints, ledger.jsonl).

DP events (dp_accounting) are written with a small explicit encoder for the
event types this package emits; floats go through JSON's shortest repr, so
they round-trip exactly and a restored ledger accounts exactly what was
recorded.
"""

from typing import Any

import dp_accounting

from fedjax_dp.privacy import accounting

# Field names and kinds of each event type, in dp_accounting's order.
# "float" / "int" fields are numbers; "ints" an int or a tuple of ints;
# "event" a nested event; "events" a list.
_EVENT_FIELDS = {
    "NoOpDpEvent": (),
    "NonPrivateDpEvent": (),
    "ZCDpEvent": (("rho", "float"), ("xi", "float")),
    "SingleEpochTreeAggregationDpEvent": (("noise_multiplier", "float"),
                                          ("step_counts", "ints")),
    "GaussianDpEvent": (("noise_multiplier", "float"),),
    "LaplaceDpEvent": (("noise_multiplier", "float"),),
    "PoissonSampledDpEvent": (("sampling_probability", "float"),
                              ("event", "event")),
    "SampledWithoutReplacementDpEvent": (("source_dataset_size", "int"),
                                         ("sample_size", "int"),
                                         ("event", "event")),
    "TruncatedSubsampledGaussianDpEvent": (("dataset_size", "int"),
                                           ("sampling_probability", "float"),
                                           ("truncated_batch_size", "int"),
                                           ("noise_multiplier", "float")),
    "SelfComposedDpEvent": (("event", "event"), ("count", "int")),
    "ComposedDpEvent": (("events", "events"),),
}


def encode_event(event: dp_accounting.DpEvent) -> dict:
  """A JSON-ready dict for `event` (types in `_EVENT_FIELDS` only).

  Raises:
    ValueError: an event type this encoder does not know.
  """
  name = type(event).__name__
  # Exact types only: a subclass may carry fields this encoder would drop.
  if name not in _EVENT_FIELDS or type(event) is not getattr(
      dp_accounting, name):
    raise ValueError(
        f"cannot encode DP event of type {type(event).__qualname__}; known "
        f"types: {sorted(_EVENT_FIELDS)}")
  out = {"type": name}
  for field, kind in _EVENT_FIELDS[name]:
    value = getattr(event, field)
    if kind == "float":
      out[field] = float(value)
    elif kind == "int":
      out[field] = int(value)
    elif kind == "ints":
      out[field] = (int(value) if isinstance(value, int) else
                    [int(v) for v in value])
    elif kind == "event":
      out[field] = encode_event(value)
    else:
      out[field] = [encode_event(e) for e in value]
      if isinstance(value, tuple):  # list and tuple compare unequal in attrs
        out["sequence"] = "tuple"
  return out


def decode_event(data: Any) -> dp_accounting.DpEvent:
  """Inverse of `encode_event`.

  Raises:
    ValueError: `data` is not an encoded event of a known type.
  """
  if not isinstance(data, dict) or data.get("type") not in _EVENT_FIELDS:
    raise ValueError(f"not an encoded DP event of a known type: {data!r:.200}")
  name = data["type"]
  fields = _EVENT_FIELDS[name]
  expected = {"type"} | {f for f, _ in fields}
  as_tuple = data.get("sequence") == "tuple" and name == "ComposedDpEvent"
  if set(data) - ({"sequence"} if as_tuple else set()) != expected:
    raise ValueError(
        f"encoded {name} must have keys {sorted(expected)}, got "
        f"{sorted(data)}")
  kwargs = {}
  for field, kind in fields:
    value = data[field]
    if kind == "float":
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}.{field} must be a number, got {value!r}")
      kwargs[field] = float(value)
    elif kind == "int":
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}.{field} must be an integer, got {value!r}")
      kwargs[field] = value
    elif kind == "ints":
      ints = [value] if not isinstance(value, list) else value
      if not ints or any(isinstance(v, bool) or not isinstance(v, int)
                         for v in ints):
        raise ValueError(
            f"{name}.{field} must be an integer or a list of them, got "
            f"{value!r:.200}")
      # A tuple: events must be hashable (the ledger counts equal events).
      kwargs[field] = value if not isinstance(value, list) else tuple(value)
    elif kind == "event":
      kwargs[field] = decode_event(value)
    else:
      if not isinstance(value, list):
        raise ValueError(f"{name}.{field} must be a list, got {value!r:.200}")
      kwargs[field] = [decode_event(e) for e in value]
      if as_tuple:
        kwargs[field] = tuple(kwargs[field])
  return getattr(dp_accounting, name)(**kwargs)


def encode_ledger(ledger: accounting.PrivacyLedger) -> dict:
  """The ledger (relation, delta, accountant, every round's event) as JSON."""
  return {
      "relation": ledger.relation.value,
      "delta": float(ledger.delta),
      "accountant": ledger.accountant,
      "entries": [{"round": e.round, "event": encode_event(e.event)}
                  for e in ledger.entries],
  }


def decode_ledger(data: Any) -> accounting.PrivacyLedger:
  """Inverse of `encode_ledger`: a ledger holding the same rounds and events.

  Raises:
    ValueError: `data` is not an encoded ledger (or repeats a round).
  """
  try:
    ledger = accounting.PrivacyLedger(
        accounting.relation_named(data["relation"]), data["delta"],
        data["accountant"])
    for entry in data["entries"]:
      if set(entry) != {"round", "event"} or isinstance(
          entry["round"], bool) or not isinstance(entry["round"], int):
        raise ValueError(f"bad ledger entry {entry!r:.200}")
      ledger.record(entry["round"], decode_event(entry["event"]))
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"invalid privacy ledger: {type(e).__name__}: "
                     f"{e}") from None
  return ledger
