"""Federated datasets read from files on local disk.

`file_dataset(path, ...)` opens any supported format (see
`formats/detect.py`) as a ClientSource, maps the file's feature names to the
"x" and "y" the core trains on, and splits the clients into training and
held-out evaluation clients.

A training population that fits in memory (the common case: EMNIST's 3,400
clients decode to about 0.2 GB) is read once, when the dataset is built; each
round's cohort is then gathered from it with one vectorised index. A larger
one (e.g. StackOverflow's ~342,000 clients) stays on disk and the runner
reads only each round's cohort, so it trains in memory bounded by the
cohort. `in_memory` chooses; by default a population is loaded when it
decodes to at most `DEFAULT_IN_MEMORY_FRACTION` of the host's memory.
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from fedjax_dp.data import blocks
from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import population as population_lib
from fedjax_dp.data import source as source_lib
from fedjax_dp.data.formats import detect


# A training population decoded to at most this share of the host's memory
# is loaded once (besides it, a run holds up to three cohort blocks of
# blocks.BLOCK_MEMORY_FRACTION each and the held-out clients).
DEFAULT_IN_MEMORY_FRACTION = 1 / 4


def decoded_bytes(source: source_lib.ClientSource) -> int:
  """Bytes the clients of `source` take in memory, from its index."""
  return (int(np.sum(source.num_examples))
          * blocks.example_bytes(source.feature_specs))


def _load_in_memory(source: source_lib.ClientSource, in_memory,
                    in_memory_max_gib) -> bool:
  if in_memory is not None:
    if not isinstance(in_memory, bool):
      raise ValueError(f"in_memory must be true, false or null (decide by "
                       f"size), got {in_memory!r}")
    return in_memory
  if in_memory_max_gib is None:
    limit = DEFAULT_IN_MEMORY_FRACTION * blocks.host_memory_bytes()
  elif (isinstance(in_memory_max_gib, bool)
        or not isinstance(in_memory_max_gib, (int, float))
        or not in_memory_max_gib >= 0):
    raise ValueError(f"in_memory_max_gib must be a number >= 0, got "
                     f"{in_memory_max_gib!r}")
  else:
    limit = in_memory_max_gib * 2**30
  return decoded_bytes(source) <= limit


@dataclasses.dataclass(frozen=True)
class ClientView:
  """Some clients of a source, with features renamed and cast.

  Implements ClientSource: `subset(i)` loads client `indices[i]` of `source`.

  Attributes:
    source: the underlying source.
    indices: int64 array of the source's client indices this view exposes.
    features: new feature name -> (source feature name, numpy dtype or None).
  """

  source: source_lib.ClientSource
  indices: np.ndarray
  features: Mapping[str, tuple[str, str | None]]

  @property
  def client_ids(self) -> tuple[str, ...]:
    ids = self.source.client_ids
    return tuple(ids[i] for i in self.indices)

  @property
  def num_clients(self) -> int:
    return int(self.indices.shape[0])

  @property
  def num_examples(self) -> np.ndarray:
    return np.asarray(self.source.num_examples)[self.indices]

  @property
  def feature_specs(self):
    specs = self.source.feature_specs
    return {new: (specs[old][0], np.dtype(dtype) if dtype else specs[old][1])
            for new, (old, dtype) in self.features.items()}

  def subset(
      self, indices: Sequence[int]) -> population_lib.FederatedPopulation:
    loaded = self.source.subset(self.indices[np.asarray(indices, np.int64)])
    feats = {}
    for new, (old, dtype) in self.features.items():
      array = loaded.features[old]
      feats[new] = array.astype(dtype, copy=False) if dtype else array
    return population_lib.FederatedPopulation(
        loaded.client_ids, feats, loaded.offsets)


def file_dataset(
    path: str,
    *,
    num_classes: int,
    x: str = "x",
    y: str = "y",
    x_dtype: str | None = "float32",
    scale: float | None = None,
    eval_path: str | None = None,
    eval_fraction: float = 0.2,
    max_eval_clients: int = 500,
    format_name: str | None = None,
    seed: int = 0,
    in_memory: bool | None = None,
    in_memory_max_gib: float | None = None,
    **reader_kwargs,
) -> dataset_lib.FederatedDataset:
  """A FederatedDataset over a federated data file (lazy).

  Args:
    path: the training file (or the whole population when `eval_path` is
      None, in which case `eval_fraction` of its clients are held out).
    num_classes: number of label classes (public; not read from the data).
    x: the file's input feature name (e.g. "pixels" for TFF's EMNIST).
    y: the file's label feature name (e.g. "label").
    x_dtype: dtype the inputs are cast to (None keeps the file's).
    scale: not supported yet; must be None (inputs are used as stored).
    eval_path: an optional separate file of held-out clients.
    eval_fraction: fraction of clients held out when `eval_path` is None.
    max_eval_clients: at most this many held-out clients are evaluated (the
      first ones of a seeded shuffle), so evaluation memory stays bounded.
    format_name: force a format instead of detecting it.
    seed: seed of the held-out split.
    in_memory: load the training clients once (True), read each round's
      cohort from the file (False), or decide by size (None: load when they
      decode to at most `in_memory_max_gib`).
    in_memory_max_gib: the size limit of `in_memory=None`; default
      `DEFAULT_IN_MEMORY_FRACTION` of the host's memory.
    **reader_kwargs: passed to the format's reader.

  Returns:
    A `dataset.FederatedDataset` named "file" whose train is a
    FederatedPopulation (in memory) or a ClientView (read per round), and
    whose eval is a ClientView.
  """
  if scale is not None:
    raise ValueError("scale must be None")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  if not 0 < eval_fraction < 1:
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
  if not isinstance(max_eval_clients, int) or max_eval_clients < 1:
    raise ValueError(
        f"max_eval_clients must be an integer >= 1, got {max_eval_clients!r}")
  source = detect.open_source(path, format_name, **reader_kwargs)
  specs = source.feature_specs
  for field, name in (("x", x), ("y", y)):
    if name not in specs:
      raise ValueError(
          f"{field}: feature {name!r} is not in {path} (features: "
          f"{sorted(specs)})")
  features = {"x": (x, x_dtype), "y": (y, "int32")}
  rng = np.random.default_rng([seed, 1])
  if eval_path is None:
    order = rng.permutation(source.num_clients)
    num_eval = min(max(round(eval_fraction * source.num_clients), 1),
                   source.num_clients - 1)
    train_idx = np.sort(order[num_eval:])
    eval_idx = order[:num_eval][:max_eval_clients]
    eval_source = source
  else:
    train_idx = np.arange(source.num_clients)
    eval_source = detect.open_source(eval_path, format_name, **reader_kwargs)
    eval_idx = rng.permutation(eval_source.num_clients)[:max_eval_clients]
  train = ClientView(source, train_idx.astype(np.int64), features)
  if _load_in_memory(train, in_memory, in_memory_max_gib):
    train = train.subset(np.arange(train.num_clients))
  held = ClientView(eval_source, np.sort(eval_idx).astype(np.int64), features)
  return dataset_lib.FederatedDataset(
      "file", train, held, tuple(train.feature_specs["x"][0]), num_classes)
