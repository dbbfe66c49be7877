"""The real-source studies' tables re-derived from their committed records alone (``benchmarks/study_records.py``).

Every ``benchmarks/records/NAME.jsonl`` has its tables in ``NAME.md`` beside it."""

import glob
import os

import numpy as np
import pytest
from helpers import benchmark_module, committed_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "records", "*.jsonl")))


@pytest.fixture(scope="module")
def study_records():
  return benchmark_module("study_records")


def test_there_are_committed_records():
  assert RECORDS


@pytest.mark.parametrize("records_file", RECORDS, ids=os.path.basename)
def test_the_committed_tables_are_re_derived_byte_for_byte_from_the_committed_records(study_records, records_file):
  assert study_records.tables(study_records.read_records(records_file)) == committed_table(records_file)


@pytest.mark.parametrize("records_file", RECORDS, ids=os.path.basename)
def test_every_committed_record_holds_a_whole_run(study_records, records_file):
  records = study_records.read_records(records_file)
  fields = {"method", "label", "projection", "source", "dataset", "seed", "steps", "test_accuracy", "val_accuracy",
            "reg_weight", "reg_decay", "split", "provenance", "run", "grid", "settings"}
  assert records and all(fields <= set(record) for record in records)
  assert len({(r["grid"], r["run"]) for r in records}) == len(records)  # one row per run


def _synthetic():
  """Fine-tuning, L2-SP at λ 0 and 1, DTNH(L2-SP) and the ema candidate, 3 seeds; L2-SP picked at λ 1."""
  records = []
  for seed, base in enumerate((0.80, 0.82, 0.81)):
    split = {"val_sha256": f"split{seed}"}
    common = {"source": "imagenet", "dataset": "d", "seed": seed, "reg_decay": 1.0, "split": split}
    records.append({**common, "method": "fine-tune", "projection": None, "reg_weight": 1.0, "val_accuracy": 0.5,
                    "test_accuracy": base})
    for method, projection, gain in (("l2-sp", None, 0.03 + 0.01 * seed), ("dtnh-l2-sp", "conflict", 0.02),
                                     ("dtnh-l2-sp", "ema", 0.01)):
      for weight, val in ((0.0, 0.5), (1.0, 0.6)):
        records.append({**common, "method": method, "projection": projection, "reg_weight": weight,
                        "val_accuracy": val, "test_accuracy": base + (gain if weight else 0.0)})
  return records


def _cells(text, comparison):
  line = next(line for line in text.splitlines() if f"| {comparison} |" in line)
  return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_tuned_difference_is_the_hand_computed_paired_interval(study_records):
  text = study_records.tables(_synthetic())
  d = 100 * np.array([0.03, 0.04, 0.05])
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
  expected = f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}]"
  assert _cells(text, "tuned L2-SP − fine-tuning")[3] == expected
  assert _cells(text, "tuned ema(L2-SP) − tuned DTNH(L2-SP)")[3].startswith("-1.00")


def test_the_worst_gap_over_positive_lambda_is_the_lowest_mean(study_records):
  records = [r for r in _synthetic() if r["reg_weight"] != 0.0 or r["method"] == "fine-tune"]
  records += [{**r, "reg_weight": 10.0, "val_accuracy": 0.4, "test_accuracy": r["test_accuracy"] - 0.1}
              for r in records if r["method"] == "l2-sp"]
  worst = study_records.tables(records).split("### Worst gap")[1]
  row = next(line for line in worst.splitlines() if "| L2-SP |" in line)
  assert "| 10 | -6.00 [" in row  # 4 points above fine-tuning at λ 1, 10 below that at λ 10


def test_fine_tuning_stands_at_lambda_zero_where_a_method_has_no_run_there(study_records):
  records = [r for r in _synthetic() if r["reg_weight"] != 0.0 or r["method"] == "fine-tune"]
  for r in records:  # validation now prefers λ 0: the pick falls on fine-tuning's runs
    if r["method"] != "fine-tune":
      r["val_accuracy"] = 0.4
  text = study_records.tables(records)
  picks = text.split("### Tuned")[0]
  assert "| d | imagenet | L2-SP | λ 0 | 50.00 ± 0.00 | 81.00 ± 1.00 | 3 |" in picks
  assert "| λ 0 | λ 1 |" in text


def test_each_pre_training_of_a_source_is_picked_on_its_own_and_summarized_across_them(study_records):
  records = []
  for pretraining, shift in enumerate((0.0, 0.02, -0.01)):   # L2-SP's gain differs between pre-trainings
    for r in _synthetic():
      if r["projection"] in (None, "conflict"):
        gain = shift if r["method"] == "l2-sp" and r["reg_weight"] else 0.0
        records.append({**r, "source": "unrelated", "pretrain_seed": pretraining,
                        "test_accuracy": r["test_accuracy"] + gain})
  text = study_records.tables(records)
  assert "| d | unrelated (pre-training 2) | L2-SP | λ 1 |" in text           # each pre-training its own pick
  across = text.split("### Across pre-trainings")[1]
  row = _cells(across, "tuned L2-SP − fine-tuning")
  means = 100 * (0.04 + np.array([0.0, 0.02, -0.01]))                      # mean over seeds, per pre-training
  half = 4.302652729911275 * means.std(ddof=1) / np.sqrt(3)
  assert row[3] == "0: +4.00, 1: +6.00, 2: +3.00"
  assert row[4] == f"{means.mean():+.2f} [{means.mean() - half:+.2f}, {means.mean() + half:+.2f}]"


def test_a_source_pre_trained_once_keeps_its_name_and_has_no_across_table(study_records):
  text = study_records.tables([{**r, "pretrain_seed": 0} for r in _synthetic()])
  assert "Across pre-trainings" not in text and "(pre-training" not in text


def test_runs_at_several_learning_rates_are_a_source_each_picked_on_its_own(study_records):
  records = []
  for rate, gain in ((0.01, 0.0), (0.02, 0.05)):   # fine-tuning gains 5 points at the larger learning rate
    for r in _synthetic():
      if r["projection"] in (None, "conflict"):
        records.append({**r, "settings": {"learning_rate": rate}, "test_accuracy": r["test_accuracy"] + gain})
  text = study_records.tables(records)
  assert "| d | imagenet (lr 0.01) | Fine-tuning | – | 50.00 ± 0.00 | 81.00 ± 1.00 | 3 |" in text
  assert "| d | imagenet (lr 0.02) | Fine-tuning | – | 50.00 ± 0.00 | 86.00 ± 1.00 | 3 |" in text
  assert "| d | imagenet (lr 0.02) | L2-SP | λ 1 |" in text and "Across pre-trainings" not in text


def test_the_learning_rate_is_picked_on_validation_for_every_method_alike(study_records):
  records = []
  for rate, gain, validation in ((0.01, 0.0, 0.5), (0.02, 0.05, 0.55)):   # fine-tuning: better at 0.02 on both
    for r in _synthetic():
      if r["projection"] in (None, "conflict"):
        shifted = {"test_accuracy": r["test_accuracy"] + gain}
        if r["method"] == "fine-tune":
          shifted["val_accuracy"] = validation
        records.append({**r, "settings": {"learning_rate": rate}, **shifted})
  section = study_records.tables(records).split("### Learning rate picked on validation too")[1]
  assert "| d | imagenet | Fine-tuning | lr 0.02 | 55.00 ± 0.00 | 86.00 ± 1.00 | 3 |" in section
  assert "| d | imagenet | L2-SP | λ 1, lr 0.01 |" in section   # a tie on validation: the smaller learning rate
  # L2-SP at 0.01 (fine-tuning's test + 3, 4, 5 points) against fine-tuning at 0.02 (+5 points)
  assert _cells(section, "tuned L2-SP − fine-tuning")[3].startswith("-1.00 [")


def test_from_scratch_at_one_learning_rate_is_shown_at_that_rate(study_records):
  """From scratch ran at the middle rate only: it is not labelled with the smallest rate of its source's runs."""
  records = []
  for rate in (0.005, 0.01, 0.02):
    records += [{**r, "settings": {"learning_rate": rate}} for r in _synthetic() if r["projection"] is None]
  records += [{**r, "method": "scratch", "source": "scratch", "settings": {"learning_rate": 0.01},
               "test_accuracy": 0.7} for r in _synthetic() if r["method"] == "fine-tune"]
  section = study_records.tables(records).split("### Learning rate picked on validation too")[1]
  assert "| d | imagenet | From scratch | lr 0.01 | 50.00 ± 0.00 | 70.00 ± 0.00 | 3 |" in section
