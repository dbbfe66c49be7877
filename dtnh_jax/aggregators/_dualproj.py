"""DualProj: the rows' sum projected onto their dual cone (GEM's Eq. 11; TorchJD's DualProj)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax.aggregators import _gram, _qp

__all__ = [
    "dualproj",
    "dualproj_weights",
]


def dualproj_weights(gram: jax.Array, reg_eps=0.0) -> jax.Array:
  """Weights ``[groups, m]`` of the projection of ``Σ V_i`` onto ``{x : <x, V_i> >= 0 ∀i}``.

  Solves ``min vᵀ (G/tr G + reg_eps·I) v`` subject to ``v >= 1`` exactly (:mod:`._qp`).
  """
  gram = _gram.normalized(gram)
  regularized = gram + jnp.asarray(reg_eps, gram.dtype) * jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return _qp.min_quadratic_above(regularized, jnp.ones(gram.shape[:-1], gram.dtype))


def dualproj(reg_weight, *, reg_eps=0.0, granularity="tree", unprojected=None
             ) -> optax.GradientTransformationExtraArgs:
  r"""DualProj on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  .. math::

    d = \operatorname*{argmin}_{x} \|x - (g + R)\| \text{ s.t. } \langle x, V_i\rangle \ge 0 \text{ for every row,}

  the nearest direction to the plain regularized gradient that conflicts with
  no row: :math:`g + R` itself when it conflicts with none (then as
  ``dtnh``), else its projection onto the rows' dual cone. By duality
  :math:`d = V^\top v` with :math:`v = \operatorname{argmin}_{v \ge 1} v^\top G v`
  (Jacobian descent, Proposition 1), solved exactly per group.

  TorchJD's ``DualProj`` projects the *mean* of the rows; here the sum (its
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
    Lopez-Paz, Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017 (Eq. 11); Quinton,
    Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024.
  """
  _gram.check_nonnegative("dualproj", "reg_eps", reg_eps)

  def row_weights(gram, state):
    return dualproj_weights(gram, reg_eps), state

  return _gram.aggregator("dualproj", reg_weight, row_weights, granularity=granularity, unprojected=unprojected,
                          max_rows=_qp.MAX_ROWS)
