"""Files a user keeps in --workdir: a grid replaces only what dtnh_jax wrote there, atomically; one grid's
summary never replaces another's (a later grid adds its runs, or is refused when they do not go together); a
finished grid run again keeps its training time.

One tiny grid (``finished_grid``, one run of 6 steps) serves the tests that need a real run; each copies it.
"""

import json
import os
import shutil
import threading
import time

import pytest

from dtnh_jax import cli
from dtnh_jax.train import TrainConfig, grid, report
from dtnh_jax.train import workdir as workdir_lib
from dtnh_jax.train.config import ConfigError
from helpers import FAST, run_main, train_flags


def _grid(workdir, method, **changes):
  return ["--workdir", str(workdir), "--method", method, "--seeds", "0", "--no-progress"] + train_flags(
      {**FAST, **changes})


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
  """A finished grid of one fine-tuning run: its workdir and what it printed."""
  workdir = tmp_path_factory.mktemp("grid") / "runs"
  code, out, err = run_main(cli.train_main, _grid(workdir, "fine-tune"))
  assert code == 0, err
  return workdir, out


def _copy(finished_grid, tmp_path):
  workdir = tmp_path / "runs"
  shutil.copytree(finished_grid[0], workdir)
  return workdir


def _files(directory):
  return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def _header(printed):
  return next(line for line in printed.splitlines() if line.startswith("Target "))


# --- nothing dtnh_jax did not write is replaced ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["results.md", "results.json", "provenance.json", "results.png"])
def test_a_grid_refuses_a_workdir_holding_a_summary_file_it_did_not_write(tmp_path, name):
  """Before: results.md, results.json and provenance.json were opened with "w" whatever they were."""
  workdir = tmp_path / "runs"
  workdir.mkdir()
  (workdir / name).write_text("my own notes")
  code, _, err = run_main(cli.train_main, _grid(workdir, "fine-tune"))
  assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert f"holds {name}, which dtnh_jax did not write" in err
  assert (workdir / name).read_text() == "my own notes"
  assert sorted(os.listdir(workdir)) == [name]  # refused before any run started


def test_a_grid_lists_what_it_wrote_and_replaces_only_that(finished_grid):
  workdir = finished_grid[0]
  listed = json.loads((workdir / workdir_lib.WRITTEN).read_text())["files"]
  assert {"results.md", "results.json", "provenance.json", "results.png"} <= set(listed)
  workdir_lib.check_ours(str(workdir), grid.SUMMARY_FILES)  # its own files: no complaint


def test_a_summary_written_before_the_list_existed_is_still_ours(tmp_path):
  """A workdir of an older dtnh_jax (no dtnh_jax_files.json) whose results.json holds run records."""
  record = {"method": "fine-tune", "source": "scratch", "seed": 0, "reg_weight": 0.0, "reg_decay": 1.0,
            "test_accuracy": 0.5}
  (tmp_path / "results.json").write_text(json.dumps([record]))
  (tmp_path / "results.md").write_text("Target ...")
  ours = grid._summary_from_before_the_list(str(tmp_path))  # pylint: disable=protected-access
  workdir_lib.claim(str(tmp_path), grid.SUMMARY_FILES[:4], ours)
  assert {"results.json", "results.md"} <= set(json.loads((tmp_path / workdir_lib.WRITTEN).read_text())["files"])


def test_a_run_report_does_not_replace_a_results_md_it_did_not_write(tmp_path):
  (tmp_path / "results.md").write_text("my own notes")
  result = {"method": "fine-tune", "label": "Fine-tuning", "source": "scratch", "dataset": "offline-digits",
            "test_accuracy": 0.5}
  with pytest.raises(ConfigError, match="holds results.md, which dtnh_jax did not write"):
    report.write_run_report(str(tmp_path), [], result, plots=False)
  assert (tmp_path / "results.md").read_text() == "my own notes"
  (tmp_path / "results.md").write_text(report.results_table([result]))  # as an older dtnh_jax wrote it: ours
  report.write_run_report(str(tmp_path), [], {**result, "test_accuracy": 0.75}, plots=False)
  assert "75.00" in (tmp_path / "results.md").read_text()


def test_a_summary_file_is_replaced_whole_or_not_at_all(tmp_path):
  """A failure while writing (a kill, a full disk) leaves the previous file and no part of the new one."""
  workdir_lib.replace_ours(str(tmp_path), "results.md", "the old table")

  def half_then_fail(path):
    with open(path, "w") as f:
      f.write("half of the new")
    raise OSError("disk full (simulated)")

  with pytest.raises(OSError, match="simulated"):
    workdir_lib.replace_ours(str(tmp_path), "results.md", half_then_fail)
  assert (tmp_path / "results.md").read_text() == "the old table"
  assert sorted(os.listdir(tmp_path)) == ["dtnh_jax_files.json", "results.md"]


# --- one summary per workdir, of all its runs ----------------------------------------------------------------------


def test_a_second_grid_in_the_workdir_adds_its_runs_to_the_summary(finished_grid, tmp_path):
  """Before: the second grid's results.json and results.md replaced the first's (two grids: only the last)."""
  workdir = _copy(finished_grid, tmp_path)
  first = json.loads((workdir / "results.json").read_text())
  # training from scratch: another method whose steps are the first grid's (fine-tuning from no source), compiled
  code, out, err = run_main(cli.train_main, _grid(workdir, "scratch"))
  assert code == 0, err
  records = json.loads((workdir / "results.json").read_text())
  assert [(r["method"], r["run"]) for r in records] == [("fine-tune", "scratch/fine-tune/seed0"),
                                                        ("scratch", "scratch/scratch/seed0")]
  assert records[0]["test_accuracy"] == first[0]["test_accuracy"]
  assert "| source | target | Fine-tuning | From scratch |" in (workdir / "results.md").read_text()
  assert "2 runs, " in _header(out)


def test_a_grid_of_other_settings_is_refused_before_it_trains(finished_grid, tmp_path):
  workdir = _copy(finished_grid, tmp_path)
  before = _files(workdir)
  code, _, err = run_main(cli.train_main, _grid(workdir, "l2-sp", steps=4, lr_drop_steps=(2,)))
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert "summarizes runs with other settings than this grid's (--lr-drop-steps 2 --steps 4; its run " \
      "scratch/fine-tune/seed0 has --lr-drop-steps 4 --steps 6)" in err
  assert _files(workdir) == before and not (workdir / "scratch" / "l2-sp").exists()


def _fake_run(workdir, method, test_accuracy):
  """A finished run's folder (its config.json) and record, without training."""
  config = TrainConfig.create(**{**FAST, "method": method})
  folder = grid.run_dir(str(workdir), config.source, method, 0)
  os.makedirs(folder)
  with open(os.path.join(folder, workdir_lib.CONFIG), "w") as f:
    f.write(config.to_json())
  return config, {"method": method, "label": config.method_spec.label, "source": config.source,
                  "dataset": config.dataset, "seed": 0, "steps": 6, "test_accuracy": test_accuracy, "test_loss": 1.0,
                  "val_accuracy": None, "val_loss": None, "reg_weight": config.recipe.reg_weight,
                  "reg_decay": config.recipe.reg_decay, "run": f"scratch/{method}/seed0", "train_seconds": 60.0}


def test_a_grid_finishing_while_another_writes_the_summary_waits_and_adds_its_runs(tmp_path):
  """Two grids at the same time in one workdir: the summary lists both (before: only the last to finish)."""
  config, first = _fake_run(tmp_path, "fine-tune", 0.5)
  _, second = _fake_run(tmp_path, "l2-sp", 0.6)
  write = grid._write_outputs  # pylint: disable=protected-access
  write(str(tmp_path), [first], ["fine-tune"], config, False)
  other_grid = workdir_lib.Lock(str(tmp_path)).acquire()  # writing its summary now
  writer = threading.Thread(target=write, args=(str(tmp_path), [second], ["l2-sp"], config, False))
  writer.start()
  time.sleep(0.5)
  assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["fine-tune"]  # waits
  other_grid.release()
  writer.join(timeout=60)
  assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["fine-tune", "l2-sp"]
  assert "2 runs, 2.0 min of training" in (tmp_path / "results.md").read_text()


# --- the time a summary states -----------------------------------------------------------------------------------


def test_a_finished_grid_run_again_keeps_its_training_time(finished_grid, tmp_path):
  """Before: running a finished grid again rewrote its results.md with "1 runs in 0.0 min"."""
  workdir = _copy(finished_grid, tmp_path)
  (record,) = json.loads((workdir / "results.json").read_text())
  assert record["train_seconds"] > 0
  code, out, err = run_main(cli.train_main, _grid(workdir, "fine-tune"))
  assert code == 0, err
  assert json.loads((workdir / "results.json").read_text())[0]["train_seconds"] == record["train_seconds"]
  assert _header(out) == _header(finished_grid[1])
  assert f"1 runs, {record['train_seconds'] / 60:.1f} min of training" in _header(out)


def test_a_lambda_sweep_of_methods_without_a_regularizer_ends_with_its_table_and_no_lambda_curve(tmp_path):
  """Before: fine-tuning alone with a λ grid (a preset's sweep) trained, printed its table, then ended in a
  traceback (``plot_lambda_curve``: no regularized method to draw)."""
  workdir = tmp_path / "runs"
  code, out, err = run_main(cli.train_main, _grid(workdir, "fine-tune", val_fraction=0.25) + ["--reg-weight", "0.1,1"])
  assert code == 0, err
  assert "Target offline-digits" in out and not (workdir / "lambda_curve.png").exists()
