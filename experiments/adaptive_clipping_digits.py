"""Adaptive clipping (Andrew et al. 2021) on the default digits task.

"Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021):
instead of tuning the clip norm C, each round every client reports whether
its update norm was within C; the noisy fraction of unclipped clients moves C
geometrically toward a target quantile (C <- C exp(-eta (b - gamma))). The
paper's defaults: gamma = 0.5, eta = 0.2, initial C = 0.1, count noise
sigma_b = expected cohort / 20; the noise multiplier z is split between the
update (z_delta) and the count so that the round is exactly a Gaussian
mechanism with multiplier z (the ledger records both Gaussians). The clip
trajectory is in metrics.jsonl (`clip_norm`).

Here: the default experiment's data, model and privacy (z = 1.2, 150 rounds),
with the clip chosen adaptively from 0.1 instead of fixed at 1.0.

Run:
  fedjax-dp train --config experiments/adaptive_clipping_digits.py
  fedjax-dp train --config experiments/adaptive_clipping_digits.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="adaptive_clipping_digits", adaptive_clipping=True, clip_norm=0.1,
      target_unclipped_quantile=0.5, clip_learning_rate=0.2)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(name="adaptive_clipping_digits_smoke",
                              rounds=3, eval_every=3)
