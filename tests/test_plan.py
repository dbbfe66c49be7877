"""What a ``dtnh-train`` command runs: ``dtnh_jax.train.plan.resolve``, jax-free, each rule written once.

The expected plans are what ``dtnh-train`` planned before ``resolve`` existed (``cli._plan``, captured with
``--print-config`` on the same commands): the move changed no run, no workdir and no message.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from dtnh_jax import cli, names
from dtnh_jax.train import ConfigError, Method, grid, loop, plan, presets
from helpers import cli_error, run_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARRAY_LIBRARIES = ("jax", "jaxlib", "optax", "flax", "orbax")
OFFLINE = tuple(names.OFFLINE_SOURCES)
NO_VALIDATION = ("a sweep of --reg-weight/--reg-decay picks on validation accuracy, and --dataset offline-digits has "
                 "no validation split of its own: pass --val-fraction (e.g. 0.2) to carve one; nothing is chosen on "
                 "the test split.")


def test_resolve_loads_no_jax():
  code = ("import json, sys; from dtnh_jax.train import plan; plan.resolve(None, None, {}); "
          "plan.resolve('study', None, {'reg_weight': (0.1, 1.0)}); "
          "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))))" % (ARRAY_LIBRARIES,))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_offline_default_grid_is_presets_grids_offline():
  grid = presets.GRIDS["offline"]
  default = plan.resolve(None, None, {})
  assert ([m.name for m in default.methods], list(default.seeds), list(default.sources),
          list(default.reg_weights)) == (grid["method"].split(","), grid["seed"], grid["source"], grid["reg_weight"])


def test_the_offline_default_picks_lambda_on_validation_beside_fine_tuning_and_scratch():
  default = plan.resolve(None, None, {})
  assert {"fine-tune", "scratch"} <= {m.name for m in default.methods}
  assert len(default.reg_weights) > 1 and default.base.val_fraction > 0  # a sweep, chosen on validation
  assert default.sources == OFFLINE and len(default.seeds) >= 3  # paired intervals need seeds
  # L2-SP's coefficients are the official ones, not values chosen on a test set
  assert (default.base.regularizer.l2_sp_alpha, default.base.regularizer.l2_sp_beta) == (0.1, 0.01)


def test_the_offline_default_follows_presets_grids_offline(monkeypatch):
  monkeypatch.setitem(presets.GRIDS, "offline", {"method": "l2,dtnh-l2", "seed": [7], "source": ["unrelated"]})
  default = plan.resolve(None, None, {})
  assert ([m.name for m in default.methods], default.seeds, default.sources) == (["l2", "dtnh-l2"], (7,),
                                                                                 ("unrelated",))


def _summary(p: plan.Plan) -> tuple:
  return ([m.name for m in p.methods], p.seeds, p.sources, p.workdir, p.offline_default, p.reg_weights,
          p.reg_decays, p.runs)


QUICK = ["scratch", "fine-tune", "l2-sp", "dtnh-l2-sp"]
STUDY = "scratch,fine-tune,l2,dtnh-l2,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist,delta,dtnh-delta".split(",")


@pytest.mark.parametrize("preset, flags, expected", [
    (None, {}, (QUICK, (0, 1, 2), OFFLINE, "runs/offline-default", True, (0.1, 1.0, 10.0), (0.9,), 45)),
    ("study", {}, (STUDY, (0, 1, 2, 3, 4), OFFLINE, "runs/offline-study", True, (0.001, 0.01, 0.1, 1.0, 10.0),
                   (0.98,), 415)),
    ("study-imagenet", {}, (["fine-tune", "l2-sp", "dtnh-l2-sp", "knowdist", "dtnh-knowdist", "scratch"],
                            (0, 1, 2), ("imagenet",), "runs/offline-study-imagenet", True, (0.1, 1.0, 10.0),
                            (0.98,), 42)),
    (None, {"method": "l2-sp", "seeds": "0,1", "reg_weight": (0.1, 1.0), "val_fraction": 0.2},
     (["l2-sp"], (0, 1), OFFLINE, "runs/offline-default", True, (0.1, 1.0), (0.9,), 8)),
    ("tiny", {}, (["dtnh-l2-sp"], (0,), ("scratch",), "runs/offline-tiny", True, (1.0,), (0.9,), 1)),
    (None, {"dataset": "cifar10"}, (["l2-sp"], (0,), ("imagenet",), "runs/cifar10/imagenet", False, (1.0,), (1.0,),
                                    1)),
    (None, {"dataset": "folder:/data/flowers/", "source": "/w/ckpt"},
     (["l2-sp"], (0,), ("/w/ckpt",), "runs/folder-flowers/ckpt", False, (1.0,), (1.0,), 1)),
    (None, {"offline": True, "seeds": "5"}, (QUICK, (5,), OFFLINE, "runs/offline-default", True, (0.1, 1.0, 10.0),
                                            (0.9,), 15)),
    # the offline preset elsewhere keeps its grid's seeds only; another preset on the offline target its sources
    (None, {"offline": True, "dataset": "offline-mnist"},
     (["l2-sp"], (0, 1, 2), ("imagenet",), "runs/offline-mnist/imagenet", False, (1.0,), (0.9,), 3)),
    ("paper", {"dataset": "offline-digits"}, (QUICK, (0,), OFFLINE, "runs/offline-paper", True, (1.0,), (1.0,), 7)),
    ("study", {"dataset": "offline-mnist"}, (STUDY, (0, 1, 2, 3, 4), OFFLINE, "runs/offline-mnist", False,
                                             (0.001, 0.01, 0.1, 1.0, 10.0), (0.98,), 415)),
], ids=["default", "study", "study-imagenet", "sweep", "tiny", "cifar10", "folder", "offline-seeds",
        "offline-on-mnist", "paper-on-digits", "study-on-mnist"])
def test_resolve_plans_what_dtnh_train_planned_before(preset, flags, expected):
  assert _summary(plan.resolve(preset, None, flags)) == expected


def test_resolve_reads_a_config_file_under_the_flags(tmp_path):
  path = tmp_path / "grid.toml"
  path.write_text('method = ["l2-sp", "dtnh-l2-sp"]\nseed = [3, 4]\nsource = ["related"]\nreg_weight = [0.1, 1.0]\n'
                  'val_fraction = 0.25\nsteps = 50\nworkdir = "runs/from-config"\n')
  planned = plan.resolve(None, str(path), {})
  assert _summary(planned) == (["l2-sp", "dtnh-l2-sp"], (3, 4), ("related",), "runs/from-config", True, (0.1, 1.0),
                               (0.9,), 8)
  assert planned.base.recipe.steps == 50
  assert plan.resolve(None, str(path), {"steps": 60, "workdir": "w"}).base.recipe.steps == 60


def test_print_config_prints_the_settings_text_of_resolve():
  code, out, _ = run_main(cli.train_main, ["--preset", "study", "--print-config"])
  assert code == 0 and out == plan.settings_text(plan.resolve("study", None, {}), "toml")


def test_resolve_refuses_a_name_that_is_no_flag():
  with pytest.raises(TypeError, match="unknown flags"):
    plan.resolve(None, None, {"stepz": 3})


def test_a_sweep_without_a_validation_split_is_refused_by_resolve_and_by_the_grid_alike(tmp_path):
  with pytest.raises(ConfigError) as planned:
    plan.resolve("tiny", None, {"reg_weight": (0.1, 1.0)})
  with pytest.raises(ConfigError) as gridded:
    grid.run_grid(presets.get("tiny"), str(tmp_path), sources=["scratch"], methods=[Method.parse("l2-sp")],
                  seeds=[0], reg_weights=[0.1, 1.0], show_progress=False)
  assert str(planned.value) == str(gridded.value) == NO_VALIDATION


def test_a_workdir_that_is_a_file_is_refused_by_dtnh_train_and_the_loop_alike(tmp_path, capsys):
  file = tmp_path / "runs"
  file.write_text("not a directory")
  message = f"--workdir {file} is a file; it must be a directory (or not exist yet)."
  assert cli_error(["--preset", "tiny", "--workdir", str(file)], capsys) == f"dtnh-train: error: {message}\n"
  with pytest.raises(ConfigError) as looped:
    loop.train(presets.get("tiny"), str(file))
  assert str(looped.value) == message


def test_the_split_seed_is_split_seed_else_the_run_seed_with_or_without_a_carve():
  tiny = presets.get("tiny")
  assert plan.split_seed(tiny.replace(seed=3)) == 3
  assert plan.split_seed(tiny.replace(seed=3, split_seed=5)) == 5
  assert plan.split_seed(tiny.replace(seed=3, split_seed=5, val_fraction=0.25)) == 5


class _Stop(Exception):
  pass


def test_a_grid_loads_the_data_once_per_split_seed(tmp_path, monkeypatch):
  loaded, trained = [], []
  monkeypatch.setattr(grid, "load_data", lambda config, *shard: loaded.append(config.seed) or object())

  def train(config, *args, **kwargs):
    trained.append(config.seed)
    if len(trained) == 2:
      raise _Stop
    return {"test_accuracy": 0.5}

  monkeypatch.setattr(loop, "train", train)
  with pytest.raises(_Stop):  # a fixed split seed without a carve: the seeds' data are the same
    grid.run_grid(presets.get("tiny", split_seed=5), str(tmp_path), sources=["scratch"],
                  methods=[Method.parse("fine-tune")], seeds=[0, 1], show_progress=False)
  assert (loaded, trained) == ([0], [0, 1])
