"""Recognising a federated data file by its content, and opening it.

`detect_format` looks at magic bytes (HDF5, SQLite), SQLite table names and
the first character of JSON; it never reads a whole file. `open_source`
returns a `ClientSource` for any supported format, and `inspect` summarises a
file from its index (client sizes, feature shapes) without loading examples,
except for LEAF JSON, which has no index and is loaded (LEAF files are small).
"""

import os
import statistics
from typing import Any, Optional

from fedjax_dp.data import source as source_lib
from fedjax_dp.data.formats import common
from fedjax_dp.data.formats import fedjax_sqlite
from fedjax_dp.data.formats import leaf_json
from fedjax_dp.data.formats import tff_hdf5
from fedjax_dp.data.formats import tff_sqlite

TFF_HDF5 = "tff_hdf5"
TFF_SQLITE = "tff_sqlite"
FEDJAX_SQLITE = "fedjax_sqlite"
LEAF_JSON = "leaf_json"
FORMATS = (TFF_HDF5, TFF_SQLITE, FEDJAX_SQLITE, LEAF_JSON)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_UTF8_BOM = b"\xef\xbb\xbf"
# HDF5 allows a user block before the superblock: the signature then sits at
# 512, 1024, 2048, ... bytes.
_HDF5_OFFSETS = (0,) + tuple(512 << k for k in range(12))


def _is_hdf5(path: str, size: int) -> bool:
  with open(path, "rb") as f:
    for offset in _HDF5_OFFSETS:
      if offset + len(_HDF5_MAGIC) > size:
        break
      f.seek(offset)
      if f.read(len(_HDF5_MAGIC)) == _HDF5_MAGIC:
        return True
  return False


def detect_format(path: str) -> str:
  """The format of the federated data at `path`, one of FORMATS.

  Args:
    path: a file, or a directory of LEAF JSON files.

  Returns:
    "tff_hdf5", "tff_sqlite", "fedjax_sqlite" or "leaf_json".

  Raises:
    FormatError: if `path` is missing, empty or in none of these formats.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    leaf_json.json_files(path)  # Raises unless it holds *.json files.
    return LEAF_JSON
  common.check_file(path)
  with common.reraise(path, "cannot read"):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(64)
    if not head:
      raise common.error(path, "empty file")
    if head.startswith(_SQLITE_MAGIC):
      connection = common.open_sqlite(path)
      try:
        tables = common.sqlite_columns(connection)
      finally:
        connection.close()
      if "federated_data" in tables:
        return FEDJAX_SQLITE
      if "examples" in tables and "client_metadata" in tables:
        return TFF_SQLITE
      raise common.error(
          path, "SQLite database with neither FedJAX's table "
          "'federated_data' nor TFF's tables 'examples' and "
          f"'client_metadata' (tables: {sorted(tables)})")
    if _is_hdf5(path, size):
      return TFF_HDF5
    text = head[len(_UTF8_BOM):] if head.startswith(_UTF8_BOM) else head
    if text.lstrip(b" \t\r\n").startswith(b"{"):
      return LEAF_JSON
  raise common.error(
      path, "unrecognised format (not HDF5, SQLite or JSON; starts with "
      f"{head[:16]!r})")


def open_source(path: str, format_name: Optional[str] = None,
                **kwargs: Any) -> source_lib.ClientSource:
  """Opens federated data in any supported format as a ClientSource.

  Args:
    path: a file, or a directory of LEAF JSON files.
    format_name: one of FORMATS; detected from the content if None.
    **kwargs: passed to the reader: `features` for tff_hdf5, `split_name`
      and `feature_shapes` for tff_sqlite.

  Returns:
    A lazy source (TffHdf5Source, TffSqliteSource, FedjaxSqliteSource) or,
    for LEAF JSON, an in-memory FederatedPopulation.

  Raises:
    FormatError: if the data is missing, unrecognised or malformed.
    ValueError: if `format_name` is unknown.
    TypeError: if `kwargs` do not suit the format's reader.
  """
  path = os.fspath(path)
  if format_name is None:
    format_name = detect_format(path)
  if format_name == TFF_HDF5:
    return tff_hdf5.TffHdf5Source(path, **kwargs)
  if format_name == TFF_SQLITE:
    return tff_sqlite.TffSqliteSource(path, **kwargs)
  if format_name == FEDJAX_SQLITE:
    return fedjax_sqlite.FedjaxSqliteSource(path, **kwargs)
  if format_name == LEAF_JSON:
    return leaf_json.load_leaf_json(path, **kwargs)
  raise ValueError(f"unknown format {format_name!r}; expected one of "
                   f"{FORMATS}")


def inspect(path: str, format_name: Optional[str] = None,
            **kwargs: Any) -> dict[str, Any]:
  """Summarises federated data from its index (JSON-serialisable).

  Args:
    path: a file, or a directory of LEAF JSON files.
    format_name: one of FORMATS; detected if None.
    **kwargs: passed to `open_source`.

  Returns:
    {"format", "path", "num_clients",
     "num_examples": {"total", "min", "median", "max"},
     "features": {name: {"shape": [...], "dtype": str}}}.

  Raises:
    FormatError: if the data is missing, unrecognised or malformed.
  """
  path = os.fspath(path)
  if format_name is None:
    format_name = detect_format(path)
  source = open_source(path, format_name, **kwargs)
  try:
    sizes = [int(n) for n in source.num_examples]
    features = {
        name: {"shape": [int(d) for d in shape], "dtype": dtype.name}
        for name, (shape, dtype) in source.feature_specs.items()}
    return {
        "format": format_name,
        "path": path,
        "num_clients": int(source.num_clients),
        "num_examples": {
            "total": sum(sizes),
            "min": min(sizes) if sizes else None,
            "median": float(statistics.median(sizes)) if sizes else None,
            "max": max(sizes) if sizes else None,
        },
        "features": features,
    }
  finally:
    close = getattr(source, "close", None)
    if close is not None:
      close()
