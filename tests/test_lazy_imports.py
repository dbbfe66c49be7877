"""What loads no jax: ``dtnh_jax.names``, the package itself, and ``dtnh-train --help/--print-config/--version``.

Each check runs in a fresh interpreter (a subprocess), where ``sys.modules`` holds only what the code under test
imported. Before: ``import dtnh_jax.names`` ran the package's ``__init__``, which imported jax and optax, and
``dtnh-train --help`` loaded jax, flax and orbax (about 2 s of a 2-core machine before the help showed).
"""

import json
import pathlib
import subprocess
import sys

import pytest

import dtnh_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: The top-level modules that the commands above must not load; each takes seconds to import.
ARRAY_LIBRARIES = ("jax", "jaxlib", "optax", "flax", "orbax", "tensorflow", "tensorflow_datasets", "grain")

_LOADED = f"""
import json, sys
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({ARRAY_LIBRARIES!r}))), file=sys.stderr)
"""


def _array_libraries_loaded(code: str) -> list[str]:
  """The array libraries in ``sys.modules`` after ``code`` runs in a fresh interpreter (a SystemExit is fine)."""
  wrapped = f"try:\n  exec({code!r})\nexcept SystemExit:\n  pass\n{_LOADED}"
  out = subprocess.run([sys.executable, "-c", wrapped], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stderr.strip().splitlines()[-1])


def test_import_names_loads_no_jax():
  assert _array_libraries_loaded("import dtnh_jax.names") == []


def test_import_dtnh_jax_loads_no_jax():
  assert _array_libraries_loaded("import dtnh_jax") == []


def test_import_train_config_and_presets_loads_no_jax():
  assert _array_libraries_loaded("import dtnh_jax.train.config, dtnh_jax.train.presets") == []


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["--print-config"], ["--print-config", "json"],
                                  ["--preset", "study", "--print-config"],
                                  ["--dataset", "cifar10", "--method", "l2-sp,dtnh-l2-sp", "--print-config"]],
                         ids=" ".join)
def test_dtnh_train_without_training_loads_no_jax(argv):
  assert _array_libraries_loaded(f"from dtnh_jax import cli; cli.train_main({argv!r})") == []


def test_a_public_name_loads_its_module_on_first_use():
  code = "import dtnh_jax, sys; dtnh_jax.dtnh; assert 'dtnh_jax.transform' in sys.modules"
  assert "jax" in _array_libraries_loaded(code)


@pytest.mark.parametrize("name", dtnh_jax.__all__)
def test_every_exported_name_resolves(name):
  assert getattr(dtnh_jax, name) is not None


def test_from_import_of_an_exported_name_works():
  from dtnh_jax import dtnh, multi_steps, share_bound  # pylint: disable=g-import-not-at-top
  assert callable(dtnh) and callable(multi_steps) and callable(share_bound)


def test_dir_lists_the_exported_names_and_submodules():
  listed = dir(dtnh_jax)
  assert set(dtnh_jax.__all__) <= set(listed)
  assert {"names", "train", "models", "transform", "__version__"} <= set(listed)


def test_an_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    dtnh_jax.nonexistent  # pylint: disable=pointless-statement


def test_train_package_exports_resolve():
  from dtnh_jax import train  # pylint: disable=g-import-not-at-top
  for name in train.__all__:
    assert getattr(train, name) is not None
  assert set(train.__all__) <= set(dir(train))


def test_the_metrics_log_writes_tensorboard_scalars_without_loading_pytorch(tmp_path):
  """tensorboardX imports PyTorch where it is installed (2-3 s of a training process's start); the log hides it."""
  pytest.importorskip("tensorboardX")
  pytest.importorskip("torch")
  code = ("import sys\nfrom dtnh_jax.train import metrics\n"
          f"log = metrics.MetricsLog({str(tmp_path)!r}, resume_step=0)\n"
          "log.write({'step': 1, 'kind': 'train', 'loss': 0.5}); log.close()\n"
          "assert 'torch' not in sys.modules, 'the log loaded PyTorch'\n"
          "import torch  # importable again afterwards\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
