"""Caltech-256 as a TFDS dataset, split as L2-SP and the DTNH paper do.

TFDS has ``caltech101`` but no Caltech-256, and the archive sits behind the
Caltech data repository's download page, so this builder reads the user's
manual download: ``256_ObjectCategories.tar`` or the folder it extracts to.

The protocol is L2-SP's (Li et al., ICML 2018), which the DTNH paper follows:
per class, 30 or 60 training images and 20 test images ("30 or 60 samples
randomly drawn from each category for training with 20 remaining samples
for testing", paper Sec. V.A). Details, and where they come from:

* **257 classes.** L2-SP's own code (``holyseven/TransferLearningClassification``,
  ``database/Caltech256_tf.py``) trains a 257-way classifier on
  ``30 * 257`` / ``60 * 257`` images and tests on ``20 * 257``: the clutter
  class ``257.clutter`` is *kept*. Configs ``30`` and ``60`` do the same;
  ``30_no_clutter`` and ``60_no_clutter`` drop it (256 classes). The clutter
  class is the last folder, so dropping it changes no other label.
* **Nested draws.** Per class the images are put in one order; the test
  images are positions 60..79 of that order and the training images the
  first 30 or 60. So ``30`` and ``60`` share the same test set and the
  30 training images are a subset of the 60, as in L2-SP's code (which takes
  files ``_0001``..``_0060`` for training and ``_0061``..``_0080`` for test).
* **Order.** ``order="random"`` (default, the paper's wording): a
  permutation drawn with ``numpy.random.default_rng([seed, class_number])``,
  so the draw of one class does not depend on the others or on the platform.
  ``order="file"`` sorts by file name and reproduces L2-SP's code exactly.
* Only ``NNN.name/*.jpg`` files count: the archive's stray
  ``198.spider/RENAME2`` and the duplicate folder ``056.dog/greg/`` are
  skipped. Grayscale and CMYK JPEGs are converted to RGB.

Labels are the positions of the class folders in sorted order, i.e.
``int(folder[:3]) - 1`` (``001.ak47`` -> 0, ``257.clutter`` -> 256);
``file_name`` keeps the path, e.g. ``"001.ak47/001_0001.jpg"``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from dtnh_jax.data.builders import _manual

__all__ = ["Caltech256", "Caltech256Config", "instructions"]

_ROOT = "256_ObjectCategories"
_ARCHIVE = "256_ObjectCategories.tar"
_CLASS_FOLDER = re.compile(r"^(\d{3})\.[^/]+$")

_INSTRUCTIONS = """\
Caltech-256 is not downloaded automatically. Download
  256_ObjectCategories.tar  (1.2 GB, md5 67b4f42ca05d46448c6bb8ecd2220f6d)
from the Caltech data repository (the "Files" section of the page):
  https://data.caltech.edu/records/nyy15-4j048
and put the .tar file, or the folder 256_ObjectCategories/ that it extracts
to, into this folder:
  {manual_dir}
"""

#: MANUAL_DOWNLOAD_INSTRUCTIONS is shown by TFDS; instructions(manual_dir) names the real folder.
MANUAL_DOWNLOAD_INSTRUCTIONS, instructions = _manual.instructions_for(_INSTRUCTIONS)


@dataclasses.dataclass(eq=False)
class Caltech256Config(tfds.core.BuilderConfig):
  """Which images of each class go to the train and test splits.

  Attributes:
    train_per_class: training images per class (30 or 60 in the paper).
    test_per_class: test images per class (20).
    train_pool_per_class: positions reserved for training in each class's
      order; test images come right after them. Equal for configs that
      should share a test set.
    include_clutter: keep ``257.clutter`` as class 256 (L2-SP does).
    order: ``"random"`` (seeded permutation) or ``"file"`` (file names).
    seed: seed of the random order.
    num_classes: number of classes the download must have (after dropping
      the clutter class); anything else is an error.
  """
  train_per_class: int = 30
  test_per_class: int = 20
  train_pool_per_class: int = 60
  include_clutter: bool = True
  order: str = "random"
  seed: int = 0
  num_classes: int = 257


def _config(train_per_class: int, include_clutter: bool) -> Caltech256Config:
  classes = 257 if include_clutter else 256
  suffix = "" if include_clutter else "_no_clutter"
  return Caltech256Config(
      name=f"{train_per_class}{suffix}",
      description=(f"{train_per_class} train / 20 test images per class, "
                   f"{classes} classes (L2-SP protocol, seed 0)."),
      train_per_class=train_per_class,
      include_clutter=include_clutter,
      num_classes=classes)


class Caltech256(tfds.core.GeneratorBasedBuilder):
  """Caltech-256 with L2-SP's 30/60 train + 20 test images per class."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      _config(30, True), _config(60, True),
      _config(30, False), _config(60, False),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return _manual.image_label_info(
        self, __doc__, homepage="https://data.caltech.edu/records/nyy15-4j048",
        citation="""@techreport{griffin2007caltech,
  title={Caltech-256 Object Category Dataset},
  author={Griffin, Gregory and Holub, Alex and Perona, Pietro},
  institution={California Institute of Technology},
  number={CNS-TR-2007-001}, year={2007}}""")

  def _split_generators(self, dl_manager):
    manual_dir = _manual.manual_dir_of(dl_manager, self)
    path = _manual.find_download(manual_dir, (_ARCHIVE, _ROOT),
                                 _INSTRUCTIONS)
    splits = split_files(_list_files(path), self.builder_config)
    return {
        "train": self._generate_examples(path, splits["train"]),
        "test": self._generate_examples(path, splits["test"]),
    }

  def _generate_examples(self, path, files):
    labels = dict(files)
    with _manual.ImageArchive(path, _ROOT) as archive:
      for relative, jpeg in archive.read_rgb_jpegs(sorted(labels)):
        yield relative, {"image": jpeg, "label": labels[relative],
                         "file_name": relative}


def _list_files(path: str) -> list[str]:
  with _manual.ImageArchive(path, _ROOT) as archive:
    return sorted(archive.names())


def split_files(files, config: Caltech256Config) -> dict[str, list]:
  """Splits ``class/file`` paths by the protocol of ``config``.

  Args:
    files: paths below ``256_ObjectCategories``; other files are ignored.
    config: the protocol.

  Returns:
    ``{"train": [(path, label), ...], "test": [...]}``, sorted by path.

  Raises:
    ValueError: wrong number of classes, or a class with too few images.
  """
  if config.order not in ("random", "file"):
    raise ValueError(f"order must be 'random' or 'file', not {config.order!r}")
  if config.train_per_class > config.train_pool_per_class:
    raise ValueError("train_per_class exceeds train_pool_per_class")
  by_class: dict[str, list[str]] = {}
  for path in files:
    folder, _, name = path.partition("/")
    if ("/" in name or not name.lower().endswith(".jpg")
        or not _CLASS_FOLDER.match(folder)):
      continue
    if folder.endswith(".clutter") and not config.include_clutter:
      continue
    by_class.setdefault(folder, []).append(path)
  if len(by_class) != config.num_classes:
    raise ValueError(
        f"expected {config.num_classes} class folders NNN.name with .jpg "
        f"files in {_ROOT}, found {len(by_class)}; is the download complete?")

  needed = config.train_pool_per_class + config.test_per_class
  splits = {"train": [], "test": []}
  for label, (folder, paths) in enumerate(sorted(by_class.items())):
    number = int(folder[:3])
    if len(paths) < needed:
      raise ValueError(f"class {folder} has {len(paths)} images, the protocol "
                       f"needs {needed}")
    paths = sorted(paths)
    if config.order == "random":
      rng = np.random.default_rng([config.seed, number])
      paths = [paths[i] for i in rng.permutation(len(paths))]
    splits["train"] += [(p, label) for p in paths[:config.train_per_class]]
    test = paths[config.train_pool_per_class:needed]
    splits["test"] += [(p, label) for p in test]
  return {name: sorted(pairs) for name, pairs in splits.items()}
