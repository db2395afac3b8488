"""Run by test_sharding.py with 8 CPU devices: sharded round == one device."""

import json
import sys

import jax
import numpy as np

from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.data import blocks


def main():
  assert jax.device_count() == 8, jax.devices()
  model = registry.get_model("mlp_2nn", (6,), 4, hidden=(16,))
  rng = np.random.default_rng(0)
  clients = 32
  block = blocks.ClientBlock(
      {"x": rng.normal(size=(clients, 3, 5, 6)).astype(np.float32),
       "y": rng.integers(0, 4, (clients, 3, 5)).astype(np.int32)},
      rng.random((clients, 3, 5)) < 0.8,
      np.arange(clients) < 27)
  hp = dp_fedavg.RoundHparams.create(client_lr=0.2, server_lr=1.0,
                                     clip_norm=2.0, noise_multiplier=1.0,
                                     denominator=25.0)
  opt = server_lib.server_optimizer("adam")
  params = model.init(jax.random.key(0))
  results = {}
  for name, mesh in (("single", None), ("sharded", dp_fedavg.client_mesh())):
    fn = jax.jit(dp_fedavg.build_round(
        model, client_lib.client_optimizer("sgd"), opt, clients_per_chunk=2,
        mesh=mesh))
    state = server_lib.init(params, opt)
    for r in range(3):
      state, metrics = fn(state, block, hp, jax.random.key(r))
    results[name] = (jax.tree_util.tree_leaves(state.params), metrics)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(results["single"][0], results["sharded"][0])]
  m1, m2 = results["single"][1], results["sharded"][1]
  # The whole runner, sharded by default on 8 devices vs forced single.
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  base = config_lib.Config(
      name="sharded", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=3, cohort_size=12, batch_size=10,
      local_epochs=1, eval_every=3, delta=1e-3, noise_multiplier=1.0)
  quiet = dict(progress=False, log=lambda s: None)
  run_sharded = runner.run(base, **quiet)
  # The plain round on one device: sharding, not the factored form (whose
  # certified clip bound differs at 1e-5), is what is compared here.
  run_single = runner.run(base.replace(shard_clients=False,
                                       round_shape="plain"), **quiet)
  runner_diff = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree_util.tree_leaves(run_sharded.params),
                      jax.tree_util.tree_leaves(run_single.params)))
  print(json.dumps({
      "runner_max_param_diff": runner_diff,
      "runner_epsilons": [run_sharded.summary["epsilon"],
                          run_single.summary["epsilon"]],
      "max_param_diff": max(diffs),
      "fraction_clipped": [float(m1["fraction_clipped"]),
                           float(m2["fraction_clipped"])],
      "update_norm_p50": [float(m1["update_norm_p50"]),
                          float(m2["update_norm_p50"])],
      "num_clients": [int(m1["num_clients"]), int(m2["num_clients"])],
  }))


if __name__ == "__main__":
  sys.exit(main())
