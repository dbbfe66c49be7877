"""Every dataset gets a validation split that no test number helped choose (``dtnh_jax.train.data``).

TFDS datasets without network: ``tfds.testing.mock_data`` with a data source
of our own per split (labels chosen here; every image a solid colour that
names its split and index, so that a batch tells which records it came
from; every read logged), and one toy TFDS dataset really prepared in
``tmp_path`` (the label reader's real path). Folder datasets are made with
Pillow as in ``test_folder_data``.
"""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from dtnh_jax import data  # noqa: E402  # pylint: disable=wrong-import-position
from dtnh_jax.data import datasets, splits  # noqa: E402  # pylint: disable=wrong-import-position
from dtnh_jax.train.config import ConfigError  # noqa: E402  # pylint: disable=wrong-import-position
from dtnh_jax.train.data import load_data, validation_kind  # noqa: E402  # pylint: disable=wrong-import-position

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SPLIT_CODE = {"train": 10, "validation": 100, "test": 200}
CODE_SPLIT = {code: split for split, code in SPLIT_CODE.items()}


@pytest.fixture(autouse=True, scope="module")
def _quiet_tfds():
  tfds.disable_progress_bar()


def _colour(split, index):
  return (SPLIT_CODE[split], index % 256, index // 256)


def _records(batches):
  """``[(split, index)]`` of the real examples of ``batches``, from their (constant) colours."""
  found = []
  for batch in batches:
    pixels = np.round((batch["image"][:, 0, 0] * STD + MEAN) * 255.0).astype(np.int64)
    mask = batch.get("mask", np.ones(len(pixels), bool))
    found += [(CODE_SPLIT[int(c)], int(low) + 256 * int(high)) for (c, low, high), real in zip(pixels, mask) if real]
  return found


class _FakeSplit:
  """One split as ``tfds``' data source gives it: ``{"image", "label"}`` records, every read logged.

  With ``SkipDecoding`` for ``image`` (how labels are read) the image is left
  as bytes; otherwise it is decoded: a 6×6 image of :func:`_colour`.
  """

  def __init__(self, builder, split, labels, decoders, log):
    self.dataset_info = builder.info
    self.split = split
    self.labels = np.asarray(labels)
    self.decodes = not (decoders and isinstance(decoders.get("image"), tfds.decode.SkipDecoding))
    self.log = log

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    index = int(index)
    assert 0 <= index < len(self), index
    self.log.append((self.split, index, self.decodes))
    image = np.full((6, 6, 3), _colour(self.split, index), np.uint8) if self.decodes else b"not decoded"
    return {"image": image, "label": np.int64(self.labels[index])}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _mock(labels_by_split):
  """``(context manager, log)``: TFDS mocked with :class:`_FakeSplit` sources of ``labels_by_split``."""
  log = []

  def as_data_source(builder, split=None, *, decoders=None, **kwargs):
    del kwargs
    if split not in labels_by_split:
      raise ValueError(f"unknown split {split!r}")
    return _FakeSplit(builder, split, labels_by_split[split], decoders, log)

  return tfds.testing.mock_data(as_data_source_fn=as_data_source), log


# 10 classes of 3..12 examples, interleaved: 75 training examples of CIFAR-10's 10 classes
CIFAR_TRAIN = np.random.default_rng(0).permutation(np.repeat(np.arange(10), np.arange(3, 13)))
CIFAR_SPLITS = {"train": CIFAR_TRAIN, "test": np.arange(20) % 10}


def _decoded(log, split):
  return [index for s, index, decoded in log if s == split and decoded]


def _train_records(run, batches):
  """The records of the first ``batches`` training batches; the loader is closed (its prefetching stopped)."""
  with run.train_loader(0) as loader:
    return _records([next(loader) for _ in range(batches)])


# --- TFDS: a split carved from the training split -----------------------------------------------------------------


def test_tfds_carve_holds_out_each_class_and_the_loaders_read_only_their_side(tiny_config):
  context, log = _mock(CIFAR_SPLITS)
  with context:
    run = load_data(tiny_config(dataset="cifar10", val_fraction=0.2, seed=3))
    assert not _decoded(log, "train")  # the labels were read without decoding an image
    assert sorted(i for s, i, _ in log if s == "train") == list(range(len(CIFAR_TRAIN)))  # each label once
    log.clear()
    val = _records(run.val_batches())
    assert set(_decoded(log, "train")) == {i for _, i in val}  # the validation pass read its records only
    log.clear()
    train = _train_records(run, 10)  # 160 examples: more than two epochs of the training side
    read = set(_decoded(log, "train"))  # the batches' records, and what the loader prefetched of its own side
    test = _records(run.eval_batches())
  expected_train, expected_val = splits.carve_validation(CIFAR_TRAIN, 0.2, 3)  # seeded by --seed
  assert sorted(i for _, i in val) == expected_val.tolist() and {s for s, _ in val} == {"train"}
  assert {i for _, i in train} == read == set(expected_train.tolist())  # every training example, no validation one
  assert sorted(i for s, i in test if s == "test") == list(range(20)) and len(test) == 20
  # per class: held_out_count of its n (0.2 · n rounded half up, at least 1)
  per_class = np.bincount(CIFAR_TRAIN[expected_val], minlength=10)
  assert per_class.tolist() == [splits.held_out_count(n, 0.2) for n in range(3, 13)]
  assert run.num_train == len(expected_train) == len(CIFAR_TRAIN) - len(expected_val)
  assert run.split == {**splits.split_record(CIFAR_TRAIN, 0.2, 3), "pool": "cifar10:train"}
  assert run.split["kind"] == "carved" and run.split["seed"] == 3


def test_tfds_carve_is_the_same_for_the_same_seed_and_redrawn_for_another(tiny_config):
  context, _ = _mock(CIFAR_SPLITS)
  with context:
    digest = lambda **settings: load_data(tiny_config(dataset="cifar10", val_fraction=0.2, **settings)).split[
        "val_sha256"]
    first, again, other, fixed = digest(seed=1), digest(seed=1), digest(seed=2), digest(seed=2, split_seed=1)
  assert first == again == fixed and other != first  # --split-seed fixes the split whatever --seed


def test_tfds_carve_shards_each_side_over_processes(tiny_config):
  config = tiny_config(dataset="cifar10", val_fraction=0.2, seed=3)
  expected_train, expected_val = splits.carve_validation(CIFAR_TRAIN, 0.2, 3)
  trains, vals = [], []
  for index in range(2):
    context, log = _mock(CIFAR_SPLITS)  # a log per process (a closed loader's prefetch thread may still read)
    with context:
      run = load_data(config, index, 2)
      log.clear()
      trains.append({i for _, i in _train_records(run, 8)})  # 8 batches of 8: two epochs of a shard of ~30
      assert set(_decoded(log, "train")) == trains[-1]  # the loader read its shard of the training side only
      vals.append([i for _, i in _records(run.val_batches())])
  assert not trains[0] & trains[1] and trains[0] | trains[1] == set(expected_train.tolist())
  assert not set(vals[0]) & set(vals[1]) and sorted(vals[0] + vals[1]) == expected_val.tolist()


def test_tfds_run_without_val_fraction_reads_no_label_and_has_no_validation(tiny_config):
  context, log = _mock(CIFAR_SPLITS)
  with context:
    run = load_data(tiny_config(dataset="cifar10"))
    assert validation_kind(tiny_config(dataset="cifar10")) is None
  assert not log and run.val_batches is None and run.split is None


def test_tfds_class_with_a_single_training_example_cannot_give_validation(tiny_config):
  labels = np.concatenate([np.repeat([0, 1, 2, 3, 4, 5, 6, 8, 9], 4), [7]])  # class 7: one example
  context, _ = _mock({"train": labels, "test": np.arange(10)})
  with context, pytest.raises(ConfigError, match=r"--dataset cifar10: class 7 .*single training example") as error:
    load_data(tiny_config(dataset="cifar10", val_fraction=0.2))
  assert "\n" not in str(error.value)


# --- TFDS: a dataset with its own validation split ----------------------------------------------------------------

FLOWERS_SPLITS = {"train": np.arange(40) % 102, "validation": np.arange(30) % 102, "test": np.arange(20) % 102}


def test_flowers_runs_evaluate_its_own_validation_split(tiny_config):
  context, log = _mock(FLOWERS_SPLITS)
  with context:
    run = load_data(tiny_config(dataset="oxford_flowers102"))
    assert validation_kind(tiny_config(dataset="oxford_flowers102")) == "own"
    assert not log  # nothing read to make the split
    val = _records(run.val_batches())
    train = _train_records(run, 3)
    test = _records(run.eval_batches())
  assert sorted(val) == [("validation", i) for i in range(30)]
  assert {s for s, _ in train} == {"train"} and sorted(test) == [("test", i) for i in range(20)]
  assert run.split == {"kind": "own", "split": "validation", "num_train": 40, "num_val": 30}
  assert datasets.DATASETS["oxford_flowers102"].val_split == "validation"
  assert [name for name, spec in datasets.DATASETS.items() if spec.val_split] == ["oxford_flowers102"]


def test_val_fraction_on_a_dataset_with_its_own_validation_split_is_refused(tiny_config):
  context, log = _mock(FLOWERS_SPLITS)
  with context, pytest.raises(ConfigError, match="own validation split 'validation'.*leave it at 0") as error:
    load_data(tiny_config(dataset="oxford_flowers102", val_fraction=0.2))
  assert "\n" not in str(error.value) and not log


# --- a real prepared TFDS dataset: the labels read from array_record files -----------------------------------------


def _png(colour):
  buffer = io.BytesIO()
  Image.new("RGB", (6, 6), colour).save(buffer, format="PNG")
  return buffer.getvalue()


TOY_LABELS = {"train": np.arange(24) % 3, "validation": np.arange(6) % 3, "test": np.arange(9) % 3}


class DtnhValidationToy(tfds.core.GeneratorBasedBuilder):
  """Three classes of solid images; config ``own_val`` has a ``validation`` split, ``plain`` not."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="plain"), tfds.core.BuilderConfig(name="own_val")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    names = ["train", "test"] + ["validation"] * (self.builder_config.name == "own_val")
    return {split: self._generate_examples(split) for split in names}

  def _generate_examples(self, split):
    for index, label in enumerate(TOY_LABELS[split]):
      yield index, {"image": _png(_colour(split, index)), "label": int(label)}


def _prepared_toy(tmp_path, config):
  builder = DtnhValidationToy(config=config, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  return f"dtnh_validation_toy/{config}"


def test_prepared_dataset_labels_are_read_from_its_files_and_carved(tmp_path, tiny_config):
  name = _prepared_toy(tmp_path, "plain")
  labels = datasets.split_labels(name, "train", data_dir=str(tmp_path))
  source = data.data_source(name, "train", data_dir=str(tmp_path))
  assert labels.tolist() == [int(source[i]["label"]) for i in range(len(source))]  # in record order
  assert datasets.split_labels(name, "train", data_dir=str(tmp_path)) is labels  # kept for the process
  run = load_data(tiny_config(dataset=name, data_dir=str(tmp_path), val_fraction=0.25, seed=4))
  expected_train, expected_val = splits.carve_validation(labels, 0.25, 4)
  # TFDS shuffles the records when it prepares them: a colour names an example's index as generated
  position = {int(source[j]["image"][0, 0, 1]): j for j in range(len(source))}
  val = _records(run.val_batches())
  assert sorted(position[i] for _, i in val) == expected_val.tolist()
  assert run.num_train == len(expected_train) and run.split["per_class"][0]["val"] == 2  # 8 per class: 2 held out


def test_prepared_dataset_with_a_validation_split_uses_it(tmp_path, tiny_config):
  name = _prepared_toy(tmp_path, "own_val")
  info = data.dataset_info(name, data_dir=str(tmp_path))
  assert (info.val_split, info.num_val) == ("validation", 6)
  run = load_data(tiny_config(dataset=name, data_dir=str(tmp_path)))
  assert sorted(_records(run.val_batches())) == [("validation", i) for i in range(6)]
  assert run.split["kind"] == "own" and run.split["num_val"] == 6


# --- folder datasets -----------------------------------------------------------------------------------------------

CLASSES = ("ant", "mole", "zebra")
FOLDER_SPLIT_CODE = {"train": 0, "val": 1, "validation": 1, "test": 2}


def _make_split(root, split, per_class=8, classes=CLASSES):
  """``root/split/CLASS/NN.png``: solid images, colour (class, index, split); returns ``{colour: path}``."""
  made = {}
  for class_index, name in enumerate(classes):
    os.makedirs(root / split / name, exist_ok=True)
    for index in range(per_class):
      colour = (40 * class_index + 10, 20 * index + 10, 60 * FOLDER_SPLIT_CODE[split] + 50)
      Image.new("RGB", (12, 9), colour).save(root / split / name / f"{index:02d}.png")
      made[colour] = f"{split}/{name}/{index:02d}.png"
  return made


def _folder_files(batches, made):
  files = []
  for batch in batches:
    pixels = np.round((batch["image"][:, 0, 0] * STD + MEAN) * 255.0).astype(np.int64)
    mask = batch.get("mask", np.ones(len(pixels), bool))
    files += [made[tuple(int(v) for v in p)] for p, real in zip(pixels, mask) if real]
  return files


@pytest.mark.parametrize("folder", ["val", "validation"])
def test_folder_with_its_own_validation_folder_evaluates_it(tmp_path, tiny_config, folder):
  made = {**_make_split(tmp_path, "train"), **_make_split(tmp_path, folder, per_class=2)}
  config = tiny_config(dataset=f"folder:{tmp_path}")
  run = load_data(config)
  assert validation_kind(config) == "own"
  assert sorted(_folder_files(run.val_batches(), made)) == sorted(p for p in made.values() if p.startswith(folder))
  assert (run.split["kind"], run.split["split"], run.split["num_val"]) == ("own", f"{folder}/", 6)
  assert run.num_train == 3 * 8 - 3 * 2  # test carved from train/ (2 of 8 per class), nothing for validation


def test_folder_validation_folder_with_other_classes_or_two_of_them_is_an_error(tmp_path, tiny_config):
  _make_split(tmp_path, "train")
  _make_split(tmp_path, "validation", per_class=2, classes=CLASSES[:2])
  with pytest.raises(ConfigError, match=re.escape("validation/ lacks ['zebra']")):
    load_data(tiny_config(dataset=f"folder:{tmp_path}"))
  _make_split(tmp_path, "val", per_class=2)
  with pytest.raises(ConfigError, match="both val/ and validation/") as error:
    load_data(tiny_config(dataset=f"folder:{tmp_path}"))
  assert "\n" not in str(error.value)


def test_val_fraction_on_a_folder_with_its_own_validation_folder_is_refused(tmp_path, tiny_config):
  _make_split(tmp_path, "train")
  _make_split(tmp_path, "val", per_class=2)
  with pytest.raises(ConfigError, match=r"own validation split val/.*leave it at 0"):
    load_data(tiny_config(dataset=f"folder:{tmp_path}", val_fraction=0.25))


def test_folder_without_validation_folder_carves_one_after_the_test_split(tmp_path, tiny_config):
  made = _make_split(tmp_path, "train", per_class=10)
  load = lambda seed: load_data(tiny_config(dataset=f"folder:{tmp_path}", val_fraction=0.25, split_seed=seed))
  run, again, other = load(0), load(0), load(1)
  val = _folder_files(run.val_batches(), made)
  test = _folder_files(run.eval_batches(), made)
  with run.train_loader(0) as loader:
    train = set(_folder_files([next(loader) for _ in range(8)], made))  # 128 examples: every one of the 18
  # per class of 10: test 2 (0.2 · 10), then validation 2 of the 8 left (0.25 · 8), 6 to train
  assert len(test) == 6 and len(val) == 6 and run.num_train == 18 and len(train) == 18
  assert not set(val) & set(test) and not train & set(val) and not train & set(test)
  assert train | set(val) | set(test) == set(made.values())
  assert (run.split["kind"], run.split["seed"], run.split["test"]) == ("carved", 0, "carved")
  assert [c["val"] for c in run.split["per_class"]] == [2, 2, 2]
  assert again.split == run.split and sorted(_folder_files(again.val_batches(), made)) == sorted(val)
  assert other.split["val_sha256"] != run.split["val_sha256"]  # another split seed, another split ...
  assert sorted(_folder_files(other.eval_batches(), made)) == sorted(test)  # ... and the same test split
  assert validation_kind(tiny_config(dataset=f"folder:{tmp_path}")) is None


def test_folder_without_val_fraction_has_no_validation_split(tmp_path, tiny_config):
  _make_split(tmp_path, "train")
  run = load_data(tiny_config(dataset=f"folder:{tmp_path}"))
  assert run.val_batches is None and run.split is None and run.num_train == 3 * 6


def test_folder_class_too_small_for_validation_is_an_error_naming_it(tmp_path, tiny_config):
  _make_split(tmp_path, "train", per_class=4)
  _make_split(tmp_path, "test", per_class=1)
  for index in (1, 2, 3):
    os.remove(tmp_path / "train" / "mole" / f"{index:02d}.png")  # mole keeps one image
  with pytest.raises(ConfigError, match=r"class 'mole' has 1 readable image\(s\) in train/, too few to hold out "
                     r"the missing val/") as error:
    load_data(tiny_config(dataset=f"folder:{tmp_path}", val_fraction=0.25))
  assert "\n" not in str(error.value)


# --- the offline target, end to end --------------------------------------------------------------------------------


def test_offline_target_carves_from_its_training_pool(tiny_config):
  pool = load_data(tiny_config())
  run = load_data(tiny_config(val_fraction=0.25, seed=2))
  val = sum(int(b["mask"].sum()) for b in run.val_batches())
  assert run.split["kind"] == "carved" and run.split["seed"] == 2 and validation_kind(tiny_config()) is None
  assert val == run.split["num_val"] > 0 and run.num_train + val == pool.num_train
  assert {c["val"] for c in run.split["per_class"]} == {splits.held_out_count(10, 0.25)}  # 10 per class: 3


def test_index_subset_reads_only_its_indices_and_refuses_bad_ones():
  context, log = _mock({"train": np.arange(10)})
  with context:
    source = data.data_source("cifar10", "train")
    subset = datasets.IndexSubset(source, [7, 2, 5], name="three")
    assert [int(subset[i]["label"]) for i in range(3)] == [7, 2, 5] and len(subset) == 3
    assert [int(e["label"]) for e in subset.__getitems__([2, 0])] == [5, 7] and subset.num_classes == 10
    assert [i for _, i, _ in log] == [7, 2, 5, 5, 7]
    for bad in ([10], [-1], [2, 2]):
      with pytest.raises(ValueError):
        datasets.IndexSubset(source, bad, name="bad")
