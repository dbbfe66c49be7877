"""The data of one run, from ``config.dataset``: a TFDS name, an offline dataset or a folder.

``offline-digits`` is the offline default's target (scikit-learn's digits);
``offline-related`` and ``offline-unrelated`` are its sources, which the
offline default pre-trains on (90% for training, 10% held out).
``folder:PATH`` is your own images, ``PATH/train/CLASS/IMAGE`` (see
:mod:`dtnh_jax.data.folder`): trained on the ``train`` split, tested on
``PATH/test/`` or, without it, on the test split carved from ``train/``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np

from dtnh_jax import data as data_lib
from dtnh_jax import names
from dtnh_jax.data import splits
from dtnh_jax.train.config import ConfigError, TrainConfig

__all__ = [
    "FOLDER_PREFIX",
    "load_data",
    "OFFLINE_PREFIX",
    "OFFLINE_TARGET",
    "RunData",
]

OFFLINE_TARGET = names.OFFLINE_TARGET
OFFLINE_PREFIX = "offline-"
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class RunData:
  """Loaders of one run's training and test data, and their sizes."""

  name: str
  num_classes: int
  num_train: int
  batch_size: int
  train_loader: Callable[[int], data_lib.TrainLoader]   # seed -> endless resumable loader
  eval_batches: Callable[[], Iterable[dict]]             # -> one pass over the test split
  val_batches: Callable[[], Iterable[dict]] | None = None  # -> one pass over the validation split, if any
  split: dict | None = None                              # how the validation split was carved (splits.split_record)

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train // self.batch_size)


def _subset(source: data_lib.ArraySource, indices, name: str) -> data_lib.ArraySource:
  return data_lib.ArraySource(source.images[indices], source.labels[indices], num_classes=source.num_classes,
                              name=name)


def _offline_sources(dataset: str, image_size: int,
                     target_per_class: int) -> tuple[data_lib.ArraySource, data_lib.ArraySource]:
  if dataset == OFFLINE_TARGET:
    return data_lib.offline.target(seed=0, image_size=image_size, train_per_class=target_per_class)
  name = dataset[len(OFFLINE_PREFIX):]
  if name not in data_lib.offline.SOURCES:
    known = [OFFLINE_TARGET] + [OFFLINE_PREFIX + s for s in data_lib.offline.SOURCES]
    raise ConfigError(f"unknown offline dataset {dataset!r}; choose one of {known}.")
  full = data_lib.offline.source(name, seed=0, image_size=image_size)
  order = np.random.default_rng(0).permutation(len(full))
  held_out = len(full) // 10
  return (_subset(full, np.sort(order[held_out:]), f"{name}/train"),
          _subset(full, np.sort(order[:held_out]), f"{name}/test"))


def _folder_sources(dataset: str, image_size: int,
                    shard_count: int) -> tuple[data_lib.FolderSource, data_lib.FolderSource]:
  path = os.path.expanduser(dataset[len(FOLDER_PREFIX):])
  if not path:
    raise ConfigError(f"--dataset {dataset!r} names no folder; use --dataset folder:PATH with PATH/train/CLASS/IMAGE.")
  try:
    splits = data_lib.folder_splits(path, image_size=image_size)
  except data_lib.FolderLayoutError as error:
    raise ConfigError(f"--dataset {dataset}: {error}") from None
  train, test = splits["train"], splits["test"]
  if len(train) < shard_count:  # every process needs a non-empty shard
    raise ConfigError(f"--dataset {dataset}: {len(train)} training image(s) cannot be shared by {shard_count} "
                      "processes; add images or run fewer processes.")
  return train, test


def load_data(config: TrainConfig, shard_index: int = 0, shard_count: int = 1) -> RunData:
  """The loaders for ``config``; this process reads shard ``shard_index`` of ``shard_count``.

  Raises:
    ConfigError: the dataset is unknown or not prepared (the message says
      how to download and prepare it), or a ``folder:`` dataset's layout is
      wrong (the message says what and where).
  """
  sizes = {"resize": config.recipe.resize, "crop": config.recipe.crop}
  shard = {"shard_index": shard_index, "shard_count": shard_count}
  if config.recipe.batch_size % shard_count:
    raise ConfigError(f"--batch-size {config.recipe.batch_size} must be divisible by the number of processes "
                      f"({shard_count}).")
  per_process_batch = config.recipe.batch_size // shard_count
  val_source = split = None
  if config.val_fraction and not config.dataset.startswith(OFFLINE_PREFIX):
    raise ConfigError(f"--val-fraction carves a validation split from the offline datasets only so far, not from "
                      f"--dataset {config.dataset}; leave it at 0 there.")
  if config.dataset.startswith(OFFLINE_PREFIX):
    train, test = _offline_sources(config.dataset, config.recipe.resize, config.target_per_class)
    if config.val_fraction:
      split_seed = config.seed if config.split_seed is None else config.split_seed
      train_indices, val_indices = splits.carve_validation(train.labels, config.val_fraction, split_seed)
      split = splits.split_record(train.labels, config.val_fraction, split_seed)
      train, val_source = (_subset(train, train_indices, f"{train.name}/train"),
                           _subset(train, val_indices, f"{train.name}/val"))
    num_classes, num_train, train_source, test_source, tfds_args = train.num_classes, len(train), train, test, {}
  elif config.dataset.startswith(FOLDER_PREFIX):
    train, test = _folder_sources(config.dataset, config.recipe.resize, shard_count)
    num_classes, num_train, train_source, test_source, tfds_args = train.num_classes, len(train), train, test, {}
  else:
    try:
      data_lib.data_source(config.dataset, "train", data_dir=config.run.data_dir)  # fails early if not prepared
      info = data_lib.dataset_info(config.dataset, data_dir=config.run.data_dir)
    except data_lib.DatasetNotPreparedError as error:
      raise ConfigError(str(error)) from None
    except (KeyError, ValueError) as error:
      raise ConfigError(f"--dataset {config.dataset!r}: {error}") from None
    num_classes, num_train = info.num_classes, info.num_train
    train_source = test_source = config.dataset
    tfds_args = {"data_dir": config.run.data_dir}

  def train_loader(seed: int):
    return data_lib.make_train_loader(train_source, batch_size=per_process_batch, seed=seed, **sizes, **shard,
                                      **tfds_args)

  def batches_of(source):
    return lambda: data_lib.make_eval_batches(source, batch_size=config.run.eval_batch_size // shard_count or 1,
                                              **sizes, **shard, **tfds_args)

  return RunData(config.dataset, num_classes, num_train, config.recipe.batch_size, train_loader,
                 batches_of(test_source), None if val_source is None else batches_of(val_source), split)
