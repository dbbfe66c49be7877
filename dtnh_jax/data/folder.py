"""Your own dataset: a folder of images, one subfolder per class.

Layout (the torchvision ``ImageFolder`` one, split at the top)::

  PATH/train/CLASS/IMAGE      one folder per class (images may sit in sub-folders of it)
  PATH/val/CLASS/IMAGE        optional (or PATH/validation/CLASS/IMAGE, not both)
  PATH/test/CLASS/IMAGE       optional

Images are files ending in ``.jpg .jpeg .png .bmp .gif .webp`` (any case);
other files, and files or folders whose name starts with ``.``, are ignored.
The classes are the sorted names of the subfolders of ``train/``, labelled
``0 .. C-1`` in that order; ``val/`` and ``test/``, when present, must have
exactly the same class folders.

**Each image file once, in one split and one class.** Symbolic links (to
files or folders, inside the dataset or outside it: a dataset assembled
from links into a shared store is read as it is) are followed, and every
image is identified by its real path (``os.path.realpath``):

- a link to a folder that holds it (a loop: ``train/ant/up -> ..`` would
  read every image of the split again and again, and other classes' images
  as ``ant``) is an error naming the link;
- a file in two splits (``test/`` linked to ``train/``, or one image linked
  from both) is an error naming it and both splits: a model would be tested
  on images it was trained on;
- a file in two classes of a split is an error naming it and both classes:
  it would be trained with two labels;
- a file reached under two names in its own class folder is counted once,
  with a warning naming the names left out.

These are refused rather than skipped because each means the folder is not
the dataset its author thinks it is, and a run on a guess reports an
accuracy that looks real. Identical copies (or hard links) of a file are
separate files: only links are seen through.

**Carved splits.** The paper's protocol needs a test split, and choosing λ
needs a validation split that is not the test split (``DESIGN.md``). When
``test/`` is missing, ``test_fraction`` of every class of ``train/`` is
held out as the test split first; then, when ``val/`` is missing,
``val_fraction`` of every class of what is left (the training pool) is held
out as the validation split (``val_fraction=0``: none, ``"val"`` is empty);
``"train"`` is what remains. Each class of ``n`` images gives
:func:`dtnh_jax.data.splits.held_out_count` ``(n, fraction)``, i.e.
``max(1, round(fraction · n))``, and keeps at least one for training. The
split is computed, never stored: nothing is written anywhere, and the
user's folder is only read. The images of a class are ordered by
``sha256("SEED/CLASS/FILE")`` and the first ones are taken: the test carve
uses the fixed seed :data:`TEST_SPLIT_SEED` (the same test split for every
run and seed), the validation carve ``val_seed`` (a study may redraw it per
seed; it never moves a test image). Sorting by a hash of each file's own
name, rather than permuting the list, keeps the split of the other files
when a file is added or removed. :func:`split_record` describes the
validation split of a run, carved or the folder's own.

**Order, sharding, resume.** A split is a random-access source (``len`` and
indexing) in sorted order (class, then path), read by
:func:`~dtnh_jax.data.make_train_loader` and
:func:`~dtnh_jax.data.make_eval_batches` like a TFDS dataset: the same
shuffle, shards (``shard_index::shard_count``) and exactly resumable loader
state. The source's ``name`` carries a digest of its files and labels, so
the loader refuses to resume a run on a folder whose split has changed.

**Memory.** Only the file names are held; each image is decoded when its
record is read (``source[i]``), converted to 8-bit RGB and, with ``image_size``,
resized to ``image_size × image_size`` with the pipeline's own
:func:`~dtnh_jax.data.pipeline.resize`. JPEGs are then decoded at the
smallest DCT scale that still covers ``image_size`` on both sides (Pillow's
``draft``): a photo many times larger than the network's input decodes at up
to 1/8 of its size per side, with a slightly different anti-aliasing than a full
decode followed by the resize.

**Pixel formats.** 8-bit gray, gray with alpha, 1-bit, palette (with or
without transparency), RGB, RGBA and CMYK images become 8-bit RGB (alpha is
dropped and the colour under it kept, as torchvision's loader does); 16-bit
grayscale PNGs are scaled by 255/65535 and rounded (``257·k`` gives ``k``),
16-bit RGB(A) PNGs are read by Pillow at 8 bits (within 1 of that scale).
Pixels without a known 8-bit scale (32-bit float or integer, other colour
modes: a TIFF named ``.png``) are never guessed at: such a file is
unreadable (below), with its mode in the message.

**Unreadable images are skipped, with a warning.** When the splits are made,
every image is opened and checked with Pillow (PNG: structure and checksums;
other formats: decoded, JPEGs at 1/8 scale, which finds truncated files).
Files that fail are left out of every split (before carving) and one warning
gives their count and the first few names. A class left without a readable
image is an error. A file that becomes unreadable after the check (or with
``check_images=False``) stops the input pipeline with
:class:`UnreadableImageError` naming it: a random-access source cannot drop
a record without shifting every index after it, which would break exact
resume.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dtnh_jax.data import pipeline
from dtnh_jax.data import splits as splits_lib

__all__ = [
    "FolderLayoutError",
    "FolderSource",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "UnreadableImageError",
    "VAL_FRACTION",
    "folder_source",
    "folder_splits",
    "split_folder",
    "split_record",
]

#: File endings read as images (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
#: The splits of a folder dataset.
SPLITS = ("train", "val", "test")
#: The folder names each split may have (the first found is used; two present is an error).
_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
#: Fraction of each class of ``train/`` held out for testing when there is no ``test/``.
TEST_FRACTION = 0.2
#: Fraction of each class of ``train/`` held out for validation when there is no ``val/``.
VAL_FRACTION = 0.1
#: Seed of the test carve: fixed, so that no seed or setting can move a test image into training.
TEST_SPLIT_SEED = 20190101
_LAYOUT = ("PATH/train/CLASS/IMAGE (one folder per class), optionally PATH/val/CLASS/... (or validation/) and "
           "PATH/test/CLASS/...")
_SHOWN = 5  # file names shown in a message


class FolderLayoutError(ValueError):
  """The folder does not have the expected layout; the message says what is wrong."""


class UnreadableImageError(OSError):
  """An image of a folder dataset cannot be decoded when its record is read."""


class FolderSource:
  """One split of an image-folder dataset: ``{"image": uint8 HWC RGB, "label": int32}`` records.

  Made by :func:`folder_splits` / :func:`folder_source`; holds file names, not
  pixels (see the module docstring).

  Attributes:
    root: the dataset folder.
    split: ``"train"``, ``"val"`` or ``"test"``.
    origin: the folder the split's images are in: its own (``"val"``,
      ``"validation"``, ``"test"``, ``"train"``), or ``"train"`` for a split
      carved from ``train/``.
    classes: class names; label ``k`` is ``classes[k]``.
    num_classes: ``len(classes)``.
    files: paths relative to ``root`` (``/``-separated), in record order.
    labels: int32 labels of ``files``.
    image_size: side images are resized to, or ``None`` (decoded size).
    name: ``"folder:BASENAME/SPLIT@DIGEST"``, the digest of the files,
      labels and ``image_size`` (recorded in loader states).
  """

  def __init__(self, root: str, split: str, classes: Sequence[str], files: Sequence[str],
               labels: Sequence[int], *, image_size: int | None = None, origin: str | None = None):
    if image_size is not None and image_size < 1:
      raise ValueError(f"image_size must be positive, got {image_size}")
    self.root = os.fspath(root)
    self.split = split
    self.origin = split if origin is None else origin
    self.classes = tuple(classes)
    self.num_classes = len(self.classes)
    self.files = tuple(files)
    self.labels = np.asarray(labels, np.int32)
    self.labels.flags.writeable = False
    self.image_size = image_size
    content = json.dumps([self.classes, list(zip(self.files, self.labels.tolist())), image_size])
    digest = hashlib.sha256(content.encode()).hexdigest()[:12]
    self.name = f"folder:{os.path.basename(os.path.normpath(self.root))}/{split}@{digest}"

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = os.path.join(self.root, *self.files[index].split("/"))
    try:
      image = _decode(path, self.image_size)
    except Exception as error:  # pylint: disable=broad-except  # Pillow raises many kinds for damaged files
      raise UnreadableImageError(
          f"cannot read image {path} ({type(error).__name__}: {error}); it was readable when the splits were "
          "made, or not checked: remove or replace it and start again") from error
    return {"image": image, "label": self.labels[index]}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return (f"FolderSource(root={self.root!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, image_size={self.image_size})")


#: Modes Pillow converts to RGB as they are (alpha, where there is one, is dropped: the colour under it is kept).
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
#: 16-bit grayscale modes (a 16-bit gray PNG); 16-bit RGB(A) PNGs Pillow itself opens as 8-bit RGB(A).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class _UnknownScaleError(ValueError):
  """An image whose pixels have no known 8-bit scale (32-bit float or integer pixels, unusual colour modes)."""


def _unsupported(image: Any) -> str | None:
  """Why ``image``'s pixels cannot be brought to 8-bit RGB, or ``None``."""
  mode = image.mode
  if mode in _EIGHT_BIT_MODES or mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):
    return None
  return (f"mode {mode}: pixels without a known 8-bit scale; save it as 8- or 16-bit RGB or grayscale (PNG) or as "
          "a JPEG")


def _to_rgb(image: Any) -> np.ndarray:
  """``image`` (open Pillow image) as uint8 RGB ``(H, W, 3)``, 16-bit gray scaled by 255/65535, rounded."""
  why = _unsupported(image)
  if why:
    raise _UnknownScaleError(why)
  if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":  # "I": how older Pillows open a 16-bit gray PNG
    gray = np.asarray(image).astype(np.int64)
    if gray.min() < 0 or gray.max() > 65535:
      raise _UnknownScaleError(f"mode {image.mode}: values {gray.min()}..{gray.max()} outside 16 bits")
    gray = ((gray * 255 + 32767) // 65535).astype(np.uint8)  # round(v · 255 / 65535): 257·k -> k exactly
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode in ("P", "PA"):
    image = image.convert("RGBA")  # a palette's transparency: RGB directly warns (and gives the same colours)
  return np.asarray(image.convert("RGB"))


def _decode(path: str, image_size: int | None) -> np.ndarray:
  """The image at ``path`` as uint8 RGB ``(H, W, 3)``, resized to ``image_size`` if given."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    if image_size is not None:
      image.draft("RGB", (image_size, image_size))  # JPEG only: decode at a reduced scale >= the size
    rgb = _to_rgb(image)
  return rgb if image_size is None else pipeline.resize(rgb, image_size)


def _check(path: str) -> str | None:
  """``None`` if Pillow reads ``path`` and its pixels convert to 8-bit RGB, else why not."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      why = _unsupported(image)
      if why:
        return why
      if image.format == "PNG":
        image.verify()  # every chunk and its CRC, without inflating the pixels
      else:
        image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale; still reaches a truncated end
        image.load()
  except Exception as error:  # pylint: disable=broad-except  # Pillow raises many kinds for damaged files
    return f"{type(error).__name__}: {error}"
  return None


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(split_dir: str) -> list[str]:
  with os.scandir(split_dir) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images_of_class(root: str, folder: str, name: str) -> list[tuple[str, str]]:
  """``(SPLIT/CLASS/... path, real path)`` of the images under ``root/folder/name``, sorted by path.

  Symbolic links are followed, wherever they lead; a link to a folder that
  is already being read (one that holds the link) is an error naming it.

  Raises:
    FolderLayoutError: a symbolic link loop, or a folder that cannot be listed.
  """
  top = os.path.join(root, folder, name)
  found = []
  # (folder to list, its path relative to root, the folders it is in: (real path, relative path, is a link)
  # from the class folder down to itself)
  pending = [(top, f"{folder}/{name}", ((os.path.realpath(top), f"{folder}/{name}", os.path.islink(top)),))]
  while pending:
    directory, relative, chain = pending.pop()
    try:
      with os.scandir(directory) as scanned:
        entries = sorted(scanned, key=lambda e: e.name)
    except OSError as error:
      raise FolderLayoutError(f"cannot list {relative}/ in {root} ({type(error).__name__}: {error.strerror}); make "
                              "it readable or remove it.") from None
    for entry in reversed(entries):  # popped in name order
      if entry.name.startswith("."):
        continue
      path = f"{relative}/{entry.name}"
      if entry.is_dir():  # through a link too
        real = os.path.realpath(entry.path)
        below = chain + ((real, path, entry.is_symlink()),)
        repeated = [index for index, (seen, _, _) in enumerate(chain) if seen == real]
        if repeated:
          link = next((rel for _, rel, is_link in below[repeated[0] + 1:] if is_link), path)
          target = real_target = os.path.realpath(os.path.join(root, *link.split("/")))
          with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(root, *link.split("/")))  # as the user wrote it
          class_folder = chain[0][0]
          beside = "" if (real_target + os.sep).startswith(class_folder + os.sep) else (
              f", and the images beside the class folder as class {name!r}")
          raise FolderLayoutError(
              f"symbolic link loop in {root}: {path} is {chain[repeated[0]][1]} again, through the link {link} -> "
              f"{target}; it would read the same images again and again{beside}: remove the link.")
        pending.append((entry.path, path, below))
      elif _is_image(entry.name):
        real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(chain[-1][0], entry.name)
        found.append((path, real))
  return sorted(found)


def _count_each_file_once(root: str, folders: dict[str, str],
                          found: dict[str, dict[str, list[tuple[str, str]]]]) -> dict[str, dict[str, list[str]]]:
  """``{split: {class: paths}}`` of ``found``, each real file once; in two splits or classes: an error.

  Args:
    root: the dataset folder (for messages).
    folders: the folder of each split (``"val"`` or ``"validation"``...).
    found: ``{split: {class: [(path, real path)]}}`` from :func:`_images_of_class`.

  Raises:
    FolderLayoutError: a file is in two splits (a test or validation image
      would be trained on) or in two classes (it would carry two labels).
  """
  first_seen = {}  # real path -> (split, class, path)
  conflicts, repeats = [], []
  kept = {}
  for split, by_class in found.items():
    kept[split] = {}
    for name, pairs in by_class.items():
      kept[split][name] = []
      for path, real in pairs:
        seen = first_seen.setdefault(real, (split, name, path))
        if seen[2] == path:
          kept[split][name].append(path)
        elif seen[:2] == (split, name):
          repeats.append(f"{path} (same file as {seen[2]})")
        else:
          conflicts.append((real, seen, (split, name, path)))
  if conflicts:
    real, (split_a, class_a, path_a), (split_b, class_b, path_b) = conflicts[0]
    where = (f"two splits, {folders[split_a]}/ and {folders[split_b]}/ (as {path_a} and {path_b}): a model "
             "would be evaluated on an image it was trained on" if split_a != split_b else
             f"two classes of {folders[split_a]}/, {class_a!r} and {class_b!r} (as {path_a} and {path_b}): it "
             "would be trained with two labels")
    more = f" (and {len(conflicts) - 1} more path(s) like it)" if len(conflicts) > 1 else ""
    real_root = os.path.realpath(root)
    shown = os.path.relpath(real, real_root) if real.startswith(real_root + os.sep) else real
    raise FolderLayoutError(f"the image file {shown} of {root} is in {where}{more}; give each image file one split "
                            "and one class (remove the link or the copy).")
  if repeats:
    more = f"; and {len(repeats) - _SHOWN} more" if len(repeats) > _SHOWN else ""
    warnings.warn(f"counted {len(repeats)} image file(s) of {root} once each, which their class folder holds under "
                  f"more than one name (symbolic links): left out {'; '.join(repeats[:_SHOWN])}{more}. Remove the "
                  "extra links to silence this.", stacklevel=4)
  return kept


def _hash_order(paths: list[str], seed: int, class_name: str) -> list[str]:
  return sorted(paths, key=lambda p: hashlib.sha256(f"{seed}/{class_name}/{p}".encode()).hexdigest())


def _held_out(count: int, fraction: float) -> int:
  """How many of a class of ``count`` images a carve takes before the cut: :func:`splits.held_out_count`."""
  return splits_lib.held_out_count(count, fraction)


def split_folder(root: str | os.PathLike, split: str) -> str | None:
  """The name of ``split``'s own folder in ``root`` (``"val"`` or ``"validation"`` for ``"val"``), or ``None``.

  Raises:
    FolderLayoutError: both names of the split are present.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  root = os.fspath(root)
  present = [name for name in _FOLDER_NAMES[split] if os.path.exists(os.path.join(root, name))]
  if len(present) > 1:
    raise FolderLayoutError(f"both {' and '.join(n + '/' for n in present)} are in {root}: they would be the same "
                            "split; keep one.")
  return present[0] if present else None


def _scan(root: str) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
  """(classes, {split: {class: image paths}}) of the splits present, each image file once; layout errors raised."""
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(root):
    raise FolderLayoutError(f"{root} is not a directory; expected {_LAYOUT}.")
  if not os.path.isdir(train_dir):
    raise FolderLayoutError(f"no train/ folder in {root}; expected {_LAYOUT}.")
  classes = _class_folders(train_dir)
  if not classes:
    with os.scandir(train_dir) as entries:
      loose = sum(e.is_file() and _is_image(e.name) for e in entries)
    found = f" (found {loose} image(s) directly in train/)" if loose else ""
    raise FolderLayoutError(f"{train_dir} has no class folders{found}; expected {_LAYOUT}.")
  scanned, folders = {}, {}
  for split in SPLITS:
    folder = split_folder(root, split)
    if folder is None:
      continue
    split_dir = os.path.join(root, folder)
    if not os.path.isdir(split_dir):
      raise FolderLayoutError(f"{split_dir} is not a directory; expected {_LAYOUT}.")
    if split != "train":
      present = _class_folders(split_dir)
      missing = sorted(set(classes) - set(present))
      extra = sorted(set(present) - set(classes))
      if missing or extra:
        differences = " and ".join([f"lacks {missing}"] * bool(missing) + [f"has extra {extra}"] * bool(extra))
        raise FolderLayoutError(f"the class folders of {folder}/ must be those of train/: {folder}/ {differences}; "
                                "add or remove class folders so that both have the same.")
    scanned[split] = {name: _images_of_class(root, folder, name) for name in classes}
    folders[split] = folder
    empty = [f"{folder}/{name}" for name, paths in scanned[split].items() if not paths]
    if empty:
      raise FolderLayoutError(f"empty class folder(s) {empty} in {root}: each needs at least one image "
                              f"({' '.join(IMAGE_EXTENSIONS)}).")
  return classes, _count_each_file_once(root, folders, scanned)


def _drop_unreadable(root: str, splits: dict[str, dict[str, list[str]]]) -> None:
  """Removes images Pillow cannot read from ``splits`` (in place), with one warning."""
  paths = [p for by_class in splits.values() for class_paths in by_class.values() for p in class_paths]
  # Pillow decodes outside the GIL: threads overlap the reads and decodes of many files
  workers = min(16, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as executor:
    reasons = list(executor.map(lambda p: _check(os.path.join(root, *p.split("/"))), paths))
  unreadable = {p: reason for p, reason in zip(paths, reasons) if reason is not None}
  if not unreadable:
    return
  for by_class in splits.values():
    for name, class_paths in by_class.items():
      by_class[name] = [p for p in class_paths if p not in unreadable]
  shown = "; ".join(f"{p} ({reason})" for p, reason in list(unreadable.items())[:_SHOWN])
  more = f"; and {len(unreadable) - _SHOWN} more" if len(unreadable) > _SHOWN else ""
  warnings.warn(f"skipped {len(unreadable)} unreadable image(s) of {root} (left out of every split): {shown}{more}. "
                "Remove or replace them to use them.", stacklevel=3)
  emptied = [f"{split_folder(root, split) or split}/{name}" for split, by_class in splits.items()
             for name, p in by_class.items() if not p]
  if emptied:
    raise FolderLayoutError(f"class folder(s) {emptied} in {root} have no readable image; add readable images.")


def folder_splits(root: str | os.PathLike, *, image_size: int | None = None, val_fraction: float = VAL_FRACTION,
                  test_fraction: float = TEST_FRACTION, val_seed: int = 0,
                  check_images: bool = True) -> dict[str, FolderSource]:
  """The train, validation and test splits of an image folder (see the module docstring).

  Args:
    root: the dataset folder, holding ``train/`` and optionally ``val/``
      (or ``validation/``) and ``test/``.
    image_size: resize images to ``image_size × image_size`` when read (the
      input pipeline's ``resize``); ``None``: as decoded.
    val_fraction: fraction of each class of the training pool (``train/``
      after the test carve) held out for validation when there is no
      ``val/``; 0: none (``"val"`` is then empty).
    test_fraction: fraction of each class of ``train/`` held out for testing
      when there is no ``test/``.
    val_seed: seed of the validation carve (the test carve's is fixed).
    check_images: open every image once now and skip unreadable ones with a
      warning; ``False``: an unreadable image stops the pipeline when read.

  Returns:
    ``{"train", "val", "test"}``: :class:`FolderSource` each, disjoint.

  Raises:
    FolderLayoutError: ``root`` or ``root/train`` is not a directory, ``train/``
      has no class folders, ``val/``/``test/`` have other classes than
      ``train/``, both ``val/`` and ``validation/`` exist, a class folder
      holds no (readable) image, or a class has too few images to carve the
      missing splits and keep one for training.
    ValueError: ``test_fraction`` outside ``(0, 1)``, ``val_fraction`` outside ``[0, 1)``.
  """
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  root = os.fspath(root)
  classes, splits = _scan(root)
  origins = {split: split_folder(root, split) for split in splits}
  if check_images:
    _drop_unreadable(root, splits)
  carves = [(split, fraction, seed) for split, fraction, seed in
            (("test", test_fraction, TEST_SPLIT_SEED), ("val", val_fraction, val_seed))
            if split not in splits and fraction > 0]
  carved = {split: {} for split, _, _ in carves}
  pool = splits["train"]
  for name in classes:
    kept = pool[name]
    if len(kept) < 1 + len(carves):
      raise FolderLayoutError(
          f"class {name!r} has {len(kept)} readable image(s) in train/, too few to hold out the missing "
          f"{' and '.join(s + '/' for s, _, _ in carves)} and keep one for training: add images, or the "
          "missing folder(s).")
    for position, (split, fraction, seed) in enumerate(carves):
      # a fraction of what is left (validation: of the pool after the test carve); every split still to carve,
      # and training, keep at least one image
      still_needed = len(carves) - position
      count = min(_held_out(len(kept), fraction), len(kept) - still_needed)
      held_out = set(_hash_order(kept, seed, name)[:count])
      carved[split][name] = sorted(held_out)
      kept = [p for p in kept if p not in held_out]
    pool[name] = kept
  for split in SPLITS:
    if split not in splits and split not in carved:  # val with val_fraction=0: empty
      carved[split] = {name: [] for name in classes}
  for split in carved:
    origins.setdefault(split, "train")
  splits.update(carved)
  sources = {}
  for split in SPLITS:
    files = [p for name in classes for p in splits[split][name]]
    labels = [label for label, name in enumerate(classes) for _ in splits[split][name]]
    sources[split] = FolderSource(root, split, classes, files, labels, image_size=image_size,
                                  origin=origins[split])
  return sources


def _digest(files: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def split_record(splits: dict[str, FolderSource], *, val_fraction: float, val_seed: int) -> dict[str, Any] | None:
  """A JSON-able account of the validation split of :func:`folder_splits` ``(..., val_fraction, val_seed)``.

  Returns:
    ``None`` without a validation split; for the folder's own
    (``val/``/``validation/``): ``{"kind": "own", "split": "val/", "num_train",
    "num_val", "per_class", "val_sha256"}``; for a carved one: ``{"kind":
    "carved", "seed", "order": "sha256(SEED/CLASS/FILE)", "rule": "fraction",
    "fraction_or_count", "test": "own" | "carved" (whether the test split was
    carved first, and so is not in the pool), "num_examples" (the pool),
    "num_train", "num_val", "per_class", "val_sha256"}``. ``per_class`` is
    ``[{"label", "class", "total", "train", "val"}]``; ``val_sha256`` the
    SHA-256 of the sorted validation files (``SPLIT/CLASS/FILE``), one per line.
  """
  train, val = splits["train"], splits["val"]
  if not len(val):
    return None
  in_train = np.bincount(train.labels, minlength=train.num_classes)
  in_val = np.bincount(val.labels, minlength=train.num_classes)
  per_class = [{"label": label, "class": name, "total": int(in_train[label] + in_val[label]),
                "train": int(in_train[label]), "val": int(in_val[label])} for label, name in enumerate(train.classes)]
  counts = {"num_train": len(train), "num_val": len(val), "per_class": per_class, "val_sha256": _digest(val.files)}
  if val.origin != "train":
    return {"kind": "own", "split": f"{val.origin}/", **counts}
  return {"kind": "carved", "seed": int(val_seed), "order": "sha256(SEED/CLASS/FILE)", "rule": "fraction",
          "fraction_or_count": float(val_fraction), "test": "carved" if splits["test"].origin == "train" else "own",
          "num_examples": len(train) + len(val), **counts}


def folder_source(root: str | os.PathLike, split: str = "train", **kwargs: Any) -> FolderSource:
  """One split of :func:`folder_splits` (``split``: ``"train"``, ``"val"`` or ``"test"``; same keywords)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return folder_splits(root, **kwargs)[split]
