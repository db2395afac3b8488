"""A federated dataset from the user's own arrays, in memory.

Three ways in, each returning a `dataset.FederatedDataset` that
`runner.run(config, dataset=...)` and `sweep.run_sweep(..., dataset=...)`
train on:

* `from_clients`: a mapping client id -> {"x": ..., "y": ...}, the data's
  own clients (users, devices, hospitals).
* `from_arrays`: centralised arrays with each example's client key.
* `from_centralized`: centralised arrays split over simulated clients by a
  partitioner (`partition.py`: IID or Dirichlet label skew).

Arrays of 64-bit numbers are kept as JAX computes them by default (float32,
int32).

Held-out clients (for evaluation) are either given or a random fraction of
the clients, chosen by `seed`.
"""

from typing import Mapping

import numpy as np

from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import partition
from fedjax_dp.data import population as population_lib

PARTITIONS = ("iid", "dirichlet_mixture", "dirichlet_label_split")


def from_clients(
    clients: Mapping[str, Mapping[str, np.ndarray]],
    *,
    eval_clients: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    eval_fraction: float = 0.2,
    num_classes: int | None = None,
    seed: int = 0,
    name: str = "in_memory",
) -> dataset_lib.FederatedDataset:
  """A dataset of the given clients.

  Args:
    clients: client id -> features, at least "x" (inputs, [n, ...]) and "y"
      (integer labels, [n] or [n, seq_len]); every client has the same
      feature names, shapes (but n) and dtypes.
    eval_clients: held-out clients in the same form. None: hold out
      `eval_fraction` of `clients`, chosen by `seed`.
    eval_fraction: the share of clients held out when `eval_clients` is
      None, in (0, 1); at least one client on each side.
    num_classes: number of labels. None: the largest label + 1.
    seed: chooses the held-out clients.
    name: the dataset's name (what the run records, as "<name>").

  Raises:
    ValueError: naming the client and the feature that is malformed.
  """
  train = _population(clients, "clients")
  if eval_clients is None:
    train, held = _hold_out(train, eval_fraction, seed)
  else:
    held = _population(eval_clients, "eval_clients")
  return _dataset(name, train, held, num_classes)


def from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    client_keys: np.ndarray,
    **kwargs,
) -> dataset_lib.FederatedDataset:
  """A dataset of centralised arrays whose clients are given per example.

  Args:
    x: inputs, [n, ...].
    y: integer labels, [n] (or [n, seq_len]).
    client_keys: [n], the client of each example (a user id, a site, ...).
    **kwargs: `from_clients`'s keyword arguments.
  """
  x, y = _check_xy(x, y)
  client_keys = np.asarray(client_keys)
  if client_keys.shape != (x.shape[0],):
    raise ValueError(f"client_keys must have shape [{x.shape[0]}] (one key "
                     f"per example), got {client_keys.shape}")
  keys, parts = partition.by_key(client_keys)
  clients = {str(k): {"x": x[p], "y": y[p]} for k, p in zip(keys, parts)}
  if len(clients) != len(keys):
    raise ValueError("client_keys: two keys have the same string form")
  return from_clients(clients, **kwargs)


def from_centralized(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_clients: int,
    partition_scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    **kwargs,
) -> dataset_lib.FederatedDataset:
  """Centralised arrays split over `num_clients` simulated clients.

  Args:
    x: inputs, [n, ...].
    y: integer class labels, [n].
    num_clients: clients to split into (training plus held out).
    partition_scheme: "iid" (equal random shares), "dirichlet_mixture"
      (each client's class mixture drawn from Dir(alpha * prior), Hsu et al.
      2019) or "dirichlet_label_split" (each class scattered by Dir(alpha),
      NIID-Bench).
    alpha: Dirichlet concentration; smaller is more skewed.
    seed: the partition's and the held-out choice's seed.
    **kwargs: `from_clients`'s other keyword arguments.
  """
  x, y = _check_xy(x, y)
  if partition_scheme not in PARTITIONS:
    raise ValueError(f"partition_scheme must be one of {list(PARTITIONS)}, "
                     f"got {partition_scheme!r}")
  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
  if partition_scheme == "iid":
    parts = partition.iid(x.shape[0], num_clients, rng)
  elif partition_scheme == "dirichlet_mixture":
    parts = partition.dirichlet_client_mixture(y, num_clients, alpha, rng)
  else:
    parts = partition.dirichlet_label_split(y, num_clients, alpha, rng)
  width = max(4, len(str(num_clients - 1)))
  clients = {f"client-{i:0{width}d}": {"x": x[p], "y": y[p]}
             for i, p in enumerate(parts)}
  return from_clients(clients, seed=seed, **kwargs)


def _check_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must have the same number of examples, got "
                     f"shapes {x.shape} and {y.shape}")
  return x, y


def _population(clients, field: str) -> population_lib.FederatedPopulation:
  if not isinstance(clients, Mapping) or not clients:
    raise ValueError(f"{field} must be a non-empty mapping client id -> "
                     "features")
  ids = [str(c) for c in clients]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{field}: two client ids have the same string form")
  first_id, first = next(iter(clients.items()))
  names = sorted(first)
  if "x" not in names or "y" not in names:
    raise ValueError(f"{field}[{first_id!r}] must have features 'x' and "
                     f"'y', has {names}")
  specs = {}
  for n in names:
    a = _jax_precision(np.asarray(first[n]))
    specs[n] = (a.shape[1:], a.dtype)
  features = []
  for cid, feats in clients.items():
    if sorted(feats) != names:
      raise ValueError(f"{field}[{cid!r}] has features {sorted(feats)}, "
                       f"expected {names}")
    arrays = {n: _jax_precision(np.asarray(feats[n])) for n in names}
    sizes = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(sizes) != 1 or None in sizes:
      raise ValueError(f"{field}[{cid!r}]: features must share their first "
                       f"(example) axis, got shapes "
                       f"{ {n: a.shape for n, a in arrays.items()} }")
    for n, a in arrays.items():
      if (a.shape[1:], a.dtype) != specs[n]:
        raise ValueError(
            f"{field}[{cid!r}] feature {n!r} has example shape "
            f"{a.shape[1:]} and dtype {a.dtype}; the first client's are "
            f"{specs[n][0]} and {specs[n][1]}")
    features.append(arrays)
  if not np.issubdtype(specs["y"][1], np.integer):
    raise ValueError(f"{field}: labels 'y' must be integers, got dtype "
                     f"{specs['y'][1]}")
  return population_lib.FederatedPopulation.from_client_arrays(ids, features)


def _jax_precision(a: np.ndarray) -> np.ndarray:
  """64-bit numbers as JAX computes them by default: float32, int32."""
  if a.dtype == np.float64:
    return a.astype(np.float32)
  if a.dtype == np.int64 and (a.size == 0 or (
      a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max)):
    return a.astype(np.int32)
  return a


def _hold_out(population, eval_fraction, seed):
  n = population.num_clients
  if not 0 < eval_fraction < 1:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
  if n < 2:
    raise ValueError(f"clients: holding clients out needs at least 2, got {n}")
  num_eval = min(max(round(eval_fraction * n), 1), n - 1)
  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
  held = np.zeros(n, bool)
  held[rng.choice(n, num_eval, replace=False)] = True
  return (population.subset(np.flatnonzero(~held)),
          population.subset(np.flatnonzero(held)))


def _dataset(name, train, held, num_classes) -> dataset_lib.FederatedDataset:
  labels = [p.features["y"] for p in (train, held)]
  low = min(int(l.min()) for l in labels if l.size)
  high = max(int(l.max()) for l in labels if l.size)
  if num_classes is None:
    num_classes = high + 1
  if low < 0 or high >= num_classes:
    raise ValueError(f"labels 'y' must lie in [0, num_classes={num_classes})"
                     f", found values in [{low}, {high}]")
  return dataset_lib.FederatedDataset(
      name, train, held, train.feature_specs["x"][0], int(num_classes))
