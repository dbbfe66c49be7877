"""DTNH's direction and diagnostics equal an independent NumPy transcription of the paper."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import dtnh_jax
from reference import angle_degrees, dtnh_groups, dtnh_vectors, flat

SHAPES = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 5), "bias": (5,)}}


def random_tree(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def apply_dtnh(g, rs, lam, **kwargs):
  tx = dtnh_jax.dtnh(lam, **kwargs)
  direction, state = tx.update((g, *rs), tx.init(g), g)
  return direction, state.diagnostics


def case_pair(name):
  """(g, r) pytrees for the geometric edge cases of Algorithm 1."""
  g = random_tree(0)
  base = random_tree(1)
  g_flat = flat(leaves64(g))
  b_flat = flat(leaves64(base))
  orthogonal = b_flat - (b_flat @ g_flat) / (g_flat @ g_flat) * g_flat
  vectors = {
      "obtuse": orthogonal - 0.7 * g_flat,
      "acute": orthogonal + 0.7 * g_flat,
      "orthogonal": orthogonal,
      "exactly_opposite": -2.5 * g_flat,
      "exactly_aligned": 3.0 * g_flat,
  }
  if name == "zero_empirical":
    return jax.tree.map(jnp.zeros_like, g), base
  if name == "zero_regularizer":
    return g, jax.tree.map(jnp.zeros_like, g)
  if name == "both_zero":
    return jax.tree.map(jnp.zeros_like, g), jax.tree.map(jnp.zeros_like, g)
  return g, unflatten_like(g, vectors[name])


def unflatten_like(tree, vector, dtype=None):
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    out.append(jnp.asarray(vector[offset:offset + leaf.size].reshape(leaf.shape), dtype or leaf.dtype))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


CASES = ["obtuse", "acute", "orthogonal", "exactly_opposite", "exactly_aligned",
         "zero_empirical", "zero_regularizer", "both_zero"]


@pytest.mark.parametrize("case", CASES)
def test_direction_matches_numpy_algorithm_1(case):
  g, r = case_pair(case)
  direction, _ = apply_dtnh(g, [r], 0.3)
  expected = dtnh_vectors(flat(leaves64(g)), [flat(leaves64(r))], [0.3])
  np.testing.assert_allclose(flat(leaves64(direction)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_diagnostics_match_numpy_angles_and_norms(case):
  g, r = case_pair(case)
  lam = 0.3
  _, diag = apply_dtnh(g, [r], lam)
  gv, rv = flat(leaves64(g)), flat(leaves64(r))
  d = dtnh_vectors(gv, [rv], [lam])
  np.testing.assert_allclose(diag.inner_product, gv @ rv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(diag.empirical_norm, np.linalg.norm(gv), rtol=1e-5)
  np.testing.assert_allclose(diag.regularizer_norm, np.linalg.norm(rv), rtol=1e-5)
  assert float(diag.conflict) == float(gv @ rv < 0)
  for got, want in [(diag.angle1, angle_degrees(d, gv)), (diag.angle2, angle_degrees(d, rv)),
                    (diag.angle3, angle_degrees(gv + lam * rv, gv)),
                    (diag.angle4, angle_degrees(gv + lam * rv, rv))]:
    np.testing.assert_allclose(got, want, atol=0.05)


def test_obtuse_case_projects_away_the_conflict():
  g, r = case_pair("obtuse")
  direction, diag = apply_dtnh(g, [r], 0.3)
  gv, dv = flat(leaves64(g)), flat(leaves64(direction))
  assert float(diag.conflict) == 1.0
  np.testing.assert_allclose(dv @ gv, gv @ gv, rtol=1e-5)  # the step along g is exactly plain descent


def test_acute_case_is_the_plain_regularized_gradient():
  g, r = case_pair("acute")
  direction, diag = apply_dtnh(g, [r], 0.3)
  assert float(diag.conflict) == 0.0
  chex_expected = jax.tree.map(lambda a, b: a + 0.3 * b, g, r)
  np.testing.assert_allclose(flat(leaves64(direction)), flat(leaves64(chex_expected)), rtol=1e-6)


def test_zero_empirical_gradient_gives_the_weighted_regularizer():
  g, r = case_pair("zero_empirical")
  direction, _ = apply_dtnh(g, [r], 0.3)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(direction))
  np.testing.assert_allclose(flat(leaves64(direction)), 0.3 * flat(leaves64(r)), rtol=1e-6)


def test_always_projection_matches_numpy_released_code_variant():
  g, r = case_pair("acute")
  direction, _ = apply_dtnh(g, [r], 0.3, projection="always")
  expected = dtnh_vectors(flat(leaves64(g)), [flat(leaves64(r))], [0.3], conflict_only=False)
  np.testing.assert_allclose(flat(leaves64(direction)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_leaf_granularity_projects_each_leaf_on_its_own(seed):
  g, r = random_tree(seed), random_tree(seed + 100)
  direction, diag = apply_dtnh(g, [r], 0.7, granularity="leaf")
  n = len(jax.tree.leaves(g))
  expected = dtnh_groups(leaves64(g), [leaves64(r)], [0.7], [[i] for i in range(n)])
  for got, want in zip(leaves64(direction), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  conflicts = [float(a.ravel() @ b.ravel() < 0) for a, b in zip(leaves64(g), leaves64(r))]
  np.testing.assert_allclose(diag.conflict, np.mean(conflicts), rtol=1e-6)


def test_module_granularity_groups_leaves_of_one_layer():
  g, r = random_tree(5), random_tree(6)
  direction, _ = apply_dtnh(g, [r], 0.7, granularity="module")
  # leaves in jax order: bn/bias, bn/scale, conv/kernel, fc/bias, fc/kernel
  expected = dtnh_groups(leaves64(g), [leaves64(r)], [0.7], [[0, 1], [2], [3, 4]])
  for got, want in zip(leaves64(direction), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_label_function_and_label_tree_give_the_same_groups():
  g, r = random_tree(7), random_tree(8)
  labels = {"conv": {"kernel": "body"}, "bn": {"scale": "body", "bias": "body"},
            "fc": {"kernel": "head", "bias": "head"}}
  by_tree, _ = apply_dtnh(g, [r], 0.7, granularity=labels)
  by_fn, _ = apply_dtnh(g, [r], 0.7, granularity=lambda params: labels)
  expected = dtnh_groups(leaves64(g), [leaves64(r)], [0.7], [[0, 1, 2], [3, 4]])
  for got_tree, got_fn, want in zip(leaves64(by_tree), leaves64(by_fn), expected):
    np.testing.assert_allclose(got_tree, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_tree, got_fn)


def test_unprojected_leaves_get_the_plain_sum_and_stay_out_of_the_projection():
  g, r = random_tree(9), random_tree(10)
  is_head = {"conv": {"kernel": False}, "bn": {"scale": False, "bias": False}, "fc": {"kernel": True, "bias": True}}
  direction, _ = apply_dtnh(g, [r], 0.7, unprojected=is_head)
  expected = dtnh_groups(leaves64(g), [leaves64(r)], [0.7], [[0, 1, 2]], unprojected=[3, 4])
  for got, want in zip(leaves64(direction), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_several_regularizers_are_each_projected_against_the_empirical_gradient():
  g, r1, r2, r3 = (random_tree(s) for s in (11, 12, 13, 14))
  lams = [0.1, 0.5, 2.0]
  direction, diag = apply_dtnh(g, [r1, r2, r3], lams)
  gv = flat(leaves64(g))
  rvs = [flat(leaves64(r)) for r in (r1, r2, r3)]
  d = dtnh_vectors(gv, rvs, lams)
  np.testing.assert_allclose(flat(leaves64(direction)), d, rtol=1e-5, atol=1e-6)
  assert diag.inner_product.shape == (3,)
  np.testing.assert_allclose(diag.inner_product, [gv @ rv for rv in rvs], rtol=1e-5)
  combined = sum(lam * rv for lam, rv in zip(lams, rvs))
  np.testing.assert_allclose(diag.angle1, angle_degrees(d, gv), atol=0.05)
  np.testing.assert_allclose(diag.angle2, angle_degrees(d, combined), atol=0.05)
  np.testing.assert_allclose(diag.angle4, angle_degrees(gv + combined, combined), atol=0.05)


def test_a_whole_subtree_given_as_none_counts_as_zero():
  g, r = random_tree(15), random_tree(16)
  got, _ = apply_dtnh(g, [{**r, "bn": None}], 0.4)
  want, _ = apply_dtnh(g, [{**r, "bn": jax.tree.map(jnp.zeros_like, r["bn"])}], 0.4)
  jax.tree.map(np.testing.assert_allclose, got, want)


def test_a_regularizer_that_touches_nothing_leaves_the_empirical_gradient():
  g = random_tree(15)
  got, _ = apply_dtnh(g, [None], 0.4)
  jax.tree.map(np.testing.assert_allclose, got, g)


def test_regularizer_leaves_given_as_none_or_masked_node_count_as_zero():
  g, r = random_tree(15), random_tree(16)
  r_none = {**r, "fc": {"kernel": None, "bias": optax.MaskedNode()}}
  r_zero = {**r, "fc": jax.tree.map(jnp.zeros_like, r["fc"])}
  got, _ = apply_dtnh(g, [r_none], 0.4)
  want, _ = apply_dtnh(g, [r_zero], 0.4)
  jax.tree.map(np.testing.assert_allclose, got, want)


@pytest.mark.parametrize("g_dtype,r_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float16, jnp.bfloat16),
                                              (jnp.float32, jnp.float16), (jnp.bfloat16, jnp.bfloat16)])
def test_mixed_precision_keeps_leaf_dtypes_and_matches_numpy(g_dtype, r_dtype):
  g, r = case_pair("obtuse")
  g, r = jax.tree.map(lambda x: x.astype(g_dtype), g), jax.tree.map(lambda x: x.astype(r_dtype), r)
  direction, diag = apply_dtnh(g, [r], 0.3)
  for leaf in jax.tree.leaves(direction):
    assert leaf.dtype == g_dtype
  assert diag.inner_product.dtype == jnp.float32
  expected = dtnh_vectors(flat(leaves64(g)), [flat(leaves64(r))], [0.3])
  # inputs are exact in float64; the only rounding is the final cast to g's dtype
  np.testing.assert_allclose(flat(leaves64(direction)), expected, rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(diag.inner_product, flat(leaves64(g)) @ flat(leaves64(r)), rtol=1e-5)


def test_inner_products_accumulate_in_float32_for_bfloat16_gradients():
  # 4096 ones: a bfloat16 accumulator stalls at 256, float32 gets it exactly
  g = {"w": jnp.ones((4096,), jnp.bfloat16)}
  _, diag = apply_dtnh(g, [g], 1.0)
  assert float(diag.inner_product) == 4096.0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("where", ["empirical", "regularizer"])
def test_nan_and_inf_propagate_to_the_direction(bad, where):
  g, r = random_tree(17), random_tree(18)
  poisoned = {**(g if where == "empirical" else r)}
  poisoned["bn"] = {**poisoned["bn"], "bias": poisoned["bn"]["bias"].at[0].set(bad)}
  g, r = (poisoned, r) if where == "empirical" else (g, poisoned)
  direction, _ = apply_dtnh(g, [r], 0.3)
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(direction))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("where", ["empirical", "regularizer"])
def test_diagnostics_are_not_all_finite_when_a_gradient_is_not(bad, where):
  # the train step's NaN/Inf guard reads only the diagnostics (no pass over the update)
  g, r = random_tree(19), random_tree(20)
  poisoned = {**(g if where == "empirical" else r)}
  poisoned["fc"] = {**poisoned["fc"], "kernel": poisoned["fc"]["kernel"].at[1, 2].set(bad)}
  g, r = (poisoned, r) if where == "empirical" else (g, poisoned)
  for granularity in ("tree", "leaf"):
    _, diag = apply_dtnh(g, [r], 0.3, granularity=granularity)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in diag)


# --- the two invariants of the design card, as properties -------------------

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 12), elements=finite)


#: The properties' leaves are zero-padded to this many elements (the longest vector drawn), empty leaves kept empty.
WIDTH = 12


@st.composite
def gradient_pairs(draw):
  g = draw(vectors)
  r = draw(hnp.arrays(np.float32, g.shape, elements=finite))
  split = draw(st.integers(0, g.size))
  lam = draw(st.floats(0, 100, allow_nan=False))
  as_tree = lambda v: {"a": jnp.asarray(v[:split]), "b": jnp.asarray(v[split:])}
  return as_tree(g), as_tree(r), lam


@functools.partial(jax.jit, static_argnames="granularity")
def _jitted_direction(g, r, lam, granularity):
  """DTNH's direction, λ traced: one program per granularity and padded shape, shared by both properties."""
  tx = dtnh_jax.dtnh(lam, granularity=granularity)
  return tx.update((g, r), tx.init(g), g)[0]


def padded_direction(g, r, lam, granularity):
  """DTNH's direction of the pair (as ``apply_dtnh``), each non-empty leaf zero-padded to ``WIDTH`` elements: the
  same vectors in a larger space (the same inner products in every leaf, the same direction with zeros appended,
  which is checked), so that the examples of each granularity compile at most three programs (which leaf is empty),
  where ops dispatched one by one compiled their small programs again for every new pair of leaf sizes."""
  pad = lambda tree: {key: jnp.pad(leaf, (0, WIDTH - leaf.size)) if leaf.size else leaf for key, leaf in tree.items()}
  direction = _jitted_direction(pad(g), pad(r), lam, granularity)
  for key, leaf in g.items():
    np.testing.assert_array_equal(np.asarray(direction[key])[leaf.size:], 0)
  return {key: direction[key][:leaf.size] for key, leaf in g.items()}


def _tolerance(*vs):
  return 1e-4 * max(1.0, *(float(np.linalg.norm(v)) ** 2 for v in vs))


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.sampled_from(["tree", "leaf"]))
def test_direction_never_slows_the_empirical_loss(pair, granularity):
  g, r, lam = pair
  direction = padded_direction(g, r, lam, granularity)
  gv, rv, dv = (flat(leaves64(t)) for t in (g, r, direction))
  assert dv @ gv >= gv @ gv - _tolerance(gv, lam * rv)


@settings(max_examples=200, deadline=None)
@given(gradient_pairs(), st.sampled_from(["tree", "leaf"]))
def test_kept_regularizer_part_still_points_along_the_regularizer(pair, granularity):
  g, r, lam = pair
  direction = padded_direction(g, r, lam, granularity)
  gv, rv, dv = (flat(leaves64(t)) for t in (g, r, direction))
  assert (dv - gv) @ rv >= -_tolerance(lam * rv, rv) * max(1.0, lam)


def test_projection_none_is_the_plain_regularized_gradient_with_the_same_diagnostics():
  g, r = case_pair("obtuse")
  direction, diag = apply_dtnh(g, [r], 0.3, projection="none")
  np.testing.assert_allclose(flat(leaves64(direction)), flat(leaves64(g)) + 0.3 * flat(leaves64(r)),
                             rtol=1e-5, atol=1e-6)
  assert float(diag.conflict) == 1.0
  np.testing.assert_allclose(diag.angle1, diag.angle3, atol=1e-3)
  np.testing.assert_allclose(diag.angle2, diag.angle4, atol=1e-3)
