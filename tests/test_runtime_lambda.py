"""λ (``reg_weight``) and its decay (``reg_decay``) are inputs of the compiled train step, not part of it.

A sweep over λ runs every regularized method with one compiled step (per kind of step: a plain method has
two), reading λ and its decay from the step's ``Reference``; for a fixed λ the step computes exactly what the
step with λ compiled in computes.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax.train import loop, presets
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.data import load_data

#: (reg_weight, reg_decay, seed) of the sweep: three λ, a decay changed too, and a second seed.
SWEEP = ((0.3, 0.9, 0), (0.6, 0.9, 0), (1.2, 0.5, 0), (0.3, 0.9, 1))
#: A learning rate no other test uses: the sweep's step is one this process has not traced yet.
LEARNING_RATE = 0.0173


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
  base = tiny(method="l2-sp", learning_rate=LEARNING_RATE, steps=2, eval_every=2, checkpoint_every=2)
  data = load_data(base)  # shared, as a grid's runs share it
  try:
    with jax.log_compiles(True):
      for weight, decay, seed in SWEEP:
        loop.train(base.replace(reg_weight=weight, reg_decay=decay, seed=seed), workdir / f"{weight}-{decay}-{seed}",
                   data=data)
  finally:
    jax_logger.removeHandler(records)
    jax_logger.setLevel(level)
  traced = [m for m in records.messages if "Finished tracing" in m and "train_step" in m]
  runs = {run: [json.loads(line) for line in open(workdir / "-".join(map(str, run)) / "metrics.jsonl")
                if '"train"' in line] for run in SWEEP}
  return traced, runs


def test_runs_that_differ_only_in_lambda_and_its_decay_share_one_step_function():
  model = loop.create_model(tiny(), num_classes=10)
  first = step_lib.steps_for(model, tiny(method="dtnh-l2-sp"), 2)
  assert step_lib.steps_for(model, tiny(method="dtnh-l2-sp", reg_weight=0.01, reg_decay=0.5), 2) is first


def test_a_sweep_of_lambda_and_seeds_traces_each_train_step_once(sweep):
  traced, runs = sweep
  # the plain method's two steps (angles logged or not), each traced (and compiled, or loaded from the compilation
  # cache) once for the three λ and the two seeds
  assert len([m for m in traced if "summed_train_step" in m]) == 1, traced
  assert len(traced) == 2, traced
  # and the second seed is another run: its batches, its losses
  assert [r["loss_empirical"] for r in runs[0.3, 0.9, 0]] != [r["loss_empirical"] for r in runs[0.3, 0.9, 1]]


def test_each_run_of_a_sweep_weighs_its_regularizer_with_its_own_lambda(sweep):
  _, runs = sweep
  for (weight, _, _), records in runs.items():
    assert [r["reg_weight"] for r in records] == [float(np.float32(weight))] * 2  # both steps in the first epoch


def _setup(method, **overrides):
  config = tiny(method=method, **overrides)
  data = load_data(config)
  model = loop.create_model(config, data.num_classes)
  initial = loop.initial_variables(config, data)
  batches = [b for _, b in zip(range(4), data.train_loader(0))]
  return config, model, initial, batches


@pytest.mark.parametrize("method", ["l2-sp", "dtnh-l2-sp"])
def test_lambda_as_an_input_computes_exactly_what_lambda_compiled_in_does(method, exact_jit):
  # λ halves every 2 steps; a plain method alternates its summed and logged steps as a run with --log-every 2
  config, model, initial, batches = _setup(method, reg_weight=0.7, reg_decay=0.5)
  shared = step_lib.steps_for(model, config, 2)  # λ read from the reference
  compiled_in = [step_lib.make_train_step(model, config, 2)]
  if shared.summed_train_step is not None:
    compiled_in.insert(0, step_lib.make_train_step(model, config, 2, summed=True))
  shared_steps = [exact_jit(fn) for fn in filter(None, (shared.summed_train_step, shared.train_step))]
  compiled_in = [exact_jit(fn) for fn in compiled_in]
  reference = step_lib.Reference(initial)
  with_inputs = step_lib.Reference(initial, reg_weight=step_lib.RegWeight.of(config))
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


def test_a_shared_step_given_no_lambda_says_where_it_goes():
  config, model, initial, batches = _setup("l2-sp")
  steps = step_lib.steps_for(model, config, 2)
  state = step_lib.create_train_state(initial, steps.tx, jax.random.key(0))
  with pytest.raises(ValueError, match="RegWeight"):
    jax.eval_shape(steps.train_step, state, batches[0], step_lib.Reference(initial))


@pytest.mark.parametrize("reg_decay", [0.0, 0.5, 1.0])
def test_epoch_schedule_is_optax_exponential_decay_staircase_also_at_decay_zero(reg_decay):
  """--reg-decay 0 is no decay, as optax's schedule (its help says so); a traced decay gives the same λ."""
  import optax  # pylint: disable=g-import-not-at-top
  expected = optax.exponential_decay(2.0, transition_steps=3, decay_rate=reg_decay, staircase=True)
  ours = step_lib.epoch_schedule(jnp.float32(2.0), jnp.float32(reg_decay), steps_per_epoch=3)
  np.testing.assert_allclose([ours(count) for count in range(10)], [expected(count) for count in range(10)],
                             rtol=1e-6)
