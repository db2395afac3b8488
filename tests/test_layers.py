"""The package's import graph keeps its layers (README, "Layout").

Every `fedjax_dp` import counts, at module level or inside a function: an
import hidden in a function body is still an arrow between the modules.
"""

import ast
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent / "fedjax_dp"
# Shared helpers every layer may use (they import nothing of the package
# but each other).
_BOTTOM = frozenset({"fedjax_dp.types", "fedjax_dp.tree_util",
                     "fedjax_dp.streams", "fedjax_dp.import_paths"})
# The independent pieces: each imports only itself and the bottom layer.
_PIECES = ("fedjax_dp.data", "fedjax_dp.models", "fedjax_dp.privacy")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_ROOT.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
  """The package module `name` refers to (a module, or a package's
  `__init__`), or None outside the package."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in _ROOT.rglob("*.py")}
  modules = set(files)
  graph = {}
  for name, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and node.module and \
          node.module.startswith("fedjax_dp"):
        for alias in node.names:
          deps.add(_resolve(f"{node.module}.{alias.name}", modules))
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith("fedjax_dp"):
            deps.add(_resolve(alias.name, modules))
    deps.discard(None)
    deps.discard(name)
    # A package's __init__ is not an arrow of its own.
    graph[name] = {d for d in deps if d not in _PIECES + ("fedjax_dp",)}
  return graph


GRAPH = _graph()


def test_the_graph_sees_the_package():
  assert "fedjax_dp.privacy.plan" in GRAPH
  assert "fedjax_dp.privacy.sampling" in GRAPH["fedjax_dp.privacy.plan"]
  assert len(GRAPH) > 40


def test_no_import_cycles():
  visiting, done = [], set()

  def visit(node):
    if node in done:
      return
    if node in visiting:
      cycle = visiting[visiting.index(node):] + [node]
      pytest.fail("import cycle: " + " -> ".join(cycle))
    visiting.append(node)
    for dep in sorted(GRAPH[node]):
      visit(dep)
    visiting.pop()
    done.add(node)

  for node in sorted(GRAPH):
    visit(node)


@pytest.mark.parametrize("piece", _PIECES)
def test_pieces_import_nothing_above_them(piece):
  for name, deps in GRAPH.items():
    if name == piece or name.startswith(piece + "."):
      outside = {d for d in deps if not d.startswith(piece + ".")
                 and d not in _BOTTOM}
      assert not outside, f"{name} imports {sorted(outside)}"


def test_bottom_layer_imports_only_itself():
  for name in _BOTTOM:
    assert GRAPH[name] <= _BOTTOM, f"{name} imports {sorted(GRAPH[name])}"


# Privacy modules that are one other module's arithmetic, imported by it
# alone: part of it for the rule below.
_PARTS = {"fedjax_dp.privacy.pld_composition": "fedjax_dp.privacy.accounting"}


def test_only_the_plan_joins_privacy_modules():
  for name, deps in GRAPH.items():
    if not name.startswith("fedjax_dp.privacy.") or \
        name == "fedjax_dp.privacy.plan":
      continue
    joined = sorted(d for d in deps if d.startswith("fedjax_dp.privacy.")
                    and _PARTS.get(d) != name)
    assert len(joined) <= 1, f"{name} imports {joined}"
    assert "fedjax_dp.privacy.plan" not in joined, name
  for part, owner in _PARTS.items():
    importers = sorted(n for n, deps in GRAPH.items() if part in deps)
    assert importers == [owner], f"{part} is imported by {importers}"
    assert not {d for d in GRAPH[part] if d.startswith("fedjax_dp.")}, part


def test_only_privacy_dispatches_on_mechanism_or_placement():
  """Outside fedjax_dp/privacy/ nothing compares the config's mechanism or
  noise placement: the privacy plan decides what each one means."""
  for path in _ROOT.rglob("*.py"):
    name = _module_name(path)
    if name.startswith("fedjax_dp.privacy"):
      continue
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Compare):
        for operand in [node.left, *node.comparators]:
          if isinstance(operand, ast.Attribute) and operand.attr in (
              "mechanism", "noise_placement"):
            pytest.fail(f"{name}:{node.lineno} compares .{operand.attr}")
