"""Gradient accumulation for DTNH: both gradients averaged over micro-batches.

DTNH is not linear in its inputs: the projection coefficient
:math:`\\langle g, r\\rangle / \\|g\\|^2` and the conflict test depend on the
whole batch. One step on a batch split into ``k`` equal micro-batches is
therefore DTNH on the *means*

.. math::

  \\bar g = \\tfrac1k \\textstyle\\sum_j g_j, \\qquad
  \\bar r = \\tfrac1k \\textstyle\\sum_j r_j, \\qquad
  d = \\mathrm{DTNH}(\\bar g, \\bar r),

not the mean of the micro-batch directions :math:`\\mathrm{DTNH}(g_j, r_j)`.

``optax.MultiSteps`` averages only ``updates`` and forwards extra arguments as
given at each micro-step, so at the step it emits, dtnh would see
:math:`\\bar g` with the *last* micro-batch's regularizer gradient. That is the
same thing when the regularizer depends on the parameters alone (L2, L2-SP:
the parameters do not move while gradients accumulate) and wrong when it
depends on the batch (KnowDist's feature distance, DELTA). :func:`multi_steps`
averages both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

from dtnh_jax import transform

__all__ = [
    "multi_steps",
]


def _full_regularizer(regularizer, params, index):
  """One regularizer gradient with the parameters' structure: untouched (None) leaves become zeros.

  A zero leaf and a ``None`` leaf give dtnh the same direction, and the
  accumulator needs a fixed structure from the first micro-step on.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path for path, _ in flat]
  leaves = [leaf for _, leaf in flat]
  aligned = transform.flatten_regularizer(paths, leaves, regularizer, index)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.zeros_like(p) if r is None else r for r, p in zip(aligned, leaves)]
  )


def multi_steps(
    tx: optax.GradientTransformation,
    every_k_schedule: Union[int, Callable[[jax.Array], jax.Array]],
    *,
    num_regularizers: int = 1,
    should_skip_update_fn: optax.ShouldSkipUpdateFunction | None = None,
    accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""``optax.MultiSteps`` for a chain holding :func:`~dtnh_jax.dtnh`: accumulates both gradients.

  Every micro-step takes the micro-batch's empirical gradient :math:`g_j` as
  ``updates`` and its regularizer gradient(s) :math:`r_j` as
  ``regularizer_grads``; after ``k`` micro-steps ``tx`` runs once on the means
  :math:`(\bar g, \bar r)`, which is one step on the ``k`` times larger batch
  (for losses that are means over equal micro-batches). In between, the
  updates are zeros and ``tx``'s state is kept, as with ``optax.MultiSteps``,
  whose machinery (Welford means, ``every_k_schedule``, skipping) this reuses:
  ``(g, r_1, ..., r_n)`` travels through it as one tuple. Both gradients are
  averaged, never summed: a summed regularizer gradient would weigh a
  parameter-only regularizer (L2-SP) ``k`` times.

  Args:
    tx: the optimizer, e.g. ``optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.01,
      momentum=0.9))``; it receives ``regularizer_grads=`` (the means) and the
      other extra arguments of the micro-step it emits on.
    every_k_schedule: the number of micro-steps per step, an int or a function
      of the step count (as for ``optax.MultiSteps``).
    num_regularizers: how many regularizer gradients each micro-step passes
      (one per ``reg_weight`` of dtnh): with 1, ``regularizer_grads`` is a pytree;
      with more, a tuple of that many pytrees. The accumulator is allocated at
      ``init``, so the count is fixed here.
    should_skip_update_fn: as for ``optax.MultiSteps`` (e.g.
      ``optax.skip_not_finite``); it sees the tuple ``(g, r_1, ..., r_n)`` as
      updates and a tuple of as many copies of the parameters, so a
      non-finite regularizer gradient skips the micro-step too.
    accumulator_dtype: dtype of the running means (float32 by default).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose
    ``update(g, state, params, regularizer_grads=r, **extra_args)`` returns
    ``(updates, state)``; ``state`` is an ``optax.MultiStepsState`` whose
    ``acc_grads`` is the tuple of running means and ``inner_opt_state`` is
    ``tx``'s state (``optax.tree.get(state, "diagnostics")`` finds dtnh's). A
    step was taken when ``state.mini_step == 0`` and ``state.gradient_step > 0``
    (what ``optax.MultiSteps.has_updated`` tests).

  Raises:
    TypeError: at ``update`` without ``regularizer_grads``.
    ValueError: for a ``num_regularizers`` below 1, or ``regularizer_grads`` with
      another count of pytrees or another structure than the parameters.

  Example::

    tx = dtnh_jax.multi_steps(optax.chain(dtnh_jax.dtnh(0.1), optax.sgd(0.01, momentum=0.9)), 4)
    opt_state = tx.init(params)
    for micro_batch in micro_batches:
      g, r = gradients(params, micro_batch)
      updates, opt_state = tx.update(g, opt_state, params, regularizer_grads=r)
      params = optax.apply_updates(params, updates)   # zeros until the 4th
  """
  if not isinstance(num_regularizers, int) or num_regularizers < 1:
    raise ValueError(f"multi_steps: num_regularizers must be an int >= 1, got {num_regularizers!r}.")
  tx = optax.with_extra_args_support(tx)
  count = 1 + num_regularizers

  def unpack_init(packed_params):
    return tx.init(packed_params[0])

  def unpack_update(packed_updates, state, params=None, **extra_args):
    # MultiSteps passes `params` by keyword: the packed tuple, or None.
    empirical, *regularizers = packed_updates
    regularizer_grads = regularizers[0] if num_regularizers == 1 else tuple(regularizers)
    return tx.update(empirical, state, None if params is None else params[0], regularizer_grads=regularizer_grads,
                     **extra_args)

  accumulator = optax.MultiSteps(
      optax.GradientTransformationExtraArgs(unpack_init, unpack_update),
      every_k_schedule,
      use_grad_mean=True,
      should_skip_update_fn=should_skip_update_fn,
      accumulator_dtype=accumulator_dtype,
  )

  def init_fn(params):
    return accumulator.init((params,) * count)

  def update_fn(updates, state, params=None, *, regularizer_grads=None, **extra_args):
    if regularizer_grads is None:
      raise TypeError(
          "multi_steps: call update(empirical_grad, state, params, regularizer_grads=...) with the "
          "micro-batch's regularizer gradient(s); without them there is nothing to accumulate for dtnh."
      )
    regularizers = transform.regularizer_list(regularizer_grads, updates, num_regularizers)
    if len(regularizers) != num_regularizers:
      raise ValueError(
          f"multi_steps: got {len(regularizers)} regularizer gradients but num_regularizers={num_regularizers}."
      )
    reference = updates if params is None else params
    regularizers = [
        _full_regularizer(r, reference, i + 1 if num_regularizers > 1 else 0) for i, r in enumerate(regularizers)
    ]
    packed_params = None if params is None else (params,) * count
    return accumulator.update((updates, *regularizers), state, packed_params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
