"""Federated EMNIST from TensorFlow Federated's HDF5 files, given by path.

TFF's federated EMNIST (3,400 writers, 62 classes) ships as
`fed_emnist_train.h5` / `fed_emnist_test.h5`: a root group `examples`, one
subgroup per writer, datasets `pixels` [N, 28, 28] float32 and `label`. Put
the files anywhere on local disk (nothing is downloaded) and point
FEDJAX_DP_EMNIST_DIR at their folder. The McMahan et al. 2017 CNN is trained
with user-level DP-FedAvg. The training writers (about 0.2 GB decoded) are
read once and each round's cohort is gathered from memory; on a machine
with less than about 1 GB of memory they would be read one cohort per round
(`dataset_kwargs` `in_memory` chooses).

Run:
  FEDJAX_DP_EMNIST_DIR=/data/emnist fedjax-dp train --config experiments/emnist_tff_hdf5.py
  fedjax-dp train --config experiments/emnist_tff_hdf5.py --smoke

The smoke variant writes a tiny file of random EMNIST-shaped data in the
real layout to a temporary folder and trains on it for 2 rounds.
"""

import os
import pathlib
import tempfile

import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp.data.formats import tff_hdf5


def get_config() -> config_lib.Config:
  folder = pathlib.Path(os.environ.get("FEDJAX_DP_EMNIST_DIR", "."))
  return config_lib.Config(
      name="emnist_tff_hdf5", dataset="file",
      dataset_kwargs={
          "path": str(folder / "fed_emnist_train.h5"),
          "eval_path": str(folder / "fed_emnist_test.h5"),
          "num_classes": 62, "x": "pixels", "y": "label",
          "max_eval_clients": 200},
      model="cnn", rounds=500, sampling="poisson", cohort_size=100,
      client_lr=0.1, local_epochs=1, batch_size=10,
      max_examples_per_client=100,
      clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, eval_every=50)


def _tiny_file(folder: pathlib.Path, clients: int, seed: int) -> str:
  rng = np.random.default_rng(seed)
  ids = [f"f{k:04d}_{seed}" for k in range(clients)]
  feats = []
  for _ in ids:
    n = int(rng.integers(3, 12))
    feats.append({"pixels": rng.random((n, 28, 28), dtype=np.float32),
                  "label": rng.integers(0, 62, n).astype(np.int32)})
  path = folder / f"tiny_emnist_{seed}.h5"
  tff_hdf5.write_tff_hdf5(str(path), ids, feats)
  return str(path)


def get_smoke_config() -> config_lib.Config:
  folder = pathlib.Path(tempfile.mkdtemp(prefix="fedjax_dp_emnist_smoke_"))
  config = get_config()
  kwargs = dict(config.dataset_kwargs,
                path=_tiny_file(folder, 40, 0),
                eval_path=_tiny_file(folder, 8, 1))
  return config.replace(
      name="emnist_tff_hdf5_smoke", dataset_kwargs=kwargs, model="logistic",
      rounds=2, cohort_size=8, eval_every=2, delta=1e-3)
