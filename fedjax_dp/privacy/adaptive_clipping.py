"""Adaptive clipping to a target quantile (Andrew et al. 2021).

"Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021),
Algorithm 1 with the geometric update. Each round, with clip norm C:

  * every sampled client reports b_i = 1[||delta_i|| <= C] alongside its
    clipped update;
  * the server releases the noisy shifted count
        s~ = sum_i (b_i - 1/2) + N(0, sigma_b^2)
    and estimates the unclipped fraction b~ = s~ / m + 1/2, with m the public
    expected cohort size (never the realised count, which is private);
  * C <- C * exp(-eta_C * (b~ - gamma)).

Since E[sum_i (b_i - 1/2)] / m + 1/2 is the population's fraction of norms
<= C under Poisson sampling with q * n = m, the clip moves toward the
gamma-quantile of the update norms. Defaults are the paper's: gamma = 0.5,
eta_C = 0.2, C_0 = 0.1, sigma_b = m / 20.

The clip norm and its PRNG key are the state of an init/update pair; the
update itself stays sweepable (every hyperparameter is an array argument).

Privacy:
  The round releases two Gaussian sums over the same sampled cohort: the
  clipped update sum with noise z_delta * C, and the shifted count with noise
  sigma_b. Their sensitivities, under add/remove-one-client neighbours (the
  Poisson sampler's relation), are C and 1/2: adding a client moves the count
  by b - 1/2 in {-1/2, +1/2} (this is why the count is shifted; the unshifted
  sum of b_i would have sensitivity 1 and need twice the noise). Under
  replace-one neighbours (fixed-size sampling) they are 2C and 1.

  Rescaling the count by (z_delta C) / sigma_b makes both noises N(0, (z_delta
  C)^2), and the concatenated per-client contribution then has L2 norm at
  most sqrt(C^2 + (z_delta C / (2 sigma_b))^2), so the pair is one Gaussian
  mechanism (an invertible post-processing away) with noise multiplier
      (z_delta^-2 + (2 sigma_b)^-2)^(-1/2)
  (Andrew et al. 2021, Section 3.1; Mironov et al. 2019, Section 3, which is
  what dp_accounting's RDP accountant uses for a ComposedDpEvent of
  Gaussians). `update_noise_multiplier` picks z_delta so that this equals the
  configured z: the round is then exactly as private as a fixed-clip round
  with noise multiplier z, and the count costs nothing extra in epsilon.
  The round's event records both Gaussians (events.adaptive_clipping_parts in
  the sampler's sampling, built by the privacy plan);
  `accounting.as_single_gaussian` rewrites such an event into the single
  equivalent Gaussian for accountants (PLD) that do not take a composition
  inside a sampling event.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_dp import types

DEFAULT_INITIAL_CLIP_NORM = 0.1
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_LEARNING_RATE = 0.2
# sigma_b = expected cohort size / 20 (Andrew et al. 2021, Section 3.1).
DEFAULT_COUNT_STDDEV_FRACTION = 1.0 / 20.0


class AdaptiveClipState(NamedTuple):
  """The clip norm to use in the coming round, and the count noise's key."""

  clip_norm: jax.Array  # float32 scalar C.
  key: types.PRNGKey


class AdaptiveClipHparams(NamedTuple):
  """Sweepable hyperparameters of the clip update, float32 scalars."""

  target_quantile: jax.Array  # gamma in [0, 1].
  learning_rate: jax.Array  # eta_C >= 0.
  count_stddev: jax.Array  # sigma_b, stddev of the noise on the count.
  denominator: jax.Array  # m, the public expected cohort size.

  @classmethod
  def create(cls, *, expected_cohort_size,
             target_quantile=DEFAULT_TARGET_QUANTILE,
             learning_rate=DEFAULT_LEARNING_RATE,
             count_stddev=None) -> "AdaptiveClipHparams":
    """Paper defaults; `count_stddev` None gives m / 20."""
    if count_stddev is None:
      count_stddev = default_count_stddev(expected_cohort_size)
    f = lambda v: jnp.asarray(v, jnp.float32)
    return cls(f(target_quantile), f(learning_rate), f(count_stddev),
               f(expected_cohort_size))


class AdaptiveClipOutput(NamedTuple):
  # b~: the noisy estimate of the fraction of clients with norm <= C.
  unclipped_fraction: jax.Array
  # The clip norm used this round (the state's before the update).
  clip_norm: jax.Array


def default_count_stddev(expected_cohort_size: float) -> float:
  """sigma_b = m / 20, the paper's default."""
  return float(expected_cohort_size) * DEFAULT_COUNT_STDDEV_FRACTION


def init(key: types.PRNGKey,
         initial_clip_norm=DEFAULT_INITIAL_CLIP_NORM) -> AdaptiveClipState:
  """State for the first round: clip norm C_0 and the count noise's key."""
  return AdaptiveClipState(jnp.asarray(initial_clip_norm, jnp.float32), key)


def shifted_count(unclipped: jax.Array, valid: jax.Array) -> jax.Array:
  """sum over valid clients of (b_i - 1/2), the count the server noises.

  Args:
    unclipped: bool [clients], b_i = (pre-clip norm <= C), i.e. the negation
      of `clipping.ClipResult.was_clipped`.
    valid: bool [clients], false for padding slots (they contribute 0).

  Returns:
    float32 scalar. Adding or removing one valid client moves it by exactly
    1/2 (the add/remove sensitivity the ledger assumes).
  """
  b = unclipped.astype(jnp.float32) - 0.5
  return jnp.sum(jnp.where(valid, b, 0.0))


def update(
    state: AdaptiveClipState,
    unclipped: jax.Array,
    valid: jax.Array,
    hparams: AdaptiveClipHparams,
) -> tuple[AdaptiveClipState, AdaptiveClipOutput]:
  """One geometric clip update from this round's cohort.

  Args:
    state: holds C, the clip norm the cohort was clipped with this round.
    unclipped: bool [clients], whether each client's pre-clip norm was <= C.
    valid: bool [clients], the cohort mask.
    hparams: gamma, eta_C, sigma_b and the public denominator m.

  Returns:
    (state for the next round, this round's noisy fraction and clip norm).

  Privacy: releases sum_i (b_i - 1/2) + N(0, sigma_b^2), of add/remove
    sensitivity 1/2; everything else is post-processing. The privacy plan's
    event accounts it together with the update's noise.
  """
  key, noise_key = jax.random.split(state.key)
  noisy = shifted_count(unclipped, valid) + hparams.count_stddev * (
      jax.random.normal(noise_key, (), jnp.float32))
  fraction = noisy / hparams.denominator + 0.5
  new_clip = state.clip_norm * jnp.exp(
      -hparams.learning_rate * (fraction - hparams.target_quantile))
  return (AdaptiveClipState(new_clip, key),
          AdaptiveClipOutput(fraction, state.clip_norm))


# ---------------------------------------------------------------------------
# Host side: the noise split and the DP event, from one place.


def update_noise_multiplier(noise_multiplier: float,
                            count_stddev: float) -> float:
  """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), the update's share of z.

  The update sum gets noise z_delta * C; with the count's noise sigma_b the
  round is then exactly a Gaussian mechanism with noise multiplier z (see
  the module docstring). z = 0 (no privacy) gives 0.

  Raises:
    ValueError: if 2 sigma_b <= z: the count alone would then be released
      with less noise than the whole budget allows.
  """
  z, sb = float(noise_multiplier), float(count_stddev)
  if not z >= 0 or math.isinf(z):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {z!r}")
  if not sb >= 0 or math.isinf(sb):
    raise ValueError(f"count_stddev must be finite and >= 0, got {sb!r}")
  if z == 0:
    return 0.0
  if 2.0 * sb <= z:
    raise ValueError(
        f"count_stddev={sb:g} is too small for noise_multiplier={z:g}: the "
        f"count alone has noise multiplier 2 * count_stddev = {2 * sb:g} <= "
        "z, leaving no budget for the update; need count_stddev > z / 2 "
        f"(paper default: expected cohort size / 20)")
  return (z ** -2 - (2.0 * sb) ** -2) ** -0.5
