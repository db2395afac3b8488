"""Small random cohort blocks for round-level tests."""

import numpy as np

from fedjax_dp.algorithms import dp_fedavg


def cohort_block(clients: int = 4, seed: int = 0, valid=None, *,
                 steps: int = 2, batch: int = 4, features: int = 5,
                 classes: int = 3) -> dp_fedavg.CohortBlock:
  """Gaussian features, uniform labels, every example real; `valid` marks
  the client slots in use (default: all)."""
  rng = np.random.default_rng(seed)
  mask = (np.ones((clients,), bool) if valid is None
          else np.asarray(valid, bool))
  return dp_fedavg.CohortBlock(
      {"x": rng.normal(size=(clients, steps, batch, features)).astype(
          np.float32),
       "y": rng.integers(0, classes, (clients, steps, batch)).astype(
           np.int32)},
      np.ones((clients, steps, batch), bool), mask)
