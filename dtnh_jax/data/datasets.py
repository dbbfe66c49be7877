"""The paper's datasets: a registry, random-access sources, preparation.

The DTNH paper (Sec. V.A, Table I) fine-tunes on five targets and pre-trains
on three sources:

==================  ========  =============  =======  ===============
name                role      domain         classes  train / test
==================  ========  =============  =======  ===============
``cifar10``         target    objects        10       50,000 / 10,000
``caltech256/30``   target    objects        257      7,710 / 5,140
``caltech256/60``   target    objects        257      15,420 / 5,140
``mit_indoor67``    target    indoor scenes  67       5,360 / 1,340
``oxford_flowers102`` target  flowers        102      1,020 / 6,149
``stanford_dogs``   source    dogs           120      12,000 / 8,580
==================  ========  =============  =======  ===============

The other two sources, ImageNet and Places365, enter only as pre-trained
weights (:mod:`dtnh_jax.models`). Every name is a TFDS name; ``caltech256``
and ``mit_indoor67`` come from :mod:`dtnh_jax.data.builders` (manual
download), the rest from TFDS itself. Any other TFDS name with ``image`` and
``label`` features works too, without the registry's metadata.

Data are read with ``tfds.data_source``: random access to ``array_record``
files, no TensorFlow at read time. A dataset must therefore be prepared in
the ``array_record`` format first, once, with :func:`prepare` (or
``python -m dtnh_jax.data prepare NAME``); reading an unprepared one raises
:class:`~dtnh_jax.data.errors.DatasetNotPreparedError` saying how.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dtnh_jax.data import errors

__all__ = [
    "ArraySource",
    "DATASETS",
    "DatasetInfo",
    "DatasetSpec",
    "data_source",
    "dataset_info",
    "prepare",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the paper says about one dataset (Table I), and how to get it.

  Attributes:
    name: the TFDS name, with config (``"caltech256/30"``).
    role: ``"target"`` or ``"source"`` in the paper's experiments.
    domain: Table I's domain.
    num_classes, num_train, num_test: sizes of the splits used.
    train_split, test_split: TFDS split names used for training and testing.
    manual: the files must be downloaded by hand (see the builder).
  """
  name: str
  role: str
  domain: str
  num_classes: int
  num_train: int
  num_test: int
  train_split: str = "train"
  test_split: str = "test"
  manual: bool = False


#: The paper's datasets by TFDS name.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("cifar10", "target", "objects", 10, 50_000, 10_000),
    DatasetSpec("caltech256/30", "target", "objects", 257, 30 * 257, 20 * 257,
                manual=True),
    DatasetSpec("caltech256/60", "target", "objects", 257, 60 * 257, 20 * 257,
                manual=True),
    DatasetSpec("mit_indoor67", "target", "indoor scenes", 67, 5_360, 1_340,
                manual=True),
    # Table I: "1K+/6K+", i.e. TFDS's train split, not train + validation.
    DatasetSpec("oxford_flowers102", "target", "flowers", 102, 1_020, 6_149),
    DatasetSpec("stanford_dogs", "source", "dogs", 120, 12_000, 8_580),
]}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes of a dataset.

  Attributes:
    name: TFDS name, or the name of an :class:`ArraySource`.
    num_classes: number of labels.
    num_train, num_test: examples in the training and test splits.
    image_shape: ``(height, width, channels)`` of the stored images, ``None``
      for a side that varies (images are resized by the input pipeline).
  """
  name: str
  num_classes: int
  num_train: int
  num_test: int
  image_shape: tuple[int | None, int | None, int | None]


class ArraySource:
  """In-memory images and labels, read through the same pipeline as TFDS.

  Args:
    images: uint8, ``(N, H, W, C)`` with C in {1, 3} (or ``(N, H, W)``).
    labels: integers in ``[0, num_classes)``, shape ``(N,)``.
    num_classes: number of classes; default ``max(labels) + 1``.
    name: shown in messages and recorded in loader states.
    ids: optional per-example provenance (e.g. indices into the dataset the
      images came from), kept for bookkeeping and tests, never read by the
      pipeline.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *,
               num_classes: int | None = None, name: str = "arrays",
               ids: np.ndarray | None = None):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be (N, H, W, 1 or 3), got {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype,
                                                           np.integer):
      raise ValueError(f"labels must be {len(images)} integers, got "
                       f"{labels.dtype} {labels.shape}")
    if num_classes is None:
      num_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"labels must lie in [0, {num_classes})")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.num_classes = int(num_classes)
    self.name = name
    self.ids = None if ids is None else np.asarray(ids)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return (f"ArraySource(name={self.name!r}, n={len(self)}, "
            f"image_shape={self.images.shape[1:]}, "
            f"num_classes={self.num_classes})")


def _tfds():
  # TFDS and our builders are imported on first use: `import dtnh_jax.data`
  # stays cheap for users of the offline arrays.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dtnh_jax.data import builders  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import  # registers them
  return tfds


def _builder(name: str, data_dir: str | None, **kwargs):
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"unknown dataset {name!r}: neither a TFDS dataset nor one of "
        f"{sorted(DATASETS)}") from None


def _root(builder) -> str:
  return os.path.abspath(os.fspath(builder.data_dir_root))


def _manual_instructions(name: str, manual_dir: str) -> str | None:
  from dtnh_jax.data.builders import caltech256, mit_indoor67  # pylint: disable=g-import-not-at-top
  base = name.split("/")[0].split(":")[0]
  modules = {"caltech256": caltech256, "mit_indoor67": mit_indoor67}
  return modules[base].instructions(manual_dir) if base in modules else None


def _not_prepared_message(name: str, data_dir_root: str) -> str:
  manual_dir = os.path.join(data_dir_root, "downloads", "manual")
  command = f"python -m dtnh_jax.data prepare {name} --data-dir {data_dir_root}"
  lines = [f"Dataset {name!r} is not prepared in {data_dir_root} (in the "
           "array_record format, which random access needs)."]
  manual = _manual_instructions(name, manual_dir)
  if manual is not None:
    lines += [manual.rstrip(), "Then prepare it (no TensorFlow needed):",
              f"  {command}"]
  else:
    lines += [
        "Prepare it (downloads it; TFDS's own builders need TensorFlow to "
        "prepare, e.g. `pip install tensorflow-cpu`, not to read):",
        f"  {command}",
        "or, equivalently:",
        f"  tfds build {name} --file_format=array_record "
        f"--data_dir={data_dir_root}",
    ]
  return "\n".join(lines)


def data_source(name: str, split: str, *, data_dir: str | None = None):
  """The random-access source of a prepared TFDS dataset split.

  Args:
    name: TFDS name, e.g. ``"cifar10"`` or ``"caltech256/30"``.
    split: TFDS split, e.g. ``"train"``, ``"test"``, ``"train[:10%]"``.
    data_dir: TFDS data directory; default TFDS's (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    A sequence of example dicts (``tfds`` ``ArrayRecordDataSource``).

  Raises:
    DatasetNotPreparedError: not prepared, or prepared without random access.
  """
  builder = _builder(name, data_dir)
  try:
    return builder.as_data_source(split=split)
  except (NotImplementedError, ValueError, AssertionError, KeyError,
          FileNotFoundError) as e:
    root = _root(builder)
    if not builder.is_prepared():
      raise errors.DatasetNotPreparedError(
          _not_prepared_message(name, root)) from e
    if isinstance(e, NotImplementedError):  # prepared as tfrecord
      raise errors.DatasetNotPreparedError(
          f"Dataset {name!r} is prepared in {builder.data_dir} in a format "
          "without random access. Delete that folder (or use another "
          "--data-dir) and prepare it again in array_record:\n"
          f"  python -m dtnh_jax.data prepare {name} --data-dir {root}") from e
    raise


def dataset_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Sizes of a dataset: from the prepared files, else from the registry.

  Raises:
    DatasetNotPreparedError: not prepared and not one of :data:`DATASETS`.
  """
  builder = _builder(name, data_dir)
  spec = DATASETS.get(name)
  train_split = spec.train_split if spec else "train"
  test_split = spec.test_split if spec else "test"
  features = builder.info.features
  image_shape = tuple(features["image"].shape)
  if builder.is_prepared():
    splits = builder.info.splits
    return DatasetInfo(
        name=name,
        num_classes=int(features["label"].num_classes),
        num_train=splits[train_split].num_examples,
        num_test=splits[test_split].num_examples if test_split in splits
        else 0,
        image_shape=image_shape)
  if spec is None:
    raise errors.DatasetNotPreparedError(
        _not_prepared_message(name, _root(builder)))
  return DatasetInfo(name=name, num_classes=spec.num_classes,
                     num_train=spec.num_train, num_test=spec.num_test,
                     image_shape=image_shape)


def prepare(name: str, *, data_dir: str | None = None,
            manual_dir: str | None = None) -> str:
  """Prepares a dataset in the array_record format; returns its folder.

  Downloads what TFDS can download; ``caltech256`` and ``mit_indoor67`` read
  the manual download from ``manual_dir`` (default
  ``<data_dir>/downloads/manual``). Does nothing if already prepared.

  Raises:
    ManualDownloadRequiredError: the manual download is missing; the message
      says what to download and where to put it.
    DatasetNotPreparedError: TFDS's builder needs TensorFlow (TFDS encodes
      some datasets with it), or the dataset exists in another format.
  """
  tfds = _tfds()
  builder = _builder(name, data_dir, file_format="array_record")
  if builder.is_prepared():
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
      raise errors.DatasetNotPreparedError(
          f"Dataset {name!r} is prepared in {builder.data_dir} as "
          f"{sorted(formats)}, without random access. Delete that folder or "
          "choose another data_dir, then prepare again.")
    return os.fspath(builder.data_dir)
  needs_tensorflow = errors.DatasetNotPreparedError(
      f"TFDS's builder for {name!r} needs TensorFlow to prepare the data "
      "(reading it later does not). Install it (`pip install tensorflow-cpu`) "
      "and run this again, or prepare the dataset on another machine and "
      f"copy its folder to {os.path.join(_root(builder), name.split('/')[0])}")
  # TFDS's builders of the paper's datasets read their downloads with
  # tf.io.gfile (CIFAR-10 also encodes its images with TensorFlow): say so
  # before downloading, not after.
  if (name in DATASETS and not DATASETS[name].manual
      and importlib.util.find_spec("tensorflow") is None):
    raise needs_tensorflow
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=download_config)
  except ModuleNotFoundError as e:
    if "tensorflow" not in str(e):
      raise
    raise needs_tensorflow from e
  return os.fspath(builder.data_dir)
