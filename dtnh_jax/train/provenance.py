"""Where a result was computed: package versions, the jax backend and devices, the CPU, the commit.

Results differ slightly between machines (XLA:CPU's code depends on the CPU),
so every ``results.json`` carries this record, and a table quotes it: a
number is reproducible on the machine and versions it names, and within the
spread over seeds elsewhere.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import jax

__all__ = ["provenance"]

_PACKAGES = ("dtnh-jax", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy", "grain",
             "tensorflow-datasets")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _commit() -> str | None:
  """The git commit of the checkout dtnh_jax runs from (``+dirty`` with uncommitted changes), if it is one."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("+dirty" if dirty else "") if commit else None


@functools.cache
def provenance() -> dict[str, Any]:
  """``{"versions", "python", "backend", "devices", "cpu", "cpu_count", "commit"}`` of this process."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = jax.devices()
  return {"versions": versions, "python": platform.python_version(), "backend": jax.default_backend(),
          "devices": f"{len(devices)} x {devices[0].device_kind}", "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
          "commit": _commit()}
