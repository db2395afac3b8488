"""Per-layer clipping on the default digits task.

Each top-level parameter group g (the 2NN's three dense layers) is clipped to
its own norm C_g = C sqrt(d_g / d) ("size_proportional"; "uniform" gives
C / sqrt(G)). Since sum_g C_g^2 = C^2, the whole update still has L2 norm at
most C: the overall sensitivity is the L2 norm of the per-group norms, the
noise N(0, (z C)^2) and the ledger are exactly those of flat clipping
(privacy/per_layer.py). Compare accuracy with experiments/digits_dp_fedavg.py.

Run:
  fedjax-dp train --config experiments/per_layer_clipping_digits.py
  fedjax-dp train --config experiments/per_layer_clipping_digits.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(name="per_layer_clipping_digits",
                           per_layer_clipping="size_proportional")


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="per_layer_clipping_digits_smoke",
                              rounds=3, eval_every=3)
