"""One of two processes (jax.distributed, gloo CPU collectives) running the
same sharded round; process 0 prints the result. Used by test_sharding.py."""

import json
import sys

import jax


def main(process_id: int, port: int):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  base = config_lib.Config(
      name="two_process", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=3, cohort_size=12, batch_size=10,
      local_epochs=1, eval_every=3, delta=1e-3, noise_multiplier=1.0,
      shard_clients=True)
  result = runner.run(base, progress=False, log=lambda s: None)
  leaves = [np.asarray(x).ravel().tolist()
            for x in jax.tree_util.tree_leaves(result.params)]
  if process_id == 0:
    print(json.dumps({"params": leaves, "epsilon": result.summary["epsilon"]}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
