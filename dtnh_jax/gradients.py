"""Both gradients DTNH needs, from ONE forward pass.

DTNH needs ``∇J`` and ``∇Ω`` apart. Calling ``jax.value_and_grad`` twice in
separate programs runs the network forward twice; instead we linearize once
with ``jax.vjp`` and pull back one cotangent per loss term (one backward pass
each), or, under ``jax.jit``, differentiate each term on its own trace and let
XLA merge the identical forward passes (``backward="retrace"``). A regularizer
with a closed-form gradient (L2-SP: ``α (w - w0)``) needs no backward pass at
all: pass it as a :class:`ClosedFormRegularizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BACKWARDS",
    "ClosedFormRegularizer",
    "split_value_and_grad",
]

PyTree = Any


class ClosedFormRegularizer(NamedTuple):
  """A regularizer of the parameters alone whose gradient is known in closed form.

  Attributes:
    value: ``params -> scalar``, the regularizer.
    grad: ``params -> pytree``, its gradient; leaves it does not touch may be
      ``None`` (DTNH and :func:`split_value_and_grad` treat them as zeros).
  """

  value: Callable[[PyTree], jax.Array]
  grad: Callable[[PyTree], PyTree]


def _as_terms(out) -> tuple[jax.Array, ...]:
  terms = tuple(out) if isinstance(out, (tuple, list)) else (out,)
  for i, term in enumerate(terms):
    if jnp.ndim(term) != 0:
      name = "the empirical loss" if i == 0 else f"regularizer #{i}"
      raise TypeError(
          f"split_value_and_grad: {name} must be a scalar, got shape {jnp.shape(term)}. "
          "The function must return `empirical` or `(empirical, reg_1, ..., reg_m)`"
          " (and `aux` after it when has_aux=True)."
      )
  return terms


BACKWARDS = ("sequential", "retrace", "vmap")


def _retraced(forward, params, has_aux):
  """``(terms, aux, grads)``: each term's gradient on its own trace of ``forward``."""
  out, aux = forward(params) if has_aux else (forward(params), None)
  terms = _as_terms(out)
  term = lambda p, index: _as_terms(forward(p)[0] if has_aux else forward(p))[index]
  return terms, aux, [jax.grad(functools.partial(term, index=i))(params) for i in range(len(terms))]


def _pulled_back(forward, params, has_aux, batched):
  """``(terms, aux, grads)``: one linearization, one one-hot cotangent pulled back per term."""
  if has_aux:
    out, pullback, aux = jax.vjp(forward, params, has_aux=True)
  else:
    (out, pullback), aux = jax.vjp(forward, params), None
  terms = _as_terms(out)

  def cotangent(index):
    one_hot = tuple(jnp.ones_like(t) if i == index else jnp.zeros_like(t) for i, t in enumerate(terms))
    return one_hot if isinstance(out, (tuple, list)) else one_hot[0]

  if batched and len(terms) > 1:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[cotangent(i) for i in range(len(terms))])
    grads = jax.vmap(lambda ct: pullback(ct)[0])(stacked)
    return terms, aux, [jax.tree.map(lambda x, i=i: x[i], grads) for i in range(len(terms))]
  return terms, aux, [pullback(cotangent(i))[0] for i in range(len(terms))]


def split_value_and_grad(
    fun: Callable[..., Any],
    *,
    has_aux: bool = False,
    closed_form: Sequence[ClosedFormRegularizer] = (),
    backward: str = "sequential",
) -> Callable[..., tuple[Any, tuple[PyTree, ...]]]:
  """Like ``jax.value_and_grad``, but one gradient per loss term and one forward pass.

  Args:
    fun: ``fun(params, *args, **kwargs)`` returning the empirical loss, or a
      tuple ``(empirical, reg_1, ..., reg_m)`` of scalars computed from one
      forward pass of the model (e.g. KnowDist from the same feature maps);
      with ``has_aux``, ``(that, aux)``.
    has_aux: whether ``fun`` returns auxiliary data (e.g. BatchNorm statistics).
    closed_form: regularizers of the parameters alone with known gradients;
      their values and gradients are appended after ``fun``'s terms. They are
      evaluated after the traced gradients (an optimization barrier: on a CPU,
      XLA otherwise runs these parameter-sized passes alongside the backward
      convolutions and slows both), values and gradients apart (XLA would
      otherwise materialize the shared ``w - w0`` in an extra pass; both
      measured in benchmarks/RESULTS.md).
    backward: how the per-term gradients are formed.
      ``"sequential"`` (default): ``fun`` is traced once (one ``jax.vjp``) and
      each term's one-hot cotangent is pulled back on its own. Unjitted, this
      is the only mode that runs the forward pass once; but every pull-back
      also carries the other terms' zero cotangents through their branches
      (XLA does not fold ``x * 0``: it would change NaN semantics).
      ``"retrace"``: each term is differentiated on its own trace of ``fun``,
      so each backward pass holds only that term's path; under ``jax.jit``
      XLA merges the identical forward passes (common-subexpression
      elimination), leaving one forward pass in the compiled program (checked
      by the tests on the convolutions of a compiled CNN step). Fastest inside
      a jitted train step (benchmarks/RESULTS.md); unjitted it runs the
      forward pass once more per term.
      ``"vmap"``: the pull-backs batched with ``jax.vmap`` (more memory; slower
      on CPU in our measurements).

  Returns:
    A function with ``fun``'s signature returning ``(values, grads)``, or
    ``((values, aux), grads)`` with ``has_aux``, where ``values`` and ``grads``
    are tuples ``(empirical, reg_1, ..., reg_k)``; ``grads`` is exactly what
    :func:`dtnh_jax.dtnh`'s ``update`` takes.

  Example::

    def loss_fn(params, batch):
      logits, features = model.apply(params, batch["image"], return_features=True)
      return cross_entropy(logits, batch["label"]), feature_distance(features, ...)

    (ce, kd), (g_ce, g_kd) = split_value_and_grad(loss_fn)(params, batch)
  """
  if backward not in BACKWARDS:
    raise ValueError(f"split_value_and_grad: backward must be one of {BACKWARDS}, got {backward!r}.")

  def value_and_grads(params, *args, **kwargs):
    forward = lambda p: fun(p, *args, **kwargs)
    if backward == "retrace":
      terms, aux, grads = _retraced(forward, params, has_aux)
    else:
      terms, aux, grads = _pulled_back(forward, params, has_aux, batched=backward == "vmap")

    values = list(terms)
    if closed_form:
      # The closed forms read only the parameters, so XLA would run them
      # alongside the backward passes' convolutions, where on a CPU they slow
      # both: the barrier orders them after the traced gradients. Values and
      # gradients read two copies of the parameters (two outputs of the
      # barrier), so that XLA cannot merge their common subexpressions (L2-SP's
      # w - w0) into one more array-sized pass between them.
      grads, grad_params, value_params = jax.lax.optimization_barrier((grads, params, params))
      for regularizer in closed_form:
        values.append(regularizer.value(value_params))
        grads.append(regularizer.grad(grad_params))
    values, grads = tuple(values), tuple(grads)
    return ((values, aux), grads) if has_aux else (values, grads)

  return value_and_grads
