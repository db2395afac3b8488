"""Record-level DP inside each hospital (DP-SGD), on breast-cancer data.

Cross-silo: the 6 training hospitals take part in every round. Each one
trains with DP-SGD: every patient's gradient is clipped to
example_clip_norm and Gaussian noise of std example_noise_multiplier *
example_clip_norm is added to every local step's sum, divided by the public
batch size (privacy/plan.py, noisy_batch_gradient). Every local step runs
and is noised, so the number of steps is public (capped by
max_examples_per_client). The example-level ledger (metrics
`example_epsilon`) holds one SelfComposedDpEvent(Gaussian(z_ex),
local_epochs) per round: the guarantee
for one patient's record, whoever sees the hospital's update. No
client-level noise is added (noise_multiplier=0, clip_norm=inf): with 6
silos a hospital-level guarantee is necessarily weak (see
experiments/hospitals_breast_cancer.py), so the run's client-level epsilon
is reported as infinite.

Run:
  fedjax-dp train --config experiments/hospitals_record_level_dp.py
  fedjax-dp train --config experiments/hospitals_record_level_dp.py --smoke
"""

import math

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="hospitals_record_level_dp", dataset="breast_cancer",
      dataset_kwargs={"num_clients": 8, "alpha": 1.0},
      model="logistic", rounds=30, sampling="fixed", cohort_size=6,
      client_lr=0.5, local_epochs=1, batch_size=16,
      max_examples_per_client=80, clip_norm=math.inf, noise_multiplier=0.0,
      example_clip_norm=1.0, example_noise_multiplier=3.0, delta=1e-3,
      accountant="rdp", eval_every=10)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="hospitals_record_level_dp_smoke",
                              rounds=3, eval_every=3)
