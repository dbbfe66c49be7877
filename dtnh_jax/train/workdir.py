"""A run's working directory: one run per folder, its settings, and setting an old run aside.

Three rules keep a user's runs safe:

- **One process per workdir.** :class:`Lock` holds an advisory ``flock`` on
  ``WORKDIR/.lock`` (which names the holder's pid and host); the kernel
  releases it when the holder dies, so a stale lock never blocks anyone. A
  second ``dtnh-train`` on the same folder stops with the holder's name.
- **One run per workdir.** ``config.json`` records the run's settings; a
  command with other settings is refused with the flags that differ
  (:func:`check_settings`), unless ``--restart`` sets the old run aside.
- **Nothing is deleted.** :func:`set_aside` moves an old run's files to
  ``WORKDIR/set-aside/N/``; files are replaced atomically (:func:`write_atomically`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import time
from typing import Any

from dtnh_jax.train.config import ConfigError, RunConfig, TrainConfig

__all__ = [
    "BOOKKEEPING",
    "check_settings",
    "CONFIG",
    "differing_settings",
    "Lock",
    "read_settings",
    "RESULTS",
    "run_files",
    "SET_ASIDE",
    "set_aside",
    "WorkdirBusyError",
    "write_atomically",
]

# Settings a run may resume with changed: TrainConfig's run group, which does not change its numbers
# (on_nonfinite: a run stopped by a NaN loss can go on with "skip"; fsdp, like the number of devices,
# only lays the state out differently: rounding-level differences).
BOOKKEEPING = frozenset(field.name for field in dataclasses.fields(RunConfig))

CONFIG = "config.json"
RESULTS = "results.json"
SET_ASIDE = "set-aside"
_LOCK = ".lock"


class WorkdirBusyError(ConfigError):
  """Another process holds the workdir's lock."""


def write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that a kill leaves the old file or the new one, never a part."""
  partial = f"{path}.tmp{os.getpid()}"
  with open(partial, "w") as f:
    f.write(text)
  os.replace(partial, path)


def read_settings(workdir: str) -> dict[str, Any] | None:
  """The settings of the run in ``workdir`` (its ``config.json``), or None when it holds none."""
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path) as f:
      settings = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as error:
    raise ConfigError(f"--workdir {workdir}: cannot read {CONFIG} ({error}); it is damaged. Pass --restart to "
                      "set that run aside and start anew, or use a new --workdir.") from None
  if not isinstance(settings, dict):
    raise ConfigError(f"--workdir {workdir}: {CONFIG} does not hold settings. Pass --restart to set it aside.")
  return settings


def _flag(name: str, value: Any) -> str:
  flag = "--" + name.replace("_", "-")
  if isinstance(value, bool):
    return flag if value else "--no-" + flag[2:]
  if isinstance(value, (list, tuple)):
    value = ",".join(map(str, value))
  return f"{flag} {value}"


def differing_settings(previous: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
  """``(name, previous value, new value)`` for every setting that changes a run's numbers."""
  current = json.loads(config.to_json())
  defaults = json.loads(TrainConfig().to_json())  # a setting added after the run started has its default there
  return [(name, previous.get(name, defaults.get(name)), current[name]) for name in sorted(current)
          if name not in BOOKKEEPING and previous.get(name, defaults.get(name)) != current[name]]


def check_settings(workdir: str, config: TrainConfig, previous: dict[str, Any] | None) -> None:
  """Refuses to resume the run in ``workdir`` with settings that would change its numbers."""
  if previous is None:
    return
  differs = differing_settings(previous, config)
  if differs:
    shown = "; ".join(f"{_flag(name, new)} (the run there has {_flag(name, old)})" for name, old, new in differs)
    raise ConfigError(
        f"--workdir {workdir} holds a run with other settings: {shown}. Resuming it with these would mix two "
        f"runs. Either use a new --workdir, or pass --restart to set that run aside (moved to "
        f"{os.path.join(workdir, SET_ASIDE, 'N')}, nothing is deleted) and start anew.")


def run_files(workdir: str) -> list[str]:
  """What a run left in ``workdir`` (everything but the lock and the runs already set aside)."""
  try:
    return sorted(name for name in os.listdir(workdir) if name not in (_LOCK, SET_ASIDE))
  except FileNotFoundError:
    return []


def set_aside(workdir: str) -> str | None:
  """Moves the run in ``workdir`` to ``workdir/set-aside/N`` (N = 1, 2, ...); returns that folder."""
  names = run_files(workdir)
  if not names:
    return None
  parent = os.path.join(workdir, SET_ASIDE)
  os.makedirs(parent, exist_ok=True)
  number = 1 + max((int(n) for n in os.listdir(parent) if n.isdigit()), default=0)
  target = os.path.join(parent, str(number))
  os.makedirs(target)
  for name in names:  # each a rename on one file system: nothing is copied or lost
    os.replace(os.path.join(workdir, name), os.path.join(target, name))
  return target


@dataclasses.dataclass
class Lock:
  """An advisory lock on a workdir, held by one process at a time (a context manager).

  ``flock`` is released by the kernel when its holder exits or dies, so a lock
  file left behind by a killed run is simply taken over. The file names the
  holder (pid, host, start time) for the message of the process refused.
  """

  workdir: str
  _fd: int | None = None
  _existing_ancestor: str | None = None  # the nearest folder that existed before acquire()

  @property
  def path(self) -> str:
    return os.path.join(self.workdir, _LOCK)

  def acquire(self) -> "Lock":
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    try:
      ancestor = os.path.abspath(self.workdir)
      while not os.path.isdir(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
      self._existing_ancestor = ancestor
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, ...
      raise ConfigError(f"--workdir: cannot create the directory {self.workdir} "
                        f"({error.strerror or error}).") from None
    for _ in range(10):  # the holder may remove the file between our open and our flock
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as error:
        raise ConfigError(f"--workdir {self.workdir}: cannot write in it ({error.strerror or error}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise WorkdirBusyError(
              f"--workdir {self.workdir} is in use by another dtnh-train ({holder}). Wait for it to finish or "
              "stop it, or use another --workdir.") from None
        raise ConfigError(f"--workdir {self.workdir}: cannot lock {self.path} ({error.strerror or error}).") from None
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if same_file:
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return self
      os.close(fd)  # locked a file its holder had just removed: try the new one
    raise WorkdirBusyError(f"--workdir {self.workdir}: could not take its lock {self.path}; is another "
                           "dtnh-train starting and stopping there?")

  def release(self, *, remove_empty_workdir: bool = False) -> None:
    """Releases the lock; ``remove_empty_workdir``: also the folders :meth:`acquire` created, if empty."""
    import fcntl  # pylint: disable=g-import-not-at-top
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still held: nobody can be between our unlink and unlock with the old file
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    folder = os.path.abspath(self.workdir)
    while remove_empty_workdir and folder != self._existing_ancestor and self._existing_ancestor is not None:
      try:
        os.rmdir(folder)  # only an empty folder: anything written there since stays
      except OSError:
        break
      folder = os.path.dirname(folder)

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that has not written its name yet"
