r"""Parameter regularizers with closed-form gradients: L2 (weight decay) and L2-SP.

:func:`l2_regularizer` and :func:`l2_sp_regularizer` wrap a value and its
gradient in a :class:`dtnh_jax.ClosedFormRegularizer`, so
:func:`dtnh_jax.split_value_and_grad` needs no backward pass for them. The
conventions (the factor 1/2, exact zeros on uncounted leaves) are those of
:mod:`dtnh_jax.regularizers`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Union

import jax
import jax.numpy as jnp

from dtnh_jax.gradients import ClosedFormRegularizer
from dtnh_jax.regularizers._common import PyTree, _accumulate, _check_nonnegative

Path = tuple[str, ...]
Include = Union[str, Callable[[Path], bool]]

_INCLUDES = ("kernels", "weights_and_biases", "all")


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


def _checked_l2_sp_plan(params, source_params, alpha, beta, include, head, caller):
  """:func:`_l2_sp_plan` after checking ``alpha, beta >= 0``: how :func:`l2_sp` and :func:`l2_sp_grad` begin."""
  _check_nonnegative(caller, "alpha", alpha)
  _check_nonnegative(caller, "beta", beta)
  return _l2_sp_plan(params, source_params, include, head, caller)


def _difference_to_source(leaf, reference) -> jax.Array:
  """``w - w_s``, in float32 or the pair's wider dtype."""
  acc = _accumulate(jnp.result_type(leaf, reference))
  return leaf.astype(acc) - jnp.asarray(reference).astype(acc)


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
  flat, _, roles, source_leaves = _checked_l2_sp_plan(params, source_params, alpha, beta, include, head, "l2_sp")
  transferred = jnp.zeros((), jnp.float32)
  new = jnp.zeros((), jnp.float32)
  for (_, leaf), role, reference in zip(flat, roles, source_leaves):
    if role == "transferred":
      transferred = transferred + _half_squared_norm(_difference_to_source(leaf, reference))
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
  flat, treedef, roles, source_leaves = _checked_l2_sp_plan(
      params, source_params, alpha, beta, include, head, "l2_sp_grad")
  grads = []
  for (_, leaf), role, reference in zip(flat, roles, source_leaves):
    if role == "transferred":
      grads.append((alpha * _difference_to_source(leaf, reference)).astype(leaf.dtype))
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
