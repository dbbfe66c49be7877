"""The gradient-surgery corrections against independent NumPy references (their optax contract: test_optax_contract.py).

Each reference is written from its paper on explicit float64 vectors, sharing
no code with ``dtnh_jax``: PCGrad's and GradVac's loops over rows, optimality
certificates for MGDA (the min-norm point of a hull), a non-negative least
squares for the dual-cone projections (UPGrad, DualProj: Moreau's
decomposition, a different problem from the library's dual QP), and a dense
search over the ball for CAGrad.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from dtnh_jax import aggregators
from reference import angle_degrees, flat

SHAPES = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 5), "bias": (5,)}}
# Options every factory needs beyond reg_weight (CAGrad has no default radius, as in TorchJD).
OPTIONS = {name: {} for name in aggregators.AGGREGATORS}
OPTIONS["cagrad"] = {"c": 0.5}
NAMES = aggregators.AGGREGATORS
SUM_OF_ROWS_WITHOUT_CONFLICT = [name for name in NAMES if name != "mgda"]


def make(name, reg_weight, **kwargs):
  return getattr(aggregators, name)(reg_weight, **{**OPTIONS[name], **kwargs})


def random_tree(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES, is_leaf=lambda s: isinstance(s, tuple))


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def unflatten_like(tree, vector):
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    out.append(jnp.asarray(vector[offset:offset + leaf.size].reshape(leaf.shape), leaf.dtype))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames="name")
def _jitted_first_step(name, g, rs, lam, options):
  """``update`` of ``name`` from its initial state, the weights and options traced: one program per tree structure
  and number of rows, whatever the values."""
  tx = make(name, lam, **options)
  return tx.update((g, *rs), tx.init(g), g)


def apply(name, g, rs, lam, **kwargs):
  """The correction's first step on trees, jitted: one compile for every call with the same trees' structure and
  number of rows (granularity and unprojected leaves, which shape the program, compile a program of their own).
  Dispatched op by op instead, each op compiled on its own for every shape: most of this file's time."""
  options = {**OPTIONS[name], **kwargs}
  structural = {key: options.pop(key) for key in ("granularity", "unprojected") if key in options}
  if structural:
    tx = make(name, lam, **options, **structural)
    return jax.jit(tx.update)((g, *rs), tx.init(g), g)
  return _jitted_first_step(name, g, tuple(rs), lam, options)


#: The rows given to ``direction_of`` are zero-padded to this many entries (the widest: the test tree's 105).
WIDTH = 128


def direction_of(name, rows, **kwargs):
  """The correction of the flat float64 rows [g, r_1, ...] with λ = 1, as a flat vector.

  The rows go in float32 with zeros appended up to ``WIDTH`` entries: the same vectors in a larger space (the same
  Gram matrix, the same direction with zeros appended, which is checked), so that every case of a correction with
  as many rows runs one compiled program (``apply``), whatever its width.
  """
  width = len(rows[0])
  assert width <= WIDTH
  g, *rs = ({"v": jnp.asarray(np.pad(row, (0, WIDTH - width)), jnp.float32)} for row in rows)
  direction, _ = apply(name, g, rs, 1.0 if len(rs) == 1 else [1.0] * len(rs), **kwargs)
  direction = np.asarray(direction["v"], np.float64)
  np.testing.assert_array_equal(direction[width:], 0)
  return direction[:width]


# --- independent references ------------------------------------------------------


def pcgrad_reference(rows):
  """Yu et al., Algorithm 1, other rows in index order."""
  out = []
  for i, row in enumerate(rows):
    v = row.copy()
    for j, other in enumerate(rows):
      if j != i and v @ other < 0 and other @ other > 0:
        v = v - (v @ other) / (other @ other) * other
    out.append(v)
  return sum(out)


def gradvac_reference(rows, targets, beta, eps=1e-8):
  """Wang et al., Algorithm 1 (index order), eps relative to the trace as documented; updates ``targets`` in place."""
  scale = np.sqrt(sum(row @ row for row in rows))
  rows_n = [row / scale for row in rows] if scale > 0 else rows
  out = []
  for i in range(len(rows)):
    v = rows_n[i].copy()
    for j in range(len(rows)):
      if j == i:
        continue
      other = rows_n[j]
      cosine = v @ other / (np.linalg.norm(v) * np.linalg.norm(other) + eps)
      wanted = targets[i, j]
      if cosine < wanted:
        v = v + np.linalg.norm(v) * (wanted * np.sqrt(1 - cosine ** 2) - cosine * np.sqrt(1 - wanted ** 2)) / (
            np.linalg.norm(other) * np.sqrt(1 - wanted ** 2) + eps) * other
      targets[i, j] = (1 - beta) * wanted + beta * cosine
    out.append(v)
  return sum(out) * scale


def cone_projection_reference(x, rows):
  """π onto {y : <y, V_j> >= 0 ∀j} by Moreau: x minus its projection onto the polar cone {-Vᵀμ : μ >= 0}.

  The polar projection is a non-negative least squares, min |x + Vᵀμ|² over μ >= 0, solved
  by trying every support with ``lstsq`` and keeping the one that meets the KKT conditions.
  """
  v = np.asarray(rows)
  best, best_value = None, np.inf
  for support in itertools.product([False, True], repeat=len(rows)):
    mu = np.zeros(len(rows))
    idx = np.flatnonzero(support)
    if idx.size:
      mu[idx] = np.linalg.lstsq(v[idx].T, -x, rcond=None)[0]
    if np.any(mu < -1e-12):
      continue
    residual = x + v.T @ mu
    value = residual @ residual
    if value < best_value:
      best, best_value = residual, value
  return best


def cagrad_reference(rows, c, grid=721, radii=41):
  """max over |x - Σ V| <= c |Σ V| of min_i <V_i, x>, for two rows: a dense search in their plane."""
  g0 = sum(rows)
  e1 = g0 / np.linalg.norm(g0)
  other = rows[0] - (rows[0] @ e1) * e1
  e2 = other / np.linalg.norm(other)
  angles = np.linspace(0, 2 * np.pi, grid)
  best, best_value = None, -np.inf
  for rho in np.linspace(0, 1, radii):
    xs = g0[None] + rho * c * np.linalg.norm(g0) * (np.cos(angles)[:, None] * e1 + np.sin(angles)[:, None] * e2)
    values = np.min(np.stack([xs @ row for row in rows]), axis=0)
    k = np.argmax(values)
    if values[k] > best_value:
      best, best_value = xs[k], values[k]
  return best, best_value


# --- geometry: each correction against its reference ------------------------------

def random_rows(seed, m, n=6, kind="random"):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(m, n))
  if kind == "near_opposite":
    rows[1] = -rows[0] * rng.uniform(0.3, 3) + 0.05 * rng.normal(size=n)
  elif kind == "near_parallel":
    rows[1] = rows[0] * rng.uniform(0.3, 3) + 0.05 * rng.normal(size=n)
  elif kind == "zero_row":
    rows[-1] = 0
  elif kind == "scales":
    rows = rows * np.logspace(0, -2, m)[:, None]
  return list(rows)


KINDS = ["random", "near_opposite", "near_parallel", "zero_row", "scales"]


def float32_tolerance(kind, rows):
  """Absolute tolerance for a direction computed in float32 from the rows' Gram matrix.

  Nearly opposite rows make the dual-cone QPs ill-conditioned (smallest eigenvalue of the trace-normalized Gram
  matrix ~1e-5) and their weights large (~30): float32 then resolves the direction to ~1e-3 of the rows' size.
  """
  return (2e-3 if kind == "near_opposite" else 2e-5) * max(np.linalg.norm(row) for row in rows)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_pcgrad_matches_the_papers_loop(m, kind):
  rows = random_rows(m * 10 + KINDS.index(kind), m, kind=kind)
  np.testing.assert_allclose(direction_of("pcgrad", rows), pcgrad_reference(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_gradvac_matches_the_papers_loop_over_several_steps(m):
  tx = make("gradvac", 1.0 if m == 2 else [1.0] * (m - 1), beta=0.3)
  state, targets, update = None, np.zeros((m, m)), jax.jit(tx.update)
  for step in range(4):
    rows = random_rows(100 + step, m, kind="near_opposite" if step % 2 else "random")
    g = {"v": jnp.asarray(rows[0], jnp.float32)}
    rs = [{"v": jnp.asarray(row, jnp.float32)} for row in rows[1:]]
    state = tx.init(g) if state is None else state
    direction, state = update((g, *rs), state, g)
    want = gradvac_reference(rows, targets, beta=0.3)
    np.testing.assert_allclose(np.asarray(direction["v"]), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.target_cosine[0]), targets, atol=1e-4)   # float32 cosines


def test_gradvac_first_step_is_pcgrad():
  rows = random_rows(7, 3, kind="near_opposite")
  np.testing.assert_allclose(direction_of("gradvac", rows), pcgrad_reference(rows), rtol=1e-5, atol=1e-5)


_jitted_mgda_weights = jax.jit(aggregators.mgda_weights)   # one compile per number of rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_mgda_is_the_min_norm_point_of_the_hull(m, kind):
  rows = random_rows(m * 20 + KINDS.index(kind), m, kind=kind)
  d = direction_of("mgda", rows)
  scale = max(row @ row for row in rows)
  # Optimality in the hull: <d, V_i> >= |d|² for every row (d is then the min-norm point) ...
  assert min(d @ row for row in rows) >= d @ d - 1e-5 * scale
  # ... and d is in the hull: a convex combination of the rows (non-negative least squares on the simplex).
  weights = _jitted_mgda_weights(jnp.asarray(np.array(rows) @ np.array(rows).T, jnp.float32)[None])[0]
  assert float(weights.min()) >= 0 and abs(float(weights.sum()) - 1) < 1e-6
  np.testing.assert_allclose(np.asarray(weights, np.float64) @ np.array(rows), d, atol=1e-5 * np.sqrt(scale))


def test_mgda_of_three_rows_beats_every_point_of_a_dense_simplex_grid():
  rows = np.array(random_rows(3, 3, n=4))
  d = direction_of("mgda", list(rows))
  grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 201) for b in np.linspace(0, 1, 201) if a + b <= 1])
  points = grid @ rows
  assert d @ d <= np.min(np.sum(points ** 2, axis=1)) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_dualproj_is_the_projection_of_the_sum_onto_the_dual_cone(m, kind):
  rows = random_rows(m * 30 + KINDS.index(kind), m, kind=kind)
  want = cone_projection_reference(sum(rows), rows)
  np.testing.assert_allclose(direction_of("dualproj", rows), want, atol=float32_tolerance(kind, rows))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [2, 3, 4])
def test_upgrad_is_the_sum_of_each_rows_projection_onto_the_dual_cone(m, kind):
  rows = random_rows(m * 40 + KINDS.index(kind), m, kind=kind)
  want = sum(cone_projection_reference(row, rows) for row in rows)
  np.testing.assert_allclose(direction_of("upgrad", rows), want, atol=float32_tolerance(kind, rows))


def test_torchjds_regularization_lets_the_projection_conflict_with_a_small_row():
  """Why reg_eps defaults to 0: with TorchJD's 1e-4, a row of squared norm ~1e-5 of the trace is nearly ignored."""
  rows = random_rows(9, 2)
  rows[1] = 3e-3 * (rows[1] - 2 * (rows[1] @ rows[0]) / (rows[0] @ rows[0]) * rows[0])   # small, and conflicting
  if rows[1] @ rows[0] > 0:
    rows[1] = -rows[1]
  exact = direction_of("upgrad", rows)
  biased = direction_of("upgrad", rows, reg_eps=1e-4)
  assert exact @ rows[1] >= -1e-9 and biased @ rows[1] < -1e-2 * np.linalg.norm(rows[0]) * np.linalg.norm(rows[1])


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["random", "near_opposite", "near_parallel", "scales"])
def test_cagrad_of_two_rows_is_the_best_worst_case_point_of_the_ball(kind, c):
  rows = random_rows(50 + KINDS.index(kind), 2, kind=kind)
  d = direction_of("cagrad", rows, c=c)
  best, best_value = cagrad_reference(rows, c)
  g0 = sum(rows)
  scale = max(np.linalg.norm(row) for row in rows) ** 2
  assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-5)          # in the ball
  assert min(d @ row for row in rows) >= best_value - 1e-5 * scale                # at least the grid's best
  # the grid's spacing (0.5° on the rim) bounds how far its best can be from the maximizer
  np.testing.assert_allclose(d, best, atol=2e-2 * np.linalg.norm(g0))


def test_cagrad_with_zero_radius_is_the_sum():
  rows = random_rows(61, 3, kind="near_opposite")
  np.testing.assert_allclose(direction_of("cagrad", rows, c=0.0), sum(rows), rtol=1e-5, atol=1e-6)


def test_cagrad_of_pareto_stationary_rows_is_zero():
  rows = random_rows(62, 2)
  rows[1] = -2.0 * rows[0]
  np.testing.assert_allclose(direction_of("cagrad", rows, c=1.5), 0, atol=1e-6)


# --- what each correction does with DTNH's edge cases -----------------------------

def edge_rows(case):
  rng = np.random.default_rng(3)
  g, base = rng.normal(size=8), rng.normal(size=8)
  orthogonal = base - (base @ g) / (g @ g) * g
  return {
      "acute": [g, orthogonal + 0.7 * g],
      "orthogonal": [g, orthogonal],
      "exactly_aligned": [g, 3.0 * g],
      "exactly_opposite": [g, -2.5 * g],
      "zero_empirical": [np.zeros(8), base],
      "zero_regularizer": [g, np.zeros(8)],
      "both_zero": [np.zeros(8), np.zeros(8)],
  }[case]


EDGE_CASES = ["acute", "orthogonal", "exactly_aligned", "exactly_opposite", "zero_empirical", "zero_regularizer",
              "both_zero"]


def expected_edge(name, rows):
  g, r = rows
  if name in ("pcgrad", "gradvac"):
    return pcgrad_reference(rows)
  if name == "mgda":
    if g @ g == 0 or r @ r == 0:
      return np.zeros_like(g)
    t = np.clip((r @ r - g @ r) / ((g - r) @ (g - r)), 0, 1) if (g - r) @ (g - r) > 0 else 0.5
    return t * g + (1 - t) * r
  if name == "dualproj":
    return cone_projection_reference(g + r, rows)
  if name == "upgrad":
    return cone_projection_reference(g, rows) + cone_projection_reference(r, rows)
  return None


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_edge_cases_are_finite_and_match_the_reference(name, case):
  rows = edge_rows(case)
  d = direction_of(name, rows)
  assert np.all(np.isfinite(d))
  want = expected_edge(name, rows)
  if want is None:   # CAGrad: no closed form; in the ball, and zero when the rows cancel
    g0 = sum(rows)
    assert np.linalg.norm(d - g0) <= 0.5 * np.linalg.norm(g0) * (1 + 1e-5) + 1e-6
    return
  np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SUM_OF_ROWS_WITHOUT_CONFLICT)
def test_without_conflict_the_direction_is_the_regularized_gradient_like_dtnh(name):
  g, r = random_tree(1), random_tree(2)
  r = unflatten_like(r, np.abs(flat(leaves64(r))) * np.sign(flat(leaves64(g))))   # <g_i, r_i> >= 0 everywhere
  direction, _ = apply(name, g, [r], 0.3, **({"c": 0.0} if name == "cagrad" else {}))
  np.testing.assert_allclose(flat(leaves64(direction)), flat(leaves64(g)) + 0.3 * flat(leaves64(r)), rtol=1e-5,
                             atol=1e-6)


# --- properties --------------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def row_pairs(draw):
  n = draw(st.integers(2, 8))
  g = draw(hnp.arrays(np.float64, n, elements=finite))
  r = draw(hnp.arrays(np.float64, n, elements=finite))
  return [g, r]


def _scale(rows):
  return max(1.0, max(float(row @ row) for row in rows))


@settings(max_examples=40, deadline=None)
@given(row_pairs(), st.sampled_from(["upgrad", "dualproj", "pcgrad"]))
def test_projections_conflict_with_no_row(rows, name):
  d = direction_of(name, rows)
  assert min(d @ row for row in rows) >= -1e-4 * _scale(rows)


@settings(max_examples=40, deadline=None)
@given(row_pairs())
def test_mgda_improves_every_row_by_at_least_its_own_squared_norm(rows):
  d = direction_of("mgda", rows)
  # The solver picks the face whose float32 objective |d|² is lowest, so it may return any point of the hull
  # within ε = 2 eps32 · scale of the min-norm value. Along the segment from such a d to a row r,
  # |d + s(r - d)|² >= |d|² - ε gives d·r >= |d|² - sqrt(ε) |r - d|: the KKT condition holds to that slack
  # (hypothesis found g = [1, 45, 0, 0], r = [0, 45, 82.5, 3], where the vertex g is 7e-8 above the optimum
  # relatively and d·r falls 1 short of |d|² = 2026).
  slack = np.sqrt(2 * np.finfo(np.float32).eps * _scale(rows))
  for row in rows:
    assert d @ row >= d @ d - 1e-4 * _scale(rows) - slack * np.linalg.norm(row - d)


# --- on whole trees, and the options (the optax contract: tests/test_optax_contract.py) ------------

PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2, 0.3])}
EMPIRICAL = {"w": jnp.array([[0.3, -1.0], [0.2, 0.5]]), "b": jnp.array([1.0, 0.5, -0.4])}
REGULARIZER = {"w": jnp.array([[-0.5, 0.8], [0.1, -0.2]]), "b": jnp.array([-1.0, 0.2, 0.1])}


@pytest.mark.parametrize("name", NAMES)
def test_direction_matches_the_reference_on_the_whole_tree(name):
  # shaped as test_without_conflict_...'s trees (one program for both), r turned against g: the correction acts
  g = random_tree(14)
  r = jax.tree.map(lambda a, b: a - 0.5 * b, random_tree(15), g)
  rows = [flat(leaves64(g)), 0.5 * flat(leaves64(r))]
  assert rows[0] @ rows[1] < 0
  direction, _ = apply(name, g, [r], 0.5)
  want = direction_of(name, rows)
  np.testing.assert_allclose(flat(leaves64(direction)), want, rtol=1e-5, atol=1e-6)
  if name in ("pcgrad", "gradvac"):
    np.testing.assert_allclose(want, pcgrad_reference(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_leaf_granularity_corrects_each_leaf_on_its_own(name):
  g, r = random_tree(3), random_tree(4)
  direction, _ = apply(name, g, [r], 0.7, granularity="leaf")
  for got, g_leaf, r_leaf in zip(leaves64(direction), leaves64(g), leaves64(r)):
    want = direction_of(name, [g_leaf.ravel(), 0.7 * r_leaf.ravel()])
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_unprojected_leaves_get_the_plain_sum_and_stay_out_of_the_gram_matrix(name):
  g, r = random_tree(5), random_tree(6)
  is_head = {"conv": {"kernel": False}, "bn": {"scale": False, "bias": False}, "fc": {"kernel": True, "bias": True}}
  direction, _ = apply(name, g, [r], 0.7, unprojected=is_head)
  body = [0, 1, 2]   # jax order: bn/bias, bn/scale, conv/kernel, fc/bias, fc/kernel
  got, gl, rl = leaves64(direction), leaves64(g), leaves64(r)
  want = direction_of(name, [flat([gl[i] for i in body]), 0.7 * flat([rl[i] for i in body])])
  np.testing.assert_allclose(flat([got[i] for i in body]), want, rtol=1e-4, atol=1e-5)
  for i in (3, 4):
    np.testing.assert_allclose(got[i], gl[i] + 0.7 * rl[i], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_describe_the_returned_direction(name):
  lams = [0.5, 2.0, 0.3]   # as many rows as test_several_regularizers_...: one program for both
  g, *rs = (random_tree(s) for s in (7, 8, 9, 16))
  direction, state = apply(name, g, rs, lams)
  gv, dv = flat(leaves64(g)), flat(leaves64(direction))
  rvs = [flat(leaves64(r)) for r in rs]
  combined = sum(lam * rv for lam, rv in zip(lams, rvs))
  diag = state.diagnostics
  np.testing.assert_allclose(diag.angle1, angle_degrees(dv, gv), atol=0.05)
  np.testing.assert_allclose(diag.angle2, angle_degrees(dv, combined), atol=0.05)
  np.testing.assert_allclose(diag.angle3, angle_degrees(gv + combined, gv), atol=0.05)
  np.testing.assert_allclose(diag.inner_product, [gv @ rv for rv in rvs], rtol=1e-5)
  np.testing.assert_allclose(diag.conflict, [float(gv @ rv < 0) for rv in rvs])
  np.testing.assert_allclose(diag.reg_weight, lams)


@pytest.mark.parametrize("name", NAMES)
def test_several_regularizers_match_the_reference_on_the_weighted_rows(name):
  lams = [0.5, 2.0, 0.1]
  g, *rs = (random_tree(s) for s in (10, 11, 12, 13))
  direction, _ = apply(name, g, rs, lams)
  rows = [flat(leaves64(g))] + [lam * flat(leaves64(r)) for lam, r in zip(lams, rs)]
  want = direction_of(name, rows)
  np.testing.assert_allclose(flat(leaves64(direction)), want, rtol=1e-4, atol=1e-5)
  if name == "pcgrad":
    np.testing.assert_allclose(want, pcgrad_reference(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory,kwargs,message", [
    (aggregators.cagrad, {"c": -0.5}, "c must be >= 0"),
    (aggregators.upgrad, {"reg_eps": -1e-4}, "reg_eps must be >= 0"),
    (aggregators.dualproj, {"reg_eps": float("nan")}, "reg_eps must be >= 0"),
    (aggregators.gradvac, {"beta": 1.5}, r"beta must be in \[0, 1\]"),
])
def test_bad_options_are_refused_at_construction(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(0.1, **kwargs)


def test_gradvac_state_holds_one_target_matrix_per_projected_group():
  tx = aggregators.gradvac([0.1, 0.2], granularity="leaf", unprojected={"w": False, "b": True})
  state = tx.init(PARAMS)
  assert state.target_cosine.shape == (1, 3, 3)
  _, state = jax.jit(tx.update)((EMPIRICAL, REGULARIZER, REGULARIZER), state, PARAMS)
  assert float(jnp.abs(state.target_cosine).sum()) > 0

