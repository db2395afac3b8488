"""The Laplace mechanism with L1 clipping on the default digits task.

Each client's whole delta is clipped to L1 norm C, and Laplace noise of scale
b = z * C is added once to the sum (central placement). Under Poisson
sampling with add/remove-one-client neighbours the round is dp_accounting's
PoissonSampledDpEvent(q, LaplaceDpEvent(z)), accounted by the PLD accountant
(the block holds the whole population, so no draw is ever truncated). L1
clipping bounds much more tightly than L2 in many dimensions, so C is larger
than the Gaussian default and the noise per coordinate is heavier: this file
is for studying the mechanism, not for accuracy.

Run:
  fedjax-dp train --config experiments/laplace_digits.py
  fedjax-dp train --config experiments/laplace_digits.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="laplace_digits", mechanism="laplace", model="logistic",
      clip_norm=5.0, noise_multiplier=2.0, rounds=100)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="laplace_digits_smoke", rounds=3,
                              eval_every=3)
