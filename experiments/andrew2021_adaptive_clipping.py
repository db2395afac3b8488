"""Reproduction: Andrew, Thakkar, McMahan, Ramaswamy 2021, adaptive clipping.

Paper: "Differentially Private Learning with Adaptive Clipping" (NeurIPS
2021). DP-FedAvg where the clip norm C is not tuned but follows a private
estimate of a quantile of the clients' update norms: each round every client
also reports b_i = 1[||delta_i|| <= C], the server releases the count with
Gaussian noise sigma_b and sets C <- C exp(-eta_C (b~ - gamma)). Claim
checked (the paper's abstract): adaptive clipping to the median update norm
"works well across a range of realistic federated learning tasks, sometimes
outperforming even the best fixed clip chosen in hindsight", without tuning a
clip.

What is reproduced: the comparison of adaptive clipping to the median with a
grid of fixed clips at the same noise multiplier (hence the same epsilon), on
one of the paper's six tasks (Shakespeare next-character prediction). The
paper's per-task accuracies could not be read here, so its numbers are "not
available here"; the comparison is of the finding.

Paper's settings (from the paper's reproducibility
summary and TensorFlow Privacy's QuantileAdaptiveClipSumQuery docs, which
cite the paper's recommendations): gamma = 0.5 (median), eta_C = 0.2
(geometric update), C_0 = 0.1, m = 100 clients per round, sigma_b = m / 20;
six of the benchmark tasks of Reddi et al. (which include Shakespeare);
DPFedAvg-M (server momentum), server learning rate chosen from a small grid
on the validation set; the fixed-clip baseline is the best of a grid of
clips.

Settings used here and why:
  * Data, model, client and server: as experiments/mcmahan2018_dp_fedavg_lm.py
    (Shakespeare, 506 training / 127 held-out (play, speaker) clients,
    80-character windows, at most 16 per client; GRU 8-128, 1 layer; 1 local
    epoch of SGD, lr 1.0, batch 8; FedAvg server: SGD, lr 1.0, no momentum
    and no server-lr grid, since server momentum 0.9 diverged under noise in
    experiments/shakespeare_keyboard.py and a grid per arm would not fit the
    time here).
  * m = 50 expected clients per round (Poisson), not 100: half the compute,
    so that each run takes ~5 minutes on a loaded 2-core CPU. sigma_b keeps
    the paper's rule, m / 20 = 2.5.
  * Noise multiplier z = 1.0 for every arm; with adaptive clipping it is
    split between the update (z_delta = 1.021) and the count so that the
    round is exactly a Gaussian mechanism with multiplier 1, so every arm
    has the same epsilon (8.49 at delta = 1e-4 after 200 rounds, PLD).
  * 200 rounds, seed 0; held-out accuracy over every character position of
    the held-out clients.
  * Fixed-clip grid 0.1, 0.2, 0.4, 0.8, 1.0: the update norms' median was
    about 0.4 after the first 20 rounds of the McMahan reproduction, so the
    grid brackets it by factors of 2. The C = 1.0 arm is exactly the
    configuration of the McMahan reproduction's dp_m50_z1 arm (same fields
    but the name), so that run is reused instead of repeated.

This builds on experiments/adaptive_clipping_digits.py (the same mechanism
on the default digits task, with no fixed-clip comparison): this file is the
paper's comparison against the best fixed clip, on a task of the paper.

Run (first obtain the texts once: fedjax-dp data fetch shakespeare):
  E=experiments/andrew2021_adaptive_clipping.py
  fedjax-dp train --config $E --run-dir /tmp/andrew2021_adaptive
  for C in 0.1 0.2 0.4 0.8; do
    fedjax-dp train --config $E --set adaptive_clipping=false \\
        --clip-norm $C --run-dir /tmp/andrew2021_fixed_$C
  done
  fedjax-dp train --config $E --smoke     # CI: bundled excerpt, seconds

Measured here (docs/reproductions.md has the table and wall times; seed 0,
held-out accuracy after 200 rounds; epsilon 8.49 at delta = 1e-4 for all):
  adaptive (median)  0.367
  fixed C = 0.1      0.293
  fixed C = 0.2      0.348
  fixed C = 0.4      0.369   (best fixed clip in hindsight)
  fixed C = 0.8      0.349
  fixed C = 1.0      0.352   (the McMahan reproduction's dp_m50_z1 run)
  non-private FedAvg 0.385   (the McMahan reproduction's nonprivate run)
Adaptive clipping is within 0.002 of the best fixed clip (a tie for one
seed), clearly above C = 0.1 and above C = 0.2, 0.8, 1.0 by less than the
seed-to-seed spread (about 0.025), without tuning. From round 40 on, its
clip stayed within 0.94 to 1.08 times the cohort's median update norm (mean
ratio 0.995), and 51.6% of updates were clipped on average (target 50%).
"""

import pathlib

from fedjax_dp import config as config_lib

_EXCERPT = pathlib.Path(__file__).resolve().parent / "data" / "shakespeare_excerpt"
_CACHE = pathlib.Path.home() / ".cache" / "fedjax_dp"

# Fixed clips compared with the adaptive clip (see the docstring).
FIXED_CLIPS = (0.1, 0.2, 0.4, 0.8, 1.0)


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="andrew2021_adaptive_clipping",
      dataset="shakespeare",
      dataset_kwargs={"path": str(_CACHE), "seq_len": 80,
                      "max_examples_per_client": 16},
      model="gru_lm",
      model_kwargs={"embed_dim": 8, "hidden": 128, "num_layers": 1},
      rounds=200, sampling="poisson", cohort_size=50,
      client_optimizer="sgd", client_lr=1.0, local_epochs=1, batch_size=8,
      server_optimizer="sgd", server_lr=1.0,
      noise_multiplier=1.0, delta=1e-4, accountant="pld",
      # The paper's adaptive clipping: C_0 = 0.1, gamma = 0.5, eta_C = 0.2,
      # sigma_b = m / 20 (None: the package computes m / 20 = 2.5).
      adaptive_clipping=True, clip_norm=0.1, target_unclipped_quantile=0.5,
      clip_learning_rate=0.2, clip_count_stddev=None,
      eval_every=20, checkpoint_every=50)


def get_fixed_clip_config(clip_norm: float) -> config_lib.Config:
  """The fixed-clip baseline at `clip_norm`, otherwise get_config()."""
  return get_config().replace(name=f"andrew2021_fixed_{clip_norm:g}",
                              adaptive_clipping=False, clip_norm=clip_norm)


def get_smoke_config() -> config_lib.Config:
  # The bundled excerpt, a tiny GRU, 3 rounds of 3 expected clients. With
  # m = 3 the paper's sigma_b = m / 20 = 0.15 is below z / 2, which would
  # leave no noise budget for the update (the package refuses it), so the
  # smoke variant sets sigma_b = 1.
  return get_config().replace(
      name="andrew2021_adaptive_clipping_smoke",
      dataset_kwargs={"path": str(_EXCERPT), "seq_len": 20, "stride": 10,
                      "min_chars": 60, "eval_fraction": 0.25},
      model_kwargs={"embed_dim": 8, "hidden": 16, "num_layers": 1},
      rounds=3, cohort_size=3, batch_size=4, clip_count_stddev=1.0,
      eval_every=3, delta=1e-2)
