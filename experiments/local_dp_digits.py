"""Local DP: every client noises its own clipped update (digits task).

Each client clips its delta to L2 norm C and adds N(0, (z C)^2) to it before
it leaves the device (`noise_placement="local"`); the server only sums the
noisy messages. Nobody has to be trusted, and the ledger reports the
per-client local guarantee: GaussianDpEvent(z / 2) for every round (a
client's input may be replaced by any other, L2 distance 2C; no sampling
amplification is credited since a client may take part in every round).
The sum carries the noise of every reporting client, sqrt(cohort) times the
central amount, so local DP needs far more rounds or clients for the same
accuracy: compare with experiments/digits_dp_fedavg.py. Laplace noise with
L1 clipping: add `--set mechanism=laplace --set clip_norm=5`.

Run:
  fedjax-dp train --config experiments/local_dp_digits.py
  fedjax-dp train --config experiments/local_dp_digits.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="local_dp_digits", noise_placement="local", model="logistic",
      noise_multiplier=2.0, clip_norm=1.0, cohort_size=100, rounds=50)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="local_dp_digits_smoke", rounds=3,
                              eval_every=3)
