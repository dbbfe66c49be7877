"""The Flax ResNets compute what torchvision's compute.

Differential tests: a torchvision model with random weights and random
BatchNorm statistics is converted and both are run on the same images; the
logits, the running statistics after a train-mode step, the intermediate
feature maps and masked forward passes must agree to float32 rounding.
"""

import functools
import logging
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax.models import convert
from dtnh_jax.models import resnet

# Max-abs difference allowed, relative to max(1, max |reference|).
RTOL = 1e-4
# The running variance is an average of squares of activations deep in a
# random network; PyTorch's own float32 result is ~5e-5 (relative) away from
# its float64 one for ResNet-50, so allow a little more than for logits.
STATS_RTOL = 2e-4
BATCH = 2

ARCHS = [
    "resnet10",
    "resnet18",
    pytest.param("resnet50", marks=pytest.mark.slow),
]
# An even and an odd size: the odd one catches wrong padding arithmetic,
# the even one Flax's asymmetric 'SAME' padding on stride-2 layers.
SIZES = [64, 57]


def _images(size, batch=BATCH, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(
      np.float32)


def _to_torch(images_nhwc):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(
      np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def _nchw_to_nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1)


def _max_abs_diff(actual, reference):
  return float(np.max(np.abs(np.asarray(actual, np.float64)
                             - np.asarray(reference, np.float64))))


def _assert_close(actual, reference, rtol, record=None, name=None):
  reference = np.asarray(reference)
  assert np.shape(actual) == reference.shape
  difference = _max_abs_diff(actual, reference)
  scale = float(np.max(np.abs(reference)))
  if record is not None:
    record(name, difference, scale)
  assert difference <= rtol * max(1.0, scale), (difference, scale)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, images, *, train=False):
  """``model.apply`` compiled: one program per network and shape, not one dispatch per operation."""
  return model.apply(variables, images, train=train, mutable=["batch_stats"] if train else False)


@pytest.fixture
def converted(random_torchvision_resnet):
  """(torchvision model, Flax model, Flax variables) for an arch."""

  def make(arch):
    torch_model = random_torchvision_resnet(arch)
    variables = convert.convert_torchvision(torch_model.state_dict(), arch)
    return torch_model, resnet.create_model(arch), variables

  return make


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", ARCHS)
def test_eval_logits_match_torchvision(converted, record_parity, arch, size):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model, model, variables = converted(arch)
  images = _images(size)
  with torch.no_grad():
    expected = torch_model.eval()(_to_torch(images)).numpy()
  with jax.default_matmul_precision("highest"):
    logits = _apply(model, variables, images)
  assert logits.dtype == jnp.float32
  _assert_close(logits, expected, RTOL, record_parity,
                f"{arch} eval logits ({size}x{size})")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", ARCHS)
def test_train_mode_matches_torchvision(converted, record_parity, arch, size):
  """Batch statistics normalize; running statistics move with momentum 0.1."""
  import torch  # pylint: disable=g-import-not-at-top
  torch_model, model, variables = converted(arch)
  images = _images(size)
  with torch.no_grad():
    expected = torch_model.train()(_to_torch(images)).numpy()
  with jax.default_matmul_precision("highest"):
    logits, updates = _apply(model, variables, images, train=True)
  _assert_close(logits, expected, RTOL, record_parity,
                f"{arch} train logits ({size}x{size})")

  updated = convert.to_torchvision(
      {"params": variables["params"], **updates}, arch)
  worst = (0.0, 1.0)
  for key, tensor in torch_model.state_dict().items():
    if "running_" in key:
      reference = tensor.numpy()
      _assert_close(updated[key], reference, STATS_RTOL)
      scale = max(1.0, float(np.max(np.abs(reference))))
      difference = _max_abs_diff(updated[key], reference)
      worst = max(worst, (difference, scale), key=lambda d: d[0] / d[1])
  record_parity(f"{arch} running stats ({size}x{size})", *worst)


def test_running_variance_is_unbiased_like_pytorch():
  # 2 images of 1x1 pixel: n = 2, so PyTorch stores var * 2 / 1.
  norm = resnet.BatchNorm(use_running_average=False, momentum=0.0)
  x = jnp.array([1.0, 3.0]).reshape(2, 1, 1, 1)
  variables = norm.init(jax.random.key(0), x)
  y, updates = norm.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(updates["batch_stats"]["mean"], [2.0])
  np.testing.assert_allclose(updates["batch_stats"]["var"], [2.0])
  # The output itself uses the biased variance (1.0).
  np.testing.assert_allclose(y.ravel(), [-1.0, 1.0], atol=1e-5)


def test_features_are_torchvision_stage_outputs(converted, record_parity):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model, model, variables = converted("resnet18")
  images = _images(57)
  captured = {}
  names = ["layer1", "layer2", "layer3", "layer4", "avgpool"]
  hooks = [getattr(torch_model, name).register_forward_hook(
      lambda _, __, out, name=name: captured.__setitem__(name, out))
           for name in names]
  with torch.no_grad():
    torch_model(_to_torch(images))
  for hook in hooks:
    hook.remove()

  with jax.default_matmul_precision("highest"):
    logits, features = model.apply(variables, images, return_features=True)
  assert set(features) == set(resnet.FEATURE_NAMES)
  np.testing.assert_array_equal(logits, model.apply(variables, images))
  for name in names[:4]:
    _assert_close(features[name], _nchw_to_nhwc(captured[name]), RTOL,
                  record_parity, f"resnet18 feature {name} (57x57)")
  _assert_close(features["pool"], captured["avgpool"].flatten(1).numpy(), RTOL)


@pytest.mark.parametrize(
    "stage, per_example",
    [("layer4", False), ("layer2", True)],
    ids=["layer4_channel_mask", "layer2_per_example_mask"])
def test_feature_mask_equals_zeroing_in_torchvision(converted, stage,
                                                    per_example):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model, model, variables = converted("resnet18")
  images = _images(57)
  channels = variables["params"][f"{stage}_1"]["bn2"]["scale"].shape[0]
  mask = np.ones((BATCH, 1, 1, channels) if per_example else (channels,),
                 np.float32)
  mask[..., 3] = 0.0
  if per_example:
    mask[1, ..., 5] = 0.0  # only the second image loses channel 5

  torch_mask = torch.from_numpy(
      mask.reshape(BATCH, channels, 1, 1) if per_example
      else mask.reshape(1, channels, 1, 1))
  hook = getattr(torch_model, stage).register_forward_hook(
      lambda _, __, out: out * torch_mask)
  with torch.no_grad():
    expected = torch_model(_to_torch(images)).numpy()
  hook.remove()

  with jax.default_matmul_precision("highest"):
    logits, features = model.apply(variables, images, return_features=True,
                                   feature_masks={stage: mask})
    unmasked = model.apply(variables, images)
  _assert_close(logits, expected, RTOL)
  assert _max_abs_diff(unmasked, expected) > 1e-3  # the mask matters
  assert np.all(np.asarray(features[stage])[..., 3] == 0.0)


def _tiny_model(**kwargs):
  options = dict(num_classes=10, width=0.25, small_stem=True)
  options.update(kwargs)
  return resnet.resnet18(**options)


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of ``_tiny_model()``, from ``init_variables``."""
  return resnet.init_variables(_tiny_model(), jax.random.key(0), 16)


def test_init_gives_torchvision_defaults(tiny_variables):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  np.testing.assert_array_equal(params["bn1"]["scale"], np.ones(16))
  np.testing.assert_array_equal(params["bn1"]["bias"], np.zeros(16))
  np.testing.assert_array_equal(stats["bn1"]["mean"], np.zeros(16))
  np.testing.assert_array_equal(stats["bn1"]["var"], np.ones(16))
  # kaiming_normal_(mode="fan_out"): std sqrt(2 / (3 * 3 * 128)).
  kernel = params["layer4_1"]["conv2"]["kernel"]
  assert abs(float(jnp.std(kernel)) / np.sqrt(2 / (9 * 128)) - 1) < 0.05
  assert float(jnp.max(jnp.abs(params["fc"]["kernel"]))) <= 1 / np.sqrt(128)


def test_init_variables_equals_jitted_model_init():
  model = _tiny_model(width=0.125)
  key = jax.random.key(3)
  expected = jax.jit(model.init)(key, jnp.zeros((1, 16, 16, 3)))
  actual = resnet.init_variables(model, key, (16, 16))
  assert jax.tree.structure(actual) == jax.tree.structure(dict(expected))
  jax.tree.map(np.testing.assert_array_equal, actual, dict(expected))


def test_init_variables_accepts_raw_keys_and_int_seeds():
  model = _tiny_model(width=0.125)
  from_int = resnet.init_variables(model, 5, 8)
  from_key = resnet.init_variables(model, jax.random.key(5), 8)
  jax.tree.map(np.testing.assert_array_equal, from_int, from_key)
  from_raw = resnet.init_variables(model, jax.random.PRNGKey(5), 8)
  assert jax.tree.structure(from_raw) == jax.tree.structure(from_key)


def test_init_variables_again_with_the_same_arguments_traces_the_model_no_second_time():
  model = _tiny_model(width=0.125)
  traced = []
  original = resnet.ResNet.lazy_init
  counting = lambda self, *args, **kwargs: traced.append(1) or original(self, *args, **kwargs)
  with mock.patch.object(resnet.ResNet, "lazy_init", counting):
    first = resnet.init_variables(model, jax.random.PRNGKey(11), 8)
    first["params"]["fc"] = None  # a caller's change to its dicts is its own
    again = resnet.init_variables(model, jax.random.PRNGKey(11), 8)
    assert len(traced) == 1
    other_seed = resnet.init_variables(model, jax.random.PRNGKey(12), 8)
    other_size = resnet.init_variables(model, jax.random.PRNGKey(11), 12)
    assert len(traced) == 3
  expected = jax.jit(model.init)(jax.random.PRNGKey(11), jnp.zeros((1, 8, 8, 3)))
  jax.tree.map(np.testing.assert_array_equal, again, dict(expected))
  assert not np.array_equal(other_seed["params"]["conv1"]["kernel"], again["params"]["conv1"]["kernel"])
  assert jax.tree.structure(other_size) == jax.tree.structure(again)


def test_new_widths_and_sizes_compile_no_new_random_number_code(caplog):
  key = jax.random.key(0)
  resnet.init_variables(_tiny_model(width=0.125), key, 8)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
    for width, size in [(0.25, 16), (0.5, 12)]:
      resnet.init_variables(_tiny_model(width=width, num_classes=7), key, size)
    jax.jit(lambda x: x + 1)(jnp.ones(3))  # shows that compiles are logged
  compiled = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  assert any("<lambda>" in message for message in compiled)
  assert not [m for m in compiled if "random" in m or "threefry" in m], compiled


def test_conv_kernel_spanning_several_blocks_is_kaiming_normal_fan_out():
  shape = (3, 3, 128, 96)  # 110_592 values: two blocks of draws
  assert np.prod(shape) > resnet._BLOCK_SIZE
  kernel = np.asarray(resnet.conv_kernel_init(jax.random.key(1), shape))
  std = np.sqrt(2 / (3 * 3 * 96))
  assert abs(kernel.std() / std - 1) < 0.01
  assert abs(kernel.mean()) < 0.01 * std
  flat = kernel.reshape(-1)
  block = resnet._BLOCK_SIZE
  # The second block is drawn anew, not a copy of the first.
  head, tail = flat[:flat.size - block], flat[block:]
  assert abs(np.corrcoef(head, tail)[0, 1]) < 0.02
  other = np.asarray(resnet.conv_kernel_init(jax.random.key(2), shape))
  assert abs(np.corrcoef(flat, other.reshape(-1))[0, 1]) < 0.02


def test_linear_init_is_torch_uniform():
  kernel = np.asarray(resnet.linear_kernel_init(jax.random.key(1),
                                                (400, 300)))
  bias = np.asarray(resnet.linear_bias_init(400)(jax.random.key(2), (300,)))
  bound = 1 / np.sqrt(400)
  assert np.all(np.abs(kernel) <= bound) and np.all(np.abs(bias) <= bound)
  # U(-b, b): variance b^2 / 3.
  assert abs(kernel.var() / (bound**2 / 3) - 1) < 0.02
  assert abs(kernel.mean()) < 0.01 * bound


def test_unknown_feature_mask_name_is_rejected(tiny_variables):
  with pytest.raises(ValueError, match="layer_4"):
    _tiny_model().apply(tiny_variables, jnp.zeros((1, 16, 16, 3)),
                        feature_masks={"layer_4": jnp.ones(128)})


def test_feature_masks_work_under_jit(tiny_variables):
  model = _tiny_model()
  x = jnp.asarray(_images(16))

  @jax.jit
  def masked_logits(variables, mask):
    return model.apply(variables, x, feature_masks={"layer4": mask})

  ones = jnp.ones(128)
  np.testing.assert_allclose(masked_logits(tiny_variables, ones),
                             model.apply(tiny_variables, x),
                             rtol=1e-5, atol=1e-5)
  zeros = jnp.zeros(128)
  bias = tiny_variables["params"]["fc"]["bias"]
  np.testing.assert_allclose(masked_logits(tiny_variables, zeros),
                             jnp.broadcast_to(bias, (BATCH, 10)), atol=1e-6)


def test_width_and_small_stem_set_channels_and_resolution(tiny_variables):
  x = jnp.zeros((BATCH, 32, 32, 3))
  assert tiny_variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)
  logits, features = _tiny_model().apply(tiny_variables, x,
                                         return_features=True)
  assert logits.shape == (BATCH, 10)
  assert features["layer1"].shape == (BATCH, 32, 32, 16)
  assert features["layer2"].shape == (BATCH, 16, 16, 32)
  assert features["layer3"].shape == (BATCH, 8, 8, 64)
  assert features["layer4"].shape == (BATCH, 4, 4, 128)
  assert features["pool"].shape == (BATCH, 128)


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672),
    ("resnet50", 25_557_032)])
def test_parameter_count_is_torchvisions(arch, expected):
  model = resnet.create_model(arch)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  assert sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) == (
      expected)


def test_bfloat16_compute_keeps_float32_params(tiny_variables):
  x = jnp.asarray(_images(16))
  model16 = _tiny_model(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model16.init, jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  logits, features = model16.apply(tiny_variables, x, return_features=True)
  assert logits.dtype == jnp.float32
  assert features["layer4"].dtype == jnp.bfloat16
  reference = _tiny_model().apply(tiny_variables, x)
  np.testing.assert_allclose(logits, reference, rtol=0.05,
                             atol=0.05 * float(jnp.max(jnp.abs(reference))))
  _, updates = model16.apply(tiny_variables, x, train=True,
                             mutable=["batch_stats"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))


def test_replace_head_keeps_backbone_and_resizes_fc(tiny_variables):
  new = resnet.replace_head(tiny_variables, 37, jax.random.key(1))

  assert new["params"]["fc"]["kernel"].shape == (128, 37)
  assert new["params"]["fc"]["bias"].shape == (37,)
  bound = 1.0 / np.sqrt(128)
  for leaf in new["params"]["fc"].values():
    assert leaf.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(leaf))) <= bound
  assert new["batch_stats"] is tiny_variables["batch_stats"]
  old_backbone = {k: v for k, v in tiny_variables["params"].items()
                  if k != "fc"}
  new_backbone = {k: v for k, v in new["params"].items() if k != "fc"}
  jax.tree.map(np.testing.assert_array_equal, new_backbone, old_backbone)
  assert tiny_variables["params"]["fc"]["kernel"].shape == (128, 10)

  logits = _tiny_model(num_classes=37).apply(new, jnp.asarray(_images(16)))
  assert logits.shape == (BATCH, 37)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet-lite0"])
def test_bn_momentum_sets_the_decay_of_every_running_statistic(arch):
  """running <- m * running + (1 - m) * batch statistic, at every BatchNorm, from init's mean 0 and var 1."""
  from dtnh_jax import models  # pylint: disable=g-import-not-at-top
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  # the momentum acts on the update only: both models start from the same variables, initialized once
  variables = models.init_variables(models.create_model(arch, num_classes=3, width=0.25), 0, 32)

  # jitted: one program, not one dispatch per operation of the network; and one for both momenta, an input of it
  # (the model's attribute is traced, the code that reads it the same)
  @jax.jit
  def running_stats(variables, momentum):
    model = models.create_model(arch, num_classes=3, width=0.25, bn_momentum=momentum)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]

  batch, decayed = (jax.tree.leaves_with_path(running_stats(variables, jnp.float32(m))) for m in (0.0, 0.75))
  for (path, batch_value), (_, value) in zip(batch, decayed):
    start = 0.0 if path[-1].key == "mean" else 1.0
    np.testing.assert_allclose(value, 0.75 * start + 0.25 * batch_value, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_bn_momentum_outside_zero_to_one_is_refused_naming_the_flag_and_the_convention():
  from dtnh_jax.train.config import ConfigError, ModelConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"--bn-momentum must be in \[0, 1\).*PyTorch's momentum 0.1 is 0.9"):
    ModelConfig(bn_momentum=1.0)
