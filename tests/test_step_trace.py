"""DTNH's per-step trace (``benchmarks/step_trace.py``): its arithmetic on steps made up here, collecting a run's
logged steps, and the committed table re-derived from the committed trace, byte for byte."""

import glob
import json
import os

import pytest
from helpers import benchmark_module, committed_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "records", "trace", "*.jsonl")))


@pytest.fixture(scope="module")
def step_trace():
  return benchmark_module("step_trace")


def test_the_scale_on_g_is_one_minus_lambda_times_the_conflicting_inner_product_over_g_squared(step_trace):
  # λ 0.5, <g, r> = -6, |g| = 2: 1 + 0.5 * 6 / 4
  assert step_trace.scale_on_g({"reg_weight": 0.5, "inner_product": -6.0, "empirical_norm": 2.0}) == 1.75
  assert step_trace.scale_on_g({"reg_weight": 0.5, "inner_product": 6.0, "empirical_norm": 2.0}) == 1.0
  assert step_trace.scale_on_g({"reg_weight": 0.5, "loss_empirical": 1.0}) is None  # a plain run's step


def test_a_run_summary_finds_the_lowest_loss_and_the_largest_scale_with_its_step_and_the_loss_after(step_trace):
  steps = [{"step": s, "loss_empirical": loss, "reg_weight": 1.0, "inner_product": ip, "empirical_norm": norm,
            "regularizer_norm": 3.0}
           for s, loss, ip, norm in [(1, 2.0, 1.0, 1.0), (2, 0.5, -1.0, 0.5), (3, 0.4, -0.15, 0.1), (4, 1.9, 0.0, 1.0)]]
  s = step_trace.summary(steps)
  assert (s["low"], s["low_step"], s["last"]) == (0.4, 3, 1.9)
  # scales 1, 5, 16, 1: the largest at step 3, where λ|r|/|g| = 30 and cos = -0.15 / 0.3
  assert (s["scale_max"], s["scale_max_step"], s["conflicts"], s["logged"]) == (pytest.approx(16.0), 3, 2, 4)
  assert (s["pull"], s["cosine"]) == (pytest.approx(30.0), pytest.approx(-0.5))
  assert (s["loss_there"], s["loss_next"], s["scale_median"]) == (0.4, 1.9, pytest.approx(3.0))


def test_a_plain_runs_steps_without_inner_products_give_only_its_losses(step_trace):
  s = step_trace.summary([{"step": 1, "loss_empirical": 2.0}, {"step": 2, "loss_empirical": 1.0}])
  assert s == {"low": 1.0, "low_step": 2, "last": 1.0}


def test_a_diverged_runs_non_finite_losses_are_left_out_of_its_lowest_and_last(step_trace):
  s = step_trace.summary([{"step": 1, "loss_empirical": 2.0}, {"step": 2, "loss_empirical": 1.5},
                          {"step": 3, "loss_empirical": float("nan")}])
  assert (s["low"], s["low_step"], s["last"]) == (1.5, 2, 1.5)


def _run(folder, seed=3, steps=({"step": 1, "kind": "train", "loss_empirical": 2.0},)):
  folder.mkdir(parents=True)
  (folder / "results.json").write_text(json.dumps({"method": "dtnh-knowdist", "dataset": "d", "source": "s",
                                                   "reg_weight": 0.01, "reg_decay": 0.98, "seed": seed,
                                                   "test_accuracy": 0.5}))
  (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))


def test_collect_keeps_every_logged_train_step_with_its_runs_result(step_trace, tmp_path):
  run = tmp_path / "dtnh-knowdist" / "lambda0.01" / "seed3"
  run.mkdir(parents=True)
  (run / "results.json").write_text(json.dumps({"method": "dtnh-knowdist", "dataset": "d", "source": "s",
                                                "reg_weight": 0.01, "reg_decay": 0.98, "seed": 3,
                                                "test_accuracy": 0.5}))
  (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
      {"step": 2, "kind": "train", "loss_empirical": 1.0, "inner_product": -1.0, "empirical_norm": 1.0,
       "reg_weight": 0.01, "other": 7},
      {"step": 2, "kind": "eval", "val_accuracy": 0.4},
      {"step": 1, "kind": "train", "loss_empirical": 2.0}]))
  rows = step_trace.collect(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[1] == {"grid": "dtnh-knowdist", "method": "dtnh-knowdist", "dataset": "d", "source": "s",
                     "lambda": 0.01, "reg_decay": 0.98, "seed": 3, "test_accuracy": 0.5, "diverged_at_step": None,
                     "step": 2,
                     "loss_empirical": 1.0, "inner_product": -1.0, "empirical_norm": 1.0, "reg_weight": 0.01}


def test_collect_skips_runs_set_aside_by_restart(step_trace, tmp_path):
  _run(tmp_path / "grid" / "seed3")
  _run(tmp_path / "grid" / "seed3" / "set-aside" / "1")
  assert len(step_trace.collect(str(tmp_path))) == 1


def test_two_runs_of_one_grid_method_lambda_and_seed_are_refused_naming_both(step_trace, tmp_path):
  _run(tmp_path / "grid" / "a")
  _run(tmp_path / "grid" / "b")
  with pytest.raises(ValueError, match="two runs of .* and .*; collect one of them"):
    step_trace.collect(str(tmp_path))


def test_the_command_refuses_an_out_file_in_a_missing_folder_in_one_line(step_trace, tmp_path, capsys):
  _run(tmp_path / "grid" / "seed3")
  with pytest.raises(SystemExit) as exit_info:
    step_trace.main(["collect", str(tmp_path), "--out", str(tmp_path / "missing" / "t.jsonl")])
  assert exit_info.value.code == 2
  assert "no folder for --out" in capsys.readouterr().err


def test_there_are_committed_traces():
  assert TRACES


@pytest.mark.parametrize("trace", TRACES, ids=os.path.basename)
def test_the_committed_table_is_re_derived_byte_for_byte_from_the_committed_trace(step_trace, trace):
  assert step_trace.table(step_trace.read(trace)) == committed_table(trace)
