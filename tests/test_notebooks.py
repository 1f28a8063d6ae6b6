"""Notebooks run top to bottom as in Jupyter (small sizes: FEDJAX_SIM_SMALL=1) and print nothing
on stderr but what ALLOWED_STDERR lists; plots show once; a missing optional data set is one
message, not a cascade of errors."""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("nb_execute", ROOT / "notebooks" / "execute.py")
nb_execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nb_execute)

# {notebook stem: [(regex a stderr output may match, why it is allowed)]}. Progress bars are not
# here: with the notebook extra (ipywidgets) they are widgets, not stderr text.
ALLOWED_STDERR: dict[str, list[tuple[str, str]]] = {}


def _outputs(nb, kind=None, name=None):
  """[(cell index, output)] of the code cells, optionally of one output_type / stream name."""
  return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
          for o in c.get("outputs", [])
          if (kind is None or o.get("output_type") == kind) and (name is None or o.get("name") == name)]


def _text(nb):
  return "".join(o.get("text", "") for _, o in _outputs(nb, "stream", "stdout"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_cleanly(path):
  nb = nb_execute.execute(path, small=True, timeout=600)   # raises at the first failing cell
  assert not _outputs(nb, "error")
  allowed = ALLOWED_STDERR.get(path.stem, [])
  unexpected = [(i, o["text"]) for i, o in _outputs(nb, "stream", "stderr")
                if not any(re.search(pattern, o["text"]) for pattern, _ in allowed)]
  assert not unexpected, f"stderr output in {path.name} (cell, text): {unexpected[:5]}"


def _notebook(tmp_path, cells):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
  path = tmp_path / "nb.ipynb"
  nbformat.write(nb, path)
  return path


@pytest.mark.slow
def test_transfer_notebook_skips_the_text_part_with_one_message(tmp_path, monkeypatch):
  """Without the fortunes files, section 5 of notebook 02 prints one message with the install
  command and the next cell does nothing (no NameError)."""
  nb = nbformat.read(ROOT / "notebooks" / "02_transfer_learning.ipynb", as_version=4)
  start = next(i for i, c in enumerate(nb.cells) if "## 5. Text" in c.source)
  setup = nb.cells[1].source   # imports, SMALL, the image data (digits in SMALL mode)
  path = _notebook(tmp_path, [setup] + [c.source for c in nb.cells[start:] if c.cell_type == "code"])
  monkeypatch.setenv("FEDJAX_SIM_FORTUNES_DIR", str(tmp_path / "no-fortunes-here"))
  out = nb_execute.execute(path, small=True, timeout=300)
  assert not _outputs(out, "error") and not _outputs(out, "stream", "stderr")
  text = _text(out)
  assert text.count("Skipping the text part") == 1
  assert "apt-get install fortunes" in text and "no-fortunes-here" in text


@pytest.mark.slow
def test_plots_show_once_and_leave_the_backend_alone(tmp_path):
  """In a Jupyter kernel: History.plot as a cell's value is one image (with or without a path),
  and a plain pyplot figure after it still shows (the backend was not switched to Agg); a run
  with a progress bar writes nothing to stderr (no `IProgress not found`)."""
  path = _notebook(tmp_path, [
      "import matplotlib, matplotlib.pyplot as plt, optax, fedjax_sim as fs\n"
      "backend = matplotlib.get_backend()\n"
      "tr, te = fs.datasets.digits()\n"
      "data = fs.FederatedData.from_partition(tr, fs.partition.iid(tr['y'], 10, seed=0), num_classes=10)\n"
      "h = fs.run(fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16), fs.models.logistic_regression(64, 10),\n"
      "           data, rounds=3, cohort_size=5, eval_data=te, eval_every=1).history",
      "h.plot()",
      f"h.plot({str(tmp_path / 'h.png')!r}, title='three rounds')",
      "fig, ax = plt.subplots(); ax.plot([1, 2, 3]);",
      "assert matplotlib.get_backend() == backend, matplotlib.get_backend()",
  ])
  nb = nb_execute.execute(path, small=True, timeout=300)
  assert not _outputs(nb, "stream", "stderr"), _outputs(nb, "stream", "stderr")
  images = [sum("image/png" in o.get("data", {}) for _, o in _outputs(nb) if _ == i) for i in range(5)]
  assert images == [0, 1, 1, 1, 0]
  assert (tmp_path / "h.png").stat().st_size > 1000
