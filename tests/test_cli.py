"""The command lines: help from the config, --config / --print-config / --version, one spelling, --optimizer,
progress bars and log lines.

Fast: --help and --print-config run no training; one tiny run (``tiny_adamw_run``) serves every test that
needs a run.
"""

import contextlib
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax import cli
from dtnh_jax.data import __main__ as data_command
from dtnh_jax.train import TrainConfig, checkpoint, grid, report, step as step_lib
from dtnh_jax.train import config as config_lib
from helpers import TINY_FLAGS, run_main

# As tests/test_faults.py's FAST: the offline problem from a random initialization, runs in seconds.


@pytest.fixture
def wide_help(monkeypatch):
  """argparse wraps at $COLUMNS: one line per flag, so a help text reads back whole."""
  monkeypatch.setenv("COLUMNS", "1000")


def _fields():
  return [field for _, field in config_lib.setting_fields()]


# --- help: one source of truth, the config ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [f.name for f in _fields()])
def test_every_setting_has_a_one_line_help(name):
  text = {f.name: f for f in _fields()}[name].metadata.get("help", "")
  assert text.strip() and "\n" not in text


# Written out by hand from config.py's lists (the tuples __post_init__ validates against).
EXPECTED_CHOICES = {
    "method": ("scratch", "fine-tune", "l2", "dtnh-l2", "l2-sp", "dtnh-l2-sp", "knowdist", "dtnh-knowdist", "delta",
               "dtnh-delta"),
    "arch": ("resnet10", "resnet18", "resnet34", "resnet50", "efficientnet-lite0"),
    "optimizer": ("sgd", "adamw"),
    "reg_schedule": ("epoch", "released-code"),
    "l2_sp_include": ("kernels", "weights_and_biases", "all"),
    "feature_layers": ("layer1", "layer2", "layer3", "layer4", "pool"),
    "feature_normalize": ("official", "sum", "spatial_mean", "mean"),
    "granularity": ("tree", "leaf", "module"),
    "projection": ("conflict", "always", "pcgrad", "gradvac", "mgda", "upgrad", "dualproj", "cagrad", "share-bound",
                   "ema", "subspace"),
    "share_bound_projection": ("conflict", "always", "none"),
    "share_bound_reference": ("current", "average"),
    "compute_dtype": ("float32", "bfloat16"),
    "on_nonfinite": ("stop", "skip", "record"),
}


def test_settings_with_a_finite_set_of_values_declare_it():
  declared = {f.name: f.metadata["choices"] for f in _fields() if f.metadata["choices"]}
  assert declared == EXPECTED_CHOICES


@pytest.mark.parametrize("name", sorted(EXPECTED_CHOICES))
def test_declared_choices_are_exactly_what_the_config_accepts(name):
  is_tuple = config_lib.setting_types()[name][1]
  for choice in EXPECTED_CHOICES[name]:
    TrainConfig.create(**{name: (choice,) if is_tuple else choice})  # accepted
  with pytest.raises(config_lib.ConfigError, match=f"--{name.replace('_', '-')}|unknown method"):
    TrainConfig.create(**{name: ("no-such",) if is_tuple else "no-such"})


def _entry(help_text, flag):
  """The --help entry of ``flag`` (its line and the indented lines below it), whitespace collapsed."""
  match = re.search(rf"^  {re.escape(flag)}[ ,\n].*?(?=^  -|\Z)", help_text, re.MULTILINE | re.DOTALL)
  assert match, flag
  return " ".join(match.group(0).split())


def test_help_shows_every_setting_with_its_help_and_default(wide_help):
  code, out, _ = run_main(cli.train_main, ["--help"])
  assert code == 0
  defaults = TrainConfig().settings()
  for field in _fields():
    if field.name == "method":
      continue
    entry = _entry(out, f"--{field.name.replace('_', '-')}")
    assert field.metadata["help"] in entry, field.name
    default = defaults[field.name]
    shown = "not set" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
    assert f"(default: {shown}" in entry, field.name


@pytest.mark.parametrize("name", sorted(EXPECTED_CHOICES))
def test_help_lists_the_choices_of_each_flag(name, wide_help):
  _, out, _ = run_main(cli.train_main, ["--help"])
  entry = _entry(out, f"--{name.replace('_', '-')}")
  for choice in EXPECTED_CHOICES[name]:
    assert re.search(rf"(?<![\w-]){re.escape(choice)}(?![\w-])", entry), (name, choice)


@pytest.mark.parametrize("main,program", [(cli.train_main, "dtnh-train"), (cli.convert_main, "dtnh-convert"),
                                          (data_command.main, "dtnh-data")])
def test_version_prints_the_package_version(main, program):
  import dtnh_jax  # pylint: disable=g-import-not-at-top
  code, out, _ = run_main(main, ["--version"])
  assert (code, out) == (0, f"{program} {dtnh_jax.__version__}\n")


# --- --config and --print-config ---------------------------------------------------------------------------------


def _printed(*args, fmt="toml"):
  code, out, err = run_main(cli.train_main, ["--print-config", fmt, *args])
  assert code == 0, err
  return out


def _load(text, fmt):
  return tomllib.loads(text) if fmt == "toml" else json.loads(text)


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.parametrize("args", [
    [],  # the offline default: every method, both sources, three seeds
    ["--dataset", "cifar10", "--source", "imagenet-r18/", "--method", "l2-sp,dtnh-l2-sp", "--seeds", "1,2",
     "--optimizer", "adamw", "--weight-decay", "0.01", "--feature-layers", "layer1,pool", "--data-dir", "tfds/"],
], ids=["offline default", "a grid on cifar10"])
def test_printed_config_read_back_with_config_prints_the_same(args, fmt, tmp_path):
  printed = _printed(*args, fmt=fmt)
  path = tmp_path / f"settings.{fmt}"
  path.write_text(printed)
  assert _printed("--config", str(path), fmt=fmt) == printed


def test_printed_config_holds_every_setting_and_the_grid_as_lists():
  settings = tomllib.loads(_printed("--dataset", "cifar10", "--source", "scratch", "--method", "l2-sp,dtnh-l2-sp",
                                    "--seeds", "1,2", "--optimizer", "adamw", "--weight-decay", "0.01"))
  # TOML has no null: the unset optional settings are left out; the workdir is there too
  unset = {"data_dir", "split_seed", "max_angle", "bn_momentum"}
  assert set(settings) == {f.name for f in _fields()} - unset | {"workdir"}
  assert settings["method"] == ["l2-sp", "dtnh-l2-sp"] and settings["seed"] == [1, 2]
  assert settings["source"] == "scratch" and settings["optimizer"] == "adamw" and settings["weight_decay"] == 0.01
  assert settings["steps"] == 20000  # the paper's schedule for CIFAR-10, resolved


def test_flags_override_the_config_file(tmp_path):
  path = tmp_path / "settings.toml"
  path.write_text('dataset = "cifar10"\nsource = "scratch"\nsteps = 7\nreg_weight = 0.5\nlr_drop_steps = [3]\n')
  settings = tomllib.loads(_printed("--config", str(path), "--steps", "9"))
  assert (settings["steps"], settings["reg_weight"], settings["lr_drop_steps"]) == (9, 0.5, [3])


def test_a_single_seed_replaces_the_offline_defaults_three():
  assert tomllib.loads(_printed("--seed", "5"))["seed"] == 5
  assert tomllib.loads(_printed())["seed"] == [0, 1, 2]


def test_dataset_offline_digits_is_the_offline_default():
  assert _printed("--dataset", "offline-digits") == _printed()


def _config_error(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  code, _, err = run_main(cli.train_main, ["--config", str(path), "--print-config"])
  assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  return err


def test_unknown_config_key_exits_2_naming_it_and_the_valid_ones(tmp_path):
  err = _config_error(tmp_path, "settings.json", '{"reg_wieght": 0.1, "steps": 10}')
  assert "unknown setting(s) 'reg_wieght'" in err
  assert all(field.name in err for field in _fields())


@pytest.mark.parametrize("name,text,message", [
    ("settings.toml", 'steps = "ten"', "steps must be an integer, got 'ten'"),
    ("settings.json", '{"small_stem": 1}', "small_stem must be true or false, got 1"),
    ("settings.toml", 'lr_drop_steps = ["a"]', "lr_drop_steps must be a list of integers"),
    ("settings.toml", "steps = ", "not valid TOML"),
    ("settings.json", "[1, 2]", "expected a table of settings"),
    ("settings.yaml", "steps: 10", "must end in .toml or .json"),
    ("settings.toml", "reg_weight = -1.0", "--reg-weight must be >= 0"),
])
def test_bad_config_file_exits_2_saying_what_is_wrong(tmp_path, name, text, message):
  assert message in _config_error(tmp_path, name, text)


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_a_printed_config_runs_in_the_workdir_its_header_names(tmp_path, fmt):
  """Before: --preset tiny printed "in runs/offline-tiny", and --config of that file ran in runs/offline-default."""
  printed = _printed("--preset", "tiny", fmt=fmt)
  assert _load(printed, fmt)["workdir"] == os.path.join("runs", "offline-tiny")
  path = tmp_path / f"settings.{fmt}"
  path.write_text(printed)
  assert "1 run(s) in runs/offline-tiny;" in _printed("--config", str(path))
  assert f"1 run(s) in {tmp_path};" in _printed("--config", str(path), "--workdir", str(tmp_path))  # flags first


def _one_line_error(*args):
  code, out, err = run_main(cli.train_main, [*args, "--print-config"])
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  return err.strip()


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0,1,1"], "--seeds 0,1,1 names seed 1 twice"),
    (["--method", "l2-sp,dtnh-l2-sp,L2-SP"], "--method l2-sp,dtnh-l2-sp,L2-SP names method l2-sp twice"),
    (["--reg-weight", "0.1,1,0.10", "--val-fraction", "0.2"], "--reg-weight 0.1,1.0,0.1 names the value 0.1 twice"),
    (["--reg-decay", "0.9,0.9", "--val-fraction", "0.2"], "--reg-decay 0.9,0.9 names the value 0.9 twice"),
])
def test_a_grid_axis_naming_a_value_twice_is_refused(args, message):
  """Before: --seeds 0,1,1 printed "2 seed(s)" and averaged three records, seed 1 counted twice."""
  assert message in _one_line_error(*args)


@pytest.mark.parametrize("text,message", [
    ("seed = [0, 1, 1]", "its seed list names seed 1 twice"),
    ('method = ["l2-sp", "l2-sp"]', "its method list names method l2-sp twice"),
    ('source = ["scratch", "scratch"]', "its source list names source scratch twice"),
    ('source = ["a/related", "b/related"]', "names sources a/related and b/related, whose runs would share the "
                                            "folder 'related'"),
    ("reg_weight = [0.1, 0.1]\nval_fraction = 0.2", "its reg_weight list names the value 0.1 twice"),
])
def test_a_config_list_naming_a_value_twice_is_refused(tmp_path, text, message):
  path = tmp_path / "settings.toml"
  path.write_text(text + "\n")
  assert message in _one_line_error("--config", str(path))


def test_a_flag_of_numbers_that_is_not_a_number_is_one_line_naming_the_flag():
  """Before: --reg-weight abc printed the whole usage, then "expected comma-separated names"."""
  assert _one_line_error("--reg-weight", "abc") == (
      "dtnh-train: error: --reg-weight: expected comma-separated numbers, got 'abc'.")


@pytest.mark.parametrize("momentum", ["0.9", "0.5"])
def test_momentum_with_adamw_is_refused_even_at_its_default(momentum):
  """Before: --optimizer adamw --momentum 0.9 (SGD's default) was accepted and did nothing."""
  assert "--momentum is SGD's; --optimizer adamw has its own moments" in _one_line_error(
      "--optimizer", "adamw", "--momentum", momentum)


def test_a_printed_adamw_config_reads_back_despite_holding_sgds_default_momentum(tmp_path):
  path = tmp_path / "settings.toml"
  path.write_text(_printed("--optimizer", "adamw"))
  assert "momentum = 0.9" in path.read_text() and 'optimizer = "adamw"' in _printed("--config", str(path))


def test_a_batch_larger_than_the_training_split_is_refused_naming_both(tmp_path):
  """Before: --batch-size 200 on the offline target's 100 training images trained on batches of repeats."""
  code, _, err = run_main(cli.train_main, ["--workdir", str(tmp_path / "runs"), "--method", "fine-tune", "--seeds",
                                           "0", "--no-progress", *TINY_FLAGS, "--batch-size", "200"])
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert "--batch-size 200 is larger than the training split of --dataset offline-digits (100 images)" in err
  assert not (tmp_path / "runs").exists()


def test_missing_config_file_exits_2_naming_it(tmp_path):
  code, _, err = run_main(cli.train_main, ["--config", str(tmp_path / "none.toml"), "--print-config"])
  assert code == 2 and f"--config {tmp_path / 'none.toml'}: cannot read it" in err


# --- one spelling: dashes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,dest", [("--data-dir", "data_dir"), ("--manual-dir", "manual_dir")])
def test_dtnh_data_flags_use_dashes_and_the_underscore_spelling_is_a_hidden_deprecated_alias(flag, dest, capsys):
  parser = data_command._parser()  # pylint: disable=protected-access
  assert getattr(parser.parse_args(["prepare", "cifar10", flag, "d"]), dest) == "d"
  assert capsys.readouterr().err == ""
  old = "--" + dest
  assert getattr(parser.parse_args(["prepare", "cifar10", old, "d"]), dest) == "d"
  assert capsys.readouterr().err == f"dtnh-data prepare: warning: {old} is deprecated; use {flag}.\n"
  prepare_help = run_main(parser.parse_args, ["prepare", "--help"])[1]
  assert flag in prepare_help and old not in prepare_help


@pytest.mark.parametrize("main,args", [(cli.train_main, []), (cli.convert_main, []), (data_command.main, []),
                                       (data_command.main, ["prepare"])], ids=["dtnh-train", "dtnh-convert",
                                                                              "dtnh-data", "dtnh-data prepare"])
def test_every_flag_shown_is_spelled_with_dashes(main, args):
  code, out, _ = run_main(main, args + ["--help"])
  flags = re.findall(r"(?<![\w-])--[\w-]+", out)
  assert code == 0 and len(flags) >= 3 and not [flag for flag in flags if "_" in flag]


# --- --optimizer ---------------------------------------------------------------------------------------------------


def _adam_first_step(direction, params, learning_rate, weight_decay, eps=1e-8):
  """AdamW's first update by hand: the bias-corrected moments are d and d², so the step is d / (|d| + eps)."""
  return -learning_rate * (direction / (np.abs(direction) + eps) + weight_decay * params)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_optimizer_follows_dtnh_in_the_chain(optimizer):
  config = TrainConfig.create(method="dtnh-l2-sp", optimizer=optimizer, learning_rate=0.01, reg_weight=0.5,
                       weight_decay=0.1 if optimizer == "adamw" else 0.0)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  empirical, regularizer = {"w": jnp.array([1.0, 2.0, 0.5])}, {"w": jnp.array([-3.0, 0.5, -1.0])}
  tx = step_lib.make_optimizer(config, steps_per_epoch=10)
  updates, _ = tx.update((empirical, regularizer), tx.init(params), params)
  g, r, p = (np.asarray(tree["w"], np.float64) for tree in (empirical, regularizer, params))
  assert g @ r < 0  # a conflict: DTNH projects r onto g's normal plane
  direction = g + 0.5 * (r - (g @ r) / (g @ g) * g)
  expected = (-0.01 * direction if optimizer == "sgd"  # momentum's first step is the plain step
              else _adam_first_step(direction, p, 0.01, 0.1))
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


@pytest.mark.parametrize("changes,message", [
    ({"reg_schedule": "hourly"}, "--reg-schedule must be epoch or released-code"),
    ({"optimizer": "adamw", "momentum": 0.5}, "--momentum is SGD's"),
    ({"optimizer": "adam"}, "--optimizer must be one of sgd, adamw"),
    ({"optimizer": "adamw", "weight_decay": -1.0}, "--weight-decay must be >= 0"),
])
def test_optimizer_settings_that_would_be_ignored_are_refused(changes, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    TrainConfig.create(**changes)


# --- one tiny run: adamw, progress bars, log lines ----------------------------------------------------------------

# on presets.tiny's ResNet-10 (the ResNet-18's layers, one block per stage): a third less to compile
TINY_RUN = ["--method", "dtnh-l2-sp", "--seeds", "0", "--optimizer", "adamw", "--steps", "20", "--lr-drop-steps",
            "15", "--log-every", "4", "--eval-every", "10", "--checkpoint-every", "20", "--arch", "resnet10",
            *TINY_FLAGS]


@pytest.fixture(scope="module")
def tiny_adamw_run(tmp_path_factory):
  """``dtnh-train --optimizer adamw`` with its progress bar on: its outputs and each progress call it made."""
  workdir = tmp_path_factory.mktemp("adamw")
  calls = []
  for_run = grid.Progress.for_run

  def recording_for_run(self, label):
    hook = for_run(self, label)
    def progress(step, total, latest):
      calls.append((step, total, latest))
      hook(step, total, latest)
    return progress

  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("DTNH_JAX_CACHE", str(workdir / "cache"))
    patch.setattr(grid.Progress, "for_run", recording_for_run)
    code, out, err = run_main(cli.train_main, TINY_RUN + ["--workdir", str(workdir / "runs")])
  assert code == 0, err
  run = workdir / "runs" / "scratch" / "dtnh-l2-sp" / "seed0"
  return {"run": run, "out": out, "err": err, "calls": calls,
          "metrics": report.read_metrics(os.path.join(run, "metrics.jsonl"))}


def test_adamw_run_lowers_the_empirical_loss(tiny_adamw_run):
  losses = [r["loss_empirical"] for r in tiny_adamw_run["metrics"] if r["kind"] == "train"]
  assert len(losses) == 20 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


def test_adamw_run_keeps_adams_moments_in_its_optimizer_state(tiny_adamw_run):
  checkpoints = checkpoint.Checkpoints(tiny_adamw_run["run"])
  try:
    _, state, _, _ = checkpoints.restore(None)
  finally:
    checkpoints.close()
  dtnh_state, adamw_state = state["opt_state"]  # optax.chain(dtnh, adamw)
  assert "diagnostics" in dtnh_state
  moments = adamw_state[0]  # adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)
  assert set(moments) == {"count", "mu", "nu"} and int(moments["count"]) == 20
  param_structure = jax.tree.structure(state["params"])
  assert jax.tree.structure(moments["mu"]) == param_structure == jax.tree.structure(moments["nu"])
  assert all(np.all(np.asarray(v) >= 0) for v in jax.tree.leaves(moments["nu"]))  # a second moment


def test_progress_hook_gets_host_values_fetched_with_the_metrics_not_a_transfer_per_step(tiny_adamw_run):
  calls, metrics = tiny_adamw_run["calls"], tiny_adamw_run["metrics"]
  assert [step for step, _, _ in calls] == list(range(1, 21)) and {total for _, total, _ in calls} == {20}
  # the loop fetches every log_every (4) steps, at evaluations (10, 20) and checkpoints (20)
  fetched = [4, 8, 10, 12, 16, 20]
  new = [step for (step, _, latest), (_, _, before) in zip(calls, [(0, 0, None)] + calls) if latest is not before]
  assert new == [1] + fetched  # the first call's dict is empty; each later one is the last fetch's
  train = {r["step"]: r for r in metrics if r["kind"] == "train"}
  evals = {r["step"]: r for r in metrics if r["kind"] == "eval"}
  for (step, _, latest), start in zip([calls[s - 1] for s in fetched], [0] + fetched):
    assert all(type(v) in (float, int) for v in latest.values())  # Python numbers: nothing left on the device
    assert latest["loss_empirical"] == train[step]["loss_empirical"]
    assert latest["reg_weight"] == train[step]["reg_weight"]
    assert math.isclose(latest["conflict_rate"], np.mean([train[s]["conflict"] for s in range(start + 1, step + 1)]))
    last_eval = max((s for s in evals if s <= step), default=None)
    assert latest.get("test_accuracy") == (evals[last_eval]["test_accuracy"] if last_eval else None)


def test_a_single_run_shows_a_step_bar_with_loss_reg_weight_conflict_and_test_accuracy(tiny_adamw_run):
  final = tiny_adamw_run["calls"][-1][2]
  bar = [line for line in re.split(r"[\r\n]", tiny_adamw_run["err"]) if "20/20" in line][-1]
  assert bar.startswith("scratch dtnh-l2-sp seed 0: 100%")
  assert (f"loss {final['loss_empirical']:.4g} λ {final['reg_weight']:.3g} conflict "
          f"{100 * final['conflict_rate']:.0f}% acc {100 * final['test_accuracy']:.1f}%") in bar
  assert "runs:" not in tiny_adamw_run["err"]  # one run: no runs bar


def test_export_prints_the_runs_result_in_labelled_lines(tmp_path):
  """Before: --export printed the result as a Python dict."""
  export = tmp_path / "exported"
  # tiny_adamw_run's method and optimizer (2 steps): the steps compiled for it in this module serve this run too
  code, out, err = run_main(cli.train_main, ["--workdir", str(tmp_path / "runs"), "--method", "dtnh-l2-sp", "--seeds",
                                             "0", "--optimizer", "adamw", "--no-progress", "--steps", "2",
                                             "--lr-drop-steps", "1", "--eval-every", "2", "--arch", "resnet10",
                                             *TINY_FLAGS, "--export", str(export)])
  assert code == 0, err
  result = json.loads((tmp_path / "runs" / "scratch" / "dtnh-l2-sp" / "seed0" / "results.json").read_text())
  assert "{'" not in out
  assert (f"\nrun:                 DTNH (L2-SP) from scratch on offline-digits, seed 0, 2 steps "
          f"({tmp_path / 'runs' / 'scratch' / 'dtnh-l2-sp' / 'seed0'})\n"
          f"test accuracy:       {100 * result['test_accuracy']:.2f}% (loss {result['test_loss']:.4f})\n"
          f"exported to:         {export} (--source {export} starts a run from it)\n") in out


def test_a_single_runs_evaluations_are_log_lines(tiny_adamw_run):
  evals = [r for r in tiny_adamw_run["metrics"] if r["kind"] == "eval"]
  lines = [line for line in tiny_adamw_run["err"].splitlines() if ": test accuracy " in line]
  assert len(lines) == len(evals) == 2
  for line, record in zip(lines, evals):
    assert line.startswith("dtnh-train: ") and f"step {record['step']}/20: test accuracy " \
        f"{100 * record['test_accuracy']:.2f}%, test loss {record['test_loss']:.4f}" in line


# --- logging ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verbose,shown", [
    (False, ["dtnh-train: warning: a warning", "dtnh-train: pre-training notice"]),
    (True, ["dtnh-train: warning: a warning", "dtnh-train: pre-training notice", "dtnh-train: an evaluation"]),
], ids=["default", "-v"])
def test_cli_shows_warnings_and_slow_steps_and_with_verbose_every_info_line(verbose, shown):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), cli._logging("dtnh-train", verbose):  # pylint: disable=protected-access
    logging.getLogger("dtnh_jax.train.loop").warning("a warning")
    logging.getLogger("dtnh_jax.train.sources").info("pre-training notice")
    logging.getLogger("dtnh_jax.train.loop").info("an evaluation")
    logging.getLogger("dtnh_jax.train.loop").debug("a detail")
  assert err.getvalue().splitlines() == shown


def test_cli_logging_is_undone_after_the_command():
  package = logging.getLogger("dtnh_jax")
  before = (list(package.handlers), package.level, package.propagate, logging.getLogger("dtnh_jax.train.sources").level)
  with cli._logging("dtnh-train", True):  # pylint: disable=protected-access
    pass
  assert (list(package.handlers), package.level, package.propagate,
          logging.getLogger("dtnh_jax.train.sources").level) == before


def test_importing_the_package_warns_nothing():
  command = "import dtnh_jax, dtnh_jax.train, dtnh_jax.models, dtnh_jax.data, dtnh_jax.cli"
  result = subprocess.run([sys.executable, "-W", "error", "-c", command], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]


def test_study_preset_prints_its_grid_and_flags_override_it(capsys):
  code, out, _ = run_main(cli.train_main, ["--preset", "study", "--print-config"])
  # per seed: fine-tuning from each source, scratch once, 8 regularized methods x 5 λ x 2 sources; 5 seeds
  assert code == 0 and f"{5 * (2 + 1 + 8 * 5 * 2)} run(s) in runs/offline-study" in out
  assert "reg_weight = [0.001, 0.01, 0.1, 1.0, 10.0]" in out and "val_fraction = 0.25" in out
  code, out, _ = run_main(cli.train_main, ["--preset", "study", "--seeds", "0", "--reg-weight", "0.1,1", "--method",
                                           "l2-sp,dtnh-l2-sp", "--print-config"])
  assert code == 0 and "8 run(s)" in out and "reg_weight = [0.1, 1.0]" in out
