"""The JAX/PyTorch gap on a CPU under each XLA:CPU option this jax exposes: ``peer_torch.py`` once per option.

Each option runs ``peer_torch.py --check`` in its own process with the option
appended to ``XLA_FLAGS`` (XLA reads its flags once, at start-up), so every
row's JAX/PyTorch ratios are measured against a PyTorch step in the same
process, interleaved (PyTorch's side does not read ``XLA_FLAGS``: it is the
reference that stays put). ``--check`` compares both frameworks' updates from
the same weights first: an option that changes the numbers beyond float32
noise shows it there (``check``: the largest relative difference of JAX's
updates to PyTorch's), and an option XLA rejects is recorded with its error.

The options (:data:`OPTIONS`), as ``XLA_FLAGS`` of jax 0.10 lists them:

- ``baseline``: none.
- ``onednn``: ``--xla_cpu_use_onednn=true``, "call oneDNN thunks for matmul
  and convolution fusions" (what PyTorch's CPU convolutions use).
- ``no_xnnpack``: ``--xla_cpu_use_xnnpack=false`` (XNNPACK is on by default).
- ``xnn_fusions``: ``--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce``.
- ``xnn_graph``: ``--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY``.
- ``exact_math``: ``--xla_cpu_enable_platform_dependent_math=false`` (on by
  default: "faster code at the expense of consistent results across CPUs").
  With it on, JAX's one-step L2-SP update at 96x96/16 is 1.5e-3 (relative)
  from PyTorch's; off, 1.0e-5, PyTorch's own distance from float64
  (measured 2026-12-02 with ``peer_torch.py --check-only``).
- ``fast_math``: ``--xla_cpu_enable_fast_math=true``: unsafe by its own
  description (NaN/Inf semantics, reassociation); measured to know its worth,
  never a default: the NaN guard of the train step relies on ``isfinite``.

The last line printed is one JSON object: per option, ``check`` (largest
difference, or ``error``), ``jax_vs_torch`` and ``dtnh_vs_plain`` as
``peer_torch.py`` reports them.

    python benchmarks/xla_options.py [--options all] [--size 96 --batch 16 --repeats 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OPTIONS = {
    "baseline": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_fusions": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "exact_math": "--xla_cpu_enable_platform_dependent_math=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch.py")


def run_option(flag: str, peer_args: list[str], timeout_s: float) -> dict:
  """``peer_torch.py``'s JSON under ``flag``, or ``{"error": ...}`` with the end of its output."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flag]))
  try:
    process = subprocess.run([sys.executable, PEER, *peer_args], env=env, capture_output=True, text=True,
                             timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  lines = process.stdout.strip().splitlines()
  try:
    result = json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    return {"error": f"exit status {process.returncode}: {(process.stderr or process.stdout)[-600:].strip()}"}
  if process.returncode != 0:
    result["error"] = f"exit status {process.returncode} (the check failed)"
  return result


def summary(result: dict) -> dict:
  if "jax_vs_torch" not in result:
    return {"error": result.get("error", "no result")}
  worst = max(d["update"] for checked in result.get("check", {}).values() for name, d in checked.items()
              if name.startswith("jax "))
  return {"check": worst, "check_ok": result.get("check_ok"), "jax_vs_torch": result["jax_vs_torch"],
          "dtnh_vs_plain": {"jax": result["dtnh_vs_plain"]["jax"], "torch": result["dtnh_vs_plain"]["torch"]},
          "ms": result["ms"], **({"error": result["error"]} if "error" in result else {})}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--options", default="all", help="comma-separated among " + ", ".join(OPTIONS) + ", or all")
  parser.add_argument("--size", type=int, default=96)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=6)
  parser.add_argument("--regularizers", default="l2sp,knowdist")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per option (default: %(default)s)")
  args = parser.parse_args(argv)
  names = list(OPTIONS) if args.options == "all" else [n for n in args.options.split(",") if n]
  if set(names) - set(OPTIONS):
    parser.error(f"unknown option(s) {sorted(set(names) - set(OPTIONS))}; known: {', '.join(OPTIONS)}")
  peer_args = ["--size", str(args.size), "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--regularizers", args.regularizers, "--jax-variants", "summed,dtnh", "--check"]
  print(f"peer_torch.py {' '.join(peer_args)}, once per option", flush=True)
  started = time.perf_counter()
  results = {}
  for name in names:
    begun = time.perf_counter()
    results[name] = summary(run_option(OPTIONS[name], peer_args, args.timeout))
    status = results[name].get("error") or f"check {results[name]['check']:.1e}"
    print(f"{name}: {status} ({time.perf_counter() - begun:.0f} s)", flush=True)
  keys = sorted({k for r in results.values() for k in r.get("jax_vs_torch", {})})
  print("\nJAX step / PyTorch step (medians of per-round ratios; summed: X as usually written in JAX; dtnh_*: the "
        "library's DTNH step against PyTorch's DTNH)")
  print(f"{'option':<12} {'check':>8} " + " ".join(f"{k:>16}" for k in keys))
  for name, r in results.items():
    if "jax_vs_torch" not in r:
      print(f"{name:<12} {'error':>8} {r['error'][:80]}")
      continue
    print(f"{name:<12} {r['check']:8.1e} " + " ".join(f"{r['jax_vs_torch'].get(k, float('nan')):16.3f}"
                                                     for k in keys))
  output = {"options": {name: OPTIONS[name] for name in names}, "results": results,
            "config": {"size": args.size, "batch": args.batch, "repeats": args.repeats},
            "total_s": round(time.perf_counter() - started, 1)}
  print(json.dumps(output))
  return output


if __name__ == "__main__":
  main()
