"""Throughput of every method's train step, with and without DTNH, on one accelerator.

ResNet-18 (full width, torchvision layout) at 224x224, batch 48 (the paper's
setting), synthetic data and random source weights. For each method of the
paper's tables (fine-tuning, L2, L2-SP, KnowDist, DELTA, and DTNH of each
regularizer) the library's own jitted train step (``make_train_step``) is
compiled once and timed in blocks of ``--steps`` steps; a method and its DTNH
variant run in interleaved blocks, and ratios are medians of the per-block
ratios. DELTA's attention is a fixed random one (computed once before
fine-tuning, not part of the step).

The headline is DTNH(X) over X as usually written (``summed``: one
``value_and_grad`` of ``J + λΩ``, see ``train_step_overhead.py``), as in
``train_step_overhead.py``. The library's plain step is the one ``dtnh-train``
runs on the steps that log no angles (one backward pass of ``J + λΩ`` with the
library's NaN guard and metrics); DTNH over it is ``*_vs_plain``.

``--suite`` then runs the other benchmarks in the same process and adds their
JSON objects under their names: ``train_step`` (``train_step_overhead.py``,
every variant, at this run's size), ``transform`` (``transform_overhead.py``,
with every Gram strategy), ``aggregators`` (``aggregator_overhead.py``) and
``peer_torch`` (``peer_torch.py --check``: PyTorch on the same device; skipped,
and said so, where torch is not installed). ``--suite all`` is the one command
to run on the first GPU the project gets; a part that fails is recorded
(``{"error": ...}``) and the others still run; the exit status is 1 if any
failed.

Meant for a GPU: 13 compiles (9 with ``--no-summed``) and a few hundred steps,
sized to finish in under five minutes on an H100 (not yet run on one);
``--small`` runs the same code at a size a CPU finishes in a minute or two.
The last line printed is one JSON object: DTNH(X) over X under ``l2``,
``l2sp``, ``knowdist``, ``delta`` (absent with ``--no-summed``), DTNH over the
library's plain step under ``*_vs_plain``, images/s per method under
``images_per_s``.

    python benchmarks/gpu_check.py [--size 224 --batch 48 --steps 20 --rounds 5] [--no-summed]
    python benchmarks/gpu_check.py --suite all          # everything, one JSON line
    python benchmarks/gpu_check.py --small [--suite all]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_overhead as bench  # pylint: disable=g-import-not-at-top,wrong-import-position

from dtnh_jax import names  # pylint: disable=wrong-import-position
from dtnh_jax.train.config import ALL_METHODS, Method  # pylint: disable=wrong-import-position

#: JSON key of each regularizer's ratio.
RATIO_KEYS = {"l2": "l2", "l2-sp": "l2sp", "knowdist": "knowdist", "delta": "delta"}
#: Defaults of a run, and of a ``--small`` one (explicit flags win over both).
FULL = {"size": 224, "batch": 48, "width": 1.0, "steps": 20, "rounds": 5}
SMALL = {"size": 32, "batch": 4, "width": 0.125, "steps": 2, "rounds": 2}
#: The benchmarks ``--suite`` can add, in the order it runs them.
SUITE = ("train_step", "transform", "aggregators", "peer_torch")


def suite_arguments(part: str, args) -> tuple[str, list[str]]:
  """``(module, argv)`` of one ``--suite`` part at this run's sizes."""
  sizes = ["--size", str(args.size), "--batch", str(args.batch)]
  repeats = ["--repeats", str(max(args.rounds, 3))]
  if part == "train_step":
    return "train_step_overhead", sizes + ["--arch", args.arch, "--width", str(args.width)] + repeats
  if part == "transform":
    return "transform_overhead", ["--repeats", str(max(3 * args.rounds, 5)), "--gram", "all"]
  if part == "aggregators":
    return "aggregator_overhead", repeats
  # torchvision's ResNet-18 is full width: peer_torch has no --width
  return "peer_torch", sizes + repeats + ["--check"]


def run_suite(parts, args) -> dict:
  """Each part's JSON object under its name; a part that fails or cannot run says why instead."""
  results = {}
  for part in parts:
    module_name, argv = suite_arguments(part, args)
    print(f"\n== suite: {part}: python benchmarks/{module_name}.py {' '.join(argv)}", flush=True)
    try:
      module = __import__(module_name)
    except ImportError as error:  # peer_torch without torch
      results[part] = {"skipped": f"{module_name} cannot be imported: {error}"}
      print(f"suite: {part} skipped: {error}")
      continue
    try:
      results[part] = module.main(argv)
    except SystemExit as error:  # argparse, or a failed check (peer_torch exits 1)
      results[part] = {"error": f"exited with status {error.code}"}
    except Exception as error:  # pylint: disable=broad-except  # one part's failure must not lose the others
      traceback.print_exc()
      results[part] = {"error": f"{type(error).__name__}: {error}"}
  return results


def peak_device_mib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, help=f"image height and width (default: {FULL['size']})")
  parser.add_argument("--batch", type=int, help=f"batch size (default: {FULL['batch']})")
  parser.add_argument("--arch", default="resnet18", choices=names.ARCHITECTURES,
                      help="the ResNet (default: %(default)s)")
  parser.add_argument("--width", type=float, help="ResNet width multiplier (default: 1, full width)")
  parser.add_argument("--steps", type=int, help=f"steps per timed block (default: {FULL['steps']})")
  parser.add_argument("--rounds", type=int, help=f"timed blocks per method (default: {FULL['rounds']})")
  parser.add_argument("--methods", default="all",
                      help="comma-separated regularizers among fine-tune, l2, l2-sp, knowdist, delta (each is run "
                      "plain and, except fine-tune, with DTNH), or 'all' (default)")
  parser.add_argument("--summed", action=argparse.BooleanOptionalAction, default=True,
                      help="time each regularizer written as one value_and_grad of J + λΩ (one backward pass, "
                      "no DTNH; see train_step_overhead.py), the headline's baseline (default: on; 4 compiles)")
  parser.add_argument("--suite", default="",
                      help="comma-separated benchmarks to run after this one, among " + ", ".join(SUITE)
                      + ", or 'all' (default: none)")
  parser.add_argument("--small", action="store_true",
                      help="a CPU-sized smoke run; defaults become "
                      + ", ".join(f"--{k} {v}" for k, v in SMALL.items()))
  args = parser.parse_args(argv)
  for name, value in (SMALL if args.small else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  known = list(dict.fromkeys(m.regularizer for m in ALL_METHODS))
  chosen = known if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = sorted(set(chosen) - set(known))
  if unknown:
    parser.error(f"unknown method(s) {unknown}; choose among {', '.join(known)}")
  parts = list(SUITE) if args.suite == "all" else [p.strip() for p in args.suite.split(",") if p.strip()]
  if set(parts) - set(SUITE):
    parser.error(f"unknown --suite part(s) {sorted(set(parts) - set(SUITE))}; choose among {', '.join(SUITE)} "
                 "or 'all'")

  started = time.perf_counter()
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
  print(f"{args.arch} width {args.width:g}, {args.size}x{args.size} images, batch {args.batch}, "
        f"{args.rounds} interleaved blocks of {args.steps} steps per method")
  problem = bench.make_problem(args.size, args.batch, args.width, arch=args.arch)

  rows, images_per_s, ratios = [], {}, {}
  for regularizer in chosen:
    variants = ("plain",) if regularizer == "fine-tune" else ("plain", "dtnh") + (("summed",) if args.summed else ())
    steps = bench.build_steps(problem, regularizer, args, variants)
    # warm-up: first calls allocate and, on GPU, settle autotuned kernels
    times = bench.interleaved_times(steps, args.rounds, warmup=2, block=args.steps)
    for variant, step in steps.items():
      name = Method(regularizer, variant == "dtnh").name + (" (summed)" if variant == "summed" else "")
      seconds_per_step = float(np.median(times[variant]))
      images_per_s[name] = args.batch / seconds_per_step
      rows.append((name, images_per_s[name], 1e3 * seconds_per_step, step.stats.lower_s + step.stats.compile_s,
                   step.stats.memory.get("peak")))
    if "summed" in steps:
      ratios[RATIO_KEYS[regularizer]] = bench.median_ratio(times, "dtnh", "summed")
    if "dtnh" in steps:
      ratios[RATIO_KEYS[regularizer] + "_vs_plain"] = bench.median_ratio(times, "dtnh", "plain")
    print(f"{regularizer}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    del steps

  print(f"\n{'method':<20} {'images/s':>9} {'ms/step':>8} {'compile s':>10} {'XLA peak MiB':>13}")
  for name, ips, ms, compile_s, peak in rows:
    peak_text = f"{peak:13.0f}" if peak is not None else f"{'n/a':>13}"
    print(f"{name:<20} {ips:9.1f} {ms:8.2f} {compile_s:10.1f} {peak_text}")
  print("\nDTNH(X) step time over X (and over the library's plain X: _vs_plain; medians of per-block ratios): "
        + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
  peak = peak_device_mib()
  if peak is not None:
    print(f"device peak memory in use: {peak:.0f} MiB")
  result = {**ratios, "images_per_s": {k: round(v, 1) for k, v in images_per_s.items()},
            "device": device.device_kind, "platform": device.platform, "device_peak_mib": peak,
            "config": {k: getattr(args, k) for k in ("arch", "size", "batch", "width", "steps", "rounds")}}
  if parts:
    result["suite"] = run_suite(parts, args)
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(f"total {result['total_s']:.0f} s")
  print(json.dumps(result))
  failed = [part for part, value in result.get("suite", {}).items() if "error" in value]
  if failed:
    print(f"suite: failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
