"""DP-FedAvg on scikit-learn's digits split over 500 clients (the default).

1,797 8x8 digit images are split over 500 clients by a Dirichlet(0.5) label
mixture (Hsu et al. 2019); 100 clients are held out for evaluation. Each round
Poisson-samples an expected 50 of the 400 training clients (q = 0.125); each
client runs 2 local epochs of SGD (lr 0.2, batch 5) on the 2NN MLP
(64-200-200-10), its delta is clipped to L2 norm 1.0, and Gaussian noise with
z = 1.2 is added to the sum, which is divided by the expected cohort size 50;
150 rounds. User-level DP under add/remove-one-client
neighbours, accounted with dp_accounting's PLD accountant at delta = 1e-4.

Run:
  fedjax-dp train --config experiments/digits_dp_fedavg.py
  fedjax-dp train --config experiments/digits_dp_fedavg.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  # The package default is this experiment.
  return config_lib.Config()


def get_smoke_config() -> config_lib.Config:
  # The package default's smoke variant (what `--smoke` alone runs).
  return config_lib.default_smoke_config()
