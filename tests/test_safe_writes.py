"""Saving never loses a user's data; damaged weights are refused, not used.

``save_variables`` (and so ``dtnh-convert`` and ``dtnh-train --export``)
writes only into a new or empty folder, or with ``force`` over a checkpoint
that dtnh_jax wrote, atomically; a failure leaves what was there. Loading
verifies the arrays' checksums; NaN/Inf weights are refused by name; a damaged
cache of an offline source is set aside and rebuilt.
"""

import functools
import glob
import os
import shutil
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from dtnh_jax import cli, models
from dtnh_jax.models import store
from dtnh_jax.train import TrainConfig, loop, sources
from dtnh_jax.train import config as config_lib
from dtnh_jax.train import presets
from helpers import assert_trees_equal

# A ResNet-18 at the offline problem's size: saves and loads in a fraction of a second.
# The offline problem's settings (see tests/test_faults.py), and its model.
FAST = presets.tiny()
TINY_MODEL = {key: FAST[key] for key in ("arch", "width", "small_stem")}
NAN_TENSOR = "params/layer1_0/conv1/kernel"


@functools.lru_cache(maxsize=None)
def _initialized_variables(seed):
  model = models.create_model(num_classes=10, **TINY_MODEL)
  return jax.tree.map(np.asarray, models.init_variables(model, seed, 8))


def _tiny_variables(seed=0):
  """The tiny model's variables of ``seed``: a copy of those initialized once per seed (~0.25 s each, called by
  most tests here)."""
  return jax.tree.map(np.copy, _initialized_variables(seed))


def _save(path, seed=0, **kwargs):
  variables = _tiny_variables(seed)
  models.save_variables(path, variables, TINY_MODEL, **kwargs)
  return variables


def _with_nan(variables, count=3):
  variables = jax.tree.map(np.copy, variables)
  kernel = variables["params"]["layer1_0"]["conv1"]["kernel"]
  kernel.reshape(-1)[:count] = np.nan
  return variables


def _flip_bytes_in_largest_array_file(checkpoint):
  files = glob.glob(os.path.join(checkpoint, "d", "*")) + glob.glob(
      os.path.join(checkpoint, "ocdbt.process_*", "d", "*"))
  largest = max(files, key=os.path.getsize)
  data = bytearray(open(largest, "rb").read())
  middle = len(data) // 2
  for i in range(middle, middle + 8):
    data[i] ^= 0xFF
  with open(largest, "wb") as f:
    f.write(bytes(data))


def _raw_orbax_restore(path):
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(os.path.abspath(path))
  finally:
    checkpointer.close()


def _cli_convert(argv, capsys):
  """(exit code, stderr) of dtnh-convert."""
  try:
    code = cli.convert_main([str(arg) for arg in argv])
  except SystemExit as exit_:
    code = exit_.code
  return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  """A full-size resnet18 .safetensors (random weights, made without torch): what dtnh-convert reads."""
  model = models.create_model("resnet18")
  shapes = jax.eval_shape(lambda: models.init_variables(model, 0, 64))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)
  path = tmp_path_factory.mktemp("src") / "resnet18.safetensors"
  safetensors.numpy.save_file(models.to_torchvision(variables, "resnet18"), str(path))
  return path


# --- a folder holding the user's files is never written to ----------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "--force"])
def test_convert_into_a_folder_with_user_files_is_refused_and_they_survive(tmp_path, capsys, resnet18_file,
                                                                             force):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "notes.txt").write_text("my thesis")
  code, err = _cli_convert([resnet18_file, dst] + (["--force"] if force else []), capsys)
  assert code == 2
  assert "notes.txt" in err and "choose a new" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert (dst / "notes.txt").read_text() == "my thesis"
  assert os.listdir(dst) == ["notes.txt"]


def test_convert_with_force_never_deletes_its_source_inside_the_target(tmp_path, capsys, resnet18_file):
  dst = tmp_path / "models"
  dst.mkdir()
  src = dst / "resnet18.safetensors"
  shutil.copy(resnet18_file, src)
  code, err = _cli_convert([src, dst, "--force"], capsys)
  assert code == 2 and "resnet18.safetensors" in err
  assert src.read_bytes() == resnet18_file.read_bytes()


def test_export_into_the_current_folder_with_user_files_is_refused(tmp_path, monkeypatch):
  """What ``dtnh-train --export .`` did: orbax's force removed the whole folder."""
  work = tmp_path / "work"
  work.mkdir()
  (work / "data.csv").write_text("1,2,3")
  monkeypatch.chdir(work)
  with pytest.raises(models.UnsafeTargetError, match="current folder"):
    _save(".", force=True)
  assert (work / "data.csv").read_text() == "1,2,3"


def test_save_over_a_file_or_a_folder_with_user_files_is_refused_naming_them(tmp_path):
  (tmp_path / "file").write_text("keep")
  with pytest.raises(models.UnsafeTargetError, match="is a file"):
    _save(tmp_path / "file", force=True)
  folder = tmp_path / "folder"
  folder.mkdir()
  for i in range(5):
    (folder / f"user{i}.txt").write_text(str(i))
  with pytest.raises(models.UnsafeTargetError, match=r"user0.txt, user1.txt, user2.txt, \.\.\. and 2 more"):
    _save(folder, force=True)
  assert (tmp_path / "file").read_text() == "keep"
  assert sorted(os.listdir(folder)) == [f"user{i}.txt" for i in range(5)]


def test_a_user_file_added_to_a_dtnh_jax_checkpoint_makes_it_not_replaceable(tmp_path):
  path = tmp_path / "ckpt"
  _save(path)
  (path / "d" / "mine.txt").write_text("mine")
  with pytest.raises(models.UnsafeTargetError, match="d/mine.txt"):
    _save(path, seed=1, force=True)
  assert (path / "d" / "mine.txt").read_text() == "mine"


# --- --force replaces a checkpoint that dtnh_jax wrote -------------------------------------------------------------


def test_force_replaces_a_dtnh_jax_checkpoint_and_the_new_one_loads(tmp_path, capsys, resnet18_file):
  dst = tmp_path / "out"
  _save(dst)
  code, err = _cli_convert([resnet18_file, dst], capsys)
  assert code == 2 and "pass --force to replace it" in err

  assert _cli_convert([resnet18_file, dst, "--force"], capsys)[0] == 0
  variables, metadata = models.load_variables(dst)
  assert metadata["num_classes"] == 1000 and metadata["width"] == 1.0
  expected = models.load_torchvision_checkpoint(resnet18_file, arch="resnet18")
  assert_trees_equal(jax.tree.map(np.asarray, variables), expected)
  assert os.listdir(tmp_path) == ["out"]  # no temporary folder left
  models.check_save_target(dst, force=True)  # still a checkpoint of ours


def test_save_into_an_empty_folder_or_a_new_path_is_fine(tmp_path):
  (tmp_path / "empty").mkdir()
  expected = _save(tmp_path / "empty")
  _save(tmp_path / "new" / "deeper")
  assert_trees_equal(models.load_variables(tmp_path / "empty")[0], expected)
  assert sorted(os.listdir(tmp_path)) == ["empty", "new"]


# --- a failed write leaves what was there -----------------------------------------------------------------------


def _fail_after_orbax_saves(monkeypatch):
  """orbax writes the whole checkpoint, then something fails."""
  save = ocp.StandardCheckpointer.save

  def save_then_fail(self, *args, **kwargs):
    save(self, *args, **kwargs)
    self.wait_until_finished()
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", save_then_fail)


def _fail_in_manifest(monkeypatch):
  def fail(folder):
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(store, "_write_manifest", fail)


@pytest.mark.parametrize("fail", [_fail_after_orbax_saves, _fail_in_manifest], ids=["orbax", "manifest"])
def test_a_failure_during_the_write_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch, fail):
  path = tmp_path / "ckpt"
  old = _save(path)
  fail(monkeypatch)
  with pytest.raises(OSError, match="simulated"):
    _save(path, seed=1, force=True)
  monkeypatch.undo()
  assert_trees_equal(models.load_variables(path)[0], old)
  assert os.listdir(tmp_path) == ["ckpt"]  # the temporary folder is gone


# --- a save killed outright leaves nothing behind for good ----------------------------------------------------------


def _dead_pid():
  """The pid of a process that has exited (and was waited for)."""
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True)
  return int(finished.stdout)


def _left_behind(parent, name, kind, pid, age_s=0.0, random="0badf00d"):
  """The folder a save of ``pid`` to ``parent/name`` killed by SIGKILL leaves: ``.NAME.dtnh-KIND-PID-RANDOM``."""
  folder = parent / f".{name}.dtnh-{kind}-{pid}-{random}"
  (folder / name / "d").mkdir(parents=True)
  (folder / name / "d" / "half-written").write_bytes(b"\0" * 64)
  if age_s:
    past = time.time() - age_s
    os.utime(folder, (past, past))
  return folder


def test_a_save_removes_the_temporary_folders_that_killed_saves_to_its_target_left(tmp_path):
  """Before: a SIGKILL during --export left .NAME.dtnh-tmp-PID-* next to the target forever; reruns added more."""
  dead = _left_behind(tmp_path, "ckpt", "tmp", _dead_pid())
  reused = _left_behind(tmp_path, "ckpt", "tmp", os.getppid(), age_s=10 * 365 * 86400)  # before its pid's process
  # a save of a live process, made since that process started
  running = _left_behind(tmp_path, "ckpt", "tmp", os.getppid(), random="5ca1ab1e")
  other_target = _left_behind(tmp_path, "other", "tmp", _dead_pid())
  (tmp_path / ".ckpt.mine").mkdir()  # not of that pattern: the user's
  expected = _save(tmp_path / "ckpt")
  assert_trees_equal(models.load_variables(tmp_path / "ckpt")[0], expected)
  assert not dead.exists() and not reused.exists()
  assert running.exists() and other_target.exists() and (tmp_path / ".ckpt.mine").is_dir()


def test_a_checkpoint_a_killed_save_had_moved_aside_is_put_back_before_the_next_save(tmp_path):
  """Killed between its two renames, a --force save left the old checkpoint hidden and none at the target."""
  _save(tmp_path / "aside", seed=3)
  dead = _dead_pid()
  os.rename(tmp_path / "aside", tmp_path / f".ckpt.dtnh-old-{dead}-abcd_123")
  with pytest.raises(models.UnsafeTargetError, match="pass --force"):  # the old checkpoint is back: not replaced
    _save(tmp_path / "ckpt")
  assert_trees_equal(models.load_variables(tmp_path / "ckpt")[0], _tiny_variables(seed=3))
  assert os.listdir(tmp_path) == ["ckpt"]


# --- --export never replaces the run's own source ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["the source", "inside it", "its parent"])
def test_export_onto_the_runs_own_source_is_refused_even_with_force(tmp_path, capsys, where):
  """Before: --source X --export X --force replaced the source checkpoint with the fine-tuned weights."""
  from helpers import cli_error, run_args  # pylint: disable=g-import-not-at-top
  source = tmp_path / "models" / "source"
  _save(source)
  export = {"the source": source, "inside it": source / "export", "its parent": source.parent}[where]
  before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
  error = cli_error(run_args(tmp_path) + ["--source", str(source), "--export", str(export), "--force"], capsys)
  assert len(error.strip().splitlines()) == 1 and "the export would replace the weights the run starts from" in error
  assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


# --- an unwritable target fails at once, in one line ------------------------------------------------------------


def test_unwritable_target_fails_fast_with_one_line(tmp_path, capsys, resnet18_file):
  (tmp_path / "a-file").write_text("not a folder")
  start = time.monotonic()
  code, err = _cli_convert([resnet18_file, tmp_path / "a-file" / "out"], capsys)
  assert time.monotonic() - start < 2.0
  assert code == 2 and "cannot write" in err and "a-file" in err
  assert len(err.strip().splitlines()) == 1
  assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes in read-only folders")
def test_read_only_parent_is_refused_at_once(tmp_path):
  parent = tmp_path / "read-only"
  parent.mkdir()
  parent.chmod(0o500)
  try:
    with pytest.raises(models.UnsafeTargetError, match="cannot write in .*Permission denied"):
      models.check_save_target(parent / "out")
  finally:
    parent.chmod(0o700)


# --- damaged checkpoints are recognized ---------------------------------------------------------------------------


def test_flipped_bytes_in_an_array_file_raise_corrupt_checkpoint_error(tmp_path):
  path = tmp_path / "ckpt"
  saved = _save(path)
  _flip_bytes_in_largest_array_file(path)
  try:
    raw = _raw_orbax_restore(path)
  except ValueError:  # orbax noticed (a decode error): load_variables must say so clearly
    expected = "cannot read the checkpoint"
  else:  # orbax did not notice: the values differ, and only the checksums tell
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(saved)))
    expected = "do not match the checksums saved with them \\((batch_stats|params)/"
  with pytest.raises(models.CorruptCheckpointError, match=expected) as info:
    models.load_variables(path)
  assert str(path) in str(info.value)
  assert len(str(info.value).splitlines()) == 1


def test_checkpoints_written_without_checksums_still_load(tmp_path):
  """Written as save_variables did before it stored checksums (a regression guard)."""
  variables = _tiny_variables()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "old"), variables, custom_metadata={"arch": "resnet18"})
  checkpointer.wait_until_finished()
  checkpointer.close()
  restored, metadata = models.load_variables(tmp_path / "old")
  assert_trees_equal(restored, variables)
  assert metadata == {"arch": "resnet18"}


# --- NaN/Inf weights are refused by name --------------------------------------------------------------------------


def _nan_orbax_source(path):
  models.save_variables(path, _with_nan(_tiny_variables()), TINY_MODEL)
  return path


def _nan_safetensors_source(path):
  state_dict = models.to_torchvision(_with_nan(_tiny_variables()), **TINY_MODEL)
  safetensors.numpy.save_file(state_dict, str(path))
  return path


@pytest.mark.parametrize("make_source", [lambda d: _nan_orbax_source(d / "ckpt"),
                                         lambda d: _nan_safetensors_source(d / "weights.safetensors")],
                         ids=["orbax", "safetensors"])
def test_nan_source_weights_are_refused_naming_the_tensor(tmp_path, make_source):
  source = make_source(tmp_path)
  with pytest.raises(config_lib.ConfigError,
                     match=f"--source {source}: tensor {NAN_TENSOR} holds 3 NaN/Inf values .*damaged"):
    sources.load_source(TrainConfig.create(**{**FAST, "source": str(source)}))


def test_convert_refuses_nan_source_weights(tmp_path, capsys, resnet18_file):
  state_dict = safetensors.numpy.load_file(str(resnet18_file))
  state_dict["layer1.0.conv1.weight"][0, 0, 0, :2] = np.inf
  src = tmp_path / "diverged.safetensors"
  safetensors.numpy.save_file(state_dict, str(src))
  code, err = _cli_convert([src, tmp_path / "out"], capsys)
  assert code == 2 and f"tensor {NAN_TENSOR} holds 2 NaN/Inf values" in err
  assert not os.path.exists(tmp_path / "out")


# --- a damaged cache of an offline source is set aside and rebuilt ------------------------------------------------


@pytest.fixture
def fast_offline_sources(tmp_path, monkeypatch):
  """Offline sources cached under tmp_path, "pre-trained" instantly; returns the seeds used, one per pre-training."""
  monkeypatch.setenv("DTNH_JAX_CACHE", str(tmp_path / "cache"))
  pretrainings = []

  def pretrain(config, workdir, *, export_to, **_):
    pretrainings.append(len(pretrainings))
    _save(export_to, seed=len(pretrainings))

  monkeypatch.setattr(loop, "train", pretrain)
  return pretrainings


def _garbage_metadata(path):
  (path / "_METADATA").write_text("{not json")


def _nan_weights(path):
  shutil.rmtree(path)  # the test's own file, rewritten with NaN weights
  models.save_variables(path, _with_nan(_tiny_variables()), TINY_MODEL)


@pytest.mark.parametrize("damage", [_flip_bytes_in_largest_array_file, _garbage_metadata, _nan_weights],
                         ids=["flipped bytes", "garbage metadata", "NaN weights"])
def test_corrupted_offline_cache_is_set_aside_and_rebuilt(tmp_path, monkeypatch, fast_offline_sources, damage):
  config = TrainConfig.create(**{**FAST, "source": "related"})
  sources.pretrain_sources(config, ["related"])
  (path,) = glob.glob(str(tmp_path / "cache" / "offline-sources" / "related-*"))
  damage(type(tmp_path)(path))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert sources.pretrain_sources(config, ["related"]) == {"related": path}
    variables = sources.load_source(config)
  messages = [str(w.message) for w in caught if "cached offline source" in str(w.message)]
  assert len(messages) == 1 and f"moved it to {path}.corrupt-1" in messages[0]
  assert len(messages[0].splitlines()) == 1
  assert fast_offline_sources == [0, 1]  # pre-trained again
  assert os.path.isdir(path + ".corrupt-1")  # kept, not deleted
  assert_trees_equal(variables, _tiny_variables(seed=2))
