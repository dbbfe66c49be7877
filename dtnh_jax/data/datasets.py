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

**Validation.** Oxford Flowers-102 has a validation split of its own
(TFDS's ``validation``, 1,020 images, :attr:`DatasetSpec.val_split`); the
others have none, and a run carves one from the training split
(:mod:`dtnh_jax.data.splits`), reading the labels with :func:`split_labels`
and the two sides through :class:`IndexSubset`.

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
    "IndexSubset",
    "data_source",
    "dataset_info",
    "prepare",
    "split_labels",
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
    val_split: the dataset's own validation split (TFDS split name), or
      ``None``: a run carves one from ``train_split`` instead.
    num_val: examples in ``val_split`` (0 without one).
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
  val_split: str | None = None
  num_val: int = 0


#: The paper's datasets by TFDS name.
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("cifar10", "target", "objects", 10, 50_000, 10_000),
    DatasetSpec("caltech256/30", "target", "objects", 257, 30 * 257, 20 * 257,
                manual=True),
    DatasetSpec("caltech256/60", "target", "objects", 257, 60 * 257, 20 * 257,
                manual=True),
    DatasetSpec("mit_indoor67", "target", "indoor scenes", 67, 5_360, 1_340,
                manual=True),
    # Table I: "1K+/6K+", i.e. TFDS's train split, not train + validation; the validation split validates.
    DatasetSpec("oxford_flowers102", "target", "flowers", 102, 1_020, 6_149, val_split="validation",
                num_val=1_020),
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
    val_split: the dataset's own validation split, or ``None`` (see
      :func:`dataset_info`).
    num_val: examples in ``val_split`` (0 without one).
  """
  name: str
  num_classes: int
  num_train: int
  num_test: int
  image_shape: tuple[int | None, int | None, int | None]
  val_split: str | None = None
  num_val: int = 0


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


class IndexSubset:
  """Examples ``indices`` of a random-access source, in that order: itself a random-access source.

  A validation split carved from a TFDS training split is two of these over
  the same ``tfds`` data source (the training side and the validation side):
  nothing is copied, ``subset[i]`` reads ``source[indices[i]]`` and nothing
  else, so the loaders' shuffle and shards (``shard_index::shard_count`` of
  the subset) work on it as on any split.

  Args:
    source: a random-access source (``len``, indexing; ``__getitems__`` is used when it has one).
    indices: distinct integers in ``[0, len(source))``.
    name: shown in messages and recorded in loader states; name the subset
      so that another subset gets another name (e.g. with a digest of the
      indices), and a loader refuses to resume on the wrong one.
    num_classes: default the source's (``num_classes``, or a ``tfds`` source's label feature).
  """

  def __init__(self, source, indices, *, name: str, num_classes: int | None = None):
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
      raise ValueError(f"indices must be one-dimensional integers, got {indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
      raise ValueError(f"indices must lie in [0, {len(source)}), got [{indices.min()}, {indices.max()}]")
    if len(np.unique(indices)) != len(indices):
      raise ValueError("indices must be distinct")
    indices.flags.writeable = False
    self.source = source
    self.indices = indices
    self.name = name
    if num_classes is None:
      num_classes = getattr(source, "num_classes", None) or _label_classes(source)
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    keys = [int(self.indices[i]) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return list(self.source.__getitems__(keys))
    return [self.source[k] for k in keys]

  def __repr__(self) -> str:
    return f"IndexSubset(name={self.name!r}, n={len(self)}, of={len(self.source)})"


def _label_classes(source) -> int | None:
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None


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
  return _as_data_source(_builder(name, data_dir), name, split)


def _as_data_source(builder, name: str, split: str, decoders=None):
  try:
    return builder.as_data_source(split=split, decoders=decoders)
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


#: Labels read by split_labels: (data folder, split) -> (fingerprint of the prepared files, labels).
_LABELS: dict[tuple[str, str], tuple[Any, np.ndarray]] = {}
_LABELS_CHUNK = 1024


def split_labels(name: str, split: str, *, data_dir: str | None = None) -> np.ndarray:
  """The ``label`` of every example of a prepared TFDS split, in record order, without decoding an image.

  Reads the split through ``tfds``' data source with ``SkipDecoding`` for
  ``image`` (each record is parsed, its encoded image left as bytes), in
  chunks (its speed is on the site's Results page). The result is kept for the process, per data folder and
  split, as long as the prepared files are unchanged, so a grid that loads
  the data once per split seed reads the labels once.

  Returns:
    A read-only ``int64`` array of ``len(data_source(name, split))`` labels.

  Raises:
    DatasetNotPreparedError: as :func:`data_source`.
  """
  tfds = _tfds()
  builder = _builder(name, data_dir)
  features = builder.info.features
  decoders = {"image": tfds.decode.SkipDecoding()} if "image" in features else None
  source = _as_data_source(builder, name, split, decoders=decoders)
  key = (os.path.abspath(os.fspath(builder.data_dir)), split)
  fingerprint = None
  if builder.is_prepared():  # a mocked or unprepared builder has nothing to fingerprint: never cached
    info_file = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
    try:
      fingerprint = (os.stat(info_file).st_mtime_ns, len(source))
    except OSError:
      fingerprint = None
  if fingerprint is not None and key in _LABELS and _LABELS[key][0] == fingerprint:
    return _LABELS[key][1]
  count = len(source)
  labels = np.empty(count, np.int64)
  for start in range(0, count, _LABELS_CHUNK):
    stop = min(count, start + _LABELS_CHUNK)
    labels[start:stop] = [int(example["label"]) for example in source.__getitems__(range(start, stop))]
  labels.flags.writeable = False
  if fingerprint is not None:
    _LABELS[key] = (fingerprint, labels)
  return labels


def _own_val_split(name: str, splits: Any = None) -> str | None:
  """The dataset's own validation split: the registry's, else ``"validation"`` when the prepared splits have it."""
  spec = DATASETS.get(name)
  if spec is not None:
    return spec.val_split
  if splits is not None and "validation" in splits:
    return "validation"
  return None


def dataset_info(name: str, *, data_dir: str | None = None) -> DatasetInfo:
  """Sizes of a dataset: from the prepared files, else from the registry.

  ``val_split`` is the dataset's own validation split: the registry's
  (:attr:`DatasetSpec.val_split`, e.g. Flowers-102's ``validation``); for a
  TFDS dataset outside the registry, ``"validation"`` when it is prepared
  with a split of that name (and it is neither its training nor its test
  split); else ``None``.

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
    val_split = _own_val_split(name, [s for s in splits if s not in (train_split, test_split)])
    return DatasetInfo(
        name=name,
        num_classes=int(features["label"].num_classes),
        num_train=splits[train_split].num_examples,
        num_test=splits[test_split].num_examples if test_split in splits
        else 0,
        image_shape=image_shape,
        val_split=val_split,
        num_val=splits[val_split].num_examples if val_split in splits else 0)
  if spec is None:
    raise errors.DatasetNotPreparedError(
        _not_prepared_message(name, _root(builder)))
  return DatasetInfo(name=name, num_classes=spec.num_classes,
                     num_train=spec.num_train, num_test=spec.num_test,
                     image_shape=image_shape, val_split=spec.val_split, num_val=spec.num_val)


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
