"""Overhead of DTNH over the plain regularized update, and of split gradients.

1. ``jit(chain(dtnh, sgd momentum)).update((g, r))`` against
   ``jit(sgd momentum).update(g + λ r)`` (the pre-summed gradient) on a pytree
   shaped like torchvision ResNet-18's parameters (11.7M floats), against the
   plain update summing ``g + λ r`` in its own jit, and the same two steps
   with ``optax.apply_updates`` in the jit (issue #14's comparison).
2. ``split_value_and_grad`` (one forward, two backward passes) against two
   separate ``jax.value_and_grad`` calls on a small CNN with a KnowDist-style
   feature-map regularizer.
3. With ``--gram NAME,...``: the step of part 1 with ``apply_updates`` and the
   Gram matrices computed another way (:data:`GRAM_STRATEGIES`), all in one
   interleaved run against the same summing step, and the Gram pass alone.

Runs are interleaved (A, B, A, B, ...) and the median of the per-pair ratios is
reported, so the shared, noisy machine affects both sides alike. The last line
printed is one JSON object with all the ratios.

    python benchmarks/transform_overhead.py [--repeats 30] [--gram all]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import dtnh_jax
from shapes import resnet18_shapes  # noqa: F401  (aggregator_overhead imports it from here)
from dtnh_jax import projection
from train_step_overhead import median_interval


def random_tree(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


class Ratio(NamedTuple):
  median: float                  # of time(a)/time(b) over interleaved pairs
  ms_a: float                    # median times
  ms_b: float
  interval: tuple[float, float]  # 95% bootstrap interval of the median (train_step_overhead.median_interval)

  def __str__(self):
    return f"{self.median:.3f}x (95% interval {self.interval[0]:.3f}-{self.interval[1]:.3f})"


def interleaved_ratio(fn_a, fn_b, repeats: int) -> Ratio:
  """Median of time(a)/time(b) over interleaved pairs, both medians in ms, and the median's interval."""
  fn_a(), fn_b()  # compile and warm up
  times_a, times_b = [], []
  for _ in range(repeats):
    for fn, times in ((fn_a, times_a), (fn_b, times_b)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  ratios = np.array(times_a) / np.array(times_b)
  return Ratio(float(np.median(ratios)), 1e3 * float(np.median(times_a)), 1e3 * float(np.median(times_b)),
               median_interval(ratios))


def transform_overhead(repeats: int) -> tuple[Ratio, Ratio, Ratio]:
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

  ratio = interleaved_ratio(
      lambda: dtnh_update((g, r), dtnh_state, params)[0],
      lambda: plain_update(summed, plain_state, params)[0],
      repeats,
  )
  print(f"update: chain(dtnh, sgd-momentum) {ratio.ms_a:.2f} ms, sgd-momentum on the pre-summed g+λr "
        f"{ratio.ms_b:.2f} ms, median ratio {ratio} (memory-traffic floor 1.75x)")
  # The plain method when it also holds g and r apart: the sum is part of its update.
  summing_update = jax.jit(lambda g, r, state: plain_tx.update(jax.tree.map(lambda a, b: a + lam * b, g, r), state))
  ratio_summing = interleaved_ratio(
      lambda: dtnh_update((g, r), dtnh_state, params)[0],
      lambda: summing_update(g, r, plain_state)[0],
      repeats,
  )
  print(f"update: same, against sgd-momentum summing g+λr in its own jit {ratio_summing.ms_b:.2f} ms: "
        f"median ratio {ratio_summing}")
  dtnh_step, summing_step = applied_steps(lam)
  ratio_applied = interleaved_ratio(
      lambda: dtnh_step(g, r, dtnh_state, params)[0],
      lambda: summing_step(g, r, plain_state, params)[0],
      repeats,
  )
  print(f"step with apply_updates: chain(dtnh, sgd-momentum) {ratio_applied.ms_a:.2f} ms, sgd-momentum summing "
        f"g+λr {ratio_applied.ms_b:.2f} ms: median ratio {ratio_applied} (issue #14's target <= 1.45x)")
  print("memory traffic (arrays of the parameters' size read+written): sgd on a pre-summed gradient 4 "
        "(read g, trace; write trace, update); summing inside 5; DTNH 7 (one pass reading g and r for the "
        "inner products, one reading g, r, trace and writing trace, update): floors 1.75x and 1.40x; "
        "with apply_updates (read params, write params) 6 and 8: floor 1.33x")
  return ratio, ratio_summing, ratio_applied


def applied_steps(lam: float):
  """``(g, r, state, params) -> (new params, state)`` for DTNH and for the plain update summing ``g + λ r``."""
  sgd = optax.sgd(0.01, momentum=0.9)
  dtnh_tx = optax.chain(dtnh_jax.dtnh(lam), sgd)

  def dtnh_step(g, r, state, params):
    updates, state = dtnh_tx.update((g, r), state, params)
    return optax.apply_updates(params, updates), state

  def summing_step(g, r, state, params):
    updates, state = sgd.update(jax.tree.map(lambda a, b: a + lam * b, g, r), state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(dtnh_step), jax.jit(summing_step)


# ---------------------------------------------------------------------------------------------------------------
# Part 3: ways to compute the Gram matrices, each swapped in for the library's ``projection.leaf_gram`` (or, for
# ``concat``, ``projection.leaf_grams_by_group``): dtnh and every aggregator look both up at trace time.

def _accumulation(vectors):
  return projection.accumulation_dtype(jnp.result_type(*[v for v in vectors if v is not None]))


def _gram_from(vectors, entries):
  """The ``[k+1, k+1]`` matrix from ``{(i, j): value}`` over the pairs ``i <= j`` (missing: structural zero)."""
  zero = jnp.zeros((), _accumulation(vectors))
  n = len(vectors)
  return jnp.stack([jnp.stack([entries.get((min(i, j), max(i, j)), zero) for j in range(n)]) for i in range(n)])


def _products(vectors):
  acc = _accumulation(vectors)
  pairs = projection.structural_pairs(vectors)
  return pairs, [vectors[i].astype(acc).ravel() * vectors[j].astype(acc).ravel() for i, j in pairs]


def gram_separate(vectors):
  """Before issue #14: one fused multiply-reduce per entry, so one pass over the leaf per entry."""
  pairs, products = _products(vectors)
  return _gram_from(vectors, {pair: jnp.sum(x) for pair, x in zip(pairs, products)})


def gram_variadic(vectors):
  """One ``lax.reduce`` with an accumulator per entry over the flat leaf: one pass, XLA:CPU's own loop."""
  pairs, products = _products(vectors)
  zeros = tuple(jnp.zeros((), x.dtype) for x in products)
  sums = jax.lax.reduce(tuple(products), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (0,))
  return _gram_from(vectors, dict(zip(pairs, sums)))


def gram_stacked(vectors):
  """``jnp.sum`` over the stacked products ``[entries, n]`` (XLA writes the stack, then reduces it)."""
  pairs, products = _products(vectors)
  sums = jnp.sum(jnp.stack(products), axis=1)
  return _gram_from(vectors, {pair: sums[k] for k, pair in enumerate(pairs)})


def gram_einsum(vectors):
  """``einsum("in,jn->ij")`` of the stacked ``[k+1, n]`` vectors (a copy, then a matrix product)."""
  acc = _accumulation(vectors)
  stacked = jnp.stack([(jnp.zeros_like(vectors[0]) if v is None else v).astype(acc).ravel() for v in vectors])
  return jnp.einsum("in,jn->ij", stacked, stacked, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)


def gram_blocked128(vectors):
  """Per entry, the products as ``[-1, 128]`` (zero-padded), summed over the 128 first, then over the rows."""
  pairs, products = _products(vectors)
  def two_stage(x):
    return jnp.sum(jnp.sum(jnp.pad(x, (0, -x.size % 128)).reshape(-1, 128), axis=1))
  return _gram_from(vectors, {pair: two_stage(x) for pair, x in zip(pairs, products)})


LIBRARY_LEAF_GRAM = projection.leaf_gram  # gram_strategy swaps projection.leaf_gram itself


def gram_slices(vectors):
  """The library's one pass with the layout it uses off a CPU (runs of 16 slices of an axis before the last; on a
  CPU until 2026-12-02): XLA:CPU sums each partial sum in a scalar loop."""
  return LIBRARY_LEAF_GRAM(vectors, minor_runs=False)


def grams_concat(empirical_leaves, regularizer_leaves, grouping):
  """All leaves of a group concatenated into one vector per gradient first (a copy), then the library's Gram."""
  per_leaf = list(zip(empirical_leaves, *regularizer_leaves))
  grams = []
  for group in range(grouping.num_groups + 1):
    members = [vectors for vectors, label in zip(per_leaf, grouping.leaf_group) if label == group]
    if not members:
      grams.append(jnp.zeros((len(per_leaf[0]),) * 2, _accumulation(per_leaf[0])))
      continue
    flat = [jnp.concatenate([(jnp.zeros_like(m[0]) if m[i] is None else m[i]).ravel() for m in members])
            for i in range(len(per_leaf[0]))]
    grams.append(projection.leaf_gram(flat))
  return per_leaf, jnp.stack(grams)


#: ``name: (the stand-in for projection.leaf_gram, or None, the one for projection.leaf_grams_by_group, or None)``.
GRAM_STRATEGIES = {
    "library": (None, None),
    "slices": (gram_slices, None),
    "separate": (gram_separate, None),
    "variadic": (gram_variadic, None),
    "stacked": (gram_stacked, None),
    "einsum": (gram_einsum, None),
    "blocked128": (gram_blocked128, None),
    "concat": (None, grams_concat),
}


@contextlib.contextmanager
def gram_strategy(name: str):
  """The library with ``name``'s Gram computation swapped in (for tracing only: jit inside the block)."""
  leaf_gram, by_group = GRAM_STRATEGIES[name]
  saved = projection.leaf_gram, projection.leaf_grams_by_group
  projection.leaf_gram = leaf_gram or saved[0]
  projection.leaf_grams_by_group = by_group or saved[1]
  try:
    yield
  finally:
    projection.leaf_gram, projection.leaf_grams_by_group = saved


def gram_strategies(names: list[str], repeats: int) -> dict:
  """Part 3: each strategy's step (with apply_updates) / the summing step, interleaved in one run."""
  lam = 0.01
  shapes = resnet18_shapes()
  params, g, r = (random_tree(shapes, seed) for seed in range(3))
  state = optax.chain(dtnh_jax.dtnh(lam), optax.sgd(0.01, momentum=0.9)).init(params)
  plain_state = optax.sgd(0.01, momentum=0.9).init(params)
  summing_step = applied_steps(lam)[1].lower(g, r, plain_state, params).compile()
  grouping = dtnh_jax.projection_groups(params)
  g_leaves, r_leaves = jax.tree.leaves(g), jax.tree.leaves(r)
  steps, grams = {}, {}
  for name in names:
    with gram_strategy(name):
      steps[name] = applied_steps(lam)[0].lower(g, r, state, params).compile()
      grams[name] = jax.jit(lambda gl, rl: projection.leaf_grams_by_group(gl, [rl], grouping)[1]).lower(
          g_leaves, r_leaves).compile()

  def summing():
    return summing_step(g, r, plain_state, params)[0]

  def timed(call):
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start

  for name in names:
    timed(summing), timed(lambda: steps[name](g, r, state, params)[0]), timed(lambda: grams[name](g_leaves, r_leaves))
  # Each step is timed right after a summing step, so both see the caches the calls before them left.
  ratios = {name: [] for name in names}
  times = {name: [] for name in names}
  times_summing, times_gram = [], {name: [] for name in names}
  for _ in range(repeats):
    for name in names:
      times_summing.append(timed(summing))
      times[name].append(timed(lambda: steps[name](g, r, state, params)[0]))
      ratios[name].append(times[name][-1] / times_summing[-1])
    for name in names:
      times_gram[name].append(timed(lambda: grams[name](g_leaves, r_leaves)))
  print(f"Gram strategies (step with apply_updates / the sgd-momentum step summing g+λr timed just before it, "
        f"{1e3 * np.median(times_summing):.2f} ms; the Gram pass alone):")
  result = {}
  for name in names:
    ratio, ms_gram = float(np.median(ratios[name])), 1e3 * float(np.median(times_gram[name]))
    print(f"  {name:12s} step {1e3 * np.median(times[name]):7.2f} ms, median ratio {ratio:.3f}x; "
          f"Gram alone {ms_gram:6.2f} ms")
    result[name] = {"ratio": ratio, "gram_ms": ms_gram}
  return result


class SmallCNN(nn.Module):
  """Four conv stages and a head; returns logits and the stage outputs."""

  @nn.compact
  def __call__(self, x):
    features = {}
    for i, width in enumerate((32, 64, 128, 128)):
      x = nn.relu(nn.Conv(width, (3, 3), strides=2 if i else 1, name=f"conv{i}")(x))
      features[f"layer{i + 1}"] = x
    return nn.Dense(10, name="fc")(x.mean(axis=(1, 2))), features


def split_gradient_ratio(repeats: int) -> Ratio:
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

  ratio = interleaved_ratio(lambda: split(params, source, images, labels), separate, repeats)
  print(f"gradients: split_value_and_grad {ratio.ms_a:.2f} ms, two value_and_grad calls {ratio.ms_b:.2f} ms, "
        f"median ratio {ratio} (target <= 0.8x)")
  return ratio


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--gram", default="", help="comma-separated Gram strategies to compare (part 3), or 'all': "
                      + ", ".join(GRAM_STRATEGIES))
  args = parser.parse_args(argv)
  names = list(GRAM_STRATEGIES) if args.gram == "all" else [n for n in args.gram.split(",") if n]
  unknown = sorted(set(names) - set(GRAM_STRATEGIES))
  if unknown:
    parser.error(f"unknown --gram strategies {unknown}; known: {', '.join(GRAM_STRATEGIES)}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  transform, transform_vs_summing, transform_applied = transform_overhead(args.repeats)
  split = split_gradient_ratio(args.repeats)
  result = {"transform": transform.median, "transform_vs_summing": transform_vs_summing.median,
            "transform_vs_summing_applied": transform_applied.median, "split_gradients": split.median,
            "intervals": {"transform": transform.interval, "transform_vs_summing": transform_vs_summing.interval,
                          "transform_vs_summing_applied": transform_applied.interval,
                          "split_gradients": split.interval}}
  if names:
    result["gram_strategies"] = gram_strategies(names, args.repeats)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
