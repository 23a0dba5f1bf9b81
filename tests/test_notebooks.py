"""Every notebook in colabs/ runs headless, top to bottom, in smoke mode.

``VIT_EDGE_NOTEBOOK_SMOKE=1`` tells a notebook to use few steps (the quickstart
trains 4 steps instead of 60), and ``VIT_EDGE_NOTEBOOK_WORKDIR`` gives it a fresh
run directory, so a stale checkpoint cannot be resumed. A failing cell fails the
test with the cell's traceback.
"""

import glob
import os

import pytest

nbclient = pytest.importorskip("nbclient", reason="pip install -e .[test]")
nbformat = pytest.importorskip("nbformat", reason="pip install -e .[test]")

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "colabs")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLABS, "*.ipynb")))
# Per cell; the quickstart's slowest cell (tracing and XLA-compiling a model)
# takes well under a minute on one CPU core.
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
  assert NOTEBOOKS, f"no notebooks found in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("VIT_EDGE_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("VIT_EDGE_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
