"""Every notebook in notebooks/ runs top to bottom and is stored without outputs.

Each notebook runs in a fresh Jupyter kernel of this interpreter (so of the
environment pytest runs in, whatever other "python3" kernels are installed),
with the environment variable ``DTNH_NOTEBOOK_SMALL=1``: a notebook's cell
tagged ``parameters`` (papermill's convention) reads it and shrinks the run,
e.g. ``if os.environ.get("DTNH_NOTEBOOK_SMALL") == "1": STEPS = 5``. New
notebooks are picked up by name (``notebooks/*.ipynb``).
"""

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SMALL_RUN_VARIABLE = "DTNH_NOTEBOOK_SMALL"
# Per cell; a small run of a notebook takes well under a minute in all.
CELL_TIMEOUT_S = 300
KERNEL_STARTUP_TIMEOUT_S = 120

notebook_paths = pytest.mark.parametrize(
    "path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch):
  """Makes the kernel "python3" this interpreter, for the test's duration.

  JUPYTER_PATH comes first in Jupyter's search path, before any user-wide or
  system-wide kernel named "python3" that may run another Python.
  """
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher",
               "-f", "{connection_file}"],
      "display_name": "Python 3 (tests)",
      "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  search_path = [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH")]
  monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, search_path)))
  monkeypatch.setenv(SMALL_RUN_VARIABLE, "1")
  return "python3"


def _execute(notebook, kernel_name, cwd):
  client = nbclient.NotebookClient(
      notebook,
      kernel_name=kernel_name,
      timeout=CELL_TIMEOUT_S,
      startup_timeout=KERNEL_STARTUP_TIMEOUT_S,
      resources={"metadata": {"path": str(cwd)}},
  )
  return client.execute()


def _code_cells(notebook):
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_quickstart_notebook_is_collected():
  assert NOTEBOOKS_DIR / "quickstart.ipynb" in NOTEBOOKS


def test_kernel_runs_in_this_environment(this_interpreter_kernel, tmp_path):
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import os, sys\nprint(sys.prefix)\nprint(os.path.realpath(sys.executable))")])
  _execute(notebook, this_interpreter_kernel, tmp_path)
  printed = notebook.cells[0].outputs[0].text.split("\n")
  assert printed[:2] == [sys.prefix, os.path.realpath(sys.executable)]


@notebook_paths
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for index, cell in enumerate(_code_cells(notebook)):
    assert not cell.outputs, f"{path.name}: code cell {index} has outputs"
    assert cell.execution_count is None, (
        f"{path.name}: code cell {index} has an execution count")


@notebook_paths
def test_notebook_has_a_parameters_cell_with_a_small_run(path):
  notebook = nbformat.read(path, as_version=4)
  parameters = [cell for cell in _code_cells(notebook)
                if "parameters" in cell.metadata.get("tags", [])]
  assert len(parameters) == 1, (
      f"{path.name}: tag exactly one code cell 'parameters' (has "
      f"{len(parameters)})")
  assert SMALL_RUN_VARIABLE in parameters[0].source, (
      f"{path.name}: the 'parameters' cell must shrink the run when "
      f"{SMALL_RUN_VARIABLE}=1, the tests run it so")


@pytest.mark.slow
@notebook_paths
def test_notebook_runs_top_to_bottom(path, this_interpreter_kernel):
  notebook = nbformat.read(path, as_version=4)
  # Raises CellExecutionError, with the cell and its traceback, on any error.
  _execute(notebook, this_interpreter_kernel, path.parent)
  assert all(cell.execution_count is not None
             for cell in _code_cells(notebook))
