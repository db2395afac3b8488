"""JAX's persistent compilation cache, for runs that compile the same round.

Compiling a round takes seconds on a CPU (5-7 s for the default experiment's,
every process, every time); JAX can keep compiled programs on disk and load
them the next time the same program (same shapes, same JAX, same machine)
is compiled. `fedjax-dp` commands turn this on by default; the Python API
leaves JAX's settings alone unless `enable()` is called.

The cache directory is, in order: `enable`'s argument, the
FEDJAX_DP_COMPILATION_CACHE environment variable (`off` disables it), or
`$XDG_CACHE_HOME/fedjax-dp/xla` (`~/.cache/fedjax-dp/xla`). It is bounded
(`MAX_BYTES`, least recently used entries go first) and safe to delete.
"""

import os
import pathlib

import jax

ENV_VAR = "FEDJAX_DP_COMPILATION_CACHE"
MAX_BYTES = 2 * 2**30
# Every program is kept, however fast it compiles: a run's start-up also
# compiles dozens of small ones (initialisation, sampling, the layout), and
# loading them was measured faster (the default run's first round, warm:
# 1.5-1.9 s keeping only those over 0.05 s, 1.4-1.6 s keeping all; about 40
# files, 1 MB).
MIN_COMPILE_SECONDS = 0.0


def default_directory() -> pathlib.Path | None:
  """The cache directory from the environment (None: `off`)."""
  value = os.environ.get(ENV_VAR)
  if value is not None:
    if value.strip().lower() in ("", "0", "off", "false", "no"):
      return None
    return pathlib.Path(value).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "fedjax-dp" / "xla"


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on, in `directory` (default:
  `default_directory()`); returns the directory used (None: off).

  Call before the first compilation. A directory that cannot be created
  leaves the cache off (a run never fails for want of a cache).
  """
  path = (default_directory() if directory is None
          else pathlib.Path(directory).expanduser())
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
