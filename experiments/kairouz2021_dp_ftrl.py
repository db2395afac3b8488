"""Reproduction: Kairouz et al. 2021, DP-FTRL against DP-SGD without sampling.

Paper: Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private
(Deep) Learning without Sampling or Shuffling", ICML 2021. Their federated
experiments (StackOverflow next-word prediction, EMNIST; Figures 3-4) show
that when the cohort selection cannot be trusted to be uniformly random (no
privacy amplification), DP-FTRL's tree-aggregation noise gives much better
accuracy than DP-SGD/DP-FedAvg accounted without amplification at the same
epsilon, and approaches amplified DP-FedAvg when the population is large
compared with cohort x rounds.

Here: the digits task (400 training clients, 2NN), 100 rounds, cohorts of
100 clients that are disjoint within each tree (sampling="disjoint"), both
arms calibrated to the same epsilon = 8 at delta = 1e-4 under replace-special
neighbours (RDP accountant, tree-aggregation events):
  * DP-FTRL: trees of 4 rounds (400 clients = 4 cohorts of 100, each client
    once per tree), server momentum 0.9;
  * DP-FedAvg without amplification: `--set tree_restart_every=1`, a tree
    of one step per round, i.e. independent Gaussian noise each round
    accounted with no sampling credit (the paper's "DP-SGD w/o
    amplification" baseline, the same code path and ledger).
The comparison the paper makes is between these two arms; the population
here (400) is far too small for either to match amplified DP-FedAvg
(experiments/digits_dp_fedavg.py: 0.883 at epsilon 6.83, which relies on
Poisson sampling). Measured values: docs/reproductions.md.

Run:
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py \\
      --set tree_restart_every=1
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="kairouz2021_dp_ftrl", mechanism="tree", sampling="disjoint",
      accountant="rdp", cohort_size=100, tree_restart_every=4, rounds=100,
      noise_multiplier=None, target_epsilon=8.0, delta=1e-4,
      server_optimizer="momentum", server_momentum=0.9, server_lr=0.5,
      eval_every=20)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="kairouz2021_dp_ftrl_smoke", rounds=3,
                              cohort_size=20, eval_every=3)
