"""Evaluation of a global model on held-out clients.

Every model gets the pooled loss, accuracy, perplexity and per-client
accuracy percentiles. A binary classifier (`num_classes == 2`, logits
[batch, 2]) also gets ranking metrics, because for rare positives (fraud,
disease) accuracy says little: always answering "negative" scores 99%.
Its score is the softmax probability of class 1, over all held-out
examples pooled:

  * `eval_auprc`: the area under the precision-recall curve as average
    precision, sum_n (R_n - R_{n-1}) P_n over the score thresholds
    (`sklearn.metrics.average_precision_score`; no interpolation).
  * `eval_recall_at_precision_90`: the highest recall of any threshold whose
    precision is at least 0.9; 0.0 when no threshold reaches it.

Both are NaN when the held-out clients hold no positive example, or when a
score is not finite (a diverged model).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import losses
from fedjax_dp import types
from fedjax_dp.data import population as population_lib


@functools.lru_cache(maxsize=16)
def _sums_fn(model: types.Model):
  @jax.jit
  def sums(params, x, y):
    logits = model.apply(params, x)
    scores = None
    if _is_binary(model, logits):
      scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, 1]
    return (losses.loss_of(model)(logits, y),
            losses.accuracy_of(model)(logits, y), scores)
  return sums


def _is_binary(model: types.Model, logits) -> bool:
  # One pair of logits per example: a sequence model with two classes has
  # no single score per example to rank.
  return model.num_classes == 2 and logits.ndim == 2 and logits.shape[1] == 2


PRECISION_FOR_RECALL = 0.9


def binary_ranking_metrics(labels: np.ndarray,
                           scores: np.ndarray) -> dict[str, float]:
  """AUPRC (average precision) and recall at precision 0.9.

  Args:
    labels: [n], 1 for a positive example, anything else negative.
    scores: float [n], higher meaning more likely positive.

  Returns:
    {"eval_auprc", "eval_recall_at_precision_90"} as defined in the module
    docstring (NaN without a positive example or with a non-finite score).
  """
  # Imported here: only binary tasks need it, and it is slow to import.
  from sklearn import metrics as sklearn_metrics  # pylint: disable=g-import-not-at-top
  positive = np.asarray(labels).reshape(-1) == 1
  scores = np.asarray(scores, np.float64).reshape(-1)
  if not positive.any() or not np.all(np.isfinite(scores)):
    return {"eval_auprc": float("nan"),
            "eval_recall_at_precision_90": float("nan")}
  precision, recall, _ = sklearn_metrics.precision_recall_curve(
      positive, scores)
  # The curve ends at (recall 0, precision 1), so the maximum is 0.0 when no
  # threshold reaches the precision.
  reached = precision >= PRECISION_FOR_RECALL
  return {
      "eval_auprc": float(
          sklearn_metrics.average_precision_score(positive, scores)),
      "eval_recall_at_precision_90": float(recall[reached].max()),
  }


def _perplexity(mean_loss) -> float:
  # Past log(float max) exp overflows: a (nearly) diverged model's
  # perplexity is inf, without numpy's overflow warning.
  loss = float(mean_loss)
  return math.inf if loss > 709.0 else math.exp(loss)


def evaluate(
    model: types.Model,
    params: types.Params,
    population: population_lib.FederatedPopulation,
    batch_size: int = 512,
) -> dict[str, float]:
  """Pooled loss/accuracy, per-client accuracy percentiles and, for a binary
  classifier, AUPRC and recall at precision 0.9 (module docstring).

  Batches are padded to `batch_size` so that one compilation serves all.
  """
  x, y = population.features["x"], population.features["y"]
  n = x.shape[0]
  fn = _sums_fn(model)
  example_loss = np.zeros((n,), np.float64)
  example_acc = np.zeros((n,), np.float64)
  example_score = None
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    real = xb.shape[0]
    if real < batch_size:
      pad = batch_size - real
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
    l, a, s = fn(params, jnp.asarray(xb), jnp.asarray(yb))
    example_loss[start:start + real] = np.asarray(l)[:real]
    example_acc[start:start + real] = np.asarray(a)[:real]
    if s is not None:
      if example_score is None:
        example_score = np.zeros((n,), np.float64)
      example_score[start:start + real] = np.asarray(s)[:real]
  sizes = population.num_examples
  nonempty = sizes > 0
  client_acc = np.add.reduceat(example_acc, population.offsets[:-1][nonempty])
  client_acc = client_acc / sizes[nonempty]
  metrics = {
      "eval_loss": float(example_loss.mean()) if n else float("nan"),
      "eval_accuracy": float(example_acc.mean()) if n else float("nan"),
      "eval_perplexity": _perplexity(example_loss.mean()) if n else float(
          "nan"),
  }
  for p in (10, 50, 90):
    metrics[f"eval_client_accuracy_p{p}"] = (
        float(np.percentile(client_acc, p)) if client_acc.size else float("nan"))
  if example_score is not None:
    metrics.update(binary_ranking_metrics(y, example_score))
  elif n == 0 and _is_binary(model, jax.eval_shape(
      model.apply, params, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))):
    # No batch ran; a binary classifier still reports (NaN) ranking metrics.
    metrics.update(binary_ranking_metrics(y, np.zeros((0,))))
  return metrics
