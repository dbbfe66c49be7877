"""MIT Indoor-67 (Quattoni & Torralba, CVPR 2009) as a TFDS dataset.

TFDS has no builder for it. This one reads the user's manual download: the
images (``indoorCVPR_09.tar``, or the ``Images/`` folder it extracts to) and
the official split lists ``TrainImages.txt`` / ``TestImages.txt`` (80 train
and 20 test images per class, 5,360 / 1,340 in all), which L2-SP and the
DTNH paper use.

Each list line is ``class/file`` below ``Images/``. Labels are the positions
of the class names in sorted order (``airport_inside`` -> 0). A few files are
GIF, PNG or BMP images (some named ``.jpg``) or grayscale; they are stored as
RGB JPEG like the rest. ``file_name`` keeps the list entry.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from dtnh_jax.data.builders import _manual

__all__ = ["MitIndoor67", "MitIndoor67Config", "instructions"]

_ROOT = "Images"
_ARCHIVE = "indoorCVPR_09.tar"
_LISTS = {"train": "TrainImages.txt", "test": "TestImages.txt"}

_INSTRUCTIONS = """\
MIT Indoor-67 is not downloaded automatically. From the dataset's page
  https://web.mit.edu/torralba/www/indoor.html
download these three files:
  http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar  (2.4 GB)
  https://web.mit.edu/torralba/www/TrainImages.txt
  https://web.mit.edu/torralba/www/TestImages.txt
and put them (the .tar file, or the folder Images/ that it extracts to, and
both .txt files) into this folder:
  {manual_dir}
"""

#: MANUAL_DOWNLOAD_INSTRUCTIONS is shown by TFDS; instructions(manual_dir) names the real folder.
MANUAL_DOWNLOAD_INSTRUCTIONS, instructions = _manual.instructions_for(_INSTRUCTIONS)


@dataclasses.dataclass(eq=False)
class MitIndoor67Config(tfds.core.BuilderConfig):
  """Attributes: num_classes: classes the split lists must name (67)."""
  num_classes: int = 67


class MitIndoor67(tfds.core.GeneratorBasedBuilder):
  """MIT Indoor-67 with the official 80/20 train/test lists."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [MitIndoor67Config(
      name="official", description="TrainImages.txt / TestImages.txt.")]

  def _info(self) -> tfds.core.DatasetInfo:
    return _manual.image_label_info(
        self, __doc__, homepage="https://web.mit.edu/torralba/www/indoor.html",
        citation="""@inproceedings{quattoni2009recognizing,
  title={Recognizing Indoor Scenes},
  author={Quattoni, Ariadna and Torralba, Antonio},
  booktitle={CVPR}, year={2009}}""")

  def _split_generators(self, dl_manager):
    manual_dir = _manual.manual_dir_of(dl_manager, self)
    images = _manual.find_download(manual_dir, (_ARCHIVE, _ROOT),
                                   _INSTRUCTIONS)
    lists = {split: _manual.find_download(manual_dir, (name,), _INSTRUCTIONS)
             for split, name in _LISTS.items()}
    entries = {split: read_list(path) for split, path in lists.items()}
    classes = sorted({entry.split("/")[0] for entry in entries["train"]})
    if len(classes) != self.builder_config.num_classes:
      raise ValueError(f"{lists['train']} names {len(classes)} classes, "
                       f"expected {self.builder_config.num_classes}")
    labels = {name: label for label, name in enumerate(classes)}
    for entry in entries["test"]:
      if entry.split("/")[0] not in labels:
        raise ValueError(f"{lists['test']}: class of {entry!r} is not in "
                         f"{os.path.basename(lists['train'])}")
    return {split: self._generate_examples(images, names, labels)
            for split, names in entries.items()}

  def _generate_examples(self, images, names, labels):
    with _manual.ImageArchive(images, _ROOT) as archive:
      missing = [name for name in names if name not in archive.names()]
      if missing:
        raise ValueError(f"{len(missing)} listed images are not in {images}, "
                         f"e.g. {missing[:3]}")
      for name, jpeg in archive.read_rgb_jpegs(sorted(names)):
        yield name, {"image": jpeg, "label": labels[name.split("/")[0]],
                     "file_name": name}


def read_list(path: str) -> list[str]:
  """The ``class/file`` entries of an official split list, in file order."""
  with open(path, encoding="utf-8") as f:
    entries = [line.strip().replace("\\", "/") for line in f]
  entries = [entry for entry in entries if entry]
  if len(set(entries)) != len(entries):
    raise ValueError(f"{path} lists an image twice")
  return entries
