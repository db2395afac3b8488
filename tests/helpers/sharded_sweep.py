"""Run by test_sweep.py with 4 CPU devices: a sweep over configurations
sharded across devices; prints each configuration's final parameters."""

import json

import jax
import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp import sweep


def main():
  assert jax.device_count() == 4, jax.devices()
  base = config_lib.Config(
      name="tiny", dataset="synthetic",
      dataset_kwargs={"num_clients": 40, "max_examples": 20},
      model="logistic", rounds=3, cohort_size=6, batch_size=10,
      local_epochs=1, noise_multiplier=1.0, eval_every=3, delta=1e-3)
  result = sweep.run_sweep(
      base, {"noise_multiplier": [0.5, 1.0], "seed": [0, 1, 2]},
      progress=False, log=lambda s: None)
  print(json.dumps({
      "num_devices": [g.num_devices for g in result.groups],
      "params": [np.concatenate([np.ravel(x) for x in
                                 jax.tree_util.tree_leaves(r.params)]).tolist()
                 for r in result.runs],
      "epsilons": [r.summary["epsilon"] for r in result.runs],
  }))


if __name__ == "__main__":
  main()
