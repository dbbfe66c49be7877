"""MGDA: the min-norm point of the rows' convex hull (Désidéri 2012; Sener & Koltun 2018)."""

from __future__ import annotations

import jax
import optax

from dtnh_jax.aggregators import _gram, _qp

__all__ = [
    "mgda",
    "mgda_weights",
]


def mgda_weights(gram: jax.Array) -> jax.Array:
  """The convex weights ``[groups, m]`` of the min-norm point of the rows' hull, exactly (:mod:`._qp`)."""
  return _qp.min_quadratic_on_simplex(_gram.normalized(gram))


def mgda(reg_weight, *, granularity="tree", unprojected=None) -> optax.GradientTransformationExtraArgs:
  r"""MGDA on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  .. math::

    d = \operatorname*{argmin}_{x \in \operatorname{conv}(V)} \|x\|, \qquad
    \langle d, V_i\rangle \ge \|d\|^2 \text{ for every row},

  the common descent direction of all rows: a step along it lowers the
  empirical loss and every regularizer at once, unless :math:`d = 0` (the
  rows are Pareto-stationary: some convex combination cancels). Unlike the
  other corrections, :math:`|d| \le \min_i |V_i|`: the direction is not
  :math:`g + R` when nothing conflicts, its length is set by the shortest
  row, and it is dominated by the smaller of :math:`g` and :math:`\lambda r`
  (with a small :math:`\lambda`, MGDA follows the regularizer). A zero row
  gives ``d = 0``: with L2-SP, whose gradient is 0 at the source weights
  where fine-tuning starts, MGDA never moves (start elsewhere, or use
  another correction).

  The simplex QP is solved exactly by enumerating its faces (no iterations;
  float32 rounding only). TorchJD's ``MGDA`` (Frank-Wolfe, ``epsilon=1e-3``,
  at most 100 iterations) approximates the same point, with the same
  scale (convex weights, not normalized rows).

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    granularity: as for :func:`dtnh_jax.dtnh`.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is an :class:`AggregatorState`.

  References:
    Désidéri, `Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_,
    2012; Sener, Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018.
  """

  def row_weights(gram, state):
    return mgda_weights(gram), state

  return _gram.aggregator("mgda", reg_weight, row_weights, granularity=granularity, unprojected=unprojected,
                          max_rows=_qp.MAX_ROWS)
