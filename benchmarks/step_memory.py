"""What a train step costs the operating system: page faults, kernel time and resident memory per step.

    python benchmarks/step_memory.py [--size 96] [--batch 16] [--width 1] [--arch resnet18] [--steps 10]
    DTNH_JAX_KEEP_FREED_MEMORY=1 python benchmarks/step_memory.py          # with dtnh_jax.host_memory's setting
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/step_memory.py  # mapped blocks in 2 MiB pages

Builds ``train_step_overhead``'s step of one method (``step_profile.py``'s, L2-SP summed unless ``--regularizer``
and ``--variant``), runs ``--warmup`` steps, then ``--steps`` steps counted with ``resource.getrusage``: minor
page faults, user and kernel (system) CPU seconds per step, and the wall time per step; the resident memory
after them (``/proc/self/statm``) and its peak. XLA:CPU maps each execution's temporaries afresh unless
``dtnh_jax.host_memory.keep_freed_memory`` was called first (``DTNH_JAX_KEEP_FREED_MEMORY=1``, which
``train_step_overhead`` reads), so the faults per step are about the temporaries' size in 4 KiB pages. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

import step_profile
import train_step_overhead as bench


def resident_mib() -> float:
  """This process's resident memory now, MiB (Linux's ``/proc/self/statm``; ``ru_maxrss``'s peak elsewhere)."""
  try:
    with open("/proc/self/statm") as statm:
      return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  step_profile.add_step_arguments(parser)
  parser.add_argument("--warmup", type=int, default=3, help="steps run first, not counted (default: 3)")
  parser.add_argument("--steps", type=int, default=10, help="steps counted (default: %(default)s)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  step = step_profile.build_step(args)
  step(max(args.warmup, 1))   # the first step compiles nothing (build_step did) but allocates the state's buffers
  before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  step(args.steps)
  wall = time.perf_counter() - started
  after = resource.getrusage(resource.RUSAGE_SELF)
  per_step = lambda name: (getattr(after, name) - getattr(before, name)) / args.steps
  result = {"minor_faults_per_step": per_step("ru_minflt"), "system_s_per_step": round(per_step("ru_stime"), 4),
            "user_s_per_step": round(per_step("ru_utime"), 4), "wall_ms_per_step": round(wall / args.steps * 1e3, 1),
            "resident_mib": round(resident_mib(), 1),
            "peak_resident_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "config": vars(args) | {"keeps_freed_memory": bench.KEEPS_FREED_MEMORY,
                                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                                    "jax": jax.__version__, "platform": jax.default_backend()}}
  print(f"jax {jax.__version__} on {jax.default_backend()}; {args.arch} width {args.width:g}, {args.size}x{args.size}, "
        f"batch {args.batch}, {args.regularizer} {args.variant}; freed memory kept: {bench.KEEPS_FREED_MEMORY}")
  print(f"per step: {result['minor_faults_per_step']:.0f} minor page faults, {result['system_s_per_step']:.3f} s "
        f"kernel + {result['user_s_per_step']:.3f} s user CPU, {result['wall_ms_per_step']:.1f} ms wall; resident "
        f"{result['resident_mib']:.0f} MiB (peak {result['peak_resident_mib']:.0f})")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
