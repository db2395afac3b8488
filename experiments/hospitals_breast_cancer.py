"""Healthcare across hospitals: DP-FedAvg on breast-cancer data.

scikit-learn's Wisconsin breast-cancer data (569 patients, 30 features,
benign/malignant) split over 8 "hospitals" by a Dirichlet(1.0) label mixture;
2 hospitals are held out for evaluation. Cross-silo: every hospital takes
part in every round (fixed-size sampling of all 6 training hospitals), which
makes the guarantee one about a whole hospital's data (replace-one-hospital
neighbours, RDP accountant). With 6 silos that guarantee is necessarily weak
for any useful noise level; record-level DP inside each hospital is the
setting where DP-SGD helps (a later capability). Logistic regression.

Run:
  fedjax-dp train --config experiments/hospitals_breast_cancer.py
  fedjax-dp train --config experiments/hospitals_breast_cancer.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="hospitals_breast_cancer", dataset="breast_cancer",
      dataset_kwargs={"num_clients": 8, "alpha": 1.0},
      model="logistic", rounds=50, sampling="fixed", cohort_size=6,
      client_lr=0.1, local_epochs=1, batch_size=16,
      clip_norm=1.0, noise_multiplier=1.0, delta=1e-3, accountant="rdp",
      eval_every=10)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="hospitals_breast_cancer_smoke", rounds=3,
                              eval_every=3)
