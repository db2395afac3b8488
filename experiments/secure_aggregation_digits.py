"""Distributed DP with simulated secure aggregation (digits task).

Every client that takes part adds a discrete Gaussian share of the noise to
its fixed-point encoded, clipped update (scale s, stochastic rounding);
padding slots and dropped clients add nothing. Secure aggregation reveals
only the sum modulo 2^secagg_bits, which the server decodes and divides by s
(privacy/secure_aggregation.py). Shares are sized for a public minimum
number of participants (`min_participants`, by default the count a round
falls below with probability <= 1%: about 80 of the 100 expected here), so
the sum carries at least the central amount (z C s)^2; a round with fewer
participants is aborted and releases nothing. The ledger holds Kairouz,
Liu & Steinke 2021's distributed discrete Gaussian bound as zCDP (RDP
accountant) under zero-out neighbours (the server knows who takes part, so
no sampling amplification is credited); 32 bits give a fine scale, so the
sqrt(d) rounding term of the sensitivity is negligible. The scale is the
largest power of two whose sum over the whole block (400 slots) fits the
bits; each round's metrics report coordinates that wrapped around
(`secagg_wrapped`) and those a server would flag (`secagg_near_overflow`).
Without amplification the per-round cost is much higher than the central
Poisson round's, hence the larger cohort and noise multiplier here (the
noise on the average, z C / cohort, is comparable to the default run's).
To see wrap-around, force a scale that does not fit:
`--set secagg_bits=16 --set secagg_scale=4096`.

Run:
  fedjax-dp train --config experiments/secure_aggregation_digits.py
  fedjax-dp train --config experiments/secure_aggregation_digits.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="secure_aggregation_digits", noise_placement="distributed",
      secagg_bits=32, accountant="rdp", cohort_size=100, capacity=400,
      noise_multiplier=8.0, rounds=100)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="secure_aggregation_digits_smoke",
                              rounds=3, eval_every=3, cohort_size=20,
                              capacity=None)
