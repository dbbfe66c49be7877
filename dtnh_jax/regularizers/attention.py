r"""DELTA's channel attention, computed once before fine-tuning, and the head fit it needs.

:func:`fit_head` trains the new head on the frozen source network;
:func:`delta_channel_attention` measures each channel's loss increase when it
is zeroed and turns those into attention weights for :func:`dtnh_jax.regularizers.delta`;
:func:`save_attention` and :func:`load_attention` keep them for the whole run.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax.regularizers._common import DEFAULT_LAYERS, PyTree, _as_layers, _check_layers, _check_nonnegative


def _split_batch(batch):
  if isinstance(batch, Mapping):
    return batch["image"], batch["label"]
  images, labels = batch
  return images, labels


def _per_example_cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


@functools.lru_cache(maxsize=16)
def _masked_loss_fns(model, loss_fn, channels_per_step):
  """Jitted ``(base_losses, increase_sums)`` for a model, cached so repeated calls compile once."""

  def logits_fn(variables, images, masks):
    logits, _ = model.apply(variables, images, train=False, return_features=True, feature_masks=masks)
    return logits

  @jax.jit
  def base_losses(variables, images, labels):
    return loss_fn(logits_fn(variables, images, None), labels)

  @functools.partial(jax.jit, static_argnames=("layer",))
  def increase_sums(variables, images, labels, base, masks, layer):
    def one_channel(mask):
      return jnp.sum(loss_fn(logits_fn(variables, images, {layer: mask}), labels) - base)

    return jax.lax.map(one_channel, masks, batch_size=min(channels_per_step, masks.shape[0]))

  return base_losses, increase_sums


def channel_loss_increase(
    model,
    variables: PyTree,
    batches: Iterable[Any],
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    channels_per_step: int = 32,
) -> dict[str, np.ndarray]:
  r"""Per channel, the mean increase of the loss when that channel of a feature map is zeroed.

  .. math::

    \Delta_{jc} = \frac{1}{n} \sum_{i=1}^{n} L(z(x_i; F_{jc} \leftarrow 0), y_i) - L(z(x_i), y_i)

  The channel is zeroed through ``model.apply(..., feature_masks={layer: mask})``
  with BatchNorm in eval mode, as the released ``channel_eval.py`` runs
  ``model.eval()``. One jitted function per layer maps over the channels'
  masks ``channels_per_step`` at a time (``jax.lax.map`` with ``batch_size``):
  the layers below the mask are computed once per step, the rest once per
  masked channel.

  The released code zeroes the filter of the last conv of each stage (before
  BatchNorm and the residual sum, so BatchNorm's shift survives); we zero the
  stage output's channel, the same map :func:`delta` regularizes. It averages
  per-batch mean losses over the first 4 training batches (of 32 images);
  we average over all examples of ``batches`` (the same for equal batch sizes).

  Args:
    model: a Flax model honoring ``return_features`` and ``feature_masks``.
    variables: the source network with a head fit to the target classes
      (see :func:`fit_head`).
    batches: an iterable of ``{"image", "label"}`` dicts or ``(images, labels)``
      pairs of target training data, read once (e.g. 4 batches of 32).
    layers: which feature maps.
    loss_fn: ``(logits, labels) -> per-example losses``; default softmax
      cross-entropy with integer labels.
    channels_per_step: how many masked forward passes run at once (memory).

  Returns:
    ``{layer: (C,) float64 array}`` of mean loss increases.
  """
  layers = _as_layers(layers, "channel_loss_increase")
  if channels_per_step < 1:
    raise ValueError(f"channel_loss_increase: channels_per_step must be >= 1, got {channels_per_step}.")
  loss_fn = loss_fn or _per_example_cross_entropy
  try:
    base_losses, increase_sums = _masked_loss_fns(model, loss_fn, channels_per_step)
  except TypeError:  # an unhashable model or loss: no cache, compile for this call
    base_losses, increase_sums = _masked_loss_fns.__wrapped__(model, loss_fn, channels_per_step)

  sums: dict[str, np.ndarray] = {}
  count = 0
  masks: dict[str, jax.Array] = {}
  for batch in batches:
    images, labels = _split_batch(batch)
    if not masks:
      _, features = jax.eval_shape(
          lambda v, x: model.apply(v, x, train=False, return_features=True), variables, images
      )
      _check_layers(features, layers, "channel_loss_increase", "the model's features")
      for layer in layers:
        channels = features[layer].shape[-1]
        # Row c keeps every channel but c.
        masks[layer] = 1 - jnp.eye(channels, dtype=features[layer].dtype)
        sums[layer] = np.zeros(channels, np.float64)
    base = base_losses(variables, images, labels)
    for layer in layers:
      sums[layer] += np.asarray(increase_sums(variables, images, labels, base, masks[layer], layer=layer), np.float64)
    count += int(np.shape(labels)[0])
  if count == 0:
    raise ValueError("channel_loss_increase: batches is empty; pass some target training batches.")
  return {layer: total / count for layer, total in sums.items()}


def attention_from_loss_increase(
    loss_increase: Mapping[str, Any], temperature: float = 5.0
) -> dict[str, np.ndarray]:
  r"""DELTA's attention from per-channel loss increases: ``softmax(zscore(Δ) / T)`` per layer.

  .. math::

    W_{jc} = \frac{\exp(z_{jc} / T)}{\sum_{c'} \exp(z_{jc'} / T)}, \qquad
    z_{jc} = \frac{\Delta_{jc} - \operatorname{mean}_c \Delta_{jc}}{\operatorname{std}_c \Delta_{jc}}

  with the population standard deviation and T = 5, as the released
  ``train.py`` (``js = (js - np.mean(js)) / np.std(js)``; ``F.softmax(cw / 5)``).
  A layer whose channels all have the same increase (std 0) gets uniform weights.
  Also reads the released code's ``channel_wei.*.json`` lists:
  ``attention_from_loss_increase(dict(zip(names, json.load(f))))``.

  Returns:
    ``{layer: (C,) float32}``, each summing to 1.
  """
  _check_nonnegative("attention_from_loss_increase", "temperature", temperature)
  if not temperature > 0:
    raise ValueError(f"attention_from_loss_increase: temperature must be > 0, got {temperature}.")
  attention = {}
  for layer, values in loss_increase.items():
    values = np.asarray(values, np.float64)
    spread = values.std()
    z = (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)
    logits = z / temperature
    weights = np.exp(logits - logits.max())
    attention[layer] = (weights / weights.sum()).astype(np.float32)
  return attention


def delta_channel_attention(
    model,
    source_variables: PyTree,
    batches: Iterable[Any],
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    *,
    temperature: float = 5.0,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    channels_per_step: int = 32,
) -> dict[str, np.ndarray]:
  r"""DELTA's channel attention, once, before fine-tuning.

  For each channel c of the source network's map at layer j, the mean loss
  increase on the target data when c is zeroed (:func:`channel_loss_increase`),
  z-scored over the layer's channels, then ``softmax(z / 5)``
  (:func:`attention_from_loss_increase`). The result is a dict of NumPy
  arrays: save it with :func:`save_attention` (``np.savez``) and pass it to
  :func:`delta` for the whole run.

  The source network needs a head for the target classes. DELTA (the released
  ``channel_eval.py``) first trains a new ``fc`` on the frozen source network
  (10 epochs, SGD lr 0.01, momentum 0.9, weight decay 1e-4, lr × 0.1 every 6
  epochs exponentially), then measures the losses with it: pass
  ``fit_head(model, initial_variables, batches)`` here. A random head would
  make the loss increases meaningless.

  Args:
    model: a Flax model honoring ``return_features`` and ``feature_masks``.
    source_variables: the source network with a head fit to the target
      (``{"params", "batch_stats"}``).
    batches: target training batches (``{"image", "label"}`` or pairs), read once;
      the released code uses 4 batches of 32.
    layers: which feature maps.
    temperature: the softmax temperature, 5 in DELTA.
    loss_fn: ``(logits, labels) -> per-example losses``; default cross-entropy.
    channels_per_step: masked forward passes per step (memory vs speed).

  Returns:
    ``{layer: (C,) float32}``, each summing to 1.
  """
  increase = channel_loss_increase(
      model, source_variables, batches, layers, loss_fn=loss_fn, channels_per_step=channels_per_step
  )
  return attention_from_loss_increase(increase, temperature)


def save_attention(file, attention: Mapping[str, Any]) -> None:
  """Saves ``{layer: weights}`` with ``np.savez`` (``file``: a path or an open binary file).

  A path is written atomically (a temporary file renamed into place), so a
  process killed while saving leaves no half-written file behind.
  """
  arrays = {layer: np.asarray(weights) for layer, weights in attention.items()}
  if not isinstance(file, (str, os.PathLike)):
    np.savez(file, **arrays)
    return
  path = os.fspath(file)
  path = path if path.endswith(".npz") else path + ".npz"  # as np.savez names it
  partial = f"{path}.tmp{os.getpid()}"
  with open(partial, "wb") as f:
    np.savez(f, **arrays)
  os.replace(partial, path)


def load_attention(file) -> dict[str, np.ndarray]:
  """Loads what :func:`save_attention` wrote, layers in the saved order."""
  with np.load(file) as archive:
    return {layer: archive[layer] for layer in archive.files}


def fit_head(
    model,
    variables: PyTree,
    batches: Iterable[Any],
    *,
    head: str = "fc",
    epochs: int = 10,
    learning_rate: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    decay_epochs: int = 6,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> PyTree:
  """Trains the new head on the frozen source network's pooled features (DELTA's first step).

  As the released ``channel_eval.py`` (``train_classifier``): only ``fc``
  learns, with SGD (momentum 0.9, weight decay 1e-4 on the head's kernel and
  bias, coupled as PyTorch's) and a learning rate multiplied by
  ``0.1 ** (1 / decay_epochs)`` after every epoch. Unlike it, the pooled
  features of ``batches`` are computed once (eval mode) and reused every
  epoch, without fresh data augmentation: fitting a linear head then costs
  one forward pass per batch. The released code also runs the frozen network
  in training mode while it fits (``model.train()``), so BatchNorm normalizes
  with batch statistics and its running statistics drift toward the target
  data before the channels are evaluated; here the source's statistics stay
  as they are (eval mode), the network DELTA then regularizes toward.

  Args:
    model: a Flax model whose features include ``"pool"``, the vector the head
      reads; the head must be a dense layer ``logits = pool @ kernel + bias``
      (checked on the first batch).
    variables: the source backbone with the new, target-sized head
      (``{"params", "batch_stats"}``), e.g. the variables fine-tuning starts from.
    batches: target training batches (``{"image", "label"}`` or pairs), read once.
    head: the head's name in ``variables["params"]``.
    epochs, learning_rate, momentum, weight_decay, decay_epochs: SGD settings
      (the released code's by default).
    loss_fn: ``(logits, labels) -> per-example losses``; default cross-entropy.

  Returns:
    ``variables`` with ``params[head]`` trained; everything else unchanged.
  """
  loss_fn = loss_fn or _per_example_cross_entropy
  params = variables["params"]
  if head not in params or set(params[head]) != {"kernel", "bias"}:
    raise ValueError(
        f"fit_head: expected a dense head params[{head!r}] with 'kernel' and 'bias'; "
        f"params hold {sorted(params)}."
    )

  @jax.jit
  def pooled(variables, images):
    logits, features = model.apply(variables, images, train=False, return_features=True)
    return logits, features["pool"]

  cached = []
  for batch in batches:
    images, labels = _split_batch(batch)
    logits, pool = pooled(variables, images)
    if not cached:
      predicted = pool @ params[head]["kernel"] + params[head]["bias"]
      if not np.allclose(predicted, logits, rtol=1e-3, atol=1e-3 * (1 + float(jnp.max(jnp.abs(logits))))):
        raise ValueError(
            f"fit_head: the model's logits are not features['pool'] @ params[{head!r}]['kernel'] + bias; "
            "fit_head only trains a dense head reading the pooled features."
        )
    cached.append((pool, jnp.asarray(labels)))
  if not cached:
    raise ValueError("fit_head: batches is empty; pass some target training batches.")

  schedule = optax.exponential_decay(
      learning_rate, transition_steps=len(cached), decay_rate=0.1 ** (1.0 / decay_epochs), staircase=True
  )
  tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))

  @jax.jit
  def step(head_params, opt_state, pool, labels):
    def loss(head_params):
      logits = pool @ head_params["kernel"] + head_params["bias"]
      return jnp.mean(loss_fn(logits, labels))

    grads = jax.grad(loss)(head_params)
    updates, opt_state = tx.update(grads, opt_state, head_params)
    return optax.apply_updates(head_params, updates), opt_state

  head_params = dict(params[head])
  opt_state = tx.init(head_params)
  for _ in range(epochs):
    for pool, labels in cached:
      head_params, opt_state = step(head_params, opt_state, pool, labels)

  new_params = dict(params)
  new_params[head] = head_params
  new_variables = dict(variables)
  new_variables["params"] = new_params
  return new_variables
