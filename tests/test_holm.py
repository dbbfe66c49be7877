"""Holm's adjustment of a table's paired tests (``stats.holm``, ``stats.with_holm``) and the tuned table's column."""

import math

import pytest

from dtnh_jax.train import report, selection, stats


def test_holm_matches_the_hand_computed_step_down():
  # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06: monotone)
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_caps_at_one_and_leaves_a_missing_test_out_of_the_family():
  adjusted = stats.holm([0.4, math.nan, 0.3])
  assert adjusted[0] == pytest.approx(0.6) and adjusted[2] == pytest.approx(0.6) and math.isnan(adjusted[1])
  assert stats.holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])


def test_with_holm_marks_what_survives_the_family():
  rows = [{"p_value": p, "confidence": 0.95} for p in (0.01, 0.04, 0.03, 0.005)]
  marked = stats.with_holm(rows)
  assert [row["holm_excludes_zero"] for row in marked] == [True, False, False, True]
  assert [row["p_value"] for row in marked] == [0.01, 0.04, 0.03, 0.005]  # the raw ones kept beside


def _records():
  records = []
  for seed, (x, dtnh) in enumerate([(0.60, 0.70), (0.61, 0.72), (0.62, 0.71)]):
    for method, test in (("l2-sp", x), ("dtnh-l2-sp", dtnh), ("fine-tune", 0.6)):
      records.append({"method": method, "label": method, "source": "related", "dataset": "digits", "seed": seed,
                      "reg_weight": 1.0, "reg_decay": 1.0, "val_accuracy": 0.5, "test_accuracy": test})
  return records


def test_the_tuned_table_prints_the_holm_p_value_beside_the_raw_interval():
  records = _records()
  pairs = stats.dtnh_pairs(records)
  table = report.tuned_table(selection.summary(records), pairs)
  row = next(line for line in table.splitlines() if "| l2-sp |" in line)
  cells = [cell.strip() for cell in row.strip("|").split("|")]
  assert cells[5].endswith("*") and cells[6] == f"{stats.holm([pairs[0]['p_value']])[0]:.3f} †"
  assert "Holm" in table and "ddof=1" in table
