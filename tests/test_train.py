"""dtnh-train end to end: every method through one step, the CLI, resume, bad input."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax import cli
from dtnh_jax.train import ALL_METHODS, ConfigError, Method, TrainConfig, loop, sharding, sources
from dtnh_jax.train import config as config_lib
from dtnh_jax.train import step as step_lib
from dtnh_jax.train import presets
from dtnh_jax.train.data import load_data

tfds = pytest.importorskip("tensorflow_datasets")

# The offline problem at a size that runs in seconds, from the related source: the same code as the default.
TINY = {**presets.tiny(), "source": "related", "log_every": 2}


@pytest.fixture(scope="module", autouse=True)
def small_offline_sources():
  """The offline sources pre-trained for a few steps (the tiny preset's), once per pytest process: into the
  suite's own source cache (tests/conftest.py), where the other modules' tiny runs find them too. Module-scoped
  and autouse, so it comes before the module fixtures that load them, whichever test runs first."""
  sources.pretrain_sources(TrainConfig.create(**TINY))


def tiny(**changes):
  return TrainConfig.create(**{**TINY, **changes})


def test_method_names_parse_to_regularizer_and_dtnh_flag():
  assert Method.parse("dtnh-l2-sp") == Method("l2-sp", dtnh=True)
  assert Method.parse("KnowDist").label == "KnowDist"
  assert Method("delta", dtnh=True).label == "DTNH (DELTA)"
  assert len(ALL_METHODS) == 9


@pytest.mark.parametrize("changes,message", [
    ({"method": "dropout"}, "unknown method 'dropout'"),
    ({"method": "dtnh-fine-tune"}, "no regularizer"),
    ({"reg_weight": -0.1}, "--reg-weight must be >= 0"),
    ({"reg_decay": 1.5}, "--reg-decay"),
    ({"crop": 300}, "cannot exceed --resize"),
])
def test_bad_settings_are_refused_with_the_flag_named(changes, message):
  with pytest.raises(ConfigError, match=message):
    tiny(**changes)


def _optimizer_state_copies(compiled_text: str) -> int:
  """Copies of the train state's optimizer-state arguments in an optimized XLA program."""
  return len(re.findall(r"copy\(%state_opt_state\w*trace", compiled_text))


@pytest.fixture(scope="module")
def tiny_problem():
  """``(data, initial variables)`` of the tiny problem from the related source: the same for every method (neither
  depends on it), loaded once for the module's step builds, as a grid's runs share them."""
  config = tiny()
  data = load_data(config)
  return data, loop.initial_variables(config, data)


@pytest.fixture(scope="module")
def counted_delta_attention(tiny_problem):
  """``(attention, seen)``: DELTA's attention on the tiny problem as ``loop.train`` computes it, once for the module,
  with the examples its head was fitted on and the batches its channels were ranked on counted (``seen``). It is
  the source's on the target data, the same for DELTA and DTNH (DELTA): both methods' steps take it."""
  from dtnh_jax import regularizers  # pylint: disable=g-import-not-at-top
  data, _ = tiny_problem
  config = tiny(method="delta")
  seen = {}
  fit_head, rank = regularizers.fit_head, regularizers.delta_channel_attention

  def counting_fit_head(model, variables, batches, **kwargs):
    batches = list(batches)
    seen["head"] = sum(len(b["label"]) for b in batches)
    return fit_head(model, variables, batches, **kwargs)

  def counting_rank(model, variables, batches, layers):
    seen["ranked"] = len(batches)
    return rank(model, variables, batches, layers)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(regularizers, "fit_head", counting_fit_head)
    patch.setattr(regularizers, "delta_channel_attention", counting_rank)
    attention = loop.delta_attention(loop.create_model(config, data.num_classes), config, data)
  return attention, seen


@pytest.fixture(scope="module")
def compiled_steps(tiny_problem):
  """``compiled_steps(method, attention=None)``: a method's steps as ``loop.train`` builds, places and jits them,
  compiled: ``(config, data, model, steps, placement, state, reference, batch, {step name: compiled})`` for the
  steps it has (a plain method: two); DELTA's take its ``attention``. Each method's once for the module: KnowDist's
  and DELTA's cases compare with fine-tuning's compiled step, the one fine-tuning's own case ran."""
  data, initial = tiny_problem
  built = {}

  def compile_steps(method, attention=None):
    if method not in built:
      config = tiny(method=method)
      model = loop.create_model(config, data.num_classes)
      steps = step_lib.steps_for(model, config, data.steps_per_epoch)
      state = step_lib.create_train_state(initial, steps.tx, jax.random.PRNGKey(0))  # the loop's kind of key
      reference = step_lib.Reference.of(config, initial, attention)
      placement = sharding.Placement.create(state, reference, batch_size=config.recipe.batch_size)
      reference, batch = placement.put_reference(reference), placement.put_batch(next(data.train_loader(0)))
      compiled = {name: placement.jit_train_step(getattr(steps, name)).lower(placement.put_state(state), batch,
                                                                             reference).compile()
                  for name in ("summed_train_step", "train_step") if getattr(steps, name) is not None}
      built[method] = config, data, model, steps, placement, state, reference, batch, compiled
    return built[method]

  return compile_steps


def _convolutions(compiled) -> int:
  return compiled.as_text().count(" convolution(")


@pytest.fixture(scope="module")
def source_forward_convolutions():
  """``source_forward_convolutions(model, variables, images)``: the convolutions of the source network's compiled
  forward pass. The methods whose Ω reads the source's features (KnowDist, DELTA and their DTNH variants) pass the
  same model, variables and batch (``tiny_problem``'s): the program is compiled once for the module."""
  counted = {}

  def count(model, variables, images):
    if "forward" not in counted:
      counted["forward"] = _convolutions(jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
          variables, images).compile())
    return counted["forward"]

  return count


@pytest.mark.parametrize("method", [m.name for m in ALL_METHODS])
def test_every_method_builds_its_steps_and_takes_one_of_each(method, compiled_steps, source_forward_convolutions,
                                                            request):
  """Each method's steps as ``loop.train`` builds and jits them (the loop itself: the tests of runs, on a few
  methods), one step of each on one batch, then an evaluation. Each compiled step is also checked for what
  tests/test_guard.py and tests/test_plain_step.py promise of it (one compilation serves them all): the guarded
  step copies no optimizer state (the momentum is updated in place); a plain method's summed step (``J + λ Ω``)
  makes the split-gradient step's update, metrics and state, and compiles one backward pass (KnowDist's and
  DELTA's: fine-tuning's convolutions plus the source's forward pass; the split step that logs the angles, more)."""
  attention = request.getfixturevalue("counted_delta_attention")[0] if "delta" in method else None
  config, data, model, steps, placement, state, reference, batch, compiled = compiled_steps(method, attention)
  taken = {}
  for name, step in compiled.items():
    text = step.as_text()
    assert "trace" in text and _optimizer_state_copies(text) == 0  # the momentum: an argument, never copied
    after, metrics = step(placement.put_state(jax.tree.map(jnp.copy, state)), batch, reference)
    assert int(after.step) == 1 and float(metrics["skipped"]) == 0.0
    assert np.isfinite(float(metrics["loss_empirical"]))
    taken[name] = after, metrics
  if Method.parse(method).has_regularizer:  # the step that logs the angles (a plain method's others need not)
    assert {"loss_empirical", "loss_regularizer", "angle1", "angle4", "conflict"} <= set(metrics)
  traced = config.method_spec.regularizer in ("knowdist", "delta")  # Ω of the source's features
  if "summed_train_step" in taken:
    (summed, summed_metrics), (split, split_metrics) = taken["summed_train_step"], taken["train_step"]
    for a, b in zip(jax.tree.leaves(split.params), jax.tree.leaves(summed.params)):
      # float32 rounding of two summation orders, relative to the leaf's scale (KnowDist's gradient is large)
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(a))) + 1e-8)
    for key in ("loss_empirical", "reg_weight") + (("loss_regularizer", "loss_total") if traced else ()):
      np.testing.assert_allclose(summed_metrics[key], split_metrics[key], rtol=1e-5)
    if not traced:  # a closed-form Ω's value is left to the steps that log angles
      assert not {"loss_regularizer", "loss_total"} & set(summed_metrics)
    assert jax.tree.structure(summed) == jax.tree.structure(split)  # the same state: the two can alternate
    if traced:
      one_backward = _convolutions(compiled_steps("fine-tune")[-1]["train_step"])  # forward + one backward
      source_forward = source_forward_convolutions(model, reference.variables, batch["image"])
      assert _convolutions(compiled["summed_train_step"]) == one_backward + source_forward
      assert _convolutions(compiled["train_step"]) > one_backward + source_forward  # a second backward pass
  evaluation = step_lib.evaluate(placement.jit_eval_step(steps.eval_step), after,
                                 map(placement.put_batch, data.eval_batches()))
  assert 0.0 <= evaluation["test_accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["dtnh-knowdist", "knowdist"])  # knowdist: its two steps alternate
def test_resumed_run_ends_with_the_same_metrics_as_an_uninterrupted_one(method, tmp_path):
  config = tiny(method=method)
  straight = loop.train(config, tmp_path / "straight")
  stopped = loop.train(config, tmp_path / "resumed", stop_after=3)
  assert stopped == {"stopped_at": 3}
  resumed = loop.train(config, tmp_path / "resumed")
  assert resumed == straight
  lines = lambda run: open(tmp_path / run / "metrics.jsonl").read()
  assert lines("resumed") == lines("straight")


@pytest.fixture(scope="module")
def stopped_l2_sp_run(tmp_path_factory):
  """The workdir of an L2-SP run stopped after 2 steps (its checkpoint of step 2), trained once for the module: the
  checkpoint test reads it back, the settings test is refused in it (before anything is written there)."""
  workdir = tmp_path_factory.mktemp("stopped_l2_sp")
  loop.train(tiny(method="l2-sp"), workdir, stop_after=2)
  return workdir


def test_checkpoint_holds_state_data_position_and_rng(stopped_l2_sp_run):
  assert {"data", "extra", "state"} <= set(os.listdir(stopped_l2_sp_run / "checkpoints" / "2"))
  from dtnh_jax.train import checkpoint
  step, state, data_state, extra = checkpoint.Checkpoints(stopped_l2_sp_run).restore(None)
  assert step == 2 and data_state["step"] == 2 and extra["method"] == "l2-sp"
  assert {"params", "batch_stats", "opt_state", "rng", "step"} <= set(state)


def test_last_n_checkpoints_are_kept(tmp_path):
  loop.train(tiny(method="l2", keep_checkpoints=2), tmp_path)
  assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [4, 6]


def test_other_settings_in_the_same_workdir_are_refused(stopped_l2_sp_run):
  with pytest.raises(ConfigError, match="holds a run with other settings"):
    loop.train(tiny(method="knowdist"), stopped_l2_sp_run)


def test_run_writes_metrics_plots_results_and_tensorboard(tmp_path):
  loop.train(tiny(method="dtnh-l2-sp", plots=True, checkpoint_every=6), tmp_path)  # one checkpoint: none is read
  for name in ("metrics.jsonl", "results.json", "results.md", "losses.png", "angles.png", "config.json"):
    assert (tmp_path / name).exists(), name
  assert any((tmp_path / "tensorboard").iterdir())
  results = json.load(open(tmp_path / "results.json"))
  assert results["label"] == "DTNH (L2-SP)"


def test_cli_offline_default_prints_the_paper_style_table(tmp_path, capsys):
  # one checkpoint and one evaluation a run (none is read, the last evaluation is the table's): 6 runs
  settings = {**TINY, "checkpoint_every": TINY["steps"], "eval_every": TINY["steps"]}
  args = ["--workdir", str(tmp_path), "--seeds", "0", "--method", "fine-tune,l2-sp,dtnh-l2-sp",
          "--no-progress"] + cli.settings_to_argv({k: v for k, v in settings.items() if k not in ("method", "source")})
  assert cli.train_main(args) == 0
  out = capsys.readouterr().out
  assert "| source | target | Fine-tuning | L2-SP | DTNH (L2-SP) |" in out
  assert "| related | offline-digits |" in out and "| unrelated | offline-digits |" in out
  assert "nan" not in out.lower()  # one seed: no spread to print, and none made up
  for name in ("results.md", "results.json", "results.png", "figure3_losses.png", "figure4_5_angles.png"):
    assert (tmp_path / name).exists(), name
  assert len(json.load(open(tmp_path / "results.json"))) == 2 * 3  # two sources, three methods, one seed


def test_cli_trains_on_mock_tfds_data_and_exports_the_model(tmp_path, capsys):
  export = tmp_path / "exported"
  # the tiny preset's ResNet-10 (a third less to compile than cifar10's default ResNet-18, checked below)
  args = ["--dataset", "cifar10", "--source", "scratch", "--method", "dtnh-l2-sp", "--workdir", str(tmp_path / "run"),
          "--arch", "resnet10", "--width", "0.125", "--small-stem", "--resize", "10", "--crop", "8", "--batch-size",
          "8", "--steps", "3", "--lr-drop-steps", "2", "--eval-every", "3", "--eval-batch-size", "8", "--export",
          str(export)]
  with tfds.testing.mock_data(num_examples=24):
    assert cli.train_main(args) == 0
  from dtnh_jax import models
  variables, metadata = models.load_variables(export)
  assert metadata["arch"] == "resnet10" and variables["params"]["fc"]["kernel"].shape[-1] == 10
  assert TrainConfig.create(dataset="cifar10").model.arch == "resnet18"  # what the run has without --arch


@pytest.mark.parametrize("args,message,mock", [
    (["--method", "dropout"], "unknown method", False),
    (["--reg-weight", "-1"], "--reg-weight must be >= 0", False),
    (["--dataset", "mit_indoor67", "--source", "scratch"], "manual", False),
    (["--dataset", "cifar10", "--source", "no/such/file.pth"], "neither a file", True),
    (["--dataset", "cifar10", "--source", "imagenet"], "resnet18-f37072fd.pth", True),
])
def test_cli_bad_input_exits_with_code_2_and_a_message(args, message, mock, capsys, tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))  # nothing prepared there
  with pytest.raises(SystemExit) as exit_info:
    if mock:
      with tfds.testing.mock_data(num_examples=8):
        cli.train_main(args + ["--workdir", str(tmp_path)])
    else:
      cli.train_main(args + ["--workdir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert message.lower() in capsys.readouterr().err.lower()


def test_runs_that_differ_outside_the_step_groups_share_one_step_function():
  model = loop.create_model(tiny(), num_classes=10)
  first = step_lib.steps_for(model, tiny(seed=0), 2)
  other_run = tiny(seed=3, source="unrelated", dataset="offline-related", eval_every=1, fsdp=True, plots=True,
                   pretrain_steps=7)
  assert step_lib.steps_for(model, other_run, 2) is first  # the same Steps: the same function objects
  for changed in (tiny(momentum=0.5), tiny(crop=6), tiny(width=0.25), tiny(projection="always"), tiny(method="l2-sp"),
                  tiny(knowdist_weight=2.0)):
    assert step_lib.steps_for(model, changed, 2).train_step is not first.train_step, changed


def test_the_library_steps_are_unjitted_and_placement_jits_them():
  model = loop.create_model(tiny(), num_classes=10)
  _, train_step, eval_step, _ = step_lib.steps_for(model, tiny(), 2)
  assert not hasattr(train_step, "lower") and not hasattr(eval_step, "lower")  # plain Python functions
  assert hasattr(jax.jit(train_step), "lower")


@pytest.fixture(scope="module")
def validation_run(tmp_path_factory):
  """``(workdir, results)`` of one short run with a validation split, trained once for the module: the validation
  test reads its evaluations, the provenance test its record (any run's: no run of its own)."""
  workdir = tmp_path_factory.mktemp("validation_run")
  return workdir, loop.train(tiny(val_fraction=0.2, steps=2, eval_every=2), workdir)


def test_validation_split_is_carved_from_the_training_pool_and_evaluated(validation_run):
  pool = load_data(tiny())
  data = load_data(tiny(val_fraction=0.2, seed=1))
  assert data.val_batches is not None and data.split["seed"] == 1  # the run's seed redraws the split
  val_count = sum(int(b["mask"].sum()) for b in data.val_batches())
  assert data.num_train + val_count == pool.num_train and val_count == data.split["num_val"] > 0
  assert load_data(tiny(val_fraction=0.2, seed=1, split_seed=5)).split["seed"] == 5
  workdir, results = validation_run
  evaluations = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eval"' in line]
  assert results["val_accuracy"] == evaluations[-1]["val_accuracy"] and "test_accuracy" in evaluations[-1]
  assert (results["reg_weight"], results["reg_decay"]) == (tiny().recipe.reg_weight, tiny().recipe.reg_decay)


def test_scratch_method_ignores_the_source_and_trains_as_fine_tuning_from_scratch(tmp_path):
  scratch = loop.train(tiny(method="scratch", source="related", steps=2, eval_every=2), tmp_path / "a")
  fine_tune = loop.train(tiny(method="fine-tune", source="scratch", steps=2, eval_every=2), tmp_path / "b")
  assert scratch["test_accuracy"] == fine_tune["test_accuracy"] and scratch["label"] == "From scratch"
  assert open(tmp_path / "a" / "metrics.jsonl").read() == open(tmp_path / "b" / "metrics.jsonl").read()


def test_a_sweep_without_a_validation_split_is_refused(tmp_path, capsys):
  args = ["--workdir", str(tmp_path), "--preset", "tiny", "--reg-weight", "0.1,1", "--no-progress"]
  with pytest.raises(SystemExit) as exit_info:
    cli.train_main(args)
  assert exit_info.value.code == 2 and "--val-fraction" in capsys.readouterr().err
  assert not os.listdir(tmp_path) if os.path.exists(tmp_path) else True


def test_cli_sweep_picks_the_best_mean_validation_accuracy_and_draws_the_lambda_curve_and_figures(tmp_path, capsys):
  args = ["--workdir", str(tmp_path), "--preset", "tiny", "--method", "fine-tune,l2-sp,dtnh-l2-sp", "--source",
          "related", "--seeds", "0,1", "--reg-weight", "0.1,1", "--val-fraction", "0.2", "--steps", "3",
          "--eval-every", "3", "--checkpoint-every", "3", "--no-progress"]  # one checkpoint a run: none is read
  assert cli.train_main(args) == 0
  # Figures 3-5 of the paper from the swept runs (their drawing from made-up runs: tests/test_report_figures.py)
  drawn = json.load(open(tmp_path / "figures.json"))
  assert drawn["regularizer"] == "l2-sp" and drawn["field"] == "val_accuracy"
  assert (tmp_path / "figure3_losses.png").exists() and (tmp_path / "figure4_5_angles.png").exists()
  assert drawn["angles"]["angle_steps"] == 3 and drawn["angles"]["plain_angle_steps"] >= 1
  assert "Figures 3-5" in capsys.readouterr().out
  records = json.load(open(tmp_path / "results.json"))
  assert len(records) == 2 + 2 * 2 * 2  # fine-tuning once per seed, each regularized method per λ and seed
  for method in ("l2-sp", "dtnh-l2-sp"):
    runs = [r for r in records if r["method"] == method]
    mean_val = {w: np.mean([r["val_accuracy"] for r in runs if r["reg_weight"] == w]) for w in (0.1, 1.0)}
    best = max(mean_val, key=lambda w: (mean_val[w], -w))  # ties: the weaker λ
    assert {r["reg_weight"] for r in runs if r["selected"]} == {best}
  assert (tmp_path / "lambda_curve.png").exists()
  assert "Δ" in open(tmp_path / "results.md").read()


@pytest.mark.parametrize("projection", ["pcgrad", "upgrad", "cagrad"])
def test_projection_selects_the_aggregator_in_the_optimizer(projection):
  import optax
  import dtnh_jax
  config = tiny(method="dtnh-l2-sp", projection=projection, cagrad_c=0.4)
  tx = step_lib.make_optimizer(config, steps_per_epoch=2)
  extra = {"c": 0.4} if projection == "cagrad" else {}
  reg_weight = optax.exponential_decay(config.recipe.reg_weight, 2, config.recipe.reg_decay, staircase=True)
  expected = optax.chain(getattr(dtnh_jax, projection)(reg_weight, **extra),
                         optax.sgd(optax.piecewise_constant_schedule(config.recipe.learning_rate, {4: 0.1}),
                                   momentum=config.recipe.momentum))
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}
  g = {"w": jnp.array([0.2, 0.1, -0.4]), "b": jnp.array([0.5])}
  r = {"w": jnp.array([-0.3, 0.2, 0.1]), "b": jnp.array([-1.0])}
  got, _ = tx.update((g, r), tx.init(params), params)
  want, _ = expected.update((g, r), expected.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_run_with_an_aggregator_is_labelled_by_it(tmp_path):
  results = loop.train(tiny(method="dtnh-l2-sp", projection="pcgrad", steps=2, eval_every=2), tmp_path)
  assert results["label"] == "PCGrad (L2-SP)" and results["projection"] == "pcgrad"
  assert "angle1" in json.loads(open(tmp_path / "metrics.jsonl").readline())  # the same diagnostics as DTNH


def test_max_angle_reaches_dtnh_and_is_refused_with_an_aggregator():
  with pytest.raises(ConfigError, match="--max-angle"):
    tiny(projection="pcgrad", max_angle=60.0)
  with pytest.raises(ConfigError, match="--max-angle"):
    tiny(max_angle=200.0)
  assert step_lib.make_optimizer(tiny(max_angle=60.0), 2) is not None


def test_results_record_where_they_were_computed(validation_run):
  workdir, results = validation_run
  record = results["provenance"]
  assert record["versions"]["jax"] == jax.__version__ and record["backend"] == jax.default_backend()
  assert record["cpu"] and record["devices"].startswith(f"{jax.device_count()} x ")
  assert json.load(open(workdir / "results.json"))["provenance"] == record


def test_delta_attention_fits_its_head_on_a_whole_epoch_and_ranks_channels_on_four_batches(tiny_problem,
                                                                                          counted_delta_attention):
  data, _ = tiny_problem
  attention, seen = counted_delta_attention
  assert data.steps_per_epoch > 4  # so that a whole epoch and the released code's 4 batches differ
  assert seen == {"head": data.steps_per_epoch * tiny().recipe.batch_size, "ranked": 4}
  assert all(np.isclose(weights.sum(), 1.0) for weights in attention.values())


def test_a_grid_trains_from_scratch_once_whatever_the_sources_and_sweeps_only_regularized_methods():
  methods = [Method.parse(m) for m in ("scratch", "fine-tune", "dtnh-l2-sp")]
  runs = config_lib.grid_runs(["related", "unrelated"], methods, [0, 1], [(0.1, 1.0), (1.0, 1.0)])
  scratch = [(source, seed) for source, method, seed, _ in runs if method.from_scratch]
  assert scratch == [("related", 0), ("related", 1)]
  assert sum(method.name == "fine-tune" for _, method, _, _ in runs) == 2 * 2  # per source and seed
  assert sum(method.name == "dtnh-l2-sp" for _, method, _, _ in runs) == 2 * 2 * 2  # and per λ


def test_an_offline_source_is_pre_trained_on_its_whole_pool_whatever_the_run_s_validation_carve(tmp_path, monkeypatch):
  monkeypatch.setenv("DTNH_JAX_CACHE", str(tmp_path / "cache"))
  carved, whole = tiny(source="unrelated", val_fraction=0.25), tiny(source="unrelated")
  assert sources.offline_source_path("unrelated", carved) == sources.offline_source_path("unrelated", whole)
  path = sources.pretrain_sources(carved, ["unrelated"])["unrelated"]
  pretraining = json.load(open(os.path.join(path + ".run", "results.json")))
  assert pretraining.get("split") is None and pretraining.get("val_accuracy") is None
