"""A user's own model and data, outside the package's registries.

Tests name them by import path ("helpers.user_code:TinyNet"), as a user
names theirs ("my_pkg.nets:MyNet").
"""

import flax.linen as nn
import numpy as np

from fedjax_dp.data import in_memory

NUM_CLASSES = 3
FEATURES = 6


class TinyNet(nn.Module):
  """A small MLP with a layer norm: not one of the built-in models."""

  hidden: int = 8
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.LayerNorm()(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(nn.gelu(x))


def make_dataset(num_clients: int = 48, examples: int = 12, seed: int = 0):
  """Clients whose labels follow two features (half are of class 1), each with
  its own shift of the inputs (a little heterogeneity)."""
  rng = np.random.default_rng(seed)
  clients = {}
  for i in range(num_clients):
    x = rng.normal(size=(examples, FEATURES)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)).astype(np.int32)
    x += rng.normal(scale=0.3, size=(1, FEATURES)).astype(np.float32)
    clients[f"device-{i:03d}"] = {"x": x, "y": y}
  return in_memory.from_clients(clients, num_classes=NUM_CLASSES,
                                seed=seed, name="tiny_shifted")


class PlainMLP(nn.Module):
  """A ReLU MLP written as a user would: computes what the built-in
  "mlp_2nn" computes, under other code."""

  widths: tuple = (16, 16)
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    act = {"relu": nn.relu, "gelu": nn.gelu}[self.activation]
    for width in self.widths:
      x = act(nn.Dense(width)(x))
    return nn.Dense(NUM_CLASSES)(x)
