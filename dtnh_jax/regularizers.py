r"""Transfer regularizers Ω(ω, ω_s): L2, L2-SP, KnowDist and DELTA.

Each regularizer is a plain function of the parameters, or of the feature maps
the model returns; none of them touches an optimizer. Their gradients go to
:func:`dtnh_jax.dtnh` as the second element of the gradient tuple:

* parameter regularizers (:func:`l2`, :func:`l2_sp`) have closed-form
  gradients; :func:`l2_regularizer` and :func:`l2_sp_regularizer` wrap them in
  a :class:`dtnh_jax.ClosedFormRegularizer`, so :func:`dtnh_jax.split_value_and_grad`
  needs no backward pass for them;
* feature regularizers (:func:`feature_distance` for KnowDist, :func:`delta`)
  are returned by the loss function next to the empirical loss, from the same
  forward pass; the frozen source network runs one extra forward pass
  (:func:`source_features`) on the same batch.

Conventions shared by every function here:

* Parameter regularizers carry a factor 1/2 (``α/2 |w - w0|²``), as the
  L2-SP paper and both official codes (``tf.nn.l2_loss``, ``0.5 * norm**2``)
  do, so the gradient is ``α (w - w0)``. The DTNH paper's Eq. 2 writes no 1/2:
  with DTNH weight λ, the weight on ``|w - w0|²`` is ``λ α / 2`` here and
  ``λ_paper`` there.
* Leaves a regularizer does not count get an exact zero (``jnp.zeros_like``)
  in the closed-form gradient, never ``None``: the gradient then has the
  parameters' structure and equals ``jax.grad`` of the value leaf for leaf,
  and it can be added to the empirical gradient with ``jax.tree.map`` when
  DTNH is not used.
* Feature regularizers average over the batch (the 1/n of Eq. 3), so their
  weight does not depend on the batch size, like a mean cross-entropy.
* Sums accumulate in float32 (or wider); gradients keep each leaf's dtype.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax.gradients import ClosedFormRegularizer

PyTree = Any
Path = tuple[str, ...]
Include = Union[str, Callable[[Path], bool]]

DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")
"""The four ResNet stage outputs: KnowDist's and DELTA's default layers."""

_INCLUDES = ("kernels", "weights_and_biases", "all")
_NORMALIZATIONS = ("sum", "spatial_mean", "mean")

__all__ = [
    "DEFAULT_LAYERS",
    "attention_from_loss_increase",
    "channel_loss_increase",
    "delta",
    "delta_channel_attention",
    "feature_distance",
    "fit_head",
    "l2",
    "l2_grad",
    "l2_regularizer",
    "l2_sp",
    "l2_sp_grad",
    "l2_sp_regularizer",
    "l2_sp_roles",
    "load_attention",
    "save_attention",
    "source_features",
]


# ----------------------------------------------------------------------------
# Which leaves a parameter regularizer counts.


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _path_names(path) -> Path:
  return tuple(_key_name(key) for key in path)


def _leaf_kinds(paths: Sequence[Path]) -> list[str]:
  """``"kernel"``, ``"bias"`` (of a conv/dense), ``"norm"`` (scale/bias of a norm layer) or ``"other"``.

  A ``bias`` is a conv/dense bias when its module also holds a ``kernel``;
  otherwise (a BatchNorm/LayerNorm ``bias`` next to ``scale``) it is a norm parameter.
  """
  siblings: dict[Path, set[str]] = {}
  for path in paths:
    siblings.setdefault(path[:-1], set()).add(path[-1] if path else "")
  kinds = []
  for path in paths:
    name = path[-1] if path else ""
    if name == "kernel":
      kinds.append("kernel")
    elif name == "bias" and "kernel" in siblings[path[:-1]]:
      kinds.append("bias")
    elif name in ("scale", "bias"):
      kinds.append("norm")
    else:
      kinds.append("other")
  return kinds


def _included(paths: Sequence[Path], include: Include, caller: str) -> list[bool]:
  if callable(include):
    return [bool(include(path)) for path in paths]
  if include not in _INCLUDES:
    raise ValueError(f"{caller}: include must be one of {_INCLUDES} or a function of the leaf path; got {include!r}.")
  kinds = _leaf_kinds(paths)
  if include == "kernels":
    return [kind == "kernel" for kind in kinds]
  if include == "weights_and_biases":
    return [kind in ("kernel", "bias") for kind in kinds]
  return [True] * len(paths)


def _check_nonnegative(caller: str, name: str, value) -> None:
  """Rejects negative weights when they are known in Python (not under ``jit``)."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.number):
    raise TypeError(f"{caller}: {name} must be a number, got {value!r}.")
  if np.any(array < 0):
    raise ValueError(f"{caller}: {name} must be >= 0, got {value!r}.")


def _accumulate(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _half_squared_norm(x: jax.Array) -> jax.Array:
  acc = _accumulate(x.dtype)
  return 0.5 * jnp.sum(jnp.square(x.astype(acc)), dtype=acc)


# ----------------------------------------------------------------------------
# L2 (weight decay).


def l2(params: PyTree, weight_decay: float | jax.Array = 1e-4, include: Include = "kernels") -> jax.Array:
  r"""Plain weight decay, ``wd/2 · Σ_{w ∈ included} |w|²``.

  .. math::

    \Omega(\omega) = \frac{wd}{2} \sum_{w \in S} \|w\|_2^2,
    \qquad \nabla_w \Omega = wd \cdot w \ (w \in S), \ 0 \text{ otherwise.}

  Args:
    params: the trainable parameters (``variables["params"]``, not ``batch_stats``).
    weight_decay: ``wd >= 0``. The default 1e-4 is the L2 baseline of both the
      L2-SP code (``--weight_decay_rate 0.0001`` for the pre-trained layers) and
      the DELTA code (``SGD(weight_decay=1e-4)``).
    include: which leaves count: ``"kernels"`` (conv and dense kernels; as the
      L2-SP code's ``'weights' in v.name``), ``"weights_and_biases"`` (plus
      conv/dense biases, without normalization layers), ``"all"`` (every leaf,
      as PyTorch's ``weight_decay``), or a function of the leaf path
      (a tuple of key names, e.g. ``("fc", "kernel")``) returning a bool.

  Returns:
    The scalar regularizer, float32 (or wider).

  Example::

    # DELTA's classifier term β/2 |w_fc|² (weight and bias of the new head):
    head_l2 = l2(params, weight_decay=0.01, include=lambda path: path[0] == "fc")

  References:
    Li, Grandvalet, Davoine, `Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks <https://arxiv.org/abs/1802.01483>`_, ICML 2018 (the L2 baseline).
  """
  _check_nonnegative("l2", "weight_decay", weight_decay)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  counted = _included([_path_names(path) for path, _ in flat], include, "l2")
  total = jnp.zeros((), jnp.float32)
  for (_, leaf), keep in zip(flat, counted):
    if keep:
      total = total + _half_squared_norm(leaf)
  return weight_decay * total


def l2_grad(params: PyTree, weight_decay: float | jax.Array = 1e-4, include: Include = "kernels") -> PyTree:
  """The closed-form gradient of :func:`l2`: ``wd · w`` on included leaves, exact zeros elsewhere."""
  _check_nonnegative("l2_grad", "weight_decay", weight_decay)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  counted = _included([_path_names(path) for path, _ in flat], include, "l2_grad")
  grads = [
      (weight_decay * leaf).astype(leaf.dtype) if keep else jnp.zeros_like(leaf)
      for (_, leaf), keep in zip(flat, counted)
  ]
  return jax.tree_util.tree_unflatten(treedef, grads)


def l2_regularizer(weight_decay: float | jax.Array = 1e-4, include: Include = "kernels") -> ClosedFormRegularizer:
  """:func:`l2` and :func:`l2_grad` as a :class:`dtnh_jax.ClosedFormRegularizer`."""
  _check_nonnegative("l2_regularizer", "weight_decay", weight_decay)
  return ClosedFormRegularizer(
      value=functools.partial(l2, weight_decay=weight_decay, include=include),
      grad=functools.partial(l2_grad, weight_decay=weight_decay, include=include),
  )


# ----------------------------------------------------------------------------
# L2-SP.


def _is_head_fn(head) -> Callable[[Path], bool]:
  if head is None:
    return lambda path: False
  if isinstance(head, str):
    return lambda path: head in path
  if callable(head):
    return lambda path: bool(head(path))
  raise TypeError(f"l2_sp: head must be a module name, a function of the leaf path or None; got {head!r}.")


def _l2_sp_plan(params, source_params, include, head, caller):
  """``(flat, treedef, roles, source_leaves)``: per leaf ``"transferred"``, ``"head"`` or ``"excluded"``."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path_names(path) for path, _ in flat]
  source = {_path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(source_params)[0]}
  counted = _included(paths, include, caller)
  is_head = _is_head_fn(head)
  roles, source_leaves = [], []
  for path, (_, leaf), keep in zip(paths, flat, counted):
    reference = source.get(path)
    # A leaf the source lacks, or holds in another shape, is a new layer: it has
    # no starting point to be pulled back to, so it is decayed toward 0 like the head.
    new_layer = reference is None or jnp.shape(reference) != jnp.shape(leaf)
    if not keep:
      roles.append("excluded")
      source_leaves.append(None)
    elif is_head(path) or new_layer:
      roles.append("head")
      source_leaves.append(None)
    else:
      roles.append("transferred")
      source_leaves.append(reference)
  return flat, treedef, roles, source_leaves


def l2_sp_roles(params: PyTree, source_params: PyTree, *, include: Include = "kernels", head="fc") -> PyTree:
  """What :func:`l2_sp` does with each leaf: ``"transferred"``, ``"head"`` or ``"excluded"``.

  A pytree of strings with the parameters' structure; handy to check before training.
  """
  _, treedef, roles, _ = _l2_sp_plan(params, source_params, include, head, "l2_sp_roles")
  return jax.tree_util.tree_unflatten(treedef, roles)


def l2_sp(
    params: PyTree,
    source_params: PyTree,
    alpha: float | jax.Array = 0.1,
    beta: float | jax.Array = 0.01,
    *,
    include: Include = "kernels",
    head: str | Callable[[Path], bool] | None = "fc",
) -> jax.Array:
  r"""L2-SP: weight decay toward the pre-trained starting point (Eq. 2 of Wan et al.).

  .. math::

    \Omega(\omega, \omega_s) = \frac{\alpha}{2} \|\omega_S - \omega_S^0\|_2^2
      + \frac{\beta}{2} \|\omega_{\bar S}\|_2^2

  where :math:`S` are the transferred leaves (present in the source with the
  same shape), :math:`\bar S` the new head, and :math:`\omega^0 = \omega_s`
  the source weights. The gradient is :math:`\alpha(\omega - \omega_s)` on
  :math:`S`, :math:`\beta\omega` on :math:`\bar S`, zero on excluded leaves
  (see :func:`l2_sp_grad`). The DTNH paper's Eq. 2, :math:`\|\omega - \omega_s\|^2`,
  is this without the 1/2 and without a separate head term; its λ is tuned
  by cross-validation and not reported.

  Which leaves count: the official L2-SP code (``holyseven/TransferLearningClassification``,
  ``model/network_base.py``, ``_decay`` mode 1, the paper's setting) regularizes
  only variables named ``weights`` -- conv kernels and the new classifier's
  kernel -- and neither BatchNorm's gamma/beta nor the classifier's bias; this
  is ``include="kernels"``, the default. Its mode 101 regularizes every
  trainable variable (``include="all"``), as does the DELTA code's ``l2_sp``
  (all ``named_parameters`` outside ``fc.``, BatchNorm included, and the whole
  ``fc`` toward 0). The head takes the same ``include`` filter.

  Args:
    params: the trainable parameters (``variables["params"]``).
    source_params: the pre-trained parameters :math:`\omega_s`, any structure:
      leaves are matched by path; those missing from it, or shaped differently
      (a 1000-class ``fc``), are new layers and count in the head term.
    alpha: weight of the distance to the source, ``>= 0``. Default 0.1 with
      ``beta=0.01``: the official L2-SP setting (``run_classification/train.sh``:
      ``--weight_decay_rate 0.1 --weight_decay_rate2 0.01``).
    beta: weight decay of the head (new layers), ``>= 0``.
    include: which leaves count: ``"kernels"``, ``"weights_and_biases"``
      (conv/dense kernels and biases, no normalization layers), ``"all"``, or
      a function of the leaf path (tuple of key names) returning a bool.
    head: the head's module name (a leaf is in the head when a component of
      its path equals it; default ``"fc"``, i.e. ``params["fc"]``), a function
      of the leaf path, or ``None`` to find the head only as the leaves the
      source lacks or shapes differently.

  Returns:
    The scalar regularizer, float32 (or wider). With ``dtnh(reg_weight=1.0)``
    the objective is exactly L2-SP's ``J + Ω`` (α and β inside Ω); a
    ``reg_weight`` λ scales both terms.

  Example::

    reg = l2_sp_regularizer(source_params, alpha=0.1, beta=0.01)
    (ce, sp), (g_ce, g_sp) = dtnh_jax.split_value_and_grad(
        cross_entropy_fn, closed_form=[reg])(params, batch)   # one backward pass

  References:
    Li, Grandvalet, Davoine, `Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks <https://arxiv.org/abs/1802.01483>`_, ICML 2018.
  """
  _check_nonnegative("l2_sp", "alpha", alpha)
  _check_nonnegative("l2_sp", "beta", beta)
  flat, _, roles, source_leaves = _l2_sp_plan(params, source_params, include, head, "l2_sp")
  transferred = jnp.zeros((), jnp.float32)
  new = jnp.zeros((), jnp.float32)
  for (_, leaf), role, reference in zip(flat, roles, source_leaves):
    if role == "transferred":
      acc = _accumulate(jnp.result_type(leaf, reference))
      transferred = transferred + _half_squared_norm(leaf.astype(acc) - jnp.asarray(reference).astype(acc))
    elif role == "head":
      new = new + _half_squared_norm(leaf)
  return alpha * transferred + beta * new


def l2_sp_grad(
    params: PyTree,
    source_params: PyTree,
    alpha: float | jax.Array = 0.1,
    beta: float | jax.Array = 0.01,
    *,
    include: Include = "kernels",
    head: str | Callable[[Path], bool] | None = "fc",
) -> PyTree:
  r"""The closed-form gradient of :func:`l2_sp` (same arguments).

  :math:`\alpha(w - w_s)` on transferred leaves, :math:`\beta w` on the head,
  and an exact zero (``jnp.zeros_like``, not ``None``) on excluded leaves, so
  it has the parameters' structure and equals ``jax.grad(l2_sp)``. Each leaf
  keeps the parameter's dtype.
  """
  _check_nonnegative("l2_sp_grad", "alpha", alpha)
  _check_nonnegative("l2_sp_grad", "beta", beta)
  flat, treedef, roles, source_leaves = _l2_sp_plan(params, source_params, include, head, "l2_sp_grad")
  grads = []
  for (_, leaf), role, reference in zip(flat, roles, source_leaves):
    if role == "transferred":
      acc = _accumulate(jnp.result_type(leaf, reference))
      grads.append((alpha * (leaf.astype(acc) - jnp.asarray(reference).astype(acc))).astype(leaf.dtype))
    elif role == "head":
      grads.append((beta * leaf).astype(leaf.dtype))
    else:
      grads.append(jnp.zeros_like(leaf))
  return jax.tree_util.tree_unflatten(treedef, grads)


def l2_sp_regularizer(
    source_params: PyTree,
    alpha: float | jax.Array = 0.1,
    beta: float | jax.Array = 0.01,
    *,
    include: Include = "kernels",
    head: str | Callable[[Path], bool] | None = "fc",
) -> ClosedFormRegularizer:
  """:func:`l2_sp` and :func:`l2_sp_grad` for fixed source weights, as a :class:`dtnh_jax.ClosedFormRegularizer`.

  ``split_value_and_grad(loss_fn, closed_form=[l2_sp_regularizer(source_params)])``
  then runs one forward and one backward pass (for the empirical loss only).
  """
  _check_nonnegative("l2_sp_regularizer", "alpha", alpha)
  _check_nonnegative("l2_sp_regularizer", "beta", beta)
  options = dict(alpha=alpha, beta=beta, include=include, head=head)
  return ClosedFormRegularizer(
      value=lambda params: l2_sp(params, source_params, **options),
      grad=lambda params: l2_sp_grad(params, source_params, **options),
  )


# ----------------------------------------------------------------------------
# Feature-map regularizers: KnowDist and DELTA.


def _as_layers(layers, caller: str) -> tuple[str, ...]:
  if isinstance(layers, str):
    layers = (layers,)
  layers = tuple(layers)
  if not layers:
    raise ValueError(f"{caller}: layers is empty; name at least one feature map, e.g. {DEFAULT_LAYERS}.")
  return layers


def _check_layers(features: Mapping[str, Any], layers: Sequence[str], caller: str, what: str = "the features") -> None:
  if not isinstance(features, Mapping):
    raise TypeError(
        f"{caller}: {what} must be a dict of feature maps (as returned by "
        f"model.apply(..., return_features=True)); got {type(features).__name__}."
    )
  unknown = [layer for layer in layers if layer not in features]
  if unknown:
    raise ValueError(
        f"{caller}: unknown layer(s) {unknown} in layers; {what} hold {sorted(features)}."
    )


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
      raise ValueError(f"{caller}: feature map {layer!r} must be at least (batch, channels), got shape {jnp.shape(target)}.")
    pairs.append((layer, target, jax.lax.stop_gradient(source)))
  return pairs


def _check_normalize(normalize, caller):
  if normalize not in _NORMALIZATIONS:
    raise ValueError(f"{caller}: normalize must be one of {_NORMALIZATIONS}, got {normalize!r}.")


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
    normalize: ``"sum"``, ``"spatial_mean"`` or ``"mean"`` (see above).

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
  _check_normalize(normalize, "feature_distance")
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
    normalize: ``"sum"``, ``"spatial_mean"`` (default) or ``"mean"``.

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
  _check_normalize(normalize, "delta")
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


def _split_batch(batch):
  if isinstance(batch, Mapping):
    return batch["image"], batch["label"]
  images, labels = batch
  return images, labels


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


# ----------------------------------------------------------------------------
# DELTA's channel attention, computed once before fine-tuning.


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
  one forward pass per batch.

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
