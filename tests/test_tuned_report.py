"""The tuned comparison's table and λ curve (``report.tuned_table``, ``report.plot_lambda_curve``)."""

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from dtnh_jax.train import report, selection, stats  # pylint: disable=wrong-import-position

LABELS = {"fine-tune": "Fine-tuning", "l2-sp": "L2-SP", "dtnh-l2-sp": "DTNH (L2-SP)", "knowdist": "KnowDist",
          "dtnh-knowdist": "DTNH (KnowDist)"}
WEIGHTS, DECAYS, SEEDS = (0.0, 0.01, 0.1, 1.0), (0.5, 1.0), (0, 1, 2)
# the validation peak of each (method, source): its pick, by construction
PEAKS = {("l2-sp", "related"): (0.1, 0.5), ("dtnh-l2-sp", "related"): (0.01, 1.0),
         ("knowdist", "related"): (1.0, 1.0), ("dtnh-knowdist", "related"): (0.1, 0.5),
         ("l2-sp", "unrelated"): (0.01, 0.5), ("dtnh-l2-sp", "unrelated"): (0.01, 0.5),
         ("knowdist", "unrelated"): (0.1, 1.0), ("dtnh-knowdist", "unrelated"): (0.1, 1.0)}
# test-accuracy offsets per seed at the pick: DTNH (L2-SP) from "related" gains clearly, the rest is noise
GAINS = {("dtnh-l2-sp", "related"): (0.05, 0.06, 0.055), ("dtnh-knowdist", "related"): (0.03, -0.02, 0.0)}


def _study():
  records = []
  for (method, source), peak in PEAKS.items():
    for weight in WEIGHTS:
      for decay in DECAYS:
        for seed in SEEDS:
          at_peak = (weight, decay) == peak
          test = 0.6 + 0.01 * seed + (GAINS.get((method, source), (0.0,) * 3)[seed] if at_peak else 0.0)
          records.append({"method": method, "label": LABELS[method], "source": source, "dataset": "digits",
                          "seed": seed, "reg_weight": weight, "reg_decay": decay,
                          "val_accuracy": 0.7 if at_peak else 0.6 - 0.01 * weight, "test_accuracy": test})
  for source, level in (("related", 0.62), ("unrelated", 0.58), ("scratch", 0.3)):
    records += [{"method": "fine-tune", "label": "Fine-tuning", "source": source, "dataset": "digits", "seed": seed,
                 "reg_weight": 0.0, "reg_decay": 1.0, "val_accuracy": level, "test_accuracy": level + 0.01 * seed}
                for seed in SEEDS]
  return records


def _table():
  records = _study()
  return report.tuned_table(selection.summary(records), stats.dtnh_pairs(records))


def _row(table, source, method_label):
  rows = [line for line in table.splitlines() if line.startswith(f"| {source} |") and f"| {method_label} |" in line]
  assert len(rows) == 1, (source, method_label, rows)
  return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_the_tuned_table_shows_each_methods_own_chosen_lambda_and_decay():
  table = _table()
  for (method, source), (weight, decay) in PEAKS.items():
    plain = selection.plain_method(method)
    cells = _row(table, source, LABELS[plain or method])
    assert f"(λ {weight:g}, decay {decay:g})" in cells[4 if plain else 3]


def test_a_delta_is_marked_exactly_when_its_interval_excludes_zero():
  table = _table()
  for pair in stats.dtnh_pairs(_study()):
    delta = _row(table, pair["source"], LABELS[pair["method"]])[5]
    assert delta.endswith("*") == pair["excludes_zero"]
  assert _row(table, "related", "L2-SP")[5].endswith("*")  # the clear gain of the study is one of them
  assert not _row(table, "related", "KnowDist")[5].endswith("*")


def test_the_delta_is_the_mean_paired_difference_in_points_with_its_interval():
  delta = _row(_table(), "related", "L2-SP")[5]
  d = 100 * np.array(GAINS[("dtnh-l2-sp", "related")])  # the same seed's base cancels in the pair
  half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)  # Student's t, 97.5%, 2 degrees of freedom
  assert delta == f"{d.mean():+.2f} [{d.mean() - half:+.2f}, {d.mean() + half:+.2f}] *"


def test_each_source_has_the_fine_tuning_and_from_scratch_references():
  table = _table()
  for source, fine_tune in (("related", "63.00 ± 1.00"), ("unrelated", "59.00 ± 1.00")):  # sample sd (ddof=1)
    assert _row(table, source, "Fine-tuning (reference)")[3] == fine_tune
    assert _row(table, source, "From scratch (reference)")[3] == "31.00 ± 1.00"


def test_the_tuned_table_says_the_choice_was_made_on_validation():
  assert re.search(r"chosen on validation", _table())


@pytest.fixture
def drawn(monkeypatch):
  """The figures :func:`report._finish` is given, kept for a look."""
  figures = []
  finish = report._finish  # pylint: disable=protected-access

  def keep(plt, fig, path, title):
    figures.append(fig)
    finish(plt, fig, path, title)

  monkeypatch.setattr(report, "_finish", keep)
  return figures


def test_the_lambda_curve_is_written_as_a_png(tmp_path):
  path = tmp_path / "lambda.png"
  report.plot_lambda_curve(_study(), str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_lambda_curve_has_one_panel_per_regularizer_and_source(tmp_path, drawn):
  panels = report.plot_lambda_curve(_study(), str(tmp_path / "lambda.png"))
  expected = [(x, s) for x in ("l2-sp", "knowdist") for s in ("related", "unrelated")]
  visible = [ax.get_title() for ax in drawn[0].axes if ax.get_visible()]
  assert panels == expected and visible == [f"{LABELS[x]}: {s} → digits" for x, s in expected]


def test_lambda_zero_sits_a_decade_left_of_the_smallest_lambda_with_a_zero_tick(tmp_path, drawn):
  report.plot_lambda_curve(_study(), str(tmp_path / "lambda.png"))
  ax = drawn[0].axes[0]
  ticks = dict(zip([t.get_text() for t in ax.get_xticklabels()], ax.get_xticks()))
  assert ax.get_xscale() == "log" and ticks["0"] == pytest.approx(min(w for w in WEIGHTS if w > 0) / 10)


def test_the_lambda_curve_draws_both_methods_and_both_references_on_both_splits(tmp_path, drawn):
  report.plot_lambda_curve(_study(), str(tmp_path / "lambda.png"))
  labels = {line.get_label() for line in drawn[0].axes[0].get_lines()}
  assert {f"{name} ({split})" for name in ("L2-SP", "DTNH (L2-SP)", "fine-tuning", "from scratch")
          for split in ("validation", "test")} <= labels


def test_a_lambda_curve_without_a_regularized_run_is_refused(tmp_path):
  fine_tune = [r for r in _study() if r["method"] == "fine-tune"]
  with pytest.raises(ValueError, match="λ curve"):
    report.plot_lambda_curve(fine_tune, str(tmp_path / "lambda.png"))


def _line(figure, label):
  line, = [line for line in figure.axes[0].get_lines() if line.get_label() == label]
  return line.get_xdata(), line.get_ydata()


def test_by_default_each_lambda_is_drawn_at_its_best_decay_on_validation(tmp_path, drawn):
  report.plot_lambda_curve(_study(), str(tmp_path / "lambda.png"))
  weights, val = _line(drawn[0], "L2-SP (validation)")
  # L2-SP from "related" peaks at (0.1, 0.5); elsewhere both decays give 60 - λ (%), by construction
  np.testing.assert_allclose(weights, [0.01, 0.1, 1.0])
  np.testing.assert_allclose(val, [59.99, 70.0, 59.0])


def test_a_given_decay_draws_only_its_runs(tmp_path, drawn):
  report.plot_lambda_curve(_study(), str(tmp_path / "lambda.png"), decay=1.0)
  _, val = _line(drawn[0], "L2-SP (validation)")
  np.testing.assert_allclose(val, [59.99, 59.9, 59.0])


def test_one_seed_gives_a_delta_without_an_interval():
  records = [r for r in _study() if r["seed"] == 0]
  table = report.tuned_table(selection.summary(records), stats.dtnh_pairs(records))
  assert _row(table, "related", "L2-SP")[5] == "+5.00 (n=1: no interval)"


def test_the_reference_table_gives_each_tuned_method_minus_fine_tuning_with_its_interval_and_holm_p():
  pairs = stats.reference_pairs(_study())
  table = report.reference_table(pairs)
  adjusted = {(p["source"], p["method"]): p for p in stats.with_holm(pairs)}
  pair = adjusted[("related", "dtnh-l2-sp")]
  cells = [c.strip() for c in next(line for line in table.splitlines()
                                   if line.startswith("| related | dtnh-l2-sp |")).strip("|").split("|")]
  mark = " *" if pair["excludes_zero"] else ""
  assert cells[2] == f"{100 * pair['mean']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]{mark}"
  assert cells[3].startswith(f"{pair['p_holm']:.3f}")
  assert "minus fine-tuning from the same source" in table and "chosen on validation" in table


def test_no_fine_tuning_runs_give_no_reference_table():
  assert report.reference_table(stats.reference_pairs([r for r in _study() if r["method"] != "fine-tune"])) == ""
