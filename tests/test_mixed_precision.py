"""Mixed precision: bf16 compute, float32 parameters, gradients, regularizers and DTNH.

With ``compute_dtype="bfloat16"`` the network's convolutions and activations
run in bf16; its parameters and BatchNorm statistics stay float32, so the
gradients of the loss terms come back float32 (a gradient has its parameter's
dtype), and DTNH's inner products, projection and the optimizer work in
float32 as under full precision.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dtnh_jax
from dtnh_jax import models, regularizers
from dtnh_jax.train import TrainConfig, checkpoint, loop
from dtnh_jax.train import presets

BF16 = {**presets.tiny(), "compute_dtype": "bfloat16", "steps": 2, "lr_drop_steps": (1,), "eval_every": 2,
        "log_every": 2, "checkpoint_every": 2, "plots": False}
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _dtypes(tree):
  return {str(np.asarray(leaf).dtype) for leaf in jax.tree.leaves(tree)}


def test_bf16_model_computes_in_bf16_and_keeps_float32_parameters():
  model = loop.create_model(TrainConfig.create(**BF16), num_classes=10)
  variables = models.init_variables(model, 0, 8)
  logits, features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, jnp.zeros((2, 8, 8, 3)))
  assert {features[layer].dtype for layer in LAYERS} == {jnp.dtype(jnp.bfloat16)}
  assert logits.dtype == jnp.float32
  assert _dtypes(variables) == {"float32"}


# a closed-form regularizer (L2's path is L2-SP's) and a feature one (DELTA: KnowDist's features and attention);
# each regularizer's own bf16 gradients: test_dtnh_invariants_hold_on_the_gradients_of_a_bf16_step
@pytest.mark.parametrize("method", ["dtnh-l2-sp", "dtnh-delta"])
def test_bf16_run_trains_with_a_closed_form_and_a_feature_regularizer(method, tmp_path):
  loop.train(TrainConfig.create(**{**BF16, "method": method}), tmp_path)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  for record in train:
    assert record["skipped"] == 0.0
    assert np.isfinite([record["loss_empirical"], record["loss_regularizer"], record["angle1"]]).all()
  checkpoints = checkpoint.Checkpoints(tmp_path)
  _, state, _, _ = checkpoints.restore(None)
  checkpoints.close()
  assert _dtypes(state["params"]) == _dtypes(state["batch_stats"]) == {"float32"}


def _vdot64(a, b):
  """<a, b> in float64 from the float32 values: the exact value of the step's numbers."""
  return sum(float(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def bf16_networks():
  """``(model, source, target, images, labels, source_features)``: a bf16 ResNet-10 (the tiny preset's, with the
  ResNet-18's stages), its "pre-trained" variables and those being fine-tuned away from them, a batch and the
  source's features on it. The same for every regularizer's case: built once for the module."""
  model = models.create_model("resnet10", num_classes=10, width=0.125, small_stem=True, dtype=jnp.bfloat16)
  source = models.init_variables(model, 0, 8)   # the "pre-trained" network
  target = models.init_variables(model, 1, 8)   # the network being fine-tuned, away from it
  images = jax.random.normal(jax.random.PRNGKey(2), (16, 8, 8, 3))
  labels = jnp.arange(16) % 10
  return model, source, target, images, labels, regularizers.source_features(model, source, images, LAYERS)


#: The regularizers whose bf16 gradients are checked, in the order of ``bf16_gradients``' regularizer gradients.
REGULARIZERS = ("knowdist", "delta", "l2-sp")


@pytest.fixture(scope="module")
def bf16_gradients(bf16_networks):
  """``(params, empirical, {regularizer: gradient})``: the gradients of one bf16 train-mode forward pass of the
  target network, the empirical loss's and each regularizer's of ``REGULARIZERS`` (KnowDist's and DELTA's from
  the features, L2-SP's in closed form), from one ``split_value_and_grad`` program: one compile, not one per
  regularizer (each term's gradient is pulled back on its own, so it is the gradient a program with that
  regularizer alone computes)."""
  model, source, target, images, labels, source_features = bf16_networks
  attention = {layer: jnp.full(source_features[layer].shape[-1:], 1.0 / source_features[layer].shape[-1])
               for layer in LAYERS}

  def loss_terms(params):
    (logits, features), _ = model.apply({"params": params, "batch_stats": target["batch_stats"]}, images,
                                        train=True, return_features=True, mutable=["batch_stats"])
    empirical = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return (empirical, regularizers.feature_distance(features, source_features, LAYERS, normalize="spatial_mean"),
            regularizers.delta(features, source_features, attention, LAYERS))

  closed_form = [regularizers.l2_sp_regularizer(source["params"], 1.0, 0.01)]
  grad_fn = jax.jit(dtnh_jax.split_value_and_grad(loss_terms, closed_form=closed_form))
  _, (empirical, *regularizer_grads) = grad_fn(target["params"])
  return target["params"], empirical, dict(zip(REGULARIZERS, regularizer_grads, strict=True))


@jax.jit
def _dtnh_direction(empirical, regularizer, params):
  """DTNH's (``reg_weight=0.5``) direction of a first step: jitted, one program for every case, not one dispatch
  per operation of every tensor."""
  tx = dtnh_jax.dtnh(reg_weight=0.5)
  return tx.update((empirical, regularizer), tx.init(params), params)[0]


@pytest.mark.parametrize("regularizer", REGULARIZERS)
def test_dtnh_invariants_hold_on_the_gradients_of_a_bf16_step(regularizer, bf16_gradients):
  params, empirical, regularizer_grads = bf16_gradients
  regularizer_grad = regularizer_grads[regularizer]
  assert _dtypes(empirical) == _dtypes(regularizer_grad) == {"float32"}  # bf16 compute, float32 gradients

  conflicts = []
  for sign in (1.0, -1.0):  # one of r and -r conflicts with g (the projection is exercised)
    r = jax.tree.map(lambda leaf, sign=sign: sign * leaf, regularizer_grad)
    d = _dtnh_direction(empirical, r, params)
    assert _dtypes(d) == {"float32"}
    g_g, d_g, kept_r = _vdot64(empirical, empirical), _vdot64(d, empirical), _vdot64(
        jax.tree.map(jnp.subtract, d, empirical), r)
    tolerance = 1e-5 * np.sqrt(_vdot64(d, d) * max(g_g, _vdot64(r, r)))  # float32 rounding of the step
    assert d_g >= g_g - tolerance, (sign, d_g, g_g)            # never slower on the empirical loss
    assert kept_r >= -tolerance, (sign, kept_r)                 # what is kept of r points along r
    conflicts.append(_vdot64(empirical, r) < 0)
  assert any(conflicts)
