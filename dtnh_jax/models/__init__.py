"""Flax ResNets laid out like torchvision, and checkpoint conversion.

:mod:`~dtnh_jax.models.resnet` holds the models, :mod:`~dtnh_jax.models.convert`
the torchvision <-> Flax conversion, :mod:`~dtnh_jax.models.store` the orbax
checkpoints that record how to rebuild a model (written atomically, never over
a user's files, with checksums verified on load).
"""

from dtnh_jax.models.convert import CheckpointMismatchError
from dtnh_jax.models.convert import convert_torchvision
from dtnh_jax.models.convert import load_torchvision_checkpoint
from dtnh_jax.models.convert import load_variables
from dtnh_jax.models.convert import model_from_metadata
from dtnh_jax.models.convert import save_variables
from dtnh_jax.models.convert import to_torchvision
from dtnh_jax.models.resnet import ARCHITECTURES
from dtnh_jax.models.resnet import BasicBlock
from dtnh_jax.models.resnet import BatchNorm
from dtnh_jax.models.resnet import Bottleneck
from dtnh_jax.models.resnet import create_model
from dtnh_jax.models.resnet import FEATURE_NAMES
from dtnh_jax.models.resnet import IMAGENET_MEAN
from dtnh_jax.models.resnet import IMAGENET_STD
from dtnh_jax.models.resnet import init_variables
from dtnh_jax.models.resnet import replace_head
from dtnh_jax.models.resnet import ResNet
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
    "FEATURE_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "init_variables",
    "load_torchvision_checkpoint",
    "load_variables",
    "model_from_metadata",
    "replace_head",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "save_variables",
    "to_torchvision",
    "UnsafeTargetError",
]
