"""A federated dataset: training clients plus held-out evaluation clients.

`FederatedDataset` is what every loader returns and what a simulation trains
and evaluates on: two disjoint `source.ClientSource`s (in-memory
`population.FederatedPopulation`s or lazy file readers) with features "x" and
"y", the shape of one input, and the number of label classes.

Loaders that build one: `builtin.load` (the registry of named datasets),
`files.file_dataset` (a federated data file on local disk) and
`shakespeare.shakespeare_dataset`.
"""

import dataclasses

from fedjax_dp.data import source as source_lib


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """A federated dataset split into training and held-out clients.

  Attributes:
    name: the dataset's name (for the built-in ones, its registry name).
    train: the clients that train.
    eval: held-out clients, disjoint from `train`, for evaluation.
    input_shape: shape of one example's "x".
    num_classes: number of labels; "y" lies in [0, num_classes).
  """

  name: str
  train: source_lib.ClientSource
  eval: source_lib.ClientSource
  input_shape: tuple[int, ...]
  num_classes: int

  def __post_init__(self):
    object.__setattr__(self, "input_shape", tuple(self.input_shape))
    for split in ("train", "eval"):
      specs = getattr(self, split).feature_specs
      if "x" not in specs or "y" not in specs:
        raise ValueError(f"{split} must have features 'x' and 'y'")
      if specs["x"][0] != self.input_shape:
        raise ValueError(
            f"{split} 'x' has example shape {specs['x'][0]}, input_shape is "
            f"{self.input_shape}")
    if set(self.train.client_ids) & set(self.eval.client_ids):
      raise ValueError("train and eval must not share clients")
