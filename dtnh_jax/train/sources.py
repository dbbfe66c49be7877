"""Where the pre-trained weights come from: ``--source``.

A source is an orbax checkpoint written by ``dtnh-convert`` (a directory), a
torchvision ``.pth``/``.pt``/``.safetensors`` file, or the name of one of the
offline sources that the package pre-trains itself (``related``,
``unrelated``), or ``scratch`` (random initialization: no transfer).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from dtnh_jax import models
from dtnh_jax.train.config import ConfigError, TrainConfig

__all__ = [
    "load_source",
    "SCRATCH",
]

#: Sources that need no file.
SCRATCH = "scratch"

_DOWNLOAD_HELP = {
    "imagenet": "torchvision's ImageNet ResNet-18 weights, resnet18-f37072fd.pth "
                "(https://download.pytorch.org/models/resnet18-f37072fd.pth)",
    "places365": "the Places365 ResNet-18, resnet18_places365.pth.tar "
                 "(http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar)",
}


def _model_options(config: TrainConfig) -> dict[str, Any]:
  return {"arch": config.arch, "width": config.width, "small_stem": config.small_stem}


def _check_backbone(source: str, variables: Any, config: TrainConfig) -> None:
  """Refuses variables whose tensors (all but the head, which is replaced) do not fit the run's model."""
  model = models.create_model(config.arch, num_classes=1, width=config.width, small_stem=config.small_stem)
  expected = jax.eval_shape(lambda: models.init_variables(model, 0, config.crop))
  params_first = lambda item: item[0][0] != "params"  # the message lists conv1/kernel first
  backbone = lambda tree: {"/".join(path): tuple(np.shape(leaf))
                           for path, leaf in sorted(flatten_dict(dict(tree)).items(), key=params_first)
                           if path[1:2] != ("fc",)}
  have, want = backbone(variables), backbone(expected)
  problems = [f"{name} is missing" for name in want if name not in have]
  problems += [f"{name} is not in the model" for name in have if name not in want]
  problems += [f"{name} is {have[name]}, expected {shape}" for name, shape in want.items()
               if name in have and have[name] != shape]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
    raise ConfigError(
        f"--source {source}: the checkpoint does not fit the run's {config.arch} (width {config.width}, "
        f"small_stem {config.small_stem}): {shown}. Pass the --arch/--width/--small-stem it was trained with.")


def _check_finite(source: str, variables: Any) -> dict[str, Any]:
  """Refuses NaN/Inf weights now, not as a NaN loss or chance accuracy after the run."""
  try:
    models.check_finite(variables, f"--source {source}")
  except ValueError as error:
    raise ConfigError(f"{error} Use another checkpoint of the source, or convert/export it again.") from None
  return variables


def load_source(config: TrainConfig, offline_sources=None) -> dict[str, Any]:
  """The source network's variables ``{"params", "batch_stats"}`` (head of the source task).

  Raises:
    ConfigError: the source is missing, unreadable, damaged (NaN/Inf weights,
      checksums that do not match), or of another architecture than
      ``config`` (the message says what to do).
  """
  source = config.source
  if offline_sources is not None and source in offline_sources:
    return _check_finite(source, offline_sources[source](config))
  if source == SCRATCH:
    model = models.create_model(config.arch, num_classes=1, width=config.width, small_stem=config.small_stem)
    return dict(models.init_variables(model, jax.random.PRNGKey(config.seed), config.crop))
  if source in _DOWNLOAD_HELP and not os.path.exists(source):
    raise ConfigError(
        f"--source {source}: the weights cannot be downloaded here. Download {_DOWNLOAD_HELP[source]}, "
        f"convert it with `dtnh-convert FILE DIR --arch {config.arch}` (or pass the file itself) and "
        "use --source with that path.")
  if os.path.isdir(source):
    try:
      variables, metadata = models.load_variables(source)
    except Exception as error:
      raise ConfigError(f"--source {source}: not a readable orbax checkpoint ({type(error).__name__}: {error}).")
    wanted = _model_options(config)
    differs = {k: (metadata.get(k), v) for k, v in wanted.items() if k in metadata and metadata.get(k) != v}
    if differs:
      raise ConfigError(
          f"--source {source}: the checkpoint's architecture does not match the run: "
          + ", ".join(f"{k} is {have!r} in the checkpoint but {want!r} in the run" for k, (have, want) in differs.items())
          + ". Pass matching --arch/--width/--small-stem.")
    _check_backbone(source, variables, config)  # also for checkpoints without that metadata
    return _check_finite(source, variables)
  if os.path.isfile(source):
    try:
      # strict: every tensor of the run's backbone, with its shape, and nothing else
      variables = models.load_torchvision_checkpoint(source, arch=config.arch, width=config.width,
                                                     small_stem=config.small_stem)
    except (ValueError, OSError, ImportError) as error:
      raise ConfigError(f"--source {source}: {error}") from None
    return _check_finite(source, variables)
  raise ConfigError(
      f"--source {source!r} is neither a file, an orbax checkpoint directory, nor one of "
      f"{sorted(set(offline_sources or ()) | {SCRATCH})}.")
