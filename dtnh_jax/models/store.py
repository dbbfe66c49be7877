"""Saving and loading model variables (orbax) without ever losing a user's data.

A checkpoint written by :func:`save_variables` is a folder that orbax fills,
plus a small manifest, :data:`MANIFEST`, that lists every file and folder
dtnh_jax wrote there. The manifest is what lets a later save tell a
checkpoint of ours (which ``force=True`` may replace) from a folder of the
user's (which is never touched): orbax's own ``force`` removes a folder
recursively whatever it holds, so it is never used.

A save is all or nothing. Orbax writes into a new hidden sibling folder
(``.NAME.dtnh-tmp-<pid>-<random>``) that is renamed into place once complete;
an old checkpoint of ours is first renamed aside and removed only after the
new one is in place. A failure at any point leaves what was there before and
removes only the temporary folder. A save killed outright (SIGKILL, power
loss) cannot clean up: the next save to (or check of) the same path removes
the temporary folders it left, and puts back a checkpoint it had renamed aside
but not yet replaced (:func:`_clean_after_killed_saves`).

The custom metadata also holds checksums of the arrays
(:mod:`dtnh_jax.checksums`): orbax reads flipped bytes in a data file without
complaint, :func:`load_variables` does not.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import checksums
from dtnh_jax import names

__all__ = [
    "CorruptCheckpointError",
    "MANIFEST",
    "UnsafeTargetError",
    "check_finite",
    "check_save_target",
    "load_variables",
    "save_variables",
]

#: The file, in a checkpoint folder, that lists what dtnh_jax wrote there.
MANIFEST = "dtnh_jax_checkpoint.json"
_MANIFEST_FORMAT = "dtnh_jax variables"
# Key of the array checksums in orbax's custom metadata; load_variables drops
# it from the metadata it returns, so it is not a user's key.
_CHECKSUMS_KEY = "dtnh_jax_checksums"
# How many entries of a folder an error message names.
_MAX_NAMED = 3


class UnsafeTargetError(ValueError):
  """Saving to this path could delete or mix with data that is not ours."""


class CorruptCheckpointError(ValueError):
  """A checkpoint's files cannot be read, or do not hold what was saved."""


def _named(entries: list[str]) -> str:
  entries = sorted(entries)
  shown = ", ".join(entries[:_MAX_NAMED])
  if len(entries) > _MAX_NAMED:
    shown += f", ... and {len(entries) - _MAX_NAMED} more"
  return shown


def _read_manifest(folder: str) -> set[str] | None:
  """The entries the manifest of ``folder`` lists, or None without a valid one."""
  try:
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("format") != _MANIFEST_FORMAT:
      return None
    return set(manifest["entries"])
  except (OSError, ValueError, TypeError, KeyError, AttributeError):
    return None


def _foreign_entries(folder: str) -> list[str]:
  """What ``folder`` holds that dtnh_jax did not write (relative paths).

  Without a manifest, everything is foreign. A folder that is not listed is
  reported as a whole, not walked into.
  """
  listed = _read_manifest(folder)
  if listed is None:
    return os.listdir(folder)
  listed.add(MANIFEST)
  foreign = []
  for root, dirs, files in os.walk(folder):
    relative = os.path.relpath(root, folder)
    prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
    for name in list(dirs):
      if prefix + name + "/" not in listed:
        foreign.append(prefix + name + "/")
        dirs.remove(name)
    foreign += [prefix + name for name in files if prefix + name not in listed]
  return foreign


def _write_manifest(folder: str) -> None:
  """Lists every file and folder under ``folder`` (folders end with "/")."""
  entries = []
  for root, dirs, files in os.walk(folder):
    relative = os.path.relpath(root, folder)
    prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
    entries += [prefix + name + "/" for name in dirs] + [prefix + name for name in files]
  manifest = {"format": _MANIFEST_FORMAT, "version": 1, "entries": sorted(entries)}
  with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _nearest_existing(path: str) -> str:
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def _check_can_create_in(path: str, shown: str) -> None:
  """Creates and removes a folder where ``path``'s new folder would go.

  Permission bits alone do not tell (root ignores them; read-only mounts and
  full quotas do not show in them), so this really tries.
  """
  ancestor = _nearest_existing(os.path.dirname(path))
  if not os.path.isdir(ancestor):
    raise UnsafeTargetError(f"cannot write {shown}: {ancestor} is a file, not a folder; choose another path.")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.dtnh-probe-", dir=ancestor))
  except OSError as error:
    raise UnsafeTargetError(f"cannot write in {ancestor}: {error.strerror or error}; choose a folder you can "
                            "write to.") from None


def _process_start(pid: int) -> float | None:
  """When process ``pid`` started (seconds since the epoch), from Linux's /proc; None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, "starttime", after "pid (comm)"
    with open("/proc/stat", encoding="ascii") as f:
      boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def _left_by_a_dead_save(pid: int, modified: float) -> bool:
  """Whether a folder a save of process ``pid`` made, last modified at ``modified``, outlived that save: the
  process is gone, or it started after the folder was made (its pid was reused)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # alive, another user's
    pass
  started = _process_start(pid)
  return started is not None and modified < started - 1.0  # 1 s: /proc's clock ticks against file times


def _clean_after_killed_saves(real: str) -> None:
  """Removes the temporary folders a killed :func:`save_variables` to ``real`` left beside it
  (``.NAME.dtnh-tmp-PID-*``), and settles the checkpoint a killed save had renamed aside
  (``.NAME.dtnh-old-PID-*``): removed when a checkpoint is at ``real`` again, put back when none is. Only
  folders of that name whose process is gone (or started after them) are touched, and an aside folder only
  when its manifest lists all it holds: a running save, and anything not ours, are left alone."""
  parent, name = os.path.split(real)
  ours = re.compile(rf"\.{re.escape(name)}\.dtnh-(tmp|old)-(\d+)-[0-9a-z_]+")
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    match = ours.fullmatch(entry)
    if match is None:
      continue
    folder = os.path.join(parent, entry)
    try:
      info = os.lstat(folder)
    except OSError:
      continue
    if not stat.S_ISDIR(info.st_mode) or not _left_by_a_dead_save(int(match[2]), info.st_mtime):
      continue
    try:
      if match[1] == "tmp":
        shutil.rmtree(folder)
      elif _read_manifest(folder) is not None and not _foreign_entries(folder):
        if os.path.lexists(real):
          shutil.rmtree(folder)  # the checkpoint it replaced; the new one is in place
        else:
          os.rename(folder, real)  # killed between its two renames: what was there before, back in place
    except OSError:  # another process cleaning up at the same time, or no permission: left as it is
      continue


def check_save_target(path: str | os.PathLike, *, force: bool = False) -> None:
  """Refuses, before anything is computed or written, a path a save could harm.

  Fine: a path that does not exist, or an empty folder, where a new folder
  can be created; with ``force``, also a checkpoint that
  :func:`save_variables` wrote (its manifest lists everything there).

  First cleans up after a save to ``path`` that was killed
  (:func:`_clean_after_killed_saves`), so that its leftovers neither stay
  forever nor decide the outcome.

  Raises:
    UnsafeTargetError: ``path`` is a file, a folder holding anything dtnh_jax
      did not write, a checkpoint of ours without ``force``, the current
      folder, or somewhere no folder can be created. The message is one line
      and says what to do.
  """
  shown = os.fspath(path)
  real = os.path.realpath(shown)
  if os.path.dirname(real) == real:
    raise UnsafeTargetError(f"cannot save to {shown}: it is the root folder; choose a new folder.")
  _clean_after_killed_saves(real)
  try:
    cwd = os.path.realpath(os.getcwd())
  except OSError:  # the current folder was removed: it cannot be the target
    cwd = ""
  if cwd and cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
    raise UnsafeTargetError(f"cannot save to {shown}: it is (or holds) the current folder; choose a new folder.")
  if os.path.lexists(real):
    if not os.path.isdir(real):
      raise UnsafeTargetError(f"{shown} is a file; choose a new folder to save to (the file is left as it is).")
    try:
      foreign = _foreign_entries(real)
      empty = not foreign and not os.listdir(real)
    except OSError as error:
      raise UnsafeTargetError(f"cannot read the folder {shown}: {error.strerror or error}; choose a new "
                              "folder.") from None
    if foreign:
      ours = _read_manifest(real) is not None
      raise UnsafeTargetError(
          f"{shown} holds {'a dtnh_jax checkpoint and ' if ours else ''}files that dtnh_jax did not write "
          f"({_named(foreign)}); choose a new or empty folder (nothing there is deleted or replaced, "
          "--force or not).")
    if not empty and not force:
      raise UnsafeTargetError(f"{shown} holds a checkpoint that dtnh_jax wrote; pass --force to replace it "
                              "(force=True in Python), or choose a new folder.")
  _check_can_create_in(real, shown)


def check_finite(variables: Any, what: str) -> None:
  """Refuses variables holding NaN or Inf: damaged or diverged weights.

  Such weights load and run without complaint and only show as a NaN loss or
  chance accuracy much later; this names the tensor instead.

  Raises:
    ValueError: names the first tensor (in tree order, e.g.
      ``params/layer1_0/conv1/kernel``) with non-finite values, and how many.
  """
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
      continue
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue  # integers are always finite
    if isinstance(leaf, jax.Array):
      bad = int(jnp.count_nonzero(~jnp.isfinite(leaf)))
    else:
      bad = int(np.count_nonzero(~np.isfinite(leaf)))
    if bad:
      name = jax.tree_util.keystr(key_path, simple=True, separator="/")
      raise ValueError(f"{what}: tensor {name} holds {bad} NaN/Inf values (of {np.size(leaf)}); the "
                       "checkpoint is damaged or the training that wrote it diverged.")


def _orbax_save(path: str, variables: dict[str, Any], metadata: dict[str, Any]) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, variables, custom_metadata=metadata)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def _replace(new: str, real: str, shown: str) -> None:
  """Renames ``new`` to ``real``; a checkpoint of ours there is removed only once ``new`` is in place."""
  if not (os.path.isdir(real) and os.listdir(real)):
    os.rename(new, real)  # onto nothing or an empty folder
    return
  parent, name = os.path.split(real)
  old = tempfile.mkdtemp(prefix=f".{name}.dtnh-old-{os.getpid()}-", dir=parent)
  os.rename(real, old)  # onto the empty folder just made
  if _foreign_entries(old):  # something was added since check_save_target: not ours to remove
    os.rename(old, real)
    raise UnsafeTargetError(f"{shown} changed while saving and now holds files that dtnh_jax did not write; "
                            "choose a new folder.")
  try:
    os.rename(new, real)
  except BaseException:
    os.rename(old, real)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _from_process_0(values: list[int]) -> list[int]:
  """Process 0's ``values`` on every process (a collective, and so a barrier, with several processes).

  With several processes every one calls :func:`save_variables` (orbax's save
  is collective) but only process 0 checks the target and moves folders;
  the others follow its outcome instead of racing it on the shared folder.
  """
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [int(v) for v in multihost_utils.broadcast_one_to_all(np.asarray(values, dtype=np.int32))]


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any], *, force: bool = False) -> None:
  """Writes model variables and what is needed to rebuild the model (orbax).

  The variables go to an orbax ``StandardCheckpointer`` checkpoint at
  ``path``; ``metadata`` goes into the checkpoint's custom metadata. It must
  name the ``arch``; ``num_classes`` (from the head), ``width`` (1.0) and
  ``small_stem`` (False) are filled in when absent. Other JSON-serializable
  entries (e.g. the source file) are kept. Checksums of the arrays are stored
  too, and :func:`load_variables` verifies them.

  The write is atomic (see the module's docstring): a failure leaves what was
  at ``path`` before. With several processes, all call this (as orbax's
  save); process 0 checks the target and moves the folders.

  Args:
    path: folder of the checkpoint: new, empty, or (with ``force``) one that
      :func:`save_variables` wrote; missing parents are created.
    variables: ``{"params": ..., "batch_stats": ...}``.
    metadata: at least ``{"arch": ...}``.
    force: replace a checkpoint that dtnh_jax wrote at ``path``. A folder
      holding anything else is never replaced.

  Raises:
    ValueError: ``arch`` is missing or unknown, or metadata is not JSON.
    UnsafeTargetError: (a ValueError) see :func:`check_save_target`.
    OSError: the write itself failed (nothing at ``path`` changed).
  """
  metadata = dict(metadata)
  if metadata.get("arch") not in names.MODEL_ARCHITECTURES:
    raise ValueError(f"metadata must name an arch among "
                     f"{sorted(names.MODEL_ARCHITECTURES)}, got "
                     f"{metadata.get('arch')!r}.")
  if _CHECKSUMS_KEY in metadata:
    raise ValueError(f"metadata key {_CHECKSUMS_KEY!r} is reserved for the "
                     "checksums save_variables writes.")
  metadata.setdefault("num_classes",
                      int(np.shape(variables["params"]["fc"]["kernel"])[-1]))
  metadata.setdefault("width", 1.0)
  metadata.setdefault("small_stem", False)
  try:
    json.dumps(metadata)
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serializable: {e}") from e

  shown = os.fspath(path)
  real = os.path.realpath(shown)  # orbax wants absolute paths
  parent, name = os.path.split(real)
  primary = jax.process_index() == 0
  # Everything orbax writes (its own temporary folders too) stays in here.
  token = [os.getpid(), secrets.randbelow(2**31)]
  staging = os.path.join(parent, f".{name}.dtnh-tmp-{token[0]}-{token[1]:08x}")
  failure = None
  if primary:
    try:
      check_save_target(path, force=force)
      os.makedirs(parent, exist_ok=True)
      os.mkdir(staging)
    except (OSError, ValueError) as error:
      failure = error
  ok, *token = _from_process_0([failure is None, *token])
  if failure is not None:
    raise failure
  if not ok:
    raise UnsafeTargetError(f"process 0 refused to save to {shown} (its error says why).")
  staging = os.path.join(parent, f".{name}.dtnh-tmp-{token[0]}-{token[1]:08x}")

  variables = {key: variables[key] for key in variables}
  metadata[_CHECKSUMS_KEY] = checksums.tree_checksums(variables)
  new = os.path.join(staging, name)
  try:
    try:
      _orbax_save(new, variables, metadata)
      if primary:
        _write_manifest(new)
        _replace(new, real, shown)
    except Exception as error:  # pylint: disable=broad-except
      failure = error
    if not _from_process_0([failure is None])[0] and failure is None:
      raise OSError(f"process 0 could not write {shown} (its error says why); nothing there changed.")
    if failure is not None:
      raise failure
  finally:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def load_variables(path: str | os.PathLike, target: Any = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a checkpoint written by :func:`save_variables`.

  Args:
    path: directory of the checkpoint.
    target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` (with
      shardings) to restore into, as orbax's ``restore(target)``; default:
      host arrays.

  Returns:
    ``(variables, metadata)``; ``model_from_metadata(metadata)`` rebuilds the
    model that ``variables`` belong to.

  Raises:
    FileNotFoundError: no folder at ``path``.
    CorruptCheckpointError: (a ValueError) orbax cannot read the folder, or
      the arrays read do not match the checksums saved with them (checkpoints
      written before checksums were stored are not checked); names the path
      and the arrays.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path!r}.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = dict(checkpointer.metadata(path).custom_metadata or {})
    variables = checkpointer.restore(path, target)
  except MemoryError:
    raise
  except Exception as error:  # tensorstore and orbax raise many types, with long messages
    raise CorruptCheckpointError(
        f"cannot read the checkpoint at {path!r} ({type(error).__name__}: {_first_line(error)}): it is not an "
        "orbax checkpoint, its files are damaged or incomplete, or it does not fit the target; write it "
        "again.") from error
  finally:
    checkpointer.close()
  expected = metadata.pop(_CHECKSUMS_KEY, None)
  if expected is not None:
    differ = checksums.mismatches(variables, expected)
    if differ and target is not None:
      # a target of another dtype or a part of the tree: only what was restored as saved can be compared
      actual = checksums.tree_checksums(variables)
      same_layout = lambda name: (name in actual and name in expected
                                  and actual[name].split()[:2] == expected[name].split()[:2])
      differ = [name for name in differ if same_layout(name)]
    if differ:
      raise CorruptCheckpointError(
          f"the arrays of the checkpoint at {path!r} do not match the checksums saved with them "
          f"({_named(differ)}): its files are damaged; write it again from its source.")
  return variables, metadata
