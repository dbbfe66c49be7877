"""Faults: kills, damaged checkpoints, bad input, NaN losses.

A run killed at random points and resumed by running the same command again
ends bit-identical to an uninterrupted one (CPU); a corrupted or half-written
newest checkpoint is set aside with a warning and the previous one is used;
bad command-line input exits with code 2 and a message that names it; a
NaN/Inf loss stops the run before its next checkpoint, or skips the step.
"""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dtnh_jax import cli, models
from dtnh_jax.train import TrainConfig, checkpoint, grid, loop
from helpers import (FAST, REPO, TRAIN_ENTRY, assert_trees_equal, cli_error, command_env, data_with_nan_batches,
                     newest_checkpoint, run_args, run_main, run_metrics, train_flags)


def _checkpoint_at(workdir, step):
  """``{"state", "data"}`` of the checkpoint at ``step``."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                          data=ocp.args.JsonRestore()))
  finally:
    manager.close()


# --- a run killed at random points resumes exactly -------------------------------------------------------------

# The run as a command (a subprocess that SIGKILL stops anywhere): 18 steps, a checkpoint
# every 3 (with the metrics every 2 and an evaluation at 10 in between), the last 2 kept.
KILLED_RUN = {**FAST, "steps": 18, "lr_drop_steps": (12,), "checkpoint_every": 3, "keep_checkpoints": 2,
              "log_every": 2, "eval_every": 10}


def _command(workdir):
  return [sys.executable, "-c", TRAIN_ENTRY, "--method", KILLED_RUN["method"], "--seeds", "0", "--no-progress",
          "--workdir", str(workdir)] + train_flags(KILLED_RUN)


def _completed_checkpoints(run):
  """Steps whose checkpoint orbax has completed (renamed, with its commit marker)."""
  directory = run / "checkpoints"
  try:
    names = os.listdir(directory)
  except FileNotFoundError:
    return set()
  return {int(name) for name in names
          if name.isdigit() and os.path.exists(directory / name / checkpoint._COMMIT_MARKER)}


def _save_started(run, step):
  """Whether the checkpoint of ``step`` is being written (orbax's temporary folder) or done."""
  try:
    return any(name.split(".")[0] == str(step) for name in os.listdir(run / "checkpoints"))
  except FileNotFoundError:
    return False


def _run_dir(workdir):
  return workdir / "scratch" / KILLED_RUN["method"] / "seed0"


def test_run_killed_at_random_points_resumes_to_the_same_parameters_and_metrics(tmp_path):
  env, log = command_env(tmp_path), tmp_path / "commands.log"

  def start(workdir):
    with open(log, "ab") as output:
      return subprocess.Popen(_command(workdir), env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT)

  def output():
    return log.read_text(errors="replace")[-4000:]

  # the uninterrupted reference: the same command in this process (the same code and compile flags, no start-up)
  code, _, err = run_main(cli.train_main, _command(tmp_path / "straight")[3:])
  assert code == 0, err[-3000:]

  rng = random.Random(0)
  # one kill during start-up, then kills at random times after the saves of random checkpoints begin
  # (during the save itself, the steps after it, an evaluation, the metrics' writing)
  # (the last at least 6 steps before the end, so that the run is still going at its kill)
  targets = sorted(rng.sample(range(KILLED_RUN["checkpoint_every"], KILLED_RUN["steps"] - 5,
                                    KILLED_RUN["checkpoint_every"]), 3))
  plan = [(None, rng.uniform(0.5, 4.0))] + [(target, rng.uniform(0.0, 0.3)) for target in targets]
  run = _run_dir(tmp_path / "killed")
  completed_before_kills, newest, interrupted_saves = set(), 0, 0
  for target, delay in plan:
    process, started = start(tmp_path / "killed"), time.monotonic()
    while target is not None and not _save_started(run, target) and process.poll() is None:
      assert time.monotonic() - started < 300, f"step {target} never checkpointed\n{output()}"
      time.sleep(0.005)
    time.sleep(delay)
    assert process.poll() is None, f"the run ended before the kill after step {target}\n{output()}"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    completed = _completed_checkpoints(run)
    if (run / "checkpoints").is_dir():
      interrupted_saves += any(".orbax-checkpoint-tmp" in name for name in os.listdir(run / "checkpoints"))
    assert max(completed, default=0) >= newest, "a completed checkpoint was lost"
    newest = max(completed, default=0)
    completed_before_kills |= completed
  # the same command again, to the end: in this process, as the reference (what is checked is what the kills left
  # on disk; a process of its own would cost its start-up again)
  code, _, err = run_main(cli.train_main, _command(tmp_path / "killed")[3:])
  assert code == 0, f"{err[-3000:]}\n{output()}"

  expected = _run_dir(tmp_path / "straight")
  assert (run / "metrics.jsonl").read_text() == (expected / "metrics.jsonl").read_text()
  assert json.loads((run / "results.json").read_text()) == json.loads((expected / "results.json").read_text())
  step, state, data_state, _ = newest_checkpoint(run)
  expected_step, expected_state, expected_data_state, _ = newest_checkpoint(expected)
  assert step == expected_step == KILLED_RUN["steps"] and data_state == expected_data_state
  assert_trees_equal(state, expected_state)  # params, batch stats, optimizer state, RNG: bit-exact
  final = _completed_checkpoints(run)
  for step in completed_before_kills:  # gone only by the rotation to the newest keep_checkpoints
    assert step in final or sum(s > step for s in final) >= KILLED_RUN["keep_checkpoints"], step
  assert sorted(os.listdir(run / "checkpoints")) == sorted(map(str, final))  # no temporary folder left
  assert not (run / "unreadable-checkpoints").exists()  # a kill never leaves a damaged checkpoint
  print(f"{len(plan)} kills (after the saves of steps {targets} began), {interrupted_saves} of them during a save; "
        f"completed checkpoints seen: {sorted(completed_before_kills)}")


def test_metric_lines_after_the_checkpoint_resumed_from_are_not_written_twice(straight_run, stopped_run, tmp_path):
  config = TrainConfig.create(**FAST)
  with open(tmp_path / "metrics.jsonl", "a") as f:  # as a kill after writing them and before the next checkpoint
    f.writelines(line for line in open(straight_run / "metrics.jsonl") if json.loads(line)["step"] > 4)
    f.write('{"step": 6, "kind": "train", "loss_emp')  # and a line cut short
  loop.train(config, tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()


# --- a damaged newest checkpoint --------------------------------------------------------------------------------


def _truncate_array_data(step_dir):
  chunks = [path for path in (step_dir / "state" / "d").iterdir() if path.is_file()]
  assert chunks
  for path in chunks:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)


DAMAGES = {
    "truncated array data": _truncate_array_data,
    "deleted array index": lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    "deleted data position": lambda step_dir: (step_dir / "data" / "metadata").unlink(),
    "no commit marker": lambda step_dir: (step_dir / checkpoint._COMMIT_MARKER).unlink(),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, after a failed restore
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_is_set_aside_with_a_warning_and_the_previous_one_used(damage, straight_run,
                                                                                         stopped_run, tmp_path):
  config = TrainConfig.create(**FAST)
  DAMAGES[damage](tmp_path / "checkpoints" / "4")
  with pytest.warns(RuntimeWarning, match=r"checkpoint at step 4 .*falling back to the previous checkpoint \(step 2\)"):
    loop.train(config, tmp_path)
  assert (tmp_path / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()
  assert_trees_equal(newest_checkpoint(tmp_path)[1], newest_checkpoint(straight_run)[1])
  assert (tmp_path / "unreadable-checkpoints" / "4").is_dir()  # kept for inspection, out of orbax's way


# --- bad input: exit code 2 and a message that names the problem -------------------------------------------------


@pytest.mark.parametrize("flag,value,message", [
    ("--steps", "ten", "argument --steps: invalid int value: 'ten'"),
    ("--learning-rate", "fast", "argument --learning-rate: invalid float value: 'fast'"),
    ("--lr-drop-steps", "4,x", "expected comma-separated integers, got '4,x'"),
    ("--seeds", "0,one", "--seeds takes comma-separated integers"),
    ("--width", "nan", "--width must be a finite number"),
    ("--reg-weight", "inf", "--reg-weight must be a finite number"),
    ("--width", "0", "--width must be positive"),
    ("--seed", "-1", "--seed must be in [0, 2**31)"),
    ("--arch", "resnet99", "--arch must be one of resnet10, resnet18, resnet34, resnet50"),
    ("--feature-layers", "layer9", "--feature-layers takes comma-separated names"),
    ("--lr-drop-factor", "-0.1", "--lr-drop-factor must be >= 0"),
    ("--compute-dtype", "float16", "--compute-dtype must be one of float32, bfloat16"),
    ("--on-nonfinite", "ignore", "--on-nonfinite must be one of stop, skip, record"),
    ("--method", ",", "names no method"),
    ("--granularity", "layer", "--granularity must be tree, leaf or module"),
])
def test_bad_value_exits_with_code_2_naming_the_flag(flag, value, message, tmp_path, capsys):
  args = run_args(tmp_path) + [flag, value]  # the last occurrence wins in argparse
  assert message in cli_error(args, capsys)


@pytest.mark.parametrize("source", ["imagenet", "places365"])
def test_a_pretrained_source_for_resnet10_is_refused_saying_none_exists(source, tmp_path, capsys):
  error = cli_error(run_args(tmp_path) + ["--arch", "resnet10", "--source", source], capsys)
  assert f"--source {source}: no pre-trained weights exist for resnet10" in error and "--arch resnet18" in error


def test_workdir_that_is_a_file_is_refused(tmp_path, capsys):
  (tmp_path / "runs").write_text("not a directory")
  assert f"--workdir {tmp_path / 'runs'} is a file" in cli_error(run_args(tmp_path), capsys)


def _garbage(path, content=b"\x80\x04 this is not a checkpoint"):
  path.write_bytes(content)
  return path


def _zero_variables(model, size):
  """Zeros in the shapes of ``model``'s variables (traced, never compiled or run): what a source that does not fit
  is refused for is its metadata or its shapes, not its values."""
  shapes = jax.eval_shape(lambda: models.init_variables(model, 0, size))
  return jax.tree.map(lambda shape: np.zeros(shape.shape, shape.dtype), shapes)


def _orbax_source(path, width, metadata=True):
  model = models.create_model(FAST["arch"], num_classes=10, width=width, small_stem=True)
  variables = _zero_variables(model, 8)
  if metadata:
    models.save_variables(path, variables, {"arch": FAST["arch"], "width": width, "small_stem": True})
  else:  # a plain orbax checkpoint: no metadata to compare, only the tensors
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.resolve(), variables)
    checkpointer.wait_until_finished()
    checkpointer.close()
  return path


def _resnet50_safetensors(path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  model = models.create_model("resnet50", num_classes=10, width=0.125)
  state_dict = models.to_torchvision(_zero_variables(model, 32), arch="resnet50", width=0.125)
  safetensors.numpy.save_file(state_dict, str(path))
  return path


@pytest.mark.parametrize("make_source,message", [
    (lambda d: _garbage(d / "weights.pth"),
     r"--source \S*weights.pth: (could not read .* weights_only=True|.*PyTorch)"),
    (lambda d: _garbage(d / "weights.safetensors"), r"--source \S*weights.safetensors: could not read .* safetensors"),
    (lambda d: _garbage(d / "weights.bin", b""), r"--source \S*weights.bin: could not read"),
    (lambda d: (d / "empty").mkdir() or d / "empty", r"--source \S*empty: not a readable orbax checkpoint"),
    (lambda d: _orbax_source(d / "wide", 0.25),
     r"--source \S*wide: the checkpoint's architecture does not match the run: width is 0.25 in the checkpoint "
     r"but 0.125 in the run"),
    (lambda d: _orbax_source(d / "wide-no-metadata", 0.25, metadata=False),
     rf"--source \S*wide-no-metadata: the checkpoint does not fit the run's {FAST['arch']} \(width 0.125.*"
     r"conv1/kernel is \(3, 3, 3, 16\), expected \(3, 3, 3, 8\)"),
    (lambda d: _resnet50_safetensors(d / "resnet50.safetensors"),
     rf"--source \S*resnet50.safetensors: checkpoint does not match {FAST['arch']}.*look like a resnet50"),
], ids=["garbage .pth", "garbage .safetensors", "empty .bin", "empty directory", "orbax of another width",
        "orbax without metadata of another width", "resnet50 .safetensors for the run's resnet"])
def test_unusable_source_checkpoint_exits_with_code_2_and_says_why(make_source, message, tmp_path, capsys):
  (tmp_path / "sources").mkdir()
  source = make_source(tmp_path / "sources")
  args = run_args(tmp_path) + ["--source", str(source)]
  assert re.search(message, cli_error(args, capsys), re.DOTALL)


def test_no_untrusted_file_is_unpickled():
  """Checkpoints are read with safetensors, orbax, or torch.load(weights_only=True); never pickle."""
  for path in (REPO / "dtnh_jax").rglob("*.py"):
    text = path.read_text()
    assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.MULTILINE), path
    for call in re.findall(r"torch\.load\([^)]*\)", text):
      assert "weights_only=True" in call, (path, call)
    assert "allow_pickle=True" not in text, path


# --- NaN/Inf -------------------------------------------------------------------------------------------------------


def _data_with_nan_batch(config, step, *shard):
  return data_with_nan_batches(config, {step}, *shard)


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def stopped_then_skipped(tmp_path_factory):
  """One run stopped by a NaN loss at step 3 and resumed as its message advises, skipping the step, with a checkpoint
  after every step: what the stop left (read before the resume) and the skipping run's checkpoints, shared by the
  stop test and the skipped-step test (one run and one resume instead of a run for each)."""
  workdir = tmp_path_factory.mktemp("stopped-then-skipped")
  config = TrainConfig.create(**{**FAST, "log_every": 5})  # found when the checkpoint of step 4 is due
  with pytest.raises(loop.NonFiniteLossError) as stop:
    loop.train(config, workdir, data=_data_with_nan_batch(config, 3))
  step, state, _, _ = newest_checkpoint(workdir)
  stopped = {"error": str(stop.value), "step": step, "finite": _all_finite(state), "last": run_metrics(workdir)[-1],
             "checkpoints": sorted(int(p) for p in os.listdir(workdir / "checkpoints"))}
  # the message's advice: the same run goes on from there, skipping the step (checkpoints are bookkeeping: one
  # after every step, all kept, to compare the states around the skipped step)
  with pytest.warns(RuntimeWarning) as warnings:
    loop.train(config.replace(on_nonfinite="skip", checkpoint_every=1, keep_checkpoints=10), workdir,
               data=_data_with_nan_batch(config, 3))
  return workdir, stopped, [str(w.message) for w in warnings if issubclass(w.category, RuntimeWarning)]


def test_nonfinite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(stopped_then_skipped):
  workdir, stopped, warnings = stopped_then_skipped
  assert re.search(r"step 3: the loss or the update is not finite.*newest checkpoint \(step 2\)", stopped["error"]), \
      stopped["error"]
  assert stopped["step"] == 2 and stopped["checkpoints"] == [2]
  assert stopped["finite"]
  last = stopped["last"]
  assert last["step"] == 3 and last["skipped"] == 1.0 and math.isnan(last["loss_empirical"])

  # the message's advice: the same run goes on from there, skipping the step
  assert any(re.search(r"step 3: .*skipped", warning) for warning in warnings), warnings
  assert [r["skipped"] for r in run_metrics(workdir) if r["kind"] == "train"] == [0, 0, 1, 0, 0, 0]


def test_cli_stops_on_a_nonfinite_loss_with_exit_code_1_and_the_step(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(grid, "load_data", lambda config, *shard: _data_with_nan_batch(config, 2, *shard))
  error = cli_error(run_args(tmp_path), capsys, code=1)
  assert "step 2: the loss or the update is not finite" in error and "--on-nonfinite skip" in error


def test_nonfinite_step_with_record_ends_the_run_recorded_as_diverged_at_chance_accuracy(tmp_path):
  config = TrainConfig.create(**{**FAST, "on_nonfinite": "record", "val_fraction": 0.25})
  data = _data_with_nan_batch(config, 3)
  with pytest.warns(RuntimeWarning, match=r"step 3: .*recorded as diverged at chance accuracy"):
    results = loop.train(config, tmp_path, data=data)
  assert results["diverged_at_step"] == 3
  assert results["test_accuracy"] == results["val_accuracy"] == 1 / data.num_classes
  assert results["test_loss"] is None and results["val_loss"] is None
  assert json.loads((tmp_path / "results.json").read_text()) == results
  # no step after the diverged one was trained, evaluated or checkpointed
  assert max(r["step"] for r in run_metrics(tmp_path)) == 3
  assert all(int(p) < 3 for p in os.listdir(tmp_path / "checkpoints"))
  # a finished run: the same command returns its record without training
  assert loop.train(config, tmp_path, data=data) == results


def test_a_grid_records_a_diverged_run_and_goes_on_to_the_next(tmp_path, capsys, monkeypatch):
  load_data = grid.load_data

  def seed_0_diverges(config, *shard):  # each seed draws its own split (--val-fraction): data per seed
    return _data_with_nan_batch(config, 2, *shard) if config.seed == 0 else load_data(config, *shard)

  monkeypatch.setattr(grid, "load_data", seed_0_diverges)
  args = run_args(tmp_path, on_nonfinite="record", val_fraction=0.25)
  args[args.index("--seeds") + 1] = "0,1"
  assert cli.train_main(args) == 0
  summary = json.loads((tmp_path / "runs" / "results.json").read_text())
  assert [r.get("diverged_at_step") for r in sorted(summary, key=lambda r: r["seed"])] == [2, None]
  assert "1 run(s) diverged" in (tmp_path / "runs" / "results.md").read_text()
  assert "at step 2" in capsys.readouterr().out


def test_skipped_nonfinite_step_leaves_params_optimizer_and_batch_stats_unchanged(stopped_then_skipped):
  workdir, _, warnings = stopped_then_skipped
  assert any(re.search(r"step 3: the loss or the update is not finite.*skipped", warning) for warning in warnings)
  before, skipped, after = (_checkpoint_at(workdir, step) for step in (2, 3, 4))
  for part in ("params", "opt_state", "batch_stats"):
    assert_trees_equal(skipped["state"][part], before["state"][part], part)
  # the step counter, the RNG and the data position advance as for any step
  assert skipped["state"]["step"] == before["state"]["step"] + 1
  assert skipped["data"]["step"] == before["data"]["step"] + 1
  assert not np.array_equal(skipped["state"]["rng"], before["state"]["rng"])
  assert not np.array_equal(after["state"]["params"]["fc"]["kernel"], skipped["state"]["params"]["fc"]["kernel"])
  assert _all_finite(after["state"])
  assert [r["skipped"] for r in run_metrics(workdir) if r["kind"] == "train"] == [0, 0, 1, 0, 0, 0]
