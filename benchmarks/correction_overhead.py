"""Memory and update time of the never-hurt candidates (``dtnh_jax.corrections``) beside DTNH's.

Every variant is ``jit(chain(correction, sgd(momentum=0.9)).update)`` on the
parameter shapes of torchvision's ResNet-18 (11.7M float32; ``--tiny``: a few
small leaves, for the smoke test) with one conflicting regularizer, its
optimizer state donated and threaded from step to step, as a train step uses
it (the candidates with memory write it in place). ``g + λr`` is the plain
SGD step summing the two gradients in its own jit: what a method without any
correction pays. Variants:

- ``dtnh``: Algorithm 1, the reference of every ratio;
- ``bound``: ``share_bound(κ=1)`` on ``g + λr``; ``dtnh+bound``: after DTNH's projection; ``dtnh+bound(avg)``:
  the bound on the moving average of ``g`` (κ 0.25, β 0.9), the candidate the real-source study recommends;
- ``ema``: ``ema_projection(decay=0.9)``; ``ema+guard``: with ``guard_current``;
- ``subspace(K)``: ``subspace_projection(memory=K)`` for each ``--memory`` K.

Reported per variant: the median ms per update, its ratio to DTNH with a 95%
bootstrap interval of the median of per-round ratios
(``train_step_overhead.median_interval``), and the bytes of the correction's
own state (``tx.init``, without SGD's momentum) as a multiple of the
parameters' bytes. Runs are interleaved in rounds of ``--block`` consecutive
updates per variant, the order rotating (``train_step_overhead.interleaved_times``).
The last line printed is one JSON object.

    python benchmarks/correction_overhead.py [--repeats 10 --block 3 --memory 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
import optax

import dtnh_jax
from shapes import resnet18_shapes
from train_step_overhead import interleaved_times, median_interval
from transform_overhead import random_tree

LAMBDA = 0.1
#: A few small leaves: the smoke test's size.
TINY_SHAPES = {"conv": (3, 3, 4, 8), "bn_scale": (8,), "fc_kernel": (8, 10), "fc_bias": (10,)}


def corrections(memories: list[int]) -> dict:
  """Variant name -> the correction; DTNH first, the reference of every ratio."""
  variants = {
      "dtnh": dtnh_jax.dtnh(LAMBDA),
      "bound": dtnh_jax.share_bound(LAMBDA, kappa=1.0),
      "dtnh+bound": dtnh_jax.share_bound(LAMBDA, kappa=1.0, projection="conflict"),
      "dtnh+bound(avg)": dtnh_jax.share_bound(LAMBDA, kappa=0.25, projection="conflict", reference="average",
                                              decay=0.9),
      "ema": dtnh_jax.ema_projection(LAMBDA, decay=0.9),
      "ema+guard": dtnh_jax.ema_projection(LAMBDA, decay=0.9, guard_current=True),
  }
  for memory in memories:
    variants[f"subspace({memory})"] = dtnh_jax.subspace_projection(LAMBDA, memory=memory)
  return variants


def state_bytes(tree) -> int:
  return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def measure(shapes: dict, memories: list[int], repeats: int, block: int) -> dict:
  params, g, r = (random_tree(shapes, seed) for seed in range(3))
  r = jax.tree.map(lambda a, b: a - 0.5 * b, r, g)   # conflicting, as in the cases the corrections are for
  sgd = optax.sgd(0.01, momentum=0.9)
  parameter_bytes = state_bytes(params)
  print(f"{len(shapes)} leaves, {sum(x.size for x in params.values()) / 1e6:.2f}M float32 parameters")

  def stepper(update, state):
    """``steps -> None``: ``steps`` updates with the state donated and threaded, blocking on the last."""
    cell = {"state": state}

    def run(steps: int = 1):
      for _ in range(steps):
        updates, cell["state"] = update(cell["state"], g, r, params)
      jax.block_until_ready(updates)
    return run

  steps, memory = {}, {}
  for name, correction in corrections(memories).items():
    tx = optax.chain(correction, sgd)
    update = jax.jit(lambda state, g, r, params, tx=tx: tx.update(g, state, params, regularizer_grads=r),
                     donate_argnums=(0,))
    steps[name] = stepper(update, tx.init(params))
    memory[name] = state_bytes(correction.init(params))
  summing = jax.jit(lambda state, g, r, params: sgd.update(jax.tree.map(lambda a, b: a + LAMBDA * b, g, r), state,
                                                          params), donate_argnums=(0,))
  steps["g + λr"] = stepper(summing, sgd.init(params))
  memory["g + λr"] = 0

  times = interleaved_times(steps, repeats, warmup=2, block=block)
  print(f"  {'variant':14s} {'median ms':>10s} {'/ dtnh':>8s} {'95% interval':>15s} {'state MiB':>10s} "
        f"{'/ params':>9s}")
  result = {}
  for name, seconds in times.items():
    ratios = seconds / times["dtnh"]
    low, high = median_interval(ratios)
    ms = 1e3 * float(np.median(seconds))
    print(f"  {name:14s} {ms:10.2f} {float(np.median(ratios)):8.3f} {low:7.3f}-{high:<7.3f} "
          f"{memory[name] / 2 ** 20:10.2f} {memory[name] / parameter_bytes:9.2f}")
    result[name] = {"ms": round(ms, 3), "vs_dtnh": round(float(np.median(ratios)), 3),
                    "interval": [round(low, 3), round(high, 3)], "state_bytes": memory[name],
                    "state_vs_params": round(memory[name] / parameter_bytes, 3)}
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--block", type=int, default=3)
  parser.add_argument("--memory", default="2,4", help="comma-separated subspace_projection memories (>= 1)")
  parser.add_argument("--tiny", action="store_true", help="a few small leaves instead of ResNet-18's (smoke test)")
  args = parser.parse_args(argv)
  try:
    memories = [int(m) for m in args.memory.split(",") if m]
  except ValueError:
    parser.error(f"--memory must be comma-separated integers, got {args.memory!r}")
  if any(m < 1 for m in memories) or args.repeats < 1 or args.block < 1:
    parser.error("--memory values, --repeats and --block must be >= 1")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU(s)")
  result = measure(TINY_SHAPES if args.tiny else resnet18_shapes(), memories, args.repeats, args.block)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
