"""Atomic, checksummed checkpoints of a run's state and its privacy ledger.

A checkpoint of round `step` is one directory `<directory>/ckpt_<step>/`:

    arrays.npz      every leaf of the state tree (PRNG keys as their key data)
    metadata.json   caller's JSON metadata (ledger events, config, ...)
    manifest.json   format version, step, size and SHA-256 of the two files,
                    each leaf's tree path / shape / dtype / key impl, and a
                    checksum of the manifest itself

Commit protocol (one writer per directory):

  1. everything is written into a fresh hidden `.tmp-ckpt_<step>-...` folder,
     each file flushed and fsync'd, manifest last, then the folder fsync'd;
  2. the folder is renamed to `ckpt_<step>` (rename is atomic on POSIX file
     systems) and the parent folder is fsync'd so the rename is durable;
  3. only then are older checkpoints beyond `keep` deleted, each first renamed
     to a hidden `.trash-...` name so that a deletion cut short never leaves a
     partial folder under a checkpoint's name.

A crash or SIGKILL at any point therefore leaves the previous complete
checkpoints, plus at most a hidden temporary folder that `latest` and
`restore` never look at and the next `save` removes. `restore` re-checks every
size and checksum, so a file damaged after the fact (truncated, garbled,
deleted) raises `CheckpointError` naming the file instead of loading wrong
numbers or failing deep inside numpy or JAX.

Why not orbax-checkpoint: orbax 0.12's `CheckpointManager` also commits by
renaming a temporary folder, but (checked on this version) it restored an
array whose OCDBT data file had 40 bytes flipped without any error, returning
wrong values; its errors name a tensorstore key, not the damaged file; it is
not a declared dependency of this package, takes ~1 s to import and its API has
changed across recent releases. A simulator's state is a few single-host
arrays, so a ~300-line format with explicit checksums is simpler to trust.
Revisit orbax if state is ever sharded across hosts.

The privacy ledger travels in the metadata as JSON (privacy/ledger_codec.py).
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import time
from typing import Any
import uuid
import zipfile

import jax
import jax.numpy as jnp
import numpy as np


FORMAT = "fedjax_dp.checkpoint"
FORMAT_VERSION = 1
ARRAYS_FILE = "arrays.npz"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"

_PREFIX = "ckpt_"
_TMP_PREFIX = ".tmp-ckpt_"
_TRASH_PREFIX = ".trash-ckpt_"
_NAME = re.compile(r"^ckpt_(\d+)$")
_CHUNK = 1 << 20


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, corrupt or does not fit the state."""


# ----------------------------------------------------------------------------
# Listing.


def _step_dir(directory: pathlib.Path, step: int) -> pathlib.Path:
  return directory / f"{_PREFIX}{step}"


def named_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of every folder named like a checkpoint, complete or not
  (`restore` says what is wrong with an incomplete one)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  steps = []
  for entry in directory.iterdir():
    m = _NAME.match(entry.name)
    if m and entry.is_dir():
      steps.append(int(m.group(1)))
  return sorted(steps)


def _is_complete(path: pathlib.Path, step: int) -> bool:
  """Cheap completeness check: valid manifest and files of the right sizes."""
  try:
    manifest = _read_manifest(path, step)
    for name, info in manifest["files"].items():
      if (path / name).stat().st_size != info["size"]:
        return False
  except (CheckpointError, OSError, KeyError, TypeError, AttributeError):
    return False
  return True


def all_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending.

  Complete means: committed, with a valid manifest and files of the sizes it
  records. Checksums of the array data are only verified by `restore`.
  """
  directory = pathlib.Path(directory)
  return [s for s in named_steps(directory)
          if _is_complete(_step_dir(directory, s), s)]


def latest(directory: str | os.PathLike) -> int | None:
  """Step of the newest complete checkpoint in `directory`, or None."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


# ----------------------------------------------------------------------------
# Writing.


def _fsync(path: pathlib.Path) -> None:
  """Flushes a file's or a folder's entry to stable storage."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _write_arrays(path: pathlib.Path, arrays: list[np.ndarray]) -> None:
  with open(path, "wb") as f:
    np.savez(f, **{f"leaf_{i}": a for i, a in enumerate(arrays)})
    f.flush()
    os.fsync(f.fileno())


def _file_digest(path: pathlib.Path) -> dict:
  h = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return {"size": size, "sha256": h.hexdigest()}


def _canonical(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def _flatten(state_tree) -> tuple[list[dict], list[np.ndarray]]:
  """(leaf descriptions, host arrays) of `state_tree` in flattening order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(state_tree)
  specs, arrays = [], []
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    spec = {"path": name, "key_impl": None, "python_type": None}
    if _is_key(leaf):
      spec["key_impl"] = str(jax.random.key_impl(leaf))
      array = np.asarray(jax.device_get(jax.random.key_data(leaf)))
    elif isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
      array = np.asarray(jax.device_get(leaf))
    elif isinstance(leaf, (bool, int, float)):
      spec["python_type"] = type(leaf).__name__
      array = np.asarray(leaf)
    else:
      raise ValueError(f"state leaf {name} is a {type(leaf).__name__}, not an "
                       "array, PRNG key or Python number")
    spec["shape"] = list(array.shape)
    spec["dtype"] = str(array.dtype)
    specs.append(spec)
    arrays.append(array)
  return specs, arrays


def _remove_leftovers(directory: pathlib.Path) -> None:
  """Removes temporary and trash folders left by an interrupted writer."""
  for entry in directory.iterdir():
    if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
      shutil.rmtree(entry, ignore_errors=True)


def _discard(directory: pathlib.Path, step: int) -> None:
  """Deletes checkpoint `step`: renamed away first, so never half-deleted."""
  trash = directory / f"{_TRASH_PREFIX}{step}-{uuid.uuid4().hex}"
  os.rename(_step_dir(directory, step), trash)
  shutil.rmtree(trash, ignore_errors=True)


def save(
    directory: str | os.PathLike,
    step: int,
    state_tree,
    metadata: dict,
    *,
    keep: int = 2,
) -> pathlib.Path:
  """Writes the checkpoint of round `step` atomically.

  Checkpoints of later steps (left by a run that was rolled back to an earlier
  checkpoint) are deleted, so `latest` always names the last one saved; then
  only the newest `keep` are kept. Nothing is deleted before the new
  checkpoint is complete and durable. One writer per directory.

  Args:
    directory: folder holding the run's checkpoints (created if missing).
    step: round number, an int >= 0 (by convention: rounds completed).
    state_tree: pytree of jax / numpy arrays, typed PRNG keys and Python
      numbers (e.g. {"server": ServerState, "noise_key": key}).
    metadata: JSON-serialisable dict (e.g. encode_ledger(ledger), config).
    keep: number of newest checkpoints to keep, >= 1.

  Returns:
    The checkpoint's folder.

  Raises:
    ValueError: bad arguments, a leaf that is not an array, or metadata that
      JSON cannot encode (nothing is written then).
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
      or step < 0:
    raise ValueError(f"step must be an integer >= 0, got {step!r}")
  step = int(step)
  if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
    raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
  try:
    metadata_bytes = json.dumps(metadata, indent=1, sort_keys=True).encode()
  except (TypeError, ValueError) as e:
    raise ValueError(f"checkpoint metadata is not JSON-serialisable: {e}") \
        from None
  specs, arrays = _flatten(state_tree)

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _remove_leftovers(directory)
  tmp = directory / f"{_TMP_PREFIX}{step}-{os.getpid()}-{uuid.uuid4().hex}"
  try:
    _write_committed(directory, tmp, step, specs, arrays, metadata_bytes)
  except BaseException:
    # A failed write (a full disk, an interruption) leaves the previous
    # checkpoints as they were, and no partial folder.
    shutil.rmtree(tmp, ignore_errors=True)
    raise

  _remove_leftovers(directory)
  named = named_steps(directory)
  for s in named:
    if s > step:
      _discard(directory, s)
  older = [s for s in named if s < step]
  for s in older[:max(0, len(older) - (keep - 1))]:
    _discard(directory, s)
  return _step_dir(directory, step)


def _write_committed(directory: pathlib.Path, tmp: pathlib.Path, step: int,
                     specs: list[dict], arrays: list[np.ndarray],
                     metadata_bytes: bytes) -> None:
  """Steps 1 and 2 of the commit protocol: write `tmp`, rename it."""
  tmp.mkdir()
  _write_arrays(tmp / ARRAYS_FILE, arrays)
  _write_bytes(tmp / METADATA_FILE, metadata_bytes)
  body = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "step": step,
      "created_unix_s": time.time(),
      "files": {name: _file_digest(tmp / name)
                for name in (ARRAYS_FILE, METADATA_FILE)},
      "leaves": specs,
  }
  manifest = dict(body, checksum=hashlib.sha256(_canonical(body)).hexdigest())
  _write_bytes(tmp / MANIFEST_FILE,
               json.dumps(manifest, indent=1, sort_keys=True).encode())
  _fsync(tmp)

  final = _step_dir(directory, step)
  if final.exists():
    # Re-saving a step replaces it. The older checkpoints (keep >= 2) cover
    # the instant between these two renames.
    os.rename(final, directory / f"{_TRASH_PREFIX}{step}-{uuid.uuid4().hex}")
  os.rename(tmp, final)
  _fsync(directory)  # The commit point: the rename is now durable.


# ----------------------------------------------------------------------------
# Reading.


def _read_manifest(path: pathlib.Path, step: int) -> dict:
  file = path / MANIFEST_FILE
  try:
    raw = file.read_bytes()
  except FileNotFoundError:
    raise CheckpointError(f"{file}: missing (the checkpoint is incomplete)") \
        from None
  except OSError as e:
    raise CheckpointError(f"{file}: cannot be read: {e}") from None
  try:
    manifest = json.loads(raw)
    checksum = manifest.pop("checksum")
    body_ok = hashlib.sha256(_canonical(manifest)).hexdigest() == checksum
  except (ValueError, TypeError, AttributeError, KeyError):
    raise CheckpointError(f"{file}: corrupt (not a valid manifest)") from None
  if not body_ok:
    raise CheckpointError(f"{file}: corrupt (manifest checksum mismatch)")
  if manifest.get("format") != FORMAT or manifest.get(
      "version") != FORMAT_VERSION:
    raise CheckpointError(
        f"{file}: unsupported checkpoint format {manifest.get('format')!r} "
        f"version {manifest.get('version')!r} (this code reads {FORMAT!r} "
        f"version {FORMAT_VERSION})")
  if manifest.get("step") != step:
    raise CheckpointError(f"{file}: records step {manifest.get('step')!r}, "
                          f"but its folder is for step {step}")
  return manifest


def _verify_file(path: pathlib.Path, name: str, expected: dict) -> None:
  file = path / name
  try:
    actual = _file_digest(file)
  except FileNotFoundError:
    raise CheckpointError(f"{file}: missing") from None
  except OSError as e:
    raise CheckpointError(f"{file}: cannot be read: {e}") from None
  if actual["size"] != expected["size"]:
    raise CheckpointError(
        f"{file}: truncated or overwritten: {actual['size']} bytes, the "
        f"manifest records {expected['size']}")
  if actual["sha256"] != expected["sha256"]:
    raise CheckpointError(
        f"{file}: corrupt: SHA-256 does not match the manifest")


def _like_spec(like) -> tuple[tuple[int, ...], Any, bool]:
  """(shape, dtype, is_key) of a leaf of `like_tree`."""
  if hasattr(like, "shape") and hasattr(like, "dtype"):
    return tuple(like.shape), like.dtype, _is_key(like)
  return (), None, False


def _to_like(array: np.ndarray, spec: dict, like):
  """Converts a stored array into the kind of leaf `like` is."""
  if spec["key_impl"] is not None:
    return jax.random.wrap_key_data(array, impl=spec["key_impl"])
  if isinstance(like, np.ndarray):
    return array
  if isinstance(like, np.generic):
    return array[()]
  if isinstance(like, (bool, int, float)):
    return type(like)(array.item())
  return jnp.asarray(array)


def restore(directory: str | os.PathLike, step: int, like_tree):
  """Reads checkpoint `step` back into the structure of `like_tree`.

  Args:
    directory: folder given to `save`.
    step: a step listed by `all_steps` / `latest`.
    like_tree: a pytree with the structure, leaf paths, shapes and dtypes of
      the saved state (e.g. a freshly initialised state, or
      `jax.eval_shape` of its initialiser). Its leaves' kinds decide the
      output's: numpy arrays stay numpy, Python numbers stay Python numbers,
      everything else becomes a jax.Array; PRNG keys come back as typed keys.

  Returns:
    (state_tree, metadata).

  Raises:
    CheckpointError: the checkpoint is missing, incomplete or corrupt (the
      message names the file and the problem), or does not fit `like_tree`.
  """
  directory = pathlib.Path(directory)
  path = _step_dir(directory, int(step))
  if not path.is_dir():
    raise CheckpointError(
        f"{path}: no checkpoint for step {step} (complete checkpoints in "
        f"{directory}: {all_steps(directory)})")
  manifest = _read_manifest(path, int(step))
  try:
    files = manifest["files"]
    specs = manifest["leaves"]
    for name in (ARRAYS_FILE, METADATA_FILE):
      _verify_file(path, name, files[name])
  except (KeyError, TypeError):
    raise CheckpointError(f"{path / MANIFEST_FILE}: corrupt (fields missing)") \
        from None

  metadata_file = path / METADATA_FILE
  try:
    metadata = json.loads(metadata_file.read_bytes())
  except ValueError as e:
    raise CheckpointError(f"{metadata_file}: corrupt JSON: {e}") from None

  arrays_file = path / ARRAYS_FILE
  try:
    with np.load(arrays_file, allow_pickle=False) as npz:
      arrays = [npz[f"leaf_{i}"] for i in range(len(specs))]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise CheckpointError(f"{arrays_file}: unreadable: {e}") from None

  like_leaves, treedef = jax.tree_util.tree_flatten_with_path(like_tree)
  if len(like_leaves) != len(specs):
    raise CheckpointError(
        f"{path}: holds {len(specs)} state leaves, like_tree has "
        f"{len(like_leaves)}; the checkpoint is of a different state")
  out = []
  for (like_path, like), spec, array in zip(like_leaves, specs, arrays):
    name = jax.tree_util.keystr(like_path)
    if spec["path"] != name:
      raise CheckpointError(
          f"{path}: state leaf {spec['path']} where like_tree has {name}; the "
          "checkpoint is of a different state")
    if str(array.dtype) != spec["dtype"]:
      # numpy stores extension dtypes (bfloat16, ...) as raw bytes.
      array = array.view(jnp.dtype(spec["dtype"]))
    if list(array.shape) != spec["shape"]:
      raise CheckpointError(f"{arrays_file}: leaf {name} has shape "
                            f"{array.shape}, the manifest records "
                            f"{spec['shape']}")
    shape, dtype, is_key = _like_spec(like)
    if is_key != (spec["key_impl"] is not None):
      raise CheckpointError(
          f"{path}: leaf {name} is {'not ' if is_key else ''}a PRNG key in "
          f"the checkpoint but {'' if is_key else 'not '}in like_tree")
    value = _to_like(array, spec, like)
    if dtype is not None and (tuple(value.shape) != shape or
                              value.dtype != dtype):
      raise CheckpointError(
          f"{path}: leaf {name} is {value.dtype}{list(value.shape)} in the "
          f"checkpoint, {dtype}{list(shape)} in like_tree")
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out), metadata
