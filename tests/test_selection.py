"""The selection rule: per method and source, the λ and decay of best mean validation accuracy, blind to test."""

import itertools
import random
from collections.abc import Mapping

import numpy as np
import pytest

from dtnh_jax.train import selection

SEEDS = (0, 1, 2)


def _run(method="l2-sp", source="related", seed=0, reg_weight=0.1, reg_decay=1.0, val=0.5, test=0.5, **extra):
  return {"method": method, "source": source, "seed": seed, "reg_weight": reg_weight, "reg_decay": reg_decay,
          "val_accuracy": val, "test_accuracy": test, "test_loss": 1.0, **extra}


def _runs(vals, method="l2-sp", source="related", decay=1.0, test=0.5):
  """One run per seed of each ``reg_weight: [val per seed]``."""
  return [_run(method, source, seed, weight, decay, val, test) for weight, per_seed in vals.items()
          for seed, val in zip(SEEDS, per_seed)]


def _picked(records):
  return sorted({(r["method"], r["source"], r["reg_weight"], r["reg_decay"]) for r in records if r["selected"]})


def test_the_pick_is_the_arg_max_of_mean_validation_accuracy():
  rng = np.random.default_rng(0)
  weights, decays = (0.0, 0.01, 0.1, 1.0), (0.5, 1.0)
  vals = rng.uniform(0.4, 0.9, size=(len(weights), len(decays), len(SEEDS)))
  records = [_run(seed=s, reg_weight=w, reg_decay=d, val=float(vals[i, j, k]))
             for (i, w), (j, d), (k, s) in itertools.product(enumerate(weights), enumerate(decays), enumerate(SEEDS))]
  i, j = np.unravel_index(np.argmax(vals.mean(axis=2)), vals.shape[:2])
  assert _picked(selection.select(records)) == [("l2-sp", "related", weights[i], decays[j])]


def test_the_pick_is_by_the_mean_not_by_the_best_single_seed():
  records = _runs({0.01: [0.95, 0.50, 0.50], 0.1: [0.70, 0.70, 0.70]})
  assert _picked(selection.select(records)) == [("l2-sp", "related", 0.1, 1.0)]


def test_every_run_of_the_pick_is_marked_and_no_other():
  records = _runs({0.01: [0.6, 0.6, 0.6], 0.1: [0.7, 0.7, 0.7]})
  marked = selection.select(records)
  assert [r["selected"] for r in marked] == [r["reg_weight"] == 0.1 for r in records]


def test_select_returns_copies_and_leaves_the_records_as_they_were():
  records = _runs({0.01: [0.6, 0.6, 0.6]})
  before = [dict(r) for r in records]
  marked = selection.select(records)
  assert records == before and all(m is not r for m, r in zip(marked, records))


def test_a_tie_goes_to_the_smaller_reg_weight():
  records = _runs({1.0: [0.7, 0.7, 0.7], 0.1: [0.7, 0.7, 0.7], 0.01: [0.6, 0.6, 0.6]})
  assert _picked(selection.select(records)) == [("l2-sp", "related", 0.1, 1.0)]


def test_a_tie_at_the_same_reg_weight_goes_to_the_smaller_decay():
  records = _runs({0.1: [0.7, 0.7, 0.7]}, decay=1.0) + _runs({0.1: [0.7, 0.7, 0.7]}, decay=0.5)
  assert _picked(selection.select(records)) == [("l2-sp", "related", 0.1, 0.5)]


def test_a_tie_is_found_whatever_the_order_of_the_seeds_values():
  # the same values over the seeds in another order: equal means, though a float sum in order may differ
  records = _runs({1.0: [0.1, 0.2, 0.3], 0.1: [0.3, 0.2, 0.1]})
  assert (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1  # the trap: summed in order they differ
  assert _picked(selection.select(records)) == [("l2-sp", "related", 0.1, 1.0)]


def test_the_pick_does_not_depend_on_the_order_of_the_records():
  rng = np.random.default_rng(1)
  records = [_run(seed=s, reg_weight=w, reg_decay=d, val=float(rng.choice([0.5, 0.6, 0.7])))
             for w, d, s in itertools.product((0.0, 0.1, 1.0), (0.5, 1.0), SEEDS)]
  shuffled = records[:]
  random.Random(0).shuffle(shuffled)
  assert _picked(selection.select(records)) == _picked(selection.select(shuffled))


def test_test_accuracy_does_not_change_the_pick():
  records = _runs({0.01: [0.6, 0.6, 0.6], 0.1: [0.7, 0.7, 0.7]})
  flipped = [{**r, "test_accuracy": 1.0 - r["val_accuracy"]} for r in records]
  assert _picked(selection.select(records)) == _picked(selection.select(flipped))


class _Sealed(Mapping):
  """A run record whose test fields raise when read while ``opened["now"]`` is false."""

  def __init__(self, record, opened):
    self._record, self._opened = record, opened

  def __getitem__(self, key):
    if key.startswith("test") and not self._opened["now"]:
      raise AssertionError(f"{key} read before the choice was made")
    return self._record[key]

  def __iter__(self):
    return iter(self._record)

  def __len__(self):
    return len(self._record)


def test_choose_never_reads_a_test_field_even_of_full_records():
  sealed = [_Sealed(r, {"now": False}) for r in _runs({0.01: [0.6, 0.6, 0.6], 0.1: [0.7, 0.7, 0.7]})]
  assert selection.choose(sealed) == {("l2-sp", "related"): (0.1, 1.0)}


def test_select_reads_the_test_fields_only_after_the_choice(monkeypatch):
  opened = {"now": False}
  choose = selection.choose

  def choose_then_open(*args, **kwargs):
    chosen = choose(*args, **kwargs)
    opened["now"] = True
    return chosen

  monkeypatch.setattr(selection, "choose", choose_then_open)
  sealed = [_Sealed(r, opened) for r in _runs({0.01: [0.6, 0.6, 0.6], 0.1: [0.7, 0.7, 0.7]}, test=0.25)]
  marked = selection.select(sealed)
  assert opened["now"] and [r["test_accuracy"] for r in marked] == [0.25] * 6  # copied in full afterwards


def test_the_validation_view_holds_no_test_field():
  view = selection.validation_view(_run(dataset="digits"))
  assert not [key for key in view if key.startswith("test")] and view["val_accuracy"] == 0.5


def test_a_combination_missing_a_seed_is_not_eligible_and_is_warned_about():
  records = _runs({0.01: [0.6, 0.6, 0.6]}) + _runs({0.1: [0.9, 0.9, 0.9]})[:2]
  with pytest.warns(RuntimeWarning, match="reg_weight=0.1"):
    marked = selection.select(records)
  assert _picked(marked) == [("l2-sp", "related", 0.01, 1.0)]


def test_a_group_without_a_complete_combination_has_no_pick():
  records = _runs({0.01: [0.6, 0.6, 0.6]}) + _runs({0.1: [0.9, 0.9, 0.9]}, method="dtnh-l2-sp")[:2]
  with pytest.warns(RuntimeWarning, match="nothing is selected there"):
    marked = selection.select(records)
  assert not any(r["selected"] for r in marked if r["method"] == "dtnh-l2-sp")


def test_given_seeds_are_the_only_ones_selected_on_and_marked():
  records = _runs({0.01: [0.6, 0.6, 0.95]}) + _runs({0.1: [0.9, 0.9, 0.9]})[:2]
  marked = selection.select(records, seeds=(0, 1))
  assert [(r["reg_weight"], r["seed"]) for r in marked if r["selected"]] == [(0.1, 0), (0.1, 1)]


def test_a_non_finite_validation_accuracy_makes_a_combination_ineligible():
  records = _runs({0.01: [0.6, 0.6, 0.6], 0.1: [0.9, float("nan"), 0.9]})
  with pytest.warns(RuntimeWarning, match="non-finite"):
    assert _picked(selection.select(records)) == [("l2-sp", "related", 0.01, 1.0)]


def test_two_runs_of_one_combination_and_seed_are_refused():
  records = _runs({0.01: [0.6, 0.6, 0.6]})
  with pytest.raises(ValueError, match="two runs"):
    selection.select(records + records[:1])


def test_one_group_on_two_datasets_is_refused():
  records = [{**r, "dataset": "a" if r["seed"] else "b"} for r in _runs({0.01: [0.6, 0.6, 0.6]})]
  with pytest.raises(ValueError, match="several datasets"):
    selection.select(records)


def test_each_method_and_source_is_chosen_apart():
  records = (_runs({0.01: [0.6] * 3, 0.1: [0.7] * 3}) + _runs({0.01: [0.8] * 3, 0.1: [0.7] * 3}, method="dtnh-l2-sp")
             + _runs({0.01: [0.9] * 3, 0.1: [0.7] * 3}, source="unrelated"))
  assert _picked(selection.select(records)) == [("dtnh-l2-sp", "related", 0.01, 1.0),
                                                ("l2-sp", "related", 0.1, 1.0), ("l2-sp", "unrelated", 0.01, 1.0)]


def test_a_record_without_a_validation_accuracy_is_refused_by_name():
  record = _run()
  del record["val_accuracy"]
  with pytest.raises(ValueError, match="val_accuracy"):
    selection.select([record])


def test_the_summary_holds_the_pick_and_its_numpy_means_and_stds():
  records = _runs({0.01: [0.6, 0.62, 0.64], 0.1: [0.7, 0.72, 0.77], 0.3: [0.1, 0.1, 0.1]})
  tests = {0.01: (0.9, 0.9, 0.9), 0.1: (0.55, 0.65, 0.8), 0.3: (0.5, 0.6, 0.9)}
  records = [{**r, "test_accuracy": tests[r["reg_weight"]][r["seed"]]} for r in records]
  row, = selection.summary(records)
  assert (row["method"], row["source"], row["reg_weight"], row["reg_decay"], row["n_seeds"], row["combinations"]) == (
      "l2-sp", "related", 0.1, 1.0, 3, 3)
  np.testing.assert_allclose([row["val_mean"], row["val_std"], row["test_mean"], row["test_std"]],
                             [np.mean([0.7, 0.72, 0.77]), np.std([0.7, 0.72, 0.77]),
                              np.mean([0.55, 0.65, 0.8]), np.std([0.55, 0.65, 0.8])])


def test_the_summary_uses_a_marking_already_made():
  records = _runs({0.01: [0.6] * 3, 0.1: [0.7] * 3})
  marked = [{**r, "selected": r["reg_weight"] == 0.01} for r in records]  # not the rule's pick: kept as given
  assert selection.summary(marked)[0]["reg_weight"] == 0.01


def test_method_names_give_the_plain_method_and_the_scratch_reference():
  assert (selection.plain_method("dtnh-l2-sp"), selection.plain_method("l2-sp")) == ("l2-sp", None)
  assert selection.is_scratch("fine-tune", "scratch") and selection.is_scratch("scratch", "related")
  assert not selection.is_scratch("fine-tune", "related")
