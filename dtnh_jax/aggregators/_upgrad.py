"""UPGrad: every row projected onto the rows' dual cone, then summed (Quinton & Rey 2024)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax.aggregators import _gram, _qp

__all__ = [
    "upgrad",
    "upgrad_weights",
]


def upgrad_weights(gram: jax.Array, reg_eps=0.0) -> jax.Array:
  """Weights ``[groups, m]`` of ``Σ_i π(V_i)``, ``π`` the projection onto ``{x : <x, V_j> >= 0 ∀j}``.

  One exact QP per row (:mod:`._qp`): ``min vᵀ (G/tr G + reg_eps·I) v``
  subject to ``v >= e_i``; the weights are the sum of the ``m`` solutions.
  """
  gram = _gram.normalized(gram)
  m = gram.shape[-1]
  regularized = gram + jnp.asarray(reg_eps, gram.dtype) * jnp.eye(m, dtype=gram.dtype)
  lower = jnp.broadcast_to(jnp.eye(m, dtype=gram.dtype), gram.shape[:-2] + (m, m))       # [P, row i, m]
  per_row = _qp.min_quadratic_above(jnp.broadcast_to(regularized[..., None, :, :], lower.shape + (m,)), lower)
  return per_row.sum(axis=-2)


def upgrad(reg_weight, *, reg_eps=0.0, granularity="tree", unprojected=None
           ) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  .. math::

    d = \sum_i \pi(V_i), \qquad
    \pi(x) = \operatorname*{argmin}_{y:\ \langle y, V_j\rangle \ge 0\ \forall j} \|y - x\|,

  each row projected onto the dual cone of all rows, so :math:`d` conflicts
  with none of them (:math:`\langle d, V_j\rangle \ge 0`), and rows that
  conflict with nothing are kept as they are: without conflict
  :math:`d = g + R`, as ``dtnh``. Unlike DualProj (one projection of the
  sum), each row contributes the projection of itself alone, which scales
  with that row (:math:`\pi(t x) = t \pi(x)`, t >= 0). Each projection is the QP
  :math:`\min_{v \ge e_i} v^\top G v`, solved exactly per group.

  TorchJD's ``UPGrad`` averages the projected rows; here they are summed (its
  ``pref_vector`` of ones), so that the no-conflict case is :math:`g + R`:
  TorchJD's default times the number of rows. The Gram matrix is divided by
  its trace, and ``reg_eps`` is added to its diagonal: 0 by default, the exact
  projection (the face enumeration needs no regularization). TorchJD adds
  1e-4 so that its QP solver sees a positive definite matrix; pass
  ``reg_eps=1e-4`` to match it. That bias is not small here: a row whose
  squared norm is below about ``reg_eps`` times the trace (often
  :math:`\lambda r` next to :math:`g`) then barely constrains the projection,
  and ``d`` can conflict with it.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    reg_eps: added to the trace-normalized Gram matrix's diagonal, >= 0
      (TorchJD: 1e-4).
    granularity: as for :func:`dtnh_jax.dtnh`.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is an :class:`AggregatorState`.

  References:
    Quinton, Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  _gram.check_nonnegative("upgrad", "reg_eps", reg_eps)

  def row_weights(gram, state):
    return upgrad_weights(gram, reg_eps), state

  return _gram.aggregator("upgrad", reg_weight, row_weights, granularity=granularity, unprojected=unprojected,
                          max_rows=_qp.MAX_ROWS)
