"""The never-hurt candidates (``dtnh_jax.corrections``) against NumPy references; their optax contract is
tests/test_optax_contract.py.

Each reference is written from the candidate's definition on explicit float64 vectors and keeps its own state
(the Gram–Schmidt basis, the moving average) across steps; it shares no code with ``dtnh_jax`` but the one
documented constant (the tolerance for a new direction). The cone projections are checked against a
non-negative least squares (Moreau's decomposition), a different problem from the library's choice among the
faces' projections. The 8-device check runs this file as a script in a subprocess (``_sharding_worker``), as
tests/test_sharding.py does, since the device count is fixed when JAX starts.
"""

import functools
import itertools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import dtnh_jax
from dtnh_jax import corrections
from reference import angle_degrees, dtnh_vectors, flat

SHAPES = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 5), "bias": (5,)}}
#: Each candidate as tested: a factory of ``reg_weight`` (and further options), and the options it is given.
VARIANTS = {
    "subspace": (corrections.subspace_projection, {"memory": 3}),
    "ema": (corrections.ema_projection, {"decay": 0.8}),
    "ema_guarded": (corrections.ema_projection, {"decay": 0.8, "guard_current": True}),
    "bound": (corrections.share_bound, {"kappa": 0.5}),
    "bound_after_dtnh": (corrections.share_bound, {"kappa": 0.5, "projection": "conflict"}),
    "bound_average": (corrections.share_bound, {"kappa": 0.5, "projection": "conflict", "reference": "average",
                                                "decay": 0.8}),
}
NAMES = list(VARIANTS)
STATEFUL = ["subspace", "ema", "ema_guarded", "bound_average"]


def make(name, reg_weight, **kwargs):
  factory, options = VARIANTS[name]
  return factory(reg_weight, **{**options, **kwargs})


def random_tree(seed, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def unflatten_like(tree, vector):
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    out.append(jnp.asarray(vector[offset:offset + leaf.size].reshape(leaf.shape), leaf.dtype))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


PARAMS = random_tree(0)


def conflicting_steps(count, seed, num_regularizers=1):
  """``(g, [r_i])`` trees: a persistent gradient plus noise, and regularizers pulling against it plus noise."""
  rng = np.random.default_rng(seed)
  size = sum(leaf.size for leaf in jax.tree.leaves(PARAMS))
  persistent = rng.normal(size=size)
  pulls = [-rng.uniform(0.3, 1.5) * persistent + rng.normal(size=size) for _ in range(num_regularizers)]
  steps = []
  for _ in range(count):
    g = persistent + 1.5 * rng.normal(size=size)
    rs = [pull + 0.3 * rng.normal(size=size) for pull in pulls]
    steps.append((unflatten_like(PARAMS, g), [unflatten_like(PARAMS, r) for r in rs]))
  return steps


def run(tx, steps, params=PARAMS, update=None):
  """The directions (flat float64) of ``tx`` over ``steps`` (jitted: one compile, not one per operation), and the
  last state."""
  update = update or jax.jit(tx.update)
  state, directions = tx.init(params), []
  for g, rs in steps:
    direction, state = update(g, state, params, regularizer_grads=rs[0] if len(rs) == 1 else tuple(rs))
    directions.append(flat(leaves64(direction)))
  return directions, state


#: Options that shape a candidate's program: static under jit (the weights and the other options are traced).
STATIC_OPTIONS = ("memory", "guard_current", "projection", "reference")


@functools.partial(jax.jit, static_argnames=("factory", "static"))
def _shared_update(g, state, params, regularizer_grads, reg_weight, numeric, factory, static):
  """``update`` of ``factory(reg_weight, **numeric, **static)`` with the weights and numeric options traced: one
  program per candidate, static options and number of regularizers, whatever the values, shared by the tests."""
  return factory(reg_weight, **numeric, **dict(static)).update(g, state, params, regularizer_grads=regularizer_grads)


def shared_update(factory, reg_weight, **options):
  """``factory(reg_weight, **options).update`` through the program its structure shares (:func:`_shared_update`)
  rather than one jitted for each test's values."""
  static = tuple(sorted((key, value) for key, value in options.items() if key in STATIC_OPTIONS))
  numeric = {key: value for key, value in options.items() if key not in STATIC_OPTIONS}
  return functools.partial(_shared_update, reg_weight=reg_weight, numeric=numeric, factory=factory, static=static)


def run_shared(factory, reg_weight, steps, **options):
  """:func:`run` of ``factory(reg_weight, **options)`` through :func:`shared_update`."""
  return run(factory(reg_weight, **options), steps, update=shared_update(factory, reg_weight, **options))


def run_variant(name, reg_weight, steps, **kwargs):
  """:func:`run_shared` of the variant ``name`` (with its test options)."""
  factory, options = VARIANTS[name]
  return run_shared(factory, reg_weight, steps, **{**options, **kwargs})


def flat_steps(steps):
  return [(flat(leaves64(g)), [flat(leaves64(r)) for r in rs]) for g, rs in steps]


# --- independent references ----------------------------------------------------------------------------------

class SubspaceReference:
  """subspace_projection's steps 1-3 on one group's flat vectors: Gram–Schmidt in float64, a ring of slots."""

  def __init__(self, memory):
    self.slots, self.position = [None] * (memory - 1), 0

  def step(self, g, rs, lams):
    directions = [u for u in self.slots if u is not None]
    residual = g - sum(((u @ g) * u for u in directions), np.zeros_like(g))
    new = None
    if g @ g > 0 and residual @ residual > corrections.NEW_DIRECTION_TOLERANCE * (g @ g):
      new = residual / np.linalg.norm(residual)
      directions.append(new)
    d = g.copy()
    for r, lam in zip(rs, lams):
      kept = r.copy()
      for u in directions:
        if (r @ u) * (g @ u) < 0:   # r points against g along u: that component goes
          kept = kept - (r @ u) * u
      if kept @ g < 0:              # only where g added no direction (it is then not quite in the span)
        kept = kept - (kept @ g) / (g @ g) * g
      d = d + lam * kept
    if new is not None and self.slots:
      self.slots[self.position] = new
      self.position = (self.position + 1) % len(self.slots)
    return d


def cone_projection(r, constraints):
  """The point of ``{v : <v, a> >= 0 for every a}`` nearest ``r``, by Moreau: ``r + Aᵀμ``, ``μ >= 0`` minimizing
  ``|r + Aᵀμ|`` (the projection onto the polar cone, a non-negative least squares), every support tried."""
  rows = np.array([a for a in constraints if a @ a > 0]).reshape(-1, r.size)
  best, best_value = r, np.inf
  for support in itertools.product([False, True], repeat=len(rows)):
    mu = np.zeros(len(rows))
    chosen = np.flatnonzero(support)
    if chosen.size:
      mu[chosen] = np.linalg.lstsq(rows[chosen].T, -r, rcond=None)[0]
    if np.any(mu < -1e-12):
      continue
    point = r + rows.T @ mu
    if point @ point < best_value - 1e-12 * (r @ r):
      best, best_value = point, point @ point
  return best


class EMAReference:
  """ema_projection on flat vectors: Adam's bias-corrected first moment, then A-GEM's (or GEM's) projection."""

  def __init__(self, decay, guard_current):
    self.decay, self.guard_current, self.average, self.t = decay, guard_current, 0.0, 0

  def step(self, g, rs, lams):
    self.t += 1
    self.average = self.decay * self.average + (1 - self.decay) * g
    self.corrected = self.average / (1 - self.decay ** self.t)
    constraints = [self.corrected] + ([g] if self.guard_current else [])
    return g + sum(lam * cone_projection(r, constraints) for r, lam in zip(rs, lams))


def share_bound_reference(g, rs, lams, kappa, projection, reference=None):
  """``g + s R'`` with ``|s R'| <= κ |reference|`` (``reference``: ``g`` unless given)."""
  regularizer = (dtnh_vectors(g, rs, lams) - g if projection == "conflict"
                 else sum(lam * r for r, lam in zip(rs, lams)))
  norm, bound = np.linalg.norm(regularizer), kappa * np.linalg.norm(g if reference is None else reference)
  return g + (1.0 if norm <= bound else bound / norm) * regularizer


class AverageBoundReference:
  """share_bound(reference="average") on flat vectors: the bound is κ times Adam's bias-corrected first moment."""

  def __init__(self, kappa, projection, decay):
    self.kappa, self.projection, self.decay, self.average, self.t = kappa, projection, decay, 0.0, 0

  def step(self, g, rs, lams):
    self.t += 1
    self.average = self.decay * self.average + (1 - self.decay) * g
    return share_bound_reference(g, rs, lams, self.kappa, self.projection,
                                 reference=self.average / (1 - self.decay ** self.t))


def reference_for(name, **options):
  """A fresh reference of the variant ``name`` (with its test options): ``.step(g, rs, lams) -> d``."""
  options = {**VARIANTS[name][1], **options}
  if name == "subspace":
    return SubspaceReference(options["memory"])
  if name.startswith("ema"):
    return EMAReference(options["decay"], options.get("guard_current", False))
  if options.get("reference") == "average":
    return AverageBoundReference(options["kappa"], options.get("projection", "none"), options["decay"])

  class Bound:
    step = staticmethod(lambda g, rs, lams: share_bound_reference(g, rs, lams, options["kappa"],
                                                                  options.get("projection", "none")))
  return Bound()


# --- each candidate against its reference ---------------------------------------------------------------------

@pytest.mark.parametrize("num_regularizers", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_direction_matches_the_reference_over_several_steps(name, num_regularizers):
  lams = [0.7, 0.3][:num_regularizers]
  steps = conflicting_steps(5, seed=10 + num_regularizers, num_regularizers=num_regularizers)
  directions, _ = run_variant(name, lams if num_regularizers > 1 else lams[0], steps)
  reference = reference_for(name)
  for got, (g, rs) in zip(directions, flat_steps(steps)):
    np.testing.assert_allclose(got, reference.step(g, rs, lams), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_leaf_granularity_corrects_each_leaf_on_its_own(name):
  # memory 6 is more than the 4 or 5 elements of the biases: their bases fill and g then adds no direction there
  options = {"memory": 6} if name == "subspace" else {}
  steps = conflicting_steps(7, seed=3)
  directions, _ = run(make(name, 0.7, granularity="leaf", **options), steps)
  references = [reference_for(name, **options) for _ in jax.tree.leaves(PARAMS)]
  sizes = np.cumsum([0] + [leaf.size for leaf in jax.tree.leaves(PARAMS)])
  for got, (g, rs) in zip(directions, flat_steps(steps)):
    for reference, start, stop in zip(references, sizes[:-1], sizes[1:]):
      want = reference.step(g[start:stop], [r[start:stop] for r in rs], [0.7])
      np.testing.assert_allclose(got[start:stop], want, rtol=1e-4, atol=1e-4)


def test_subspace_projection_with_memory_one_is_dtnh():
  steps = conflicting_steps(3, seed=4, num_regularizers=2)
  got, _ = run(corrections.subspace_projection([0.7, 0.3], memory=1), steps)
  want, _ = run(dtnh_jax.dtnh([0.7, 0.3]), steps)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_ema_projection_with_decay_zero_is_dtnh():
  steps = conflicting_steps(3, seed=5, num_regularizers=2)
  got, _ = run_shared(corrections.ema_projection, [0.7, 0.3], steps, decay=0.0)
  want, _ = run(dtnh_jax.dtnh([0.7, 0.3]), steps)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("second", [3.0, -0.5], ids=["average_along_g", "average_against_g"])
def test_guarded_ema_projection_where_the_average_is_parallel_to_g(second):
  """Step 1's average is g itself; after g, -0.5 g (decay 0.8) it points against g: the cone is then g's normal
  plane, and r keeps exactly its part orthogonal to g."""
  (g, rs), = conflicting_steps(1, seed=14)
  steps = [(g, rs), (jax.tree.map(lambda x: second * x, g), rs)]
  directions, _ = run_shared(corrections.ema_projection, 0.7, steps, decay=0.8, guard_current=True)
  reference = EMAReference(0.8, guard_current=True)
  for got, (gv, rvs) in zip(directions, flat_steps(steps)):
    np.testing.assert_allclose(got, reference.step(gv, rvs, [0.7]), rtol=1e-4, atol=1e-4)
  if second < 0:
    gv, (rv,) = flat_steps(steps)[1]
    np.testing.assert_allclose(directions[1], gv + 0.7 * (rv - (rv @ gv) / (gv @ gv) * gv), rtol=1e-4, atol=1e-4)


def test_share_bound_with_a_large_kappa_is_dtnh_or_the_plain_sum():
  steps = conflicting_steps(2, seed=6)
  for projection in ("none", "conflict"):
    got, _ = run(corrections.share_bound(0.7, kappa=1e6, projection=projection), steps)
    want, _ = run(dtnh_jax.dtnh(0.7, projection=projection), steps)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_without_conflict_the_direction_is_the_regularized_gradient(name):
  g = random_tree(1)
  r = unflatten_like(g, 0.3 * flat(leaves64(g)) + 0.01 * flat(leaves64(random_tree(2))))   # along g
  options = {"kappa": 10.0} if name.startswith("bound") else {}
  directions, _ = run_variant(name, 0.5, [(g, [r])] * 3, **options)
  for direction in directions:
    np.testing.assert_allclose(direction, flat(leaves64(g)) + 0.5 * flat(leaves64(r)), rtol=1e-5, atol=1e-6)


def test_share_bound_scales_the_regularizer_to_kappa_times_g():
  g, r = random_tree(7), random_tree(8)
  r = jax.tree.map(lambda x: 50.0 * x, r)
  tx = corrections.share_bound(1.0, kappa=0.25)
  direction, state = jax.jit(tx.update)((g, r), tx.init(g))
  gv, dv = flat(leaves64(g)), flat(leaves64(direction))
  np.testing.assert_allclose(np.linalg.norm(dv - gv), 0.25 * np.linalg.norm(gv), rtol=1e-5)
  np.testing.assert_allclose(float(state.removed_fraction), 1 - 0.25 * np.linalg.norm(gv) / np.linalg.norm(
      50.0 * flat(leaves64(random_tree(8)))), rtol=1e-5)


def test_share_bound_on_the_average_binds_where_noise_cancels_and_the_bound_on_g_does_not():
  # g alternates in sign (pure noise): the average is short, |m̂| << |g|, and only the average bound shrinks the pull
  g, r = random_tree(13), random_tree(14)
  steps = [(jax.tree.map(lambda x, sign=sign: sign * x, g), [r]) for sign in (1.0, -1.0, 1.0, -1.0)]
  current, _ = run_shared(corrections.share_bound, 0.2, steps, kappa=1.0)
  average, _ = run(corrections.share_bound(0.2, kappa=1.0, reference="average", decay=0.9), steps)
  gv, rv = flat_steps(steps)[-1][0], flat_steps(steps)[-1][1][0]
  assert 0.2 * np.linalg.norm(rv) < np.linalg.norm(gv)                     # below |g|: the current bound is idle
  np.testing.assert_allclose(current[-1], gv + 0.2 * rv, rtol=1e-5, atol=1e-6)
  assert np.linalg.norm(average[-1] - gv) < 0.5 * np.linalg.norm(0.2 * rv)


def test_subspace_basis_stays_orthonormal_and_fills_in_turn():
  _, state = run(corrections.subspace_projection(0.7, memory=4), conflicting_steps(5, seed=9))
  assert state.filled.tolist() == [3] and state.position.tolist() == [1]   # 5 directions written to slots 0-3, 0
  stored = [(int(state.position[0]) - j) % 4 for j in (1, 2, 3)]            # the newest three: slots 0, 3, 2
  basis = np.stack([np.concatenate([np.asarray(leaf[j], np.float64).ravel() for leaf in jax.tree.leaves(state.basis)])
                    for j in stored])
  np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("name", ["subspace", "ema"])
def test_a_non_finite_empirical_gradient_leaves_the_memory_there_as_it_was(name):
  steps = conflicting_steps(2, seed=11)
  _, state = run_variant(name, 0.7, steps[:1])
  g, rs = steps[1]
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g)
  factory, options = VARIANTS[name]
  direction, after = shared_update(factory, 0.7, **options)(bad, state, PARAMS, regularizer_grads=rs[0])
  assert not np.isfinite(flat(leaves64(direction))).all()
  if name == "ema":   # the non-finite elements keep their average; the others take the step as usual
    want = jax.tree.map(lambda m, x: jnp.where(jnp.isfinite(x), 0.8 * m + 0.2 * x, m), state.ema, bad)
    chex.assert_trees_all_close(after.ema, want, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(after.ema))
    return
  chex.assert_trees_all_equal((after.filled, after.position), (state.filled, state.position))
  kept = lambda basis: [np.delete(np.asarray(leaf), int(state.position[0]), axis=0) for leaf in jax.tree.leaves(basis)]
  chex.assert_trees_all_equal(kept(after.basis), kept(state.basis))   # all but the free slot the next one goes to


def test_unprojected_leaves_get_the_plain_sum_and_keep_no_memory():
  is_head = {"conv": {"kernel": False}, "bn": {"scale": False, "bias": False}, "fc": {"kernel": True, "bias": True}}
  steps = conflicting_steps(3, seed=12)
  for name in NAMES:
    directions, state = run(make(name, 0.7, unprojected=is_head), steps)
    body = slice(0, 4 + 4 + 72)   # jax order: bn/bias, bn/scale, conv/kernel, fc/bias, fc/kernel
    reference = reference_for(name)
    for got, (g, rs) in zip(directions, flat_steps(steps)):
      np.testing.assert_allclose(got[body], reference.step(g[body], [rs[0][body]], [0.7]), rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(got[80:], g[80:] + 0.7 * rs[0][80:], rtol=1e-6)
    for field in ("basis", "ema"):
      if hasattr(state, field):
        assert [leaf.size for leaf in jax.tree.leaves(getattr(state, field)["fc"])] == [0, 0]


@pytest.mark.parametrize("name", NAMES)
def test_diagnostics_and_removed_fraction_describe_the_returned_direction(name):
  lams = [0.5, 2.0]
  steps = conflicting_steps(2, seed=13, num_regularizers=2)
  directions, state = run_variant(name, lams, steps)
  (gv, rvs), dv = flat_steps(steps)[-1], directions[-1]
  combined = sum(lam * rv for lam, rv in zip(lams, rvs))
  diag = state.diagnostics
  np.testing.assert_allclose(diag.angle1, angle_degrees(dv, gv), atol=0.05)
  np.testing.assert_allclose(diag.angle2, angle_degrees(dv, combined), atol=0.05)
  np.testing.assert_allclose(diag.angle3, angle_degrees(gv + combined, gv), atol=0.05)
  np.testing.assert_allclose(diag.inner_product, [gv @ rv for rv in rvs], rtol=1e-5)
  np.testing.assert_allclose(diag.conflict, [float(gv @ rv < 0) for rv in rvs])
  np.testing.assert_allclose(diag.reg_weight, lams)
  removed = np.linalg.norm(gv + combined - dv) / np.linalg.norm(combined)
  np.testing.assert_allclose(state.removed_fraction, removed, rtol=1e-3, atol=1e-5)
  assert float(state.removed_fraction) > 0.01   # these steps conflict: every candidate removed something


# --- guarantees, on random inputs -------------------------------------------------------------------------------

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def sequences(draw):
  """Three steps of (g, r) on a vector of 2 or 5 elements (2: the subspace's basis fills)."""
  n = draw(st.sampled_from([2, 5]))
  return [(draw(hnp.arrays(np.float64, n, elements=finite)), draw(hnp.arrays(np.float64, n, elements=finite)))
          for _ in range(3)]


@functools.lru_cache(maxsize=None)
def injected(factory, **options):
  """``factory`` with its numeric options injected, and its jitted update: every example reuses one program."""
  tx = optax.inject_hyperparams(factory, static_args=("memory",) if "memory" in options else ())(**options)
  return tx, jax.jit(tx.update)


def run_vectors(sequence, factory, **options):
  """The directions of the candidate over the steps, with ``options`` (``reg_weight``, ``kappa``) as given."""
  static = {key: value for key, value in options.items() if isinstance(value, (bool, str)) or key == "memory"}
  numeric = {key: value for key, value in options.items() if key not in static}
  tx, update = injected(factory, **static, **{key: 0.5 for key in numeric})   # placeholders, valid for each
  state, out = tx.init({"v": jnp.zeros(sequence[0][0].size)}), []
  for key, value in numeric.items():
    state.hyperparams[key] = jnp.asarray(value, jnp.float32)
  for g, r in sequence:
    direction, state = update(({"v": jnp.asarray(g, jnp.float32)}, {"v": jnp.asarray(r, jnp.float32)}), state)
    out.append(np.asarray(direction["v"], np.float64))
  return out


def slack(g, r, lam):
  """Float32 rounding of ``<d, g>`` relative to the sizes involved."""
  return 1e-4 * (g @ g + lam * np.linalg.norm(g) * np.linalg.norm(r) + 1.0)


@settings(max_examples=40, deadline=None)
@given(sequences(), st.floats(0.1, 5))
def test_subspace_projection_never_slows_the_empirical_loss(sequence, lam):
  directions = run_vectors(sequence, corrections.subspace_projection, reg_weight=lam, memory=3)
  for (g, r), d in zip(sequence, directions):
    assert d @ g >= g @ g - slack(g, r, lam)


@settings(max_examples=40, deadline=None)
@given(sequences(), st.floats(0.1, 5), st.booleans())
# |g|² underflows to 0 in float32 while <r, g> does not: the zero constraint once ruled out every candidate
@example([(np.zeros(2), np.zeros(2)), (np.array([-1.0, 0.0]), np.zeros(2)), (np.array([0.0, 4.67e-27]),
                                                                             np.array([1.0, -1.0]))], 1.0, True)
def test_ema_projection_never_conflicts_with_the_average(sequence, lam, guard_current):
  average = np.zeros_like(sequence[0][0])
  directions = run_vectors(sequence, corrections.ema_projection, reg_weight=lam, decay=0.5, guard_current=guard_current)
  for (g, r), d in zip(sequence, directions):
    average = 0.5 * average + 0.5 * g
    assert (d - g) @ average >= -slack(average, r, lam)
    if guard_current:
      assert d @ g >= g @ g - slack(g, r, lam)


@settings(max_examples=40, deadline=None)
@given(sequences(), st.floats(0.1, 5), st.floats(0, 3), st.sampled_from(["none", "conflict"]))
def test_share_bound_keeps_the_regularizers_step_within_kappa_g(sequence, lam, kappa, projection):
  directions = run_vectors(sequence, corrections.share_bound, reg_weight=lam, kappa=kappa, projection=projection)
  for (g, r), d in zip(sequence, directions):
    # float32 rounding of d relative to the sizes involved (κ 0: g + λr − λr is g within a few ulps of |λr|)
    rounding = 1e-6 * (np.linalg.norm(g) + lam * np.linalg.norm(r)) + 1e-5
    assert np.linalg.norm(d - g) <= kappa * np.linalg.norm(g) * (1 + 1e-5) + rounding
    if projection == "conflict":
      assert d @ g >= g @ g - slack(g, r, lam)


# --- the options and the state (the optax contract: tests/test_optax_contract.py) ---------------------------

EMPIRICAL, REGULARIZER = conflicting_steps(1, seed=20)[0][0], conflicting_steps(1, seed=20)[0][1][0]


@pytest.mark.parametrize("factory,kwargs,message", [
    (corrections.subspace_projection, {"memory": 0}, "memory must be an integer >= 1"),
    (corrections.subspace_projection, {"memory": 2.5}, "memory must be an integer >= 1"),
    (corrections.ema_projection, {"decay": 1.0}, r"decay must be in \[0.0, 1.0\)"),
    (corrections.ema_projection, {"decay": -0.1}, r"decay must be in \[0.0, 1.0\)"),
    (corrections.share_bound, {"kappa": -1.0}, r"kappa must be in \[0.0, inf\)"),
    (corrections.share_bound, {"kappa": float("nan")}, r"kappa must be in"),
    (corrections.share_bound, {"projection": "sometimes"}, "projection must be one of"),
    (corrections.share_bound, {"reference": "mean"}, "reference must be one of"),
    (corrections.share_bound, {"reference": "average", "decay": 1.0}, r"decay must be in \[0.0, 1.0\)"),
])
def test_bad_options_are_refused_at_construction(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(0.1, **kwargs)


@pytest.mark.parametrize("name", STATEFUL)
def test_a_state_for_other_parameters_is_refused_with_a_message(name):
  tx = make(name, 0.1)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="call init with parameters of the structure given to update"):
    tx.update((EMPIRICAL, REGULARIZER), state, PARAMS)


# --- the same updates on 8 devices ---------------------------------------------------------------------------------

#: Leaves with an axis divisible by 8, so that each is sharded (and its state's rows too).
SHARDED_SHAPES = {"conv": {"kernel": (3, 3, 4, 16)}, "bn": {"bias": (16,)}, "fc": {"kernel": (16, 8), "bias": (8,)}}
SHARDING_TIMEOUT_S = 240


def relative_difference(ours, theirs) -> float:
  """max |a - b| / max(1, max |b|) over the leaves (float32 sums in another order on 8 devices)."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / max(1.0, float(np.max(np.abs(b), initial=0.0))))
  return worst


def _sharding_worker() -> None:
  """Each candidate's updates over 3 steps, with everything sharded over 8 devices and on one; prints JSON."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.asarray(jax.devices()), ("data",))

  def sharding(leaf):
    # the layout of dtnh_jax.train.sharding.fsdp_spec (the largest divisible axis), without its minimum size
    shape = np.shape(leaf)
    divisible = [(size, axis) for axis, size in enumerate(shape) if size % len(mesh.devices) == 0 and size]
    axis = max(divisible)[1] if divisible else None
    return NamedSharding(mesh, PartitionSpec(*["data" if i == axis else None for i in range(len(shape))]))

  params = random_tree(30, SHARDED_SHAPES)
  steps = [(random_tree(31 + i, SHARDED_SHAPES), random_tree(41 + i, SHARDED_SHAPES)) for i in range(3)]
  steps = [(g, jax.tree.map(lambda r, g: r - 0.8 * g, r, g)) for g, r in steps]   # conflicting
  result = {"devices": jax.device_count()}
  for name in NAMES:
    tx = make(name, 0.7)
    one_device, one_state = [], jax.device_put(tx.init(params), jax.devices()[0])
    for g, r in steps:
      direction, one_state = jax.jit(tx.update)(g, one_state, params, regularizer_grads=r)
      one_device.append(direction)
    state = tx.init(params)
    shardings = jax.tree.map(sharding, (params, state))
    tree_sharding = jax.tree.map(sharding, params)
    update = jax.jit(lambda g, state, params, r: tx.update(g, state, params, regularizer_grads=r),
                     in_shardings=(tree_sharding, shardings[1], tree_sharding, tree_sharding),
                     out_shardings=(tree_sharding, shardings[1]))
    state = jax.device_put(state, shardings[1])
    difference = 0.0
    for (g, r), want in zip(steps, one_device):
      direction, state = update(*jax.device_put((g, state, params, r), (tree_sharding, shardings[1], tree_sharding,
                                                                       tree_sharding)))
      difference = max(difference, relative_difference(direction, want))
    difference = max(difference, relative_difference(state, one_state))
    result[name] = {"difference": difference,
                    "sharded_state_leaves": sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state)
                                                if np.size(leaf) > 1)}
  print(json.dumps(result))


@pytest.mark.slow
def test_updates_and_states_on_eight_devices_equal_those_on_one():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(dtnh_jax.__file__)),
                                                     os.environ.get("PYTHONPATH")]))}
  process = subprocess.run([sys.executable, __file__, "sharding"], env=env, capture_output=True, text=True,
                           timeout=SHARDING_TIMEOUT_S)
  assert process.returncode == 0, process.stderr[-4000:]
  result = json.loads(process.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  for name in NAMES:
    assert result[name]["difference"] <= 1e-5, (name, result[name])   # measured <= 1e-6 (relative)
    if name in STATEFUL:
      assert result[name]["sharded_state_leaves"] > 0, (name, result[name])


if __name__ == "__main__" and sys.argv[1:] == ["sharding"]:
  _sharding_worker()
