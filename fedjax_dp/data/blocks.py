"""Turning a sampled cohort into one fixed-shape, padded block of batches.

Every round of the compiled program sees the same shapes: clients x local
steps x batch x features, with an example mask (padded examples) and a client
mask (padded client slots). Fixed shapes mean one compilation for the whole
run; the masks make padding contribute exactly nothing.
"""

import math
import os
from typing import NamedTuple

import numpy as np

from fedjax_dp.data import population as population_lib


class ClientBlock(NamedTuple):
  """A cohort laid out for local training: NumPy arrays on the host, the
  same fields as device arrays inside the compiled round (one block type for
  both).

  Attributes:
    features: feature name -> array [clients, steps, batch, ...].
    example_mask: bool [clients, steps, batch]; False for padding.
    client_mask: bool [clients]; False for padded client slots.
  """

  features: dict[str, np.ndarray]
  example_mask: np.ndarray
  client_mask: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.client_mask.shape[0])

  @property
  def num_steps(self) -> int:
    return int(self.example_mask.shape[1])

  @property
  def batch_size(self) -> int:
    return int(self.example_mask.shape[2])


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches one epoch over `num_examples` takes (the last may be partial)."""
  return math.ceil(num_examples / batch_size)


def num_local_steps(max_examples: int, batch_size: int, epochs: int) -> int:
  """Static number of local steps: enough for the largest client's epochs."""
  return epochs * steps_per_epoch(max(max_examples, 1), batch_size)


# Share of the host's memory one block may take: the prefetcher holds up to
# three (two prepared ahead, one in use) and, on CPU, the device its copy.
BLOCK_MEMORY_FRACTION = 1 / 8


def block_bytes(feature_specs: dict, slots: int, num_steps: int,
                batch_size: int) -> int:
  """Bytes of a block of `slots` clients (features and masks)."""
  per_example = 1 + sum(  # the example mask's byte
      math.prod(shape) * np.dtype(dtype).itemsize
      for shape, dtype in feature_specs.values())
  return slots * num_steps * batch_size * per_example + slots


def host_memory_bytes() -> int:
  """Physical memory of this machine (0 where the OS does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def memory_budget_bytes() -> int:
  """Bytes one block (or another per-run host array) may take: a
  `BLOCK_MEMORY_FRACTION` of host memory (0: unknown, nothing refused)."""
  return int(BLOCK_MEMORY_FRACTION * host_memory_bytes())


def check_block_size(feature_specs: dict, slots: int, num_steps: int,
                     batch_size: int, budget_bytes: int | None = None) -> None:
  """Refuses a block over `budget_bytes` (default: `memory_budget_bytes()`),
  from sizes alone, before anything is allocated.

  Raises:
    ValueError: naming the config fields that size the block.
  """
  if budget_bytes is None:
    budget_bytes = memory_budget_bytes()
  needed = block_bytes(feature_specs, slots, num_steps, batch_size)
  if budget_bytes and needed > budget_bytes:
    raise ValueError(
        f"config fields 'batch_size' ({batch_size}), 'local_epochs' and "
        f"'max_examples_per_client' give {num_steps} local steps of "
        f"{batch_size} examples for each of {slots} client slots (from "
        f"'cohort_size' / 'sampling_probability', rounded up to whole "
        f"'clients_per_chunk'): a block of "
        f"{needed / 2**30:.3g} GiB, over the {budget_bytes / 2**30:.3g} GiB "
        "one round may take on this machine; lower batch_size, local_epochs, "
        "max_examples_per_client, the cohort or clients_per_chunk")


def make_block(
    population: population_lib.FederatedPopulation,
    client_indices: np.ndarray,
    client_valid: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    num_steps: int,
    rng: np.random.Generator,
    max_examples_per_client: int | None = None,
) -> ClientBlock:
  """Lays out the cohort's examples as [clients, steps, batch].

  Client k uses min(n_k, max_examples_per_client) of its examples (a fresh
  random subset each round), reshuffled every epoch; each epoch is
  ceil(n_used / batch_size) batches, the last one partial. Its steps come
  first; the remaining steps up to `num_steps` are fully masked, and the
  client update skips them. Every padded position (example or slot) holds
  zeros, never another client's data.

  Args:
    population: the population the indices refer to.
    client_indices: int [capacity]; entries where `client_valid` is False are
      ignored (padding).
    client_valid: bool [capacity].
    batch_size: examples per local step.
    epochs: local epochs.
    num_steps: static step count (see `num_local_steps`); must be enough for
      every client's epochs.
    rng: host randomness for the example order.
    max_examples_per_client: optional cap on examples used per client.

  Returns:
    The padded block.
  """
  capacity = int(client_indices.shape[0])
  rows = np.zeros((capacity, num_steps * batch_size), np.int64)
  mask = np.zeros((capacity, num_steps * batch_size), bool)
  counts = population.num_examples
  for slot in range(capacity):
    if not client_valid[slot]:
      continue
    client = int(client_indices[slot])
    n = int(counts[client])
    if max_examples_per_client is not None:
      n_used = min(n, max_examples_per_client)
    else:
      n_used = n
    if n_used == 0:
      continue
    chosen = rng.permutation(n)[:n_used] if n_used < n else np.arange(n)
    per_epoch = steps_per_epoch(n_used, batch_size)
    if epochs * per_epoch > num_steps:
      raise ValueError(
          f"client {population.client_ids[client]!r} needs "
          f"{epochs * per_epoch} local steps, block has num_steps={num_steps}")
    base = population.offsets[client]
    for epoch in range(epochs):
      start = epoch * per_epoch * batch_size
      order = chosen[rng.permutation(n_used)]
      rows[slot, start:start + n_used] = base + order
      mask[slot, start:start + n_used] = True
  rows = rows.reshape(capacity, num_steps, batch_size)
  mask = mask.reshape(capacity, num_steps, batch_size)


  def gather(array):
    if array.shape[0] == 0:
      # An empty cohort (a legitimate Poisson draw): every slot is padding.
      return np.zeros(rows.shape + array.shape[1:], array.dtype)
    # Padding positions index row 0 (some client's example); they are
    # zeroed so that padding never holds another client's data (NaN there
    # must not reach anyone's computation, whatever the masks do).
    out = array[rows]
    out[~mask] = 0
    return out

  features = {name: gather(array)
              for name, array in population.features.items()}
  return ClientBlock(features, mask, np.asarray(client_valid, bool).copy())
