"""FedProx's Synthetic(alpha, beta) federated data (Li et al. 2020).

From "Federated Optimization in Heterogeneous Networks", section 5.1: every
user k has its own softmax-regression model and its own input distribution,

    u_k ~ N(0, alpha),  B_k ~ N(0, beta)            (variances, not stds)
    W_k [d, C], b_k [C]  entries ~ N(u_k, 1)
    v_k [d]              entries ~ N(B_k, 1)
    x ~ N(v_k, Sigma),   Sigma diagonal, Sigma_jj = (j + 1) ** -1.2
    y = argmax(x W_k + b_k)

so alpha controls how much the users' models differ and beta how much their
inputs differ. The IID variant gives every user one shared W, b ~ N(0, 1) and
x ~ N(0, Sigma), so all users draw from the same distribution. Its input mean
is 0, as in the FedProx code (`generate_synthetic(alpha=0, beta=0, iid=1)`),
not a shared random v ~ N(0, 1): Sigma is small (trace ~ 3.5) next to the
spread of v W (variance ~ 60 per logit), so a random v would make nearly
every example one class.

User sizes follow the FedProx code: int(lognormal(4, 2)) + 50, here capped at
`max_examples` because the lognormal tail reaches millions.

A difference from the FedProx code, on purpose: its code draws u_k and B_k
with *standard deviation* alpha and beta; we follow the paper (variance), so
std = sqrt(alpha) (the same thing for the common alpha, beta in {0, 1}).
"""

from typing import NamedTuple

import numpy as np

from fedjax_dp.data import population as population_lib


class SyntheticModels(NamedTuple):
  """The hidden per-user generators, for tests and analysis.

  Attributes:
    weights: float64 [num_clients, dim, num_classes], W_k.
    biases: float64 [num_clients, num_classes], b_k.
    input_means: float64 [num_clients, dim], v_k.
    input_variances: float64 [dim], the diagonal of Sigma.
  """

  weights: np.ndarray
  biases: np.ndarray
  input_means: np.ndarray
  input_variances: np.ndarray


def input_variances(dim: int) -> np.ndarray:
  """The diagonal of Sigma: (j + 1) ** -1.2 for j = 0..dim-1."""
  return np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2)


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < low:
    raise ValueError(f"{name} must be >= {low}, got {value}")
  return int(value)


def _check_variance(name: str, value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a float >= 0, got {value!r}") from None
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite float >= 0, got {value}")
  return value


def synthetic_with_models(
    num_clients: int,
    alpha: float,
    beta: float,
    *,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    seed: int = 0,
    max_examples: int = 1000,
    num_examples: int | None = None,
    id_prefix: str = "synthetic",
) -> tuple[population_lib.FederatedPopulation, SyntheticModels]:
  """Like `synthetic`, also returning the users' hidden models."""
  num_clients = _check_int("num_clients", num_clients, 1)
  alpha = _check_variance("alpha", alpha)
  beta = _check_variance("beta", beta)
  dim = _check_int("dim", dim, 1)
  num_classes = _check_int("num_classes", num_classes, 2)
  seed = _check_int("seed", seed, 0)
  max_examples = _check_int("max_examples", max_examples, 1)
  if num_examples is not None:
    num_examples = _check_int("num_examples", num_examples, 1)
  rng = np.random.default_rng(seed)

  if num_examples is None:
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    sizes = np.minimum(sizes, max_examples)
  else:
    sizes = np.full(num_clients, num_examples, np.int64)
  variances = input_variances(dim)
  if iid:
    weights = np.broadcast_to(
        rng.normal(0.0, 1.0, (dim, num_classes)),
        (num_clients, dim, num_classes))
    biases = np.broadcast_to(
        rng.normal(0.0, 1.0, num_classes), (num_clients, num_classes))
    means = np.zeros((num_clients, dim))
  else:
    model_means = rng.normal(0.0, np.sqrt(alpha), num_clients)  # u_k
    input_shifts = rng.normal(0.0, np.sqrt(beta), num_clients)  # B_k
    means = rng.normal(input_shifts[:, None], 1.0, (num_clients, dim))
    weights = rng.normal(
        model_means[:, None, None], 1.0, (num_clients, dim, num_classes))
    biases = rng.normal(model_means[:, None], 1.0, (num_clients, num_classes))

  xs, ys = [], []
  for k in range(num_clients):
    x = means[k] + np.sqrt(variances) * rng.standard_normal((sizes[k], dim))
    # Label the float32 inputs that are stored, so that the stored (x, y)
    # satisfy y = argmax(x W_k + b_k) exactly, ties from rounding included.
    x = x.astype(np.float32)
    xs.append(x)
    ys.append(np.argmax(x.astype(np.float64) @ weights[k] + biases[k], axis=1))
  width = max(4, len(str(num_clients - 1)))
  population = population_lib.FederatedPopulation(
      tuple(f"{id_prefix}-{k:0{width}d}" for k in range(num_clients)),
      {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int32)},
      np.concatenate([[0], np.cumsum(sizes)]))
  models = SyntheticModels(
      np.array(weights), np.array(biases), np.array(means), variances)
  return population, models


def synthetic(
    num_clients: int,
    alpha: float,
    beta: float,
    *,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    seed: int = 0,
    max_examples: int = 1000,
    num_examples: int | None = None,
    id_prefix: str = "synthetic",
) -> population_lib.FederatedPopulation:
  """Generates FedProx's Synthetic(alpha, beta) population.

  Args:
    num_clients: users, >= 1.
    alpha: variance of u_k (model heterogeneity), >= 0; unused if iid.
    beta: variance of B_k (input heterogeneity), >= 0; unused if iid.
    dim: input dimension d, >= 1.
    num_classes: classes C, >= 2.
    iid: the IID variant (one shared model, inputs ~ N(0, Sigma)).
    seed: int >= 0; the same seed gives the same population.
    max_examples: cap on the lognormal user sizes, >= 1.
    num_examples: if given, every user has exactly this many examples
      instead of lognormal sizes.
    id_prefix: client ids are f"{id_prefix}-{k:04d}".

  Returns:
    The population, with features "x" float32 [N, dim] and "y" int32 [N].

  Raises:
    ValueError: on an out-of-range argument.
  """
  return synthetic_with_models(
      num_clients, alpha, beta, dim=dim, num_classes=num_classes, iid=iid,
      seed=seed, max_examples=max_examples, num_examples=num_examples,
      id_prefix=id_prefix)[0]
