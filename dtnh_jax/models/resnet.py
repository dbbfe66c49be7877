"""ResNet-18/34/50 in Flax, laid out and computing exactly like torchvision.

The models follow ``torchvision.models.resnet`` (v1.5: the stride of a
Bottleneck block sits on its 3x3 conv) so that ImageNet checkpoints convert
one tensor to one tensor (see :mod:`dtnh_jax.models.convert`) and give the same
logits, in eval mode and in train mode, to float32 rounding.

Three details decide whether converted weights give the same numbers:

* **Padding.** Flax's ``'SAME'`` padding of a stride-2 conv or max-pool on an
  even input pads ``(0, 1)``, where PyTorch pads ``(1, 1)``; the feature maps
  are then shifted by one pixel and the logits of a converted model are off.
  Every conv and the max-pool here use explicit PyTorch padding
  ``((k // 2, k // 2), (k // 2, k // 2))``; the max-pool pads with ``-inf``.
* **BatchNorm momentum.** PyTorch updates ``running = (1 - m) * running + m *
  batch`` with ``m = 0.1``; Flax writes the same rule as ``running = m' *
  running + (1 - m') * batch``, so ``m' = 0.9``.
* **Running variance.** PyTorch normalizes with the biased batch variance but
  stores the *unbiased* one (``n / (n - 1)``) in ``running_var``;
  ``flax.linen.BatchNorm`` stores the biased one. At the small feature maps of
  the last stage (2x2 for a 64x64 image) the two differ by 15% or more, so
  :class:`BatchNorm` below follows PyTorch. It keeps the parameter and
  statistic names of ``flax.linen.BatchNorm`` (``scale``, ``bias`` /
  ``mean``, ``var``), so code written against Flax's module works unchanged.

Names of submodules map to torchvision's ``state_dict`` keys by one rule: a
trailing ``_k`` in a Flax module name is torchvision's ``.k`` (a position in an
``nn.Sequential``), and ``/`` is ``.``:

==================================  ======================================
Flax path                           torchvision key
==================================  ======================================
``params/conv1/kernel``             ``conv1.weight``
``params/bn1/scale``                ``bn1.weight``
``batch_stats/bn1/mean``            ``bn1.running_mean``
``params/layer1_0/conv2/kernel``    ``layer1.0.conv2.weight``
``params/layer2_0/downsample_0``    ``layer2.0.downsample.0`` (1x1 conv)
``params/layer2_0/downsample_1``    ``layer2.0.downsample.1`` (BatchNorm)
``params/fc/kernel``                ``fc.weight`` (transposed)
==================================  ======================================

Example::

  import jax
  from dtnh_jax.models import init_variables, resnet18

  model = resnet18(num_classes=10, width=0.25, small_stem=True)
  variables = init_variables(model, jax.random.key(0), image_size=32)
  logits, features = model.apply(
      variables, images, train=False, return_features=True)
  features["layer4"].shape  # (N, 4, 4, 128)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import names
from dtnh_jax.models import conv as conv_lib
from dtnh_jax.models import pool

__all__ = [
    "ARCHITECTURES",
    "FEATURE_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ResNet",
    "conv_kernel_init",
    "create_model",
    "init_variables",
    "linear_bias_init",
    "linear_kernel_init",
    "replace_head",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
]


def _read_only(values: Sequence[float]) -> np.ndarray:
  array = np.asarray(values, dtype=np.float32)
  array.flags.writeable = False
  return array


#: Per-channel (RGB) mean of ImageNet that torchvision's weights expect:
#: ``images = (rgb_in_0_1 - IMAGENET_MEAN) / IMAGENET_STD``, channels last.
IMAGENET_MEAN = _read_only(names.IMAGENET_MEAN)
#: Per-channel (RGB) standard deviation of ImageNet, see ``IMAGENET_MEAN``.
IMAGENET_STD = _read_only(names.IMAGENET_STD)

#: Names of the intermediate outputs returned with ``return_features=True``
#: and accepted as keys of ``feature_masks``: the output of each stage (NHWC)
#: and the globally average-pooled vector that feeds the head (N, C).
FEATURE_NAMES = names.FEATURE_NAMES

# Random initial values, cut from fixed-size blocks of draws.
#
# jax.random compiles one XLA program per output shape, and on a CPU a
# threefry program takes ~0.4 s to compile: a small ResNet with a dozen kernel
# shapes spent 5-10 s of its first ``model.init`` compiling random-number code,
# again for every new width or in every new process. Here every tensor is cut
# from blocks of _BLOCK_SIZE draws, block i drawn with fold_in(key, i), so one
# compiled program per distribution serves every shape, width and model; the
# slicing and scaling of concrete blocks run in NumPy (nothing to compile).
# Under a trace (jax.jit(model.init), jax.eval_shape) the same blocks come from
# one vmapped draw, one program instead of one per block, and the same values.
_BLOCK_SIZE = 1 << 16


def _random_block(key: jax.Array, index: jax.Array,
                  distribution: str) -> jax.Array:
  """Block ``index`` of the draws for ``key``: N(0, 1) or U(-1, 1), float32."""
  key = jax.random.fold_in(key, index)
  if distribution == "normal":
    return jax.random.normal(key, (_BLOCK_SIZE,), jnp.float32)
  return jax.random.uniform(key, (_BLOCK_SIZE,), jnp.float32, -1.0, 1.0)


_compiled_random_block = jax.jit(_random_block, static_argnames="distribution")


def _scaled_draws(key: jax.Array, shape: Sequence[int], dtype: Any,
                  distribution: str, scale: float) -> jax.Array:
  """``scale`` times N(0, 1) (``"normal"``) or U(-1, 1) (``"uniform"``) draws.

  The values are the first ``prod(shape)`` draws of the key's blocks 0, 1, ...
  in row-major order, whether ``key`` is concrete or traced.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  if size == 0:
    return jnp.zeros(shape, dtype)
  num_blocks = -(-size // _BLOCK_SIZE)
  if isinstance(key, jax.core.Tracer):
    indices = jnp.arange(num_blocks, dtype=jnp.uint32)
    blocks = jax.vmap(
        lambda index: _random_block(key, index, distribution))(indices)
    draws = blocks.reshape(-1)[:size].reshape(shape)
    return (draws * jnp.float32(scale)).astype(dtype)
  blocks = [
      np.asarray(_compiled_random_block(key, np.uint32(index),
                                        distribution=distribution))
      for index in range(num_blocks)
  ]
  draws = np.concatenate(blocks)[:size].reshape(shape)
  return jnp.asarray(draws * np.float32(scale), dtype)


# torchvision initializes convs with kaiming_normal_(mode="fan_out",
# nonlinearity="relu") and nn.Linear with U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# for weight and bias; the same distributions here, so models trained from
# scratch (small CPU-scale experiments) start as torchvision's would.
def conv_kernel_init(key: jax.Array, shape: Sequence[int],
                      dtype: Any = jnp.float32) -> jax.Array:
  """N(0, 2 / fan_out) for an HWIO kernel, fan_out = H * W * O (as torch)."""
  fan_out = math.prod(shape[:-2]) * shape[-1]
  return _scaled_draws(key, shape, dtype, "normal", math.sqrt(2.0 / fan_out))


def linear_kernel_init(key: jax.Array, shape: Sequence[int],
                        dtype: Any = jnp.float32) -> jax.Array:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for an (in, out) kernel, as torch's
  ``kaiming_uniform_(a=sqrt(5))`` of ``nn.Linear.weight``."""
  return _scaled_draws(key, shape, dtype, "uniform", 1.0 / math.sqrt(shape[0]))


def linear_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch.nn.Linear's bias."""

  def init(key, shape, dtype=jnp.float32):
    return _scaled_draws(key, shape, dtype, "uniform", 1.0 / math.sqrt(fan_in))

  return init


class BatchNorm(nn.Module):
  """Batch normalization (last axis) that matches ``torch.nn.BatchNorm2d``.

  In train mode the input is normalized with the batch mean and the biased
  batch variance, and the running statistics are updated as::

    mean <- momentum * mean + (1 - momentum) * batch_mean
    var  <- momentum * var  + (1 - momentum) * batch_var * n / (n - 1)

  with ``n`` the number of values per channel (batch x height x width). The
  ``n / (n - 1)`` (PyTorch's unbiased running variance) is what differs from
  ``flax.linen.BatchNorm``. Statistics are computed in float32 whatever the
  compute ``dtype``. Under ``jax.jit`` with a batch sharded over devices the
  means are global, so no ``axis_name`` is needed.

  Attributes:
    use_running_average: normalize with the running statistics (eval mode) and
      leave them unchanged.
    momentum: Flax-style decay of the running statistics; PyTorch's
      ``momentum=0.1`` is ``0.9`` here.
    epsilon: added to the variance; torchvision's 1e-5.
    dtype: dtype of the output (the compute dtype).
    param_dtype: dtype of ``scale`` and ``bias``.
  """

  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,),
                       self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,),
                      self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros,
                                 (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones,
                                (channels,), jnp.float32)

    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=reduce_axes)
      # Two passes (not E[x^2] - E[x]^2): no cancellation, as PyTorch.
      var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
      if not self.is_initializing():
        n = x.size // channels
        unbiased_var = var * (n / max(n - 1, 1))
        running_mean.value = (self.momentum * running_mean.value
                              + (1.0 - self.momentum) * mean)
        running_var.value = (self.momentum * running_var.value
                             + (1.0 - self.momentum) * unbiased_var)
    multiplier = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    y = (x32 - mean) * multiplier + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def _conv(features: int, kernel_size: int, stride: int = 1, *, name: str,
          dtype: Any) -> conv_lib.Conv:
  """A bias-free conv with PyTorch's symmetric padding ``kernel_size // 2``.

  Its formulation (XLA's convolution, or im2col and one matmul) is chosen per
  layer shape and backend (:mod:`dtnh_jax.models.conv`); the parameter is
  ``flax.linen.Conv``'s ``kernel`` (HWIO) whichever it is.
  """
  pad = kernel_size // 2
  return conv_lib.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
      name=name,
  )


def _residual(block_input: jax.Array, branch: jax.Array, stride: int,
              conv: Callable[..., nn.Module],
              norm: Callable[..., nn.Module]) -> jax.Array:
  """``relu(branch + shortcut)``; the shortcut is torchvision's ``downsample``.

  As in torchvision, a 1x1 strided conv + BatchNorm projects the input when
  the block changes resolution or channel count, else the input is added as is.
  """
  shortcut = block_input
  if stride != 1 or block_input.shape[-1] != branch.shape[-1]:
    shortcut = conv(branch.shape[-1], 1, stride, name="downsample_0")(
        block_input)
    shortcut = norm(name="downsample_1")(shortcut)
  return nn.relu(branch + shortcut)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (ResNet-18/34): two 3x3 convs.

  Attributes:
    planes: channels of the convs; the block outputs ``planes * expansion``.
    stride: stride of the first conv (and of the shortcut projection).
    conv: builds a bias-free, PyTorch-padded conv ``(features, kernel, stride,
      name=...)``.
    norm: builds a :class:`BatchNorm` ``(name=...)``.
  """

  planes: int
  stride: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.planes, 3, self.stride, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.planes, 3, 1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    return _residual(x, y, self.stride, self.conv, self.norm)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (ResNet-50), v1.5: the stride is on the 3x3 conv.

  1x1 conv to ``planes``, 3x3 conv (strided), 1x1 conv to ``4 * planes``.
  Attributes as :class:`BasicBlock`.
  """

  planes: int
  stride: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.planes, 1, 1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.planes, 3, self.stride, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.planes * self.expansion, 1, 1, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    return _residual(x, y, self.stride, self.conv, self.norm)


class ResNet(nn.Module):
  """A torchvision-layout ResNet: stem, four stages of blocks, pool, ``fc``.

  Call as ``model.apply(variables, images, train=False)`` with ``images`` of
  shape ``(N, H, W, 3)``, normalized with ``IMAGENET_MEAN``/``IMAGENET_STD``.
  In train mode pass ``mutable=["batch_stats"]`` to get the updated running
  statistics, as for any Flax model with BatchNorm.

  Attributes:
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    stage_sizes: number of blocks in ``layer1`` .. ``layer4``.
    num_classes: outputs of the head ``fc``.
    width: multiplier of all channel counts (stem 64, stages 64/128/256/512
      planes); e.g. 0.25 gives a ResNet-18 with 16/32/64/128 channels.
    small_stem: CIFAR-style stem, a 3x3 stride-1 ``conv1`` and no max-pool,
      for 32x32 or smaller images. Such a model has no torchvision checkpoint.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm
      statistics stay float32, and the logits are returned as float32.
    bn_momentum: decay of the BatchNorm running statistics (Flax's
      convention: PyTorch's ``momentum=m`` is ``1 - m``); ``None``: 0.9, as
      torchvision's.
  """

  block_cls: type[nn.Module]
  stage_sizes: Sequence[int]
  num_classes: int = 1000
  width: float = 1.0
  small_stem: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float | None = None

  def _channels(self, base: int) -> int:
    return max(1, int(round(base * self.width)))

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      train: bool = False,
      *,
      return_features: bool = False,
      feature_masks: Mapping[str, jax.Array] | None = None,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Logits for a batch of NHWC images.

    Args:
      x: images, ``(N, H, W, 3)``, ImageNet-normalized.
      train: normalize with batch statistics and update the running ones
        (needs ``mutable=["batch_stats"]``); else use the running statistics.
      return_features: also return the named intermediate outputs of this same
        forward pass, a dict with the keys of ``FEATURE_NAMES``.
      feature_masks: maps names of ``FEATURE_NAMES`` to masks broadcastable to
        that output (e.g. ``(C,)`` or ``(N, 1, 1, C)``); the output is
        multiplied by the mask before it flows on (DELTA zeroes single
        channels of the source network this way). Missing names: no mask.

    Returns:
      ``logits`` of shape ``(N, num_classes)``, float32; with
      ``return_features``, ``(logits, features)`` where ``features[name]`` is
      the (masked, if a mask is given) output in the compute dtype.
    """
    feature_masks = dict(feature_masks or {})
    unknown = sorted(set(feature_masks) - set(FEATURE_NAMES))
    if unknown:
      raise ValueError(f"feature_masks has unknown names {unknown}; "
                       f"valid names are {list(FEATURE_NAMES)}.")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"stage_sizes must have 4 entries, got "
                       f"{self.stage_sizes}.")

    conv = functools.partial(_conv, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             dtype=self.dtype)
    if self.bn_momentum is not None:
      norm = functools.partial(norm, momentum=self.bn_momentum)
    features = {}

    def named_output(name: str, value: jax.Array) -> jax.Array:
      if name in feature_masks:
        value = value * jnp.asarray(feature_masks[name], value.dtype)
      features[name] = value
      return value

    x = jnp.asarray(x, self.dtype)
    if self.small_stem:
      x = conv(self._channels(64), 3, 1, name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
    else:
      x = conv(self._channels(64), 7, 2, name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      # -inf padding on both sides, as PyTorch's MaxPool2d(3, 2, padding=1);
      # the formulation (XLA's reduce_window or shifted windows) by backend.
      x = pool.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = self._channels(64 * 2**stage)
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = self.block_cls(planes, stride, conv, norm,
                           name=f"layer{stage + 1}_{index}")(x)
      x = named_output(f"layer{stage + 1}", x)

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


#: Architecture name (``dtnh_jax.names.ARCHITECTURES``) -> (block type, blocks per stage), as in torchvision.
ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = dict(zip(names.ARCHITECTURES, (
    (BasicBlock, (1, 1, 1, 1)),  # ResNet-10: torchvision's ResNet(BasicBlock, [1, 1, 1, 1])
    (BasicBlock, (2, 2, 2, 2)),  # ResNet-18
    (BasicBlock, (3, 4, 6, 3)),  # ResNet-34
    (Bottleneck, (3, 4, 6, 3)),  # ResNet-50
), strict=True))


def create_model(arch: str, num_classes: int = 1000, **kwargs) -> ResNet:
  """The ResNet named ``arch`` (a key of ``ARCHITECTURES``).

  Args:
    arch: ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    num_classes: outputs of the head.
    **kwargs: further :class:`ResNet` attributes (``width``, ``small_stem``,
      ``dtype``).

  Returns:
    An unbound :class:`ResNet`.
  """
  if arch not in ARCHITECTURES:
    raise ValueError(f"unknown arch {arch!r}; choose one of "
                     f"{sorted(ARCHITECTURES)}.")
  block_cls, stage_sizes = ARCHITECTURES[arch]
  return ResNet(block_cls=block_cls, stage_sizes=stage_sizes,
                num_classes=num_classes, **kwargs)


def resnet10(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-10: torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])`` (one block per stage; no pre-trained weights
  ship for it); ``kwargs`` as :class:`ResNet`."""
  return create_model("resnet10", num_classes, **kwargs)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-18 as torchvision's ``resnet18``; ``kwargs`` as :class:`ResNet`."""
  return create_model("resnet18", num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-34 as torchvision's ``resnet34``; ``kwargs`` as :class:`ResNet`."""
  return create_model("resnet34", num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-50 (v1.5) as torchvision's ``resnet50``; kwargs as ``ResNet``."""
  return create_model("resnet50", num_classes, **kwargs)


def init_variables(model: nn.Module, rng: jax.Array | int,
                   image_size: int | Sequence[int]) -> dict[str, Any]:
  """Initial variables of ``model``, without running it on an input.

  The same values as ``model.init(rng, jnp.zeros((1, H, W, 3)))`` (and as
  ``jax.jit(model.init)``), but through ``model.lazy_init``: only the
  initializers run, and they share one compiled random-number program per
  distribution. The first call in a process takes about a second on a CPU and
  later calls a fraction of one, for any architecture, width or image size,
  where an eager ``model.init`` also compiles every operation of the forward
  pass for the new shapes. The variables of the last two calls (model, key,
  size) are kept and returned again (in new dicts; the arrays are immutable)
  for a call with the same arguments, without tracing the model again.

  Args:
    model: a :class:`ResNet` (or any Flax module called as
      ``model(images, train=False)`` on NHWC images).
    rng: PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``) or an int
      seed.
    image_size: ``H`` (square images) or ``(H, W)``; sets no parameter shape
      of a ResNet, but the forward pass is traced at this size.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as a plain dict.
  """
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.key(rng)
  height, width = ((image_size, image_size) if isinstance(image_size, int)
                   else tuple(image_size))
  key = _initialization_key(model, rng, height, width)
  if key is None:  # traced (under jit or eval_shape), or a module that is not hashable
    return _lazy_init(model, rng, height, width)
  # new containers around the same (immutable) arrays: a caller may change its dicts
  return jax.tree.map(lambda leaf: leaf, _remembered_init(_Initialization(key, model, rng, height, width)))


def _lazy_init(model, rng, height: int, width: int) -> dict[str, Any]:
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  return dict(model.lazy_init(rng, images, train=False))


def _initialization_key(model, rng, height: int, width: int) -> tuple | None:
  """What determines the initial variables, hashable; None where they cannot be remembered."""
  if isinstance(rng, jax.core.Tracer):
    return None
  try:
    hash(model)
  except TypeError:
    return None
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  data = np.asarray(jax.random.key_data(rng) if typed else rng)
  return (model, str(rng.dtype), data.shape, data.tobytes(), height, width, jax.config.jax_enable_x64,
          str(jax.config.jax_default_device))


@dataclasses.dataclass(frozen=True)
class _Initialization:
  """The arguments of one initialization, equal (and hashed) by their ``key`` alone."""
  key: tuple
  model: Any = dataclasses.field(compare=False)
  rng: Any = dataclasses.field(compare=False)
  height: int = dataclasses.field(compare=False)
  width: int = dataclasses.field(compare=False)


# The last two initializations' variables: the runs of a grid that start from scratch (one seed, one model) trace
# the forward pass for lazy_init once, not once per run.
@functools.lru_cache(maxsize=2)
def _remembered_init(call: _Initialization) -> dict[str, Any]:
  return _lazy_init(call.model, call.rng, call.height, call.width)


def replace_head(variables: Mapping[str, Any], num_classes: int,
                 rng: jax.Array) -> dict[str, Any]:
  """Variables for a new task: a fresh ``fc`` with ``num_classes`` outputs.

  Transfer learning keeps the pre-trained backbone (parameters and BatchNorm
  statistics, untouched and shared with the input) and starts the classifier
  from scratch. The new head is initialized as torch's ``nn.Linear``: kernel
  and bias uniform in ``(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the same as
  ``model.init`` would give.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a :class:`ResNet`.
    num_classes: outputs of the new head.
    rng: PRNG key for the new head.

  Returns:
    New variables (a new dict; the input is not modified). Build the matching
    model with ``num_classes``, e.g. ``resnet18(num_classes)``.
  """
  params = variables["params"]
  fan_in = params["fc"]["kernel"].shape[0]
  kernel_key, bias_key = jax.random.split(rng)
  new_fc = {
      "kernel": linear_kernel_init(kernel_key, (fan_in, num_classes),
                                    jnp.float32),
      "bias": linear_bias_init(fan_in)(bias_key, (num_classes,), jnp.float32),
  }
  return {**variables, "params": {**params, "fc": new_fc}}
