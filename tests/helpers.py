"""Helpers that several test modules share: the FAST run, the command line's flags and errors, reading a run back.

Test modules import them from here (``from helpers import FAST, cli_error``), never from one another: a test
module is for pytest to collect, and importing one from another ties the two files together. The reference
implementations that the core's tests compare against are in ``tests/reference.py``.
"""

import contextlib
import dataclasses
import importlib.util
import io
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from dtnh_jax import cli
from dtnh_jax.train import checkpoint, presets, report
from dtnh_jax.train.data import load_data

#: The repository's root.
REPO = pathlib.Path(__file__).resolve().parent.parent

#: The offline problem at a size that runs in seconds, from a random initialization (no source network to
#: pre-train): the same code as the default.
FAST = presets.tiny()

#: ``dtnh-train`` flags of one small run from scratch (one λ: the offline default's grid sweeps three) on the offline
#: target's 100 images without a validation carve; the steps and the rest are the offline default's.
TINY_FLAGS = ["--source", "scratch", "--resize", "10", "--crop", "8", "--batch-size", "16", "--eval-batch-size", "200",
              "--reg-weight", "1", "--target-per-class", "10", "--val-fraction", "0"]

#: dtnh-train as ``python -c TRAIN_ENTRY ARGS...``, without TensorBoard (importing it imports torch: seconds per
#: start; metrics.jsonl is the record).
TRAIN_ENTRY = ("import sys; sys.modules['tensorboardX'] = None; "
               "from dtnh_jax.cli import train_main; sys.exit(train_main(sys.argv[1:]))")

#: What building the project reads (``copy_build_inputs``).
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "dtnh_jax")


def train_flags(settings):
  """``dtnh-train`` flags for ``settings`` (the offline default's own settings left out)."""
  offline_default = presets.offline()
  return cli.settings_to_argv({key: value for key, value in settings.items()
                               if key not in ("dataset", "method") and offline_default.get(key) != value})


def run_args(tmp_path, **changes):
  """``dtnh-train`` arguments of one FAST run (with ``changes``) in ``tmp_path/runs``."""
  return ["--workdir", str(tmp_path / "runs"), "--method", FAST["method"], "--seeds", "0", "--no-progress"] + (
      train_flags({**FAST, **changes}))


def command_env(tmp_path):
  """The environment of a ``dtnh-train`` subprocess: this checkout first on the path, on the CPU, its own cache.

  The suite's compilation cache (tests/conftest.py) carries over: the processes after the first load the
  compiled programs.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env.update(
      JAX_PLATFORMS="cpu",  # bit-exact equality is a CPU promise; accelerators may pick other kernels per process
      DTNH_JAX_CACHE=str(tmp_path / "cache"),
  )
  return env


def run_main(main, args):
  """``(exit code, stdout, stderr)`` of ``main(args)``, run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = main(args)
    except SystemExit as exit_info:
      code = exit_info.code
  return code or 0, out.getvalue(), err.getvalue()


def cli_error(args, capsys, code=2):
  """The stderr of ``dtnh-train args``, which must exit with ``code`` and print no traceback."""
  with pytest.raises(SystemExit) as exit_info:
    cli.train_main(args)
  captured = capsys.readouterr()
  assert exit_info.value.code == code, captured.err
  assert "Traceback" not in captured.err + captured.out
  return captured.err


def assert_trees_equal(actual, expected, what="state"):
  """Same structure and bit-identical leaves; a failure names the first differing leaf."""
  actual_leaves, actual_structure = jax.tree_util.tree_flatten_with_path(actual)
  expected_leaves, expected_structure = jax.tree_util.tree_flatten_with_path(expected)
  assert actual_structure == expected_structure, what
  for (path, a), (_, b) in zip(actual_leaves, expected_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{what}{jax.tree_util.keystr(path)}")


def newest_checkpoint(workdir):
  """``(step, state, data, ...)`` of the newest checkpoint of the run in ``workdir``."""
  checkpoints = checkpoint.Checkpoints(workdir)
  try:
    return checkpoints.restore(None)
  finally:
    checkpoints.close()


def run_metrics(workdir):
  """The records of the run's metrics.jsonl."""
  return report.read_metrics(os.path.join(workdir, "metrics.jsonl"))


class _NaNBatches:
  """The run's training batches, with NaN images in the batches of ``steps`` (counting from 1)."""

  def __init__(self, loader, steps):
    self._loader, self._steps = loader, steps

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._loader)
    if self._loader.step in self._steps:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  def get_state(self):
    return self._loader.get_state()

  def set_state(self, state):
    self._loader.set_state(state)


def data_with_nan_batches(config, steps, *shard):
  """The run data of ``config`` whose training batches of ``steps`` hold NaN images."""
  data = load_data(config, *shard)
  return dataclasses.replace(data, train_loader=lambda seed: _NaNBatches(data.train_loader(seed), steps))


def copy_build_inputs(destination: pathlib.Path) -> None:
  """Copies what building the project reads into ``destination``, a source tree of its own."""
  destination.mkdir(parents=True, exist_ok=True)
  for name in BUILD_INPUTS:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(REPO / name, destination / name)


def torchvision_resnet(arch: str, num_classes: int = 1000):
  """torchvision's model named ``arch``; ``resnet10``: its ResNet class with one BasicBlock per stage."""
  import torchvision  # pylint: disable=g-import-not-at-top
  if arch == "resnet10":
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                            num_classes=num_classes)
  return getattr(torchvision.models, arch)(num_classes=num_classes)


def benchmark_module(name: str):
  """``benchmarks/NAME.py`` loaded as a module (the benchmarks are scripts, not a package)."""
  spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def committed_table(records_file: str) -> str:
  """The committed table beside a committed records file: ``NAME.md`` for ``NAME.jsonl``."""
  with open(records_file[:-len(".jsonl")] + ".md", encoding="utf-8") as f:
    return f.read()
