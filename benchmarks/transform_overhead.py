"""Overhead of DTNH over the plain regularized update, and of split gradients.

1. ``jit(chain(dtnh, sgd momentum)).update((g, r))`` against
   ``jit(sgd momentum).update(g + λ r)`` (the pre-summed gradient) on a pytree
   shaped like torchvision ResNet-18's parameters (11.7M floats).
2. ``split_value_and_grad`` (one forward, two backward passes) against two
   separate ``jax.value_and_grad`` calls on a small CNN with a KnowDist-style
   feature-map regularizer.

Runs are interleaved (A, B, A, B, ...) and the median of the per-pair ratios is
reported, so the shared, noisy machine affects both sides alike. The last line
printed is one JSON object with both ratios.

    python benchmarks/transform_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dtnh_jax


def resnet18_shapes(num_classes: int = 1000) -> dict:
  """Parameter shapes of torchvision's ResNet-18 (HWIO kernels), 11.69M in all."""
  shapes = {"conv1": (7, 7, 3, 64), "bn1_scale": (64,), "bn1_bias": (64,)}
  in_ch = 64
  for stage, out_ch in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f"layer{stage}_{block}"
      shapes[f"{prefix}_conv1"] = (3, 3, in_ch, out_ch)
      shapes[f"{prefix}_conv2"] = (3, 3, out_ch, out_ch)
      for bn in ("bn1", "bn2"):
        shapes[f"{prefix}_{bn}_scale"] = (out_ch,)
        shapes[f"{prefix}_{bn}_bias"] = (out_ch,)
      if block == 0 and stage > 1:
        shapes[f"{prefix}_downsample_conv"] = (1, 1, in_ch, out_ch)
        shapes[f"{prefix}_downsample_bn_scale"] = (out_ch,)
        shapes[f"{prefix}_downsample_bn_bias"] = (out_ch,)
      in_ch = out_ch
  shapes["fc_kernel"] = (512, num_classes)
  shapes["fc_bias"] = (num_classes,)
  return shapes


def random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def interleaved_ratio(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
  """Median of time(a)/time(b) over interleaved pairs, and both medians in ms."""
  fn_a(), fn_b()  # compile and warm up
  times_a, times_b = [], []
  for _ in range(repeats):
    for fn, times in ((fn_a, times_a), (fn_b, times_b)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  ratios = np.array(times_a) / np.array(times_b)
  return float(np.median(ratios)), 1e3 * float(np.median(times_a)), 1e3 * float(np.median(times_b))


def transform_overhead(repeats: int) -> float:
  lam = 0.01
  shapes = resnet18_shapes()
  params, g, r = (random_tree(shapes, seed) for seed in range(3))
  print(f"ResNet-18-shaped pytree: {sum(x.size for x in params.values()) / 1e6:.2f}M float32 parameters")

  dtnh_tx = optax.chain(dtnh_jax.dtnh(lam), optax.sgd(0.01, momentum=0.9))
  plain_tx = optax.sgd(0.01, momentum=0.9)
  dtnh_state, plain_state = dtnh_tx.init(params), plain_tx.init(params)
  summed = jax.tree.map(lambda a, b: a + lam * b, g, r)
  dtnh_update = jax.jit(dtnh_tx.update)
  plain_update = jax.jit(plain_tx.update)

  ratio, ms_dtnh, ms_plain = interleaved_ratio(
      lambda: dtnh_update((g, r), dtnh_state, params)[0],
      lambda: plain_update(summed, plain_state, params)[0],
      repeats,
  )
  print(f"update: chain(dtnh, sgd-momentum) {ms_dtnh:.2f} ms, sgd-momentum on the pre-summed g+λr "
        f"{ms_plain:.2f} ms, median ratio {ratio:.3f}x (issue's target <= 1.40x)")
  # The plain method when it also holds g and r apart: the sum is part of its update.
  summing_update = jax.jit(lambda g, r, state: plain_tx.update(jax.tree.map(lambda a, b: a + lam * b, g, r), state))
  ratio_summing, _, ms_summing = interleaved_ratio(
      lambda: dtnh_update((g, r), dtnh_state, params)[0],
      lambda: summing_update(g, r, plain_state)[0],
      repeats,
  )
  print(f"update: same, against sgd-momentum summing g+λr in its own jit {ms_summing:.2f} ms: "
        f"median ratio {ratio_summing:.3f}x")
  print("memory traffic (arrays of the parameters' size read+written): sgd on a pre-summed gradient 4 "
        "(read g, trace; write trace, update); summing inside 5; DTNH 7 (one pass reading g and r for the "
        "inner products, one reading g, r, trace and writing trace, update): floors 1.75x and 1.40x")
  return ratio, ratio_summing


class SmallCNN(nn.Module):
  """Four conv stages and a head; returns logits and the stage outputs."""

  @nn.compact
  def __call__(self, x):
    features = {}
    for i, width in enumerate((32, 64, 128, 128)):
      x = nn.relu(nn.Conv(width, (3, 3), strides=2 if i else 1, name=f"conv{i}")(x))
      features[f"layer{i + 1}"] = x
    return nn.Dense(10, name="fc")(x.mean(axis=(1, 2))), features


def split_gradient_ratio(repeats: int) -> float:
  model = SmallCNN()
  key = jax.random.PRNGKey(0)
  images = jax.random.normal(key, (32, 32, 32, 3))
  labels = jnp.arange(32) % 10
  params = model.init(key, images)
  source = jax.tree.map(lambda w: w + 0.01, params)

  # Data and source weights are arguments, not closed-over constants XLA would fold.
  def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def feature_distance(features, source_features):
    return sum(jnp.mean(jnp.sum((features[k] - jax.lax.stop_gradient(source_features[k])) ** 2, axis=(1, 2, 3)))
               for k in features)

  def both_terms(p, source, images, labels):
    logits, features = model.apply(p, images)
    _, source_features = model.apply(source, images)
    return cross_entropy(logits, labels), feature_distance(features, source_features)

  def empirical_only(p, images, labels):
    return cross_entropy(model.apply(p, images)[0], labels)

  def regularizer_only(p, source, images):
    _, source_features = model.apply(source, images)
    return feature_distance(model.apply(p, images)[1], source_features)

  split = jax.jit(dtnh_jax.split_value_and_grad(both_terms))
  emp_grad = jax.jit(jax.value_and_grad(empirical_only))
  reg_grad = jax.jit(jax.value_and_grad(regularizer_only))

  def separate():
    return emp_grad(params, images, labels), reg_grad(params, source, images)

  ratio, ms_split, ms_separate = interleaved_ratio(lambda: split(params, source, images, labels), separate, repeats)
  print(f"gradients: split_value_and_grad {ms_split:.2f} ms, two value_and_grad calls {ms_separate:.2f} ms, "
        f"median ratio {ratio:.3f}x (target <= 0.8x)")
  return ratio


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  transform, transform_vs_summing = transform_overhead(args.repeats)
  result = {"transform": transform, "transform_vs_summing": transform_vs_summing,
            "split_gradients": split_gradient_ratio(args.repeats)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
