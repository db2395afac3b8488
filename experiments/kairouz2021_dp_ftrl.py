"""Reproduction: Kairouz et al. 2021, DP-FTRL against DP-SGD without sampling.

Paper: Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private
(Deep) Learning without Sampling or Shuffling", ICML 2021. Their federated
experiments (StackOverflow next-word prediction, EMNIST; Figures 3-4) show
that when the cohort selection cannot be trusted to be uniformly random (no
privacy amplification), DP-FTRL's tree-aggregation noise gives much better
accuracy than DP-SGD/DP-FedAvg accounted without amplification at the same
epsilon, and approaches amplified DP-FedAvg when the population is large
compared with cohort x rounds.

Here, in the paper's regime (one pass over the data, each client at most
once, one tree over all rounds): the digits task (400 training clients,
2NN), 40 rounds of 10 clients, disjoint over the whole run
(sampling="disjoint", tree_participation="once", no restarts), server
momentum 0.9, every arm calibrated to epsilon = 8 at delta = 1e-4 by its
own ledger (RDP):
  * DP-FTRL: one tree of 40 rounds;
  * DP-FedAvg under the same participation, without amplification:
    `--set tree_restart_every=1`, trees of one round, i.e. independent
    Gaussian noise each round; each client is in one round, so the run is
    one Gaussian mechanism (the paper's "no amplification" baseline, the
    same code path and ledger);
  * DP-FedAvg with Poisson sampling (q = 10 / 400, amplification
    credited): `--set mechanism=gaussian --set sampling=poisson`.
Measured values: docs/reproductions.md.

Run:
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py \\
      --set tree_restart_every=1
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py \\
      --set mechanism=gaussian --set sampling=poisson
  fedjax-dp train --config experiments/kairouz2021_dp_ftrl.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="kairouz2021_dp_ftrl", mechanism="tree", sampling="disjoint",
      tree_participation="once", accountant="rdp", cohort_size=10,
      rounds=40, noise_multiplier=None, target_epsilon=8.0, delta=1e-4,
      server_optimizer="momentum", server_momentum=0.9, server_lr=0.5,
      eval_every=20)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="kairouz2021_dp_ftrl_smoke", rounds=3,
                              eval_every=3)
