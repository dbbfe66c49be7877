"""What the manual-download builders share: finding and reading the files.

The user's download may be the archive as published (a ``.tar``) or the
folder it extracts to; :class:`ImageArchive` reads either, so nobody has to
extract 2 GB of images first. Images are stored as RGB JPEG: files that are
already RGB JPEGs are kept byte for byte, the others (grayscale or CMYK
JPEGs, GIF/PNG/BMP files named ``.jpg``, which both Caltech-256 and
MIT Indoor-67 contain) are decoded and re-encoded once, with PIL. Nothing
here needs TensorFlow.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from dtnh_jax.data import errors

__all__ = ["ImageArchive", "find_download", "instructions_for", "manual_dir_of", "to_rgb_jpeg"]

#: How the instructions shown by TFDS name the folder (the real one is known only when building).
TFDS_DEFAULT_MANUAL_DIR = "<data_dir>/downloads/manual/   (TFDS's default manual_dir)"


def instructions_for(template: str) -> tuple[str, Callable[[str], str]]:
  """``(text for TFDS, manual_dir -> text)`` from a template with a ``{manual_dir}`` field.

  The first is a builder's ``MANUAL_DOWNLOAD_INSTRUCTIONS``; the second says
  what to download and where to put it for the folder a build really reads.
  """

  def instructions(manual_dir: str) -> str:
    """What to download and where to put it, for ``manual_dir``."""
    return template.format(manual_dir=manual_dir)

  return instructions(TFDS_DEFAULT_MANUAL_DIR), instructions


def image_label_info(builder: Any, description: str, homepage: str, citation: str) -> Any:
  """The ``DatasetInfo`` of a builder of labelled JPEG images (``image``, ``label``, ``file_name``)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=builder.builder_config.num_classes),
          "file_name": tfds.features.Text(),
      }),
      supervised_keys=("image", "label"),
      homepage=homepage,
      citation=citation,
  )


def manual_dir_of(dl_manager: Any, builder: Any) -> str:
  """The folder TFDS reads manual downloads from, whether or not it exists.

  ``dl_manager.manual_dir`` raises a bare ``AssertionError`` when the folder
  is missing or empty; the builders raise
  :class:`~dtnh_jax.data.errors.ManualDownloadRequiredError` instead, which
  needs the path itself.
  """
  path = getattr(dl_manager, "_manual_dir", None)
  if path is None:  # TFDS's default, see DatasetBuilder._make_download_manager
    path = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
  return os.path.abspath(os.fspath(path))


def to_rgb_jpeg(data: bytes, name: str) -> bytes:
  """``data`` as an RGB JPEG; fully decoded once, so broken files fail here."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format == "JPEG" and image.mode == "RGB":
        return data
      buffer = io.BytesIO()
      image.convert("RGB").save(buffer, format="JPEG", quality=95)
      return buffer.getvalue()
  except Exception as e:  # PIL raises many types for a bad file
    raise ValueError(f"cannot decode image {name!r}: {e}") from e


class ImageArchive:
  """Image files below a root folder, inside a ``.tar`` or extracted.

  Files are named by their path below the root folder (e.g.
  ``"001.ak47/001_0001.jpg"`` below ``256_ObjectCategories``), whatever
  prefix the archive puts in front of the root folder.

  Args:
    path: a ``.tar`` file or a folder.
    root: name of the folder inside ``path`` whose content is listed;
      a folder ``path`` may also be that root folder itself.
  """

  def __init__(self, path: str, root: str):
    self.path = os.fspath(path)
    self.root = root
    self._tar = None
    self._members = None

  def __enter__(self) -> ImageArchive:
    return self

  def __exit__(self, *exc_info) -> None:
    if self._tar is not None:
      self._tar.close()
      self._tar = None

  def _relative(self, name: str) -> str | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if self.root in parts:
      return "/".join(parts[parts.index(self.root) + 1:])
    return None

  def names(self) -> dict[str, Any]:
    """All files below the root: ``{relative path: handle for read()}``."""
    if self._members is not None:
      return self._members
    members = {}
    if os.path.isdir(self.path):
      top = self.path
      if os.path.basename(os.path.normpath(top)) != self.root:
        top = os.path.join(top, self.root)
      for dirpath, _, filenames in os.walk(top):
        for filename in filenames:
          full = os.path.join(dirpath, filename)
          members[os.path.relpath(full, top).replace(os.sep, "/")] = full
    else:
      # An uncompressed tar: listing seeks from header to header, and
      # extractfile() later seeks straight to each selected member.
      self._tar = tarfile.open(self.path, "r:*")
      for member in self._tar.getmembers():
        if member.isfile():
          relative = self._relative(member.name)
          if relative:
            members[relative] = member
    self._members = members
    return members

  def read(self, relative: str) -> bytes:
    handle = self.names()[relative]
    if isinstance(handle, str):
      with open(handle, "rb") as f:
        return f.read()
    return self._tar.extractfile(handle).read()

  def read_rgb_jpegs(self, relatives) -> Iterator[tuple[str, bytes]]:
    for relative in relatives:
      yield relative, to_rgb_jpeg(self.read(relative), relative)


def find_download(manual_dir: str, candidates: tuple[str, ...],
                  instructions: str) -> str:
  """The first of ``candidates`` that exists in ``manual_dir``, else raise.

  Raises:
    ManualDownloadRequiredError: none exists; the message is ``instructions``
      with ``{manual_dir}`` filled in.
  """
  for candidate in candidates:
    path = os.path.join(manual_dir, candidate)
    if os.path.exists(path):
      return path
  raise errors.ManualDownloadRequiredError(
      instructions.format(manual_dir=manual_dir))
