"""Small random cohort blocks for round-level tests."""

import numpy as np

from fedjax_dp.data import blocks


def cohort_block(clients: int = 4, seed: int = 0, valid=None, *,
                 steps: int = 2, batch: int = 4, features: int = 5,
                 classes: int = 3) -> blocks.ClientBlock:
  """Gaussian features, uniform labels, every example real; `valid` marks
  the client slots in use (default: all)."""
  rng = np.random.default_rng(seed)
  mask = (np.ones((clients,), bool) if valid is None
          else np.asarray(valid, bool))
  return blocks.ClientBlock(
      {"x": rng.normal(size=(clients, steps, batch, features)).astype(
          np.float32),
       "y": rng.integers(0, classes, (clients, steps, batch)).astype(
           np.int32)},
      np.ones((clients, steps, batch), bool), mask)
