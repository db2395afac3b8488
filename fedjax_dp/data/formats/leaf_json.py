"""LEAF's JSON layout, loaded into a FederatedPopulation.

Layout (LEAF's FEMNIST, Shakespeare, Sent140, Synthetic, ...):

  {"users": [u, ...], "num_samples": [n_u, ...],
   "user_data": {u: {"x": [...], "y": [...]}, ...}}

A data set is often split across several such files in one directory (e.g.
FEMNIST's `all_data_0.json` ...); a directory path reads every `*.json` in it,
in file name order. Per feature, JSON numbers become float32 if any is a float
and int64 otherwise, booleans bool, and strings object arrays of `str` (e.g.
Shakespeare x: 80-character strings, y: the next character). `num_samples` is
only a hint: LEAF's Shakespeare files are known to disagree with their data,
so the data (len of user_data[u]["y"], or of the first feature) is trusted
and a disagreement warns.
"""

import glob
import json
import os
from typing import Any, Mapping, Optional, Sequence
import warnings

import numpy as np

from fedjax_dp.data import population as population_lib
from fedjax_dp.data.formats import common


def json_files(path: str) -> list[str]:
  """The JSON files making up the LEAF data set at `path` (file or dir)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.json")))
    if not files:
      raise common.error(path, "directory holds no *.json files")
    return files
  return [common.check_file(path)]


def _feature_array(path: str, user: str, name: str, values: Any) -> np.ndarray:
  """One user's feature values as an array [n, ...] (dtype not final)."""
  if not isinstance(values, list):
    raise common.error(
        path, f"user {user!r}: feature {name!r} is a "
        f"{type(values).__name__}, expected a list of examples")
  try:
    array = np.array(values)
  except ValueError as e:
    raise common.error(
        path, f"user {user!r}: feature {name!r} is ragged (examples differ "
        f"in shape): {e}") from e
  if array.dtype.kind == "U":
    array = array.astype(object)  # Elements become Python str.
  elif array.dtype.kind not in "biufO":
    raise common.error(
        path, f"user {user!r}: feature {name!r} has values of unsupported "
        f"type (numpy dtype {array.dtype})")
  elif array.dtype.kind == "O" and array.size:
    # JSON null or mixed strings and numbers: nothing numpy can hold.
    raise common.error(
        path, f"user {user!r}: feature {name!r} mixes value types or holds "
        "null")
  return array


def _feature_dtype(kinds: set[str]) -> np.dtype:
  if kinds <= {"b"}:
    return np.dtype(bool)
  if kinds <= {"b", "i", "u"}:
    return np.dtype(np.int64)
  if kinds <= {"b", "i", "u", "f"}:
    return np.dtype(np.float32)
  return np.dtype(object)


def _read_file(path: str) -> tuple[list[str], list[Optional[int]],
                                   list[Mapping[str, Any]]]:
  """Users, claimed sizes and per-user feature dicts of one JSON file."""
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError.
    raise common.error(
        path, f"cannot read as JSON: {type(e).__name__}: {e}") from e
  if not isinstance(data, dict):
    raise common.error(
        path, f"not a LEAF file: top level is a {type(data).__name__}, "
        "expected an object")
  for key in ("users", "user_data"):
    if key not in data:
      raise common.error(
          path, f"not a LEAF file: no key {key!r} (keys: {sorted(data)[:10]})")
  users, user_data = data["users"], data["user_data"]
  if not isinstance(users, list) or not isinstance(user_data, dict):
    raise common.error(
        path, "not a LEAF file: 'users' must be a list and 'user_data' an "
        "object")
  users = [str(u) for u in users]
  num_samples = data.get("num_samples")
  if num_samples is None:
    num_samples = [None] * len(users)
  elif not isinstance(num_samples, list) or len(num_samples) != len(users):
    raise common.error(
        path, "'num_samples' must be a list as long as 'users' "
        f"({len(users)})")
  extra = set(user_data) - set(users)
  if extra:
    warnings.warn(
        f"{path}: user_data has {len(extra)} users not in 'users' (e.g. "
        f"{sorted(extra)[:3]}); they are ignored", stacklevel=3)
  per_user = []
  for user in users:
    if user not in user_data:
      raise common.error(path, f"user {user!r} is in 'users' but not in "
                               "'user_data'")
    feats = user_data[user]
    if not isinstance(feats, dict) or not feats:
      raise common.error(
          path, f"user {user!r}: user_data entry must be a non-empty object "
          "feature name -> list")
    per_user.append(feats)
  return users, num_samples, per_user


def load_leaf_json(path: str) -> population_lib.FederatedPopulation:
  """Loads a LEAF JSON file, or a directory of them, into memory.

  Args:
    path: a LEAF JSON file, or a directory whose `*.json` files are read.

  Returns:
    A FederatedPopulation of all users, in file order then `users` order.

  Raises:
    FormatError: if a file is missing, not JSON, misses 'users' or
      'user_data', names a user twice or without data, or users' features
      disagree in name or per-example shape.
  """
  path = os.fspath(path)
  client_ids, client_features, sources = [], [], []
  seen = {}
  for file in json_files(path):
    users, num_samples, per_user = _read_file(file)
    for user, claimed, feats in zip(users, num_samples, per_user):
      if user in seen:
        raise common.error(
            file, f"user {user!r} appears twice (also in {seen[user]})")
      seen[user] = file
      arrays = {str(n): _feature_array(file, user, n, v)
                for n, v in sorted(feats.items())}
      sizes = {n: a.shape[0] for n, a in arrays.items()}
      if len(set(sizes.values())) != 1:
        raise common.error(
            file, f"user {user!r}: features disagree on the number of "
            f"examples: {sizes}")
      size = next(iter(sizes.values()))
      if claimed is not None and claimed != size:
        warnings.warn(
            f"{file}: num_samples says user {user!r} has {claimed} examples "
            f"but user_data holds {size}; using the data", stacklevel=2)
      client_ids.append(user)
      client_features.append(arrays)
      sources.append(file)
  if not client_ids:
    raise common.error(path, "no users")
  names = sorted(client_features[0])
  for user, feats, file in zip(client_ids, client_features, sources):
    if sorted(feats) != names:
      raise common.error(
          file, f"user {user!r} has features {sorted(feats)}, expected "
          f"{names} (as user {client_ids[0]!r})")
  specs = {}
  for name in names:
    nonempty = [f[name] for f in client_features if f[name].shape[0]]
    reference = nonempty[0] if nonempty else client_features[0][name]
    kinds = {a.dtype.kind for a in nonempty}
    if "O" in kinds and kinds != {"O"}:
      raise common.error(
          path, f"feature {name!r} holds strings for some users and numbers "
          "for others")
    dtype = _feature_dtype(kinds or {"f"})
    specs[name] = (tuple(reference.shape[1:]), dtype)
    for user, feats, file in zip(client_ids, client_features, sources):
      array = feats[name]
      if array.shape[0] == 0:
        feats[name] = np.zeros((0,) + specs[name][0], dtype)
      elif array.shape[1:] != specs[name][0]:
        raise common.error(
            file, f"user {user!r}: feature {name!r} has per-example shape "
            f"{list(array.shape[1:])}, other users have "
            f"{list(specs[name][0])}")
      else:
        feats[name] = array.astype(dtype)
  return common.assemble(path, client_ids, client_features, specs)


def _jsonable(array: np.ndarray) -> list[Any]:
  if array.dtype.kind in "OSU":
    flat = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for v in array.reshape(-1)]
    return np.array(flat, dtype=object).reshape(array.shape).tolist()
  return array.tolist()


def write_leaf_json(
    path: str,
    client_ids: Sequence[str],
    client_features: Sequence[Mapping[str, np.ndarray]],
    num_samples: Optional[Sequence[int]] = None,
) -> None:
  """Writes clients as one LEAF JSON file.

  Args:
    path: the file to write.
    client_ids: one id per user.
    client_features: per user, feature name -> array [n_i, ...] (LEAF uses
      "x" and "y"); bytes are written as UTF-8 strings.
    num_samples: the sizes to claim; default the true ones (pass others to
      mimic LEAF's inconsistent Shakespeare files).

  Raises:
    ValueError: if the arguments differ in length.
  """
  if len(client_ids) != len(client_features):
    raise ValueError("client_ids and client_features differ in length")
  arrays = [{n: np.asarray(v) for n, v in f.items()} for f in client_features]
  if num_samples is None:
    num_samples = [len(next(iter(a.values()))) if a else 0 for a in arrays]
  data = {
      "users": [str(c) for c in client_ids],
      "num_samples": [int(n) for n in num_samples],
      "user_data": {
          str(c): {n: _jsonable(v) for n, v in a.items()}
          for c, a in zip(client_ids, arrays)},
  }
  with open(os.fspath(path), "w", encoding="utf-8") as f:
    json.dump(data, f)
