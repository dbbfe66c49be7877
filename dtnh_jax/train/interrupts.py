"""Ctrl-C and ``kill``: finish the step, save a checkpoint, stop with one line.

While a run trains, the first SIGINT or SIGTERM only raises a flag: the loop
finishes its step, writes a checkpoint (orbax completes the save, no
temporary folder is left) and raises :class:`Interrupted`, which the CLI
turns into one line and exit status 130 (SIGINT) or 143 (SIGTERM), as
shells expect. A second signal stops at once; the CLI's line then names the
newest checkpoint on disk (``dtnh_jax.train.checkpoint.newest_checkpoint``),
from which the run resumes (orbax's temporary folders are removed at the next
start).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = [
    "deferred",
    "Flag",
    "Interrupted",
    "raising",
    "SIGNALS",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A run stopped by SIGINT/SIGTERM; ``step``: the step its newest checkpoint holds (None before training)."""

  def __init__(self, signum: int, step: int | None = None):
    super().__init__(signum, step)
    self.signum, self.step = signum, step

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class Flag:
  """Set by the first signal while :func:`deferred` is active."""

  signum: int | None = None


@contextlib.contextmanager
def deferred() -> Iterator[Flag]:
  """Within: SIGINT/SIGTERM set ``flag.signum`` instead of stopping; a second signal raises at once.

  Signal handlers can only be installed from the main thread; elsewhere the
  signals keep their handlers (and the flag stays unset).
  """
  flag = Flag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    if flag.signum is not None:
      raise Interrupted(signum)
    flag.signum = signum

  previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
  try:
    yield flag
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


@contextlib.contextmanager
def raising() -> Iterator[None]:
  """Within: SIGTERM raises :class:`Interrupted` as SIGINT raises KeyboardInterrupt, so that ``finally``
  blocks run (Python's default for SIGTERM is to die on the spot)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    del frame
    raise Interrupted(signum)

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
