"""A federated population: many clients, each with its own examples.

Examples of all clients are stored concatenated (one array per feature) with
an offsets vector, so that gathering a cohort is a few slices rather than a
Python object per example, and a population of hundreds of thousands of
clients stays a handful of arrays.
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedPopulation:
  """Clients and their examples.

  Attributes:
    client_ids: one string id per client, in storage order.
    features: feature name -> array [total_examples, ...]; client `i` owns rows
      `offsets[i]:offsets[i + 1]` of every feature.
    offsets: int64 array [num_clients + 1], non-decreasing, offsets[0] == 0.
  """

  client_ids: tuple[str, ...]
  features: Mapping[str, np.ndarray]
  offsets: np.ndarray

  def __post_init__(self):
    offsets = np.asarray(self.offsets, dtype=np.int64)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "client_ids", tuple(str(c) for c in self.client_ids))
    if offsets.ndim != 1 or offsets.shape[0] != len(self.client_ids) + 1:
      raise ValueError(
          "offsets must have shape [num_clients + 1] = "
          f"[{len(self.client_ids) + 1}], got {offsets.shape}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
      raise ValueError("offsets must start at 0 and be non-decreasing")
    if len(set(self.client_ids)) != len(self.client_ids):
      raise ValueError("client_ids must be unique")
    if not self.features:
      raise ValueError("features must name at least one feature")
    for name, array in self.features.items():
      if array.shape[0] != offsets[-1]:
        raise ValueError(
            f"feature {name!r} has {array.shape[0]} rows, offsets say "
            f"{offsets[-1]}")

  @classmethod
  def from_client_arrays(
      cls,
      client_ids: Sequence[str],
      client_features: Sequence[Mapping[str, np.ndarray]],
  ) -> "FederatedPopulation":
    """Builds a population from one feature dict per client."""
    if len(client_ids) != len(client_features):
      raise ValueError("client_ids and client_features differ in length")
    if not client_features:
      raise ValueError("a population needs at least one client")
    names = sorted(client_features[0])
    for ids, feats in zip(client_ids, client_features):
      if sorted(feats) != names:
        raise ValueError(
            f"client {ids!r} has features {sorted(feats)}, expected {names}")
    sizes = [len(next(iter(f.values()))) for f in client_features]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    features = {
        n: np.concatenate([np.asarray(f[n]) for f in client_features], axis=0)
        for n in names
    }
    return cls(tuple(client_ids), features, offsets)

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def num_examples(self) -> np.ndarray:
    """Examples per client, int64 [num_clients]."""
    return np.diff(self.offsets)

  @property
  def feature_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Feature name -> (shape of one example, dtype)."""
    return {n: (a.shape[1:], a.dtype) for n, a in self.features.items()}

  def client(self, index: int) -> dict[str, np.ndarray]:
    lo, hi = self.offsets[index], self.offsets[index + 1]
    return {n: a[lo:hi] for n, a in self.features.items()}

  def subset(self, indices: Sequence[int]) -> "FederatedPopulation":
    """A new population holding only the clients at `indices`, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    rows = np.concatenate(
        [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        or [np.zeros((0,), np.int64)])
    sizes = self.num_examples[indices]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FederatedPopulation(
        tuple(self.client_ids[i] for i in indices),
        {n: a[rows] for n, a in self.features.items()}, offsets)
