"""The Gram entries' float32 accuracy on a ResNet-18-sized tree (11.69M elements) against float64 NumPy.

The bound. Summing the ``n`` rounded products ``x_i y_i`` pairwise in float32 errs by at most
``γ_{⌈log2 n⌉+1} Σ|x_i y_i| ≈ (⌈log2 n⌉ + 1) · u · Σ|x_i y_i|`` (``u = 2⁻²⁴``; Higham, *Accuracy and
Stability of Numerical Algorithms*, §4.2). Real pairwise sums are blocked: the library adds 16 rows in
sequence, then XLA's reduction sums the partial sums in blocks (``dtnh_jax.projection.leaf_gram``). So the
test allows twice that,

    |computed - exact| <= (⌈log2 n⌉ + 1) · eps · Σ|x_i y_i|,   eps = 2⁻²³ (float32's machine epsilon),

about 3.0e-6 of ``Σ|x_i y_i|`` for the whole tree. A sequential float32 sum's bound is ``(n - 1) · u``; on
these data it misses the bound above by 600-6800 times on the whole tree and still 3.5 times on 65536 of its
elements, while a textbook pairwise float32 sum (``_pairwise_sum``: halve the array until one element is left)
stays below 0.03 of it (both tested, so the bound is known to tell them apart). The reference is written out
rather than taken from ``numpy.sum``, whose blocking (and so its error) differs between NumPy releases: NumPy
1.26's sum missed 0.1 of the bound on these data (0.28), NumPy 2.4's stayed below 0.06. The library
measures 0.02-0.03 of the bound on the tree and at most 0.25 on any one leaf.

Cases: independent standard normals (``<g, g>`` adds chi-square terms, many of them small next to the
accumulator; ``<g, r>`` cancels to ~3e-4 of ``Σ|g_i r_i|``) and gradients with a large mean pointing nearly
opposite ways (every partial sum grows like ``n``).
"""

import functools
import math
import os
import sys

import jax
import numpy as np
import pytest

import dtnh_jax
from dtnh_jax import projection

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from shapes import resnet18_shapes  # the benchmarks' ResNet-18 tree (11.69M floats)

sys.path.pop(0)

EPS32 = float(np.finfo(np.float32).eps)


SHAPES = resnet18_shapes()
NUM_ELEMENTS = sum(math.prod(shape) for shape in SHAPES.values())


def bound(num_elements: int, abs_sum):
  """The pairwise-summation bound of the module docstring."""
  return (math.ceil(math.log2(max(num_elements, 2))) + 1) * EPS32 * abs_sum


@functools.lru_cache(maxsize=2)
def _case(name: str):
  """``(g, r)``: dicts of float32 arrays of the ResNet-18 shapes (cached: do not modify them)."""
  rng = np.random.default_rng(14)
  def normal(shape):
    return rng.standard_normal(shape, dtype=np.float32)
  if name == "independent":
    g = {k: normal(s) for k, s in SHAPES.items()}
    r = {k: normal(s) for k, s in SHAPES.items()}
  else:  # "large mean, nearly opposite"
    g = {k: 1.0 + 0.1 * normal(s) for k, s in SHAPES.items()}
    r = {k: -g[k] * (1.0 + 1e-3 * normal(s)) for k, s in SHAPES.items()}
  return g, r


@pytest.fixture(scope="module", params=["independent", "large mean, nearly opposite"])
def case(request):
  """``(g, r, exact, abs_sums)``: float32 trees; per leaf, float64 ``[2, 2]`` Gram matrices and ``Σ|x_i y_i|``."""
  g, r = _case(request.param)
  exact, abs_sums = {}, {}
  for key in SHAPES:
    rows = np.stack([g[key].ravel(), r[key].ravel()]).astype(np.float64)
    exact[key] = rows @ rows.T   # float64 products of the float32 values, summed in float64 (one pass over both)
    magnitudes = np.abs(rows)
    abs_sums[key] = magnitudes @ magnitudes.T
  return g, r, exact, abs_sums


@functools.lru_cache(maxsize=None)
def _jitted_grams(grouping, minor_runs):
  """The Gram program of a grouping, per layout (which is read when the program is traced): both cases run it."""
  del minor_runs   # a key of the cache only
  return jax.jit(lambda gl, rl: projection.leaf_grams_by_group(gl, [rl], grouping)[1])


def _grams(g, r, grouping):
  g_leaves, r_leaves = jax.tree.leaves(g), jax.tree.leaves(r)
  return np.asarray(_jitted_grams(grouping, projection._minor_runs())(g_leaves, r_leaves), np.float64)


def _pairwise_sum(values: np.ndarray) -> float:
  """Pairwise summation in float32: pad with zeros to a power of two, add neighbours until one is left."""
  values = np.asarray(values, np.float32)
  padded = np.zeros(1 << max(values.size - 1, 1).bit_length(), np.float32)
  padded[:values.size] = values
  while padded.size > 1:
    padded = padded[0::2] + padded[1::2]  # float32 + float32: one rounding per addition
  return float(padded[0])


def _worst(computed, exact, abs_sum, num_elements) -> float:
  """max |computed - exact| / bound over the entries: <= 1 is within the bound."""
  return float(np.max(np.abs(computed - exact) / bound(num_elements, abs_sum)))


@pytest.fixture(params=[True, False], ids=["minor runs (CPU)", "runs of slices (other backends)"])
def layout(request, monkeypatch):
  """Both ways ``projection._blocked_shape`` splits a leaf, whichever backend runs the test."""
  monkeypatch.setattr(projection, "_minor_runs", lambda: request.param)
  return request.param


def test_the_tree_s_gram_entries_are_within_the_pairwise_bound(case, layout):
  g, r, exact, abs_sums = case
  grams = _grams(g, r, dtnh_jax.projection_groups(g))
  total_exact, total_abs = sum(exact.values()), sum(abs_sums.values())
  worst = _worst(grams[0], total_exact, total_abs, NUM_ELEMENTS)
  print(f"tree: max error {worst:.3f} of the bound; relative to float64: "
        f"{np.max(np.abs(grams[0] - total_exact) / np.abs(total_exact)):.2e}")
  assert worst <= 1
  assert np.all(grams[1] == 0)  # no unprojected leaves


def test_every_leaf_s_gram_entries_are_within_the_pairwise_bound(case, layout):
  # granularity="leaf": one group per leaf, so every leaf's own entries, of every size and shape (1-D, odd, blocked)
  g, r, exact, abs_sums = case
  grams = _grams(g, r, dtnh_jax.projection_groups(g, "leaf"))
  for index, key in enumerate(sorted(SHAPES)):  # jax.tree.leaves order of a dict
    worst = _worst(grams[index], exact[key], abs_sums[key], math.prod(SHAPES[key]))
    assert worst <= 1, (key, SHAPES[key], worst)


def test_dtnh_diagnostics_are_within_the_pairwise_bound(case):
  g, r, exact, abs_sums = case
  tx = dtnh_jax.dtnh(0.1)
  _, state = jax.jit(tx.update)((g, r), tx.init(g))
  diag = state.diagnostics
  total_exact, total_abs = sum(exact.values()), sum(abs_sums.values())
  limit = bound(NUM_ELEMENTS, total_abs)
  assert abs(float(diag.inner_product) - total_exact[0, 1]) <= limit[0, 1]
  # the norms are square roots (one more rounding, relative u, so 2u on the square)
  assert abs(float(diag.empirical_norm) ** 2 - total_exact[0, 0]) <= limit[0, 0] + 2 * EPS32 * total_exact[0, 0]
  assert abs(float(diag.regularizer_norm) ** 2 - total_exact[1, 1]) <= limit[1, 1] + 2 * EPS32 * total_exact[1, 1]


# (case, entry, n, how many times the bound a sequential float32 sum misses it at least): measured 6779x, 181x,
# 3.5x for <g, g> of standard normals (once the accumulator's ulp exceeds the small squares, rounding is biased);
# 612x and 6.7x for the large-mean case, where only the mean of ~1 per term grows the sum
SEQUENTIAL_MISSES = [
    ("independent", (0, 0), NUM_ELEMENTS, 1000), ("independent", (0, 0), 2 ** 20, 50),
    ("independent", (0, 0), 2 ** 16, 2), ("large mean, nearly opposite", (0, 0), NUM_ELEMENTS, 100),
    ("large mean, nearly opposite", (0, 1), NUM_ELEMENTS, 100), ("large mean, nearly opposite", (0, 0), 2 ** 20, 3),
]


@pytest.mark.parametrize("name,entry,n,missed_by", SEQUENTIAL_MISSES)
def test_the_bound_accepts_a_pairwise_sum_and_rejects_a_sequential_one(name, entry, n, missed_by):
  g, r = _case(name)
  x, y = ([v.ravel() for v in tree.values()] for tree in ((g, r)[entry[0]], (g, r)[entry[1]]))
  x, y = np.concatenate(x)[:n], np.concatenate(y)[:n]
  products = x * y                                            # float32, rounded once
  exact = float(x.astype(np.float64) @ y.astype(np.float64))
  abs_sum = float(np.abs(x.astype(np.float64)) @ np.abs(y.astype(np.float64)))
  pairwise = _pairwise_sum(products)
  sequential = float(np.cumsum(products, dtype=np.float32)[-1])
  assert _worst(pairwise, exact, abs_sum, n) <= 0.1
  assert _worst(sequential, exact, abs_sum, n) > missed_by


def test_on_a_cpu_a_wide_last_axis_is_summed_in_runs_of_consecutive_elements():
  assert projection._blocked_shape((3, 3, 256, 512), minor_runs=True) == ((3, 3, 256, 32, 16), 4)
  assert projection._blocked_shape((512, 256), minor_runs=True) == ((512, 16, 16), 2)


def test_a_narrow_last_axis_and_other_backends_split_an_axis_before_the_last():
  assert projection._blocked_shape((3, 3, 64, 128), minor_runs=True) == ((3, 3, 4, 16, 128), 3)
  assert projection._blocked_shape((3, 3, 256, 512), minor_runs=False) == ((3, 3, 16, 16, 512), 3)
  assert projection._blocked_shape((512,), minor_runs=True) == ((2, 16, 16), 1)


def test_leaf_gram_s_minor_runs_argument_picks_the_layout_the_backend_would(layout):
  """``leaf_gram(v, minor_runs=X)`` is the library's Gram with layout X: what benchmarks/transform_overhead.py
  times as the layout off a CPU, without patching the library."""
  keys = jax.random.split(jax.random.key(0), 2)
  vectors = [jax.random.normal(key, (64, 512)) for key in keys] + [None]
  np.testing.assert_array_equal(projection.leaf_gram(vectors, minor_runs=layout), projection.leaf_gram(vectors))
