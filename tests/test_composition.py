"""dtnh() where optax users put it: the extra-args form, chains and optax's wrappers.

Every composition is checked against a hand-written equivalent: Algorithm 1 from
tests/reference.py (NumPy, float64) over the leaves the composition should see,
followed by the optimizer written out or run on its own.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dtnh_jax
from reference import dtnh_vectors, flat

_KEYS = jax.random.split(jax.random.key(0), 8)
_SHAPES = {"stage1": {"kernel": (3, 4), "bias": (4,)}, "stage2": {"kernel": (4, 4), "bias": (4,)},
           "head": {"kernel": (4, 2), "bias": (2,)}}


def _random_tree(key, scale=1.0):
  leaves, treedef = jax.tree.flatten(_SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, s) for k, s in zip(keys, leaves)])


PARAMS = _random_tree(_KEYS[0])
EMPIRICAL = _random_tree(_KEYS[1])
# A regularizer gradient that conflicts with the empirical one by a different amount in every leaf, so that
# projecting over different sets of leaves gives different directions. The new head has none (None).
_PULL = jax.random.uniform(_KEYS[2], (6,), minval=0.2, maxval=1.5)
_NOISE = _random_tree(_KEYS[3], 0.3)
REGULARIZER_FULL = jax.tree.unflatten(jax.tree.structure(EMPIRICAL), [
    -pull * g + noise for pull, g, noise in zip(_PULL, jax.tree.leaves(EMPIRICAL), jax.tree.leaves(_NOISE))])
REGULARIZER_FULL = {**REGULARIZER_FULL, "head": jax.tree.map(jnp.zeros_like, REGULARIZER_FULL["head"])}
REGULARIZER = {**REGULARIZER_FULL, "head": None}
SECOND_REGULARIZER = _random_tree(_KEYS[4])

LABELS = {"stage1": "frozen", "stage2": "backbone", "head": "head"}
TRAINABLE = {"stage1": False, "stage2": True, "head": True}


def dtnh_by_hand(g, rs, lams, projected=lambda path: True):
  """Algorithm 1 jointly over the leaves whose path satisfies ``projected``; the other leaves keep g.

  Returns float64 NumPy leaves in the tree's structure.
  """
  g_flat, treedef = jax.tree_util.tree_flatten_with_path(g)
  rs_leaves = [jax.tree.leaves(r) for r in rs]
  chosen = [i for i, (path, _) in enumerate(g_flat) if projected(path)]
  d = dtnh_vectors(flat([g_flat[i][1] for i in chosen]), [flat([r[i] for i in chosen]) for r in rs_leaves], lams)
  out, offset = [np.asarray(leaf, np.float64) for _, leaf in g_flat], 0
  for i in chosen:
    size = out[i].size
    out[i] = d[offset:offset + size].reshape(out[i].shape)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


def stage(path):
  return path[0].key


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol),
               actual, expected)


# --- the extra-args form --------------------------------------------------------

def test_extra_args_form_equals_tuple_form():
  tx = dtnh_jax.dtnh(0.5)
  state = tx.init(PARAMS)
  by_keyword = tx.update(EMPIRICAL, state, PARAMS, regularizer_grads=REGULARIZER)
  by_tuple = tx.update((EMPIRICAL, REGULARIZER), state, PARAMS)
  chex.assert_trees_all_equal(by_keyword, by_tuple)


def test_chain_forwards_regularizer_grads_to_dtnh():
  tx = optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1, momentum=0.9))
  state_keyword = state_tuple = tx.init(PARAMS)
  for _ in range(2):
    updates_keyword, state_keyword = jax.jit(tx.update)(EMPIRICAL, state_keyword, PARAMS, regularizer_grads=REGULARIZER)
    updates_tuple, state_tuple = jax.jit(tx.update)((EMPIRICAL, REGULARIZER), state_tuple, PARAMS)
  chex.assert_trees_all_close((updates_keyword, state_keyword), (updates_tuple, state_tuple), rtol=1e-6)


def test_dtnh_later_in_a_chain_projects_what_comes_before_it():
  # clip_by_global_norm rescales the empirical gradient only; dtnh then projects the clipped one.
  tx = optax.chain(optax.clip_by_global_norm(1.0), dtnh_jax.dtnh(0.5), optax.sgd(0.1))
  updates, _ = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  clipped = jax.tree.map(lambda g: g / optax.tree.norm(EMPIRICAL), EMPIRICAL)
  want = jax.tree.map(lambda d: -0.1 * d, dtnh_by_hand(clipped, [REGULARIZER_FULL], [0.5]))
  assert_close(updates, want)


def test_several_regularizers_are_a_tuple_with_one_weight_each():
  tx = dtnh_jax.dtnh([0.5, 0.2])
  direction, _ = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=(REGULARIZER, SECOND_REGULARIZER))
  assert_close(direction, dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL, SECOND_REGULARIZER], [0.5, 0.2]))


@pytest.mark.parametrize("with_params", [True, False], ids=["params", "no-params"])
def test_tuple_shaped_parameters_take_a_tuple_shaped_regularizer_gradient(with_params):
  params = (PARAMS["stage1"]["kernel"], PARAMS["stage2"]["bias"])
  g = (EMPIRICAL["stage1"]["kernel"], EMPIRICAL["stage2"]["bias"])
  r = (REGULARIZER["stage1"]["kernel"], REGULARIZER["stage2"]["bias"])
  tx = dtnh_jax.dtnh(0.5)  # one weight: r is one pytree, although it is a tuple
  direction, _ = tx.update(g, tx.init(params), params if with_params else None, regularizer_grads=r)
  assert_close(direction, dtnh_by_hand(g, [r], [0.5]))


def test_both_forms_at_once_raise_type_error():
  tx = dtnh_jax.dtnh(0.5)
  with pytest.raises(TypeError, match="both calling forms at once"):
    tx.update((EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)


def test_gradient_without_regularizer_grads_raises_type_error_naming_both_forms():
  tx = optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"regularizer_grads=regularizer_grad\) or pass the tuple"):
    tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS)


def test_several_regularizer_gradients_for_one_weight_are_refused():
  tx = dtnh_jax.dtnh(0.5)
  with pytest.raises(ValueError, match="holds 2 regularizer gradients but there is 1 reg_weight"):
    tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=(REGULARIZER, SECOND_REGULARIZER))


def test_one_regularizer_gradient_for_several_weights_is_refused():
  tx = dtnh_jax.dtnh([0.5, 0.2])
  with pytest.raises(ValueError, match="must be a tuple of 2 pytrees"):
    tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)


# --- optax.masked and optax.multi_transform --------------------------------------

def _frozen_sgd_adam(backbone):
  return optax.multi_transform({"frozen": optax.set_to_zero(), "backbone": backbone, "head": optax.adam(1e-2)}, LABELS)


def _adam_on_head(*head_gradients):
  """The head's updates of optax.adam alone, after one step per gradient given."""
  adam = optax.adam(1e-2)
  state = adam.init(PARAMS["head"])
  for gradient in head_gradients:
    updates, state = adam.update(jax.tree.map(jnp.asarray, gradient), state, PARAMS["head"])
  return updates


def test_dtnh_masked_to_the_trainable_leaves_projects_over_them_only():
  tx = optax.chain(optax.masked(dtnh_jax.dtnh(0.5), TRAINABLE), _frozen_sgd_adam(optax.sgd(0.1)))
  updates, _ = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  d = dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5], lambda path: stage(path) != "stage1")
  want = {"stage1": jax.tree.map(np.zeros_like, d["stage1"]), "stage2": jax.tree.map(lambda x: -0.1 * x, d["stage2"]),
          "head": _adam_on_head(d["head"])}
  assert_close(updates, want)


@pytest.mark.parametrize("regularizer_grads", [REGULARIZER, (REGULARIZER, SECOND_REGULARIZER)], ids=["one", "two"])
def test_masking_the_regularizer_too_gives_the_same_direction(regularizer_grads):
  # mask_compatible_extra_args masks a params-shaped regularizer_grads; dtnh drops the masked leaves either way.
  weights = 0.5 if isinstance(regularizer_grads, dict) else [0.5, 0.2]
  plain = optax.masked(dtnh_jax.dtnh(weights), TRAINABLE)
  masking = optax.masked(dtnh_jax.dtnh(weights), TRAINABLE, mask_compatible_extra_args=True)
  chex.assert_trees_all_close(
      plain.update(EMPIRICAL, plain.init(PARAMS), PARAMS, regularizer_grads=regularizer_grads),
      masking.update(EMPIRICAL, masking.init(PARAMS), PARAMS, regularizer_grads=regularizer_grads), rtol=1e-6)


def test_dtnh_in_one_multi_transform_branch_projects_over_that_branch():
  tx = _frozen_sgd_adam(optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1, momentum=0.9)))
  state = tx.init(PARAMS)
  _, state = tx.update(EMPIRICAL, state, PARAMS, regularizer_grads=REGULARIZER)
  updates, _ = tx.update(EMPIRICAL, state, PARAMS, regularizer_grads=REGULARIZER)
  d = dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5], lambda path: stage(path) == "stage2")
  want = {"stage1": jax.tree.map(np.zeros_like, d["stage1"]),
          "stage2": jax.tree.map(lambda x: -0.1 * (x + 0.9 * x), d["stage2"]),  # second step: d + 0.9 d
          "head": _adam_on_head(EMPIRICAL["head"], EMPIRICAL["head"])}  # the head's branch has no dtnh: adam on g
  assert_close(updates, want)


def test_dtnh_around_multi_transform_counts_the_frozen_leaves_in_its_inner_products():
  tx = optax.chain(dtnh_jax.dtnh(0.5), _frozen_sgd_adam(optax.sgd(0.1)))
  updates, _ = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  d = dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5])
  want = {"stage1": jax.tree.map(np.zeros_like, d["stage1"]), "stage2": jax.tree.map(lambda x: -0.1 * x, d["stage2"]),
          "head": _adam_on_head(d["head"])}
  assert_close(updates, want)


def test_granularity_labels_for_all_parameters_serve_a_masked_branch():
  labels = {"stage1": {"kernel": "a", "bias": "a"}, "stage2": {"kernel": "a", "bias": "b"},
            "head": {"kernel": "b", "bias": "b"}}
  tx = optax.masked(dtnh_jax.dtnh(0.5, granularity=labels), TRAINABLE)
  direction, _ = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  group_a = dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5], lambda p: (stage(p), p[1].key) == ("stage2", "kernel"))
  group_b = dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5], lambda p: stage(p) == "head" or p == (
      jax.tree_util.DictKey("stage2"), jax.tree_util.DictKey("bias")))
  want = {"stage1": EMPIRICAL["stage1"],
          "stage2": {"kernel": group_a["stage2"]["kernel"], "bias": group_b["stage2"]["bias"]},
          "head": group_b["head"]}
  assert_close(direction, want)


# --- apply_if_finite, inject_hyperparams, reduce_on_plateau --------------------------

def _with_nan(tree):
  return {**tree, "stage2": {**tree["stage2"], "bias": tree["stage2"]["bias"].at[0].set(jnp.nan)}}


def test_apply_if_finite_after_dtnh_skips_a_nan_regularizer_gradient():
  tx = optax.chain(dtnh_jax.dtnh(0.5), optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=3))
  _, state = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  updates, new_state = jax.jit(tx.update)(EMPIRICAL, state, PARAMS, regularizer_grads=_with_nan(REGULARIZER))
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  chex.assert_trees_all_equal(new_state[1].inner_state, state[1].inner_state)
  assert int(new_state[1].notfinite_count) == 1


def test_apply_if_finite_around_the_chain_skips_a_nan_empirical_gradient_and_keeps_dtnh_state():
  tx = optax.apply_if_finite(optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1, momentum=0.9)), max_consecutive_errors=3)
  _, state = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  updates, new_state = jax.jit(tx.update)(_with_nan(EMPIRICAL), state, PARAMS, regularizer_grads=REGULARIZER)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)  # dtnh's count included


def test_apply_if_finite_around_the_chain_does_not_check_the_regularizer_gradient():
  """Pins the documented limit: apply_if_finite tests only `updates`, here the empirical gradient."""
  tx = optax.apply_if_finite(optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1)), max_consecutive_errors=3)
  updates, state = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=_with_nan(REGULARIZER))
  assert not np.isfinite(np.asarray(updates["stage2"]["bias"])).all()
  assert bool(state.last_finite)


def test_inject_hyperparams_takes_the_extra_args_form():
  tx = optax.chain(optax.inject_hyperparams(dtnh_jax.dtnh)(reg_weight=0.5), optax.sgd(0.1))
  state = tx.init(PARAMS)
  state[0].hyperparams["reg_weight"] = jnp.asarray(2.0)
  updates, _ = jax.jit(tx.update)(EMPIRICAL, state, PARAMS, regularizer_grads=REGULARIZER)
  assert_close(updates, jax.tree.map(lambda d: -0.1 * d, dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [2.0])))


def test_reduce_on_plateau_gets_value_beside_regularizer_grads():
  plateau = dict(factor=0.5, patience=1, accumulation_size=1)
  tx = optax.chain(dtnh_jax.dtnh(0.5), optax.sgd(0.1), optax.contrib.reduce_on_plateau(**plateau))
  state = tx.init(PARAMS)
  by_hand = optax.contrib.reduce_on_plateau(**plateau)
  hand_state = by_hand.init(PARAMS)
  sgd_step = jax.tree.map(lambda d: -0.1 * d, dtnh_by_hand(EMPIRICAL, [REGULARIZER_FULL], [0.5]))
  for loss in [1.0, 1.0, 1.0, 1.0]:  # no improvement: the scale halves
    updates, state = tx.update(EMPIRICAL, state, PARAMS, regularizer_grads=REGULARIZER, value=jnp.asarray(loss))
    want, hand_state = by_hand.update(jax.tree.map(jnp.asarray, sgd_step), hand_state, PARAMS, value=jnp.asarray(loss))
    assert_close(updates, want)
  assert float(state[2].scale) < 1.0


# --- gradient accumulation: dtnh_jax.multi_steps and optax.MultiSteps --------------

def _mlp_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"features": {"kernel": jax.random.normal(k1, (4, 8)), "bias": 0.1 * jax.random.normal(k2, (8,))},
          "head": {"kernel": jax.random.normal(k3, (8, 3)), "bias": jnp.zeros(3)}}


MLP = _mlp_params(_KEYS[5])
SOURCE = jax.tree.map(lambda p, n: p + 0.5 * n, MLP["features"], _mlp_params(_KEYS[6])["features"])  # frozen
INPUTS = jax.random.normal(_KEYS[7], (12, 4))
TARGETS = jnp.arange(12) % 3
K = 3  # micro-batches of 4


def _features(features_params, x):
  return jnp.tanh(x @ features_params["kernel"] + features_params["bias"])


def _empirical_loss(params, x, y):
  logits = _features(params["features"], x) @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _feature_distance(params, x):
  """KnowDist-like: the batch mean of the squared distance to the frozen source's features."""
  return jnp.mean(jnp.sum((_features(params["features"], x) - _features(SOURCE, x)) ** 2, axis=-1))


def _l2_sp(params, x):
  del x
  return 0.5 * sum(jnp.sum((p - s) ** 2) for p, s in zip(jax.tree.leaves(params["features"]), jax.tree.leaves(SOURCE)))


_REGULARIZERS = {"feature_distance": _feature_distance, "l2_sp": _l2_sp}


@functools.partial(jax.jit, static_argnames="names")
def _gradients(params, x, y, names):
  """(g, [r...]); the regularizers do not touch the head (None there)."""
  rs = [{"features": jax.grad(_REGULARIZERS[name])(params, x)["features"], "head": None} for name in names]
  return jax.grad(_empirical_loss)(params, x, y), rs


def _micro_batches():
  return [(INPUTS[i::K], TARGETS[i::K]) for i in range(K)]


#: dtnh and the never-hurt candidates of dtnh_jax.corrections (the stateful ones included): multi_steps serves all.
CORRECTIONS = {"dtnh": dtnh_jax.dtnh,
               "subspace_projection": functools.partial(dtnh_jax.subspace_projection, memory=3),
               "ema_projection": functools.partial(dtnh_jax.ema_projection, decay=0.5, guard_current=True),
               "share_bound": functools.partial(dtnh_jax.share_bound, kappa=0.5, projection="conflict")}


def _dtnh_sgd(weights, correction="dtnh"):
  return optax.chain(CORRECTIONS[correction](weights), optax.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("names,correction", [(("feature_distance",), "dtnh"), (("feature_distance", "l2_sp"), "dtnh")]
                         + [(("feature_distance", "l2_sp"), name) for name in CORRECTIONS if name != "dtnh"],
                         ids=["knowdist", "knowdist+l2sp"] + [f"knowdist+l2sp-{name}" for name in CORRECTIONS][1:])
def test_multi_steps_equals_one_step_on_the_concatenated_batch(names, correction):
  weights = [3.0, 1.0][:len(names)] if len(names) > 1 else 3.0
  accumulated = dtnh_jax.multi_steps(_dtnh_sgd(weights, correction), K, num_regularizers=len(names))
  reference = _dtnh_sgd(weights, correction)
  params, state = MLP, accumulated.init(MLP)
  want_params, want_state = MLP, reference.init(MLP)
  step = jax.jit(accumulated.update)
  conflicts = []
  for _ in range(2):
    for x, y in _micro_batches():
      g, rs = _gradients(params, x, y, names)
      updates, state = step(g, state, params, regularizer_grads=rs[0] if len(rs) == 1 else tuple(rs))
      params = optax.apply_updates(params, updates)
    g, rs = _gradients(want_params, INPUTS, TARGETS, names)
    updates, want_state = jax.jit(reference.update)((g, *rs), want_state, want_params)
    want_params = optax.apply_updates(want_params, updates)
    conflicts.append(np.max(want_state[0].diagnostics.conflict))
    chex.assert_trees_all_close(params, want_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.inner_opt_state, want_state, rtol=1e-5, atol=1e-6)
  assert max(conflicts) == 1.0  # the projection (the nonlinear part) was taken


def _mean(trees):
  return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def test_plain_multisteps_pairs_the_mean_empirical_gradient_with_the_last_regularizer_gradient():
  """Pins the documented reason for multi_steps: optax.MultiSteps passes extra args through unaveraged."""
  plain = optax.MultiSteps(_dtnh_sgd(3.0), K)
  state, empirical = plain.init(MLP), []
  for x, y in _micro_batches():
    g, (r,) = _gradients(MLP, x, y, ("feature_distance",))
    updates, state = jax.jit(plain.update)(g, state, MLP, regularizer_grads=r)
    empirical.append(g)
  want, _ = _dtnh_sgd(3.0).update((_mean(empirical), r), _dtnh_sgd(3.0).init(MLP), MLP)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)


def test_plain_multisteps_is_exact_for_a_regularizer_of_the_parameters_alone():
  plain = optax.MultiSteps(_dtnh_sgd(3.0), K)
  state = plain.init(MLP)
  for x, y in _micro_batches():
    g, (r,) = _gradients(MLP, x, y, ("l2_sp",))
    updates, state = jax.jit(plain.update)(g, state, MLP, regularizer_grads=r)
  g, rs = _gradients(MLP, INPUTS, TARGETS, ("l2_sp",))
  want, _ = _dtnh_sgd(3.0).update((g, *rs), _dtnh_sgd(3.0).init(MLP), MLP)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)


def test_multi_steps_skips_a_micro_batch_whose_regularizer_gradient_is_not_finite():
  accumulated = dtnh_jax.multi_steps(_dtnh_sgd(3.0), K, should_skip_update_fn=optax.skip_not_finite)
  state = accumulated.init(MLP)
  extra = (INPUTS[:4] + 1.0, TARGETS[:4])
  batches = _micro_batches()
  for index, (x, y) in enumerate([batches[0], extra, batches[1], batches[2]]):
    g, (r,) = _gradients(MLP, x, y, ("feature_distance",))
    if index == 1:
      r = {**r, "features": {**r["features"], "bias": r["features"]["bias"].at[0].set(jnp.nan)}}
    updates, state = jax.jit(accumulated.update)(g, state, MLP, regularizer_grads=r)
  g, rs = _gradients(MLP, INPUTS, TARGETS, ("feature_distance",))
  want, _ = _dtnh_sgd(3.0).update((g, *rs), _dtnh_sgd(3.0).init(MLP), MLP)
  chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)


def test_multi_steps_without_regularizer_grads_raises_type_error():
  accumulated = dtnh_jax.multi_steps(_dtnh_sgd(3.0), K)
  with pytest.raises(TypeError, match="multi_steps: call update.*regularizer_grads="):
    accumulated.update(MLP, accumulated.init(MLP), MLP)


def test_multi_steps_refuses_another_count_of_regularizer_gradients():
  accumulated = dtnh_jax.multi_steps(_dtnh_sgd([3.0, 1.0]), K, num_regularizers=2)
  g, (r,) = _gradients(MLP, INPUTS, TARGETS, ("l2_sp",))
  with pytest.raises(ValueError, match="got 3 regularizer gradients but num_regularizers=2"):
    accumulated.update(g, accumulated.init(MLP), MLP, regularizer_grads=(r, r, r))
