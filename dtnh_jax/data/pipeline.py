"""Input pipeline: the paper's preprocessing on grain, resumable and sharded.

Preprocessing follows the paper (Sec. V.A: "All images are re-sized to
256×256 and normalized to zero mean for each channel, following with data
augmentation operations of random mirror and random crop to 224×224"):

* **train**: resize to ``resize × resize`` (bilinear, antialiased, as
  torchvision does on PIL images; the aspect ratio is not kept, as in the
  paper), a random ``crop × crop`` window, a random horizontal mirror;
* **eval**: the same resize, then the central ``crop × crop`` window (at
  torchvision's ``CenterCrop`` offset);
* both: ``(pixel / 255 - IMAGENET_MEAN) / IMAGENET_STD`` per channel, the
  normalization torchvision's ImageNet weights were trained with. Grayscale
  images become 3 equal channels.

Batches are dicts ``{"image": float32 (B, crop, crop, 3), "label": int32
(B,)}``; evaluation batches add ``"mask"``, bool ``(B,)``.

**Order and resume.** The training stream is a pure function of its index:
example ``k`` of the stream is element ``k mod n`` of epoch ``k // n``'s
permutation (grain's index shuffle, reseeded every epoch), cropped and
mirrored with a random generator derived from ``(seed, k)``. Epochs are
concatenated, so a batch may straddle two epochs; every example appears once
per epoch and no batch is ever partial. The loader's state is therefore just
the number of batches delivered (plus the configuration, checked on
restore): a run killed at step k and restored from the state of step k gets
exactly the batches it would have got, whatever the number of worker
processes or threads.

**Sharding.** With ``shard_count`` processes, process ``shard_index`` reads
examples ``shard_index, shard_index + shard_count, ...`` (disjoint, covering
the split) and shuffles them with the same seed: every process makes its own
global batch share of ``batch_size`` examples. Evaluation pads every shard
to the same number of batches, so that all processes run the same number of
steps; padding has ``mask == False``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dtnh_jax import names
from dtnh_jax.data import datasets

__all__ = [
    "EvalBatches",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TrainLoader",
    "center_crop",
    "make_eval_batches",
    "make_train_loader",
    "normalize",
    "resize",
]

# As arrays for the arithmetic of normalize(); from dtnh_jax.names, so that data workers need not import flax.
#: Per-channel (RGB) mean of ImageNet, for pixels scaled to [0, 1].
IMAGENET_MEAN = np.array(names.IMAGENET_MEAN, dtype=np.float32)
#: Per-channel (RGB) standard deviation of ImageNet, for pixels in [0, 1].
IMAGENET_STD = np.array(names.IMAGENET_STD, dtype=np.float32)
IMAGENET_MEAN.flags.writeable = False
IMAGENET_STD.flags.writeable = False

_STATE_FORMAT = "dtnh_jax.data.TrainLoader/1"


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:  # RGBA: drop alpha
    return image[..., :3]
  return image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 ``(H, W[, C])`` -> uint8 RGB ``(size, size, 3)``, bilinear."""
  image = _rgb(image)
  if image.shape[:2] == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top

  # PIL's bilinear filter widens with the scale when shrinking (antialias),
  # which is what torchvision's Resize does on PIL images.
  resized = Image.fromarray(image).resize((size, size), Image.BILINEAR)
  return np.asarray(resized)


def center_crop(image: np.ndarray, crop: int) -> np.ndarray:
  """The central ``crop × crop`` window, at torchvision's offsets."""
  height, width = image.shape[:2]
  top = int(round((height - crop) / 2.0))
  left = int(round((width - crop) / 2.0))
  return image[top:top + crop, left:left + crop]


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 RGB, any leading shape -> float32 ``(x/255 - mean) / std``."""
  scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
  return images.astype(np.float32) * scale - IMAGENET_MEAN / IMAGENET_STD


class _Resize:
  """Example -> uint8 RGB image resized to ``size × size`` + label (deterministic)."""

  def __init__(self, size: int):
    self.size = size

  def __call__(self, example: Mapping[str, Any]):
    return {"image": resize(example["image"], self.size), "label": np.int32(example["label"])}


class _BatchAugment:
  """Batch of resized uint8 images -> randomly cropped, mirrored, normalized float32.

  Whole batches at once with NumPy indexing: one random generator per batch
  instead of one per image keeps the loader far ahead of a small model.
  """

  def __init__(self, resize_to: int, crop: int, mirror: bool):
    self.resize_to, self.crop, self.mirror = resize_to, crop, mirror

  def __call__(self, batch: Mapping[str, np.ndarray], rng: np.random.Generator):
    images = batch["image"]
    count = len(images)
    top, left = rng.integers(0, self.resize_to - self.crop + 1, size=(2, count))
    rows = top[:, None] + np.arange(self.crop)                       # (N, crop)
    cols = left[:, None] + np.arange(self.crop)                      # (N, crop)
    if self.mirror:
      flip = rng.random(count) < 0.5
      cols = np.where(flip[:, None], cols[:, ::-1], cols)
    images = images[np.arange(count)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return {"image": normalize(images), "label": batch["label"]}


def _stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  return {"image": np.stack([e["image"] for e in examples]),
          "label": np.array([e["label"] for e in examples], np.int32)}


class _EvalTransform:
  """Example -> resized, center-cropped uint8 image + label + mask."""

  def __init__(self, resize_to: int, crop: int):
    self.resize_to, self.crop = resize_to, crop

  def __call__(self, example: Mapping[str, Any]):
    if example.get("padding", False):
      return {"image": np.zeros((self.crop, self.crop, 3), np.uint8),
              "label": np.int32(0), "mask": False}
    image = center_crop(resize(example["image"], self.resize_to), self.crop)
    return {"image": image, "label": np.int32(example["label"]), "mask": True}


def _collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  batch = {"image": normalize(np.stack([e["image"] for e in examples])),
           "label": np.array([e["label"] for e in examples], np.int32)}
  if "mask" in examples[0]:
    batch["mask"] = np.array([e["mask"] for e in examples], bool)
  return batch


class _PaddedShard:
  """Examples ``shard_index::shard_count`` of a source, padded to ``length``.

  Positions past the shard's end hold ``{"padding": True}``.
  """

  def __init__(self, source, shard_index: int, shard_count: int, length: int):
    self.source, self.length = source, length
    self.indices = range(shard_index, len(source), shard_count)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int):
    if index < len(self.indices):
      return self.source[self.indices[index]]
    return {"padding": True}


def _resolve(source, split: str | None, data_dir: str | None, *, train: bool):
  """(random-access source, name, split) for a TFDS name or an ArraySource."""
  if isinstance(source, str):
    spec = datasets.DATASETS.get(source)
    if split is None:
      split = (spec.train_split if spec else "train") if train else (
          spec.test_split if spec else "test")
    return datasets.data_source(source, split, data_dir=data_dir), source, split
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError("source must be a TFDS name, an ArraySource or a random-"
                    f"access sequence of examples, got {type(source)}")
  if split is not None:
    raise ValueError("split selects a split of a TFDS name; this source is "
                     "one split already")
  if hasattr(source, "dataset_info"):  # a tfds data source
    name = f"{source.dataset_info.full_name}:{getattr(source, 'split', '')}"
  else:
    name = getattr(source, "name", type(source).__name__)
  return source, name, split


def _check_sizes(resize_to: int, crop: int, batch_size: int,
                 shard_index: int, shard_count: int) -> None:
  if not 0 < crop <= resize_to:
    raise ValueError(f"need 0 < crop <= resize, got crop={crop}, "
                     f"resize={resize_to}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got "
                     f"{shard_index}, {shard_count}")


def _iterate(dataset: grain.MapDataset, num_workers: int,
             num_threads: int) -> Iterator[Any]:
  # Elements are whole batches: keep the prefetch buffers a few batches deep.
  read_options = grain.ReadOptions(num_threads=max(num_threads, 1),
                                   prefetch_buffer_size=max(num_threads, 1))
  iterable = dataset.to_iter_dataset(read_options)
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    # grain's worker processes read absl flags (worker profiling), which
    # raises in programs that never parse flags (no absl.app): let them
    # read the defaults, as absl.app would.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iterable = iterable.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(iterable)


class TrainLoader:
  """An endless, resumable iterator of training batches.

  Made by :func:`make_train_loader`. ``next(loader)`` returns a batch dict;
  ``get_state()`` returns a JSON-serializable dict, and ``set_state(state)``
  on a loader made with the same arguments continues exactly from there.

  Attributes:
    num_examples: examples in this process's shard of the split.
    batch_size: examples per batch (this process's share).
    num_classes: number of classes, when the source declares it.
  """

  def __init__(self, batches: grain.MapDataset, *, config: dict[str, Any],
               num_examples: int, num_classes: int | None, num_workers: int,
               num_threads: int):
    self._batches = batches
    self._config = config
    self._num_workers = num_workers
    self._num_threads = num_threads
    self._iterator = None
    self._step = 0
    self.num_examples = num_examples
    self.batch_size = config["batch_size"]
    self.num_classes = num_classes

  @property
  def step(self) -> int:
    """Number of batches delivered so far (the next batch's index)."""
    return self._step

  @property
  def steps_per_epoch(self) -> float:
    """Batches per pass over the shard (not an integer in general)."""
    return self.num_examples / self.batch_size

  @property
  def epoch(self) -> float:
    """Passes over the shard delivered so far."""
    return self._step * self.batch_size / self.num_examples

  def __iter__(self) -> TrainLoader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = _iterate(self._batches[self._step:], self._num_workers,
                                self._num_threads)
    batch = next(self._iterator)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """``{"format", "step", "config"}``: JSON-serializable."""
    return {"format": _STATE_FORMAT, "step": self._step,
            "config": dict(self._config)}

  def set_state(self, state: Mapping[str, Any] | str | bytes) -> None:
    """Continues from ``state`` (a dict of :meth:`get_state`, or its JSON).

    Raises:
      ValueError: the state is not a loader state, or was made with other
        arguments (data, split, seed, sizes, sharding); the message lists
        the differences.
    """
    if isinstance(state, (str, bytes)):
      state = json.loads(state)
    if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
      raise ValueError(f"not a TrainLoader state: {state!r}")
    saved = dict(state["config"])
    differences = {key: (saved.get(key), value)
                   for key, value in self._config.items()
                   if saved.get(key) != value}
    if differences:
      raise ValueError("the state was saved by a loader with other arguments "
                       f"(saved, here): {differences}")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops prefetching (and worker processes); iteration can restart."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __enter__(self) -> TrainLoader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def make_train_loader(source, *, batch_size: int, seed: int,
                      resize: int = 256, crop: int = 224,  # pylint: disable=redefined-outer-name
                      mirror: bool = True, data_dir: str | None = None,
                      split: str | None = None, shard_index: int = 0,
                      shard_count: int = 1, num_workers: int = 0,
                      num_threads: int = 1) -> TrainLoader:
  """An endless iterator of augmented training batches, resumable.

  Args:
    source: a TFDS name (``"cifar10"``, ``"caltech256/30"``, see
      :data:`~dtnh_jax.data.datasets.DATASETS`), an
      :class:`~dtnh_jax.data.ArraySource`, or any random-access sequence of
      ``{"image": uint8 HWC, "label": int}`` dicts.
    batch_size: examples per batch in this process.
    seed: seeds the shuffle (reshuffled every epoch) and the augmentation;
      an integer in ``[0, 2**32)``.
    resize: images are first resized to ``resize × resize`` (paper: 256).
    crop: side of the random crop (paper: 224).
    mirror: random horizontal mirror (paper: yes).
    data_dir: TFDS data directory (default TFDS's).
    split: TFDS split; default the dataset's training split.
    shard_index, shard_count: this process's shard (``jax.process_index()``,
      ``jax.process_count()`` for multi-host training).
    num_workers: worker processes (0: read in this process). Does not
      change the batches. Workers are started with ``spawn``: a script
      that uses them needs the ``if __name__ == "__main__":`` guard.
    num_threads: threads per process, each preparing whole batches in the
      background. Does not change the batches. Decoding and augmenting is
      mostly Python holding the GIL: scale with ``num_workers``, not threads
      (measured: the site's Results page).

  Returns:
    A :class:`TrainLoader`.

  Raises:
    DatasetNotPreparedError: ``source`` names a dataset not prepared.
  """
  _check_sizes(resize, crop, batch_size, shard_index, shard_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
  records, name, split = _resolve(source, split, data_dir, train=True)
  dataset = grain.MapDataset.source(records)
  if shard_count > 1:
    dataset = dataset[shard_index::shard_count]
  num_examples = len(dataset)
  if num_examples == 0:
    raise ValueError(f"{name} (shard {shard_index}/{shard_count}) is empty")
  batches = (dataset.seed(seed).shuffle().repeat()
             .map(_Resize(resize))
             .batch(batch_size, drop_remainder=True, batch_fn=_stack)
             .random_map(_BatchAugment(resize, crop, mirror)))
  # Plain Python values: the state must survive JSON.
  config = {"source": str(name), "split": split,
            "num_examples": int(len(records)), "batch_size": int(batch_size),
            "seed": int(seed), "resize": int(resize), "crop": int(crop),
            "mirror": bool(mirror), "shard_index": int(shard_index),
            "shard_count": int(shard_count)}
  return TrainLoader(batches, config=config, num_examples=num_examples,
                     num_classes=getattr(records, "num_classes", None)
                     or _num_classes(records),
                     num_workers=num_workers, num_threads=num_threads)


def _num_classes(records) -> int | None:
  try:
    return int(records.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None


class EvalBatches:
  """One pass over an evaluation split, in fixed-size padded batches.

  Iterating yields ``{"image", "label", "mask"}`` batches in the split's
  order; each example of this shard appears exactly once with
  ``mask == True``, padding fills the last batch(es) with ``mask == False``.
  Count correct predictions with ``(predictions == label) & mask``.
  Iterable any number of times.

  Attributes:
    num_examples: real examples in this shard (``mask.sum()`` over a pass).
    num_classes: number of classes, when the source declares it.
  """

  def __init__(self, batches: grain.MapDataset, *, num_examples: int,
               num_classes: int | None, num_workers: int, num_threads: int):
    self._batches = batches
    self._num_workers = num_workers
    self._num_threads = num_threads
    self.num_examples = num_examples
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _iterate(self._batches, self._num_workers, self._num_threads)


def make_eval_batches(source, *, batch_size: int, resize: int = 256,  # pylint: disable=redefined-outer-name
                      crop: int = 224, data_dir: str | None = None,
                      split: str | None = None, shard_index: int = 0,
                      shard_count: int = 1, num_workers: int = 0,
                      num_threads: int = 1) -> EvalBatches:
  """The evaluation split, once, resized and center-cropped, padded.

  Args:
    source: as for :func:`make_train_loader`.
    batch_size: examples per batch (every batch has this size).
    resize, crop: as for training; the crop is the central window.
    data_dir: TFDS data directory.
    split: TFDS split; default the dataset's test split.
    shard_index, shard_count: this process's shard. Every shard yields the
      same number of batches (``ceil(ceil(n / shard_count) / batch_size)``).
    num_workers, num_threads: as for :func:`make_train_loader`.

  Returns:
    An :class:`EvalBatches`.

  Raises:
    DatasetNotPreparedError: ``source`` names a dataset not prepared.
  """
  _check_sizes(resize, crop, batch_size, shard_index, shard_count)
  records, _, _ = _resolve(source, split, data_dir, train=False)
  per_shard = math.ceil(len(records) / shard_count)
  num_batches = math.ceil(per_shard / batch_size)
  shard = _PaddedShard(records, shard_index, shard_count,
                       num_batches * batch_size)
  batches = (grain.MapDataset.source(shard)
             .map(_EvalTransform(resize, crop))
             .batch(batch_size, drop_remainder=True, batch_fn=_collate))
  return EvalBatches(batches, num_examples=len(shard.indices),
                     num_classes=getattr(records, "num_classes", None)
                     or _num_classes(records),
                     num_workers=num_workers, num_threads=num_threads)
