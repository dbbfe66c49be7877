"""Update time of each gradient-surgery correction next to DTNH's, on a ResNet-18-shaped pytree.

Every correction (``dtnh_jax.aggregators``), ``dtnh`` itself and ``dtnh``
with ``max_angle`` (the paper's Eq. 5) is jitted alone,
``jit(tx.update)((g, r), state, params)``, on the parameter shapes of
torchvision's ResNet-18 (11.7M float32) with one regularizer, and timed
with the plain regularized gradient ``g + λ r`` (a jitted sum) beside them.
All share the two passes over the parameters (the Gram matrix, then ``d``);
what differs is the math on the Gram matrices in between, so the ratios show
what each correction's weights cost on top of the memory traffic. With
``--granularity leaf`` there is one Gram matrix per tensor (62), and the
per-group solves are batched over them.

Runs are interleaved: each round runs every variant for ``--block``
consecutive updates, the order rotating between rounds
(``train_step_overhead.interleaved_times``), and each ratio is the median of
the per-round ratios to DTNH, so the shared, noisy machine affects all sides
alike. The last line printed is one JSON object: per granularity, each
variant's median ms and its ratio to DTNH.

    python benchmarks/aggregator_overhead.py [--repeats 10 --block 3 --granularity tree,leaf]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

import dtnh_jax
from dtnh_jax import aggregators
from train_step_overhead import interleaved_times
from transform_overhead import random_tree, resnet18_shapes

LAMBDA = 0.01
#: What each correction is given beyond reg_weight: CAGrad's radius as in its paper's experiments.
OPTIONS = {"cagrad": {"c": 0.5}}


def transformations(granularity: str) -> dict:
  """Variant name -> the optax transformation; DTNH first, the reference of every ratio."""
  variants = {"dtnh": dtnh_jax.dtnh(LAMBDA, granularity=granularity),
              "eq5 (s=60)": dtnh_jax.dtnh(LAMBDA, granularity=granularity, max_angle=60.0)}
  for name in aggregators.AGGREGATORS:
    variants[name] = getattr(aggregators, name)(LAMBDA, granularity=granularity, **OPTIONS.get(name, {}))
  return variants


def measure(granularity: str, repeats: int, block: int) -> dict:
  shapes = resnet18_shapes()
  params, g, r = (random_tree(shapes, seed) for seed in range(3))
  r = jax.tree.map(lambda a, b: a - 0.5 * b, r, g)   # conflicting, as DTNH's interesting case (timing has no branch)

  def timed(fn):
    def run(steps: int = 1):
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
    return run

  steps = {}
  for name, tx in transformations(granularity).items():
    update, state = jax.jit(tx.update), tx.init(params)
    steps[name] = timed(lambda update=update, state=state: update((g, r), state, params)[0])
  summed = jax.jit(lambda g, r: jax.tree.map(lambda a, b: a + LAMBDA * b, g, r))
  steps["g + λr"] = timed(lambda: summed(g, r))

  times = interleaved_times(steps, repeats, warmup=2, block=block)
  result = {}
  print(f"granularity={granularity}: {len(jax.tree.leaves(params))} leaves, "
        f"{sum(x.size for x in params.values()) / 1e6:.2f}M float32 parameters")
  print(f"  {'variant':12s} {'median ms':>10s} {'/ dtnh':>8s}")
  for name, seconds in times.items():
    ratio = float(np.median(seconds / times["dtnh"]))
    ms = 1e3 * float(np.median(seconds))
    print(f"  {name:12s} {ms:10.2f} {ratio:8.3f}")
    result[name] = {"ms": round(ms, 3), "vs_dtnh": round(ratio, 3)}
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--block", type=int, default=3)
  parser.add_argument("--granularity", default="tree,leaf", help="comma-separated: tree, leaf, module")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU(s)")
  result = {granularity: measure(granularity, args.repeats, args.block) for granularity in args.granularity.split(",")}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
