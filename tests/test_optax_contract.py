"""The optax contract that dtnh and every correction beside it meets: the bar of optax/contrib/_common_test.py.

One parametrized test per property, over every transformation of the package that takes an empirical and a
regularizer gradient: :func:`dtnh_jax.dtnh`, the gradient-surgery aggregators (``dtnh_jax.aggregators``) and the
never-hurt candidates (``dtnh_jax.corrections``, the stateful ones included). What each one computes is checked
against its own reference in tests/test_projection.py, tests/test_aggregators.py and tests/test_corrections.py;
here only that it behaves like an optax transformation: both forms of the regularizer gradient, unknown extra
args, one compile, ``inject_hyperparams``, dtypes, ``lax.cond``, schedules, ``chain`` and ``masked``, errors that
name it.

Numbers are compared unjitted, op by op: jitting each case's programs (two per test and transformation) was most
of this file's time, and the primitives one case compiles are reused by the next; ``inject_hyperparams``'s many
small ops are one jitted program for both updates instead. What jit adds is checked where it is the property: one
compile and ``lax.cond`` run jitted (one run per transformation, which the schedule's test reads too), dtypes and
unknown extra args are traced (``jax.eval_shape``, extra args as tracers).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dtnh_jax
from dtnh_jax import aggregators, corrections

#: Each transformation as tested: its factory of ``reg_weight`` and the options it is given beyond it.
TRANSFORMATIONS = {
    "dtnh": (dtnh_jax.dtnh, {}),
    **{name: (getattr(aggregators, name), {"c": 0.5} if name == "cagrad" else {})   # CAGrad has no default radius
       for name in aggregators.AGGREGATORS},
    "subspace": (corrections.subspace_projection, {"memory": 3}),
    "ema": (corrections.ema_projection, {"decay": 0.8}),
    "ema_guarded": (corrections.ema_projection, {"decay": 0.8, "guard_current": True}),
    "bound": (corrections.share_bound, {"kappa": 0.5}),
    "bound_after_dtnh": (corrections.share_bound, {"kappa": 0.5, "projection": "conflict"}),
    "bound_average": (corrections.share_bound, {"kappa": 0.5, "projection": "conflict", "reference": "average",
                                                "decay": 0.8}),
}
NAMES = list(TRANSFORMATIONS)
#: Options that set the shape of a state: static under ``inject_hyperparams``.
STATIC_OPTIONS = ("memory",)


def make(name, reg_weight, **kwargs):
  factory, options = TRANSFORMATIONS[name]
  return factory(reg_weight, **{**options, **kwargs})


def random_tree(seed, scale=1.0):
  shapes = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 5),
                                                                                           "bias": (5,)}}
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


PARAMS = random_tree(0)
EMPIRICAL = random_tree(1)
# pulls against the empirical gradient, so that every correction changes something
REGULARIZER = jax.tree.map(lambda g, noise: noise - 0.8 * g, EMPIRICAL, random_tree(2, 0.5))


def steps(count):
  """``(g, r)`` pairs that conflict, one per step."""
  return [(random_tree(10 + i), jax.tree.map(lambda g, noise: noise - 0.8 * g, random_tree(10 + i),
                                             random_tree(20 + i, 0.5))) for i in range(count)]


@pytest.mark.parametrize("name", NAMES)
def test_tuple_form_and_extra_args_form_give_the_same_numbers(name):
  # unjitted, each op is a program of its own on the same inputs: the same bits unless the two forms compute
  # differently (two jitted programs needed the exact_jit fixture's emitters for that)
  tx = make(name, 0.5)
  by_tuple = tx.update((EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS)
  by_keyword = tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS, regularizer_grads=REGULARIZER)
  chex.assert_trees_all_equal(by_tuple, by_keyword)


@pytest.mark.parametrize("name", NAMES)
def test_update_ignores_unknown_extra_args(name):
  tx = make(name, 0.1)
  plain = tx.update((EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS)
  extra = tx.update((EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS, value=1.0, unexpected_extra_arg=3)
  chex.assert_trees_all_equal(plain, extra)
  # and traced, the extra args as tracers (as under jit), the same types
  traced = jax.eval_shape(tx.update, (EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS, value=1.0,
                          unexpected_extra_arg=3)
  chex.assert_trees_all_equal_shapes_and_dtypes(traced, plain)


def _jitted_run(name):
  """``name`` chained with SGD, its weight a schedule, stepped three times by one jitted program in which
  ``lax.cond`` applies the update or keeps the state, then once more with the update off: the states, and the
  program's cache size after the four calls."""
  tx = optax.chain(make(name, optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)),
                   optax.sgd(0.01, momentum=0.9))

  @jax.jit
  def step(flag, params, state):
    # gradients that change with the parameters, as a training step's do
    g = jax.tree.map(lambda e, p: e + 0.1 * p, EMPIRICAL, params)

    def apply(operand):
      params, state = operand
      updates, state = tx.update((g, REGULARIZER), state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.cond(flag, apply, lambda operand: operand, (params, state))

  params, states = PARAMS, [tx.init(PARAMS)]
  for _ in range(3):
    params, state = step(True, params, states[-1])
    states.append(state)
  _, skipped = step(False, params, states[0])
  return {"initial": states[0], "stepped": states[1:], "skipped": skipped, "cache_size": step._cache_size()}


@pytest.fixture(scope="module")
def jitted_run():
  """``jitted_run(name)``: :func:`_jitted_run` of the transformation, run once per transformation for the tests of
  one compile, of ``lax.cond`` and of schedules (one program serves the three, where each compiled its own)."""
  return functools.cache(_jitted_run)


@pytest.mark.parametrize("name", NAMES)
def test_jitted_step_does_not_recompile_on_second_call(name, jitted_run):
  assert jitted_run(name)["cache_size"] == 1   # the initial state, the updated ones and the update off: one program


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_identical_numbers(name):
  factory, options = TRANSFORMATIONS[name]
  tx = make(name, 0.3, granularity="module")
  injected = optax.inject_hyperparams(factory, static_args=tuple(k for k in options if k in STATIC_OPTIONS))(
      reg_weight=0.3, granularity="module", **options)
  # both in one program: per-module granularity and injected hyperparameters are many small ops, cheaper compiled
  # once than dispatched one by one
  (direction, state), (direction_i, state_i) = jax.jit(lambda: (
      tx.update((EMPIRICAL, REGULARIZER), tx.init(PARAMS), PARAMS),
      injected.update((EMPIRICAL, REGULARIZER), injected.init(PARAMS), PARAMS)))()
  chex.assert_trees_all_close(direction, direction_i, rtol=1e-6)
  chex.assert_trees_all_close(state, state_i.inner_state, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", NAMES)
def test_updates_keep_the_parameters_dtype(name, dtype):
  params, g, r = (jax.tree.map(lambda x: x.astype(dtype), t) for t in (PARAMS, EMPIRICAL, REGULARIZER))
  tx = optax.chain(make(name, 0.1), optax.sgd(0.01, momentum=0.9))
  updates, _ = jax.eval_shape(tx.update, (g, r), tx.init(params), params)  # the types jit would give, uncompiled
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_stable_under_lax_cond(name, jitted_run):
  run = jitted_run(name)
  updated, state = run["stepped"][0], run["initial"]
  chex.assert_trees_all_equal_structs(updated, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(updated, state)
  assert int(updated[0].count) == 1 and int(run["skipped"][0].count) == 0


@pytest.mark.parametrize("name", NAMES)
def test_schedule_weight_is_evaluated_at_the_step_count(name, jitted_run):
  for step, state in enumerate(jitted_run(name)["stepped"]):
    np.testing.assert_allclose(state[0].diagnostics.reg_weight, 0.5 ** step)


@pytest.mark.parametrize("name", NAMES)
def test_chain_with_sgd_applies_sgd_to_the_corrected_direction(name):
  tx = optax.chain(make(name, 0.5), optax.sgd(0.1, momentum=0.9))
  alone, sgd = make(name, 0.5), optax.sgd(0.1, momentum=0.9)
  state, alone_state, sgd_state = tx.init(PARAMS), alone.init(PARAMS), sgd.init(PARAMS)
  for g, r in steps(3):
    updates, state = tx.update(g, state, PARAMS, regularizer_grads=r)
    direction, alone_state = alone.update((g, r), alone_state, PARAMS)
    want, sgd_state = sgd.update(direction, sgd_state, PARAMS)
    chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state[0], alone_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_inside_optax_masked_corrects_the_masked_leaves_only(name):
  mask = {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False}, "fc": {"kernel": True, "bias": True}}
  tx = optax.masked(make(name, 0.5), mask)
  only = make(name, 0.5)
  chosen = lambda tree: {"conv": tree["conv"], "fc": tree["fc"]}
  state, only_state = tx.init(PARAMS), only.init(chosen(PARAMS))
  for g, r in steps(3):
    direction, state = tx.update(g, state, PARAMS, regularizer_grads=r)
    want, only_state = only.update((chosen(g), chosen(r)), only_state, chosen(PARAMS))
    chex.assert_trees_all_close(chosen(direction), want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(direction["bn"], g["bn"])


@pytest.mark.parametrize("name", NAMES)
def test_errors_name_the_transformation(name):
  factory_name = TRANSFORMATIONS[name][0].__name__
  with pytest.raises(ValueError, match=rf"^{factory_name}: reg_weight must be >= 0"):
    make(name, -1.0)
  tx = make(name, 0.1)
  with pytest.raises(ValueError, match=rf"^{factory_name}: got 2 regularizer gradient.*1 reg_weight"):
    tx.update((EMPIRICAL, REGULARIZER, REGULARIZER), tx.init(PARAMS), PARAMS)
  with pytest.raises(TypeError, match=rf"^{factory_name} got no regularizer gradient"):
    tx.update(EMPIRICAL, tx.init(PARAMS), PARAMS)


def test_every_transformation_is_exported_at_the_top_level():
  for module, exported in ((aggregators, aggregators.AGGREGATORS), (corrections, corrections.CORRECTIONS)):
    for name in exported:
      assert getattr(dtnh_jax, name) is getattr(module, name)
      assert name in dtnh_jax.__all__
  assert "dtnh" in dtnh_jax.__all__
