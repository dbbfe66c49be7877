"""Where the pre-trained weights come from: ``--source``.

A source is an orbax checkpoint written by ``dtnh-convert`` (a directory), a
torchvision ``.pth``/``.pt``/``.safetensors`` file, or the name of one of the
offline sources that the package pre-trains itself (``related``,
``unrelated``), or ``scratch`` (random initialization: no transfer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from dtnh_jax import models, names
from dtnh_jax.train import presets
from dtnh_jax.train.config import ConfigError, TrainConfig

__all__ = [
    "CACHE_VARIABLE",
    "cache_dir",
    "cache_error",
    "load_source",
    "offline_source_path",
    "pretraining_lock",
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


#: The environment variable that sets :func:`cache_dir`.
CACHE_VARIABLE = "DTNH_JAX_CACHE"


def cache_dir() -> str:
  """Where pre-trained offline sources are kept: ``$DTNH_JAX_CACHE`` or ``~/.cache/dtnh_jax``."""
  return os.environ.get(CACHE_VARIABLE, os.path.join(os.path.expanduser("~"), ".cache", "dtnh_jax"))


def cache_error(problem: str) -> ConfigError:
  """The one-line error of a cache that cannot be used: ``problem``, then the cache folder and the variable
  that moves it."""
  where = (f"${CACHE_VARIABLE}" if CACHE_VARIABLE in os.environ
           else f"the default, as ${CACHE_VARIABLE} is not set")
  return ConfigError(f"{problem}. The cache of offline sources is {cache_dir()} ({where}): set {CACHE_VARIABLE} "
                     "to a folder this user can write, or fix that one.")


@contextlib.contextmanager
def pretraining_lock(path: str, waiting: Callable[[], None] | None = None) -> Iterator[None]:
  """Holds the lock of the offline source cached at ``path`` (an advisory ``flock`` on a hidden file beside it):
  one process at a time checks and pre-trains it. Another holder is waited for, after one call of ``waiting``.

  The kernel releases the lock of a process that dies, so a killed pre-training never blocks the next.

  Raises:
    ConfigError: the cache folder cannot be created or written (names it and ``$DTNH_JAX_CACHE``).
  """
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  folder, name = os.path.split(path)
  lock_path = os.path.join(folder, f".{name}.lock")
  try:
    os.makedirs(folder, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as error:  # a file in the way, no permission, a read-only file system
    raise cache_error(f"cannot create or write the offline source cache {folder} ({error.strerror or error})"
                      ) from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if waiting is not None:
        waiting()
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock; the file stays (removing it would race with a process opening it)


def offline_source_path(name: str, config: TrainConfig) -> str:
  """Where offline source ``name`` pre-trained for ``config``'s model is cached; the key holds the model, the
  image sizes and the pre-training (``dtnh_jax.train.offline.pretrain_sources`` writes it)."""
  # batch size and the whole source pool ("split": none) joined the key when pre-training stopped inheriting the
  # run's --val-fraction carve (2026-12-02): sources cached before may have been trained on 75% of the pool
  key = {"source": name, **_model_options(config), "resize": config.recipe.resize, "crop": config.recipe.crop,
         "batch_size": config.recipe.batch_size, "split": "none", **presets.offline_pretraining(config.pretrain_steps)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(cache_dir(), "offline-sources", f"{name}-{digest}")


def _model_options(config: TrainConfig) -> dict[str, Any]:
  return {"arch": config.model.arch, "width": config.model.width, "small_stem": config.model.small_stem}


def _check_backbone(source: str, variables: Any, config: TrainConfig) -> None:
  """Refuses variables whose tensors (all but the head, which is replaced) do not fit the run's model."""
  model = models.create_model(num_classes=1, **_model_options(config))
  expected = jax.eval_shape(lambda: models.init_variables(model, 0, config.recipe.crop))
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
        f"--source {source}: the checkpoint does not fit the run's {config.model.arch} (width {config.model.width}, "
        f"small_stem {config.model.small_stem}): {shown}. Pass the --arch/--width/--small-stem it was trained with.")


def _check_finite(source: str, variables: Any) -> dict[str, Any]:
  """Refuses NaN/Inf weights now, not as a NaN loss or chance accuracy after the run."""
  try:
    models.check_finite(variables, f"--source {source}")
  except ValueError as error:
    raise ConfigError(f"{error} Use another checkpoint of the source, or convert/export it again.") from None
  return variables


def load_source(config: TrainConfig) -> dict[str, Any]:
  """The source network's variables ``{"params", "batch_stats"}`` (head of the source task).

  Raises:
    ConfigError: the source is missing, unreadable, damaged (NaN/Inf weights,
      checksums that do not match), or of another architecture than
      ``config`` (the message says what to do).
  """
  source = config.source
  if config.method_spec.from_scratch:  # --method scratch: the same network from a random initialization
    source = SCRATCH
  if source in names.OFFLINE_SOURCES:
    path = offline_source_path(source, config)
    if not os.path.isdir(path):
      raise ConfigError(f"--source {source}: the offline source is not pre-trained for this model yet ({path} "
                        "is missing). dtnh-train pre-trains it by itself; from Python, call "
                        "dtnh_jax.train.offline.pretrain_sources(config) first.")
    try:
      variables, _ = models.load_variables(path)
    except Exception as error:  # pylint: disable=broad-except
      raise ConfigError(f"--source {source}: the cached offline source {path} is unreadable ({error}); "
                        "dtnh_jax.train.offline.pretrain_sources (which dtnh-train runs) sets it aside and "
                        "pre-trains it again.") from None
    return _check_finite(source, variables)
  if source == SCRATCH:
    model = models.create_model(num_classes=1, **_model_options(config))
    return dict(models.init_variables(model, jax.random.PRNGKey(config.seed), config.recipe.crop))
  if source in _DOWNLOAD_HELP and not os.path.exists(source):
    raise ConfigError(
        f"--source {source}: the weights cannot be downloaded here. Download {_DOWNLOAD_HELP[source]}, "
        f"convert it with `dtnh-convert FILE DIR --arch {config.model.arch}` (or pass the file itself) and "
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
          + ", ".join(f"{k} is {have!r} in the checkpoint but {want!r} in the run"
                      for k, (have, want) in differs.items())
          + ". Pass matching --arch/--width/--small-stem.")
    _check_backbone(source, variables, config)  # also for checkpoints without that metadata
    return _check_finite(source, variables)
  if os.path.isfile(source):
    try:
      # strict: every tensor of the run's backbone, with its shape, and nothing else
      variables = models.load_torchvision_checkpoint(source, arch=config.model.arch, width=config.model.width,
                                                     small_stem=config.model.small_stem)
    except (ValueError, OSError, ImportError) as error:
      raise ConfigError(f"--source {source}: {error}") from None
    return _check_finite(source, variables)
  raise ConfigError(
      f"--source {source!r} is neither a file, an orbax checkpoint directory, nor one of "
      f"{sorted(set(names.OFFLINE_SOURCES) | {SCRATCH})}.")
