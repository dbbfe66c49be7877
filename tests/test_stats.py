"""Paired differences DTNH(X) − X: checked by hand, against scipy's paired t-test, and paired the right way."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dtnh_jax.train import stats

A = {0: 0.71, 1: 0.74, 2: 0.69, 3: 0.75, 4: 0.72}
B = {0: 0.68, 1: 0.73, 2: 0.69, 3: 0.70, 4: 0.70}
T_975_DF4 = 2.7764451051977987  # Student's t, 97.5% quantile, 4 degrees of freedom (printed tables: 2.776)


def test_the_mean_std_and_interval_are_the_hand_computed_t_interval():
  d = np.array([A[k] - B[k] for k in range(5)])
  half = T_975_DF4 * d.std(ddof=1) / math.sqrt(5)
  result = stats.paired_difference(A, B)
  np.testing.assert_allclose([result["mean"], result["std"], result["low"], result["high"]],
                             [d.mean(), d.std(ddof=1), d.mean() - half, d.mean() + half], rtol=1e-12)
  assert result["n"] == 5 and result["confidence"] == 0.95


def test_the_interval_and_p_value_are_those_of_scipy_ttest_rel():
  keys = sorted(A)
  test = scipy_stats.ttest_rel([A[k] for k in keys], [B[k] for k in keys])
  interval = test.confidence_interval(0.9)
  result = stats.paired_difference(A, B, confidence=0.9)
  np.testing.assert_allclose([result["low"], result["high"], result["p_value"]],
                             [interval.low, interval.high, test.pvalue], rtol=1e-10)


def _trials(count=300):
  """``(a, b)`` accuracies of 2-7 seeds, with true differences from none to large."""
  rng = np.random.default_rng(0)
  for trial in range(count):
    n = int(rng.integers(2, 8))
    b = rng.uniform(0.5, 0.9, n)
    yield b + rng.normal(0.01 * (trial % 5), 0.02, n), b


def test_the_interval_excludes_zero_exactly_when_ttest_rel_p_is_below_0_05():
  for a, b in _trials():
    result = stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    assert result["excludes_zero"] == (scipy_stats.ttest_rel(a, b).pvalue < 0.05)


def test_both_outcomes_occur_in_the_scipy_comparison():
  # the comparison above means something only if it saw intervals on both sides of 0
  outcomes = {stats.paired_difference(dict(enumerate(a)), dict(enumerate(b)))["excludes_zero"] for a, b in _trials()}
  assert outcomes == {True, False}


def test_pairs_are_matched_by_key_not_by_order():
  reversed_b = {k: B[k] for k in reversed(list(B))}
  assert stats.paired_difference(A, reversed_b) == stats.paired_difference(A, B)


def test_a_single_pair_has_a_mean_but_no_interval():
  result = stats.paired_difference({0: 0.8}, {0: 0.7})
  assert result["mean"] == pytest.approx(0.1) and result["n"] == 1
  assert all(math.isnan(result[k]) for k in ("std", "low", "high", "p_value")) and not result["excludes_zero"]


def test_equal_differences_give_a_point_interval():
  result = stats.paired_difference({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.25})
  assert (result["low"], result["high"], result["excludes_zero"]) == (0.25, 0.25, True)


def test_keys_on_one_side_only_are_refused():
  with pytest.raises(ValueError, match="same keys"):
    stats.paired_difference({0: 0.7, 1: 0.7}, {0: 0.7, 2: 0.7})


def test_no_pair_is_refused():
  with pytest.raises(ValueError, match="at least one pair"):
    stats.paired_difference({}, {})


def _run(method, seed, reg_weight, val, test, source="related", **extra):
  return {"method": method, "source": source, "seed": seed, "reg_weight": reg_weight, "reg_decay": 1.0,
          "val_accuracy": val, "test_accuracy": test, **extra}


def test_dtnh_pairs_compare_each_method_at_its_own_pick():
  # X's pick is λ 0.1, DTNH(X)'s is λ 0.01 (on validation); test accuracies differ per seed
  tests = {("l2-sp", 0.1): [0.70, 0.72, 0.71], ("l2-sp", 0.01): [0.99, 0.99, 0.99],
           ("dtnh-l2-sp", 0.01): [0.74, 0.73, 0.76], ("dtnh-l2-sp", 0.1): [0.10, 0.10, 0.10]}
  vals = {("l2-sp", 0.1): 0.8, ("l2-sp", 0.01): 0.6, ("dtnh-l2-sp", 0.01): 0.8, ("dtnh-l2-sp", 0.1): 0.6}
  records = [_run(m, s, w, vals[(m, w)], tests[(m, w)][s]) for (m, w) in tests for s in range(3)]
  pair, = stats.dtnh_pairs(records)
  d = np.array(tests[("dtnh-l2-sp", 0.01)]) - np.array(tests[("l2-sp", 0.1)])
  assert (pair["method"], pair["dtnh_method"], pair["reg_weight"], pair["dtnh_reg_weight"]) == (
      "l2-sp", "dtnh-l2-sp", 0.1, 0.01)
  np.testing.assert_allclose([pair["mean"], pair["std"]], [d.mean(), d.std(ddof=1)])


def test_dtnh_pairs_cover_every_method_with_a_dtnh_counterpart_and_no_other():
  methods = ("fine-tune", "l2", "dtnh-l2", "l2-sp", "knowdist", "dtnh-knowdist")
  records = [_run(m, s, 0.1, 0.7, 0.7 + 0.01 * s * ("dtnh" in m), source=source)
             for m in methods for s in range(3) for source in ("related", "unrelated")]
  assert [(p["source"], p["method"]) for p in stats.dtnh_pairs(records)] == [
      ("related", "l2"), ("unrelated", "l2"), ("related", "knowdist"), ("unrelated", "knowdist")]


def test_the_pair_key_is_the_seed_and_the_split_hash():
  assert stats.pair_key(_run("l2", 3, 0.1, 0.7, 0.7, split={"val_sha256": "ab12", "seed": 3})) == (3, "ab12")
  assert stats.pair_key(_run("l2", 3, 0.1, 0.7, 0.7)) == (3, None)


def test_runs_on_different_splits_are_not_paired():
  records = ([_run("l2", s, 0.1, 0.7, 0.7, split={"val_sha256": f"x{s}"}) for s in range(2)]
             + [_run("dtnh-l2", s, 0.1, 0.7, 0.7, split={"val_sha256": f"y{s}"}) for s in range(2)])
  with pytest.raises(ValueError, match="same keys"):
    stats.dtnh_pairs(records)


def test_lambda_pairs_compare_x_and_dtnh_x_at_the_same_lambda():
  tests = {("l2", 0.0): [0.6, 0.6], ("dtnh-l2", 0.0): [0.6, 0.6], ("l2", 0.1): [0.6, 0.7],
           ("dtnh-l2", 0.1): [0.7, 0.9], ("l2", 1.0): [0.5, 0.5]}  # DTNH(X) did not run λ 1
  records = [_run(m, s, w, 0.7, tests[(m, w)][s]) for (m, w) in tests for s in range(2)]
  rows = stats.lambda_pairs(records)
  assert [(r["reg_weight"], round(r["mean"], 12)) for r in rows] == [(0.0, 0.0), (0.1, 0.15)]


def test_dtnh_pairs_at_the_plain_pick_compare_both_at_xs_lambda():
  tests = {("l2", 0.1): [0.70, 0.72], ("l2", 0.01): [0.5, 0.5], ("dtnh-l2", 0.01): [0.9, 0.9],
           ("dtnh-l2", 0.1): [0.75, 0.80]}
  vals = {("l2", 0.1): 0.8, ("l2", 0.01): 0.6, ("dtnh-l2", 0.01): 0.8, ("dtnh-l2", 0.1): 0.6}
  records = [_run(m, s, w, vals[(m, w)], tests[(m, w)][s]) for (m, w) in tests for s in range(2)]
  pair, = stats.dtnh_pairs(records, at="plain")
  assert (pair["reg_weight"], pair["dtnh_reg_weight"]) == (0.1, 0.1) and pair["mean"] == pytest.approx(0.065)


def _reference_study():
  """Fine-tuning, scratch (under the first source) and L2-SP at two λ, 3 seeds, from two sources."""
  records = []
  for seed in range(3):
    for source, base in (("related", 0.80), ("unrelated", 0.70)):
      records.append({"method": "fine-tune", "source": source, "seed": seed, "reg_weight": 0.0, "reg_decay": 1.0,
                      "val_accuracy": base, "test_accuracy": base + 0.01 * seed})
      for weight, val, gain in ((0.1, base + 0.05, (0.02, 0.03, 0.01)), (1.0, base - 0.05, (0.5, 0.5, 0.5))):
        records.append({"method": "l2-sp", "source": source, "seed": seed, "reg_weight": weight, "reg_decay": 1.0,
                        "val_accuracy": val, "test_accuracy": base + 0.01 * seed + gain[seed]})
    records.append({"method": "scratch", "source": "related", "seed": seed, "reg_weight": 0.0, "reg_decay": 1.0,
                    "val_accuracy": 0.5, "test_accuracy": 0.5 + 0.02 * seed})
  return records


def test_reference_pairs_compare_each_method_at_its_pick_with_fine_tuning_from_its_source():
  rows = {(r["source"], r["method"]): r for r in stats.reference_pairs(_reference_study())}
  assert set(rows) == {("related", "l2-sp"), ("related", "scratch"), ("unrelated", "l2-sp"),
                       ("unrelated", "scratch")}
  for source, base in (("related", 0.80), ("unrelated", 0.70)):
    # L2-SP at its validation pick (λ 0.1: its gains), not at λ 1 (the test-best)
    test = scipy_stats.ttest_rel([base + 0.01 * s + g for s, g in enumerate((0.02, 0.03, 0.01))],
                                 [base + 0.01 * s for s in range(3)])
    row = rows[(source, "l2-sp")]
    assert row["reg_weight"] == 0.1 and row["reference"] == "fine-tune"
    np.testing.assert_allclose([row["mean"], row["p_value"]], [0.02, test.pvalue], rtol=1e-10)
    # scratch ran under the first source only: it is what each source's pre-training is worth
    scratch = [0.5 + 0.02 * s - (base + 0.01 * s) for s in range(3)]
    np.testing.assert_allclose(rows[(source, "scratch")]["mean"], np.mean(scratch), rtol=1e-12)


def test_reference_pairs_need_fine_tuning_from_the_source():
  records = [r for r in _reference_study() if not (r["method"] == "fine-tune" and r["source"] == "unrelated")]
  assert {r["source"] for r in stats.reference_pairs(records)} == {"related"}
