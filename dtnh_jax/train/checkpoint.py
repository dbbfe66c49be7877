"""Checkpoints of a run with orbax: train state, data-iterator position and run metadata.

Saves are asynchronous (training goes on while the previous checkpoint is
written) and the last ``keep`` are kept. Orbax writes each checkpoint to a
temporary folder and renames it when complete, so a run killed mid-save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """The checkpoints of one run, in ``workdir/checkpoints``."""

  def __init__(self, workdir: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, extra: dict[str, Any]) -> None:
    """Starts saving; returns before the files are written (see :meth:`wait`)."""
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
    """The newest readable checkpoint as ``(step, state, data_state, extra)``, or None.

    A checkpoint that cannot be read (corrupted, half-written by a killed
    process outside orbax's atomic rename) is skipped with a warning naming
    it, and the previous one is used.
    """
    for step in reversed(self.all_steps()):
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
        warnings.warn(
            f"checkpoint at step {step} in {self.directory} is unreadable ({type(error).__name__}: "
            f"{str(error)[:200]}); falling back to the previous checkpoint.", RuntimeWarning, stacklevel=2)
        continue
      return step, restored["state"], restored["data"], dict(restored["extra"])
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(tree: Any) -> Any:
  """Shape/dtype/sharding placeholders of ``tree`` for a restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
