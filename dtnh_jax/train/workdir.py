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

And one rule keeps a user's own files safe: **only what dtnh_jax wrote is
replaced.** The summaries a command writes into a folder the user named
(a grid's ``results.md``, ``results.json``, ``provenance.json``, its figures;
a run's report) go through :func:`replace_ours`, which lists each file in the
folder's :data:`WRITTEN` before writing it and refuses one it did not list
(:func:`check_ours` says so before any training). It is the rule of exported
checkpoints (``dtnh_jax.models.store``'s manifest), for single files.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from dtnh_jax.train.config import ConfigError, RunConfig, TrainConfig

__all__ = [
    "BOOKKEEPING",
    "check_ours",
    "check_settings",
    "claim",
    "CONFIG",
    "differing_settings",
    "flag_text",
    "foreign_files",
    "Lock",
    "read_settings",
    "replace_ours",
    "RESULTS",
    "run_files",
    "SET_ASIDE",
    "set_aside",
    "set_aside_corrupt",
    "WorkdirBusyError",
    "write_atomically",
    "WRITTEN",
]

# Settings a run may resume with changed: TrainConfig's run group, which does not change its numbers
# (on_nonfinite: a run stopped by a NaN loss can go on with "skip"; fsdp, like the number of devices,
# only lays the state out differently: rounding-level differences).
BOOKKEEPING = frozenset(field.name for field in dataclasses.fields(RunConfig))

CONFIG = "config.json"
RESULTS = "results.json"
SET_ASIDE = "set-aside"
_LOCK = ".lock"
#: The file, in a folder dtnh_jax writes summaries to, that lists the files there that dtnh_jax wrote: those,
#: and only those, a later command may replace.
WRITTEN = "dtnh_jax_files.json"
_WRITTEN_FORMAT = "dtnh_jax files"


class WorkdirBusyError(ConfigError):
  """Another process holds the workdir's lock."""


def write_atomically(path: str, text: str | Callable[[str], None]) -> None:
  """Writes ``text`` to ``path`` so that a kill leaves the old file or the new one, never a part.

  ``text`` may also be a function that writes the file at the path it is given (a plot's ``savefig``): that
  path keeps ``path``'s extension. A failure removes the partial file and leaves ``path`` as it was.
  """
  folder, name = os.path.split(path)
  stem, extension = os.path.splitext(name)
  partial = os.path.join(folder, f".{stem}.tmp{os.getpid()}{extension}")
  try:
    if callable(text):
      text(partial)
    else:
      with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)
  except BaseException:
    try:
      os.unlink(partial)
    except OSError:
      pass
    raise


def _read_written(folder: str) -> set[str] | None:
  """The names :data:`WRITTEN` in ``folder`` lists; an empty set without the file; None for a file of that
  name that is not such a list (the user's, or damaged: then nothing there counts as ours)."""
  try:
    with open(os.path.join(folder, WRITTEN), encoding="utf-8") as f:
      listed = json.load(f)
  except FileNotFoundError:
    return set()
  except (OSError, ValueError):
    return None
  if not isinstance(listed, dict) or listed.get("format") != _WRITTEN_FORMAT or not isinstance(
      listed.get("files"), list):
    return None
  return {name for name in listed["files"] if isinstance(name, str)}


def foreign_files(folder: str, names: Iterable[str], ours: Callable[[str], bool] | None = None) -> list[str]:
  """Those of ``names`` that exist in ``folder`` and that dtnh_jax did not write there.

  A file is dtnh_jax's when :data:`WRITTEN` lists it, or (``ours``: a test for folders written before that
  list existed) when ``ours(path)`` holds and the folder has no such list yet. :data:`WRITTEN` itself counts
  as foreign when it is not such a list.
  """
  listed = _read_written(folder)
  present = [name for name in dict.fromkeys(names) if os.path.lexists(os.path.join(folder, name))]
  if listed is None:
    return ([WRITTEN] if os.path.lexists(os.path.join(folder, WRITTEN)) else []) + present
  legacy = not listed and ours is not None and not os.path.lexists(os.path.join(folder, WRITTEN))
  return [name for name in present
          if name not in listed and not (legacy and ours(os.path.join(folder, name)))]


def check_ours(folder: str, names: Iterable[str], ours: Callable[[str], bool] | None = None,
               what: str = "--workdir") -> None:
  """Refuses, in one line, to write ``names`` into ``folder`` when one of them is a file dtnh_jax did not write.

  Raises:
    ConfigError: names those files and what to do; nothing was written.
  """
  foreign = foreign_files(folder, names, ours)
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise ConfigError(f"{what} {folder} holds {shown}, which dtnh_jax did not write (not listed in its {WRITTEN}) "
                      "and will not replace; move them away, or choose another --workdir.")


def claim(folder: str, names: Iterable[str], ours: Callable[[str], bool] | None = None,
          what: str = "--workdir") -> None:
  """Lists ``names`` in ``folder``'s :data:`WRITTEN` (created if missing) after :func:`check_ours`: from now on
  they are dtnh_jax's to replace. A folder without that list gets the files ``ours`` recognizes listed too.

  Callers hold the folder's :class:`Lock` (two processes adding names at once would lose one).
  """
  names = list(names)
  check_ours(folder, names, ours, what)
  listed = _read_written(folder) or set()
  wanted = set(listed) | set(names)
  if not listed and ours is not None and os.path.isdir(folder):
    wanted |= {name for name in os.listdir(folder) if name != WRITTEN and ours(os.path.join(folder, name))}
  if wanted != listed:
    os.makedirs(folder, exist_ok=True)
    write_atomically(os.path.join(folder, WRITTEN), json.dumps(
        {"format": _WRITTEN_FORMAT, "version": 1, "files": sorted(wanted)}, indent=1) + "\n")


def replace_ours(folder: str, name: str, text: str | Callable[[str], None],
                 ours: Callable[[str], bool] | None = None, what: str = "--workdir") -> None:
  """Writes ``folder/name`` atomically (:func:`write_atomically`), unless a file there is not dtnh_jax's.

  The name is listed (:func:`claim`) before the file is written, so that a kill between the two leaves a list
  that names a file perhaps not written, never a file of ours that a later command would take for the user's.

  Raises:
    ConfigError: ``folder/name`` exists and dtnh_jax did not write it (see :func:`check_ours`).
  """
  claim(folder, [name], ours, what)
  write_atomically(os.path.join(folder, name), text)


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


def flag_text(name: str, value: Any) -> str:
  """The ``dtnh-train`` flag that sets setting ``name`` to ``value`` (``--steps 10``, ``--no-plots``)."""
  return _flag(name, value)


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


def set_aside_corrupt(path: str) -> str:
  """Renames the file or folder ``path``, which cannot be read, to the first free ``path.corrupt-N``: kept for a
  look, never deleted (a damaged summary, a damaged cached source). Returns the new path."""
  n = 1
  while True:
    aside = f"{path}.corrupt-{n}"
    if not os.path.lexists(aside):
      try:
        os.rename(path, aside)
        return aside
      except OSError:
        if not os.path.lexists(aside):  # not taken meanwhile: a real failure
          raise
    n += 1


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

  def acquire(self, wait: float = 0.0) -> "Lock":
    """Takes the lock; ``wait``: seconds to wait for another holder to release it before refusing.

    Raises:
      WorkdirBusyError: another process holds it (still, after ``wait``).
      ConfigError: the folder cannot be created or written.
    """
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    deadline = time.monotonic() + wait
    try:
      ancestor = os.path.abspath(self.workdir)
      while not os.path.isdir(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
      self._existing_ancestor = ancestor
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, ...
      raise ConfigError(f"--workdir: cannot create the directory {self.workdir} "
                        f"({error.strerror or error}).") from None
    attempts = 0
    while attempts < 10:  # the holder may remove the file between our open and our flock
      attempts += 1
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as error:
        raise ConfigError(f"--workdir {self.workdir}: cannot write in it ({error.strerror or error}).") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        busy = error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
        if busy and time.monotonic() < deadline:
          attempts = 0
          time.sleep(0.1)
          continue
        if busy:
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
