"""A grid's Figures 3-5: drawn where DTNH changes the outcome, with the numbers that test something.

Here from made-up runs; drawn by a real sweep of the command line: tests/test_train.py
(``test_cli_sweep_picks_the_best_mean_validation_accuracy_and_draws_the_lambda_curve_and_figures``).
"""

import json
import os

import pytest

pytest.importorskip("matplotlib")

from dtnh_jax.train import Method, grid, metrics, report  # pylint: disable=wrong-import-position


def _record(method, source, seed, val, test, weight=0.1, decay=1.0, **extra):
  return {"method": method, "label": Method.parse(method).label, "source": source, "dataset": "offline-digits",
          "seed": seed, "val_accuracy": val, "test_accuracy": test, "reg_weight": weight, "reg_decay": decay,
          **extra}


def _pairs(rows):
  """Records of (method, source, [val per seed], [test per seed])."""
  return [_record(method, source, seed, val, test) for method, source, vals, tests in rows
          for seed, (val, test) in enumerate(zip(vals, tests))]


def test_the_pair_drawn_is_the_one_dtnh_changes_most_on_validation_not_on_test():
  records = _pairs([
      ("fine-tune", "related", [0.9, 0.9], [0.9, 0.9]),
      ("l2-sp", "related", [0.80, 0.82], [0.70, 0.70]),
      ("dtnh-l2-sp", "related", [0.81, 0.83], [0.90, 0.90]),  # test +20 points, validation +1
      ("knowdist", "unrelated", [0.60, 0.62], [0.80, 0.80]),
      ("dtnh-knowdist", "unrelated", [0.70, 0.70], [0.81, 0.81]),  # validation +9 points
      ("knowdist", "related", [0.70, 0.70], [0.70, 0.70]),  # no DTNH run from this source: no pair
  ])
  pair = grid._figure_pair(records)  # pylint: disable=protected-access
  assert (pair["regularizer"], pair["source"], pair["field"]) == ("knowdist", "unrelated", "val_accuracy")
  assert pair["difference"] == pytest.approx(0.09)
  assert {(c["regularizer"], c["source"]) for c in pair["candidates"]} == {("l2-sp", "related"),
                                                                          ("knowdist", "unrelated")}


def test_without_validation_the_pair_is_chosen_on_test_and_only_picks_count():
  records = _pairs([("l2-sp", "related", [None], [0.70]), ("dtnh-l2-sp", "related", [None], [0.75]),
                    ("knowdist", "related", [None], [0.70]), ("dtnh-knowdist", "related", [None], [0.72])])
  pair = grid._figure_pair(records)  # pylint: disable=protected-access
  assert (pair["regularizer"], pair["field"]) == ("l2-sp", "test_accuracy")
  # in a sweep only the records at each method's pick are compared
  swept = [{**r, "selected": r["method"] != "dtnh-l2-sp"} for r in records]
  swept += [{**_record("dtnh-l2-sp", "related", 0, None, 0.69, weight=1.0), "selected": True}]
  assert grid._figure_pair(swept)["regularizer"] == "knowdist"  # pylint: disable=protected-access
  assert grid._figure_pair(_pairs([("l2-sp", "related", [0.5], [0.5])])) is None  # pylint: disable=protected-access


def _train(step, **values):
  return {"step": step, "kind": "train", "loss_empirical": 1.0 / step, **values}


# DTNH logs its angles at every step; the plain run on its logging steps (2 and 4) only
DTNH_RUN = [_train(1, angle1=10, angle2=80, angle3=30, angle4=100, conflict=1.0),
            _train(2, angle1=20, angle2=95, angle3=40, angle4=110, conflict=1.0),
            _train(3, angle1=30, angle2=100, angle3=50, angle4=120, conflict=0.0),
            _train(4, angle1=40, angle2=120, angle3=60, angle4=130, conflict=1.0),
            {"step": 4, "kind": "eval", "test_loss": 0.5, "test_accuracy": 0.8}]
PLAIN_RUN = [_train(1), _train(2, angle1=35, angle2=105, angle3=35, angle4=105, conflict=1.0), _train(3),
             _train(4, angle1=45, angle2=115, angle3=45, angle4=115, conflict=0.0),
             {"step": 4, "kind": "eval", "test_loss": 0.6, "test_accuracy": 0.7}]


@pytest.fixture
def captions(monkeypatch):
  """The captions of the figures :func:`report._finish` is given."""
  found = []
  finish = report._finish  # pylint: disable=protected-access

  def keep(plt, fig, path, title):
    found.append(fig._supxlabel.get_text() if fig._supxlabel else "")  # pylint: disable=protected-access
    finish(plt, fig, path, title)

  monkeypatch.setattr(report, "_finish", keep)
  return found


def test_plot_angles_with_the_plain_run_writes_the_figure_and_its_numbers(tmp_path, captions):
  path = tmp_path / "angles.png"
  summary = report.plot_angles(DTNH_RUN, str(path), "t", plain=PLAIN_RUN, labels=("DTNH (L2-SP)", "L2-SP"))
  assert path.stat().st_size > 0
  assert summary == pytest.approx({
      "angle_steps": 4, "angle2_obtuse_share": 0.75, "angle1_mean": 25.0, "angle2_mean": 98.75, "angle3_mean": 45.0,
      "angle4_mean": 115.0, "conflict_share": 0.75, "plain_angle_steps": 2, "plain_angle3_mean": 40.0,
      "plain_angle4_mean": 110.0})
  caption, = captions
  assert "Angle 2 > 90° on 75% of the 4 logged steps of DTNH (L2-SP)" in caption
  assert "conflicting steps: 75%" in caption and report.ANGLE_IDENTITY in caption


def test_plot_angles_of_one_run_still_works(tmp_path, captions):
  summary = report.plot_angles(DTNH_RUN[:2], str(tmp_path / "one.png"))
  assert summary["angle2_obtuse_share"] == 0.5 and "plain_angle3_mean" not in summary
  assert (tmp_path / "one.png").exists() and "of this run" in captions[0]


def _write_metrics(workdir, record, sweep, lines):
  """``lines`` as the metrics.jsonl of ``record``'s run, where the grid keeps it."""
  path = grid._metrics_of(str(workdir), record, sweep)  # pylint: disable=protected-access
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def test_a_sweep_draws_the_runs_at_each_methods_pick_and_says_so(tmp_path):
  picks = {"knowdist": (1.0, 0.6), "dtnh-knowdist": (0.1, 0.7)}  # method: (its pick's λ, validation accuracy)
  records = [{**_record(method, "related", seed, val if weight == pick else 0.2, 0.5, weight=weight),
              "selected": weight == pick}
             for method, (pick, val) in picks.items() for weight in (0.1, 1.0) for seed in (0, 1)]
  for r in records:  # only the picks' runs have angles to draw
    _write_metrics(tmp_path, r, True, (DTNH_RUN if r["method"].startswith("dtnh-") else PLAIN_RUN)
                   if r["selected"] else [_train(1)])
  drawn = grid.draw_figures(str(tmp_path), records, "offline-digits", sweep=True)
  for name in ("figure3_losses.png", "figure4_5_angles.png", "figures.json"):
    assert (tmp_path / name).exists(), name
  assert json.load(open(tmp_path / "figures.json")) == drawn
  assert (drawn["regularizer"], drawn["source"], drawn["seed"]) == ("knowdist", "related", 0)
  assert drawn["difference"] == pytest.approx(0.1)
  assert [run["metrics"] for run in drawn["runs"]] == [f"related/knowdist/lambda1_decay1/seed0/{metrics.FILE}",
                                                       f"related/dtnh-knowdist/lambda0.1_decay1/seed0/{metrics.FILE}"]
  assert drawn["angles"]["angle2_obtuse_share"] == 0.75 and drawn["angles"]["plain_angle3_mean"] == 40.0
  line = grid._figures_line(drawn)  # pylint: disable=protected-access
  assert "KnowDist vs DTNH (KnowDist) from related, seed 0" in line and "+10.00 points" in line and "75%" in line


@pytest.fixture
def study_figures(monkeypatch):
  """benchmarks/study_figures.py as a module."""
  import importlib  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "path", [str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks")] + sys.path)
  return importlib.import_module("study_figures")


def _swept_grid(workdir):
  """A grid of KnowDist ± DTNH from `unrelated` at λ 0.1 and 1, two seeds, with results.json and metrics."""
  records = [_record(method, "unrelated", seed, 0.5, 0.5, weight=weight)
             for method in ("knowdist", "dtnh-knowdist") for weight in (0.1, 1.0) for seed in (0, 1)]
  for r in records:
    _write_metrics(workdir, r, True, DTNH_RUN if r["method"].startswith("dtnh-") else PLAIN_RUN)
  with open(workdir / "results.json", "w") as f:
    json.dump(records, f)
  return records


def test_study_figures_draws_the_named_pair_at_the_named_lambda(tmp_path, study_figures):
  _swept_grid(tmp_path)
  out = tmp_path / "out"
  summary = study_figures.main(["--workdir", str(tmp_path), "--method", "dtnh-knowdist", "--source", "unrelated",
                                "--reg-weight", "1", "--out", str(out)])
  assert [run["metrics"] for run in summary["runs"]] == [
      f"unrelated/knowdist/lambda1_decay1/seed0/{metrics.FILE}",
      f"unrelated/dtnh-knowdist/lambda1_decay1/seed0/{metrics.FILE}"]
  assert "at λ 1" in summary["reason"] and json.load(open(out / "figures.json")) == summary
  assert (out / "figure3_losses.png").exists() and not (tmp_path / "figures.json").exists()  # the grid's untouched


def test_study_figures_names_the_lambdas_the_grid_ran_when_asked_for_another(tmp_path, study_figures, capsys):
  _swept_grid(tmp_path)
  with pytest.raises(SystemExit):
    study_figures.main(["--workdir", str(tmp_path), "--method", "knowdist", "--source", "unrelated",
                        "--reg-weight", "10", "--out", str(tmp_path / "out")])
  error = capsys.readouterr().err
  assert "no run of knowdist from 'unrelated' at λ 10" in error and "[(0.1, 1.0), (1.0, 1.0)]" in error


def test_study_figures_refuses_to_overwrite_figures_without_force(tmp_path, study_figures, capsys):
  _swept_grid(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  (out / "figures.json").write_text("mine")
  argv = ["--workdir", str(tmp_path), "--method", "knowdist", "--source", "unrelated", "--reg-weight", "1",
          "--out", str(out)]
  with pytest.raises(SystemExit):
    study_figures.main(argv)
  assert "--force" in capsys.readouterr().err and (out / "figures.json").read_text() == "mine"
  study_figures.main(argv + ["--force"])
  assert json.load(open(out / "figures.json"))["regularizer"] == "knowdist"


def test_lambda_table_shows_every_lambda_with_the_paired_difference(monkeypatch):
  import importlib  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "path", [str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks")] + sys.path)
  lambda_table = importlib.import_module("lambda_table")
  records = [_record(method, "unrelated", seed, 0.5, test, weight=weight)
             for method, tests in (("knowdist", {0.1: (0.80, 0.82), 1.0: (0.60, 0.62)}),
                                   ("dtnh-knowdist", {0.1: (0.81, 0.83), 1.0: (0.70, 0.72)}))
             for weight, values in tests.items() for seed, test in enumerate(values)]
  table = lambda_table.lambda_table(records)
  header, _, row = table.splitlines()
  assert header == "| source | X | λ 0.1 | λ 1 |"
  # the same gain on both seeds: no spread to show, and an interval that excludes 0
  assert row == "| unrelated | KnowDist | 81.0 → 82.0, +1.00 * | 61.0 → 71.0, +10.00 * |"
