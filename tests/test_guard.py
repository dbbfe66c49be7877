"""The NaN/Inf guard inside the optimizer (``dtnh_jax.train.guard``) and what it costs the compiled train step.

Checked against optax itself: a guarded optimizer with ``finite=True`` is the optax optimizer, bit for bit, and
with ``finite=False`` it changes no state and emits zeros, whatever the gradient holds. The train steps guard
this way so that XLA forms the parameters' update from the momentum it writes: the compiled DTNH step copies no
optimizer state (it copied every momentum leaf when the guard selected the optimizer's outputs afterwards):
checked on every method's compiled steps in tests/test_train.py (``test_every_method_builds_its_steps...``).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dtnh_jax.train import guard, presets
from dtnh_jax.train import step as step_lib
from helpers import assert_trees_equal


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"conv": jnp.asarray(scale * rng.normal(size=(3, 3, 4, 8)), jnp.float32),
          "bias": jnp.asarray(scale * rng.normal(size=(8,)), jnp.float32)}


OPTIMIZERS = {
    "sgd momentum": (lambda: optax.sgd(0.1, momentum=0.9), lambda: guard.guarded_sgd(0.1, momentum=0.9)),
    "sgd": (lambda: optax.sgd(0.1), lambda: guard.guarded_sgd(0.1)),
    "sgd scheduled": (lambda: optax.sgd(optax.piecewise_constant_schedule(0.1, {2: 0.1}), momentum=0.9),
                      lambda: guard.guarded_sgd(optax.piecewise_constant_schedule(0.1, {2: 0.1}), momentum=0.9)),
    "adamw": (lambda: optax.adamw(1e-3, weight_decay=1e-2),
              lambda: guard.guarded(optax.adamw(1e-3, weight_decay=1e-2))),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_guarded_optimizer_is_the_optax_optimizer_when_the_step_is_finite(name):
  plain, guarded = (make() for make in OPTIMIZERS[name])
  params = _tree(0)
  plain_state, guarded_state = plain.init(params), guarded.init(params)
  assert_trees_equal(plain_state, guarded_state)
  for step in range(4):
    grads = _tree(step + 1)
    plain_updates, plain_state = jax.jit(plain.update)(grads, plain_state, params)
    guarded_updates, guarded_state = jax.jit(lambda g, s, p: guarded.update(g, s, p, finite=jnp.asarray(True)))(
        grads, guarded_state, params)
    assert_trees_equal(plain_updates, guarded_updates)
    assert_trees_equal(plain_state, guarded_state)
    params = optax.apply_updates(params, plain_updates)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_a_guarded_optimizer_keeps_its_state_and_emits_zeros_when_the_step_is_not_finite(name, poison):
  _, make = OPTIMIZERS[name]
  guarded = make()
  params = _tree(0)
  state = guarded.init(params)
  state = guarded.update(_tree(1), state, params, finite=jnp.asarray(True))[1]  # a momentum that is not zero
  bad = jax.tree.map(lambda x: x.at[0].set(poison), _tree(2))
  updates, new_state = jax.jit(lambda g, s, p: guarded.update(g, s, p, finite=jnp.asarray(False)))(bad, state, params)
  assert_trees_equal(new_state, state)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.asarray(leaf) == 0)


def test_base_optimizer_guarded_has_the_unguarded_state():
  config = presets.get("tiny", method="knowdist", weight_decay=1e-4)
  params = _tree(0)
  plain, guarded = step_lib.base_optimizer(config), step_lib.base_optimizer(config, guarded=True)
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(guarded.init(params))


class _FiniteLossNaNGradient(nn.Module):
  """A network whose loss is finite and whose gradient is NaN: ``sqrt(0 · logits)`` is 0 whatever the logits,
  its derivative ``0.5 / sqrt(0) · 0`` is not a number. It keeps a BatchNorm-like statistic, as the step expects."""

  @nn.compact
  def __call__(self, images, train=False, return_features=False):
    seen = self.variable("batch_stats", "seen", jnp.zeros, ())
    if train:
      seen.value = seen.value + 1.0
    logits = nn.Dense(3)(images.reshape(images.shape[0], -1))
    logits = logits + jnp.sqrt(0.0 * logits)
    return (logits, {}) if return_features else logits


def test_a_step_whose_gradient_is_not_finite_under_a_finite_loss_is_skipped():
  """The step's guard reads the gradient arrays, not only the loss (fine-tuning: no correction's diagnostics)."""
  config = presets.get("tiny", method="fine-tune")
  model = _FiniteLossNaNGradient()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), images)
  state = step_lib.create_train_state(variables, step_lib.make_optimizer(config, 2), jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(model, config, 2))
  after, metrics = step(state, {"image": images, "label": jnp.arange(4) % 3}, step_lib.Reference(variables))
  assert np.isfinite(float(metrics["loss_empirical"])) and float(metrics["skipped"]) == 1.0
  assert_trees_equal((after.params, after.batch_stats, after.opt_state),
                     (state.params, state.batch_stats, state.opt_state))
  assert int(after.step) == 1
