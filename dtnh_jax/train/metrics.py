"""``metrics.jsonl``: one strict-JSON line per train step and per evaluation, and TensorBoard scalars.

Strict JSON: NaN and ±Inf, which strict readers (``jq``, JavaScript, Go)
reject, are written as ``null`` and named in the record's ``"nonfinite"``
entry, e.g. ``{"loss_empirical": null, ..., "nonfinite": {"loss_empirical":
"nan"}}`` (for a list-valued metric, a list with ``null`` where the value is
finite). :func:`read_metrics` puts the non-finite floats back.

On resume the lines after the checkpoint resumed from are dropped (the run
writes them again, identically); a line that cannot be read is reported and
moved to ``metrics.damaged.txt`` with its line number — it never cuts the
file short. So is a last line cut short (a kill, a full disk) unless its step
shows that it comes after the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from typing import Any

import numpy as np

from dtnh_jax.train.workdir import write_atomically

__all__ = [
    "DAMAGED",
    "decode",
    "encode",
    "FILE",
    "MetricsLog",
    "OtherProcessLog",
    "read_metrics",
]

FILE = "metrics.jsonl"
DAMAGED = "metrics.damaged.txt"


def _encode_value(value):
  """``(value with non-finite floats as None, their names or None)``."""
  if isinstance(value, list):
    encoded = [_encode_value(v) for v in value]
    values, marks = [v for v, _ in encoded], [m for _, m in encoded]
    return values, (marks if any(m is not None for m in marks) else None)
  if isinstance(value, float) and not math.isfinite(value):
    return None, str(value)  # "nan", "inf", "-inf"
  return value, None


def encode(record: dict[str, Any]) -> str:
  """One strict-JSON line for ``record`` (no NaN/Infinity tokens)."""
  out, nonfinite = {}, {}
  for key, value in record.items():
    out[key], mark = _encode_value(value)
    if mark is not None:
      nonfinite[key] = mark
  if nonfinite:
    out["nonfinite"] = nonfinite
  return json.dumps(out, allow_nan=False)


def _decode_value(value, mark):
  if isinstance(mark, list):
    return [_decode_value(v, m) for v, m in zip(value, mark)]
  return float(mark) if mark is not None else value


def decode(line: str) -> dict[str, Any]:
  """The record of one line; raises ValueError for a line that is not a metrics record."""
  record = json.loads(line)
  if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "kind" not in record:
    raise ValueError("not a metrics record")
  for key, mark in record.pop("nonfinite", {}).items():
    record[key] = _decode_value(record.get(key), mark)
  return record


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``; damaged lines are skipped with a warning naming them."""
  records, damaged = [], []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(decode(line))
      except ValueError:
        damaged.append(number)
  if damaged:
    warnings.warn(f"{path}: line(s) {', '.join(map(str, damaged[:10]))} cannot be read and were skipped.",
                  RuntimeWarning, stacklevel=2)
  return records


#: The step of a line cut short: ``encode`` writes ``"step"`` first.
_CUT_STEP = re.compile(r'\{"step": (\d+)[,}]')


def _kept_lines(path: str, resume_step: int) -> tuple[list[str], list[tuple[int, str]], bool]:
  """``(lines up to resume_step, damaged (number, line), whether anything else is dropped)``."""
  kept, damaged, dropped = [], [], False
  with open(path, errors="replace") as f:
    lines = f.readlines()
  for number, line in enumerate(lines, start=1):
    try:
      record = decode(line)
    except ValueError:
      cut_step = _CUT_STEP.match(line)
      if number == len(lines) and not line.endswith("\n") and cut_step and int(cut_step[1]) > resume_step:
        dropped = True  # the last line, cut short by a kill after the checkpoint: the run writes it again
      elif line.strip():  # a cut line of a step the run does not write again (a full disk) is damage too
        damaged.append((number, line))
      continue
    if record["step"] <= resume_step:
      kept.append(line if line.endswith("\n") else line + "\n")
    else:
      dropped = True
  return kept, damaged, dropped


class MetricsLog:
  """Appends records to ``workdir/metrics.jsonl`` (see the module's docstring) and TensorBoard."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, FILE)
    if os.path.exists(self.path):
      kept, damaged, dropped = _kept_lines(self.path, resume_step)
      if damaged:
        aside = os.path.join(workdir, DAMAGED)
        with open(aside, "a") as f:
          f.writelines(f"{FILE} line {number}: {line.rstrip(chr(10))}\n" for number, line in damaged)
        warnings.warn(f"{self.path}: {len(damaged)} damaged line(s) ({', '.join(str(n) for n, _ in damaged[:10])}) "
                      f"moved to {aside}; every other line is kept.", RuntimeWarning, stacklevel=2)
      if damaged or dropped:  # a kill while this runs leaves the old file or the new one
        write_atomically(self.path, "".join(kept))
    self._file = open(self.path, "a")
    self._tensorboard = None
    summary_writer = _summary_writer_class()
    if summary_writer is not None:
      self._tensorboard = summary_writer(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(encode(record) + "\n")
    if self._tensorboard is not None:
      for key, value in record.items():
        # non-finite values are in metrics.jsonl; tensorboardX would log a warning for each
        if key not in ("step", "kind") and np.ndim(value) == 0 and math.isfinite(value):
          self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

  def flush(self) -> None:
    self._file.flush()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def _summary_writer_class():
  """tensorboardX's ``SummaryWriter``, or None where tensorboardX is not installed.

  tensorboardX imports PyTorch when it is installed, only to accept its tensors (this log writes Python floats);
  that import would double a training process's start-up and hold PyTorch's memory. Unless PyTorch is already
  imported, tensorboardX is imported with PyTorch hidden (``sys.modules["torch"] = None`` makes ``import torch``
  raise ImportError, which tensorboardX handles), and PyTorch is importable again right after.
  """
  hide_torch = "tensorboardX" not in sys.modules and "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (optional)
  except ImportError:
    return None
  finally:
    if hide_torch and sys.modules.get("torch", ...) is None:
      del sys.modules["torch"]
  return SummaryWriter


class OtherProcessLog:
  """The metrics log of processes other than 0: process 0 writes the run's files."""

  def write(self, record: dict[str, Any]) -> None:
    del record

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass
