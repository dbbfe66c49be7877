"""dtnh() in optax chains, with schedules and injected weights, its errors, non-finite gradients and max_angle.

The optax contract that dtnh shares with every correction (optax/contrib/_common_test.py's bar) is
tests/test_optax_contract.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dtnh_jax
from reference import dtnh_vectors, flat

PARAMS = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.1, -0.2, 0.3])}
SOURCE = jax.tree.map(lambda x: x + 1.0, PARAMS)


def empirical_loss(params):
  return jnp.sum(jnp.sin(params["w"]) ** 2) + jnp.sum((params["b"] - 2.0) ** 2)


def l2_sp(params):
  return 0.5 * sum(jnp.sum((p - s) ** 2) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(SOURCE)))


def grads(params):
  return jax.grad(empirical_loss)(params), jax.grad(l2_sp)(params)


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_inject_hyperparams_can_change_the_weight_between_steps():
  injected = optax.inject_hyperparams(dtnh_jax.dtnh)(reg_weight=0.3)
  state = injected.init(PARAMS)
  state.hyperparams["reg_weight"] = jnp.asarray(2.0)
  direction, state = injected.update(grads(PARAMS), state, PARAMS)
  want, _ = dtnh_jax.dtnh(2.0).update(grads(PARAMS), dtnh_jax.dtnh(2.0).init(PARAMS), PARAMS)
  chex.assert_trees_all_close(direction, want, rtol=1e-6)


def test_chain_with_sgd_momentum_equals_sgd_on_the_dtnh_direction():
  lam, lr = 0.5, 0.05
  tx = optax.chain(dtnh_jax.dtnh(lam), optax.sgd(lr, momentum=0.9))
  state = tx.init(PARAMS)
  params, velocity = PARAMS, None
  for _ in range(3):
    g, r = grads(params)
    updates, state = tx.update((g, r), state, params)
    d = dtnh_vectors(flat(leaves64(g)), [flat(leaves64(r))], [lam])
    velocity = d if velocity is None else d + 0.9 * velocity
    np.testing.assert_allclose(flat(leaves64(updates)), -lr * velocity, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_chain_with_adam_equals_adam_on_the_dtnh_direction():
  lam = 0.5
  tx = optax.chain(dtnh_jax.dtnh(lam), optax.adam(1e-2))
  adam = optax.adam(1e-2)
  state, adam_state = tx.init(PARAMS), adam.init(PARAMS)
  params = PARAMS
  for _ in range(3):
    g, r = grads(params)
    updates, state = tx.update((g, r), state, params)
    d, _ = dtnh_jax.dtnh(lam).update((g, r), dtnh_jax.dtnh(lam).init(params), params)
    want, adam_state = adam.update(d, adam_state, params)
    chex.assert_trees_all_close(updates, want, rtol=1e-6)
    params = optax.apply_updates(params, updates)


def test_diagnostics_are_found_in_a_chain_state_by_name():
  tx = optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.01, momentum=0.9))
  _, state = tx.update(grads(PARAMS), tx.init(PARAMS), PARAMS)
  diagnostics = optax.tree.get(state, "diagnostics")
  assert diagnostics is state[0].diagnostics
  assert float(diagnostics.empirical_norm) > 0


def test_tree_map_params_leaves_the_state_usable():
  tx = optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.01, momentum=0.9))
  state = optax.tree.map_params(tx, lambda v: v, tx.init(PARAMS))
  tx.update(grads(PARAMS), state, PARAMS)


# --- errors ------------------------------------------------------------------

def test_structure_mismatch_names_the_first_differing_path():
  g, r = grads(PARAMS)
  r = {"w": r["w"], "c": r["b"]}
  with pytest.raises(ValueError, match=r"\['b'\].*\['c'\]"):
    dtnh_jax.dtnh(0.1).update((g, r), dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


def test_missing_leaf_in_the_regularizer_is_named():
  g, r = grads(PARAMS)
  with pytest.raises(ValueError, match=r"lacks the leaf \['w'\]"):
    dtnh_jax.dtnh(0.1).update((g, {"b": r["b"]}), dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


def test_shape_mismatch_names_the_leaf_and_both_shapes():
  g, r = grads(PARAMS)
  r = {**r, "b": jnp.zeros(4)}
  with pytest.raises(ValueError, match=r"\['b'\] has shape \(4,\).*\(3,\)"):
    dtnh_jax.dtnh(0.1).update((g, r), dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


@pytest.mark.parametrize("updates", [{"w": 1.0}, (PARAMS,), [PARAMS]])
def test_updates_that_are_not_a_tuple_of_gradients_raise_type_error(updates):
  with pytest.raises(TypeError, match=r"tuple \(empirical_grad, regularizer_grad"):
    dtnh_jax.dtnh(0.1).update(updates, dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


def test_single_gradient_that_happens_to_be_a_tuple_is_refused():
  params = (jnp.ones(2), jnp.ones(3))
  with pytest.raises(TypeError, match="single pytree shaped like the parameters"):
    dtnh_jax.dtnh(0.1).update(params, dtnh_jax.dtnh(0.1).init(params), params)


def test_number_of_weights_must_match_number_of_regularizers():
  g, r = grads(PARAMS)
  with pytest.raises(ValueError, match="2 regularizer gradient.*1 reg_weight"):
    dtnh_jax.dtnh(0.1).update((g, r, r), dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


@pytest.mark.parametrize("kwargs,message", [
    ({"reg_weight": -1.0}, "reg_weight must be >= 0"),
    ({"reg_weight": 0.1, "projection": "sometimes"}, "projection must be one of"),
])
def test_bad_options_are_refused_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dtnh_jax.dtnh(**kwargs)


def test_negative_numpy_reg_weight_is_refused():
  with pytest.raises(ValueError, match=r"reg_weight must be >= 0 and finite, got -1\.0"):
    dtnh_jax.dtnh(np.float32(-1))


def test_negative_jax_reg_weight_is_refused():
  with pytest.raises(ValueError, match=r"reg_weight must be >= 0 and finite, got -0\.5"):
    dtnh_jax.dtnh(jnp.array(-0.5))


@pytest.mark.parametrize("weight", [float("nan"), np.float64("nan"), jnp.array(jnp.nan)],
                         ids=["python", "numpy", "jax"])
def test_nan_reg_weight_is_refused(weight):
  with pytest.raises(ValueError, match="got nan"):
    dtnh_jax.dtnh(weight)


@pytest.mark.parametrize("weight", [float("inf"), np.float32("inf"), jnp.array(jnp.inf)],
                         ids=["python", "numpy", "jax"])
def test_infinite_reg_weight_is_refused(weight):
  with pytest.raises(ValueError, match="got inf"):
    dtnh_jax.dtnh(weight)


def test_bad_weight_in_a_sequence_is_named_by_its_index():
  with pytest.raises(ValueError, match=r"got nan at reg_weight\[1\] \(the weight of regularizer gradient #2\)"):
    dtnh_jax.dtnh([0.1, np.float64("nan")])


def test_bad_weight_in_a_1d_array_is_named_by_its_index():
  with pytest.raises(ValueError, match=r"got -1\.0 at reg_weight\[1\]"):
    dtnh_jax.dtnh(jnp.array([0.1, -1.0]))


def test_eager_inject_hyperparams_refuses_a_negative_weight():
  injected = optax.inject_hyperparams(dtnh_jax.dtnh)(reg_weight=0.3)
  state = injected.init(PARAMS)
  state.hyperparams["reg_weight"] = jnp.asarray(-0.5)
  with pytest.raises(ValueError, match="reg_weight must be >= 0"):
    injected.update(grads(PARAMS), state, PARAMS)


def test_non_numeric_reg_weight_is_refused_with_type_error():
  with pytest.raises(TypeError, match="reg_weight must hold real numbers or schedules"):
    dtnh_jax.dtnh("0.1")


def test_unknown_granularity_string_is_refused():
  with pytest.raises(ValueError, match="granularity must be one of"):
    dtnh_jax.dtnh(0.1, granularity="layer").update(grads(PARAMS), dtnh_jax.dtnh(0.1).init(PARAMS), PARAMS)


def test_projection_groups_reports_the_grouping():
  grouping = dtnh_jax.projection_groups(PARAMS, "leaf", unprojected={"w": False, "b": True})
  assert grouping.num_groups == 1
  assert grouping.leaf_group == (1, 0)  # leaves in jax order: b, w


# --- non-finite gradients ------------------------------------------------------

def _guarded_sgd():
  """The composition the docstring recommends: apply_if_finite after dtnh."""
  return optax.chain(
      dtnh_jax.dtnh(0.1), optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=3)
  )


def _with_nan(tree):
  return {**tree, "b": tree["b"].at[1].set(jnp.nan)}


@pytest.mark.parametrize("poisoned", ["empirical", "regularizer"])
def test_apply_if_finite_after_dtnh_skips_a_step_with_nan(poisoned):
  tx = _guarded_sgd()
  _, state = tx.update(grads(PARAMS), tx.init(PARAMS), PARAMS)  # builds up momentum
  g, r = grads(PARAMS)
  bad = (_with_nan(g), r) if poisoned == "empirical" else (g, _with_nan(r))
  updates, new_state = jax.jit(tx.update)(bad, state, PARAMS)
  chex.assert_trees_all_equal(optax.apply_updates(PARAMS, updates), PARAMS)
  chex.assert_trees_all_equal(new_state[1].inner_state, state[1].inner_state)  # momentum kept
  assert int(new_state[1].notfinite_count) == 1 and not bool(new_state[1].last_finite)


def test_apply_if_finite_after_dtnh_applies_the_next_finite_step():
  tx, plain = _guarded_sgd(), optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.1, momentum=0.9))
  state, plain_state = tx.init(PARAMS), plain.init(PARAMS)
  g, r = grads(PARAMS)
  _, state = tx.update((g, _with_nan(r)), state, PARAMS)
  updates, state = tx.update((g, r), state, PARAMS)
  want, _ = plain.update((g, r), plain_state, PARAMS)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  assert int(state[1].notfinite_count) == 0


def test_apply_if_finite_around_the_whole_chain_with_the_tuple_form_is_unsupported():
  """Pins the limitation the docstring documents (optax's own lax.cond error)."""
  tx = optax.apply_if_finite(optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.1)), max_consecutive_errors=3)
  with pytest.raises(TypeError, match="same (pytree|type) structure"):
    tx.update(grads(PARAMS), tx.init(PARAMS), PARAMS)


# --- max_angle: the paper's Eq. 5 ------------------------------------------------------

from hypothesis import assume, example, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from reference import angle_degrees  # noqa: E402


def eq5_brute_force(g, reg, s, step_degrees=0.01):
  """Eq. 5 by search: of unit directions in the plane of g and R (a dense grid), the closest to g within s of R."""
  e1 = g / np.linalg.norm(g)
  other = reg - (reg @ e1) * e1
  e2 = other / np.linalg.norm(other)
  phi = np.radians(np.arange(0, 360, step_degrees))
  directions = np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2
  to_g = np.degrees(np.arccos(np.clip(directions @ e1, -1, 1)))
  to_reg = np.degrees(np.arccos(np.clip(directions @ reg / np.linalg.norm(reg), -1, 1)))
  feasible = to_reg <= s + step_degrees / 2   # the grid's nearest point to the boundary (s = 0: R itself)
  best = np.argmin(np.where(feasible, to_g, np.inf))
  return directions[best], to_g[best]


def eq5_apply(g, rs, lam, s, **kwargs):
  g_tree = {"a": jnp.asarray(g[:3], jnp.float32), "b": jnp.asarray(g[3:], jnp.float32)}
  r_trees = [{"a": jnp.asarray(r[:3], jnp.float32), "b": jnp.asarray(r[3:], jnp.float32)} for r in rs]
  tx = dtnh_jax.dtnh(lam, max_angle=s, **kwargs)
  direction, state = tx.update((g_tree, *r_trees), tx.init(g_tree), g_tree)
  return flat(leaves64(direction)), state.diagnostics


def check_eq5(g, rs, lams, s, direction):
  """The direction solves Eq. 5 (against the brute force), meets its constraint and has Algorithm 1's length."""
  reg = sum(lam * r for lam, r in zip(lams, rs))
  best, best_angle = eq5_brute_force(g, reg, s)
  assert angle_degrees(direction, reg) <= s + 1e-2                                   # the constraint holds
  np.testing.assert_allclose(angle_degrees(direction, g), best_angle, atol=0.02)   # the smallest angle to g
  np.testing.assert_allclose(direction / np.linalg.norm(direction), best, atol=5e-4)
  residual = direction - np.linalg.lstsq(np.stack([g, reg], 1), direction, rcond=None)[0] @ np.stack([g, reg])
  assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(direction)               # in the plane of g and R
  np.testing.assert_allclose(np.linalg.norm(direction), np.linalg.norm(dtnh_vectors(g, rs, lams)), rtol=1e-5)


RNG = np.random.default_rng(42)
G_VEC, R_VEC = RNG.normal(size=7), RNG.normal(size=7)


@pytest.mark.parametrize("s", [0.0, 10.0, 45.0, 90.0, 120.0, 179.0])
@pytest.mark.parametrize("lam", [0.3, 2.0])
@pytest.mark.parametrize("sign", [1, -1])
def test_max_angle_solves_eq5_like_a_brute_force_search_in_the_plane(s, lam, sign):
  r = sign * R_VEC - (0.5 if sign < 0 else 0) * G_VEC     # obtuse and acute pairs
  direction, diag = eq5_apply(G_VEC, [r], lam, s)
  check_eq5(G_VEC, [r], [lam], s, direction)
  np.testing.assert_allclose(diag.angle1, angle_degrees(direction, G_VEC), atol=0.05)
  assert float(diag.angle2) <= s + 0.05


@pytest.mark.parametrize("s", [30.0, 90.0])
def test_max_angle_with_several_regularizers_constrains_their_weighted_sum(s):
  rs = [RNG.normal(size=7) for _ in range(3)]
  lams = [0.5, 1.0, 0.2]
  direction, _ = eq5_apply(G_VEC, rs, lams, s)
  check_eq5(G_VEC, rs, lams, s, direction)


finite_vectors = hnp.arrays(np.float64, 7, elements=st.floats(-10, 10, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(finite_vectors, finite_vectors, st.floats(0.05, 5), st.floats(0, 180))
# nearly antiparallel with a large projection scale: float32 cancellation once put |d| off by 3e-5 (CI, 2026-12-07)
@example(np.ones(7), np.array([-8.5] + [-9.0] * 6), 1.0, 0.0)
def test_max_angle_matches_the_brute_force_on_random_pairs(g, r, lam, s):
  reg = lam * r
  norms = np.linalg.norm(g) * np.linalg.norm(reg)
  # away from degenerate pairs (zero or (anti)parallel: their own tests) and from the grid's edge
  assume(norms > 1e-3 and 1 - abs(g @ reg) / norms > 1e-4 and abs(angle_degrees(g, reg) - s) > 0.05)
  direction, _ = eq5_apply(g, [r], lam, s)
  check_eq5(g, [r], [lam], s, direction)


def test_max_angle_180_rescales_the_empirical_gradient_to_algorithm_1s_length():
  r = -R_VEC - 0.5 * G_VEC
  direction, _ = eq5_apply(G_VEC, [r], 0.7, 180.0)
  want = G_VEC / np.linalg.norm(G_VEC) * np.linalg.norm(dtnh_vectors(G_VEC, [r], [0.7]))
  np.testing.assert_allclose(direction, want, rtol=1e-5)


def test_max_angle_90_under_conflict_removes_from_g_its_component_along_r():
  r = -R_VEC - 0.5 * G_VEC
  assert G_VEC @ r < 0
  direction, diag = eq5_apply(G_VEC, [r], 0.7, 90.0)
  g_perp = G_VEC - (G_VEC @ r) / (r @ r) * r
  np.testing.assert_allclose(direction / np.linalg.norm(direction), g_perp / np.linalg.norm(g_perp), atol=1e-5)
  np.testing.assert_allclose(diag.angle2, 90.0, atol=0.01)


def test_max_angle_90_without_conflict_steps_along_g_alone():
  r = R_VEC - (R_VEC @ G_VEC) / (G_VEC @ G_VEC) * G_VEC + 0.5 * G_VEC
  direction, _ = eq5_apply(G_VEC, [r], 0.7, 90.0)
  want = G_VEC / np.linalg.norm(G_VEC) * np.linalg.norm(G_VEC + 0.7 * r)     # Algorithm 1's d is g + λr here
  np.testing.assert_allclose(direction, want, rtol=1e-5)


@pytest.mark.parametrize("s", [0.0, 60.0, 179.0, 180.0])
@pytest.mark.parametrize("case", ["zero_empirical", "zero_regularizer", "both_zero", "exactly_aligned",
                                  "exactly_opposite"])
def test_max_angle_edge_cases(case, s):
  g, r = {"zero_empirical": (0 * G_VEC, R_VEC), "zero_regularizer": (G_VEC, 0 * R_VEC),
          "both_zero": (0 * G_VEC, 0 * R_VEC), "exactly_aligned": (G_VEC, 3 * G_VEC),
          "exactly_opposite": (G_VEC, -2.5 * G_VEC)}[case]
  direction, _ = eq5_apply(g, [r], 0.3, s)
  assert np.all(np.isfinite(direction))
  length = np.linalg.norm(dtnh_vectors(g, [r], [0.3]))
  unit = lambda v: v / np.linalg.norm(v)
  if case == "both_zero":
    want = np.zeros_like(g)
  elif case == "zero_empirical":              # only R to follow: Algorithm 1's d = λ r
    want = 0.3 * r
  elif case in ("zero_regularizer", "exactly_aligned"):   # nothing to trade: along g
    want = length * unit(g)
  elif s == 180.0:                            # antiparallel, but any direction is within 180° of R
    want = length * unit(g)
  else:                                       # antiparallel: in the g–R line only R itself is within s < 180° of R
    want = length * unit(r)
  np.testing.assert_allclose(direction, want, rtol=1e-5, atol=1e-6)


def test_max_angle_per_leaf_solves_eq5_in_each_leaf():
  g, r = RNG.normal(size=7), -RNG.normal(size=7)
  direction, _ = eq5_apply(g, [r], 1.5, 40.0, granularity="leaf")
  for sl in (slice(0, 3), slice(3, 7)):
    check_eq5(g[sl], [r[sl]], [1.5], 40.0, direction[sl])


def test_max_angle_unprojected_leaves_get_the_plain_sum():
  g, r = RNG.normal(size=7), -RNG.normal(size=7)
  direction, _ = eq5_apply(g, [r], 1.5, 40.0, unprojected={"a": False, "b": True})
  np.testing.assert_allclose(direction[3:], g[3:] + 1.5 * r[3:], rtol=1e-6)
  check_eq5(g[:3], [r[:3]], [1.5], 40.0, direction[:3])


def test_max_angle_as_an_injected_hyperparameter_gives_identical_numbers():
  tx = dtnh_jax.dtnh(0.3, max_angle=50.0)
  injected = optax.inject_hyperparams(dtnh_jax.dtnh)(reg_weight=0.3, max_angle=50.0)
  direction, _ = jax.jit(tx.update)(grads(PARAMS), tx.init(PARAMS), PARAMS)
  direction_i, _ = jax.jit(injected.update)(grads(PARAMS), injected.init(PARAMS), PARAMS)
  chex.assert_trees_all_close(direction, direction_i, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, 180.5, float("nan")])
def test_max_angle_outside_0_to_180_is_refused(bad):
  with pytest.raises(ValueError, match=r"max_angle must be in \[0, 180\]"):
    dtnh_jax.dtnh(0.1, max_angle=bad)
