"""A run never loses a user's data: validate then write, one process per workdir, tolerant metrics,
verified checkpoints, clean interrupts, skipped steps counted.

Each test reproduces a failure of the code before these guarantees (noted in
its docstring) and checks the behaviour that replaced it.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from dtnh_jax import checksums, cli
from dtnh_jax.train import TrainConfig, grid, loop
from dtnh_jax.train.data import load_data
from dtnh_jax.train import workdir as workdir_lib
from helpers import (FAST, assert_trees_equal, cli_error, command_env, data_with_nan_batches, newest_checkpoint,
                     run_args, run_main, run_metrics, train_flags)

REPO = pathlib.Path(__file__).resolve().parent.parent


def _files(directory):
  """``{relative path: (bytes, mtime)}`` of every file under ``directory``."""
  found = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
  return found


# --- validate, then write ----------------------------------------------------------------------------------------


def test_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys):
  """Before: config.json was written before the source was loaded; the corrected command was then refused."""
  error = cli_error(run_args(tmp_path) + ["--source", str(tmp_path / "no-such-weights.pth")], capsys)
  assert "no-such-weights.pth" in error
  assert not (tmp_path / "runs").exists()  # nothing written, not even the folder
  assert cli_train(run_args(tmp_path)) == 0  # the corrected command (another --source) runs


def cli_train(args):
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.train_main(args)


def test_workdir_with_a_run_of_other_settings_is_refused_naming_the_flags_and_the_ways_out(tmp_path, stopped_run):
  before = _files(tmp_path)  # a FAST run stopped after 4 steps
  with pytest.raises(loop.ConfigError) as error:
    loop.train(TrainConfig.create(**{**FAST, "learning_rate": 0.5, "small_stem": False}), tmp_path)
  message = str(error.value)
  assert "--learning-rate 0.5 (the run there has --learning-rate 0.01)" in message
  assert "--no-small-stem (the run there has --small-stem)" in message
  assert "new --workdir" in message and "--restart" in message
  assert _files(tmp_path) == before  # refused before anything is touched


def test_restart_sets_the_old_run_aside_and_starts_anew(tmp_path, straight_run):
  loop.train(TrainConfig.create(**{**FAST, "learning_rate": 0.5}), tmp_path, stop_after=2)
  old = _files(tmp_path)
  loop.train(TrainConfig.create(**FAST), tmp_path, restart=True)
  aside = tmp_path / workdir_lib.SET_ASIDE / "1"
  assert _files(aside).keys() == old.keys()  # every file of the old run, moved, none deleted
  assert {k: v[0] for k, v in _files(aside).items()} == {k: v[0] for k, v in old.items()}
  assert (tmp_path / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()


def test_run_stopped_before_its_first_checkpoint_takes_the_corrected_settings(tmp_path, straight_run):
  """Before: a NaN stop at step 1 (no checkpoint) refused the lower learning rate the message advised."""
  config = TrainConfig.create(**{**FAST, "learning_rate": 0.5})
  with pytest.raises(loop.NonFiniteLossError, match="no checkpoint was written before that step"):
    loop.train(config, tmp_path, data=data_with_nan_batches(config, {1}))
  loop.train(TrainConfig.create(**FAST), tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()
  assert (tmp_path / workdir_lib.SET_ASIDE / "1" / "metrics.jsonl").exists()  # the stopped run, kept


# --- one process per workdir -------------------------------------------------------------------------------------

_HOLD_LOCK = ("import sys, time; from dtnh_jax.train.workdir import Lock; Lock(sys.argv[1]).acquire(); "
              "print('locked', flush=True); time.sleep(600)")


def test_second_process_on_a_workdir_exits_2_naming_the_first_and_a_dead_holder_does_not_block(tmp_path, capsys):
  """Before: two dtnh-train on one workdir ran at once and one died with a traceback."""
  workdir = tmp_path / "runs"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir / "scratch" / FAST["method"] / "seed0")],
                            stdout=subprocess.PIPE, env=command_env(tmp_path), text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    error = cli_error(run_args(tmp_path), capsys)
    assert f"is in use by another dtnh-train (pid {holder.pid} on " in error
  finally:
    holder.kill()
    holder.wait()
  # the kernel released the dead holder's lock; its lock file is stale and taken over
  assert (workdir / "scratch" / FAST["method"] / "seed0" / ".lock").exists()
  assert cli_train(run_args(tmp_path)) == 0


# --- metrics that survive damage ---------------------------------------------------------------------------------


def test_damaged_metrics_line_is_set_aside_and_no_other_line_is_lost(tmp_path, straight_run, stopped_run):
  """Before: one damaged line made the resumed run cut metrics.jsonl at that line."""
  config = TrainConfig.create(**FAST)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)
  damaged = '{"step": 2, "kind": "tr\x00\x00 garbage\n'
  (tmp_path / "metrics.jsonl").write_text("".join(lines[:1] + [damaged] + lines[2:]))
  with pytest.warns(RuntimeWarning, match=r"1 damaged line\(s\) \(2\) moved to .*metrics.damaged.txt"):
    loop.train(config, tmp_path)
  expected = (straight_run / "metrics.jsonl").read_text().splitlines(keepends=True)
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(expected[:1] + expected[2:])
  assert "metrics.jsonl line 2: " + damaged.rstrip("\n") in (tmp_path / "metrics.damaged.txt").read_text()


def test_finished_run_run_again_does_not_retrain_or_touch_its_files(tmp_path, straight_run, straight_run_results):
  """Before: rerunning a finished run whose metrics had a damaged line cut the file and crashed (IndexError)."""
  config = TrainConfig.create(**FAST)
  shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)  # a finished run of its own
  results = straight_run_results
  with open(tmp_path / "metrics.jsonl", "r+") as f:
    f.seek(5)
    f.write("###")
  before = _files(tmp_path)
  assert loop.train(config, tmp_path) == results
  assert _files(tmp_path) == before


def test_metrics_are_strict_json_with_nonfinite_values_named(tmp_path):
  """Before: metrics.jsonl held bare NaN tokens, which strict JSON readers reject."""
  config = TrainConfig.create(**{**FAST, "on_nonfinite": "skip", "skip_limit": 0.5})
  with pytest.warns(RuntimeWarning):
    loop.train(config, tmp_path, data=data_with_nan_batches(config, {3}))

  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")

  lines = [json.loads(line, parse_constant=refuse) for line in open(tmp_path / "metrics.jsonl")]
  step3 = next(r for r in lines if r["step"] == 3 and r["kind"] == "train")
  assert step3["loss_empirical"] is None and step3["nonfinite"]["loss_empirical"] == "nan"
  assert "nonfinite" not in next(r for r in lines if r["step"] == 2)
  restored = next(r for r in run_metrics(tmp_path) if r["step"] == 3 and r["kind"] == "train")
  assert np.isnan(restored["loss_empirical"]) and "nonfinite" not in restored


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), [1.0, float("nan")], 0.5, [1, 2]])
def test_metric_values_round_trip_through_strict_json(value):
  from dtnh_jax.train import metrics  # pylint: disable=g-import-not-at-top
  line = metrics.encode({"step": 1, "kind": "train", "x": value})
  assert "NaN" not in line and "Infinity" not in line
  np.testing.assert_array_equal(np.asarray(metrics.decode(line)["x"], float), np.asarray(value, float))


# --- verified checkpoints ----------------------------------------------------------------------------------------


def _flip_bytes(step_dir):
  """Flips bytes in the middle of the largest array file: the bytes still decode, to other numbers."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.parts[-1:]]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  for offset in range(len(data) // 2, len(data) // 2 + 8):
    data[offset] ^= 0x10
  largest.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_with_flipped_bytes_is_set_aside_and_the_newest_one_that_verifies_used(tmp_path, straight_run,
                                                                                          stopped_run):
  """Before: flipped bytes in an array file were restored without complaint."""
  config = TrainConfig.create(**FAST)
  _flip_bytes(tmp_path / "checkpoints" / "4")
  with pytest.warns(RuntimeWarning, match=r"checkpoint at step 4 .*(do not match their checksums|unreadable).*"
                                          r"previous checkpoint \(step 2\)"):
    loop.train(config, tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()
  assert_trees_equal(newest_checkpoint(tmp_path)[1], newest_checkpoint(straight_run)[1])
  assert (tmp_path / "unreadable-checkpoints" / "4").is_dir()


def test_checkpoint_whose_arrays_differ_from_their_checksums_is_not_restored(tmp_path, stopped_run):
  """The check itself, independent of how orbax lays out its files: a changed checksum record."""
  extra_file = tmp_path / "checkpoints" / "4" / "extra" / "metadata"
  extra = json.loads(extra_file.read_text())
  name = "params/fc/kernel"
  assert name in extra["checksums"]
  extra["checksums"][name] = extra["checksums"][name][:-1] + ("0" if extra["checksums"][name][-1] != "0" else "1")
  extra_file.write_text(json.dumps(extra))
  with pytest.warns(RuntimeWarning, match=r"checkpoint at step 4 .*do not match their checksums \(params/fc/kernel\)"):
    step, _, _, _ = newest_checkpoint(tmp_path)
  assert step == 2


def test_checksums_change_with_any_single_element():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(5, 7)).astype(np.float32), "n": np.arange(6, dtype=np.int32)}
  expected = checksums.tree_checksums(tree)
  assert checksums.mismatches(tree, expected) == []
  for index in [(0, 0), (2, 3), (4, 6)]:
    for bit in (0, 17, 31):
      changed = {**tree, "w": tree["w"].copy()}
      changed["w"].view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checksums.mismatches(changed, expected) == ["w"]
  swapped = {**tree, "n": tree["n"][[1, 0, 2, 3, 4, 5]]}
  assert checksums.mismatches(swapped, expected) == ["n"]


# --- non-finite steps skipped --------------------------------------------------------------------------------------


def test_skipped_steps_warn_once_and_are_summarized(tmp_path, recwarn):
  """Before: one warning per skipped step and no summary."""
  config = TrainConfig.create(**{**FAST, "on_nonfinite": "skip", "skip_limit": 0.5})
  results = loop.train(config, tmp_path, data=data_with_nan_batches(config, {2, 3, 5}))
  messages = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
  assert sum("was skipped" in m for m in messages) == 1 and "step 2:" in messages[0]
  assert any("3 of 6 steps were skipped" in m for m in messages)
  assert results["skipped_steps"] == 3


def test_skipping_more_steps_than_the_limit_stops_the_run(tmp_path):
  """Before: --on-nonfinite skip exited 0 after skipping 120 of 200 steps."""
  config = TrainConfig.create(**{**FAST, "on_nonfinite": "skip", "skip_limit": 0.2})  # at most ceil(1.2) = 2 of 6
  with pytest.warns(RuntimeWarning, match="skipped"):
    with pytest.raises(loop.NonFiniteLossError, match=r"step 4: .*3 of 6 steps skipped, more than --skip-limit 0.2"):
      loop.train(config, tmp_path, data=data_with_nan_batches(config, {2, 3, 4}))


def test_skipped_steps_are_counted_across_a_resume(tmp_path):
  config = TrainConfig.create(**{**FAST, "on_nonfinite": "skip", "skip_limit": 0.2})
  with pytest.warns(RuntimeWarning, match="skipped"):
    loop.train(config, tmp_path, data=data_with_nan_batches(config, {1, 2}), stop_after=2)
  with pytest.raises(loop.NonFiniteLossError, match=r"step 5: .*3 of 6 steps skipped"):
    loop.train(config, tmp_path, data=data_with_nan_batches(config, {5}))


# --- clean interrupts ----------------------------------------------------------------------------------------------

class _SignallingBatches:
  """The run's training batches; after drawing the batch of step ``at``, this process gets ``signum``."""

  def __init__(self, loader, signum, at):
    self._loader, self._signum, self._at = loader, signum, at

  def __iter__(self):
    return self

  def __next__(self):
    if self._loader.step == self._at:
      os.kill(os.getpid(), self._signum)
    return next(self._loader)

  def get_state(self):
    return self._loader.get_state()

  def set_state(self, state):
    self._loader.set_state(state)


def _train_args(workdir):
  return ["--method", FAST["method"], "--seeds", "0", "--no-progress", "--workdir", str(workdir)] + train_flags(
      {**FAST, "steps": 12, "lr_drop_steps": (8,), "checkpoint_every": 4})


def _dtnh_train(workdir, monkeypatch, signum, at):
  """``(exit code, stdout, stderr)`` of dtnh-train in this process, whose data loader sends this process ``signum``
  at the training step ``at``, or while the data loads (``at="start"``). The signal reaches the CLI as it reaches a
  process of its own (that process signalled itself the same way, and cost a start-up: imports, tracing)."""
  def signalling_data(config, *shard):
    if at == "start":
      os.kill(os.getpid(), signum)
    data = load_data(config, *shard)
    return dataclasses.replace(data, train_loader=lambda seed: _SignallingBatches(data.train_loader(seed), signum,
                                                                                  at))

  with monkeypatch.context() as patch:
    patch.setattr(grid, "load_data", signalling_data)
    return run_main(cli.train_main, _train_args(workdir))


@pytest.fixture(scope="module")
def straight_command(tmp_path_factory):
  """The uninterrupted run of ``_dtnh_train``'s command, in this process (the same code and compile flags)."""
  tmp_path = tmp_path_factory.mktemp("straight-command")
  code, _, err = run_main(cli.train_main, _train_args(tmp_path / "runs"))
  assert code == 0, err[-3000:]
  return tmp_path / "runs" / "scratch" / FAST["method"] / "seed0"


def test_interrupts_checkpoint_the_step_print_one_line_and_the_reruns_resume(tmp_path, straight_command, monkeypatch):
  """Before: Ctrl-C printed a 25-line traceback and left an orbax temporary folder; SIGTERM saved nothing. Here
  one run is interrupted twice, by SIGINT and then, resumed, by SIGTERM, and resumed again to its end."""
  run = tmp_path / "runs" / "scratch" / FAST["method"] / "seed0"
  for signum, code, at, step in ((signal.SIGINT, 130, 6, 7), (signal.SIGTERM, 143, 9, 10)):
    interrupted_code, _, err = _dtnh_train(tmp_path / "runs", monkeypatch, signum, at)
    assert interrupted_code == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"dtnh-train: interrupted at step {step} (checkpoint written); run the same command to resume."
    assert "Traceback" not in err
    checkpoints = os.listdir(run / "checkpoints")
    assert str(step) in checkpoints and all(name.isdigit() for name in checkpoints)  # no temporary folder
  # the interrupts' checkpoints (7, 10) and the regular one between them, the newest keep_checkpoints (3)
  assert sorted(os.listdir(run / "checkpoints"), key=int) == ["7", "8", "10"]
  # the same command again, to the end
  code, _, err = run_main(cli.train_main, _train_args(tmp_path / "runs"))
  assert code == 0, err[-3000:]
  assert (run / "metrics.jsonl").read_text() == (straight_command / "metrics.jsonl").read_text()


def test_interrupt_before_training_exits_with_one_line_and_leaves_nothing(tmp_path, monkeypatch):
  code, _, err = _dtnh_train(tmp_path / "runs", monkeypatch, signal.SIGTERM, "start")
  assert code == 143, err[-3000:]
  assert err.strip().splitlines()[-1] == (
      "dtnh-train: interrupted before a checkpoint of this command was written; run the same command to resume.")
  assert "Traceback" not in err
  assert not (tmp_path / "runs").exists()
