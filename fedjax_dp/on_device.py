"""Several rounds in one compiled call, with the population on the device.

The host loop (runner.py with `rounds_per_call=1`) samples each round's
cohort, gathers and pads its data with NumPy and calls the compiled round:
one host-device round trip per round, plus the host's data work. For a
population that fits in device memory this module moves all of it into one
program: every training client's examples live on the device as a padded
array, and one call runs K rounds in a loop (`lax.fori_loop`), each round

    sample (sim.plan.sampler.sample_round, the host's function and keys)
    -> gather the cohort's rows -> lay them out as [slots, steps, batch]
       with the masks of data/blocks.make_block
    -> sim.round_fn() with the host's noise key, hparams and secagg
       arguments; the server state carries the mechanism's state.

The runner records the K rounds' DP events in the ledger (and ledger.jsonl)
before the call, so no computed result is ever unaccounted.

Nothing differs from the host loop: the cohorts come from the same sampler
and keys, and each client's examples are placed by the same function
(`blocks.example_positions`) from the same key, `fold_in(streams.data, r)`,
so the blocks are the host's, example for example (tests/test_on_device.py).

Privacy: unchanged. Cohorts are drawn by the same sampler with the same keys
(so the recorded events describe them), the round function is the same, and
the layout uses the same step count, batch size, example cap and padding
(padded examples and slots are masked and contribute exactly zero).
"""

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import simulation
from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.data import population as population_lib
from fedjax_dp.data import source as source_lib
from fedjax_dp.data import blocks
from fedjax_dp.privacy import plan as plan_lib

# Share of an accelerator's memory the padded population may take. The rest
# holds what every round needs anyway -- parameters, optimizer state, the
# cohort's block and the round's working set (activations of a chunk of
# clients, Gram matrices of the factored round) -- and XLA's scratch space.
DEVICE_MEMORY_FRACTION = 0.25
# XLA:CPU reports no memory limit. Its "device" memory is host RAM, where
# the NumPy population (and, while it is copied, the padded one) also lives;
# 2 GiB keeps a run well inside a CI machine or a laptop.
CPU_MEMORY_BUDGET_BYTES = 2 << 30


class DevicePopulation(NamedTuple):
  """Every training client's examples, padded to one width.

  Attributes:
    features: feature name -> [num_clients, width, ...]; client i's examples
      are rows [i, :counts[i]], the rest zeros.
    counts: int32 [num_clients], examples per client.
  """

  features: dict
  counts: jax.Array


class MultiRoundKeys(NamedTuple):
  """The run's PRNG streams the rounds fold their index into."""

  sample: types.PRNGKey  # sampler.sample_round's stream key
  noise: types.PRNGKey  # round r's noise key is fold_in(noise, r)
  data: types.PRNGKey  # round r's example order: fold_in(data, r)


def multi_round_keys(streams: simulation.StreamKeys) -> MultiRoundKeys:
  """The run's sample and noise streams (as the runner's host loop uses
  them) and its on-device example-order stream."""
  return MultiRoundKeys(streams.sample, streams.noise, streams.data)


def check_supported(sim: simulation.Simulation) -> None:
  """Raises ValueError, naming the config field, for what only the host
  loop runs."""
  refused = plan_lib.refusal(sim.config, "rounds_per_call")
  if refused is not None:
    raise refused.error(sim.config)
  if sim.mesh is not None:
    # Sharded by default (shard_clients=None on several devices).
    raise ValueError(
        "config field 'shard_clients' must be false with rounds_per_call > 1 "
        "(the population is kept on one device); set shard_clients=false or "
        "rounds_per_call=1")


def population_bytes(source: source_lib.ClientSource) -> tuple[int, int]:
  """(bytes of the padded population, its width = the largest client)."""
  width = blocks.example_width(source.num_examples)
  per_example = sum(
      math.prod(shape) * np.dtype(dtype).itemsize
      for shape, dtype in source.feature_specs.values())
  counts = 4 * source.num_clients  # int32
  return source.num_clients * width * per_example + counts, width


def default_memory_budget(device: jax.Device | None = None) -> int:
  """Bytes the padded population may take on `device` (default: the first)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(DEVICE_MEMORY_FRACTION * stats["bytes_limit"])
  return CPU_MEMORY_BUDGET_BYTES


def device_population(sim: simulation.Simulation,
                      memory_budget_bytes: int | None = None
                      ) -> DevicePopulation:
  """Copies the training population to the device, padded per client.

  All of each client's examples are kept (not only `max_examples_per_client`
  of them): like the host, each round then picks a fresh subset.

  Raises:
    ValueError: naming `rounds_per_call`, if the padded population exceeds
      `memory_budget_bytes` (default: `default_memory_budget()`); checked
      from sizes alone, before anything is loaded or copied.
  """
  source = sim.train
  needed, width = population_bytes(source)
  budget = (default_memory_budget() if memory_budget_bytes is None
            else memory_budget_bytes)
  if needed > budget:
    raise ValueError(
        f"config field 'rounds_per_call' > 1 keeps the training population on "
        f"the device: {source.num_clients} clients padded to {width} examples "
        f"each take {needed / 2**20:.1f} MiB, over the budget of "
        f"{budget / 2**20:.1f} MiB (on_device.py); set "
        "rounds_per_call=1")
  if not isinstance(source, population_lib.FederatedPopulation):
    source = source.subset(range(source.num_clients))
  counts = source.num_examples
  owner = np.repeat(np.arange(source.num_clients), counts)
  position = np.arange(int(source.offsets[-1])) - source.offsets[owner]
  features = {}
  for name, array in source.features.items():
    padded = np.zeros((source.num_clients, width) + array.shape[1:],
                      array.dtype)
    padded[owner, position] = array
    features[name] = jax.device_put(padded)
  return DevicePopulation(features, jax.device_put(counts.astype(np.int32)))


def build_cohort_block(
    sim: simulation.Simulation
) -> Callable[[DevicePopulation, MultiRoundKeys, jax.Array],
              tuple[blocks.ClientBlock, jax.Array]]:
  """Builds `cohort_block(population, keys, r) -> (block, num_drawn)`.

  Round r's cohort is `sim.plan.sampler.sample_round(keys.sample, r)`, as on
  the host; its valid clients fill the first slots in the sampler's order
  (as Simulation.prepare packs them), and `blocks.example_positions` places
  their examples from `fold_in(keys.data, r)` with the host's width: the
  host's block, example for example. Padded examples are zeros.
  """
  config = sim.config
  sampler = sim.plan.sampler
  slots, num_steps = sim.slots, sim.num_steps
  width = sim.example_width

  def cohort_block(population: DevicePopulation, keys: MultiRoundKeys,
                   round_index: jax.Array):
    indices, valid, num_drawn = sampler.sample_round(keys.sample, round_index)
    # Valid clients first, in the sampler's order (a stable partition).
    order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int32), stable=True)
    indices, valid = indices[order], valid[order]
    pad = slots - indices.shape[0]
    clients = jnp.pad(jnp.where(valid, indices, 0), (0, pad))
    client_mask = jnp.pad(valid, (0, pad))
    counts = jnp.where(client_mask, population.counts[clients], 0)
    rows, mask = blocks.example_positions(
        jax.random.fold_in(keys.data, round_index), counts, width=width,
        batch_size=config.batch_size, epochs=config.local_epochs,
        num_steps=num_steps,
        max_examples_per_client=config.max_examples_per_client)
    features = {}
    for name, array in population.features.items():
      gathered = array[clients[:, None], rows]
      keep = mask.reshape(mask.shape + (1,) * (gathered.ndim - 2))
      gathered = jnp.where(keep, gathered, jnp.zeros((), gathered.dtype))
      features[name] = gathered.reshape(
          (slots, num_steps, config.batch_size) + gathered.shape[2:])
    example_mask = mask.reshape(slots, num_steps, config.batch_size)
    return blocks.ClientBlock(features, example_mask, client_mask), num_drawn

  return cohort_block


def build_multi_round(sim: simulation.Simulation) -> Callable:
  """Builds the (unjitted) multi-round function of `sim`'s configuration.

  Returns:
    `multi_round(state, hparams, population, keys, first_round, num_active,
    adaptive=None, secagg=None, *, num_rounds) -> (state, metrics, aux)`,
    which runs rounds first_round, ..., first_round + num_active - 1
    (num_active <= num_rounds, traced) in one loop and returns their
    outputs stacked to the static length `num_rounds`, so one compilation
    serves every shorter call (the run's last, or one cut short by the
    epsilon budget or an eval round). Round r is the host loop's round r:
    the cohort of `build_cohort_block`, `sim.round_fn()` with
    `fold_in(keys.noise, r)`, `hparams`, `adaptive` and `secagg`; the server
    state carries the mechanism's state from round to round, as in the host
    loop. `metrics` are the round's metrics stacked over `num_rounds` (zeros
    past num_active), and `aux` holds per round "num_drawn" (the sampler's
    draw before truncation) and "params_finite".

  Raises:
    ValueError: naming the config field, for what runs on the host only
      (`check_supported`).
  """
  check_supported(sim)
  round_fn = sim.round_fn()
  cohort_block = build_cohort_block(sim)

  def multi_round(state, hparams: dp_fedavg.RoundHparams,
                  population: DevicePopulation, keys: MultiRoundKeys,
                  first_round, num_active, adaptive=None, secagg=None, *,
                  num_rounds: int):
    first_round = jnp.asarray(first_round, jnp.int32)

    def one_round(state, r):
      block, num_drawn = cohort_block(population, keys, r)
      state, metrics = round_fn(state, block, hparams,
                                jax.random.fold_in(keys.noise, r), None,
                                adaptive, secagg)
      aux = {"num_drawn": num_drawn,
             "params_finite": tree_util.tree_all_finite(state.params)}
      return state, (metrics, aux)

    # A loop of num_active (traced) iterations writing into outputs of
    # static length num_rounds: one compilation serves every call length,
    # and rounds past num_active are not computed at all.
    _, out_shapes = jax.eval_shape(one_round, state, first_round)
    outputs = jax.tree_util.tree_map(
        lambda s: jnp.zeros((num_rounds,) + s.shape, s.dtype), out_shapes)

    def body(i, loop_carry):
      carry, outputs = loop_carry
      carry, out = one_round(carry, first_round + i)
      outputs = jax.tree_util.tree_map(lambda buf, x: buf.at[i].set(x),
                                       outputs, out)
      return carry, outputs

    num_active = jnp.minimum(jnp.asarray(num_active, jnp.int32), num_rounds)
    state, (metrics, aux) = jax.lax.fori_loop(0, num_active, body,
                                              (state, outputs))
    return state, metrics, aux

  return multi_round
