"""The demo notebooks run top to bottom (tiny settings) and are saved clean.

Each notebook in notebooks/ is executed with nbclient in a fresh IPython
kernel of this interpreter, with FEDJAX_DP_NOTEBOOK_SMALL=1 (the notebooks'
tiny settings) and a temporary working directory, so nothing is written into
the repository. Beyond "no cell raised", each notebook's printed results are
checked for sense (an accuracy in [0, 1], a finite epsilon, ...).
"""

import json
import math
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart", "privacy_utility_sweep", "keyboard_prediction",
            "privacy_auditing"}
# Per cell; the whole of each notebook takes well under this with the tiny
# settings.
CELL_TIMEOUT_S = 300

_NUMBER = r"([-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan))"


def _ids(paths):
  return [p.stem for p in paths]


def test_all_notebooks_present():
  assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_saved_without_outputs(path):
  nb = nbformat.read(str(path), as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"cell {i} of {path.name} has outputs"
      assert cell.execution_count is None, (
          f"cell {i} of {path.name} has an execution count")
  first_code = next(c for c in nb.cells if c.cell_type == "code")
  assert "find_spec(\"fedjax_dp\")" in first_code.source
  assert "FEDJAX_DP_SOURCE" in first_code.source


def _kernel_spec_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """A 'python3' kernelspec that runs this interpreter (put first on
  JUPYTER_PATH, so no other installed python3 kernel is picked up)."""
  root = tmp_path / "jupyter"
  spec = root / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "Python 3 (fedjax-dp tests)",
      "language": "python",
  }))
  return root


def _execute(path, tmp_path, monkeypatch):
  workdir = tmp_path / "work"
  workdir.mkdir()
  monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)))
  monkeypatch.setenv("FEDJAX_DP_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("FEDJAX_DP_REPO", str(REPO))
  # Figures are rendered inline (as PNG outputs) whatever the caller uses.
  monkeypatch.delenv("MPLBACKEND", raising=False)
  monkeypatch.delenv("FEDJAX_DP_SHAKESPEARE", raising=False)
  nb = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(workdir)}})
  client.execute()  # raises CellExecutionError on the first failing cell
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.output_type != "error", (
          f"{path.name}: {out.ename}: {out.evalue}")
  return nb


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells
                 for out in cell.get("outputs", [])
                 if out.output_type == "stream" and out.name == "stdout")


def _has_png(nb) -> bool:
  return any("image/png" in out.get("data", {}) for cell in nb.cells
             for out in cell.get("outputs", []))


def _floats(pattern: str, text: str) -> list[float]:
  return [float(m) for m in re.findall(pattern, text)]


def _one(pattern: str, text: str) -> float:
  values = _floats(pattern, text)
  assert len(values) == 1, (pattern, text[-2000:])
  return values[0]


def _check_quickstart(out: str, nb) -> None:
  accuracy = _one(r"final held-out accuracy: " + _NUMBER, out)
  epsilon = _one(r"epsilon: " + _NUMBER + r" at delta=", out)
  assert 0.0 <= accuracy <= 1.0
  assert math.isfinite(epsilon) and epsilon > 0
  # The schedule's epsilon computed before training equals the ledger's.
  planned, ledger = re.search(
      r"computed before training: " + _NUMBER + r" \(the ledger says "
      + _NUMBER, out).groups()
  assert float(planned) == pytest.approx(float(ledger), rel=1e-3)
  assert float(ledger) == pytest.approx(epsilon, rel=1e-3)
  # `fedjax-dp account` (via cli.main) printed the same epsilon.
  assert _one(r"epsilon = " + _NUMBER + r" at delta", out) == pytest.approx(
      epsilon, rel=1e-3)
  assert "rejected: config field 'noise_multiplier'" in out
  assert _has_png(nb)


def _check_sweep(out: str, nb) -> None:
  rows = re.findall(r"z = " + _NUMBER + r"\s+held-out accuracy " + _NUMBER
                    + r"\s+epsilon " + _NUMBER, out)
  assert len(rows) >= 3, out[-2000:]
  zs, accs, epss = ([float(r[i]) for r in rows] for i in range(3))
  assert zs == sorted(zs)
  assert all(0.0 <= a <= 1.0 for a in accs)
  assert all(math.isfinite(e) and e > 0 for e in epss)
  # More noise, less privacy spent.
  assert all(a > b for a, b in zip(epss, epss[1:]))
  tuned = _one(r"releasing only the best configuration: epsilon " + _NUMBER,
               out)
  assert tuned >= max(epss) * (1 - 1e-6)
  assert _has_png(nb)


def _check_keyboard(out: str, nb) -> None:
  accuracy = _one(r"next-character accuracy \(held-out speakers\): " + _NUMBER,
                  out)
  epsilon = _one(r"epsilon: " + _NUMBER + r" at delta=", out)
  perplexity = _one(r"perplexity: " + _NUMBER, out)
  assert 0.0 <= accuracy <= 1.0
  assert math.isfinite(epsilon) and epsilon > 0
  assert perplexity >= 1.0
  sample = re.search(r"sample \((\d+) characters after the prompt\):\n(.*)\n",
                     out)
  assert sample is not None, out[-2000:]
  num_chars, text = int(sample.group(1)), sample.group(2)
  assert text.startswith("To be, or not to be")
  # decode() writes one character per id (never padding or out-of-vocabulary
  # ids, which generation excludes), and a newline would end the line early.
  generated = text[len("To be, or not to be"):]
  assert len(generated) <= num_chars
  assert "\ufffd" not in generated
  assert len(re.findall(r"^'.*' -> ", out, flags=re.M)) == 3


def _check_auditing(out: str, nb) -> None:
  runs = re.findall(r"^(.*): ledger epsilon " + _NUMBER
                    + r", empirical estimate " + _NUMBER, out, flags=re.M)
  assert len(runs) == 2, out[-2000:]
  (private, eps, lo), (_, eps0, lo0) = runs
  assert private.startswith("private")
  eps, lo, eps0, lo0 = map(float, (eps, lo, eps0, lo0))
  assert math.isfinite(eps) and eps > 0
  assert eps0 == math.inf  # no noise
  # An estimate from the canaries' scores: a sound run does not show more
  # than the accountant's epsilon.
  assert 0.0 <= lo <= eps
  assert lo0 >= 0.0


_CHECKS = {
    "quickstart": _check_quickstart,
    "privacy_utility_sweep": _check_sweep,
    "keyboard_prediction": _check_keyboard,
    "privacy_auditing": _check_auditing,
}


# 10-30 s each (kernel start, imports, a few compiled rounds): slow by the
# project's definition, so `-m "not slow"` skips them; CI runs them.
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path, monkeypatch):
  nb = _execute(path, tmp_path, monkeypatch)
  check = _CHECKS.get(path.stem)
  if check is not None:
    check(_stdout(nb), nb)


def _colab_links():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "colab_links", REPO / "scripts" / "colab_links.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_colab_links_and_install_cells_match_the_repository_url(capsys):
  links = _colab_links()
  assert links.main(["--check"]) == 0, capsys.readouterr().out
  repo = links.repository_url()
  for path in NOTEBOOKS:
    nb = nbformat.read(str(path), as_version=4)
    intro = nb.cells[0].source
    assert intro.startswith("[![Open In Colab]")
    assert f"/blob/main/notebooks/{path.name})" in intro
    assert repo.replace("https://github.com/", "colab.research.google.com/"
                        "github/") in intro


def test_the_install_cell_stops_with_a_clear_message_when_pip_fails(
    monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(str(NOTEBOOKS[0]), as_version=4)
  cell = next(c for c in nb.cells if c.cell_type == "code").source
  installs = []
  # IPython's %pip line, as a call we can watch; pip "fails": the package
  # stays missing.
  code = re.sub(r"^(\s*)%pip install -q \{(\w+)\}$",
                r"\1_pip(\2)", cell, flags=re.M)
  assert "_pip(FEDJAX_DP_SOURCE)" in code
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.setenv("FEDJAX_DP_SOURCE", "git+https://example.invalid/x.git")
  with pytest.raises(RuntimeError, match=r"could not be installed from "
                     r"'git\+https://example.invalid/x.git'.*FEDJAX_DP_SOURCE"):
    exec(code, {"_pip": installs.append})  # pylint: disable=exec-used
  assert installs == ["git+https://example.invalid/x.git"]
