"""L2, L2-SP, KnowDist and DELTA against hand-written NumPy, autodiff and finite differences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dtnh_jax
from dtnh_jax import regularizers as reg

LAYERS = ("layer1", "layer2")


class Stage(nn.Module):
  channels: int
  strides: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.channels, (3, 3), strides=self.strides, padding=1, use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    return nn.relu(x)


class TinyNet(nn.Module):
  """Two conv stages named like a ResNet's and an ``fc`` head, with the models' contract."""

  num_classes: int = 3
  widths: tuple = (4, 6)

  @nn.compact
  def __call__(self, x, train=False, return_features=False, feature_masks=None):
    masks = feature_masks or {}
    features = {}
    for i, width in enumerate(self.widths):
      name = f"layer{i + 1}"
      x = Stage(width, 1 if i == 0 else 2, name=name)(x, train)
      if name in masks:
        x = x * masks[name]
      features[name] = x
    features["pool"] = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(features["pool"])
    return (logits, features) if return_features else logits


def init_variables(model, seed, image_shape=(6, 6, 2), scale=0.5):
  """Random params and non-trivial BatchNorm statistics, shaped by ``eval_shape`` (no initializer runs)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=scale, size=s.shape), s.dtype), shapes["params"])
  stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape), s.dtype), shapes["batch_stats"])
  return {"params": params, "batch_stats": stats}


def images(seed, n=5, shape=(6, 6, 2), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *shape)), dtype)


def labels(seed, n=5, classes=3):
  return jnp.asarray(np.random.default_rng(seed).integers(0, classes, size=n))


@pytest.fixture(scope="module")
def model():
  return TinyNet()


@pytest.fixture(scope="module")
def source(model):
  return init_variables(model, 0)


@pytest.fixture(scope="module")
def target(model):
  return init_variables(model, 1)


def np64(x):
  return np.asarray(x, np.float64)


def flat64(tree):
  return np.concatenate([np64(x).ravel() for x in jax.tree.leaves(tree)])


def algorithm1(g, r, lam):
  """Algorithm 1 of the paper on flat float64 vectors (written from the paper, not the library)."""
  inner = g @ r
  if inner < 0:
    r = r - inner / (g @ g) * g
  return g + lam * r


def cross_entropy(model, variables, x, y, train=False):
  logits = model.apply(variables, x, train=train)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---------------------------------------------------------------------------- L2


def test_l2_value_is_half_weight_decay_times_squared_kernels(target):
  params = target["params"]
  expected = 1e-3 / 2 * sum(
      np.sum(np64(k) ** 2)
      for k in (params["layer1"]["conv"]["kernel"], params["layer2"]["conv"]["kernel"], params["fc"]["kernel"])
  )
  np.testing.assert_allclose(reg.l2(params, weight_decay=1e-3), expected, rtol=1e-6)


def test_l2_include_all_counts_every_leaf(target):
  params = target["params"]
  expected = 0.02 / 2 * np.sum(flat64(params) ** 2)
  np.testing.assert_allclose(reg.l2(params, weight_decay=0.02, include="all"), expected, rtol=1e-6)


def test_l2_closed_form_grad_equals_autodiff(target):
  params = target["params"]
  for include in ("kernels", "weights_and_biases", "all", lambda path: path[0] == "fc"):
    closed = reg.l2_grad(params, 0.03, include)
    auto = jax.grad(reg.l2)(params, 0.03, include)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), closed, auto)


# ---------------------------------------------------------------------------- L2-SP


def test_l2_sp_value_matches_numpy(source, target):
  params, src = target["params"], source["params"]
  transferred = sum(np.sum((np64(params[l]["conv"]["kernel"]) - np64(src[l]["conv"]["kernel"])) ** 2) for l in LAYERS)
  # The source fc has the same shape, but the head is decayed toward 0, not toward it.
  head = np.sum(np64(params["fc"]["kernel"]) ** 2)
  expected = 0.1 / 2 * transferred + 0.01 / 2 * head
  np.testing.assert_allclose(reg.l2_sp(params, src, alpha=0.1, beta=0.01), expected, rtol=1e-6)


def test_l2_sp_include_all_counts_batchnorm_and_biases(source, target):
  params, src = target["params"], source["params"]
  transferred = sum(np.sum((np64(params[l][m][k]) - np64(src[l][m][k])) ** 2)
                    for l in LAYERS for m, ks in (("conv", ("kernel",)), ("bn", ("scale", "bias"))) for k in ks)
  head = np.sum(np64(params["fc"]["kernel"]) ** 2) + np.sum(np64(params["fc"]["bias"]) ** 2)
  expected = 0.3 / 2 * transferred + 0.2 / 2 * head
  np.testing.assert_allclose(reg.l2_sp(params, src, 0.3, 0.2, include="all"), expected, rtol=1e-6)


def test_l2_sp_roles_name_transferred_head_and_excluded_leaves(source, target):
  roles = reg.l2_sp_roles(target["params"], source["params"], include="weights_and_biases")
  assert roles["layer1"]["conv"]["kernel"] == "transferred"
  assert roles["layer2"]["bn"] == {"scale": "excluded", "bias": "excluded"}
  assert roles["fc"] == {"kernel": "head", "bias": "head"}


def test_l2_sp_head_found_from_leaves_the_source_lacks_or_shapes_differently(model, target):
  params = target["params"]
  source_1000 = init_variables(TinyNet(num_classes=10), 0)["params"]        # fc shaped (6, 10)
  source_headless = {k: v for k, v in source_1000.items() if k != "fc"}
  for src in (source_1000, source_headless):
    transferred = sum(np.sum((np64(params[l]["conv"]["kernel"]) - np64(src[l]["conv"]["kernel"])) ** 2) for l in LAYERS)
    expected = 0.1 / 2 * transferred + 0.01 / 2 * np.sum(np64(params["fc"]["kernel"]) ** 2)
    np.testing.assert_allclose(reg.l2_sp(params, src, head=None), expected, rtol=1e-6)


def test_l2_sp_without_head_predicate_pulls_a_same_shaped_fc_to_the_source(source, target):
  roles = reg.l2_sp_roles(target["params"], source["params"], head=None)
  assert roles["fc"]["kernel"] == "transferred"


@pytest.mark.parametrize("include", ["kernels", "weights_and_biases", "all"])
def test_l2_sp_closed_form_grad_equals_autodiff(source, target, include):
  closed = reg.l2_sp_grad(target["params"], source["params"], 0.1, 0.01, include=include)
  auto = jax.grad(reg.l2_sp)(target["params"], source["params"], 0.1, 0.01, include=include)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), closed, auto)


def test_l2_sp_excluded_leaves_get_exactly_zero_gradient(source, target):
  params = target["params"]
  closed = reg.l2_sp_grad(params, source["params"])
  auto = jax.grad(reg.l2_sp)(params, source["params"])
  for grad in (closed, auto):
    for layer in LAYERS:
      assert np.all(np.asarray(grad[layer]["bn"]["scale"]) == 0)
      assert np.all(np.asarray(grad[layer]["bn"]["bias"]) == 0)
    assert np.all(np.asarray(grad["fc"]["bias"]) == 0)
    assert np.any(np.asarray(grad["fc"]["kernel"]) != 0)


def test_l2_sp_closed_form_through_split_value_and_grad_feeds_dtnh(model, source, target):
  x, y = images(0), labels(0)
  batch_stats = target["batch_stats"]
  empirical = lambda p: cross_entropy(model, {"params": p, "batch_stats": batch_stats}, x, y)
  regularizer = reg.l2_sp_regularizer(source["params"], alpha=0.1, beta=0.01)
  split = dtnh_jax.split_value_and_grad(empirical, closed_form=[regularizer])
  (ce, sp), (g_ce, g_sp) = jax.jit(split)(target["params"])

  np.testing.assert_allclose(ce, empirical(target["params"]), rtol=1e-6)
  np.testing.assert_allclose(sp, reg.l2_sp(target["params"], source["params"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_ce, jax.jit(jax.grad(empirical))(target["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_sp, jax.jit(jax.grad(reg.l2_sp))(target["params"], source["params"]))

  tx = dtnh_jax.dtnh(0.5)
  direction, _ = jax.jit(tx.update)((g_ce, g_sp), tx.init(target["params"]), target["params"])
  np.testing.assert_allclose(flat64(direction), algorithm1(flat64(g_ce), flat64(g_sp), 0.5), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- KnowDist


def features_of(model, variables, x, train=False):
  return model.apply(variables, x, train=train, return_features=True)[1]


@pytest.mark.parametrize("normalize", ["sum", "spatial_mean", "mean"])
def test_feature_distance_matches_numpy(model, source, target, normalize):
  x = images(1)
  tf, sf = features_of(model, target, x), features_of(model, source, x)
  expected = 0.0
  for layer in LAYERS:
    diff = np64(tf[layer]) - np64(sf[layer])
    n, h, w, c = diff.shape
    per_example = (diff ** 2).reshape(n, -1).sum(axis=1)
    expected += per_example.mean() / {"sum": 1, "spatial_mean": h * w, "mean": h * w * c}[normalize]
  np.testing.assert_allclose(reg.feature_distance(tf, sf, LAYERS, normalize=normalize), expected, rtol=1e-5)


def test_feature_distance_between_identical_networks_is_zero(model, source):
  x = images(2)

  def knowdist(params):
    variables = {"params": params, "batch_stats": source["batch_stats"]}
    return reg.feature_distance(features_of(model, variables, x), reg.source_features(model, source, x, LAYERS), LAYERS)

  value, grad = jax.value_and_grad(knowdist)(source["params"])
  assert value == 0
  assert np.all(flat64(grad) == 0)


def test_feature_distance_gradient_matches_central_finite_differences(model, source, target):
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    src, tgt, x = to64(source), to64(target), images(3, dtype=jnp.float64)
    frozen = reg.source_features(model, src, x, LAYERS)

    @jax.jit
    def knowdist(params):
      variables = {"params": params, "batch_stats": tgt["batch_stats"]}
      return reg.feature_distance(features_of(model, variables, x), frozen, LAYERS, normalize="spatial_mean")

    grad = jax.grad(knowdist)(tgt["params"])
    rng = np.random.default_rng(0)
    for _ in range(3):
      direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), tgt["params"])
      step = 1e-5
      plus = knowdist(jax.tree.map(lambda p, v: p + step * v, tgt["params"], direction))
      minus = knowdist(jax.tree.map(lambda p, v: p - step * v, tgt["params"], direction))
      numeric = (plus - minus) / (2 * step)
      np.testing.assert_allclose(flat64(grad) @ flat64(direction), numeric, rtol=1e-6)


def test_feature_distance_gives_the_source_features_no_gradient(model, source, target):
  x = images(4)
  tf, sf = features_of(model, target, x), features_of(model, source, x)
  grad = jax.grad(lambda s: reg.feature_distance(tf, s, LAYERS))(sf)
  assert all(np.all(np.asarray(grad[layer]) == 0) for layer in LAYERS)


def test_feature_distance_leaves_the_head_exactly_zero_gradient(model, source, target):
  x = images(5)
  frozen = reg.source_features(model, source, x, LAYERS)
  grad = jax.grad(lambda p: reg.feature_distance(
      features_of(model, {"params": p, "batch_stats": target["batch_stats"]}, x), frozen, LAYERS))(target["params"])
  assert np.all(np.asarray(grad["fc"]["kernel"]) == 0) and np.all(np.asarray(grad["fc"]["bias"]) == 0)
  assert np.any(np.asarray(grad["layer1"]["conv"]["kernel"]) != 0)


# ---------------------------------------------------------------------------- DELTA


def random_attention(seed, widths=(4, 6)):
  rng = np.random.default_rng(seed)
  return {f"layer{i + 1}": rng.dirichlet(np.ones(c)).astype(np.float32) for i, c in enumerate(widths)}


def test_delta_matches_numpy(model, source, target):
  x = images(6)
  tf, sf = features_of(model, target, x), features_of(model, source, x)
  attention = random_attention(0)
  expected = 0.0
  for layer in LAYERS:
    diff = np64(tf[layer]) - np64(sf[layer])
    n, h, w, c = diff.shape
    per_channel = (diff ** 2).sum(axis=(1, 2)) / (h * w)                 # (n, c)
    expected += (per_channel * (c * np64(attention[layer]))).sum(axis=1).mean()
  np.testing.assert_allclose(reg.delta(tf, sf, attention), expected, rtol=1e-5)


@pytest.mark.parametrize("normalize", ["sum", "spatial_mean", "mean"])
def test_delta_with_uniform_attention_equals_feature_distance(model, source, target, normalize):
  x = images(7)
  tf, sf = features_of(model, target, x), features_of(model, source, x)
  uniform = {"layer1": np.full(4, 1 / 4, np.float32), "layer2": np.full(6, 1 / 6, np.float32)}
  np.testing.assert_allclose(
      reg.delta(tf, sf, uniform, normalize=normalize), reg.feature_distance(tf, sf, LAYERS, normalize=normalize),
      rtol=1e-5)


def numpy_cross_entropy(logits, y):
  logits = np64(logits)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(y)), np.asarray(y)]


def test_delta_attention_is_softmax_of_zscored_masked_loss_increases(model, source):
  batches = [{"image": images(8, n=5), "label": labels(8, n=5)}, (images(9, n=3), labels(9, n=3))]
  increase = reg.channel_loss_increase(model, source, batches, LAYERS, channels_per_step=4)
  attention = reg.attention_from_loss_increase(increase)

  for layer, channels in zip(LAYERS, (4, 6)):
    # One explicit masked forward pass per channel and batch, losses in float64 NumPy.
    per_channel = np.zeros(channels)
    for c in range(channels):
      mask = np.ones(channels, np.float32)
      mask[c] = 0
      diffs = [numpy_cross_entropy(model.apply(source, _x(b), feature_masks={layer: jnp.asarray(mask)}), _y(b))
               - numpy_cross_entropy(model.apply(source, _x(b)), _y(b)) for b in batches]
      per_channel[c] = np.concatenate(diffs).mean()
    z = (per_channel - per_channel.mean()) / per_channel.std()
    expected = np.exp(z / 5) / np.exp(z / 5).sum()
    np.testing.assert_allclose(increase[layer], per_channel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(attention[layer], expected, rtol=1e-4, atol=1e-7)


def _x(batch):
  return batch["image"] if isinstance(batch, dict) else batch[0]


def _y(batch):
  return batch["label"] if isinstance(batch, dict) else batch[1]


def test_delta_attention_of_each_layer_sums_to_one(model, source):
  attention = reg.delta_channel_attention(model, source, [(images(10), labels(10))], LAYERS)
  for layer, channels in zip(LAYERS, (4, 6)):
    assert attention[layer].shape == (channels,)
    assert np.all(attention[layer] > 0)
    np.testing.assert_allclose(attention[layer].sum(), 1.0, rtol=1e-6)


def test_delta_attention_is_uniform_when_every_channel_matters_alike():
  attention = reg.attention_from_loss_increase({"layer1": np.full(5, 0.3)})
  np.testing.assert_allclose(attention["layer1"], np.full(5, 0.2), rtol=1e-6)


def test_delta_attention_save_load_round_trip(tmp_path, model, source, target):
  attention = random_attention(1)
  path = tmp_path / "attention.npz"
  reg.save_attention(path, attention)
  loaded = reg.load_attention(path)
  assert list(loaded) == list(attention)
  for layer in attention:
    assert loaded[layer].dtype == attention[layer].dtype
    np.testing.assert_array_equal(loaded[layer], attention[layer])
  x = images(11)
  tf, sf = features_of(model, target, x), features_of(model, source, x)
  assert reg.delta(tf, sf, loaded) == reg.delta(tf, sf, attention)


def test_fit_head_trains_only_the_head_and_lowers_the_loss(model, source):
  batches = [(images(s, n=8), labels(s, n=8)) for s in (12, 13)]
  fitted = reg.fit_head(model, source, batches, learning_rate=0.1)
  loss = lambda v: np.mean([cross_entropy(model, v, x, y) for x, y in batches])
  assert loss(fitted) < loss(source)
  for name in LAYERS:
    jax.tree.map(np.testing.assert_array_equal, fitted["params"][name], source["params"][name])
  jax.tree.map(np.testing.assert_array_equal, fitted["batch_stats"], source["batch_stats"])


# ---------------------------------------------------------------------------- through the gradient engine


def test_feature_regularizers_through_split_value_and_grad_feed_dtnh(model, source, target):
  x, y = images(14), labels(14)
  attention = random_attention(2)

  def loss_fn(params, batch_stats):
    frozen = reg.source_features(model, source, x, LAYERS)                    # the one extra forward pass
    (logits, features), updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                              return_features=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return (ce, reg.feature_distance(features, frozen, LAYERS), reg.delta(features, frozen, attention)), updates

  ((ce, kd, dl), _), grads = jax.jit(dtnh_jax.split_value_and_grad(loss_fn, has_aux=True))(
      target["params"], target["batch_stats"])
  for index, grad in enumerate(grads):
    separate = jax.jit(jax.grad(lambda p: loss_fn(p, target["batch_stats"])[0][index]))(target["params"])
    # float32 rounding of two programs, relative to the leaf's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(b).max())),
                 grad, separate)

  tx = dtnh_jax.dtnh([0.1, 0.2])
  direction, _ = jax.jit(tx.update)(grads, tx.init(target["params"]), target["params"])
  g, r_kd, r_dl = (flat64(grad) for grad in grads)
  expected = algorithm1(g, r_kd, 0.1) + algorithm1(g, r_dl, 0.2) - g           # each projected on g on its own
  np.testing.assert_allclose(flat64(direction), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call", [
    lambda m, v, f: reg.feature_distance(f, f, ("layer1", "layer9")),
    lambda m, v, f: reg.delta(f, f, {"layer9": np.ones(4) / 4}),
    lambda m, v, f: reg.source_features(m, v, images(0), ("layer9",)),
    lambda m, v, f: reg.delta_channel_attention(m, v, [(images(0), labels(0))], ("layer9",)),
], ids=["feature_distance", "delta", "source_features", "delta_channel_attention"])
def test_unknown_layer_error_lists_the_available_ones(model, source, call):
  features = features_of(model, source, images(0))
  with pytest.raises(ValueError, match=r"layer9.*\['layer1', 'layer2', 'pool'\]"):
    call(model, source, features)


def test_mismatched_feature_shapes_raise(model, source):
  features = features_of(model, source, images(15))
  wider = {**features, "layer2": jnp.zeros((5, 3, 3, 7))}
  with pytest.raises(ValueError, match=r"'layer2'.*\(5, 3, 3, 6\).*\(5, 3, 3, 7\)"):
    reg.feature_distance(features, wider, LAYERS)


def test_attention_of_the_wrong_length_raises(model, source):
  features = features_of(model, source, images(16))
  with pytest.raises(ValueError, match=r"attention\['layer2'\].*\(6,\)"):
    reg.delta(features, features, {"layer1": np.ones(4) / 4, "layer2": np.ones(5) / 5})


@pytest.mark.parametrize("call", [
    lambda p, s, f: reg.l2(p, weight_decay=-1e-4),
    lambda p, s, f: reg.l2_regularizer(weight_decay=-1.0),
    lambda p, s, f: reg.l2_sp(p, s, alpha=-0.1),
    lambda p, s, f: reg.l2_sp(p, s, beta=-0.01),
    lambda p, s, f: reg.l2_sp_regularizer(s, alpha=-0.1),
    lambda p, s, f: reg.delta(f, f, {"layer1": np.array([0.5, 0.7, -0.1, -0.1])}),
    lambda p, s, f: reg.attention_from_loss_increase({"layer1": np.ones(3)}, temperature=-5.0),
], ids=["l2", "l2_regularizer", "l2_sp_alpha", "l2_sp_beta", "l2_sp_regularizer", "delta_attention", "temperature"])
def test_negative_weights_raise(model, source, target, call):
  features = features_of(model, source, images(0))
  with pytest.raises(ValueError, match=">= 0"):
    call(target["params"], source["params"], features)


def test_unknown_include_raises(source, target):
  with pytest.raises(ValueError, match="include must be one of"):
    reg.l2_sp(target["params"], source["params"], include="biases")


# ---------------------------------------------------------------------------- the project's ResNet-18


def test_resnet10_knowdist_delta_and_l2_sp_run_through_split_value_and_grad():
  models = pytest.importorskip("dtnh_jax.models")
  if not hasattr(models, "resnet10"):
    pytest.skip("dtnh_jax.models.resnet10 is not there yet")
  # ResNet-10: the layers and features of ResNet-18 with one block per stage, half the program to compile
  model = models.resnet10(num_classes=5, width=0.125, small_stem=True)
  x, y = images(17, n=2, shape=(16, 16, 3)), labels(17, n=2, classes=5)
  source_variables = init_variables(model, 0, image_shape=(16, 16, 3), scale=0.2)
  attention = reg.delta_channel_attention(model, source_variables, [(x, y)], ("layer1",))
  assert attention["layer1"].shape == (8,)
  np.testing.assert_allclose(attention["layer1"].sum(), 1.0, rtol=1e-6)

  def loss_fn(params):
    frozen = reg.source_features(model, source_variables, x)
    logits, features = model.apply({**source_variables, "params": params}, x, train=False, return_features=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce, reg.feature_distance(features, frozen), reg.delta(features, frozen, attention)

  params = jax.tree.map(lambda p: p * 1.01, source_variables["params"])
  l2_sp = reg.l2_sp_regularizer(source_variables["params"])
  (ce, kd, dl, sp), grads = jax.jit(dtnh_jax.split_value_and_grad(loss_fn, closed_form=[l2_sp]))(params)
  assert all(np.isfinite(v) for v in (ce, kd, dl, sp)) and kd > 0 and dl > 0 and sp > 0
  roles = reg.l2_sp_roles(params, source_variables["params"])
  for grad, role in zip(jax.tree.leaves(grads[3]), jax.tree.leaves(roles)):
    assert np.all(np.asarray(grad) == 0) == (role == "excluded")
  assert np.all(flat64(grads[1]["fc"]) == 0) and np.all(flat64(grads[2]["fc"]) == 0)
