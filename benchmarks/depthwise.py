"""EfficientNet-Lite0's depthwise convolutions: each formulation's train step, forward pass and compile time.

Every formulation computes the same function with the same parameters (a
``(k, k, 1, C)`` kernel per depthwise layer); only the program XLA runs
differs. The package ships the first two (``EfficientNetLite(depthwise=...)``);
the others are candidates measured here, traced in place of the depthwise
layers' ``dtnh_jax.models.conv.conv`` while their programs compile.

- ``grouped``: ``lax.conv_general_dilated`` with ``feature_group_count=C``.
- ``shifted``: k² multiply-adds, each a strided window of the padded input
  times one kernel position's weights, with a hand-written backward pass (the
  input's gradient a stride-1 shifted correlation of the dilated cotangent with
  the flipped kernel, the kernel's k² reductions): ``dtnh_jax.models.conv``'s ``"shifted"``.
- ``shifted-autodiff``: the same forward pass, differentiated by JAX (the
  transpose of each strided slice is a padded copy of the cotangent).
- ``phases``: as ``shifted-autodiff``, but a stride-2 layer first splits the
  padded input into its four polyphase components (even/odd rows and
  columns), so every window is a contiguous slice of one of them.

Per formulation: the jitted train step (forward and backward pass in train
mode, cross-entropy, ``optax.sgd(momentum=0.9)``, BatchNorm statistics
updated; the same weights and batch for all), the jitted eval-mode forward
pass, their compile times, and the logits' agreement with ``grouped`` (the
largest difference over the largest |logit|, eval and train mode). The
weights are a fresh initialization whose BatchNorm running statistics are set
to the benchmark batch's own (from one train-mode pass): at initialization
the eval-mode activations vanish (Kaiming fan-out init of a depthwise kernel
with running variance 1) and every formulation would return the head's bias.
Steps are timed interleaved (``train_step_overhead.interleaved_times``: each
round runs every formulation for ``--block`` steps, the order rotating);
ratios to ``grouped`` and to ``shifted`` (the model's CPU default) are medians
of per-round ratios with a 95% bootstrap interval. The last line printed is
one JSON object.

    python benchmarks/depthwise.py [--size 32 --batch 48 --repeats 10 --block 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax.models import conv, efficientnet
from dtnh_jax.models.resnet import init_variables
from train_step_overhead import interleaved_times, median_interval

#: The formulations the model ships.
SHIPPED = ("grouped", "shifted")
NUM_CLASSES = 10


def shifted_autodiff_conv(x, kernel, stride, padding):
  """The k² multiply-adds of ``shifted``, differentiated by JAX."""
  taps = kernel.reshape(-1, kernel.shape[-1])
  return sum(window * taps[index] for index, window in enumerate(conv.windows(x, kernel.shape[:2], stride, padding)))


def phases_conv(x, kernel, stride, padding):
  """``shifted-autodiff`` with contiguous windows: a stride-2 input is split into its four polyphase components."""
  if stride == 1:
    return shifted_autodiff_conv(x, kernel, 1, padding)
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  batch, height, width, channels = x.shape
  kernel_height, kernel_width = kernel.shape[:2]
  out_height, out_width = (height - kernel_height) // 2 + 1, (width - kernel_width) // 2 + 1
  x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))  # even sizes, to split in two
  polyphase = x.reshape(batch, x.shape[1] // 2, 2, x.shape[2] // 2, 2, channels)
  out = None
  for i in range(kernel_height):
    for j in range(kernel_width):
      component = polyphase[:, :, i % 2, :, j % 2, :]
      window = jax.lax.slice(component, (0, i // 2, j // 2, 0), (batch, i // 2 + out_height, j // 2 + out_width,
                                                                 channels))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


#: Candidates the model does not ship: name -> ``(x, kernel, stride, padding) -> y``.
CANDIDATES = {"shifted-autodiff": shifted_autodiff_conv, "phases": phases_conv}
FORMULATIONS = SHIPPED + tuple(CANDIDATES)


@contextlib.contextmanager
def traced_as(formulation: str):
  """While tracing: a candidate in place of the depthwise layers' ``conv.conv``; nothing for a shipped one."""
  if formulation in SHIPPED:
    yield
    return
  candidate, shipped = CANDIDATES[formulation], conv.conv

  def depthwise_as_candidate(x, kernel, strides=1, padding="VALID", feature_group_count=1, formulation=None):
    if feature_group_count == 1:   # the dense layers
      return shipped(x, kernel, strides, padding, feature_group_count, formulation)
    return candidate(x, kernel, strides if isinstance(strides, int) else strides[0], tuple(padding))

  with mock.patch.object(conv, "conv", depthwise_as_candidate):
    yield


def model_for(formulation: str):
  return efficientnet.efficientnet_lite0(num_classes=NUM_CLASSES,
                                         depthwise=formulation if formulation in SHIPPED else "shifted")


def train_step_of(model, tx):
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates_, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates_), updates["batch_stats"], opt_state, loss, logits

  return jax.jit(step)


def calibrated(model, variables, images):
  """``variables`` with each BatchNorm's running statistics replaced by those of ``images`` (train mode).

  One train-mode pass updates ``running = m * running + (1 - m) * batch``; the batch's statistics are read back
  from it (``m`` is the model's 0.99), layer by layer as the network normalizes them.
  """
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  momentum = efficientnet.BN_MOMENTUM
  batch_stats = jax.tree.map(lambda new, old: (new - momentum * old) / (1 - momentum), updates["batch_stats"],
                             variables["batch_stats"])
  return {**variables, "batch_stats": batch_stats}


def _compiled(jitted, formulation, *args):
  start = time.perf_counter()
  with traced_as(formulation):
    compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _relative_difference(actual, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - reference)) / np.max(np.abs(reference)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=32, help="image height and width (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=48, help="images per step (default: %(default)s)")
  parser.add_argument("--repeats", type=int, default=10, help="timed rounds (default: %(default)s)")
  parser.add_argument("--block", type=int, default=2, help="steps per formulation and round (default: %(default)s)")
  parser.add_argument("--formulations", default=",".join(FORMULATIONS),
                      help="comma-separated among %(default)s; grouped is always measured (the reference)")
  args = parser.parse_args(argv)
  names = ["grouped"] + [name for name in args.formulations.split(",") if name and name != "grouped"]
  unknown = sorted(set(names) - set(FORMULATIONS))
  if unknown:
    parser.error(f"unknown formulations {unknown}; choose among {', '.join(FORMULATIONS)}")

  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(args.batch, args.size, args.size, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, NUM_CLASSES, args.batch))
  # one set of weights for all: the layout is the same
  variables = calibrated(model_for("grouped"), init_variables(model_for("grouped"), 0, args.size), images)
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(variables["params"])

  steps, forward_ms, compile_s, logits = {}, {}, {}, {}
  for name in names:
    model = model_for(name)
    forward = jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
    compiled_forward, forward_compile_s = _compiled(forward, name, variables, images)
    compiled_step, step_compile_s = _compiled(train_step_of(model, tx), name, variables["params"],
                                              variables["batch_stats"], opt_state, images, labels)
    compile_s[name] = {"step": step_compile_s, "forward": forward_compile_s}
    eval_logits = compiled_forward(variables, images)
    *_, train_logits = compiled_step(variables["params"], variables["batch_stats"], opt_state, images, labels)
    logits[name] = (np.asarray(eval_logits), np.asarray(train_logits))
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled_forward(variables, images))
      times.append(time.perf_counter() - start)
    forward_ms[name] = 1e3 * float(np.median(times))

    state = [variables["params"], variables["batch_stats"], opt_state]

    def run(block=1, compiled_step=compiled_step, state=state):
      for _ in range(block):
        state[0], state[1], state[2], loss, _ = compiled_step(*state, images, labels)
      return jax.block_until_ready(loss)

    steps[name] = run

  times = interleaved_times(steps, args.repeats, block=args.block)
  result = {"size": args.size, "batch": args.batch, "backend": jax.default_backend(), "jax": jax.__version__,
            "step_ms": {}, "step_vs_grouped": {}, "step_vs_grouped_95": {}, "step_vs_shifted": {},
            "step_vs_shifted_95": {}, "forward_ms": forward_ms,
            "compile_s": compile_s, "logits_vs_grouped": {}}
  print(f"Lite0 at {args.size}x{args.size}, batch {args.batch}, {jax.default_backend()}, jax {jax.__version__}")
  print(f"{'formulation':<12} {'step ms':>9} {'/grouped':>9} {'95% interval':>15} {'/shifted':>9} "
        f"{'95% interval':>15} {'forward ms':>11} {'compile s':>10} {'logits eval/train vs grouped':>30}")
  for name in names:
    ratios = times[name] / times["grouped"]
    low, high = median_interval(ratios)
    differences = [_relative_difference(a, b) for a, b in zip(logits[name], logits["grouped"])]
    result["step_ms"][name] = 1e3 * float(np.median(times[name]))
    result["step_vs_grouped"][name] = float(np.median(ratios))
    result["step_vs_grouped_95"][name] = [low, high]
    result["logits_vs_grouped"][name] = differences
    shifted_cell = " " * 25
    if "shifted" in times:
      ratios = times[name] / times["shifted"]
      shifted_low, shifted_high = median_interval(ratios)
      result["step_vs_shifted"][name] = float(np.median(ratios))
      result["step_vs_shifted_95"][name] = [shifted_low, shifted_high]
      shifted_cell = f"{float(np.median(ratios)):9.3f} {f'{shifted_low:.3f}-{shifted_high:.3f}':>15}"
    print(f"{name:<12} {result['step_ms'][name]:9.1f} {result['step_vs_grouped'][name]:9.3f} "
          f"{f'{low:.3f}-{high:.3f}':>15} {shifted_cell} {forward_ms[name]:11.1f} "
          f"{compile_s[name]['step']:10.1f} {differences[0]:15.1e}/{differences[1]:.1e}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
