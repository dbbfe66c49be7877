"""split_value_and_grad: both gradients from one forward pass, equal to separate jax.grad calls."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dtnh_jax

KEY = jax.random.PRNGKey(0)
PARAMS = {
    "layer1": {"kernel": jax.random.normal(KEY, (4, 6)) * 0.5},
    "fc": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (6, 3)) * 0.5},
}
SOURCE = jax.tree.map(lambda x: x + 0.1, PARAMS)
BATCH = {"x": jax.random.normal(jax.random.PRNGKey(2), (8, 4)), "y": jnp.arange(8) % 3}


def features(params, x):
  return jnp.tanh(x @ params["layer1"]["kernel"])


def cross_entropy(params, batch):
  logits = features(params, batch["x"]) @ params["fc"]["kernel"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), batch["y"]])


def knowdist(params, batch):
  return jnp.mean((features(params, batch["x"]) - features(SOURCE, batch["x"])) ** 2)


def both(params, batch):
  """One forward pass: the feature map feeds the head and the distance."""
  h = features(params, batch["x"])
  logits = h @ params["fc"]["kernel"]
  ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), batch["y"]])
  return ce, jnp.mean((h - features(SOURCE, batch["x"])) ** 2)


@pytest.fixture(scope="module")
def separate():
  """``(ce, kd, grad ce, grad kd)`` of PARAMS and BATCH by separate calls of each loss and of ``jax.grad``: the
  references of every test here, computed once, in one jitted program (op by op, each op compiled one of its own)."""
  return jax.jit(lambda p, b: (cross_entropy(p, b), knowdist(p, b), jax.grad(cross_entropy)(p, b),
                               jax.grad(knowdist)(p, b)))(PARAMS, BATCH)


@pytest.mark.parametrize("backward", dtnh_jax.gradients.BACKWARDS)
def test_split_gradients_equal_two_separate_grad_calls(backward, separate):
  (ce, kd), (g_ce, g_kd) = jax.jit(dtnh_jax.split_value_and_grad(both, backward=backward))(PARAMS, BATCH)
  np.testing.assert_allclose(ce, separate[0], rtol=1e-6)
  np.testing.assert_allclose(kd, separate[1], rtol=1e-6)
  chex.assert_trees_all_close(g_ce, separate[2], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(g_kd, separate[3], rtol=1e-5, atol=1e-7)


def test_the_forward_pass_runs_once():
  calls = []

  def counted(params, batch):
    calls.append(1)
    return both(params, batch)

  jax.make_jaxpr(dtnh_jax.split_value_and_grad(counted))(PARAMS, BATCH)
  assert len(calls) == 1


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


CNN_PARAMS = {"conv1": jax.random.normal(KEY, (3, 3, 2, 4)) * 0.3,
              "conv2": jax.random.normal(jax.random.PRNGKey(3), (3, 3, 4, 4)) * 0.3,
              "fc": jax.random.normal(jax.random.PRNGKey(4), (4, 3)) * 0.3}
CNN_IMAGES = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 2))


def cnn_terms(params, images):
  """Cross-entropy and a distance on both conv layers' maps (toward zero), from one forward pass."""
  h1 = jax.nn.relu(_conv(images, params["conv1"]))
  h2 = jax.nn.relu(_conv(h1, params["conv2"]))
  logits = h2.mean(axis=(1, 2)) @ params["fc"]
  ce = -jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  return ce, jnp.mean(h1 ** 2) + jnp.mean(h2 ** 2), {"mean": h2.mean()}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def test_retrace_under_jit_compiles_one_forward_pass():
  # 2 forward convolutions, and per backward pass 3 (two kernel gradients, one input gradient)
  split = lambda b: dtnh_jax.split_value_and_grad(lambda p, x: (cnn_terms(p, x)[:2], cnn_terms(p, x)[2]),
                                                  has_aux=True, backward=b)
  assert _compiled(split("sequential"), CNN_PARAMS, CNN_IMAGES).as_text().count(" convolution(") == 2 + 2 * 3
  retrace = _compiled(split("retrace"), CNN_PARAMS, CNN_IMAGES)   # the program counted is the one run
  assert retrace.as_text().count(" convolution(") == 2 + 2 * 3
  ((values, aux), grads) = retrace(CNN_PARAMS, CNN_IMAGES)
  # both references in one program: the convolutions' gradients op by op compiled a program each
  separate = jax.jit(lambda p: [jax.grad(lambda p: cnn_terms(p, CNN_IMAGES)[i])(p) for i in range(2)])(CNN_PARAMS)
  for i in range(2):
    chex.assert_trees_all_close(grads[i], separate[i], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux["mean"], cnn_terms(CNN_PARAMS, CNN_IMAGES)[2]["mean"], rtol=1e-6)


def test_has_aux_returns_the_auxiliary_output(separate):
  def with_aux(params, batch):
    ce, kd = both(params, batch)
    return (ce, kd), {"mean_feature": jnp.mean(features(params, batch["x"]))}

  ((ce, kd), aux), (g_ce, _) = dtnh_jax.split_value_and_grad(with_aux, has_aux=True)(PARAMS, BATCH)
  np.testing.assert_allclose(aux["mean_feature"], jnp.mean(features(PARAMS, BATCH["x"])), rtol=1e-6)
  chex.assert_trees_all_close(g_ce, separate[2], rtol=1e-5, atol=1e-7)


def test_closed_form_regularizer_skips_the_backward_pass(separate):
  alpha = 0.1
  l2_sp = dtnh_jax.ClosedFormRegularizer(
      value=lambda p: alpha / 2 * sum(jnp.sum((w - s) ** 2)
                                      for w, s in zip(jax.tree.leaves(p), jax.tree.leaves(SOURCE))),
      grad=lambda p: jax.tree.map(lambda w, s: alpha * (w - s), p, SOURCE),
  )
  fn = dtnh_jax.split_value_and_grad(cross_entropy, closed_form=[l2_sp])
  (ce, reg), (g_ce, g_reg) = fn(PARAMS, BATCH)
  chex.assert_trees_all_close(g_reg, jax.grad(l2_sp.value)(PARAMS), rtol=1e-6)
  chex.assert_trees_all_close(g_ce, separate[2], rtol=1e-5, atol=1e-7)
  # as many matmuls as one value_and_grad of the empirical loss: no second backward pass
  count = lambda f: str(jax.make_jaxpr(f)(PARAMS, BATCH)).count("dot_general")
  assert count(fn) == count(jax.value_and_grad(cross_entropy))


def test_single_scalar_function_gives_a_one_element_tuple():
  values, grads = dtnh_jax.split_value_and_grad(cross_entropy)(PARAMS, BATCH)
  assert len(values) == 1 and len(grads) == 1


def test_split_gradients_feed_dtnh_directly():
  tx = dtnh_jax.dtnh(0.5)
  # the structure is what is checked: traced (eval_shape), not computed op by op
  _, grads = jax.eval_shape(dtnh_jax.split_value_and_grad(both), PARAMS, BATCH)
  direction, state = jax.eval_shape(tx.update, grads, tx.init(PARAMS), PARAMS)
  chex.assert_trees_all_equal_structs(direction, PARAMS)


def test_non_scalar_loss_is_refused_with_a_clear_message():
  with pytest.raises(TypeError, match="regularizer #1 must be a scalar"):
    dtnh_jax.split_value_and_grad(lambda p, b: (cross_entropy(p, b), features(p, b["x"])))(PARAMS, BATCH)
