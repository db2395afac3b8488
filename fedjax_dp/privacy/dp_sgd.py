"""Example-level DP inside a client: DP-SGD's noisy batch gradient and event.

Each local step clips every example's gradient to L2 norm C, sums the clipped
gradients of the batch's real examples, adds N(0, (z C)^2) to every coordinate
and divides by the static batch size B (a public constant, never the number of
real examples, which is private).

Privacy (record-level, for the examples of one client):
  * Neighbouring relation, "zero-out": one example of one client is replaced
    by a padding slot; every other example keeps its place in the block's
    layout into steps and batches (the layout is drawn from the host rng and
    the client sizes, which do not change). Under it one noisy step's clipped
    sum moves by at most C in L2, so each step holding the example is a
    Gaussian mechanism of noise multiplier z, and a step not holding it has
    the same distribution on both sides. A Gaussian shift of at most C is
    accounted exactly like dp_accounting's `GaussianDpEvent(z)` under
    ADD_OR_REMOVE_ONE (whose worst case is a shift of one sensitivity), so
    an example ledger uses that accountant relation. (Zero-out is Kairouz et
    al. 2021's replacement by the special empty record; dp_accounting's
    REPLACE_SPECIAL gives the same epsilon for these events, while its PLD
    under REPLACE_ONE would assume a shift of 2C: not this claim.)
  * Steps per example: `fedjax_dp.data.blocks.make_block` writes a client's
    used examples (all of them, or a fresh subset of
    `max_examples_per_client` of them) once per epoch, each epoch into its own
    run of steps, so an example appears in at most `local_epochs` steps of a
    round (exactly that many if used, none otherwise). One round is therefore
    `SelfComposedDpEvent(GaussianDpEvent(z), local_epochs)` for the example,
    by adaptive composition; the round's model delta, the cohort aggregate
    and the server's noise are post-processing of the noisy steps (other
    clients' deltas do not depend on this example).
  * Every step runs and is noised, including steps that are all padding:
    the number of noisy steps (the block's `num_steps`, from public settings:
    `local_epochs`, `batch_size` and the largest client's size or
    `max_examples_per_client`; client sizes are public here, and zero-out
    keeps them) must not depend on a client's data. Under
    zero-out, a step whose only real example is the changed one is all
    padding on one side; skipping it there would release the parameters
    unmoved (a point mass) against a noisy move on the other side, which no
    finite epsilon covers. The non-private client update skips such steps;
    this one must not.
  * No amplification is credited: not from client sampling (a client may
    take part in every round), nor from batching (batches come from
    shuffling, not Poisson sampling of examples).
  * Not covered: the client's training loss, its example count and the
    per-example norms and clip flags are computed from the raw data; they are
    simulation diagnostics and must not be released as private outputs.
"""

from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_dp import tree_util
from fedjax_dp import types
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import noise


class NoisyGradient(NamedTuple):
  # (sum of clipped real-example gradients + noise) / batch_size.
  gradient: types.PyTree
  # float32 [batch] pre-clip L2 norm per example; 0 for padding slots.
  norms: jax.Array
  # bool [batch] True where a real example was scaled down; False for padding.
  was_clipped: jax.Array


def noisy_batch_gradient(
    per_example_grads: types.PyTree,
    example_mask: jax.Array,
    clip_norm: jax.Array,
    noise_multiplier: jax.Array,
    batch_size: int,
    key: types.PRNGKey,
) -> NoisyGradient:
  """One DP-SGD step's gradient: clip per example, sum, add noise, divide.

  Args:
    per_example_grads: gradients with a leading batch axis on every leaf.
    example_mask: bool [batch]; False for padding slots, whose gradients are
      ignored (selected away, so even NaN contributes exactly 0).
    clip_norm: per-example L2 bound C > 0 (traced or float; +inf disables
      clipping exactly).
    noise_multiplier: z >= 0; the noise stddev is z * C (0 when z = 0).
    batch_size: the public divisor, the static batch size B; never the count
      of real examples.
    key: the key of this step's noise.

  Returns:
    NoisyGradient; with C = inf and z = 0 the gradient is exactly the masked
    sum of `per_example_grads` divided by `batch_size`.

  Privacy: under zero-out neighbours (one slot's example replaced by padding)
    the clipped sum moves by at most C in L2, and N(0, (z C)^2) noise is added
    to every coordinate once, so the step is the Gaussian mechanism with noise
    multiplier z (`GaussianDpEvent(z)`, ADD_OR_REMOVE_ONE accounting). This
    holds for every input: an example whose gradient is not finite
    contributes 0 (norm <= C), and no example's value can change another's
    contribution. The division by the public B is post-processing.
  """
  clipped = jax.vmap(clipping.clip_by_global_norm, in_axes=(0, None))(
      per_example_grads, clip_norm)
  # An example whose gradient norm is NaN or Inf (NaN features, or finite
  # ones large enough to overflow) contributes exactly zero -- a value that
  # does not depend on its data -- instead of making the step's sum NaN and
  # with it the whole client non-finite. Selected, never multiplied.
  counted = example_mask & jnp.isfinite(clipped.norm)
  summed = tree_util.masked_sum(clipped.clipped, counted)
  stddev = noise.noise_stddev(noise_multiplier, clip_norm)
  noisy = noise.add_gaussian_noise(summed, stddev, key)
  gradient = jax.tree_util.tree_map(
      lambda x: x / jnp.asarray(batch_size, x.dtype), noisy)
  norms = jnp.where(example_mask, clipped.norm, 0.0)
  was_clipped = jnp.logical_and(example_mask, clipped.was_clipped)
  return NoisyGradient(gradient, norms, was_clipped)


def example_dp_event(noise_multiplier: float,
                     local_epochs: int) -> dp_accounting.DpEvent:
  """The DP event of one round for one client's examples.

  Args:
    noise_multiplier: z >= 0 of every local DP-SGD step.
    local_epochs: E >= 1, local epochs per round.

  Returns:
    `SelfComposedDpEvent(GaussianDpEvent(z), E)`; `NonPrivateDpEvent()` when
    z = 0.

  Raises:
    ValueError: z < 0 or not finite, or E < 1 or not an integer.

  Privacy: under zero-out neighbours (one example of one client replaced by a
    padding slot, the layout of the other examples unchanged), accounted with
    dp_accounting's ADD_OR_REMOVE_ONE relation: the example is in at most E
    noisy steps of the round, each a Gaussian mechanism of multiplier z (see
    the module docstring). No amplification by client sampling or by
    batching is credited.
  """
  z = float(noise_multiplier)
  if not 0.0 <= z < float("inf"):
    raise ValueError(
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
  if isinstance(local_epochs, bool) or int(local_epochs) != local_epochs or (
      local_epochs < 1):
    raise ValueError(f"local_epochs must be an integer >= 1, got "
                     f"{local_epochs!r}")
  if z == 0.0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z), int(local_epochs))
