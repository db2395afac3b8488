"""Splitting centralised labelled data into simulated clients.

Every partitioner returns a list with one int64 index array per client, each
sorted ascending; the arrays index the rows of the centralised data. All are
deterministic for a seed: pass an `int` (a fresh `np.random.Generator` is made
from it) or a `np.random.Generator` (which is advanced). `to_population` turns
a partition and the centralised arrays into a `FederatedPopulation`.

Which partitioner models which kind of heterogeneity:

* `iid`: no heterogeneity (the baseline).
* `dirichlet_client_mixture` (Hsu et al. 2019): every client has its own
  class mixture drawn around the global class prior; client sizes are chosen
  by the caller (near-equal by default).
* `dirichlet_label_split` (NIID-Bench, Li et al. 2022; Flower's
  `DirichletPartitioner`): every class is scattered over the clients, so both
  label mixtures and client sizes vary.
* `by_key`: the data's own natural clients (writer, user, hospital, ...).
"""

from typing import Mapping, Sequence

import numpy as np

from fedjax_dp.data import checks
from fedjax_dp.data import population as population_lib

Seed = int | np.random.Generator


def _as_rng(seed: Seed) -> np.random.Generator:
  """A Generator for `seed` (an int >= 0 or a Generator, used as is)."""
  if isinstance(seed, np.random.Generator):
    return seed
  if isinstance(seed, (bool, np.bool_)) or not isinstance(
      seed, (int, np.integer)):
    raise ValueError(
        f"seed must be an int >= 0 or a np.random.Generator, got {seed!r}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  return np.random.default_rng(int(seed))


def _check_alpha(alpha) -> float:
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise ValueError(f"alpha must be a float > 0, got {alpha!r}") from None
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite float > 0, got {alpha}")
  return alpha


def _check_labels(labels) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels; returns (class index per example, count per class)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if labels.shape[0] == 0:
    raise ValueError("labels must hold at least one example")
  _, class_index, counts = np.unique(
      labels, return_inverse=True, return_counts=True)
  return class_index.reshape(-1), counts


def _sorted(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_examples: int, num_clients: int, seed: Seed) -> list[np.ndarray]:
  """Shuffles the examples and deals them out in near-equal parts.

  Args:
    num_examples: examples in the centralised data (>= 1).
    num_clients: clients, in [1, num_examples].
    seed: int >= 0 or Generator.

  Returns:
    `num_clients` disjoint index arrays covering range(num_examples); sizes
    differ by at most one.

  Raises:
    ValueError: on an out-of-range argument.
  """
  num_examples = checks.check_int("num_examples", num_examples, 1)
  num_clients = checks.check_int("num_clients", num_clients, 1, num_examples)
  rng = _as_rng(seed)
  order = rng.permutation(num_examples)
  return _sorted(np.array_split(order, num_clients))


def dirichlet_client_mixture(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: Seed,
    examples_per_client: int | Sequence[int] | None = None,
) -> list[np.ndarray]:
  """Hsu et al. (2019): each client draws its own class mixture.

  Client k draws q_k ~ Dir(alpha * p), p the global class prior (classes
  that occur in `labels`), then, one client after another, takes its
  examples without replacement: each example's class is drawn from q_k, and a
  class with no examples left is dropped and q_k renormalised over the
  remaining classes (if q_k has no mass left on them, which only float
  underflow at tiny alpha can cause, the remaining classes are weighted by
  their remaining counts). Large alpha gives every client roughly p; alpha
  -> 0 gives every client a single class. Clients later in the order see
  more exhausted classes, as in the original procedure.

  Args:
    labels: 1-D array, one label per example (any values np.unique sorts).
    num_clients: clients, in [1, len(labels)].
    alpha: concentration, > 0.
    seed: int >= 0 or Generator.
    examples_per_client: None (default): near-equal sizes that together
      cover all examples; an int: that many for every client; or one size per
      client. Sizes must be >= 1 and sum to at most len(labels).

  Returns:
    `num_clients` disjoint index arrays, client k holding exactly its size.

  Raises:
    ValueError: on an out-of-range argument.
  """
  class_index, class_counts = _check_labels(labels)
  n = class_index.shape[0]
  num_clients = checks.check_int("num_clients", num_clients, 1, n)
  alpha = _check_alpha(alpha)
  if examples_per_client is None:
    sizes = np.full(num_clients, n // num_clients, np.int64)
    sizes[:n % num_clients] += 1
  elif np.ndim(examples_per_client) == 0:
    each = checks.check_int("examples_per_client", examples_per_client, 1,
                      n // num_clients)
    sizes = np.full(num_clients, each, np.int64)
  else:
    sizes = [
        checks.check_int(f"examples_per_client[{i}]", s, 1)
        for i, s in enumerate(examples_per_client)
    ]
    sizes = np.asarray(sizes, np.int64)
    if sizes.shape[0] != num_clients:
      raise ValueError(
          f"examples_per_client must have num_clients={num_clients} entries, "
          f"got {sizes.shape[0]}")
    if sizes.sum() > n:
      raise ValueError(
          f"examples_per_client must sum to at most len(labels)={n}, got "
          f"{int(sizes.sum())}")
  rng = _as_rng(seed)

  prior = class_counts / n
  pools = [rng.permutation(np.flatnonzero(class_index == c))
           for c in range(class_counts.shape[0])]
  used = np.zeros_like(class_counts)
  parts = []
  for size in sizes:
    mixture = rng.dirichlet(alpha * prior)
    take = np.zeros_like(class_counts)
    need = int(size)
    # Drawing `need` classes at once and clipping at what is left is the same
    # in law as drawing one example at a time with renormalisation: the
    # clipped draws are exactly those a sequential draw would have rejected.
    # Each pass fills a class or finishes, so this loops <= num_classes + 1
    # times.
    while need > 0:
      left = class_counts - used - take
      weights = np.where(left > 0, mixture, 0.0)
      if not weights.sum() > 0:
        weights = left.astype(np.float64)
      draw = np.minimum(rng.multinomial(need, weights / weights.sum()), left)
      take += draw
      need -= int(draw.sum())
    parts.append(np.concatenate(
        [pools[c][used[c]:used[c] + take[c]] for c in range(len(pools))]))
    used += take
  return _sorted(parts)


def dirichlet_label_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: Seed,
    min_client_size: int = 1,
    *,
    self_balancing: bool = False,
    max_tries: int = 100,
) -> list[np.ndarray]:
  """Scatters every class over the clients with Dirichlet proportions.

  NIID-Bench's partition (Li et al. 2022), also Flower's DirichletPartitioner:
  for each class, proportions ~ Dir(alpha * 1_K) over the K clients, and the
  class's shuffled examples are cut at round(cumsum(proportions) * n_class)
  (NIID-Bench floors, which always favours the last client).
  The whole draw is repeated until every client holds at least
  `min_client_size` examples, so the result is the Dirichlet split
  conditioned on that event.

  Small alpha makes clients hold few classes and very unequal numbers of
  examples. Note that with many clients per example (say 300 clients for
  1,800 examples at alpha = 0.5) a minimum of 2 examples is almost never
  met; use fewer clients, a larger alpha or a smaller minimum.

  Args:
    labels: 1-D array, one label per example.
    num_clients: clients K, in [1, len(labels)].
    alpha: concentration, > 0.
    seed: int >= 0 or Generator.
    min_client_size: least examples per client, in [0, len(labels) // K].
    self_balancing: NIID-Bench's variant: while scattering a class, clients
      already holding >= len(labels) / K examples get no share.
    max_tries: draws to attempt before giving up, >= 1.

  Returns:
    `num_clients` disjoint index arrays covering all examples.

  Raises:
    ValueError: on an out-of-range argument, or if no draw in `max_tries`
      gave every client `min_client_size` examples.
  """
  class_index, class_counts = _check_labels(labels)
  n = class_index.shape[0]
  num_clients = checks.check_int("num_clients", num_clients, 1, n)
  alpha = _check_alpha(alpha)
  min_client_size = checks.check_int(
      "min_client_size", min_client_size, 0, n // num_clients)
  max_tries = checks.check_int("max_tries", max_tries, 1)
  rng = _as_rng(seed)

  for _ in range(max_tries):
    # cuts[c, k]: end of client k's share of class c's shuffled examples.
    cuts = np.zeros((class_counts.shape[0], num_clients), np.int64)
    held = np.zeros(num_clients, np.int64)
    for c, count in enumerate(class_counts):
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      if self_balancing:
        proportions = np.where(held < n / num_clients, proportions, 0.0)
        if not proportions.sum() > 0:
          proportions = (held < n / num_clients).astype(np.float64)
        proportions = proportions / proportions.sum()
      # Rounding (NIID-Bench floors) keeps the first and last clients'
      # expected shares unbiased, which matters for small classes.
      cuts[c] = np.round(np.cumsum(proportions) * count).astype(np.int64)
      cuts[c, -1] = count  # cumsum may miss 1 by float error.
      held += np.diff(cuts[c], prepend=0)
    if held.min() >= min_client_size:
      break
  else:
    raise ValueError(
        f"no Dirichlet split in max_tries={max_tries} draws gave every one of "
        f"num_clients={num_clients} clients min_client_size="
        f"{min_client_size} examples (alpha={alpha}, {n} examples); lower "
        "min_client_size or num_clients, or raise alpha or max_tries")

  parts = [[] for _ in range(num_clients)]
  for c in range(class_counts.shape[0]):
    examples = rng.permutation(np.flatnonzero(class_index == c))
    for k, chunk in enumerate(np.split(examples, cuts[c, :-1])):
      parts[k].append(chunk)
  return _sorted([np.concatenate(p) for p in parts])


def by_key(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """One client per distinct value of a natural key (user, writer, site).

  Args:
    keys: 1-D array, the key of each example.

  Returns:
    (client_keys, parts): the distinct keys in np.unique's sorted order, and
    for each the indices of its examples.

  Raises:
    ValueError: if `keys` is not 1-D or is empty.
  """
  keys = np.asarray(keys)
  if keys.ndim != 1:
    raise ValueError(f"keys must be 1-D, got shape {keys.shape}")
  if keys.shape[0] == 0:
    raise ValueError("keys must hold at least one example")
  client_keys, inverse = np.unique(keys, return_inverse=True)
  inverse = inverse.reshape(-1)
  order = np.argsort(inverse, kind="stable")
  bounds = np.cumsum(np.bincount(inverse, minlength=client_keys.shape[0]))
  return client_keys, _sorted(np.split(order, bounds[:-1]))


def to_population(
    features: Mapping[str, np.ndarray],
    parts: Sequence[np.ndarray],
    client_ids: Sequence[str],
) -> population_lib.FederatedPopulation:
  """Gathers centralised arrays into a population, one client per part.

  Args:
    features: feature name -> array [num_examples, ...].
    parts: index arrays, one per client (e.g. a partitioner's result).
    client_ids: one unique id per part.

  Returns:
    The population; client i owns rows `parts[i]` of every feature, in order.

  Raises:
    ValueError: if the lengths disagree or an index is out of range.
  """
  if len(parts) != len(client_ids):
    raise ValueError(
        f"parts has {len(parts)} clients, client_ids {len(client_ids)}")
  if not parts:
    raise ValueError("parts must hold at least one client")
  rows = np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in parts])
  for name, array in features.items():
    if rows.size and (rows.min() < 0 or rows.max() >= array.shape[0]):
      raise ValueError(
          f"parts index rows outside [0, {array.shape[0]}) of feature "
          f"{name!r}")
  sizes = [np.size(p) for p in parts]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return population_lib.FederatedPopulation(
      tuple(client_ids),
      {name: np.asarray(array)[rows] for name, array in features.items()},
      offsets)
