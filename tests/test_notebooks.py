"""Every notebook in notebooks/ runs top to bottom and is stored without outputs.

Each notebook runs in a fresh Jupyter kernel of this interpreter (so of the
environment pytest runs in, whatever other "python3" kernels are installed),
with the environment variable ``DTNH_NOTEBOOK_SMALL=1``: a notebook's cell
tagged ``parameters`` (papermill's convention) reads it and shrinks the run,
e.g. ``if os.environ.get("DTNH_NOTEBOOK_SMALL") == "1": STEPS = 5``. New
notebooks are picked up by name (``notebooks/*.ipynb``).

A notebook's first code cell, tagged ``install``, installs dtnh_jax where it is
not importable (a fresh Colab runtime): from ``DTNH_JAX_SOURCE`` or from the
checkout the notebook runs in. Here that runtime is a new virtual environment
and the checkout a copy of the build inputs; ``PIP_NO_DEPS=1`` (read by pip)
keeps it to the packages the cell names, so it takes seconds.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import nbclient
import nbformat
import pytest

import dtnh_jax
from helpers import copy_build_inputs

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SMALL_RUN_VARIABLE = "DTNH_NOTEBOOK_SMALL"
SOURCE_VARIABLE = "DTNH_JAX_SOURCE"
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


def _install_cell(path):
  notebook = nbformat.read(path, as_version=4)
  cells = [cell for cell in _code_cells(notebook) if "install" in cell.metadata.get("tags", [])]
  assert len(cells) == 1, f"{path.name}: tag exactly one code cell 'install' (has {len(cells)})"
  return cells[0]


def _run_install_cell(path, python, cwd, **environment):
  """Runs the notebook's install cell as plain Python with ``python``, in ``cwd``."""
  env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", SOURCE_VARIABLE)}
  return subprocess.run([str(python), "-c", _install_cell(path).source], cwd=cwd, env={**env, **environment},
                        capture_output=True, text=True)


def _installed_dtnh_jax(python):
  """(version, URL installed from) of the dtnh-jax distribution in ``python``'s environment."""
  code = ("import importlib.metadata, json; d = importlib.metadata.distribution('dtnh-jax'); "
          "print(json.dumps([d.version, json.loads(d.read_text('direct_url.json'))['url']]))")
  # cwd: python -c puts it first on sys.path, and a checkout's own dtnh_jax.egg-info must not answer.
  out = subprocess.run([str(python), "-c", code], cwd=python.parent, check=True, capture_output=True,
                       text=True).stdout
  return tuple(json.loads(out))


def _checkout_copy(path, root):
  """A copy of the repository's build inputs with the notebook in notebooks/, as a user's clone has."""
  copy_build_inputs(root)
  (root / "notebooks").mkdir()
  shutil.copy2(path, root / "notebooks" / path.name)
  return root / "notebooks"


def _venv(root, with_pip=True):
  subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(root)], check=True)
  return root / "bin" / "python"


@pytest.fixture(scope="module")
def _venv_with_pip(tmp_path_factory):
  """A new virtual environment with pip, made once for the module: ``python -m venv --without-pip`` with this
  environment's pip linked into its site-packages (``python -m venv`` would run ensurepip, seconds of CPU, for the
  same pip). The install tests get copies of it (:func:`new_venv_with_pip`), so each installs into its own."""
  import pip  # pylint: disable=g-import-not-at-top
  python = _venv(tmp_path_factory.mktemp("template") / "venv", with_pip=False)
  site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     check=True, capture_output=True, text=True).stdout.strip())
  (site / "pip").symlink_to(pathlib.Path(pip.__file__).parent)
  return python.parent.parent


@pytest.fixture
def new_venv_with_pip(_venv_with_pip):
  """Factory: ``new_venv_with_pip(root)`` -> the python of a fresh copy of the module's new venv with pip at ``root``
  (its ``bin/python`` a link to the base interpreter, as ``python -m venv`` makes it; the copy's ``pyvenv.cfg``
  makes ``root`` its ``sys.prefix``)."""

  def make(root):
    shutil.copytree(_venv_with_pip, root, symlinks=True)
    return root / "bin" / "python"

  return make


@notebook_paths
def test_notebook_installs_dtnh_jax_in_its_first_code_cell(path):
  first = _code_cells(nbformat.read(path, as_version=4))[0]
  assert first.source == _install_cell(path).source, f"{path.name}: the install cell must be the first code cell"


@notebook_paths
def test_install_cell_outside_a_checkout_without_a_source_says_what_to_set(path, tmp_path):
  result = _run_install_cell(path, _venv(tmp_path / "venv", with_pip=False), cwd=tmp_path)
  assert result.returncode != 0
  assert "RuntimeError: dtnh_jax is not installed" in result.stderr and SOURCE_VARIABLE in result.stderr


@pytest.mark.slow
@notebook_paths
def test_install_cell_installs_from_the_checkout_it_runs_in(path, tmp_path, new_venv_with_pip):
  python = new_venv_with_pip(tmp_path / "venv")
  notebooks = _checkout_copy(path, tmp_path / "clone")
  result = _run_install_cell(path, python, cwd=notebooks, PIP_NO_DEPS="1")
  assert result.returncode == 0, result.stderr
  assert _installed_dtnh_jax(python) == (dtnh_jax.__version__, (tmp_path / "clone").as_uri())


@pytest.mark.slow
def test_install_cell_installs_from_DTNH_JAX_SOURCE(tmp_path, new_venv_with_pip):
  # The cell's code is the same in every notebook; the checkout test above runs each one's requirements. This
  # notebook's are dtnh-jax alone (the quickstart's add matplotlib, seconds more to install).
  path = NOTEBOOKS_DIR / "reproduce_paper.ipynb"
  python = new_venv_with_pip(tmp_path / "venv")
  copy_build_inputs(tmp_path / "elsewhere")
  result = _run_install_cell(path, python, cwd=tmp_path, PIP_NO_DEPS="1",
                             **{SOURCE_VARIABLE: str(tmp_path / "elsewhere")})
  assert result.returncode == 0, result.stderr
  assert _installed_dtnh_jax(python) == (dtnh_jax.__version__, (tmp_path / "elsewhere").as_uri())
