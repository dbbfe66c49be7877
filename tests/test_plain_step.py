"""The plain regularized methods (L2, L2-SP, KnowDist, DELTA) at the cost of the method as usually written.

On the steps that log no angles a plain method runs ``summed_train_step``:
one backward pass of ``J + λ Ω``, no DTNH transformation. On the logged steps
it runs the split-gradient step with ``dtnh(projection="none")``, which
computes the same update from the two gradients and logs the angles. These
tests check the same λ schedule and what a run logs; that the two make the same
update (up to float rounding), metrics and state, and that the summed step
compiles one backward pass, is checked on every plain method's compiled steps
in tests/test_train.py (``test_every_method_builds_its_steps...``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from dtnh_jax.train import loop, presets
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.data import load_data


def tiny(**overrides):
  return presets.get("tiny", **overrides)


@pytest.fixture(scope="module")
def digits():
  data = load_data(tiny())
  return data, [next(data.train_loader(0)) for _ in range(1)] + [b for _, b in zip(range(3), data.train_loader(1))]


def _setup(method, data, **overrides):
  config = tiny(method=method, **overrides)
  model = loop.create_model(config, data.num_classes)
  initial = loop.initial_variables(config, data)
  attention = None
  if method == "delta":
    _, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, return_features=True), initial,
                                 jnp.zeros((2, config.recipe.crop, config.recipe.crop, 3)))
    attention = {k: jnp.linspace(0.5, 1.5, features[k].shape[-1]) for k in config.regularizer.feature_layers}
  steps = step_lib.steps_for(model, config, 2)
  state = step_lib.create_train_state(initial, steps.tx, jax.random.key(0))
  return model, steps, state, step_lib.Reference.of(config, initial, attention)


def test_summed_step_follows_the_same_lambda_schedule(digits):
  data, batches = digits
  _, steps, state, reference = _setup("l2-sp", data, reg_decay=0.5)  # 2 steps per epoch: λ halves every 2 steps
  logged, summed = jax.jit(steps.train_step), jax.jit(steps.summed_train_step)
  weights = []
  for index, batch in enumerate(batches):  # alternating, as a run with --log-every 2 does
    state, metrics = (summed if index % 2 == 0 else logged)(state, batch, reference)
    weights.append(float(metrics["reg_weight"]))
  assert weights == [1.0, 1.0, 0.5, 0.5]
  assert int(state.opt_state[0].count) == 4  # DTNH's step counter advanced on every step


def test_dtnh_and_fine_tuning_have_no_summed_step(digits):
  data, _ = digits
  for method in ("fine-tune", "dtnh-l2-sp", "dtnh-knowdist"):
    steps = _setup(method, data)[1]
    assert steps.summed_train_step is None
    assert steps.train_step_at(1, 3, 6) is steps.train_step


def test_plain_run_logs_angles_on_the_logged_steps_only(tmp_path):
  loop.train(tiny(method="l2-sp", steps=6, log_every=3, eval_every=3), tmp_path)
  train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"train"' in line]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # every step has its line
  assert [r["step"] for r in train if "angle1" in r] == [3, 6]
  assert all("reg_weight" in r for r in train)
  # L2-SP's value is a pass over the weights that the one-backward-pass steps skip
  assert [r["step"] for r in train if "loss_regularizer" in r] == [3, 6]
