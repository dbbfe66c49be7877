"""Both formulations of ``dtnh_jax.models.pool.max_pool`` compute the same max-pool, and the choice between them.

Values and gradients against a NumPy max-pool whose gradient goes to each window's first maximum (row-major, as
PyTorch's ``MaxPool2d`` and XLA's select-and-scatter), on inputs full of ties; the two formulations against
each other over windows, strides and paddings, in bfloat16 and under ``vmap``; the converted ResNet-18's
gradients through its stem against torchvision's autograd.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax.models import conv, convert, pool, resnet


def _numpy_max_pool(x, window, strides, padding, cotangent):
  """The max-pool of NHWC ``x`` and the gradient of ``<max_pool(x), cotangent>``, one window at a time."""
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-np.inf)
  out_h = (padded.shape[1] - window[0]) // strides[0] + 1
  out_w = (padded.shape[2] - window[1]) // strides[1] + 1
  out = np.empty((batch, out_h, out_w, channels), x.dtype)
  grad = np.zeros_like(padded)
  for n in range(batch):
    for i in range(out_h):
      for j in range(out_w):
        for c in range(channels):
          rows, cols = i * strides[0], j * strides[1]
          block = padded[n, rows:rows + window[0], cols:cols + window[1], c]
          first = np.argmax(block)   # the first maximum, row-major
          out[n, i, j, c] = block.flat[first]
          grad[n, rows + first // window[1], cols + first % window[1], c] += cotangent[n, i, j, c]
  return out, grad[:, padding[0][0]:padding[0][0] + height, padding[1][0]:padding[1][0] + width]


@functools.partial(jax.jit, static_argnames=("window", "strides", "padding", "formulation"))
def _value_and_gradient(x, cotangent, window, strides, padding, formulation):
  y, pullback = jax.vjp(lambda x: pool.max_pool(x, window, strides, padding, formulation), x)
  return y, pullback(cotangent.astype(y.dtype))[0]


# window, strides, padding: the ResNet stem's, non-overlapping, uneven, unpadded
CASES = [((3, 3), (2, 2), ((1, 1), (1, 1))), ((2, 2), (2, 2), ((0, 0), (0, 0))),
         ((3, 2), (1, 2), ((1, 0), (0, 1))), ((3, 3), (1, 1), ((0, 0), (0, 0)))]


@pytest.mark.parametrize("window,strides,padding", CASES)
@pytest.mark.parametrize("formulation", pool.FORMULATIONS)
def test_max_pool_and_its_gradient_equal_numpys_first_maximum_on_inputs_full_of_ties(formulation, window, strides,
                                                                                      padding):
  rng = np.random.RandomState(0)
  # a ReLU's output with values on a coarse grid: every window holds ties, of zeros and of positive values
  x = np.maximum(np.round(rng.randn(2, 7, 8, 3) * 2) / 2, 0).astype(np.float32)
  y_shape = jax.eval_shape(lambda: pool.max_pool(jnp.asarray(x), window, strides, padding, "xla")).shape
  cotangent = rng.randn(*y_shape).astype(np.float32)
  expected_y, expected_grad = _numpy_max_pool(x, window, strides, padding, cotangent)
  y, grad = _value_and_gradient(jnp.asarray(x), jnp.asarray(cotangent), window, strides, padding, formulation)
  np.testing.assert_array_equal(np.asarray(y), expected_y)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,strides,padding", CASES + [((3, 3), (2, 2), "SAME"), ((2, 3), (2, 1), "VALID")])
def test_shifted_equals_xla_in_value_and_gradient(window, strides, padding):
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(3, 9, 10, 4), jnp.float32)
  y_shape = jax.eval_shape(lambda: pool.max_pool(x, window, strides, padding, "xla")).shape
  cotangent = jnp.asarray(rng.randn(*y_shape), jnp.float32)
  expected = _value_and_gradient(x, cotangent, window, strides, padding, "xla")
  actual = _value_and_gradient(x, cotangent, window, strides, padding, "shifted")
  np.testing.assert_array_equal(np.asarray(actual[0]), np.asarray(expected[0]))
  np.testing.assert_allclose(np.asarray(actual[1]), np.asarray(expected[1]), rtol=1e-6, atol=1e-6)


def test_a_window_of_more_than_127_positions_routes_every_gradient_to_its_maximum():
  rng = np.random.RandomState(5)
  x = rng.permutation(2 * 13 * 13).reshape(2, 13, 13, 1).astype(np.float32)   # no ties: one maximum per window
  cotangent = rng.randn(2, 2, 2, 1).astype(np.float32)
  _, expected = _numpy_max_pool(x, (12, 12), (1, 1), ((0, 0), (0, 0)), cotangent)
  _, grad = _value_and_gradient(jnp.asarray(x), jnp.asarray(cotangent), (12, 12), (1, 1), ((0, 0), (0, 0)),
                                "shifted")
  np.testing.assert_array_equal(np.asarray(grad), expected)


def test_bfloat16_inputs_give_the_same_bfloat16_values_and_gradients():
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(2, 8, 8, 3), jnp.bfloat16)
  cotangent = jnp.asarray(rng.randn(2, 4, 4, 3), jnp.bfloat16)
  stem = ((3, 3), (2, 2), ((1, 1), (1, 1)))
  expected = _value_and_gradient(x, cotangent, *stem, "xla")
  actual = _value_and_gradient(x, cotangent, *stem, "shifted")
  for a, e in zip(actual, expected):
    assert a.dtype == e.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=1e-2, atol=1e-2)


def test_shifted_gradients_batch_under_vmap():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(4, 2, 6, 6, 3), jnp.float32)

  def gradient(formulation, x):
    return jax.grad(lambda x: jnp.sum(jnp.sin(pool.max_pool(x, 3, 2, ((1, 1), (1, 1)), formulation))))(x)

  expected = jnp.stack([gradient("xla", example) for example in x])
  np.testing.assert_allclose(jax.vmap(functools.partial(gradient, "shifted"))(x), expected, rtol=1e-6, atol=1e-6)


def test_choice_is_shifted_on_the_cpu_and_xla_elsewhere():
  assert pool.choose("cpu") == "shifted"
  assert pool.choose("gpu") == pool.choose("tpu") == "xla"


def test_conv_force_and_environment_variable_decide_the_max_pool_where_they_name_one_of_its_formulations(
    monkeypatch):
  with conv.force("xla"):
    assert pool.choose("cpu") == "xla"
  with conv.force("shifted"):
    assert pool.choose("gpu") == "shifted"
  with conv.force("im2col"):                                   # no max-pool formulation: the backend's
    assert pool.choose("cpu") == "shifted"
  monkeypatch.setenv(conv.ENVIRONMENT_VARIABLE, "xla")
  assert pool.choose("cpu") == "xla"


def test_an_unknown_formulation_is_refused_naming_the_choices():
  with pytest.raises(ValueError, match=r"formulation must be one of \('xla', 'shifted'\) for a max-pool"):
    pool.max_pool(jnp.ones((1, 4, 4, 1)), 2, 2, formulation="im2col")


def test_the_resnet_stem_traces_the_chosen_max_pool():
  model = resnet.resnet18(num_classes=3, width=0.125)
  images = jnp.ones((1, 32, 32, 3))
  # lowered, never run: the variables' shapes are all the program needs (no initializer to compile)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)

  def gradient_program():
    return jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, images)))).lower(variables).as_text()

  with conv.force("xla"):
    assert "select_and_scatter" in gradient_program()
  with conv.force("im2col"):   # every dense convolution im2col's, the max-pool the CPU's choice
    program = gradient_program()
    assert "select_and_scatter" not in program and "reduce_window" not in program


def test_converted_resnet18_gradients_through_the_stem_match_torchvision(random_torchvision_resnet):
  torch = pytest.importorskip("torch")
  torch_model = random_torchvision_resnet("resnet18", num_classes=5)
  variables = convert.convert_torchvision(torch_model.state_dict(), "resnet18")
  rng = np.random.RandomState(4)
  images = rng.randn(2, 33, 33, 3).astype(np.float32)
  weights = rng.randn(2, 5).astype(np.float32)
  model = resnet.resnet18(num_classes=5)

  def objective(params):
    return jnp.sum(model.apply({**variables, "params": params}, images) * weights)

  grads = jax.jit(jax.grad(objective))(variables["params"])
  (torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())) * torch.from_numpy(weights)).sum().backward()
  for name, actual in (("conv1", grads["conv1"]["kernel"]), ("bn1", grads["bn1"]["scale"])):
    expected = getattr(torch_model, name).weight.grad.numpy()
    expected = expected.transpose(2, 3, 1, 0) if expected.ndim == 4 else expected
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(expected))),
                               err_msg=name)
