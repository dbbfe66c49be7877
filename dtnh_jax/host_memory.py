"""Host memory that XLA:CPU frees, kept for its next execution instead of being mapped afresh each time.

XLA:CPU allocates the temporary buffers of each execution of a compiled program as one block (a ResNet-18
train step at 96x96, batch 16: 261 MB) with ``malloc`` on one of its worker threads, and frees it when the
execution ends. glibc serves a block that large, asked for on a thread other than the main one, with ``mmap``
and gives it back with ``munmap``: every step maps fresh pages, and the kernel zeroes each 4 KiB page the first
time the step touches it (64,000 page faults per step for that step). PyTorch's tensors are each below glibc's
mapping threshold and do not pay this; nor do steps whose temporaries stay below 32 MB (the offline study's).
The time it costs, and what each remedy below saves: ``benchmarks/RESULTS.md``, "Every step's memory mapped
afresh".

:func:`keep_freed_memory` sets glibc's allocator (``mallopt``) to serve every thread from the main heap
(``M_ARENA_MAX`` 1), never to map a block on its own (``M_MMAP_MAX`` 0) and to keep up to 2 GiB of freed
memory at the top of the heap (``M_TRIM_THRESHOLD``): the next execution reuses the pages the last one freed,
and a step faults in no page. The price is resident memory: the heap holds what the largest executions freed,
and in one heap other allocations can split a freed block so that the next one is placed above it. The heap
grows for the first few executions, then stays, at a size that varies from run to run: the ResNet-18 processes
above settled 120-420 MiB (10-35%) above their resident size without it, a program with 200 MB of temporaries
at 1.4 to 4.7 times its size without it. So it is not the default: call it where memory is plentiful, or set
``DTNH_JAX_KEEP_FREED_MEMORY=1`` for ``dtnh-train`` (which then calls it when JAX runs on the CPU).

It acts for the whole process, on every later allocation, and only where it is called before XLA's threads
first allocate, that is before the first JAX computation (a thread keeps the allocator's arena it first
used)::

  from dtnh_jax import host_memory
  host_memory.keep_freed_memory()   # before the first JAX computation
  import jax

The bounded alternative needs the environment set before Python starts: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(glibc 2.35 or later, transparent huge pages in ``madvise`` or ``always`` mode) backs the mapped blocks with
2 MiB pages: 500 page faults per step instead of 64,000 for the step above, resident memory as without.

This module imports no jax.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys
import warnings

__all__ = ["ENVIRONMENT_VARIABLE", "keep_freed_memory", "runs_on_cpu_only", "wanted"]

#: ``1`` makes ``dtnh-train`` call :func:`keep_freed_memory` when JAX runs on the CPU.
ENVIRONMENT_VARIABLE = "DTNH_JAX_KEEP_FREED_MEMORY"

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# the largest value mallopt takes (an int): freed memory up to 2 GiB stays in the heap
_KEEP_BYTES = 2**31 - 1
# JAX's plugins for GPUs and TPUs: with one installed, JAX's default backend is not the CPU
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")

_kept = False


def _jax_started() -> bool:
  """Whether JAX has created its backends (and so XLA:CPU its threads) in this process."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  if bridge is None:
    return False
  started = getattr(bridge, "backends_are_initialized", None)
  return bool(started()) if callable(started) else False


def keep_freed_memory() -> bool:
  """Sets glibc's ``malloc`` to keep freed memory for reuse (see the module's docstring); ``True`` if it did.

  ``False``, and nothing changed, on a C library other than glibc (macOS, musl) or when JAX has already
  started its backends in this process: then it also warns, since the threads that allocate XLA's buffers
  keep the arena they started with. Calling it again is harmless.
  """
  global _kept
  if _kept:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if _jax_started():
    warnings.warn("dtnh_jax.host_memory.keep_freed_memory() was called after JAX started its backends: XLA's "
                  "threads keep the memory arenas they started with, so nothing changed. Call it before the "
                  "first JAX computation (at the top of the script or notebook).", RuntimeWarning, stacklevel=2)
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
  # mallopt returns 1 on success. One arena: the threads XLA starts later take the main heap, whose blocks
  # are never mapped separately (M_MMAP_MAX 0; a thread's own arena maps a block this large regardless)
  done = all(libc.mallopt(parameter, value) == 1
             for parameter, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES)))
  _kept = done
  return done


def runs_on_cpu_only() -> bool:
  """Whether JAX will compute on the CPU, told without starting JAX: ``JAX_PLATFORMS`` is ``cpu``, or no plugin
  for a GPU or TPU is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(plugin) is not None for plugin in _ACCELERATOR_PLUGINS)


def wanted() -> bool:
  """Whether ``dtnh-train`` calls :func:`keep_freed_memory`: ``DTNH_JAX_KEEP_FREED_MEMORY=1`` and JAX runs on the
  CPU."""
  return os.environ.get(ENVIRONMENT_VARIABLE, "0").strip() == "1" and runs_on_cpu_only()
