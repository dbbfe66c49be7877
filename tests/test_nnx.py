"""dtnh() under Flax NNX: nnx.Optimizer.update(model, grads, regularizer_grads=...) and split/merge under jax.jit.

The reference is the same training done by hand with optax's functional API
on the parameter state that ``nnx.split`` returns (the tuple form of dtnh).
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import dtnh_jax

nnx = pytest.importorskip("flax.nnx")

INPUTS = jax.random.normal(jax.random.key(1), (8, 3))
TARGETS = jax.random.normal(jax.random.key(2), (8, 2))
STEPS = 3


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 6, rngs=rngs)
    self.out = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def empirical_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def l2_sp(model, source):
  """L2-SP towards ``source``, a pure dict shaped like the model's nnx.Param state (nnx.to_pure_dict)."""
  params = nnx.state(model, nnx.Param)
  return 0.5 * sum(jnp.sum((p - s) ** 2) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(source)))


def _dtnh_sgd():
  return optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.1, momentum=0.9))


def _start():
  model = MLP(nnx.Rngs(0))
  # Move away from the source so that the regularizer gradient is not zero at the first step.
  source = jax.tree.map(lambda p: p + 0.3, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return model, source


def _by_hand(model, source):
  """STEPS steps of the pure-optax functional API on nnx.split's parameter state, tuple form."""
  graphdef, params = nnx.split(model, nnx.Param)
  tx = _dtnh_sgd()
  opt_state = tx.init(params)
  for _ in range(STEPS):
    g = jax.grad(lambda p: empirical_loss(nnx.merge(graphdef, p), INPUTS, TARGETS))(params)
    r = jax.grad(lambda p: l2_sp(nnx.merge(graphdef, p), source))(params)
    updates, opt_state = tx.update((g, r), opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def test_nnx_optimizer_update_passes_regularizer_grads_to_dtnh():
  model, source = _start()
  want_params, want_state = _by_hand(*_start())
  optimizer = nnx.Optimizer(model, _dtnh_sgd(), wrt=nnx.Param)
  for _ in range(STEPS):
    grads = nnx.grad(empirical_loss)(model, INPUTS, TARGETS)
    reg_grads = nnx.grad(l2_sp)(model, source)
    optimizer.update(model, grads, regularizer_grads=reg_grads)
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(want_params), rtol=1e-6)
  chex.assert_trees_all_close(nnx.as_pure(optimizer.opt_state), nnx.as_pure(want_state), rtol=1e-6)


def test_nnx_split_merge_step_under_jax_jit():
  model, source = _start()
  want_params, _ = _by_hand(*_start())
  optimizer = nnx.Optimizer(model, _dtnh_sgd(), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def train_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    grads = nnx.grad(empirical_loss)(model, x, y)
    optimizer.update(model, grads, regularizer_grads=nnx.grad(l2_sp)(model, source))
    return nnx.state((model, optimizer))

  for _ in range(STEPS):
    state = train_step(state, INPUTS, TARGETS)
  model, optimizer = nnx.merge(graphdef, state)
  # jit fuses the float32 arithmetic differently from eager execution: compare to rounding.
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(want_params),
                              rtol=1e-5, atol=1e-6)
  assert train_step._cache_size() == 1
  assert int(optimizer.step[...]) == STEPS
