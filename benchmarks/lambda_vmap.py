"""Would stacking a sweep's λ values into one vmapped train step shorten it? One step of each, timed side by side.

λ is an input of the compiled train step (``step.RegWeight``), so the K runs of a sweep that share a seed could
run as one program: their states stacked, ``jax.vmap`` over the state and λ, the batch shared. This script times,
in interleaved rounds on one batch, K calls of the jitted step (one per λ) against one call of the vmapped step
over the K stacked states, and prints the medians and the median ratio (vmapped / K singles; below 1: stacking
would shorten the sweep).

    python benchmarks/lambda_vmap.py --preset study --method dtnh-l2-sp --reg-weights 0.1,1,10 --repeats 15
    python benchmarks/lambda_vmap.py --preset tiny --reg-weights 0.1,10 --check   # do the two agree? (JSON)

Only the preset's model, data and recipe are used; the source is ``scratch`` (the step's cost does not depend on
the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax.train import presets
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.config import TrainConfig
from dtnh_jax.train.data import load_data
from dtnh_jax.train.loop import create_model, initial_variables


def build(preset: str, method: str, reg_weights: list[float]):
  """``(singles, stacked)``: K jitted steps, one per λ, and the one vmapped step over them, on one batch; each
  returns the new state(s) and metrics (the vmapped ones stacked along a leading axis of K)."""
  config = TrainConfig.create(**{**presets.settings(preset), "method": method, "source": "scratch"})
  data = load_data(config)
  model = create_model(config, data.num_classes)
  initial = initial_variables(config, data)
  steps = step_lib.steps_for(model, config, data.steps_per_epoch)
  state = step_lib.create_train_state(initial, steps.tx, jax.random.PRNGKey(0))
  batch = next(data.train_loader(0))
  single = jax.jit(steps.train_step)
  references = [step_lib.Reference.of(config.replace(reg_weight=float(w)), initial) for w in reg_weights]
  k = len(reg_weights)
  stacked_state = jax.tree.map(lambda leaf: jnp.stack([leaf] * k), state)
  # λ stacked along the mapped axis, the learning rate and the decay shared (the first run's)
  stacked_reference = references[0]._replace(reg_weight=jax.tree.map(
      lambda *values: jnp.stack(values), *(reference.reg_weight for reference in references)))
  axes = step_lib.Reference(None, None, step_lib.RegWeight(0, 0), None)
  vmapped = jax.jit(jax.vmap(steps.train_step, in_axes=(0, None, axes)))

  def singles():
    return [single(state, batch, reference) for reference in references]

  def stacked():
    return vmapped(stacked_state, batch, stacked_reference)

  return singles, stacked


def agreement(preset: str, method: str, reg_weights: list[float]) -> dict:
  """How far the vmapped step's parameters are from the single steps': the largest difference over every leaf
  and λ, relative to that leaf's largest value (``max_relative_difference``), and whether the λ moved the weights
  differently (``lambdas_differ``: the stacked λ are not one λ broadcast)."""
  singles, stacked = build(preset, method, reg_weights)
  single_states = [state for state, _ in singles()]
  stacked_state, _ = stacked()
  worst = 0.0
  for k, single in enumerate(single_states):
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda leaf: leaf[k], stacked_state.params)),
                         jax.tree.leaves(single.params)):
      got, want = np.asarray(got), np.asarray(want)
      worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)))
  first, *others = [jax.tree.leaves(state.params) for state in single_states]
  differ = any(not np.allclose(np.asarray(a), np.asarray(b)) for other in others for a, b in zip(first, other))
  return {"preset": preset, "method": method, "reg_weights": reg_weights, "max_relative_difference": worst,
          "lambdas_differ": bool(differ)}


def measure(preset: str, method: str, reg_weights: list[float], repeats: int) -> dict:
  singles, stacked = build(preset, method, reg_weights)
  for run in (singles, stacked):  # compile, and one warm call
    jax.block_until_ready(run())
    jax.block_until_ready(run())
  times = {"singles": [], "vmapped": []}
  for _ in range(repeats):
    for name, run in (("singles", singles), ("vmapped", stacked)):
      start = time.perf_counter()
      jax.block_until_ready(run())
      times[name].append(time.perf_counter() - start)
  ratios = np.array(times["vmapped"]) / np.array(times["singles"])
  return {"preset": preset, "method": method, "reg_weights": reg_weights, "repeats": repeats,
          "singles_ms": 1000 * float(np.median(times["singles"])),
          "vmapped_ms": 1000 * float(np.median(times["vmapped"])), "vmapped_over_singles": float(np.median(ratios))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="study", choices=sorted(presets.PRESETS))
  parser.add_argument("--method", default="dtnh-l2-sp")
  parser.add_argument("--reg-weights", default="0.1,1,10", help="the λ values stacked (comma-separated)")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--check", action="store_true",
                      help="instead of timing, print how far the vmapped step's parameters are from the single steps'")
  args = parser.parse_args(argv)
  try:
    weights = [float(w) for w in args.reg_weights.split(",") if w.strip()]
  except ValueError:
    parser.exit(2, f"lambda_vmap.py: error: --reg-weights takes comma-separated numbers, got {args.reg_weights!r}\n")
  if len(weights) < 2 or args.repeats < 1:
    parser.exit(2, "lambda_vmap.py: error: stack at least two λ (--reg-weights) over at least one round (--repeats)\n")
  if args.check:
    print(json.dumps(agreement(args.preset, args.method, weights)))
    return 0
  result = measure(args.preset, args.method, weights, args.repeats)
  print(f"{result['preset']} {result['method']}, {len(weights)} λ: {len(weights)} single steps "
        f"{result['singles_ms']:.1f} ms, one vmapped step {result['vmapped_ms']:.1f} ms, vmapped / singles "
        f"{result['vmapped_over_singles']:.3f} (median of {args.repeats} interleaved rounds)")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
