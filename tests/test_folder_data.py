"""``--dataset folder:PATH``: your own image folder, through the same pipeline as the paper's datasets.

Every dataset here is made in ``tmp_path`` with Pillow: tiny solid-colour
PNGs, one colour per image, so that a record or a batch tells which file it
came from.
"""

import json
import os
import re
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from dtnh_jax import cli, data
from dtnh_jax.data import pipeline
from dtnh_jax.train import TrainConfig
from dtnh_jax.train.config import ConfigError
from dtnh_jax.train.data import load_data

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CLASSES = ("ant", "mole", "zebra")


SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def _colour(class_index, image_index, split):
  return (40 * class_index + 10, 20 * image_index + 10, 60 * SPLIT_INDEX[split] + 50)


def _make_split(root, split, per_class=6, classes=CLASSES):
  """``root/split/CLASS/NN.png``: solid 12×9 images of :func:`_colour`; returns ``{relative path: colour}``."""
  colours = {}
  for class_index, name in enumerate(classes):
    os.makedirs(root / split / name, exist_ok=True)
    for image_index in range(per_class):
      colour = _colour(class_index, image_index, split)
      Image.new("RGB", (12, 9), colour).save(root / split / name / f"{image_index:02d}.png")
      colours[f"{split}/{name}/{image_index:02d}.png"] = colour
  return colours


def _splits(root, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a clean folder warns about nothing
    return data.folder_splits(root, **kwargs)


def _snapshot(root):
  return {(directory, name, os.stat(os.path.join(directory, name)).st_mtime_ns)
          for directory, subdirectories, files in os.walk(root) for name in files + subdirectories}


def _unnormalize(images):
  return np.round((images * STD + MEAN) * 255.0).astype(np.int64)


def _take(loader, count):
  return [next(loader) for _ in range(count)]


# --- classes and records -----------------------------------------------------------------------------------------


def test_classes_are_the_sorted_subfolders_of_train_and_label_their_images(tmp_path):
  _make_split(tmp_path, "train", classes=("zebra", "ant", "mole"))
  splits = _splits(tmp_path)
  assert splits["train"].classes == ("ant", "mole", "zebra")
  for split in splits.values():
    assert split.num_classes == 3
    for path, label in zip(split.files, split.labels):
      assert path.split("/")[1] == ("ant", "mole", "zebra")[label]


def test_records_are_in_class_then_path_order(tmp_path):
  _make_split(tmp_path, "train")
  _make_split(tmp_path, "test")
  _make_split(tmp_path, "val")
  test = _splits(tmp_path)["test"]
  assert list(test.files) == [f"test/{name}/{i:02d}.png" for name in CLASSES for i in range(6)]
  assert list(test.labels) == [label for label in range(3) for _ in range(6)]


def test_records_are_decoded_rgb_uint8_at_their_own_size_or_at_image_size(tmp_path):
  colours = _make_split(tmp_path, "train")
  for image_size, shape in ((None, (9, 12, 3)), (10, (10, 10, 3))):
    train = _splits(tmp_path, image_size=image_size)["train"]
    record = train[0]
    assert record["image"].dtype == np.uint8 and record["image"].shape == shape
    np.testing.assert_array_equal(record["image"], np.broadcast_to(colours[train.files[0]], shape))
    assert record["label"] == train.labels[0]


def test_grayscale_palette_and_rgba_images_become_rgb(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  Image.new("L", (5, 4), 77).save(tmp_path / "train" / "a" / "gray.png")
  Image.new("RGBA", (5, 4), (1, 2, 3, 0)).save(tmp_path / "train" / "a" / "rgba.png")
  Image.new("RGB", (5, 4), (9, 8, 7)).convert("P", palette=Image.Palette.ADAPTIVE).save(
      tmp_path / "train" / "a" / "palette.gif")
  Image.new("RGB", (5, 4), (4, 5, 6)).save(tmp_path / "train" / "a" / "plain.BMP")  # endings in any case
  source = data.FolderSource(tmp_path, "train", ["a"], ["train/a/gray.png", "train/a/rgba.png", "train/a/palette.gif",
                                                        "train/a/plain.BMP"], [0, 0, 0, 0])
  expected = [(77, 77, 77), (1, 2, 3), (9, 8, 7), (4, 5, 6)]
  for index, colour in enumerate(expected):
    np.testing.assert_array_equal(source[index]["image"], np.broadcast_to(colour, (4, 5, 3)))


def _png_16_bit(path, samples):
  """Writes ``samples`` (uint16 ``(H, W, 3)`` or ``(H, W, 4)``) as a 16-bit RGB(A) PNG: Pillow cannot write one."""
  height, width, channels = samples.shape

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)  # filter 0 before each row
  header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                   + chunk(b"IEND", b""))


def _decoded(path):
  """The image at ``path`` as the folder dataset's records decode it."""
  return data.FolderSource(path.parent.parent.parent, "train", [path.parent.name],
                           [f"train/{path.parent.name}/{path.name}"], [0])[0]["image"]


def test_16_bit_grayscale_png_decodes_to_the_matching_8_bit_ramp(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  ramp = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0, 257, ..., 65535: exactly k/255 of full scale
  Image.fromarray(ramp).save(tmp_path / "train" / "a" / "ramp.png")
  assert Image.open(tmp_path / "train" / "a" / "ramp.png").mode == "I;16"
  image = _decoded(tmp_path / "train" / "a" / "ramp.png")
  assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
  for channel in range(3):
    np.testing.assert_array_equal(image[..., channel], np.arange(256).reshape(16, 16))


def test_16_bit_grayscale_png_values_between_the_ramp_round_to_the_nearest_8_bit_value(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  values = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
  Image.fromarray(values).save(tmp_path / "train" / "a" / "noise.png")
  image = _decoded(tmp_path / "train" / "a" / "noise.png")
  assert np.abs(image[..., 0].astype(float) - values * 255.0 / 65535.0).max() <= 0.5


def test_16_bit_grayscale_png_at_image_size_is_the_8_bit_image_resized(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  Image.fromarray(np.full((12, 9), 100 * 257, np.uint16)).save(tmp_path / "train" / "a" / "flat.png")
  source = data.FolderSource(tmp_path, "train", ["a"], ["train/a/flat.png"], [0], image_size=6)
  np.testing.assert_array_equal(source[0]["image"], np.full((6, 6, 3), 100))


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_rgb_and_rgba_pngs_decode_to_the_matching_8_bit_values_within_1(channels, tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  samples = np.random.default_rng(1).integers(0, 65536, (6, 7, channels)).astype(np.uint16)
  _png_16_bit(tmp_path / "train" / "a" / "deep.png", samples)
  image = _decoded(tmp_path / "train" / "a" / "deep.png")
  assert image.shape == (6, 7, 3)
  assert np.abs(image.astype(float) - samples[..., :3] * 255.0 / 65535.0).max() <= 1


def test_palette_png_with_transparency_decodes_to_its_colours_without_a_warning(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
  rgba.putpixel((0, 0), (200, 100, 50, 255))
  rgba.convert("P").save(tmp_path / "train" / "a" / "sprite.png")  # tRNS as bytes: one alpha per palette entry
  assert "transparency" in Image.open(tmp_path / "train" / "a" / "sprite.png").info
  expected = np.broadcast_to(np.array((10, 20, 30), np.uint8), (3, 4, 3)).copy()
  expected[0, 0] = (200, 100, 50)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(_decoded(tmp_path / "train" / "a" / "sprite.png"), expected)


@pytest.mark.parametrize("mode,value,name,expected", [
    ("1", 1, "mask.png", (255, 255, 255)),
    ("1", 0, "mask.bmp", (0, 0, 0)),
    ("L", 77, "gray.jpg", (77, 77, 77)),
    ("LA", (90, 0), "gray_alpha.png", (90, 90, 90)),  # the colour under a transparent pixel is kept, as for RGBA
    ("CMYK", (0, 255, 255, 0), "red.jpg", (255, 0, 0)),
    ("CMYK", (0, 0, 0, 255), "black.jpg", (0, 0, 0)),
])
def test_one_bit_gray_gray_alpha_and_cmyk_images_decode_to_rgb(mode, value, name, expected, tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  Image.new(mode, (8, 8), value).save(tmp_path / "train" / "a" / name)
  image = _decoded(tmp_path / "train" / "a" / name)
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8
  assert np.abs(image.astype(int) - expected).max() <= 3  # JPEG: a few levels of rounding


@pytest.mark.parametrize("mode,value", [("F", 0.5), ("I", 70000)])
def test_images_without_a_known_8_bit_scale_are_skipped_naming_file_and_mode(mode, value, tmp_path):
  colours = _make_split(tmp_path, "train")
  Image.new(mode, (4, 4), value).save(tmp_path / "train" / "ant" / "scan.png", format="TIFF")  # TIFF under a .png name
  with pytest.warns(UserWarning, match=f"skipped 1 unreadable image.*train/ant/scan.png .*mode {mode}"):
    splits = data.folder_splits(tmp_path)
  assert set().union(*(s.files for s in splits.values())) == set(colours)
  source = data.FolderSource(tmp_path, "train", ["ant"], ["train/ant/scan.png"], [0], image_size=None)
  with pytest.raises(data.UnreadableImageError, match=f"train/ant/scan.png .*mode {mode}"):
    source[0]


def test_large_jpegs_decoded_at_a_reduced_scale_match_a_full_decode_and_resize(tmp_path):
  os.makedirs(tmp_path / "train" / "a")
  y, x = np.mgrid[:240, :320]
  gradient = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=-1).astype(np.uint8)
  Image.fromarray(gradient).save(tmp_path / "train" / "a" / "photo.jpg", quality=95)
  source = data.FolderSource(tmp_path, "train", ["a"], ["train/a/photo.jpg"], [0], image_size=16)
  full = pipeline.resize(np.asarray(Image.open(tmp_path / "train" / "a" / "photo.jpg").convert("RGB")), 16)
  image = source[0]["image"]
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert np.abs(image.astype(int) - full.astype(int)).max() <= 2


def test_images_are_read_when_their_record_is_read_not_before(tmp_path):
  _make_split(tmp_path, "train")
  train = _splits(tmp_path)["train"]
  Image.new("RGB", (12, 9), (1, 2, 3)).save(tmp_path / train.files[0])  # after the splits were made
  np.testing.assert_array_equal(train[0]["image"], np.broadcast_to((1, 2, 3), (9, 12, 3)))


def test_other_files_and_hidden_ones_are_ignored(tmp_path):
  _make_split(tmp_path, "train")
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  (tmp_path / "train" / "ant" / "._00.png").write_bytes(b"macOS metadata")
  os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")
  splits = _splits(tmp_path)
  assert splits["train"].classes == CLASSES
  assert sum(len(s) for s in splits.values()) == 18


# --- splits ------------------------------------------------------------------------------------------------------


def test_missing_val_and_test_are_carved_per_class_disjoint_and_covering_train(tmp_path):
  colours = _make_split(tmp_path, "train")
  splits = _splits(tmp_path)
  # per class of 6: test max(1, round(0.2 * 6)) = 1, val max(1, round(0.1 * 6)) = 1, 4 left for training
  for split, per_class in (("train", 4), ("val", 1), ("test", 1)):
    assert np.bincount(splits[split].labels).tolist() == [per_class] * 3, split
  files = [set(s.files) for s in splits.values()]
  assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
  assert files[0] | files[1] | files[2] == set(colours)


def test_carved_splits_are_the_same_every_time_and_val_seed_moves_only_val(tmp_path):
  _make_split(tmp_path, "train", per_class=10)
  first, again, other_seed = _splits(tmp_path), _splits(tmp_path), _splits(tmp_path, val_seed=1)
  for split in ("train", "val", "test"):
    assert first[split].files == again[split].files
  assert other_seed["test"].files == first["test"].files
  assert other_seed["val"].files != first["val"].files


def test_adding_an_image_keeps_the_held_out_images_of_the_others(tmp_path):
  _make_split(tmp_path, "train", per_class=6)
  before = _splits(tmp_path)
  Image.new("RGB", (12, 9), (0, 0, 0)).save(tmp_path / "train" / "ant" / "new.png")  # 7 images: still 1 + 1 held out
  after = _splits(tmp_path)
  for split in ("val", "test"):
    changed = set(after[split].files) - set(before[split].files)
    assert changed <= {"train/ant/new.png"}, split


def test_existing_val_and_test_folders_are_used_as_they_are(tmp_path):
  train = _make_split(tmp_path, "train")
  val = _make_split(tmp_path, "val", per_class=2)
  test = _make_split(tmp_path, "test", per_class=3)
  splits = _splits(tmp_path)
  assert (set(splits["train"].files), set(splits["val"].files), set(splits["test"].files)) == (
      set(train), set(val), set(test))


def test_with_a_val_folder_only_test_is_carved_from_train(tmp_path):
  train = _make_split(tmp_path, "train")
  val = _make_split(tmp_path, "val", per_class=2)
  splits = _splits(tmp_path)
  assert set(splits["val"].files) == set(val)
  assert np.bincount(splits["test"].labels).tolist() == [1, 1, 1]
  assert set(splits["train"].files) | set(splits["test"].files) == set(train)


def test_folder_source_returns_one_split_of_folder_splits(tmp_path):
  _make_split(tmp_path, "train")
  assert data.folder_source(tmp_path, "val").files == _splits(tmp_path)["val"].files
  with pytest.raises(ValueError, match="split must be one of"):
    data.folder_source(tmp_path, "validation")


# --- layout errors -----------------------------------------------------------------------------------------------


def test_val_or_test_with_other_classes_than_train_is_an_error_naming_them(tmp_path):
  _make_split(tmp_path, "train")
  _make_split(tmp_path, "test", classes=("ant", "zebra", "yak"))
  with pytest.raises(data.FolderLayoutError, match=r"test/ lacks \['mole'\] and has extra \['yak'\]"):
    data.folder_splits(tmp_path)


def test_val_missing_a_class_is_an_error_naming_only_that_class(tmp_path):
  _make_split(tmp_path, "train")
  _make_split(tmp_path, "val", classes=("ant", "mole"))
  with pytest.raises(data.FolderLayoutError, match=r"val/ lacks \['zebra'\]; add or remove"):
    data.folder_splits(tmp_path)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
  _make_split(tmp_path, "train")
  os.makedirs(tmp_path / "train" / "yak")
  with pytest.raises(data.FolderLayoutError, match=r"empty class folder\(s\) \['train/yak'\]"):
    data.folder_splits(tmp_path)


def test_missing_train_folder_is_an_error_giving_the_layout(tmp_path):
  _make_split(tmp_path, "test")
  with pytest.raises(data.FolderLayoutError, match="no train/ folder in .*expected PATH/train/CLASS/IMAGE"):
    data.folder_splits(tmp_path)


def test_dataset_path_that_is_not_a_directory_is_an_error_giving_the_layout(tmp_path):
  (tmp_path / "images.zip").write_bytes(b"PK")
  with pytest.raises(data.FolderLayoutError, match="is not a directory; expected PATH/train/CLASS/IMAGE"):
    data.folder_splits(tmp_path / "images.zip")


def test_images_directly_in_train_without_class_folders_is_an_error(tmp_path):
  os.makedirs(tmp_path / "train")
  Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a.png")
  with pytest.raises(data.FolderLayoutError, match=r"no class folders \(found 1 image\(s\) directly in train/\)"):
    data.folder_splits(tmp_path)


def test_class_too_small_to_carve_the_missing_splits_is_an_error_naming_it(tmp_path):
  _make_split(tmp_path, "train")
  os.makedirs(tmp_path / "train" / "yak")
  Image.new("RGB", (4, 4)).save(tmp_path / "train" / "yak" / "only.png")
  with pytest.raises(data.FolderLayoutError, match="class 'yak' has 1 readable image"):
    data.folder_splits(tmp_path)


# --- unreadable images -------------------------------------------------------------------------------------------


def test_unreadable_images_are_skipped_with_a_warning_naming_and_counting_them(tmp_path):
  colours = _make_split(tmp_path, "train")
  (tmp_path / "train" / "ant" / "garbage.png").write_bytes(b"this is not a PNG")
  noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
  for name in ("truncated.png", "truncated.jpg"):  # cut in the pixel data: the header still opens
    noise.save(tmp_path / "train" / "mole" / name)
    whole = (tmp_path / "train" / "mole" / name).read_bytes()
    (tmp_path / "train" / "mole" / name).write_bytes(whole[:len(whole) * 3 // 4])
    Image.open(tmp_path / "train" / "mole" / name)
  with pytest.warns(UserWarning, match="skipped 3 unreadable image") as record:
    splits = data.folder_splits(tmp_path)
  message = str(record[0].message)
  for name in ("train/ant/garbage.png", "train/mole/truncated.png", "train/mole/truncated.jpg"):
    assert name in message
  assert set().union(*(s.files for s in splits.values())) == set(colours)


def test_class_without_a_readable_image_is_an_error(tmp_path):
  _make_split(tmp_path, "train")
  os.makedirs(tmp_path / "train" / "yak")
  (tmp_path / "train" / "yak" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
  with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(data.FolderLayoutError,
                                                                   match=r"\['train/yak'\] .* no readable image"):
    data.folder_splits(tmp_path)


def test_image_damaged_after_the_check_stops_the_pipeline_naming_it(tmp_path):
  _make_split(tmp_path, "train")
  train = _splits(tmp_path)["train"]
  (tmp_path / train.files[3]).write_bytes(b"damaged later")
  with pytest.raises(data.UnreadableImageError, match=f"cannot read image .*{train.files[3]}"):
    train[3]


# --- symbolic links: each image file once ------------------------------------------------------------------------


def _files(splits):
  return [path for split in splits.values() for path in split.files]


def test_class_folder_linked_to_its_parent_is_an_error_naming_the_link(tmp_path):
  _make_split(tmp_path, "train", per_class=8)
  os.symlink("..", tmp_path / "train" / "mole" / "up")  # the issue: 24 images read as 984, other classes as 'mole'
  with pytest.raises(data.FolderLayoutError, match=r"symbolic link loop .*train/mole/up -> \.\."):
    data.folder_splits(tmp_path)


def test_link_to_a_folder_holding_it_is_an_error_even_inside_one_class(tmp_path):
  _make_split(tmp_path, "train")
  os.makedirs(tmp_path / "train" / "ant" / "more")
  os.symlink(tmp_path / "train" / "ant", tmp_path / "train" / "ant" / "more" / "again")
  with pytest.raises(data.FolderLayoutError, match=r"symbolic link loop .*train/ant/more/again -> "):
    data.folder_splits(tmp_path)


@pytest.mark.parametrize("link", ["file", "class folder", "split folder"])
def test_the_same_image_file_in_two_splits_is_an_error_naming_it_and_both_splits(link, tmp_path):
  _make_split(tmp_path, "train")
  if link == "split folder":
    os.symlink("train", tmp_path / "test")
    leaked = "ant/00"  # the first of all
  else:
    _make_split(tmp_path, "test", per_class=2)
    leaked = "mole/03" if link == "file" else "mole/00"
    if link == "file":
      os.symlink(os.path.join("..", "..", "train", "mole", "03.png"), tmp_path / "test" / "mole" / "leak.png")
    else:
      os.symlink(os.path.join("..", "..", "train", "mole"), tmp_path / "test" / "mole" / "leak")
  with pytest.raises(data.FolderLayoutError, match=rf"file train/{leaked}\.png .* in two splits, train/ and test/"):
    data.folder_splits(tmp_path)


def test_the_same_image_file_in_two_classes_is_an_error_naming_it_and_both(tmp_path):
  _make_split(tmp_path, "train")
  os.symlink(os.path.join("..", "ant", "02.png"), tmp_path / "train" / "zebra" / "stripes.png")
  with pytest.raises(data.FolderLayoutError, match=r"train/ant/02\.png .* in two classes of train/, 'ant' .*'zebra'"):
    data.folder_splits(tmp_path)


def test_images_linked_from_a_store_outside_the_folder_are_read_once_each(tmp_path):
  colours = _make_split(tmp_path / "store", "train")
  root = tmp_path / "dataset"
  for name in CLASSES:
    os.makedirs(root / "train" / name)
    for index in range(6):  # a dataset assembled from links, one per image
      os.symlink(tmp_path / "store" / "train" / name / f"{index:02d}.png", root / "train" / name / f"{index:02d}.png")
  splits = _splits(root)
  assert sorted(_files(splits)) == sorted(colours)
  train = splits["train"]
  for index, path in enumerate(train.files):
    np.testing.assert_array_equal(train[index]["image"][0, 0], colours[path])


def test_class_folder_that_is_a_link_outside_the_folder_is_read(tmp_path):
  colours = _make_split(tmp_path / "store", "train")
  os.makedirs(tmp_path / "dataset" / "train")
  for name in CLASSES:
    os.symlink(tmp_path / "store" / "train" / name, tmp_path / "dataset" / "train" / name)
  assert sorted(_files(_splits(tmp_path / "dataset"))) == sorted(colours)


def test_an_image_reached_twice_in_one_class_is_counted_once_with_a_warning_naming_it(tmp_path):
  colours = _make_split(tmp_path, "train")
  os.symlink("04.png", tmp_path / "train" / "ant" / "copy.png")
  repeated = r"counted 1 image file\(s\) .* once.*train/ant/copy\.png \(same file as train/ant/04\.png\)"
  with pytest.warns(UserWarning, match=repeated):
    splits = data.folder_splits(tmp_path)
  assert sorted(_files(splits)) == sorted(colours)


# --- the pipeline: sharding and resume ---------------------------------------------------------------------------


def test_two_shards_of_the_training_split_are_disjoint_and_cover_it(tmp_path):
  colours = _make_split(tmp_path, "train")
  train = _splits(tmp_path, image_size=8)["train"]
  seen = []
  for shard_index in range(2):
    loader = data.make_train_loader(train, batch_size=1, seed=0, resize=8, crop=8, shard_index=shard_index,
                                    shard_count=2)
    images = [_unnormalize(b["image"][0]) for b in _take(loader, loader.num_examples)]
    assert all((image == image[0, 0]).all() for image in images)  # solid colours stay solid
    seen.append({tuple(image[0, 0].tolist()) for image in images})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {colours[path] for path in train.files}


def test_resumed_loader_yields_exactly_the_same_batches(tmp_path):
  _make_split(tmp_path, "train")
  kwargs = dict(batch_size=5, seed=3, resize=10, crop=8)
  loader = data.make_train_loader(_splits(tmp_path, image_size=10)["train"], **kwargs)
  _take(loader, 4)  # past the first epoch of 12
  state = json.loads(json.dumps(loader.get_state()))
  expected = _take(loader, 3)
  restored = data.make_train_loader(_splits(tmp_path, image_size=10)["train"], **kwargs)
  restored.set_state(state)
  for actual, wanted in zip(_take(restored, 3), expected):
    for key in wanted:
      np.testing.assert_array_equal(actual[key], wanted[key])


def test_resuming_on_a_folder_whose_split_changed_is_refused(tmp_path):
  _make_split(tmp_path, "train")
  kwargs = dict(batch_size=4, seed=0, resize=10, crop=8)
  state = data.make_train_loader(_splits(tmp_path)["train"], **kwargs).get_state()
  os.rename(tmp_path / "train" / "ant" / "00.png", tmp_path / "train" / "ant" / "renamed.png")  # same count
  changed = data.make_train_loader(_splits(tmp_path)["train"], **kwargs)
  with pytest.raises(ValueError, match="source"):
    changed.set_state(state)


# --- load_data and the command line ------------------------------------------------------------------------------

TINY = dict(width=0.125, small_stem=True, resize=10, crop=8, batch_size=4, eval_batch_size=8)


def test_load_data_gives_the_folders_classes_sizes_and_loaders(tmp_path):
  _make_split(tmp_path, "train")
  run = load_data(TrainConfig.create(dataset=f"folder:{tmp_path}", **TINY))
  assert (run.num_classes, run.num_train) == (3, 15)  # 6 per class, 1 to the carved test split; no --val-fraction
  batch = next(run.train_loader(0))
  assert batch["image"].shape == (4, 8, 8, 3) and batch["label"].shape == (4,)
  assert sum(int(b["mask"].sum()) for b in run.eval_batches()) == 3  # the carved test split


def test_load_data_shards_the_training_split_between_processes(tmp_path):
  _make_split(tmp_path, "train")
  config = TrainConfig.create(dataset=f"folder:{tmp_path}", **TINY)
  assert [load_data(config, index, 2).train_loader(0).num_examples for index in range(2)] == [8, 7]


def test_load_data_reads_the_folder_and_writes_nothing_into_it(tmp_path):
  _make_split(tmp_path, "train")
  before = _snapshot(tmp_path)
  run = load_data(TrainConfig.create(dataset=f"folder:{tmp_path}", **TINY))
  _take(run.train_loader(0), 4)
  list(run.eval_batches())
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "no train/ folder in"),
    (lambda root: _make_split(root, "train", per_class=1), "class 'ant' has 1 readable image"),
])
def test_load_data_turns_folder_errors_into_one_line_config_errors(make, message, tmp_path):
  make(tmp_path)
  with pytest.raises(ConfigError, match=re.escape(f"--dataset folder:{tmp_path}: {message}")) as error:
    load_data(TrainConfig.create(dataset=f"folder:{tmp_path}", **TINY))
  assert "\n" not in str(error.value)


def test_load_data_refuses_more_processes_than_training_images(tmp_path):
  _make_split(tmp_path, "train", per_class=2)  # 1 to the test split + 1 per class: 3 training images
  with pytest.raises(ConfigError, match="3 training image.* cannot be shared by 4 processes"):
    load_data(TrainConfig.create(dataset=f"folder:{tmp_path}", **TINY), 0, 4)


def _cli_args(dataset_root, workdir):
  """A tiny run on the folder, on presets.tiny's ResNet-10 (the ResNet-18's layers, one block per stage: a third
  less to compile)."""
  return ["--dataset", f"folder:{dataset_root}", "--source", "scratch", "--method", "dtnh-l2-sp", "--seeds", "0",
          "--workdir", str(workdir), "--no-progress", "--arch", "resnet10", "--width", "0.125", "--small-stem",
          "--resize", "10", "--crop", "8", "--batch-size", "8", "--steps", "3", "--lr-drop-steps", "2", "--eval-every",
          "3", "--log-every", "3", "--checkpoint-every", "3", "--eval-batch-size", "16"]


def test_cli_trains_and_tests_on_a_folder_dataset(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # importing it imports torch: seconds, and not needed here
  _make_split(tmp_path / "images", "train")
  assert cli.train_main(_cli_args(tmp_path / "images", tmp_path / "runs")) == 0
  results = json.loads((tmp_path / "runs" / "scratch" / "dtnh-l2-sp" / "seed0" / "results.json").read_text())
  assert 0 <= results["test_accuracy"] <= 1 and results["dataset"] == f"folder:{tmp_path / 'images'}"


def test_cli_exits_with_code_2_and_one_line_on_a_bad_folder(tmp_path, capsys):
  _make_split(tmp_path / "images", "train")
  _make_split(tmp_path / "images", "test", classes=("ant", "mole"))
  with pytest.raises(SystemExit) as exit_info:
    cli.train_main(_cli_args(tmp_path / "images", tmp_path / "runs"))
  error = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert "test/ lacks ['zebra']" in error and "Traceback" not in error


def test_cli_refuses_a_folder_with_a_symbolic_link_loop_and_writes_no_result(tmp_path, capsys):
  _make_split(tmp_path / "images", "train")
  os.symlink("..", tmp_path / "images" / "train" / "mole" / "up")
  with pytest.raises(SystemExit) as exit_info:
    cli.train_main(_cli_args(tmp_path / "images", tmp_path / "runs"))
  error = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert "symbolic link loop" in error and "train/mole/up" in error and "Traceback" not in error
  assert not list((tmp_path / "runs").rglob("results.json"))
