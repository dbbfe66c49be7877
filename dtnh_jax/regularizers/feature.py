r"""Feature-map regularizers: KnowDist (:func:`feature_distance`) and DELTA (:func:`delta`).

They are returned by the loss function next to the empirical loss, from the
same forward pass; the frozen source network runs one extra forward pass
(:func:`source_features`) on the same batch. They average over the batch
(the 1/n of Eq. 3), so their weight does not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import names
from dtnh_jax.regularizers._common import (
    DEFAULT_LAYERS, PyTree, _accumulate, _as_layers, _check_layers, _check_nonnegative)


def _paired_features(target_features, source_features, layers, caller):
  layers = _as_layers(layers, caller)
  _check_layers(target_features, layers, caller, "the target features")
  _check_layers(source_features, layers, caller, "the source features")
  pairs = []
  for layer in layers:
    target, source = target_features[layer], source_features[layer]
    if jnp.shape(target) != jnp.shape(source):
      raise ValueError(
          f"{caller}: feature map {layer!r} has shape {jnp.shape(target)} in the target "
          f"but {jnp.shape(source)} in the source network; both must come from the same "
          "architecture on the same batch."
      )
    if jnp.ndim(target) < 2:
      raise ValueError(f"{caller}: feature map {layer!r} must be at least (batch, channels), got shape "
                       f"{jnp.shape(target)}.")
    pairs.append((layer, target, jax.lax.stop_gradient(source)))
  return pairs


def _resolved_normalize(normalize, caller, regularizer):
  """``normalize`` checked; ``"official"`` replaced by ``regularizer``'s official one."""
  if normalize not in names.FEATURE_NORMALIZATIONS:
    raise ValueError(f"{caller}: normalize must be one of {names.FEATURE_NORMALIZATIONS}, got {normalize!r}.")
  return names.OFFICIAL_FEATURE_NORMALIZE[regularizer] if normalize == "official" else normalize


def _squared_distance_per_channel(target, source, normalize):
  """``(N, C)``: per example and channel, Σ (or mean) over positions of the squared difference.

  ``normalize="mean"`` also divides by the number of channels C.
  """
  acc = _accumulate(jnp.result_type(target, source))
  diff = target.astype(acc) - source.astype(acc)
  spatial_axes = tuple(range(1, diff.ndim - 1))
  per_channel = jnp.sum(jnp.square(diff), axis=spatial_axes, dtype=acc)
  positions = int(np.prod(diff.shape[1:-1], dtype=np.int64))
  if normalize == "spatial_mean":
    per_channel = per_channel / positions
  elif normalize == "mean":
    per_channel = per_channel / (positions * diff.shape[-1])
  return per_channel


def feature_distance(
    target_features: Mapping[str, jax.Array],
    source_features: Mapping[str, jax.Array],
    layers: str | Sequence[str] = DEFAULT_LAYERS,
    *,
    normalize: str = "sum",
) -> jax.Array:
  r"""KnowDist: squared distance between target and source feature maps (Eq. 3 of Wan et al.).

  .. math::

    \Omega(\omega, \omega_s) = \frac{1}{n} \sum_{i=1}^{n} \sum_{j \in \text{layers}}
      \frac{1}{m_j} \left\| F_j(\omega, x_i) - F_j(\omega_s, x_i) \right\|_2^2

  with :math:`m_j = 1` for ``normalize="sum"`` (Eq. 3 exactly; the default),
  :math:`H_j W_j` for ``"spatial_mean"`` and :math:`H_j W_j C_j` for
  ``"mean"``. The source features are wrapped in ``jax.lax.stop_gradient``: the
  source network is frozen.

  Normalization: the batch mean is Eq. 3's 1/n (and keeps the weight
  independent of the batch size); ``"sum"`` over positions and channels is
  Eq. 3's :math:`\|\cdot\|_2^2` and also what the DELTA authors' released
  KnowDist (``reg_fea_map`` in ``lixingjian/DELTA/train.py``) computes, there
  as ``0.5 * Σ_batch Σ |F - F_s|²``: their ``alpha`` equals our weight times
  ``2 / batch_size`` (ours = ``alpha * batch_size / 2``; the DELTA code's
  default ``alpha=0.01`` at batch 64 is 0.32 here). The DTNH paper tunes λ by
  cross-validation and does not report it, so no value from it carries over.
  With ``"sum"`` the early, large maps dominate (ResNet-18 at 224²: 200k
  values in ``layer1``, 25k in ``layer4``); ``"spatial_mean"`` weighs each
  channel of every layer alike.

  Layers: the DELTA code regularizes the last conv of each ResNet stage
  (``layer1.2.conv3``, ..., ``layer4.2.conv3``, before BatchNorm and the
  residual sum). Our models return stage outputs, so the default is those four
  stages' outputs, ``("layer1", "layer2", "layer3", "layer4")`` (after the
  residual sum and ReLU): the same four depths, not the same tensors.

  Args:
    target_features: the fine-tuned network's feature maps from the training
      forward pass, ``{name: (N, ..., C)}``.
    source_features: the frozen source network's maps on the same batch (one
      extra forward pass; see :func:`source_features`).
    layers: which feature maps to compare.
    normalize: ``"sum"``, ``"spatial_mean"`` or ``"mean"`` (see above);
      ``"official"`` (the training CLI's default) is ``"sum"``.

  Returns:
    The scalar regularizer, float32 (or wider).

  Raises:
    ValueError: a layer is missing from the features (the message lists the
      available ones) or the two networks' maps differ in shape.

  Example::

    def loss_fn(params, batch_stats, images, labels):
      frozen = source_features(model, source_variables, images)   # extra forward
      (logits, features), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          return_features=True, mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return (ce, feature_distance(features, frozen)), updates

    ((ce, kd), updates), (g_ce, g_kd) = dtnh_jax.split_value_and_grad(
        loss_fn, has_aux=True)(params, batch_stats, images, labels)

  References:
    Yim, Joo, Bae, Kim, `A Gift from Knowledge Distillation
    <https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html>`_,
    CVPR 2017 (ref. [31] of Wan et al.); Wan et al., ICDM 2019, Eq. 3.
  """
  normalize = _resolved_normalize(normalize, "feature_distance", "knowdist")
  total = jnp.zeros((), jnp.float32)
  for _, target, source in _paired_features(target_features, source_features, layers, "feature_distance"):
    per_example = jnp.sum(_squared_distance_per_channel(target, source, normalize), axis=-1)
    total = total + jnp.mean(per_example)
  return total


def delta(
    target_features: Mapping[str, jax.Array],
    source_features: Mapping[str, jax.Array],
    attention: Mapping[str, Any],
    layers: str | Sequence[str] | None = None,
    *,
    normalize: str = "spatial_mean",
) -> jax.Array:
  r"""DELTA: feature-map distance weighted by per-channel attention.

  .. math::

    \Omega(\omega, \omega_s) = \frac{1}{n} \sum_{i=1}^{n} \sum_{j} \sum_{c=1}^{C_j}
      C_j W_{jc} \frac{1}{m_j} \left\| F_{jc}(\omega, x_i) - F_{jc}(\omega_s, x_i) \right\|_2^2

  where :math:`W_j` is the attention of layer j's channels (from
  :func:`delta_channel_attention`, summing to 1) and :math:`m_j` is as in
  :func:`feature_distance`. The factor :math:`C_j` is the released code's
  (``distance = c * W * |F - F_s|² / (h * w)`` in ``reg_att_fea_map``): with
  it, uniform attention :math:`W_{jc} = 1/C_j` gives exactly
  :func:`feature_distance` with the same ``normalize``, so one weight scale
  serves both. The paper's formula :math:`\sum_c W_{jc}\|\cdot\|^2` is this
  with ``normalize="sum"`` and ``attention[j] / C_j``.

  Normalization: the default ``"spatial_mean"`` is the released code's
  per-sample term up to its 1/2 and its sum over the batch (we average): its
  ``alpha`` (0.01; 0.1 for Stanford Dogs, batch 64) equals ours times
  ``2 / batch_size`` (ours = ``alpha * batch_size / 2``).

  The attention is one vector per layer, computed once on the target data
  before fine-tuning and averaged over the examples (as the released
  ``channel_eval.py`` does), not recomputed per sample; the DELTA paper writes
  :math:`W_j(x_i, y_i)` per example. See :func:`delta_channel_attention`.
  DELTA also decays the new head (``β/2 |w_fc|²``, β = 0.01): add
  :func:`l2` on the head as a second regularizer.

  Args:
    target_features: the fine-tuned network's feature maps, ``{name: (N, ..., C)}``.
    source_features: the frozen source network's maps on the same batch.
    attention: ``{name: (C,)}`` non-negative channel weights (any mapping of
      arrays, e.g. loaded with :func:`load_attention`).
    layers: which maps to compare; default: the attention's keys.
    normalize: ``"sum"``, ``"spatial_mean"`` (default) or ``"mean"``;
      ``"official"`` (the training CLI's default) is ``"spatial_mean"``.

  Returns:
    The scalar regularizer, float32 (or wider).

  Raises:
    ValueError: unknown layer (the message lists the available ones),
      mismatched feature shapes, attention of the wrong length or negative.

  Example::

    attention = load_attention("attention.npz")       # from delta_channel_attention

    def loss_fn(params, batch_stats, images, labels):
      frozen = source_features(model, source_variables, images, tuple(attention))
      (logits, features), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          return_features=True, mutable=["batch_stats"])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return (ce, delta(features, frozen, attention)), updates

    head_decay = l2_regularizer(0.01, include=lambda path: path[0] == "fc")
    ((ce, dl, hd), updates), grads = dtnh_jax.split_value_and_grad(
        loss_fn, has_aux=True, closed_form=[head_decay])(params, batch_stats, images, labels)
    # grads = (g_ce, g_delta, g_head): dtnh(reg_weight=[λ_delta, 1.0]).update(grads, ...)

  References:
    Li, Xiong, Wang, Rao, Liu, Huan, `DELTA: DEep Learning Transfer using Feature
    Map with Attention for Convolutional Networks <https://arxiv.org/abs/1901.09229>`_,
    ICLR 2019; code: ``github.com/lixingjian/DELTA``.
  """
  normalize = _resolved_normalize(normalize, "delta", "delta")
  if not isinstance(attention, Mapping):
    raise TypeError(f"delta: attention must be a dict {{layer: (C,) weights}}, got {type(attention).__name__}.")
  layers = tuple(attention) if layers is None else _as_layers(layers, "delta")
  _check_layers(attention, layers, "delta", "the attention")
  total = jnp.zeros((), jnp.float32)
  for layer, target, source in _paired_features(target_features, source_features, layers, "delta"):
    weights = attention[layer]
    channels = jnp.shape(target)[-1]
    if jnp.shape(weights) != (channels,):
      raise ValueError(
          f"delta: attention[{layer!r}] has shape {jnp.shape(weights)} but the feature map has "
          f"{channels} channels; it must have shape ({channels},)."
      )
    _check_nonnegative("delta", f"attention[{layer!r}]", weights)
    per_channel = _squared_distance_per_channel(target, source, normalize)
    weights = jax.lax.stop_gradient(jnp.asarray(weights)).astype(per_channel.dtype)
    total = total + jnp.mean(per_channel @ (channels * weights))
  return total


def source_features(
    model,
    source_variables: PyTree,
    images: jax.Array,
    layers: str | Sequence[str] = DEFAULT_LAYERS,
) -> dict[str, jax.Array]:
  """The frozen source network's feature maps: one forward pass, eval mode, no gradient.

  Args:
    model: a Flax model whose ``apply(variables, x, train=False,
      return_features=True)`` returns ``(logits, features)``.
    source_variables: ``{"params": ..., "batch_stats": ...}`` of the source
      network. The head does not change the features, but Flax checks its
      shape: pass the variables fine-tuning starts from (source backbone and
      the new head), kept fixed.
    images: the training batch, NHWC, the same one the target sees.
    layers: which maps to return.

  Returns:
    ``{layer: stop_gradient(feature map)}``. BatchNorm uses its running
    statistics, as the DELTA code's ``model_source.eval()``.
  """
  layers = _as_layers(layers, "source_features")
  _, features = model.apply(source_variables, images, train=False, return_features=True)
  _check_layers(features, layers, "source_features", "the model's features")
  return {layer: jax.lax.stop_gradient(features[layer]) for layer in layers}
