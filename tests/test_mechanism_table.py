"""The mechanism test's table (``benchmarks/mechanism_table.py``): its arithmetic on runs made up here, and the
committed table re-derived from the committed records, byte for byte."""

import os

import numpy as np
import pytest
from helpers import benchmark_module, committed_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "benchmarks", "records", "mechanism", "mechanism.jsonl")


@pytest.fixture(scope="module")
def mechanism_table():
  return benchmark_module("mechanism_table")


def _runs(batch, accuracies):
  """One grid: method -> test accuracy per seed."""
  return [{"method": method, "dataset": "d", "source": "s", "seed": seed, "test_accuracy": value,
           "split": {"val_sha256": f"split{seed}"}, "settings": {"batch_size": batch, "momentum": 0.9}}
          for method, values in accuracies.items() for seed, value in enumerate(values)]


def test_the_share_of_the_gap_closed_is_the_mean_gain_over_the_mean_gap(mechanism_table):
  fine_tune, l2_sp, dtnh = {0: 0.9, 1: 0.92}, {0: 0.8, 1: 0.8}, {0: 0.85, 1: 0.83}
  # gap 0.11 on average, DTNH gains 0.04 of it
  assert mechanism_table.share_closed(fine_tune, l2_sp, dtnh) == pytest.approx(0.04 / 0.11)
  assert mechanism_table.share_closed(l2_sp, fine_tune, dtnh) is None  # no gap to close


def test_each_condition_is_a_row_with_its_paired_differences(mechanism_table):
  records = (_runs(48, {"fine-tune": [0.9, 0.92, 0.91], "l2-sp": [0.8, 0.81, 0.8], "dtnh-l2-sp": [0.81, 0.82, 0.8]})
             + _runs(300, {"fine-tune": [0.9, 0.92, 0.91], "l2-sp": [0.8, 0.81, 0.8],
                           "dtnh-l2-sp": [0.88, 0.9, 0.89]}))
  rows = [line for line in mechanism_table.table(records).splitlines() if line.startswith("| d |")]
  assert [row.split("|")[3].strip() for row in rows] == ["48", "300"]
  cells = [cell.strip() for cell in rows[1].strip("|").split("|")]
  d = 100 * (np.array([0.88, 0.9, 0.89]) - np.array([0.8, 0.81, 0.8]))
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # Student's t, 97.5%, 2 degrees of freedom
  assert cells[9] == f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] *"
  assert cells[10] == f"{100 * d.mean() / (100 * (0.91 - 0.80333333333333)):.0f}%"


def test_the_committed_table_is_re_derived_byte_for_byte_from_the_committed_records(mechanism_table):
  assert mechanism_table.table(mechanism_table.read_records(RECORDS)) == committed_table(RECORDS)
