"""The read interface the runner needs from a federated data set.

A `FederatedPopulation` holds all examples in memory; a lazy source (e.g. one
reading a TensorFlow Federated HDF5 file) knows only client ids and sizes up
front and loads a cohort's examples when asked. The runner sees either one
through this interface, so the choice is a matter of data size, not of code.
"""

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from fedjax_dp.data import population as population_lib


@runtime_checkable
class ClientSource(Protocol):
  """Clients known by id and size, whose examples load on demand.

  Implemented by `population.FederatedPopulation` and by the lazy sources in
  `fedjax_dp.data.formats`.
  """

  @property
  def client_ids(self) -> tuple[str, ...]:
    """One string id per client, in a fixed order that indices refer to."""
    ...

  @property
  def num_clients(self) -> int:
    ...

  @property
  def num_examples(self) -> np.ndarray:
    """Examples per client, int64 [num_clients]."""
    ...

  @property
  def feature_specs(self) -> Mapping[str, tuple[tuple[int, ...], np.dtype]]:
    """Feature name -> (shape of one example, dtype)."""
    ...

  def subset(
      self, indices: Sequence[int]) -> population_lib.FederatedPopulation:
    """Loads the clients at `indices` (and only those), in that order."""
    ...
