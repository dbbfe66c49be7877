"""Checkpoints of a run with orbax: train state, data-iterator position and run metadata.

Saves are asynchronous (training goes on while the previous checkpoint is
written) and the last ``keep`` are kept. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact (the temporary folder is removed at the
next start); a step folder that is corrupted or incomplete anyway is skipped
by :meth:`Checkpoints.restore`.

Every checkpoint also records a checksum of each array of the state and a
hash of the data position (``dtnh_jax.checksums``); a restore that does not
reproduce them (flipped bytes in a data file, say, which orbax reads without
complaint) is treated like an unreadable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from dtnh_jax import checksums

__all__ = [
    "abstract",
    "Checkpoints",
]

# The file orbax writes into a step folder when the step is complete, last, before
# the atomic rename (orbax.checkpoint._src.path.atomicity_types.COMMIT_SUCCESS_FILE).
_COMMIT_MARKER = "commit_success.txt"


class Checkpoints:
  """The checkpoints of one run, in ``workdir/checkpoints``."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                             # the temporary folders of saves a kill interrupted
                                             cleanup_tmp_directories=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, extra: dict[str, Any]) -> None:
    """Starts saving; returns before the files are written (see :meth:`wait`).

    ``extra`` (JSON) is stored with the checksums of ``state``'s arrays and the
    hash of ``data_state``, which :meth:`restore` verifies.
    """
    extra = {**extra, "checksums": checksums.tree_checksums(state), "data_sha256": _json_hash(data_state)}
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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
