"""DP events of the unsampled mechanisms, built from numbers.

Every function takes the noise multiplier z = (noise scale) / C and the
sensitivity of the released sum in units of C (`clipping.sensitivity(1.0,
relation)`), so the event's own multiplier is z / sensitivity, as
dp_accounting defines it. Sampling is wrapped around these by the sampler
(`sampling.*.sampled`); the privacy plan chooses which applies.

Privacy: each event holds under the neighbouring relation whose sensitivity
was passed in; z = 0 is never private (`NonPrivateDpEvent`).
"""

import math

import dp_accounting


def check_noise_multiplier(noise_multiplier: float) -> float:
  """z as a float; raises ValueError unless it is finite and >= 0."""
  z = float(noise_multiplier)
  if not z >= 0 or math.isinf(z):
    raise ValueError(
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
  return z


def gaussian(noise_multiplier: float,
             sensitivity: float = 1.0) -> dp_accounting.DpEvent:
  """One Gaussian sum of noise std z C, sensitivity `sensitivity` * C."""
  z = check_noise_multiplier(noise_multiplier)
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.GaussianDpEvent(z / sensitivity)


def laplace(noise_multiplier: float,
            sensitivity: float = 1.0) -> dp_accounting.DpEvent:
  """One Laplace sum of scale z C, L1 sensitivity `sensitivity` * C.

  dp_accounting's `LaplaceDpEvent(m)` is the mechanism of scale over L1
  sensitivity m; its PLD is the one-dimensional Laplace mechanism with shift
  1, and spreading the same L1 shift over several coordinates only lowers
  the privacy loss (tests/test_laplace.py checks this on the PLDs).
  """
  z = check_noise_multiplier(noise_multiplier)
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.LaplaceDpEvent(z / sensitivity)


def adaptive_clipping_parts(update_noise_multiplier: float,
                            count_stddev: float,
                            sensitivity: float) -> dp_accounting.DpEvent:
  """Adaptive clipping's two Gaussian sums over one cohort, unsampled.

  The update sum (noise z_delta C, sensitivity `sensitivity` C) and the
  shifted count of unclipped clients (noise sigma_b, sensitivity
  `sensitivity` / 2: adding a client moves it by 1/2, replacing one by 1;
  privacy/adaptive_clipping.py). A tuple inside, so the event is hashable
  (the ledger counts equal events).
  """
  z = check_noise_multiplier(update_noise_multiplier)
  return dp_accounting.ComposedDpEvent((
      dp_accounting.GaussianDpEvent(z / sensitivity),
      dp_accounting.GaussianDpEvent(
          float(count_stddev) / (0.5 * sensitivity)),
  ))


def example_level(noise_multiplier: float,
                  local_epochs: int) -> dp_accounting.DpEvent:
  """Record-level DP-SGD: one round's event for one client's examples.

  Returns:
    `SelfComposedDpEvent(GaussianDpEvent(z), E)`; `NonPrivateDpEvent()` when
    z = 0.

  Raises:
    ValueError: z < 0 or not finite, or E < 1 or not an integer.

  Privacy: under zero-out neighbours (one example of one client replaced by
    a padding slot, the layout of the other examples unchanged), accounted
    with dp_accounting's ADD_OR_REMOVE_ONE relation: the example is in at
    most E noisy steps of the round, each a Gaussian mechanism of multiplier
    z (privacy/plan.py, noisy_batch_gradient). No amplification by client
    sampling or by batching is credited.
  """
  z = check_noise_multiplier(noise_multiplier)
  if isinstance(local_epochs, bool) or int(local_epochs) != local_epochs or (
      local_epochs < 1):
    raise ValueError(f"local_epochs must be an integer >= 1, got "
                     f"{local_epochs!r}")
  if z == 0.0:
    return dp_accounting.NonPrivateDpEvent()
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z), int(local_epochs))
