"""What every per-round metric a run writes is, privacy-wise.

`metrics.jsonl` mixes three kinds of numbers, and only the first two may be
published under the run's guarantee:

  * RELEASED: computed from what the mechanism releases (the noisy model
    update, the noisy count of adaptive clipping) and public settings:
    post-processing, covered by the ledger's epsilon. Evaluations on
    held-out clients count here: they use the released model and data
    outside the protected population.
  * PUBLIC: settings and accounting (the round index, epsilon, the noise's
    std as configured).
  * NOT_PRIVATE: computed by the simulator from clients' raw data or from
    the cohort before any noise, for the researcher running the
    simulation. A deployment could not compute them without spending
    privacy, and they are not covered by any guarantee of the run.
"""

RELEASED, PUBLIC, NOT_PRIVATE = "released", "public", "not private"

# Metric name -> (kind, what it is).
METRICS = {
    "round": (PUBLIC, "the round's index"),
    "epsilon": (PUBLIC, "the ledger's epsilon after this round (eval rounds "
                "and the last)"),
    "example_epsilon": (PUBLIC, "record-level DP: one client's example-level "
                        "epsilon after this round (eval rounds and the "
                        "last)"),
    "noise_stddev": (PUBLIC, "std of the noise in one coordinate of the "
                     "released sum (local and distributed: from the number "
                     "of participants)"),
    "tree_index": (PUBLIC, "DP-FTRL: the tree this round belongs to"),
    "tree_step": (PUBLIC, "DP-FTRL: the round's step in its tree"),
    "clip_norm": (RELEASED, "adaptive clipping: the clip norm this round "
                  "used (from earlier rounds' noisy counts)"),
    "unclipped_fraction_noisy": (RELEASED, "adaptive clipping: the noisy "
                                 "fraction of unclipped clients"),
    "secagg_near_overflow": (RELEASED, "secure aggregation: coordinates of "
                             "the decoded sum near the modulus (what a "
                             "server can see)"),
    "eval_loss": (RELEASED, "held-out loss of the model"),
    "eval_accuracy": (RELEASED, "held-out accuracy of the model"),
    "eval_perplexity": (RELEASED, "held-out perplexity of the model"),
    "eval_client_accuracy_p10": (RELEASED, "10th percentile of held-out "
                                 "clients' accuracies"),
    "eval_client_accuracy_p50": (RELEASED, "median held-out client "
                                 "accuracy"),
    "eval_client_accuracy_p90": (RELEASED, "90th percentile of held-out "
                                 "clients' accuracies"),
    "eval_auprc": (RELEASED, "binary classifiers: held-out average "
                   "precision (area under the precision-recall curve)"),
    "eval_recall_at_precision_90": (RELEASED, "binary classifiers: held-out "
                                    "recall at precision 0.9"),
    "num_clients": (NOT_PRIVATE, "clients whose clipped update entered the "
                    "sum (the realised, finite cohort)"),
    "num_drawn": (NOT_PRIVATE, "clients the sampler drew, before truncation"),
    "num_dropped": (NOT_PRIVATE, "sampled clients that dropped out"),
    "truncated": (NOT_PRIVATE, "whether the draw overflowed the block"),
    "num_nonfinite": (NOT_PRIVATE, "clients whose update was NaN or Inf"),
    "num_examples": (NOT_PRIVATE, "examples the cohort trained on"),
    "train_loss": (NOT_PRIVATE, "the cohort's mean local training loss"),
    "fraction_clipped": (NOT_PRIVATE, "fraction of the cohort whose update "
                         "was scaled down"),
    "update_norm_p10": (NOT_PRIVATE, "10th percentile of pre-clip update "
                        "norms"),
    "update_norm_p50": (NOT_PRIVATE, "median pre-clip update norm"),
    "update_norm_p90": (NOT_PRIVATE, "90th percentile of pre-clip update "
                        "norms"),
    "update_norm_max": (NOT_PRIVATE, "largest pre-clip update norm"),
    "clipped_sum_norm": (NOT_PRIVATE, "norm of the clipped sum before "
                         "noise"),
    "signal_to_noise": (NOT_PRIVATE, "norm of the clipped sum over the "
                        "expected norm of the noise"),
    "num_participants": (NOT_PRIVATE, "distributed noise: clients that took "
                         "part (the server of a deployment knows them; the "
                         "model's observers do not)"),
    "aggregation_aborted": (NOT_PRIVATE, "distributed noise: the round had "
                            "fewer participants than the public minimum and "
                            "released nothing"),
    "secagg_wrapped": (NOT_PRIVATE, "secure aggregation: coordinates where "
                       "the decoded sum differs from the exact one (the "
                       "simulator's oracle)"),
    "secagg_sampler_failures": (NOT_PRIVATE, "secure aggregation: discrete "
                                "Gaussian samples that failed"),
    "elapsed_s": (NOT_PRIVATE, "wall time since the run started (timing "
                  "depends on the data)"),
}


def not_private() -> list[str]:
  """The metrics no guarantee covers, in catalogue order."""
  return [name for name, (kind, _) in METRICS.items() if kind == NOT_PRIVATE]
