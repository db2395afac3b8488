"""Turning a sampled cohort into one fixed-shape, padded block of batches.

Every round of the compiled program sees the same shapes: clients x local
steps x batch x features, with an example mask (padded examples) and a client
mask (padded client slots). Fixed shapes mean one compilation for the whole
run; the masks make padding contribute exactly nothing.

Which example goes where is drawn by one function, `example_positions`, with
jax.random from the round's data key: the host (`make_block`) and the rounds
that run on the device (on_device.py) call it alike, so both lay out the
same block, example for example.
"""

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
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


def example_bytes(feature_specs: dict) -> int:
  """Bytes of one example's features."""
  return sum(math.prod(shape) * np.dtype(dtype).itemsize
             for shape, dtype in feature_specs.values())


def block_bytes(feature_specs: dict, slots: int, num_steps: int,
                batch_size: int) -> int:
  """Bytes of a block of `slots` clients (features and masks)."""
  per_example = 1 + example_bytes(feature_specs)  # and the mask's byte
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


def example_width(num_examples: np.ndarray) -> int:
  """The width examples are ordered within: the largest client's count (at
  least 1). Host and device must use the same width for the same orders."""
  return max(int(np.max(num_examples, initial=0)), 1)


def _random_order(key: jax.Array, n: jax.Array, width: int) -> jax.Array:
  """A uniformly random order of 0..n-1 in the first n of `width` entries."""
  position = jnp.arange(width)
  # Real positions get a random priority in [0, 1), the rest sort last.
  priority = jnp.where(position < n, jax.random.uniform(key, (width,)), 2.0)
  return jnp.argsort(priority)


@functools.partial(jax.jit, static_argnames=(
    "width", "batch_size", "epochs", "num_steps", "max_examples_per_client"))
def example_positions(key: jax.Array, counts: jax.Array, *, width: int,
                      batch_size: int, epochs: int, num_steps: int,
                      max_examples_per_client: int | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Which of its own examples each slot trains on, at every position.

  Slot k holds counts[k] examples (0 for padding) and uses n_k =
  min(counts[k], max_examples_per_client) of them: a random subset when
  capped (the same in every epoch of the round), reshuffled every epoch
  into ceil(n_k / batch_size) steps with only the last partial. Its epochs
  come first; the remaining steps up to `num_steps` are masked. Slot k's
  randomness is the k-th split of `key`, whoever else is in the block.

  Args:
    key: the round's data key.
    counts: int32 [slots], each slot's number of examples.
    width: static, at least every count (`example_width`).
    batch_size: examples per local step.
    epochs: local epochs.
    num_steps: static step count (`num_local_steps`).
    max_examples_per_client: optional cap on examples used per client.

  Returns:
    (positions, mask): int32 and bool [slots, num_steps * batch_size]; a
    position indexes the slot's own examples (0 where masked).
  """
  cap = max_examples_per_client

  def client_positions(key, n):
    subset_key, epoch_key = jax.random.split(key)
    if cap is None:
      n_used, chosen = n, jnp.arange(width)
    else:
      n_used = jnp.minimum(n, cap)
      # The first n_used entries of `chosen` are the round's subset.
      chosen = _random_order(subset_key, n, width)
    orders = jax.vmap(lambda k: chosen[_random_order(k, n_used, width)])(
        jax.random.split(epoch_key, epochs))  # [epochs, width]
    span = -(-n_used // batch_size) * batch_size  # positions one epoch takes
    position = jnp.arange(num_steps * batch_size)
    epoch = position // jnp.maximum(span, 1)
    offset = position - epoch * span
    real = (n_used > 0) & (epoch < epochs) & (offset < n_used)
    rows = orders[jnp.minimum(epoch, epochs - 1),
                  jnp.minimum(offset, width - 1)]
    return jnp.where(real, rows, 0).astype(jnp.int32), real

  keys = jax.random.split(key, counts.shape[0])
  return jax.vmap(client_positions)(keys, jnp.asarray(counts, jnp.int32))


# XLA:CPU takes host memory aligned to this many bytes without copying it
# (jax.device_put of a 60 MB cohort: 40 ms copied, 0.05 ms aliased).
_DEVICE_ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a `_DEVICE_ALIGNMENT`-byte
  boundary, so that the device can use it in place (its contents must not
  change once it is on the device)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _DEVICE_ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _DEVICE_ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def make_block(
    population: population_lib.FederatedPopulation,
    client_indices: np.ndarray,
    client_valid: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    num_steps: int,
    key: jax.Array,
    width: int | None = None,
    max_examples_per_client: int | None = None,
) -> ClientBlock:
  """Lays out the cohort's examples as [clients, steps, batch].

  Each client's examples are placed by `example_positions` (a fresh random
  subset each round when capped, reshuffled every epoch, padding after its
  epochs). Every padded position (example or slot) holds zeros, never
  another client's data.

  Args:
    population: the population the indices refer to.
    client_indices: int [capacity]; entries where `client_valid` is False are
      ignored (padding).
    client_valid: bool [capacity].
    batch_size: examples per local step.
    epochs: local epochs.
    num_steps: static step count (see `num_local_steps`); must be enough for
      every client's epochs.
    key: the round's data key (the example order).
    width: `example_width` of the whole training population (the orders
      depend on it); default: this population's.
    max_examples_per_client: optional cap on examples used per client.

  Returns:
    The padded block.

  Raises:
    ValueError: a client needs more than `num_steps` local steps.
  """
  capacity = int(client_indices.shape[0])
  valid = np.asarray(client_valid, bool)
  clients = np.where(valid, np.asarray(client_indices, np.int64), 0)
  counts = np.where(valid, population.num_examples[clients]
                    if population.num_clients else 0, 0).astype(np.int64)
  used = counts if max_examples_per_client is None else np.minimum(
      counts, max_examples_per_client)
  needs = epochs * -(-used // batch_size)
  if np.any(needs > num_steps):
    slot = int(np.argmax(needs > num_steps))
    raise ValueError(
        f"client {population.client_ids[clients[slot]]!r} needs "
        f"{int(needs[slot])} local steps, block has num_steps={num_steps}")
  if width is None:
    width = example_width(population.num_examples)
  positions, mask = jax.device_get(example_positions(
      key, counts.astype(np.int32), width=width, batch_size=batch_size,
      epochs=epochs, num_steps=num_steps,
      max_examples_per_client=max_examples_per_client))
  offsets = (np.asarray(population.offsets)[clients] if population.num_clients
             else np.zeros((capacity,), np.int64))
  rows = np.where(mask, offsets[:, None] + positions, 0)
  rows = rows.reshape(capacity, num_steps, batch_size)
  mask = np.array(mask, bool).reshape(capacity, num_steps, batch_size)

  flat_rows = rows.reshape(-1)

  def gather(array):
    out = _aligned_empty(rows.shape + array.shape[1:], array.dtype)
    if array.shape[0] == 0:
      # An empty cohort (a legitimate Poisson draw): every slot is padding.
      out[...] = 0
      return out
    if flat_rows.size and not 0 <= flat_rows.min() <= flat_rows.max() < (
        array.shape[0]):
      raise AssertionError("a block row lies outside the population")
    # Every row is in range (checked), so "clip" never clips; it is the mode
    # in which numpy gathers straight into `out` (about 3x faster).
    np.take(array, flat_rows, axis=0,
            out=out.reshape((-1,) + array.shape[1:]), mode="clip")
    # Padding positions index row 0 (some client's example); they are
    # zeroed so that padding never holds another client's data (NaN there
    # must not reach anyone's computation, whatever the masks do).
    out[~mask] = 0
    return out

  features = {name: gather(array)
              for name, array in population.features.items()}
  return ClientBlock(features, mask, valid.copy())
