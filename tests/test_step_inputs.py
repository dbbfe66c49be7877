"""λ (``reg_weight``), its decay (``reg_decay``), the learning rate and its drops are inputs of the compiled
train step, not part of it, and the number of steps is not read by it.

A sweep over them runs every method with one compiled step (per kind of step: a plain method has two; per
number of learning-rate drops), reading them from the step's ``Reference``; for fixed settings the step computes
exactly what the step with them compiled in computes, and the learning rate is optax's
``piecewise_constant_schedule`` bit for bit.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax.models import resnet
from dtnh_jax.train import loop, presets
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.data import load_data

#: (reg_weight, reg_decay, learning_rate, lr_drop_steps, steps, seed) of the sweep: three λ, a decay changed, two
#: learning rates, the drop moved, another number of steps, and a second seed.
SWEEP = ((0.3, 0.9, 0.01, (1,), 2, 0), (0.6, 0.9, 0.01, (1,), 2, 0), (1.2, 0.5, 0.0173, (1,), 2, 0),
         (0.3, 0.9, 0.01, (2,), 3, 0), (0.3, 0.9, 0.01, (1,), 2, 1))


def run_name(run):
  return "-".join(map(str, run)).replace("(", "").replace(")", "").replace(",", "")


def tiny(**overrides):
  return presets.get("tiny", **overrides)


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """The tiny l2-sp runs of :data:`SWEEP`: the train steps traced meanwhile, and each run's train records."""
  records, jax_logger = _Records(), logging.getLogger("jax")
  jax_logger.addHandler(records)
  level = jax_logger.level
  jax_logger.setLevel(logging.WARNING)  # what jax.log_compiles logs at
  workdir = tmp_path_factory.mktemp("sweep")
  base = tiny(method="l2-sp", eval_every=2, checkpoint_every=2)
  data = load_data(base)  # shared, as a grid's runs share it
  try:
    with jax.log_compiles(True):
      for run in SWEEP:
        weight, decay, learning_rate, drops, steps, seed = run
        loop.train(base.replace(reg_weight=weight, reg_decay=decay, learning_rate=learning_rate, lr_drop_steps=drops,
                                steps=steps, seed=seed), workdir / run_name(run), data=data)
  finally:
    jax_logger.removeHandler(records)
    jax_logger.setLevel(level)
  traced = [m for m in records.messages if "Finished tracing" in m and "train_step" in m]
  runs = {run: [json.loads(line) for line in open(workdir / run_name(run) / "metrics.jsonl") if '"train"' in line]
          for run in SWEEP}
  return traced, runs


def test_runs_that_differ_only_in_their_step_inputs_or_length_share_one_step_function():
  model = loop.create_model(tiny(), num_classes=10)
  first = step_lib.steps_for(model, tiny(method="dtnh-l2-sp"), 2)
  other = tiny(method="dtnh-l2-sp", reg_weight=0.01, reg_decay=0.5, learning_rate=0.3, lr_drop_steps=(2, 9, 2),
               lr_drop_factor=0.5, steps=11)
  assert tiny().recipe.lr_drop_steps == (4,) and other.recipe.lr_drop_steps != (4,)
  assert step_lib.steps_for(model, other.replace(lr_drop_steps=(9,)), 2) is first


def test_runs_of_every_method_of_one_model_evaluate_with_one_traced_program():
  """The eval step is one function per model and is compiled on the parameters and BatchNorm statistics alone:
  optimizer states of other structures (another method) trace it no second time."""
  from dtnh_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = tiny()
  data = load_data(config)
  model = loop.create_model(config, data.num_classes)
  initial = loop.initial_variables(config, data)
  batch = next(iter(data.eval_batches()))
  methods = ("dtnh-l2-sp", "knowdist", "fine-tune")  # three optimizer states of different structures
  steps = [step_lib.steps_for(model, config.replace(method=method), 2) for method in methods]
  assert all(s.eval_step is steps[0].eval_step for s in steps)
  traced = []
  counted = lambda state, batch: traced.append(1) or steps[0].eval_step(state, batch)
  for method_steps in steps:
    state = step_lib.create_train_state(initial, method_steps.tx, jax.random.PRNGKey(0))
    placement = sharding.Placement.create(state, step_lib.Reference(initial))
    sums = placement.jit_eval_step(counted)(placement.put_state(state), placement.put_batch(batch))
    assert float(sums["count"]) == len(batch["label"])
  assert len(traced) == 1


def test_the_number_of_distinct_learning_rate_drops_is_part_of_the_step():
  model = loop.create_model(tiny(), num_classes=10)
  one = step_lib.steps_for(model, tiny(lr_drop_steps=(4,)), 2)
  assert step_lib.steps_for(model, tiny(lr_drop_steps=(4, 4)), 2) is one  # optax's schedule counts a step once
  assert step_lib.steps_for(model, tiny(lr_drop_steps=(2, 4)), 2) is not one
  assert step_lib.steps_for(model, tiny(lr_drop_steps=()), 2) is not one


def test_a_sweep_of_lambda_learning_rate_and_seeds_traces_each_train_step_once(sweep):
  traced, runs = sweep
  # the plain method's two steps (angles logged or not), each traced (and compiled, or loaded from the compilation
  # cache) once for the three λ, the two learning rates, both drops, both lengths and the two seeds
  assert len([m for m in traced if "summed_train_step" in m]) == 1, traced
  assert len(traced) == 2, traced
  # and the second seed is another run: its batches, its losses
  assert [r["loss_empirical"] for r in runs[SWEEP[0]]] != [r["loss_empirical"] for r in runs[SWEEP[-1]]]


def test_each_run_of_a_sweep_weighs_its_regularizer_with_its_own_lambda(sweep):
  _, runs = sweep
  for (weight, _, _, _, steps, _), records in runs.items():
    assert [r["reg_weight"] for r in records] == [float(np.float32(weight))] * steps  # every step in the first epoch


def test_each_run_of_a_sweep_steps_with_its_own_learning_rate(sweep):
  _, runs = sweep
  # the same first batch, state and λ: the first step's loss is the same, the second's follows the learning rate
  base, faster, later_drop = (runs[SWEEP[index]] for index in (0, 2, 3))
  assert base[0]["loss_empirical"] == faster[0]["loss_empirical"] == later_drop[0]["loss_empirical"]
  assert abs(base[1]["loss_empirical"] - faster[1]["loss_empirical"]) > 1e-3
  # dropped from the second update or from the third: the first update is the same, so is the loss after it (up
  # to rounding: the 2-step run computes step 2 in its logged step, the 3-step run in its summed one)
  np.testing.assert_allclose(base[1]["loss_empirical"], later_drop[1]["loss_empirical"], rtol=1e-6)
  assert len(later_drop) == 3


def _setup(method, **overrides):
  config = tiny(method=method, **overrides)
  data = load_data(config)
  model = loop.create_model(config, data.num_classes)
  initial = loop.initial_variables(config, data)
  batches = [b for _, b in zip(range(4), data.train_loader(0))]
  return config, model, initial, batches


def _one_block_setup(method, **overrides):
  """``_setup`` with the tiny preset's ResNet cut to its stem, one residual block and the head (the ResNet-10 has
  four blocks and three downsampling shortcuts): the same kinds of layers, a quarter of the program to compile."""
  config, _, _, batches = _setup(method, **overrides)
  model = resnet.ResNet(block_cls=resnet.BasicBlock, stage_sizes=(1, 0, 0, 0), num_classes=10,
                        width=config.model.width, small_stem=config.model.small_stem)
  initial = dict(model.init(jax.random.key(1), batches[0]["image"], train=False))
  return config, model, initial, batches


# fine-tuning's steps read their learning rate through the same optimizer as L2-SP's plain steps (step.py's
# base_optimizer, whatever the method): L2-SP's case checks that input for both; fine-tuning's own rule (no λ
# needed, the learning rate still is) is test_a_shared_step_given_no_inputs_says_where_they_go's
@pytest.mark.parametrize("method", ["l2-sp", "dtnh-l2-sp"])
def test_inputs_compute_exactly_what_the_settings_compiled_in_do(method, exact_jit):
  # λ halves every 2 steps, the learning rate drops twice; a plain method alternates its summed and logged steps
  # as a run with --log-every 2. Half the tiny preset's width and one residual block: each step here is compiled
  # twice with XLA's slower default emitters (4 of 6 CPU-s per step for the tiny ResNet-10), and how λ and the
  # learning rate reach the update depends on neither the width nor the depth
  config, model, initial, batches = _one_block_setup(method, reg_weight=0.7, reg_decay=0.5, learning_rate=0.05,
                                                     lr_drop_steps=(3, 2), lr_drop_factor=0.3, width=0.0625)
  shared = step_lib.steps_for(model, config, 2)  # λ read from the reference
  compiled_in = [step_lib.make_train_step(model, config, 2)]
  if shared.summed_train_step is not None:
    compiled_in.insert(0, step_lib.make_train_step(model, config, 2, summed=True))
  shared_steps = [exact_jit(fn) for fn in filter(None, (shared.summed_train_step, shared.train_step))]
  compiled_in = [exact_jit(fn) for fn in compiled_in]
  reference = step_lib.Reference(initial)
  with_inputs = step_lib.Reference.of(config, initial)
  state = step_lib.create_train_state(initial, shared.tx, jax.random.key(0))
  expected, actual = state, jax.tree.map(jnp.copy, state)
  for index, batch in enumerate(batches):
    expected, expected_metrics = compiled_in[index % len(compiled_in)](expected, batch, reference)
    actual, actual_metrics = shared_steps[index % len(shared_steps)](actual, batch, with_inputs)
    assert actual_metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
      np.testing.assert_array_equal(actual_metrics[key], value, err_msg=f"step {index + 1}: {key}")
  assert float(actual_metrics["reg_weight"]) == np.float32(0.7 * 0.5)
  computed = lambda state: (state.step, state.params, state.batch_stats, state.opt_state)
  for a, b in zip(jax.tree.leaves(computed(actual)), jax.tree.leaves(computed(expected)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["l2-sp", "fine-tune"])
def test_a_shared_step_given_no_inputs_says_where_they_go(method):
  config, model, initial, batches = _setup(method)
  steps = step_lib.steps_for(model, config, 2)
  state = step_lib.create_train_state(initial, steps.tx, jax.random.key(0))
  with pytest.raises(ValueError, match=r"Reference\.of\(config, variables\)"):
    jax.eval_shape(steps.train_step, state, batches[0], step_lib.Reference(initial))


@pytest.mark.parametrize("drops", [(), (3,), (5, 2, 5), (1, 2, 4)])
def test_learning_rate_schedule_is_optax_piecewise_constant_bit_for_bit(drops):
  import optax  # pylint: disable=g-import-not-at-top
  config = tiny(learning_rate=0.03, lr_drop_steps=drops, lr_drop_factor=0.3)
  expected = optax.piecewise_constant_schedule(0.03, {step: 0.3 for step in drops})
  traced = jax.jit(lambda inputs, count: step_lib.learning_rate_schedule(inputs)(count))
  inputs = step_lib.LearningRate.of(config)
  for count in range(8):
    want = np.float32(expected(jnp.int32(count)))
    assert np.float32(traced(inputs, jnp.int32(count))) == want, count
    assert np.float32(step_lib.learning_rate_schedule(inputs)(jnp.int32(count))) == want, count


@pytest.mark.parametrize("reg_decay", [0.0, 0.5, 1.0])
def test_epoch_schedule_is_optax_exponential_decay_staircase_also_at_decay_zero(reg_decay):
  """--reg-decay 0 is no decay, as optax's schedule (its help says so); a traced decay gives the same λ."""
  import optax  # pylint: disable=g-import-not-at-top
  expected = optax.exponential_decay(2.0, transition_steps=3, decay_rate=reg_decay, staircase=True)
  ours = step_lib.epoch_schedule(jnp.float32(2.0), jnp.float32(reg_decay), steps_per_epoch=3)
  np.testing.assert_allclose([ours(count) for count in range(10)], [expected(count) for count in range(10)],
                             rtol=1e-6)
