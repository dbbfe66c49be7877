"""``--preset released-code``: DTNH(L2-SP) as the authors' released ``grod.py`` runs it.

Checked against the released code's rules written out in NumPy: its λ counter
(one tick per corrected tensor per step, the first step skipped), its
per-tensor correction of every step on the non-FC tensors, the head left
alone, and the 1e-4 L2 decay added after the correction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtnh_jax.train import loop, presets
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.data import load_data


def released_counter_weights(steps: int, num_tensors: int, alpha=0.1, decay=0.99) -> list[list[float]]:
  """Per step, the coefficient of each tensor as ``GrodOptimizer.minimize`` computes it (None: first step)."""
  counter, first, weights = 1, True, []
  for _ in range(steps):
    step = []
    for _ in range(num_tensors):
      coefficient = alpha * decay ** (counter // 5000)
      if not first:
        step.append(coefficient)
        counter += 1
    first = False
    weights.append(step)
  return weights


@pytest.mark.parametrize("num_tensors", [60, 161])
def test_schedule_is_the_released_counter_at_each_steps_first_tensor(num_tensors):
  steps = 400
  schedule = step_lib.released_code_schedule(0.1, 0.99, num_tensors)
  ours = np.asarray(jax.vmap(schedule)(jnp.arange(steps)))
  reference = released_counter_weights(steps, num_tensors)
  assert ours[0] == 0 and reference[0] == []  # the first step is left unregularized
  for k in range(1, steps):
    np.testing.assert_allclose(ours[k], reference[k][0], rtol=1e-6)
    assert min(reference[k]) >= ours[k] * 0.99 * (1 - 1e-6)  # a step's later tensors: at most one decay more
  assert ours[-1] < ours[1]  # it does decay within 400 steps (every 5000 / num_tensors steps)


def test_resnet18_has_the_60_non_fc_tensors_that_the_released_counter_ticks_for():
  config = presets.get("released-code", crop=32, resize=32)
  model = loop.create_model(config, num_classes=10)
  assert step_lib.backbone_tensor_count(model, config) == 60
  torchvision = pytest.importorskip("torchvision")
  assert len([n for n, _ in torchvision.models.resnet18().named_parameters() if not n.startswith("fc.")]) == 60


@pytest.fixture(scope="module")
def tiny_released():
  config = presets.get("tiny", **{k: v for k, v in presets.released_code().items()
                                  if k not in ("dataset", "steps", "lr_drop_steps")})
  data = load_data(config)
  model = loop.create_model(config, data.num_classes)
  return config, data, model


def test_released_code_update_matches_the_rules_in_numpy(tiny_released):
  config, data, model = tiny_released
  initial = loop.initial_variables(config, data)
  num_tensors = step_lib.backbone_tensor_count(model, config)
  tx = step_lib.make_optimizer(config, steps_per_epoch=2, num_tensors=num_tensors)
  reference = step_lib.Reference(initial)
  (l2_sp,) = step_lib.closed_form_regularizers(config, reference)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda w: w + 0.01 * rng.normal(size=w.shape).astype(np.float32), initial["params"])
  grads = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)
  regularizer = l2_sp.grad(params)
  state = tx.init(params)
  lr, decay, weight = config.recipe.learning_rate, config.recipe.weight_decay, config.recipe.reg_weight
  momentum = config.recipe.momentum
  for count in range(2):  # λ = 0 on the first step, reg_weight on the second (no decay: counter < 5000)
    updates, state = tx.update((grads, regularizer), state, params)
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  corrected = 0
  for (path, w), (_, g), (_, w0), (_, r), (_, u) in zip(flat(params), flat(grads), flat(initial["params"]),
                                                        flat(regularizer), flat(updates)):
    w, g, w0 = (np.asarray(x, np.float64) for x in (w, g, w0))
    directions = []
    for lam in (0.0, weight):
      if path[0].key == "fc":  # the head: neither regularized nor corrected
        assert r is None or not np.any(r)
        d = g
      else:  # every other tensor, BatchNorm included: r = w - w0, its component along g always removed
        np.testing.assert_allclose(r, w - w0, rtol=1e-5, atol=1e-8)
        d = g + lam * ((w - w0) - np.vdot(g, w - w0) / np.vdot(g, g) * g)
      directions.append(d + decay * w)  # the optimizer's L2 decay, after the correction
    corrected += path[0].key != "fc"
    # SGD with momentum, two steps: the second update is -lr (d_1 + momentum d_0)
    np.testing.assert_allclose(u, -lr * (directions[1] + momentum * directions[0]), rtol=1e-4, atol=1e-9)
  assert corrected == step_lib.backbone_tensor_count(model, config)


def test_released_code_preset_trains(tiny_released, tmp_path):
  config, _, _ = tiny_released
  results = loop.train(config.replace(steps=2, eval_every=2, checkpoint_every=2), tmp_path)
  assert results["method"] == "dtnh-l2-sp" and 0 <= results["test_accuracy"] <= 1


def test_official_head_term_of_knowdist_adds_beta_w_to_the_head_only_unprojected(tiny_released):
  _, data, model = tiny_released
  for method in ("knowdist", "dtnh-knowdist"):
    config = presets.get("tiny", method=method, head_beta=0.01)
    initial = loop.initial_variables(config, data)
    params = initial["params"]
    with_beta = step_lib.make_optimizer(config, 2)
    without = step_lib.make_optimizer(config.replace(head_beta=0.0), 2)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)
    regularizer = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)
    a, _ = with_beta.update((grads, regularizer), with_beta.init(params), params)
    b, _ = without.update((grads, regularizer), without.init(params), params)
    lr = config.recipe.learning_rate
    for name in params:  # the first SGD step is -lr · direction: the difference is -lr · β · w on the head
      for x, y, w in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), jax.tree.leaves(params[name])):
        expected = -lr * 0.01 * np.asarray(w) if name == "fc" else 0.0
        np.testing.assert_allclose(np.asarray(x) - np.asarray(y), expected, atol=1e-7)
  assert presets.get("paper").regularizer.head_beta == 0.01 and presets.get("offline").regularizer.head_beta == 0
