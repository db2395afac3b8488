"""Import paths ("package.module:attribute") that name a user's code.

A config names a model or a dataset that is not built in by the import
path of the class or function that builds it, e.g.
`model="my_pkg.nets:SmallCNN"`. The path is what `config.json` records, so a
run can be rebuilt (resumed, audited, compared) from its directory alone.

An object passed to `runner.run` that has no such path (defined in
`__main__`, in a notebook or inside a function) is recorded by a label
"<Name>" instead: the run is still reproducible from Python by passing the
same object again, not from its directory alone.
"""

import importlib
import os
import re
import sys
from typing import Any

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_LABEL = re.compile(r"^<[^<>]+>$")


def is_import_path(value: Any) -> bool:
  """Whether `value` has the form "package.module:attribute"."""
  return isinstance(value, str) and bool(_PATH.match(value))


def is_object_label(value: Any) -> bool:
  """Whether `value` is a "<Name>" label of an object passed in Python."""
  return isinstance(value, str) and bool(_LABEL.match(value))


def object_label(name: str) -> str:
  return f"<{name}>"


def resolve(path: str, field: str) -> Any:
  """The object an import path names.

  The current directory is searched too (as `python -m` does), so a module
  beside the user's config works from the `fedjax-dp` command.

  Raises:
    ValueError: naming `field`, if the module cannot be imported or has no
      such attribute.
  """
  if not is_import_path(path):
    raise ValueError(f"config field {field!r}: {path!r} is not an import "
                     "path of the form 'package.module:attribute'")
  module_name, _, attribute = path.partition(":")
  try:
    obj = _import(module_name)
  except ImportError as e:
    raise ValueError(f"config field {field!r}: cannot import module "
                     f"{module_name!r} of {path!r}: {e}") from None
  for part in attribute.split("."):
    try:
      obj = getattr(obj, part)
    except AttributeError:
      raise ValueError(f"config field {field!r}: module {module_name!r} has "
                       f"no attribute {attribute!r}") from None
  return obj


def _import(module_name: str):
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    cwd = os.getcwd()
    missing = e.name or ""
    if cwd in sys.path or not module_name.startswith(missing.split(".")[0]):
      raise
    sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def path_of(obj: Any) -> str | None:
  """The import path that names `obj` (a class or function), or None when
  there is none that imports back to the same object."""
  module = getattr(obj, "__module__", None)
  qualname = getattr(obj, "__qualname__", None)
  if not module or not qualname or module == "__main__" or "<" in qualname:
    return None
  path = f"{module}:{qualname}"
  try:
    return path if resolve(path, "") is obj else None
  except ValueError:
    return None
