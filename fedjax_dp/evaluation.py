"""Evaluation of a global model on held-out clients."""

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
    return (losses.loss_of(model)(logits, y),
            losses.accuracy_of(model)(logits, y))
  return sums


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
  """Pooled loss/accuracy and per-client accuracy percentiles.

  Batches are padded to `batch_size` so that one compilation serves all.
  """
  x, y = population.features["x"], population.features["y"]
  n = x.shape[0]
  fn = _sums_fn(model)
  example_loss = np.zeros((n,), np.float64)
  example_acc = np.zeros((n,), np.float64)
  for start in range(0, n, batch_size):
    xb, yb = x[start:start + batch_size], y[start:start + batch_size]
    real = xb.shape[0]
    if real < batch_size:
      pad = batch_size - real
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,) + yb.shape[1:], yb.dtype)])
    l, a = fn(params, jnp.asarray(xb), jnp.asarray(yb))
    example_loss[start:start + real] = np.asarray(l)[:real]
    example_acc[start:start + real] = np.asarray(a)[:real]
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
  return metrics
