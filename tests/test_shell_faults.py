"""The shell's faults: a core-only install, a failed checkpoint write, a cut metrics line, two pre-trainings of
one offline source, a second Ctrl-C, and the libraries' log lines.

Each test reproduces a failure of the code before (noted in its docstring) and checks the behaviour that
replaced it.
"""

import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dtnh_jax import models
from dtnh_jax.train import TrainConfig, checkpoint, grid, loop, sources
from dtnh_jax.train.data import load_data
from dtnh_jax.train import metrics as metrics_lib
from helpers import FAST, TRAIN_ENTRY, cli_error, command_env, run_args, train_flags

# --- metrics: no line lost without a word ----------------------------------------------------------------------


def _lines(*steps):
  return [metrics_lib.encode({"step": step, "kind": "train", "loss_empirical": 2.0}) + "\n" for step in steps]


@pytest.mark.parametrize("cut", [lambda line: line[:-12], lambda line: line[:4]], ids=["after its step", "in 'step'"])
def test_cut_last_metrics_line_not_known_to_be_after_the_checkpoint_is_moved_aside_with_a_warning(
    cut, tmp_path, monkeypatch):
  """Before: a last line cut short (a full disk) was dropped without a word, whatever its step."""
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  lines = _lines(1, 2, 3, 4)
  cut_line = cut(lines[3])
  (tmp_path / metrics_lib.FILE).write_text("".join(lines[:3]) + cut_line)
  with pytest.warns(RuntimeWarning, match=r"1 damaged line\(s\) \(4\) moved to .*metrics.damaged.txt"):
    metrics_lib.MetricsLog(str(tmp_path), resume_step=4).close()
  assert (tmp_path / metrics_lib.FILE).read_text() == "".join(lines[:3])
  assert (tmp_path / metrics_lib.DAMAGED).read_text() == f"{metrics_lib.FILE} line 4: {cut_line}\n"


def test_cut_last_metrics_line_after_the_checkpoint_is_dropped_as_the_run_writes_it_again(tmp_path, monkeypatch,
                                                                                            recwarn):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  lines = _lines(1, 2, 3, 4)
  (tmp_path / metrics_lib.FILE).write_text("".join(lines[:3]) + lines[3][:-12])
  metrics_lib.MetricsLog(str(tmp_path), resume_step=3).close()
  assert (tmp_path / metrics_lib.FILE).read_text() == "".join(lines[:3])
  assert not (tmp_path / metrics_lib.DAMAGED).exists() and not recwarn.list


# --- a checkpoint that cannot be written: one line, the earlier checkpoints kept, no temporary folder -------------

# dtnh-train whose files may grow to LIMIT bytes from the save of step FROM on (a file-size limit, as a full disk:
# orbax's asynchronous write fails in its threads and the error reaches the run at its next save)
_LIMITED_ENTRY = """
import resource, sys
sys.modules['tensorboardX'] = None
import orbax.checkpoint as ocp
limit, first = int(sys.argv[1]), int(sys.argv[2])
save = ocp.CheckpointManager.save
def limited_save(self, step, *args, **kwargs):
  if step >= first:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = limited_save
from dtnh_jax.cli import train_main
sys.exit(train_main(sys.argv[3:]))
"""


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.strip() and "test accuracy" not in line]


@pytest.mark.slow
def test_checkpoint_write_failing_in_orbax_threads_exits_1_with_one_line_and_leaves_no_temporary_folder(tmp_path):
  """Before: 458-2,489 lines of tracebacks (orbax's threads, asyncio, absl) and an orbax temporary folder."""
  args = ["--method", FAST["method"], "--seeds", "0", "--no-progress", "--workdir", str(tmp_path / "runs")]
  failed = subprocess.run([sys.executable, "-c", _LIMITED_ENTRY, "20000", "4", *args, *train_flags(FAST)],
                          env=command_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
  run = tmp_path / "runs" / "scratch" / FAST["method"] / "seed0"
  assert failed.returncode == 1, failed.stderr[-3000:]
  assert _error_lines(failed.stderr) == [
      f"dtnh-train: error: could not write the checkpoint of step 4 to {run / 'checkpoints' / '4'}: File too large "
      "(errno 27); the newest complete checkpoint, step 2, is kept: make room and run the same command to resume "
      "from it."], failed.stderr[-3000:]
  assert os.listdir(run / "checkpoints") == ["2"]


def test_checkpoint_write_refused_at_once_raises_one_line_naming_the_step_the_os_error_and_the_kept_checkpoint(
    tmp_path, monkeypatch):
  """Before: the OSError itself, which the CLI printed as a traceback."""
  save = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  checkpoints = checkpoint.Checkpoints(tmp_path)
  state = {"params": np.arange(4.0, dtype=np.float32)}
  checkpoints.save(2, state, {"step": 2}, {})
  with pytest.raises(checkpoint.CheckpointWriteError) as failure:
    checkpoints.save(4, state, {"step": 4}, {})
  checkpoints.close()  # quietly, after the failure was reported
  assert str(failure.value) == (
      f"could not write the checkpoint of step 4 to {tmp_path / 'checkpoints' / '4'}: No space left on device "
      "(errno 28); the newest complete checkpoint, step 2, is kept: make room and run the same command to resume "
      "from it.")
  assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_temporary_folder_a_failed_or_killed_save_left_is_removed_at_the_next_start(tmp_path):
  """Before: orbax's own clean-up kept a temporary folder cut before orbax wrote its metadata in it. Only
  STEP.orbax-checkpoint-tmp folders go."""
  leftover = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state"
  leftover.mkdir(parents=True)
  (tmp_path / "checkpoints" / "notes.txt").write_text("the user's")
  checkpoint.Checkpoints(tmp_path).close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["notes.txt"]


# --- two pre-trainings of one offline source: the second waits for the first ------------------------------------


def _tiny_source(path):
  """A source checkpoint of zeros (the second pre-training only finds it): shapes from jax.eval_shape, nothing
  compiled or run."""
  model = models.create_model("resnet18", num_classes=10, width=FAST["width"], small_stem=FAST["small_stem"])
  shapes = jax.eval_shape(lambda: models.init_variables(model, 0, FAST["crop"]))
  models.save_variables(path, jax.tree.map(lambda shape: np.zeros(shape.shape, shape.dtype), shapes),
                        {"arch": "resnet18", "width": FAST["width"], "small_stem": FAST["small_stem"]})


def test_second_pretraining_of_a_source_waits_for_the_first_and_reuses_its_result(tmp_path, monkeypatch, caplog):
  """Before: the second exited 2 naming an internal '--workdir .../NAME.run is in use' the user never passed."""
  monkeypatch.setenv("DTNH_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(loop, "train", lambda *args, **kwargs: pytest.fail("pre-trained a second time"))
  config = TrainConfig.create(**{**FAST, "source": "related"})
  path = sources.offline_source_path("related", config)
  held, waiting = threading.Event(), threading.Event()

  def first_process():  # holds the source's lock, and writes the source once the other one waits for it
    with sources.pretraining_lock(path):
      held.set()
      waiting.wait(timeout=60)
      _tiny_source(path)

  class Waiting(logging.Handler):
    def emit(self, record):
      if "waiting for another process" in record.getMessage():
        waiting.set()

  first = threading.Thread(target=first_process)
  first.start()
  held.wait(timeout=60)
  logging.getLogger("dtnh_jax.train.sources").addHandler(handler := Waiting())
  try:
    with caplog.at_level(logging.INFO, logger="dtnh_jax.train.sources"):
      assert sources.pretrain_sources(config, ["related"]) == {"related": path}
  finally:
    logging.getLogger("dtnh_jax.train.sources").removeHandler(handler)
    waiting.set()
    first.join()
  assert f"waiting for another process pre-training related into {path}" in caplog.messages


def test_offline_source_cache_that_is_a_file_exits_2_naming_it_and_dtnh_jax_cache(tmp_path, capsys, monkeypatch):
  """Before: 'dtnh-train: error: --workdir: cannot create the directory ...' (the user passed no such --workdir)."""
  (tmp_path / "cache").write_text("not a folder")
  monkeypatch.setenv("DTNH_JAX_CACHE", str(tmp_path / "cache"))
  error = cli_error(run_args(tmp_path) + ["--source", "related"], capsys)
  assert "--workdir" not in error
  assert f"{tmp_path / 'cache'}" in error and "DTNH_JAX_CACHE" in error, error


# --- a second signal: the message tells the truth about the checkpoints ---------------------------------------


class _SignallingBatches:
  """The run's training batches; after drawing the batch of step ``at``, this process gets SIGTERM twice."""

  def __init__(self, loader, at):
    self._loader, self._at = loader, at

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._loader)
    if self._loader.step == self._at:
      os.kill(os.getpid(), signal.SIGTERM)  # the first: finish the step and checkpoint it
      os.kill(os.getpid(), signal.SIGTERM)  # the second: stop at once
    return batch

  def get_state(self):
    return self._loader.get_state()

  def set_state(self, state):
    self._loader.set_state(state)


def test_second_signal_names_the_newest_checkpoint_written(tmp_path, capsys, monkeypatch):
  """Before: 'interrupted before a checkpoint of this command was written' after checkpoints of steps 2 and 4."""
  def signalling_data(config, *shard):
    data = load_data(config, *shard)
    return dataclasses.replace(data, train_loader=lambda seed: _SignallingBatches(data.train_loader(seed), 5))

  monkeypatch.setattr(grid, "load_data", signalling_data)
  error = cli_error(run_args(tmp_path), capsys, code=128 + signal.SIGTERM)
  run = tmp_path / "runs" / "scratch" / FAST["method"] / "seed0"
  assert error.strip().splitlines()[-1] == (
      f"dtnh-train: interrupted at once (a second signal); the newest checkpoint is step 4 in {run}: run the same "
      "command to resume from it.")


# --- the libraries' log lines and warnings: one line each, or none --------------------------------------------


def test_library_log_lines_do_not_reach_the_cli_output(tmp_path):
  """Before: 'WARNING:absl:Variant folder .../cifar10/3.0.2 has no dataset_info.json' above the error."""
  (tmp_path / "tfds" / "cifar10" / "3.0.2").mkdir(parents=True)  # a preparation that stopped early
  failed = subprocess.run([sys.executable, "-c", TRAIN_ENTRY, "--dataset", "cifar10", "--data-dir",
                           str(tmp_path / "tfds"), "--workdir", str(tmp_path / "runs"), "--no-progress"],
                          env=command_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr.startswith("dtnh-train: error: Dataset 'cifar10' is not prepared"), failed.stderr
  assert "absl" not in failed.stderr


# dtnh-convert whose torch.load warns as torch does (a UserWarning from inside torch)
_WARNING_ENTRY = """
import sys, warnings
import torch
load = torch.load
def warning_load(*args, **kwargs):
  warnings.warn("TypedStorage is deprecated.", UserWarning)
  return load(*args, **kwargs)
torch.load = warning_load
from dtnh_jax.cli import convert_main
sys.exit(convert_main(sys.argv[1:]))
"""


def test_library_warnings_are_one_line_each_in_dtnh_convert(tmp_path):
  """Before: torch's UserWarning printed with its file, line and source line ('  warnings.warn(...)')."""
  torch = pytest.importorskip("torch")
  torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pth")
  failed = subprocess.run([sys.executable, "-c", _WARNING_ENTRY, str(tmp_path / "weights.pth"), str(tmp_path / "out")],
                          env=command_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 2, failed.stderr[-3000:]
  lines = [line for line in failed.stderr.splitlines() if line.strip()]
  assert lines[0] == "dtnh-convert: warning: TypedStorage is deprecated.", failed.stderr
  assert lines[1].startswith("dtnh-convert: error: ") and "UserWarning" not in failed.stderr, failed.stderr
