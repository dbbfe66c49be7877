"""Where a train step's time goes: one profile of the compiled step, each XLA operation put in a class.

    python benchmarks/step_profile.py [--size 96] [--batch 16] [--width 1] [--arch resnet18] [--regularizer l2-sp]
                                      [--variant summed] [--steps 5] [--top 15]

Builds ``train_step_overhead``'s step of one method (ResNet-18 unless ``--arch``, torchvision layout, random
source weights,
a synthetic batch; ``--variant summed``: one backward pass of J + λΩ, ``plain``: the library's step, ``dtnh``:
DTNH(X)), times ``--steps`` steps, then runs as many under ``jax.profiler`` (a Perfetto trace) and joins each
operation's time in the trace to the compiled program's text. Each operation (an XLA fusion or a lone
instruction) is put in one class by what its body computes:

* ``convolution``: XLA's convolution (``forward`` or ``backward``, from the JAX operation it came from:
  a backward one is under ``transpose(jvp(...))``); ``kernel gradient`` if its window is larger than 7x7 (XLA's
  form of a convolution's kernel gradient: a window the size of the whole map);
* ``matmul``: a ``dot`` (im2col, taps, the head), ``forward`` or ``backward`` likewise;
* ``copy``: nothing but slices, transposes, pads, concatenations, reshapes, copies and broadcasts (the windows of
  im2col and taps, the operands XLA transposes for a matmul);
* ``other``: the rest (BatchNorm, activations, the optimizer's update, max-pool, the losses).

Prints the step's median time, the total per class (per step; operations on the two threads of a 2-core CPU can
overlap, so the totals may sum to more than the step) and the ``--top`` operations. The last line is one JSON
object. RESULTS.md ("The kernel's gradient as matmuls") used it to find XLA:CPU's kernel-gradient convolutions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

import train_step_overhead as bench

#: Instructions that only move data.
COPY_OPS = frozenset({"parameter", "slice", "transpose", "copy", "bitcast", "pad", "concatenate", "reshape",
                      "broadcast", "constant", "tuple", "get-tuple-element"})
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.MULTILINE)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", re.MULTILINE | re.DOTALL)


def operations(hlo: str) -> dict[str, dict[str, Any]]:
  """Every instruction of the program's entry and nested computations by name: ``{"shape", "opcode",
  "body_ops"}`` (a fusion's body's opcodes; the instruction's own for any other), ``"op_name"`` (the JAX
  operation it came from, from its metadata) and ``"window"`` (a convolution's window size)."""
  bodies = {name: [m.group(3) for m in _INSTRUCTION.finditer(body)] for name, body in _COMPUTATION.findall(hlo)}
  texts = dict(_COMPUTATION.findall(hlo))
  result = {}
  for match in _INSTRUCTION.finditer(hlo):
    name, shape, opcode, rest = match.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body_ops = bodies.get(called.group(1), []) if called else [opcode]
    text = texts.get(called.group(1), "") if called else rest
    window = re.search(r"window=\{size=(\d+)x(\d+)", text)
    op_name = re.search(r'op_name="([^"]*)"', rest) or re.search(r'op_name="([^"]*)"', text)
    result[name] = {"shape": shape, "opcode": opcode, "body_ops": body_ops,
                    "window": (int(window.group(1)), int(window.group(2))) if window else None,
                    "op_name": op_name.group(1) if op_name else ""}
  return result


def classify(operation: dict[str, Any]) -> str:
  """The class of one operation (see the module's docstring)."""
  ops = set(operation["body_ops"])
  direction = "backward" if "transpose(" in operation["op_name"] else "forward"
  # a fusion whose body the text does not show (XLA:CPU's library fusions): the JAX operation it came from
  source = operation["op_name"].rsplit("/", 1)[-1]
  ops |= {"convolution"} if source == "conv_general_dilated" else {"dot"} if source == "dot_general" else set()
  if "convolution" in ops:
    window = operation["window"]
    if window is not None and window[0] * window[1] > 49:
      return "convolution, kernel gradient"
    return f"convolution, {direction}"
  if "dot" in ops:
    return f"matmul, {direction}"
  if ops and ops <= COPY_OPS:
    return "copy"
  return "other"


def totals(events: dict[str, float], program: dict[str, dict[str, Any]], steps: int) -> dict[str, float]:
  """ms per step per class, from the trace's µs per operation name (names the program lacks are left out)."""
  by_class: dict[str, float] = collections.Counter()
  for name, microseconds in events.items():
    if name in program:
      by_class[classify(program[name])] += microseconds / 1e3 / steps
  return dict(sorted(by_class.items(), key=lambda item: -item[1]))


def trace_events(directory: str) -> dict[str, float]:
  """µs per event name, summed over the complete events (``"ph": "X"``) of the trace in ``directory``."""
  paths = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"jax.profiler wrote no Perfetto trace under {directory}")
  with gzip.open(paths[0]) as file:
    trace = json.load(file)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  summed: dict[str, float] = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and "dur" in event:
      summed[event["name"]] += event["dur"]
  return dict(summed)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The step's flags (``--size --batch --width --arch --regularizer --variant``), as :func:`build_step` reads them;
  also ``step_memory.py``'s."""
  parser.add_argument("--size", type=int, default=96, help="image height and width (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=16, help="images per step (default: %(default)s)")
  parser.add_argument("--width", type=float, default=1.0, help="the ResNet's channel multiplier (default: 1)")
  parser.add_argument("--arch", default="resnet18", help="a ResNet of dtnh_jax.names.ARCHITECTURES "
                      "(default: %(default)s)")
  parser.add_argument("--regularizer", default="l2-sp", choices=["l2-sp", "knowdist"],
                      help="X of the step (default: %(default)s)")
  parser.add_argument("--variant", default="summed", choices=["summed", "plain", "dtnh"],
                      help="summed: one backward pass of J + λΩ; plain: the library's X; dtnh: DTNH(X) "
                      "(default: %(default)s)")


def build_step(args) -> bench.CompiledStep:
  problem = bench.make_problem(args.size, args.batch, args.width, arch=args.arch)
  shapes = argparse.Namespace(size=args.size, batch=args.batch, width=args.width)
  return bench.build_steps(problem, args.regularizer, shapes, [args.variant])[args.variant]


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_step_arguments(parser)
  parser.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled (default: 5)")
  parser.add_argument("--top", type=int, default=15, help="operations listed (default: %(default)s)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  step = build_step(args)
  step(2)   # warm-up
  start = time.perf_counter()
  step(args.steps)
  step_ms = (time.perf_counter() - start) / args.steps * 1e3
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      step(args.steps)
    events = trace_events(directory)
  program = operations(step.compiled.as_text())
  by_class = totals(events, program, args.steps)
  print(f"jax {jax.__version__} on {jax.default_backend()}; {args.arch} width {args.width:g}, {args.size}x{args.size}, "
        f"batch {args.batch}, {args.regularizer} {args.variant}: {step_ms:.1f} ms per step (mean of one timed run of "
        f"{args.steps} steps)")
  print(f"\n{'class':<30} {'ms per step':>12}")
  for name, ms in by_class.items():
    print(f"{name:<30} {ms:12.2f}")
  print(f"{'(sum; threads overlap)':<30} {sum(by_class.values()):12.2f}")
  top = sorted(((us, name) for name, us in events.items() if name in program), reverse=True)[:args.top]
  print(f"\n{'ms per step':>11}  {'class':<28} {'operation':<28} {'shape':<28} from")
  rows = []
  for microseconds, name in top:
    operation = program[name]
    rows.append({"name": name, "ms": round(microseconds / 1e3 / args.steps, 3), "class": classify(operation),
                 "shape": operation["shape"], "op_name": operation["op_name"]})
    print(f"{rows[-1]['ms']:11.2f}  {rows[-1]['class']:<28} {name:<28} {operation['shape'][:28]:<28} "
          f"{operation['op_name'][-60:]}")
  result = {"step_ms": round(step_ms, 2), "classes_ms": {k: round(v, 3) for k, v in by_class.items()}, "top": rows,
            "config": vars(args) | {"jax": jax.__version__, "platform": jax.default_backend()}}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
