"""The validation split carved per class from a training pool: disjoint, complete, seeded, recorded."""

import hashlib
import json

import numpy as np
import pytest

from dtnh_jax.data import folder, splits

# 3 classes of unequal size (10, 7, 3), interleaved so that a class is not a block of indices
LABELS = np.array([0, 1, 2] * 3 + [0, 1] * 4 + [0] * 3, np.int32)


def test_no_example_is_both_in_validation_and_in_training():
  train, val = splits.carve_validation(LABELS, 0.3, seed=0)
  assert np.intersect1d(train, val).size == 0


def test_train_and_validation_together_hold_every_example_once():
  train, val = splits.carve_validation(LABELS, 0.3, seed=0)
  assert sorted(train.tolist() + val.tolist()) == list(range(len(LABELS)))


def test_both_index_lists_are_sorted():
  train, val = splits.carve_validation(LABELS, 0.3, seed=5)
  assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_a_fraction_gives_each_class_its_rounded_half_up_share():
  _, val = splits.carve_validation(LABELS, 0.25, seed=0)
  # 10 · 0.25 = 2.5 -> 3, 7 · 0.25 = 1.75 -> 2, 3 · 0.25 = 0.75 -> 1, by hand
  assert np.bincount(LABELS[val]).tolist() == [3, 2, 1]


def test_a_count_gives_each_class_that_many():
  _, val = splits.carve_validation(LABELS, 2, seed=0)
  assert np.bincount(LABELS[val]).tolist() == [2, 2, 2]


def test_a_small_fraction_still_gives_one_per_class():
  _, val = splits.carve_validation(LABELS, 0.01, seed=0)
  assert np.bincount(LABELS[val]).tolist() == [1, 1, 1]


def test_a_class_keeps_at_least_one_example_for_training():
  train, _ = splits.carve_validation(LABELS, 5, seed=0)  # more than class 2's 3 examples
  assert np.bincount(LABELS[train]).tolist() == [5, 2, 1]


def test_a_class_of_one_example_stays_in_training():
  labels = np.array([0, 0, 0, 0, 1])
  train, val = splits.carve_validation(labels, 0.5, seed=0)
  assert 4 in train and 4 not in val


def test_a_class_of_two_examples_gives_one_to_validation():
  labels = np.array([0, 0, 0, 0, 1, 1])
  _, val = splits.carve_validation(labels, 0.1, seed=0)
  assert np.bincount(labels[val]).tolist() == [1, 1]


def test_the_same_seed_gives_the_same_split():
  first = splits.carve_validation(LABELS, 0.3, seed=7)
  again = splits.carve_validation(LABELS.copy(), 0.3, seed=7)
  assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_another_seed_redraws_the_split():
  drawn = {tuple(splits.carve_validation(LABELS, 0.3, seed=seed)[1]) for seed in range(5)}
  assert len(drawn) > 1


def test_the_choice_is_the_documented_pcg64_stream_of_each_class():
  labels = np.array([1, 0, 1, 0, 1, 0, 1])
  _, val = splits.carve_validation(labels, 2, seed=3)
  # the module docstring's recipe, written out: permute each class's indices, take the first ones
  expected = []
  for label in (0, 1):
    members = np.flatnonzero(labels == label)
    order = np.random.Generator(np.random.PCG64([3, splits.VAL_SPLIT_SALT, label])).permutation(len(members))
    expected += members[order[:2]].tolist()
  assert val.tolist() == sorted(expected)


def test_a_class_split_does_not_depend_on_the_other_classes():
  labels = np.array([0] * 6 + [1] * 6)
  _, with_both = splits.carve_validation(labels, 2, seed=1)
  _, alone = splits.carve_validation(labels[:6], 2, seed=1)
  assert with_both[with_both < 6].tolist() == alone.tolist()


@pytest.mark.parametrize("bad", [0, -1, 0.0, 1.0, 1.5, True, "0.1"])
def test_a_fraction_outside_0_1_or_a_count_below_1_is_refused(bad):
  with pytest.raises((ValueError, TypeError)):
    splits.carve_validation(LABELS, bad, seed=0)


def test_the_count_rule_is_the_folder_datasets_rule():
  # until folder.py calls held_out_count itself (the shared helper), both must carve alike
  for n in range(40):
    for fraction in (0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 0.9):
      assert splits.held_out_count(n, fraction) == folder._held_out(n, fraction)  # pylint: disable=protected-access


def test_the_record_is_json_and_counts_each_class():
  record = splits.split_record(LABELS, 0.25, seed=4)
  again = json.loads(json.dumps(record))
  assert again == record
  assert [(c["label"], c["total"], c["train"], c["val"]) for c in record["per_class"]] == [
      (0, 10, 7, 3), (1, 7, 5, 2), (2, 3, 2, 1)]
  assert (record["seed"], record["num_val"], record["num_train"], record["rule"]) == (4, 6, 14, "fraction")


def test_the_record_hash_is_the_sha256_of_the_validation_indices():
  _, val = splits.carve_validation(LABELS, 0.25, seed=4)
  text = ",".join(str(i) for i in sorted(val.tolist()))
  assert splits.split_record(LABELS, 0.25, seed=4)["val_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_the_record_hash_tells_two_seeds_splits_apart():
  hashes = {splits.split_record(LABELS, 0.3, seed=seed)["val_sha256"] for seed in range(5)}
  splits_drawn = {tuple(splits.carve_validation(LABELS, 0.3, seed=seed)[1]) for seed in range(5)}
  assert len(hashes) == len(splits_drawn)
