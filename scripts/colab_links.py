"""Writes each notebook's "Open in Colab" link and install cell from the
repository's URL.

The URL is `[project.urls] Repository` in pyproject.toml: the one place to
change for a fork or a move. Every notebook in notebooks/ then gets

  * a Colab badge at the top of its first cell, opening that notebook from
    the repository's default branch;
  * an install cell that installs the package from the repository when it
    is missing (or from `$FEDJAX_DP_SOURCE`) and stops with a clear message
    when that fails;
  * the same words on installing in its introduction.

Usage:
  python scripts/colab_links.py          # rewrite the notebooks
  python scripts/colab_links.py --check  # exit 1 if any notebook differs
"""

import argparse
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BRANCH = "main"
_BADGE = re.compile(r"^\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)\n\n", re.M)
_INSTALL_BULLET = re.compile(r"\* \*\*Install\.\*\*.*?(?=\n\* \*\*)", re.S)


def repository_url(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> str:
  """`[project.urls] Repository` of pyproject.toml (read without a TOML
  library: Python 3.10 has none)."""
  text = pyproject.read_text(encoding="utf-8")
  section = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[|\Z)", text,
                      re.S | re.M)
  match = section and re.search(r'^Repository\s*=\s*"([^"]+)"',
                                section.group(1), re.M)
  if not match:
    raise SystemExit("pyproject.toml: no [project.urls] Repository")
  return match.group(1).rstrip("/")


def colab_url(repo: str, notebook: str) -> str:
  path = re.sub(r"^https://github\.com/", "", repo)
  return (f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/"
          f"notebooks/{notebook}")


def install_source(repo: str) -> str:
  return f"git+{repo}.git"


def badge(repo: str, notebook: str) -> str:
  return ("[![Open In Colab](https://colab.research.google.com/assets/"
          f"colab-badge.svg)]({colab_url(repo, notebook)})\n\n")


def install_bullet(repo: str) -> str:
  return (
      "* **Install.** The next cell installs `fedjax-dp` when it is not "
      "installed,\n"
      "  with `pip install $FEDJAX_DP_SOURCE`. `FEDJAX_DP_SOURCE` defaults "
      "to the\n"
      f"  repository, `{install_source(repo)}`. For another copy set it in "
      "a cell\n"
      "  above the install cell: a git URL, or the folder of an uploaded or "
      "cloned\n"
      "  copy, e.g. `%env FEDJAX_DP_SOURCE=/content/fedjax-dp`. The cell "
      "stops with\n"
      "  a message when the install fails. Locally, `pip install -e .` in "
      "the\n"
      "  repository does the same.")


def install_cell(repo: str) -> str:
  return f'''# Install fedjax-dp if it is missing (e.g. on a fresh Colab runtime).
import importlib
import importlib.util
import os

if importlib.util.find_spec("fedjax_dp") is None:
    FEDJAX_DP_SOURCE = os.environ.get(
        "FEDJAX_DP_SOURCE", "{install_source(repo)}")
    print(f"installing fedjax-dp from {{FEDJAX_DP_SOURCE!r}}")
    %pip install -q {{FEDJAX_DP_SOURCE}}
    importlib.invalidate_caches()
    if importlib.util.find_spec("fedjax_dp") is None:
        raise RuntimeError(
            f"fedjax-dp could not be installed from {{FEDJAX_DP_SOURCE!r}} "
            "(pip's message is above). Set FEDJAX_DP_SOURCE to a git URL of "
            "the repository or to the folder of a copy, e.g. run "
            "`%env FEDJAX_DP_SOURCE=/content/fedjax-dp` in a cell above, and "
            "run this cell again.")'''


def _source(cell) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _set_source(cell, text: str) -> None:
  lines = text.splitlines(keepends=True)
  cell["source"] = lines


def rewritten(path: pathlib.Path, repo: str) -> str:
  """The notebook's JSON text with its link and install parts from `repo`."""
  nb = json.loads(path.read_text(encoding="utf-8"))
  intro = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
  text = _BADGE.sub("", _source(intro), count=1)
  text = badge(repo, path.name) + text
  if not _INSTALL_BULLET.search(text):
    raise SystemExit(f"{path.name}: its first cell has no **Install.** item")
  text = _INSTALL_BULLET.sub(lambda _: install_bullet(repo), text, count=1)
  _set_source(intro, text)
  code = next(c for c in nb["cells"] if c["cell_type"] == "code")
  if "find_spec(\"fedjax_dp\")" not in _source(code):
    raise SystemExit(f"{path.name}: its first code cell is not the install "
                     "cell")
  _set_source(code, install_cell(repo))
  return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="only check; exit 1 if a notebook differs")
  args = parser.parse_args(argv)
  repo = repository_url()
  stale = []
  for path in sorted(NOTEBOOKS.glob("*.ipynb")):
    text = rewritten(path, repo)
    if text != path.read_text(encoding="utf-8"):
      stale.append(path.name)
      if not args.check:
        path.write_text(text, encoding="utf-8")
  if args.check and stale:
    print(f"out of date (run python scripts/colab_links.py): "
          f"{', '.join(stale)}")
    return 1
  print(("checked" if args.check else "wrote") +
        f" {len(list(NOTEBOOKS.glob('*.ipynb')))} notebooks for {repo}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
