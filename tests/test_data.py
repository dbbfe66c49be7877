"""The input pipeline and the TFDS datasets behave as the paper's setup needs.

No network: TFDS datasets are mocked with ``tfds.testing.mock_data``, and the
manual-download builders read fake download trees made here with PIL.
"""

import json
import os
import tarfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from dtnh_jax import data  # pylint: disable=wrong-import-position
from dtnh_jax.data import pipeline  # pylint: disable=wrong-import-position
from dtnh_jax.data.builders import caltech256  # pylint: disable=wrong-import-position
from dtnh_jax.data.builders import mit_indoor67  # pylint: disable=wrong-import-position

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(autouse=True, scope="module")
def _quiet_tfds():
  tfds.disable_progress_bar()


def _indexed_source(n, size=8):
  """n images whose label is their index; pixels encode the index."""
  images = np.zeros((n, size, size, 3), np.uint8)
  images[:] = (np.arange(n, dtype=np.uint8) * 7)[:, None, None, None]
  return data.ArraySource(images, np.arange(n), num_classes=n, name="indexed")


def _position_image(size):
  """One image whose pixel (y, x) holds (y, x, y + x): crops are traceable."""
  y, x = np.mgrid[:size, :size]
  return np.stack([y, x, y + x], axis=-1).astype(np.uint8)


def _unnormalize(images):
  return np.round((images * STD + MEAN) * 255.0).astype(np.int64)


def _take(loader, count):
  return [next(loader) for _ in range(count)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------- pipeline


def test_train_batches_from_mock_tfds_have_the_paper_layout():
  with tfds.testing.mock_data(num_examples=20):
    loader = data.make_train_loader("cifar10", batch_size=6, seed=0,
                                    resize=36, crop=32)
    batch = next(loader)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (6, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
  assert loader.num_classes == 10 and loader.num_examples == 20


def test_default_sizes_are_the_papers_256_resize_and_224_crop():
  source = data.ArraySource(np.zeros((2, 40, 30, 3), np.uint8), np.arange(2))
  batch = next(data.make_train_loader(source, batch_size=2, seed=0))
  assert batch["image"].shape == (2, 224, 224, 3)
  eval_batch = next(iter(data.make_eval_batches(source, batch_size=2)))
  assert eval_batch["image"].shape == (2, 224, 224, 3)


def test_constant_image_is_normalized_with_imagenet_mean_and_std():
  color = np.array([10, 128, 250], np.uint8)
  images = np.broadcast_to(color, (4, 12, 12, 3)).copy()
  source = data.ArraySource(images, np.zeros(4, np.int64))
  expected = (color / 255.0 - MEAN) / STD
  train = next(data.make_train_loader(source, batch_size=4, seed=0,
                                      resize=12, crop=8))
  evaluation = next(iter(data.make_eval_batches(source, batch_size=4,
                                                resize=12, crop=8)))
  for batch in (train, evaluation):
    np.testing.assert_allclose(batch["image"].mean(axis=(0, 1, 2)), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(batch["image"].std(axis=(0, 1, 2)), 0.0,
                               atol=1e-5)


def test_imagenet_constants_match_the_models():
  models = pytest.importorskip("dtnh_jax.models")
  np.testing.assert_array_equal(data.IMAGENET_MEAN, models.IMAGENET_MEAN)
  np.testing.assert_array_equal(data.IMAGENET_STD, models.IMAGENET_STD)


def test_grayscale_images_become_three_equal_channels():
  images = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
  batch = next(iter(data.make_eval_batches(
      data.ArraySource(images, np.arange(2)), batch_size=2, resize=6, crop=6)))
  pixels = _unnormalize(batch["image"])
  np.testing.assert_array_equal(pixels[..., 0], images)
  np.testing.assert_array_equal(pixels[..., 1], images)
  np.testing.assert_array_equal(pixels[..., 2], images)


def test_center_crop_is_the_central_window_every_time():
  image = _position_image(12)
  source = data.ArraySource(image[None], np.zeros(1, np.int64))
  batches = data.make_eval_batches(source, batch_size=1, resize=12, crop=8)
  first, second = next(iter(batches)), next(iter(batches))
  np.testing.assert_array_equal(first["image"], second["image"])
  np.testing.assert_array_equal(_unnormalize(first["image"][0]),
                                image[2:10, 2:10])


def test_center_crop_uses_torchvisions_offsets_on_odd_margins():
  # torchvision's CenterCrop: int(round((size - crop) / 2.0)), Python's round.
  image = _position_image(9)[:7]  # 7 x 9
  window = pipeline.center_crop(image, 4)
  assert window.shape == (4, 4, 3)
  assert window[0, 0, :2].tolist() == [round(1.5), round(2.5)]  # [2, 2]


def test_random_crops_and_mirrors_differ_across_steps_and_follow_the_seed():
  image = _position_image(12)
  source = data.ArraySource(np.stack([image] * 4), np.zeros(4, np.int64))

  def windows(seed):
    loader = data.make_train_loader(source, batch_size=4, seed=seed,
                                    resize=12, crop=8)
    return np.concatenate([b["image"] for b in _take(loader, 5)])

  first, again, other = windows(0), windows(0), windows(1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  distinct = {_unnormalize(w).tobytes() for w in first}
  assert len(distinct) > 5  # 20 draws from 5 x 5 offsets x 2 mirrors
  # Every window is a (possibly mirrored) crop of the image.
  pixels = _unnormalize(first)
  for window in pixels:
    if window[0, 0, 1] > window[0, -1, 1]:  # x decreases: mirrored
      window = window[:, ::-1]
    top, left = window[0, 0, :2]
    np.testing.assert_array_equal(window, image[top:top + 8, left:left + 8])
  mirrored = np.sum(pixels[:, 0, 0, 1] > pixels[:, 0, -1, 1])
  assert 0 < mirrored < len(pixels)


def test_without_mirror_and_with_crop_equal_to_resize_images_are_unchanged():
  image = _position_image(8)
  source = data.ArraySource(image[None], np.zeros(1, np.int64))
  loader = data.make_train_loader(source, batch_size=1, seed=3, resize=8,
                                  crop=8, mirror=False)
  for batch in _take(loader, 3):
    np.testing.assert_array_equal(_unnormalize(batch["image"][0]), image)


def test_every_epoch_visits_each_example_once_in_a_new_order():
  loader = data.make_train_loader(_indexed_source(12), batch_size=4, seed=0,
                                  resize=8, crop=8)
  labels = np.concatenate([b["label"] for b in _take(loader, 6)])
  first_epoch, second_epoch = labels[:12], labels[12:]
  assert sorted(first_epoch) == list(range(12))
  assert sorted(second_epoch) == list(range(12))
  assert not np.array_equal(first_epoch, second_epoch)
  assert loader.epoch == 2.0 and loader.steps_per_epoch == 3.0


def test_batches_straddle_epochs_and_are_never_partial():
  loader = data.make_train_loader(_indexed_source(10), batch_size=4, seed=0,
                                  resize=8, crop=8)
  batches = _take(loader, 5)  # 20 examples = 2 epochs of 10
  assert all(b["label"].shape == (4,) for b in batches)
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels[:10]) == sorted(labels[10:]) == list(range(10))


def test_resumed_loader_yields_exactly_the_same_batches():
  with tfds.testing.mock_data(num_examples=24):
    kwargs = dict(batch_size=5, seed=7, resize=36, crop=32)
    loader = data.make_train_loader("cifar10", **kwargs)
    _take(loader, 3)
    state = json.loads(json.dumps(loader.get_state()))  # survives JSON
    expected = _take(loader, 4)
    restored = data.make_train_loader("cifar10", **kwargs)
    restored.set_state(state)
    assert restored.step == 3
    _assert_same_batches(_take(restored, 4), expected)


def test_state_of_a_loader_with_other_arguments_is_refused():
  source = _indexed_source(8)
  state = data.make_train_loader(source, batch_size=2, seed=0, resize=8,
                                 crop=8).get_state()
  other = data.make_train_loader(source, batch_size=2, seed=1, resize=8,
                                 crop=8)
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)
  with pytest.raises(ValueError, match="not a TrainLoader state"):
    other.set_state({"step": 3})


def test_threads_do_not_change_the_batches():
  source = _indexed_source(16, size=10)
  batches = [
      _take(data.make_train_loader(source, batch_size=4, seed=0, resize=10,
                                   crop=8, num_threads=threads), 6)
      for threads in (1, 4)]
  _assert_same_batches(*batches)


@pytest.mark.slow
def test_worker_processes_do_not_change_the_batches():
  """One pool of worker processes (each start imports the libraries: ~2 CPU-s a worker) in a loader restored
  mid-stream: its batches are the in-process loader's, and the state it gives after them resumes an in-process
  loader exactly."""
  source = _indexed_source(16, size=10)
  kwargs = dict(batch_size=4, seed=0, resize=10, crop=8)
  expected = _take(data.make_train_loader(source, **kwargs), 7)
  in_process = data.make_train_loader(source, **kwargs)
  _take(in_process, 2)
  state = in_process.get_state()
  with data.make_train_loader(source, num_workers=2, **kwargs) as with_workers:
    with_workers.set_state(state)
    _assert_same_batches(_take(with_workers, 3), expected[2:5])
    state = with_workers.get_state()
  resumed = data.make_train_loader(source, **kwargs)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 2), expected[5:7])


def test_two_shards_are_disjoint_and_cover_the_data():
  source = _indexed_source(11)
  seen = []
  for shard_index in range(2):
    loader = data.make_train_loader(source, batch_size=1, seed=0, resize=8,
                                    crop=8, shard_index=shard_index,
                                    shard_count=2)
    seen.append({int(b["label"][0]) for b in _take(loader,
                                                    loader.num_examples)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(11))


def test_eval_batches_cover_the_split_exactly_once():
  source = _indexed_source(21)
  batches = data.make_eval_batches(source, batch_size=8, resize=8, crop=8)
  collected = list(batches)
  assert len(batches) == len(collected) == 3
  assert all(b["image"].shape == (8, 8, 8, 3) for b in collected)
  masks = np.concatenate([b["mask"] for b in collected])
  labels = np.concatenate([b["label"] for b in collected])
  assert masks.dtype == bool and masks.sum() == batches.num_examples == 21
  assert sorted(labels[masks]) == list(range(21))
  assert not masks[21:].any()


def test_eval_shards_have_equal_batch_counts_and_cover_the_split_once():
  source = _indexed_source(21)
  labels = []
  lengths = []
  for shard_index in range(2):
    batches = data.make_eval_batches(source, batch_size=4, resize=8, crop=8,
                                     shard_index=shard_index, shard_count=2)
    lengths.append(len(list(batches)))
    labels += [l for b in batches for l in b["label"][b["mask"]].tolist()]
  assert lengths == [3, 3]
  assert sorted(labels) == list(range(21))


def test_eval_batches_of_mock_tfds_images_of_any_size():
  with tfds.testing.mock_data(num_examples=11):
    batches = data.make_eval_batches("stanford_dogs", batch_size=4,
                                     resize=40, crop=32)
    collected = list(batches)
  assert [int(b["mask"].sum()) for b in collected] == [4, 4, 3]
  assert all(b["image"].shape == (4, 32, 32, 3) for b in collected)
  assert batches.num_classes == 120


def test_crop_larger_than_resize_is_rejected():
  with pytest.raises(ValueError, match="crop"):
    data.make_train_loader(_indexed_source(4), batch_size=2, seed=0,
                           resize=8, crop=10)


# ----------------------------------------------------- registry and errors


def test_registry_lists_the_papers_targets_and_dogs_source():
  targets = {n for n, s in data.DATASETS.items() if s.role == "target"}
  assert targets == {"cifar10", "caltech256/30", "caltech256/60",
                     "mit_indoor67", "oxford_flowers102"}
  assert data.DATASETS["stanford_dogs"].role == "source"
  assert data.DATASETS["caltech256/30"].num_train == 30 * 257


def test_info_of_an_unprepared_paper_dataset_comes_from_the_registry(tmp_path):
  info = data.dataset_info("caltech256/60", data_dir=str(tmp_path))
  assert info == data.DatasetInfo("caltech256/60", 257, 60 * 257, 20 * 257,
                                  (None, None, 3))


def test_unprepared_tfds_dataset_error_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.make_train_loader("cifar10", batch_size=2, seed=0,
                           data_dir=str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message
  assert "python -m dtnh_jax.data prepare cifar10" in message
  assert "tfds build cifar10 --file_format=array_record" in message


def test_unprepared_caltech_error_names_the_download_and_the_folder(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.make_eval_batches("caltech256/30", batch_size=2, resize=8, crop=8,
                           data_dir=str(tmp_path))
  message = str(error.value)
  assert "256_ObjectCategories.tar" in message
  assert "https://data.caltech.edu/records/nyy15-4j048" in message
  assert os.path.join(str(tmp_path), "downloads", "manual") in message
  assert "python -m dtnh_jax.data prepare caltech256/30" in message


def test_unprepared_mit_indoor_error_names_the_downloads_and_the_folder(
    tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.data_source("mit_indoor67", "train", data_dir=str(tmp_path))
  message = str(error.value)
  for expected in ("indoorCVPR_09.tar", "TrainImages.txt", "TestImages.txt",
                   "http://groups.csail.mit.edu/vision/LabelMe/NewImages/",
                   "https://web.mit.edu/torralba/www/",
                   os.path.join(str(tmp_path), "downloads", "manual")):
    assert expected in message


def test_preparing_without_the_manual_download_says_what_and_where(tmp_path):
  manual_dir = tmp_path / "my_downloads"
  with pytest.raises(data.ManualDownloadRequiredError) as error:
    data.prepare("caltech256/30", data_dir=str(tmp_path / "tfds"),
                 manual_dir=str(manual_dir))
  assert str(manual_dir) in str(error.value)
  assert "https://data.caltech.edu/records/nyy15-4j048" in str(error.value)


def test_prepare_command_exits_with_status_2_and_the_instructions(
    tmp_path, capsys):
  from dtnh_jax.data import __main__ as command  # pylint: disable=g-import-not-at-top

  status = command.main(["prepare", "mit_indoor67", "--data-dir",
                         str(tmp_path)])
  assert status == 2
  assert "indoorCVPR_09.tar" in capsys.readouterr().err


# ------------------------------------------------- manual-download builders


def _save(path, rng, mode="RGB", image_format="JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = rng.integers(0, 256, (10 + rng.integers(8), 12, 3), dtype=np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, format=image_format)


def _fake_caltech(root, per_class=7):
  """A 256_ObjectCategories tree: 3 classes + clutter, with the real quirks."""
  rng = np.random.default_rng(0)
  for folder in ("001.ak47", "002.american-flag", "003.backpack",
                 "257.clutter"):
    for i in range(1, per_class + 1):
      mode = "L" if i == 1 else "RGB"  # Caltech-256 has grayscale JPEGs
      _save(os.path.join(root, folder, f"{folder[:3]}_{i:04d}.jpg"), rng, mode)
  _save(os.path.join(root, "002.american-flag", "greg", "x_0001.jpg"), rng)
  with open(os.path.join(root, "003.backpack", "RENAME2"), "w") as f:
    f.write("not an image")


def _tiny_caltech_config(**overrides):
  fields = dict(name="tiny", train_per_class=2, train_pool_per_class=3,
                test_per_class=2, num_classes=4)
  fields.update(overrides)
  return caltech256.Caltech256Config(**fields)


def _prepare(builder_class, config, tmp_path, manual_dir):
  builder = builder_class(config=config, data_dir=str(tmp_path / "tfds"),
                          file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read_split(builder, split):
  source = builder.as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  return {ex["file_name"].decode(): (int(ex["label"]), ex["image"])
          for ex in examples}


def test_caltech_builder_prepares_a_tar_with_the_seeded_protocol(tmp_path):
  extracted = tmp_path / "extracted" / "256_ObjectCategories"
  _fake_caltech(str(extracted))
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  with tarfile.open(manual_dir / "256_ObjectCategories.tar", "w") as tar:
    tar.add(extracted, arcname="256_ObjectCategories")
  config = _tiny_caltech_config()
  builder = _prepare(caltech256.Caltech256, config, tmp_path, manual_dir)

  train, test = _read_split(builder, "train"), _read_split(builder, "test")
  files = sorted(p.relative_to(extracted).as_posix()
                 for p in extracted.rglob("*") if p.is_file())
  expected = caltech256.split_files(files, config)
  assert sorted(train) == [path for path, _ in expected["train"]]
  assert sorted(test) == [path for path, _ in expected["test"]]
  assert not set(train) & set(test)
  for split, per_class in ((train, 2), (test, 2)):
    labels = [label for label, _ in split.values()]
    assert np.bincount(labels).tolist() == [per_class] * 4  # clutter kept
    assert all(image.ndim == 3 and image.shape[-1] == 3
               for _, image in split.values())
  assert not any("greg" in path or "RENAME2" in path for path in train)


def test_caltech_builder_reads_the_extracted_folder_and_can_drop_clutter(
    tmp_path):
  manual_dir = tmp_path / "manual"
  _fake_caltech(str(manual_dir / "256_ObjectCategories"))
  config = _tiny_caltech_config(name="tiny_no_clutter", include_clutter=False,
                                num_classes=3)
  builder = _prepare(caltech256.Caltech256, config, tmp_path, manual_dir)
  train = _read_split(builder, "train")
  assert len(train) == 6
  assert not any(path.startswith("257.clutter") for path in train)
  # The prepared split reads through the loader, without TensorFlow.
  batch = next(data.make_train_loader(builder.as_data_source("train"),
                                      batch_size=6, seed=0, resize=12,
                                      crop=10))
  assert batch["image"].shape == (6, 10, 10, 3)
  assert sorted(batch["label"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_caltech_protocol_is_seeded_and_nested():
  files = [f"{c:03d}.c{c}/{c:03d}_{i:04d}.jpg" for c in range(1, 4)
           for i in range(1, 10)]
  small = _tiny_caltech_config(num_classes=3, train_per_class=2)
  large = _tiny_caltech_config(num_classes=3, train_per_class=3)
  splits_small = caltech256.split_files(files, small)
  assert splits_small == caltech256.split_files(files, small)
  splits_large = caltech256.split_files(files, large)
  assert set(splits_small["train"]) < set(splits_large["train"])
  assert splits_small["test"] == splits_large["test"]
  reseeded = caltech256.split_files(files, _tiny_caltech_config(
      num_classes=3, seed=1))
  assert reseeded["train"] != splits_small["train"]


def test_caltech_file_order_takes_the_first_files_like_l2sps_code():
  files = [f"001.a/001_{i:04d}.jpg" for i in range(1, 10)]
  config = _tiny_caltech_config(num_classes=1, order="file")
  splits = caltech256.split_files(files, config)
  assert [p for p, _ in splits["train"]] == files[:2]
  assert [p for p, _ in splits["test"]] == files[3:5]


def test_caltech_class_with_too_few_images_is_an_error():
  files = [f"001.a/001_{i:04d}.jpg" for i in range(1, 5)]
  with pytest.raises(ValueError, match="needs 5"):
    caltech256.split_files(files, _tiny_caltech_config(num_classes=1))


def test_paper_caltech_configs_are_30_and_60_of_257_classes():
  configs = {c.name: c for c in caltech256.Caltech256.BUILDER_CONFIGS}
  assert configs["30"].train_per_class == 30
  assert configs["60"].train_per_class == 60
  assert configs["30"].num_classes == configs["60"].num_classes == 257
  assert configs["30_no_clutter"].num_classes == 256
  assert all(c.test_per_class == 20 and c.train_pool_per_class == 60
             for c in configs.values())


def test_mit_indoor_builder_uses_the_official_lists(tmp_path):
  rng = np.random.default_rng(1)
  images = tmp_path / "source" / "Images"
  train_list, test_list = [], []
  for name in ("kitchen", "bar", "gameroom"):
    for i in range(5):
      entry = f"{name}/{name}_{i}.jpg"
      (train_list if i < 3 else test_list).append(entry)
      # MIT Indoor-67 has GIF/PNG files named .jpg and grayscale images.
      kind = [("RGB", "JPEG"), ("L", "JPEG"), ("P", "GIF"), ("RGB", "PNG"),
              ("RGB", "JPEG")][i]
      _save(str(images / entry), rng, *kind)
  _save(str(images / "bar" / "unlisted.jpg"), rng)
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  with tarfile.open(manual_dir / "indoorCVPR_09.tar", "w") as tar:
    tar.add(images, arcname="Images")
  (manual_dir / "TrainImages.txt").write_text("\n".join(train_list) + "\n")
  (manual_dir / "TestImages.txt").write_text("\r\n".join(test_list))

  config = mit_indoor67.MitIndoor67Config(name="tiny", num_classes=3)
  builder = _prepare(mit_indoor67.MitIndoor67, config, tmp_path, manual_dir)
  train, test = _read_split(builder, "train"), _read_split(builder, "test")
  assert sorted(train) == sorted(train_list)
  assert sorted(test) == sorted(test_list)
  labels = {"bar": 0, "gameroom": 1, "kitchen": 2}  # sorted class names
  for split in (train, test):
    for path, (label, image) in split.items():
      assert label == labels[path.split("/")[0]]
      assert image.ndim == 3 and image.shape[-1] == 3


def test_mit_indoor_builder_without_lists_says_what_to_download(tmp_path):
  manual_dir = tmp_path / "manual"
  (manual_dir / "Images" / "bar").mkdir(parents=True)
  config = mit_indoor67.MitIndoor67Config(name="tiny", num_classes=1)
  with pytest.raises(data.ManualDownloadRequiredError) as error:
    _prepare(mit_indoor67.MitIndoor67, config, tmp_path, manual_dir)
  assert "TrainImages.txt" in str(error.value)
  assert str(manual_dir) in str(error.value)
