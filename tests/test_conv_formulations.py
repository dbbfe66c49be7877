"""Every formulation of ``dtnh_jax.models.conv`` computes XLA's convolution, and the choice between them.

Each formulation's output and gradients (input and kernel) against
``lax.conv_general_dilated`` over kernel sizes, strides, torchvision's
symmetric padding and TensorFlow's 'SAME', depthwise groups and bfloat16;
the layer's parameters are ``flax.linen.Conv``'s; the choice is made from the
table, forced by ``force`` or by the layer, and XLA's elsewhere than the
measured backend; the converted torchvision ResNet still matches torchvision
under every formulation.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax import models
from dtnh_jax.models import conv, convert, efficientnet, resnet

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _torchvision_padding(kernel_size, size, stride):
  del size, stride
  return ((kernel_size // 2, kernel_size // 2),) * 2


def _tf_same_padding(kernel_size, size, stride):
  return efficientnet.same_padding((size, size), kernel_size, stride)


@functools.partial(jax.jit, static_argnames=("strides", "padding", "groups", "formulation"))
def _value_and_gradients(x, kernel, cotangent, strides, padding, groups, formulation):
  """``(y, dx, dkernel)`` of ``<conv(x, kernel), cotangent>``; ``formulation=None``: ``lax.conv_general_dilated``."""

  def apply(x, kernel):
    if formulation is None:
      return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS,
                                          feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
    return conv.conv(x, kernel, strides, padding, groups, formulation=formulation)

  y, pullback = jax.vjp(apply, x, kernel)
  return (y, *pullback(cotangent.astype(y.dtype)))


def _problem(batch, size, in_channels, kernel_shape, strides, padding, groups, seed=0, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(batch, size, size + 1, in_channels), dtype)   # H != W: catches swapped axes
  kernel = jnp.asarray(rng.randn(*kernel_shape), dtype)
  out_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=DIMENSIONS, feature_group_count=groups)).shape
  return x, kernel, jnp.asarray(rng.randn(*out_shape), dtype)


def _assert_agree(actual, expected, rtol):
  for name, a, e in zip(("output", "input gradient", "kernel gradient"), actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype, e.dtype)
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    # sums of up to 7 * 7 * 6 products of N(0, 1) values, compared relative to the largest
    np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.max(np.abs(e))), err_msg=name)


# kernel size, stride, input height (odd and even: the stride-2 'SAME' padding differs), padding rule
DENSE_CASES = [(kernel_size, stride, size, padding)
               for kernel_size, stride, size in [(1, 1, 6), (1, 2, 6), (1, 2, 7), (3, 1, 6), (3, 2, 6), (3, 2, 7),
                                                 (5, 2, 9), (7, 2, 10)]
               for padding in (_torchvision_padding, _tf_same_padding)]


@pytest.mark.parametrize("kernel_size,stride,size,padding_rule", DENSE_CASES)
def test_im2col_and_taps_equal_xla_convolution_in_value_and_gradients(kernel_size, stride, size, padding_rule):
  padding = padding_rule(kernel_size, size, stride)
  padding = (padding[0], padding_rule(kernel_size, size + 1, stride)[1])
  strides = (stride, stride)
  x, kernel, cotangent = _problem(2, size, 6, (kernel_size, kernel_size, 6, 5), strides, padding, 1)
  expected = _value_and_gradients(x, kernel, cotangent, strides, padding, 1, None)
  for formulation in ("im2col", "taps", "xla"):
    _assert_agree(_value_and_gradients(x, kernel, cotangent, strides, padding, 1, formulation), expected, 1e-5)


@pytest.mark.parametrize("formulation", ["im2col", "taps"])
def test_dense_formulations_take_unequal_kernel_sides_strides_and_paddings(formulation):
  strides, padding = (2, 1), ((1, 0), (0, 2))
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 7, 6, 3), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 2, 3, 4), jnp.float32)
  y = jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS)
  cotangent = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  _assert_agree(_value_and_gradients(x, kernel, cotangent, strides, padding, 1, formulation),
                _value_and_gradients(x, kernel, cotangent, strides, padding, 1, None), 1e-5)


@pytest.mark.parametrize("kernel_size,stride,size", [(3, 1, 6), (3, 2, 6), (3, 2, 7), (5, 1, 6), (5, 2, 9)])
def test_shifted_equals_xla_depthwise_convolution_in_value_and_gradients(kernel_size, stride, size):
  strides = (stride, stride)
  padding = (_tf_same_padding(kernel_size, size, stride)[0], _tf_same_padding(kernel_size, size + 1, stride)[1])
  x, kernel, cotangent = _problem(2, size, 6, (kernel_size, kernel_size, 1, 6), strides, padding, 6)
  expected = _value_and_gradients(x, kernel, cotangent, strides, padding, 6, None)
  for formulation in ("shifted", "xla"):
    _assert_agree(_value_and_gradients(x, kernel, cotangent, strides, padding, 6, formulation), expected, 1e-5)


@pytest.mark.parametrize("formulation,groups", [("im2col", 1), ("taps", 1), ("shifted", 6)])
def test_bfloat16_inputs_give_xla_convolutions_bfloat16_results(formulation, groups):
  """bfloat16 in, bfloat16 out, the products summed in float32 and rounded once as XLA's convolution does."""
  strides, padding = (2, 2), ((1, 1), (1, 1))
  x, kernel, cotangent = _problem(2, 7, 6, (3, 3, 6 // groups, 6), strides, padding, groups, seed=2,
                                  dtype=jnp.bfloat16)
  expected = _value_and_gradients(x, kernel, cotangent, strides, padding, groups, None)
  # a few bfloat16 roundings (8 bits of mantissa) of sums of up to 54 products
  _assert_agree(_value_and_gradients(x, kernel, cotangent, strides, padding, groups, formulation), expected, 3e-2)


@pytest.mark.parametrize("formulation", ["im2col", "taps"])
def test_dense_gradients_batch_under_vmap(formulation):
  """``split_value_and_grad(backward="vmap")`` pulls several cotangents back through one vmapped backward pass."""
  strides, padding = (1, 1), ((1, 1), (1, 1))
  x, kernel, cotangent = _problem(2, 5, 3, (3, 3, 3, 4), strides, padding, 1)
  _, pullback = jax.vjp(lambda k: conv.conv(x, k, strides, padding, formulation=formulation), kernel)
  _, reference = jax.vjp(lambda k: conv.conv(x, k, strides, padding, formulation="xla"), kernel)
  cotangents = jnp.stack([cotangent, -2 * cotangent])
  np.testing.assert_allclose(jax.vmap(pullback)(cotangents)[0], jax.vmap(reference)(cotangents)[0], rtol=1e-5,
                             atol=1e-4)


def test_taps_computes_no_input_gradient_where_only_the_kernel_is_differentiated():
  """A model's first layer: the images take no gradient, and XLA drops the one the backward pass would compute."""
  strides, padding = (2, 2), ((3, 3), (3, 3))
  x, kernel, cotangent = _problem(2, 12, 3, (7, 7, 3, 8), strides, padding, 1)

  def loss(kernel, x, cotangent, formulation):   # not linear in the kernel: the forward pass is needed
    return jnp.vdot(jnp.square(conv.conv(x, kernel, strides, padding, formulation=formulation)), cotangent)

  kernel_only = {formulation: jax.jit(jax.grad(functools.partial(loss, formulation=formulation)))
                 for formulation in ("taps", "xla")}
  _assert_agree((kernel_only["taps"](kernel, x, cotangent),), (kernel_only["xla"](kernel, x, cotangent),), 1e-5)
  program = kernel_only["taps"].lower(kernel, x, cotangent).compile().as_text()
  assert program.count(" convolution(") == 1, program   # the forward pass; the kernel's gradient is matmuls


def test_a_formulation_that_cannot_compute_the_layer_is_refused():
  x = jnp.zeros((1, 4, 4, 6))
  with pytest.raises(ValueError, match=r"formulation must be one of \('xla', 'shifted'\)"):
    conv.conv(x, jnp.zeros((3, 3, 1, 6)), 1, "SAME", feature_group_count=6, formulation="im2col")
  with pytest.raises(ValueError, match=r"formulation must be one of \('xla', 'im2col', 'taps'\)"):
    conv.conv(x, jnp.zeros((3, 3, 6, 2)), 1, "SAME", formulation="shifted")


# --- the layer -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups,formulation", [(1, "im2col"), (1, None), (8, "shifted")])
def test_conv_layer_has_flax_convs_parameter_and_initial_value(groups, formulation):
  images = jnp.zeros((1, 8, 8, 8))
  padding = ((1, 1), (1, 1))
  ours = conv.Conv(8, 3, 2, padding, feature_group_count=groups, formulation=formulation)
  flax_conv = nn.Conv(8, (3, 3), (2, 2), padding, feature_group_count=groups, use_bias=False)
  key = jax.random.key(3)
  ours_params, flax_params = ours.init(key, images), flax_conv.init(key, images)
  assert jax.tree.structure(ours_params) == jax.tree.structure(flax_params)
  np.testing.assert_array_equal(ours_params["params"]["kernel"], flax_params["params"]["kernel"])
  images = jax.random.normal(jax.random.key(4), images.shape)
  np.testing.assert_allclose(ours.apply(ours_params, images), flax_conv.apply(flax_params, images), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("efficientnet-lite0", 32)])
def test_no_formulation_changes_a_models_parameters(arch, size):
  shapes = {}
  for formulation in conv.FORMULATIONS:
    with conv.force(formulation):
      variables = jax.eval_shape(lambda: models.init_variables(models.create_model(arch, 10), 0, size))
    shapes[formulation] = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), variables)
  assert all(shape == shapes["xla"] for shape in shapes.values())


# --- the choice ----------------------------------------------------------------------------------------------------


def _record(*layers):
  return {"host": "a test", "date": "2026-12-07", "jax": "0.10.2", "command": "by hand", "layers": list(layers)}


_TABLE = {"backends": {"cpu-avx512": _record(
    {"kind": "dense", "kernel": [3, 3], "stride": [1, 1], "batch": 16, "out_hw": [3, 3], "in_channels": 512,
     "out_channels": 512, "choice": "im2col"},
    {"kind": "dense", "kernel": [3, 3], "stride": [1, 1], "batch": 16, "out_hw": [24, 24], "in_channels": 64,
     "out_channels": 64, "choice": "xla"},
    {"kind": "depthwise", "kernel": [3, 3], "stride": [1, 1], "batch": 16, "out_hw": [8, 8], "in_channels": 32,
     "out_channels": 32, "choice": "shifted"},
), "cpu-avx2": _record(
    {"kind": "dense", "kernel": [3, 3], "stride": [1, 1], "batch": 16, "out_hw": [24, 24], "in_channels": 64,
     "out_channels": 64, "choice": "taps"},
)}}


def test_choice_is_the_nearest_measured_layers():
  choose = functools.partial(conv.choose, strides=1, padding=((1, 1), (1, 1)), backend="cpu-avx512", table=_TABLE)
  assert choose((16, 3, 3, 512), (3, 3, 512, 512)) == "im2col"
  assert choose((8, 4, 4, 384), (3, 3, 384, 384)) == "im2col"    # deep: nearer the 3x3x512 layer
  assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == "xla"
  assert choose((32, 32, 32, 32), (3, 3, 32, 48)) == "xla"       # shallow
  assert choose((16, 8, 8, 96), (3, 3, 1, 96), feature_group_count=96) == "shifted"


def test_choice_is_the_table_of_the_cpus_instruction_set():
  choose = functools.partial(conv.choose, strides=1, padding=((1, 1), (1, 1)), table=_TABLE)
  assert choose((16, 24, 24, 64), (3, 3, 64, 64), backend="cpu-avx2") == "taps"
  assert choose((16, 24, 24, 64), (3, 3, 64, 64), backend="cpu-avx512") == "xla"
  # an instruction set not measured: the file's first CPU table
  assert choose((16, 24, 24, 64), (3, 3, 64, 64), backend="cpu-arm64") == "xla"
  assert conv.table_layers(_TABLE, "cpu-arm64") is _TABLE["backends"]["cpu-avx512"]["layers"]
  # "cpu" (or jax's default backend): this machine's instruction set
  assert choose((16, 24, 24, 64), (3, 3, 64, 64), backend="cpu") == (
      "taps" if conv.table_key("cpu") == "cpu-avx2" else "xla")


def test_choose_from_another_instruction_sets_table_while_tracing_inside_it():
  choose = functools.partial(conv.choose, strides=1, padding=((1, 1), (1, 1)), backend="cpu", table=_TABLE)
  mine = choose((16, 24, 24, 64), (3, 3, 64, 64))
  for key, expected in (("cpu-avx2", "taps"), ("cpu-avx512", "xla")):
    with conv.choose_from(key):
      assert conv.table_key("cpu") == key and conv.table_key("gpu") == "gpu"
      assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == expected
      with conv.force("im2col"):
        assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == "im2col"
  assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == mine
  with pytest.raises(ValueError, match="key must name a CPU table"):
    with conv.choose_from("gpu"):
      pass


def test_table_key_names_the_cpus_instruction_set():
  import platform  # pylint: disable=g-import-not-at-top
  key = conv.table_key("cpu")
  if platform.machine().lower() in ("x86_64", "amd64") and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as file:
      flags = next(line for line in file if line.startswith("flags")).split()
    assert key == ("cpu-avx512" if "avx512f" in flags else "cpu-avx2" if "avx2" in flags else "cpu-x86_64")
  else:
    assert key == f"cpu-{platform.machine().lower()}"
  assert conv.table_key("gpu") == "gpu"
  assert conv.table_key() == conv.table_key(jax.default_backend())


def test_choice_is_xla_on_a_backend_the_table_does_not_cover():
  assert conv.choose((16, 3, 3, 512), (3, 3, 512, 512), 1, ((1, 1), (1, 1)), backend="gpu", table=_TABLE) == "xla"
  assert conv.choose((16, 8, 8, 96), (3, 3, 1, 96), 1, "SAME", 96, backend="tpu", table=_TABLE) == "xla"


def test_choice_is_xla_for_grouped_convolutions_that_are_not_depthwise():
  assert conv.choose((16, 8, 8, 96), (3, 3, 2, 96), 1, "SAME", 48, backend="cpu-avx512", table=_TABLE) == "xla"


def test_force_applies_where_the_formulation_can_compute_the_layer():
  dense, depthwise = ((16, 3, 3, 512), (3, 3, 512, 512)), ((16, 8, 8, 96), (3, 3, 1, 96))
  choose = functools.partial(conv.choose, strides=1, padding="SAME", backend="cpu-avx512", table=_TABLE)
  with conv.force("xla"):
    assert choose(*dense) == "xla"
    assert choose(*depthwise, feature_group_count=96) == "xla"
  with conv.force("shifted"):
    assert choose(*dense) == "im2col"                          # the table's: shifted computes no dense layer
    assert choose(*depthwise, feature_group_count=96) == "shifted"
  with conv.force("im2col"):
    assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == "im2col"
  assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == "xla"     # the block restored the table's choice


def test_force_refuses_an_unknown_formulation():
  with pytest.raises(ValueError, match="formulation must be one of"):
    with conv.force("winograd"):
      pass


def test_environment_variable_forces_where_no_force_block_does(monkeypatch):
  monkeypatch.setenv(conv.ENVIRONMENT_VARIABLE, "im2col")
  choose = functools.partial(conv.choose, strides=1, padding="SAME", backend="cpu-avx512", table=_TABLE)
  assert choose((16, 24, 24, 64), (3, 3, 64, 64)) == "im2col"
  with conv.force("xla"):
    assert choose((16, 3, 3, 512), (3, 3, 512, 512)) == "xla"


def test_environment_variable_naming_no_formulation_is_refused_in_one_line(monkeypatch):
  monkeypatch.setenv(conv.ENVIRONMENT_VARIABLE, "fast")
  with pytest.raises(ValueError, match=r"DTNH_JAX_CONV='fast' is not a formulation; set one of"):
    conv.choose((16, 3, 3, 512), (3, 3, 512, 512), backend="cpu-avx512", table=_TABLE)


def test_a_layers_own_formulation_wins_over_force():
  layer = conv.Conv(4, 3, 1, ((1, 1), (1, 1)), formulation="xla")
  images = jnp.ones((1, 3, 3, 4))
  params = layer.init(jax.random.key(0), images)
  with conv.force("im2col"):
    text = jax.jit(layer.apply).lower(params, images).as_text()
  assert "convolution" in text


def test_force_decides_what_a_traced_model_computes():
  # ResNet-10: every kind of ResNet convolution (stem, 3x3 of stride 1 and 2, 1x1 downsampling), half ResNet-18's
  # blocks to trace
  model = resnet.resnet10(num_classes=3, width=0.125, small_stem=True)
  variables = models.init_variables(model, 0, 8)
  images = jnp.ones((2, 8, 8, 3))
  for formulation, convolutions in (("xla", 1 + 4 * 2 + 3), ("im2col", 0)):   # conv1, 2 per block, 3 downsamples
    with conv.force(formulation):
      text = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).as_text()
    assert text.count("stablehlo.convolution") == convolutions, formulation


def test_shipped_table_records_its_measurements_and_covers_resnet18_at_the_benchmark_size():
  table = conv.load_table()
  assert {"cpu-avx512", "cpu-avx2"} <= set(table["backends"])
  for key, record in table["backends"].items():
    assert {"host", "date", "jax", "command", "layers"} <= set(record), key
    layers = record["layers"]
    measured = {(e["kind"], tuple(e["kernel"]), tuple(e["stride"]), e["batch"], tuple(e["out_hw"]), e["in_channels"],
                 e["out_channels"]) for e in layers}
    # ResNet-18 at 96x96, batch 16 (benchmarks/peer_torch.py): every conv shape measured, not extrapolated
    for size, channels, stride in ((24, 64, 1), (12, 128, 1), (6, 256, 1), (3, 512, 1), (3, 512, 2)):
      in_channels = channels // stride
      assert ("dense", (3, 3), (stride, stride), 16, (size, size), in_channels, channels) in measured, key
    assert all(e["choice"] in conv.applicable(e["in_channels"], (*e["kernel"], 1 if e["kind"] == "depthwise"
                                                                 else e["in_channels"], e["out_channels"]),
                                              e["in_channels"] if e["kind"] == "depthwise" else 1) for e in layers)
  # measured since the stems were: a first layer (the images: 3 channels) without the input's gradient
  stems = [e for e in table["backends"]["cpu-avx2"]["layers"] if e["in_channels"] == 3]
  assert stems and not any(e["input_gradient"] for e in stems)


# --- the models ----------------------------------------------------------------------------------------------------


def test_converted_resnet10_matches_torchvision_with_every_conv_as_im2col(random_torchvision_resnet):
  """tests/test_models.py checks the measured choice (and XLA's convolutions off the CPU); this, im2col everywhere.
  ResNet-10: every kind of ResNet convolution (stem, 3x3 of stride 1 and 2, 1x1 downsampling), half ResNet-18's
  blocks to compile."""
  torch = pytest.importorskip("torch")
  torch_model = random_torchvision_resnet("resnet10", num_classes=10)
  variables = convert.convert_torchvision(torch_model.state_dict(), "resnet10")
  images = np.random.RandomState(0).randn(2, 57, 57, 3).astype(np.float32)   # odd: every padding is exercised
  with conv.force("im2col"):
    logits = jax.jit(lambda v, x: resnet.resnet10(num_classes=10).apply(v, x))(variables, images)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  difference = float(np.max(np.abs(np.asarray(logits, np.float64) - expected)))
  assert difference <= 1e-4 * max(1.0, float(np.max(np.abs(expected)))), difference


def test_resnet_gradients_are_the_same_under_every_formulation():
  # eval mode: in train mode BatchNorm over the 2 values per channel of the last stage makes the float32
  # gradients themselves 1-4% from float64 for either formulation. ResNet-10: every kind of ResNet convolution,
  # half ResNet-18's blocks to compile three times
  model = resnet.resnet10(num_classes=3, width=0.125, small_stem=True)
  variables = models.init_variables(model, 0, 8)
  images = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)

  def loss(params):
    return jnp.sum(jax.nn.log_softmax(model.apply({**variables, "params": params}, images))[:, 0])

  grads = {}
  for formulation in ("xla", "im2col", "taps"):
    with conv.force(formulation):
      grads[formulation] = jax.jit(jax.grad(loss))(variables["params"])
  for formulation in ("im2col", "taps"):
    for path, expected in jax.tree_util.tree_leaves_with_path(grads["xla"]):
      actual = functools.reduce(lambda tree, key: tree[key.key], path, grads[formulation])
      np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(expected))),
                                 err_msg=f"{formulation}: {jax.tree_util.keystr(path)}")
