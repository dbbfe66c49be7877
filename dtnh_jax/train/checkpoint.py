"""Checkpoints of a run with orbax: train state, data-iterator position and run metadata.

Saves are asynchronous (training goes on while the previous checkpoint is
written) and the last ``keep`` are kept. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact (the temporary folder is removed at the
next start); a step folder that is corrupted or incomplete anyway is skipped
by :meth:`Checkpoints.restore`.

A save that fails (a full disk, a file-size limit: orbax's threads report it
at the next save, :meth:`Checkpoints.wait` or :meth:`Checkpoints.close`)
raises :class:`CheckpointWriteError`, one line naming the step folder, the OS
error and the newest complete checkpoint, which is kept; the failed save's
temporary folder is removed.

Every checkpoint also records a checksum of each array of the state and a
hash of the data position (``dtnh_jax.checksums``); a restore that does not
reproduce them (flipped bytes in a data file, say, which orbax reads without
complaint) is treated like an unreadable checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from dtnh_jax import checksums

__all__ = [
    "abstract",
    "CheckpointWriteError",
    "Checkpoints",
    "complete_steps",
    "newest_checkpoint",
]

# The file orbax writes into a step folder when the step is complete, last, before
# the atomic rename (orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE).
_COMMIT_MARKER = "commit_success.txt"
# A step's folder while orbax writes it (orbax.checkpoint._src.path.atomicity: TMP_DIR_SUFFIX, with or
# without a timestamp).
_TEMPORARY = re.compile(r"\d+\.orbax-checkpoint-tmp(-\d+)?")
# How tensorstore's errors carry the OS error: '... Failed to write ...: File too large [os_error_code=27]'.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code\W*(\d+)")


class CheckpointWriteError(Exception):
  """A checkpoint could not be written (a full disk, a file-size limit, ...); the earlier ones are kept.

  Attributes:
    step: the step whose checkpoint failed.
    kept_step: the newest complete checkpoint's step, or None.
  """

  def __init__(self, message: str, step: int, kept_step: int | None):
    super().__init__(message)
    self.step, self.kept_step = step, kept_step


class _FailedSaveLeftovers(logging.Filter):
  """asyncio's 'Task (or _GatheringFuture) exception was never retrieved' for the writes of an orbax save that
  failed: logged, one traceback each, when they are collected (often at exit), after :class:`CheckpointWriteError`
  said it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message.split("\n", 1)[0]:
      return True
    frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info and record.exc_info[2] else []
    return not ("orbax" in message or any("orbax" in frame.filename for frame in frames))


def _quiet_failed_save_leftovers() -> None:
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _FailedSaveLeftovers) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_FailedSaveLeftovers())
  # the write coroutines those tasks left behind, collected at exit
  warnings.filterwarnings("ignore", message="coroutine 'async_serialize", category=RuntimeWarning)


def _os_error(error: BaseException) -> str | None:
  """``"No space left on device (errno 28)"`` when ``error`` (or what caused it) is a storage failure, else None.

  Orbax raises the OSError of Python's writes, or the ValueError of tensorstore's, which names the errno.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno is not None:
      return f"{error.strerror or os.strerror(error.errno)} (errno {error.errno})"
    found = _TENSORSTORE_ERRNO.search(str(error))
    if found:
      number = int(found[1])
      return f"{os.strerror(number)} (errno {number})"
    error = error.__cause__ or error.__context__
  return None


class Checkpoints:
  """The checkpoints of one run, in ``workdir/checkpoints``."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    # before orbax's own clean-up below (a thread, which a folder removed under it would fail), which misses a
    # temporary folder whose save was cut before orbax wrote its metadata there
    self._remove_temporary_folders()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                             # the temporary folders of saves a kill interrupted
                                             cleanup_tmp_directories=True),
    )
    self._saving: int | None = None  # the step whose save may still be in flight
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, extra: dict[str, Any]) -> None:
    """Starts saving; returns before the files are written (see :meth:`wait`).

    ``extra`` (JSON) is stored with the checksums of ``state``'s arrays and the
    hash of ``data_state``, which :meth:`restore` verifies.

    Raises:
      CheckpointWriteError: this save, or the previous one, could not be written.
    """
    extra = {**extra, "checksums": checksums.tree_checksums(state), "data_sha256": _json_hash(data_state)}
    self.wait()  # a failure of the previous save is that step's
    self._saving = step
    with self._write_errors(step):
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(data_state),
              extra=ocp.args.JsonSave(extra),
          ),
          force=True,
      )

  def restore(self, abstract_state: Any) -> tuple[int, Any, Any, dict[str, Any]] | None:
    """The newest checkpoint that verifies, as ``(step, state, data_state, extra)``, or None.

    A checkpoint that cannot be read (corrupted, or half-written outside
    orbax's atomic rename: its step folder lacks orbax's commit marker) or
    whose arrays or data position differ from the checksums saved with them
    is skipped with a warning naming it, and the previous one is used. The
    skipped folder is moved to ``workdir/unreadable-checkpoints/`` (nothing is
    deleted), so that the resumed run can write that step again.
    """
    steps = self.all_steps()
    # Orbax (>= 0.11) writes the marker into every step folder it completes; without any,
    # this orbax does not write it and only readability counts.
    markers = any(os.path.exists(self._commit_marker(step)) for step in steps)
    unreadable = []
    try:
      for step in reversed(steps):
        if markers and not os.path.exists(self._commit_marker(step)):
          problem = f"it has no commit marker ({_COMMIT_MARKER}): it was not completely written"
        else:
          try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    extra=ocp.args.JsonRestore(),
                ),
            )
          except Exception as error:  # orbax raises many kinds for unreadable files
            problem = f"it is unreadable ({type(error).__name__}: {str(error)[:200]})"
          else:
            extra = dict(restored["extra"])
            problem = _verification_problem(restored["state"], restored["data"], extra)
            if problem is None:
              return step, restored["state"], restored["data"], extra
        unreadable.append(step)
        earlier = [s for s in steps if s < step]
        fallback = (f"falling back to the previous checkpoint (step {earlier[-1]})" if earlier
                    else "no earlier checkpoint: starting from the beginning")
        warnings.warn(f"checkpoint at step {step} in {self.directory}: {problem}; {fallback}.",
                      RuntimeWarning, stacklevel=2)
      return None
    finally:
      if unreadable:
        self._set_aside(unreadable)

  def _commit_marker(self, step: int) -> str:
    return os.path.join(self.directory, str(step), _COMMIT_MARKER)

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable step folders out of orbax's sight (kept for inspection)."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), "unreadable-checkpoints")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target, copy = os.path.join(aside, str(step)), 1
        while os.path.exists(target):
          target, copy = os.path.join(aside, f"{step}.{copy}"), copy + 1
        os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def wait(self) -> None:
    """Returns when the save in flight is written.

    Raises:
      CheckpointWriteError: it could not be written.
    """
    step, self._saving = self._saving, None
    if step is not None:
      with self._write_errors(step):
        self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight (raising :class:`CheckpointWriteError` if it fails) and closes."""
    try:
      if not self._failed:
        self.wait()
    finally:
      if self._failed:  # orbax raises the failure again on the way out: it was reported once
        with contextlib.suppress(Exception):
          self._manager.close()
      else:
        self._manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step: int):
    """A storage failure of the save of ``step`` as :class:`CheckpointWriteError`, its temporary folder removed."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except  # orbax wraps them in many types
      reason = _os_error(error)
      if reason is None:
        raise
      self._failed = True
      _quiet_failed_save_leftovers()
      self._remove_temporary_folders()
      kept = self._complete_steps()
      kept_text = (f"the newest complete checkpoint, step {kept[-1]}, is kept: make room and run the same "
                   "command to resume from it." if kept else
                   "no earlier checkpoint was written: make room and run the same command to start again.")
      raise CheckpointWriteError(f"could not write the checkpoint of step {step} to "
                                 f"{os.path.join(self.directory, str(step))}: {reason}; {kept_text}",
                                 step, kept[-1] if kept else None) from None

  def _complete_steps(self) -> list[int]:
    return complete_steps(self.directory)

  def _remove_temporary_folders(self) -> None:
    """Removes orbax's temporary folders of failed saves (only those: ``STEP.orbax-checkpoint-tmp...``)."""
    if jax.process_index() != 0:
      return
    for _ in range(5):  # a write of orbax's threads may still land in one: try again
      try:
        names = [name for name in os.listdir(self.directory) if _TEMPORARY.fullmatch(name)]
      except OSError:
        return
      if not names:
        return
      for name in names:
        with contextlib.suppress(OSError):  # removed meanwhile, or still written into: next round
          shutil.rmtree(os.path.join(self.directory, name))
      time.sleep(0.05)


def complete_steps(directory: str) -> list[int]:
  """The steps of the checkpoints folder ``directory`` that orbax completed (renamed into place, with its
  commit marker when this orbax writes one), oldest first."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  steps = sorted(int(name) for name in names if name.isdigit())
  marked = [step for step in steps if os.path.exists(os.path.join(directory, str(step), _COMMIT_MARKER))]
  return marked if marked else steps


def newest_checkpoint(workdir: str) -> tuple[str, int] | None:
  """``(run folder, step)`` of the most recently written complete checkpoint of the runs under ``workdir``
  (runs set aside and unreadable checkpoints left out), or None."""
  newest = None
  for folder, children, _ in os.walk(workdir):
    if os.path.basename(folder) == "checkpoints":
      children[:] = []  # not into the step folders
      steps = complete_steps(folder)
      if steps:
        step_dir = os.path.join(folder, str(steps[-1]))
        marker = os.path.join(step_dir, _COMMIT_MARKER)
        try:
          written = os.stat(marker if os.path.exists(marker) else step_dir).st_mtime_ns
        except OSError:
          continue
        if newest is None or written > newest[0]:
          newest = (written, os.path.dirname(folder), steps[-1])
    else:
      children[:] = [c for c in children if c not in ("set-aside", "unreadable-checkpoints", "tensorboard")]
  return None if newest is None else newest[1:]


def _json_hash(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _verification_problem(state: Any, data_state: Any, extra: dict[str, Any]) -> str | None:
  """Why a restored checkpoint is not what was saved, or None (also for checkpoints saved without checksums)."""
  if "checksums" in extra:
    differ = checksums.mismatches(state, extra["checksums"])
    if differ:
      more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
      return f"its arrays do not match their checksums ({', '.join(differ[:3])}{more}): its files are damaged"
  if "data_sha256" in extra and _json_hash(data_state) != extra["data_sha256"]:
    return "its data position does not match its hash: its files are damaged"
  return None


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding placeholders of ``tree`` for a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
