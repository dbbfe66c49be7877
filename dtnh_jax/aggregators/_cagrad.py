"""CAGrad: the sum's best worst-case improvement within a ball around it (Liu et al. 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax.aggregators import _gram, _qp

__all__ = [
    "cagrad",
    "cagrad_weights",
]


def _objective(weights, gram, inner_mean, sqrt_phi):
  """``F(w) = <V w, g0> + √φ |V w|`` for candidates ``[P, F, m]``."""
  quadratic = jnp.einsum("pfi,pij,pfj->pf", weights, gram, weights)
  return jnp.einsum("pfi,pi->pf", weights, inner_mean) + sqrt_phi[:, None] * jnp.sqrt(jnp.maximum(quadratic, 0))


def cagrad_weights(gram: jax.Array, c, norm_eps=1e-3) -> jax.Array:
  r"""CAGrad's weights ``[groups, m]`` on the rows, in the sum convention (``1 + m √φ/|g_w| · w``).

  With ``g0`` the rows' mean and :math:`\sqrt\phi = c |g_0|`, ``w`` minimizes
  the convex :math:`F(w) = \langle g_w, g_0\rangle + \sqrt\phi\, |g_w|` over
  the simplex, :math:`g_w = V^\top w`. On a face ``S`` of the simplex where
  :math:`g_w \ne 0`, stationarity is :math:`G_{SS} w + \mu 1 = -s\, G_S u`,
  :math:`1^\top w = 1` with :math:`s = |g_w| / \sqrt\phi`: linear in ``s``,
  ``w(s) = p + s q``, and :math:`w(s)^\top G w(s) = \phi s^2` is a quadratic
  in ``s``. Its positive roots on every face, the vertices and the min-norm
  point (where :math:`g_w = 0` and ``F`` is not smooth) are the candidates;
  the feasible one with the smallest ``F`` is the exact minimizer.

  A minimizer with :math:`|g_w| <` ``norm_eps`` (relative to the rows' size)
  means the rows are Pareto-stationary (0 is in their hull, e.g. one row is
  zero): the best worst-case gain is 0 and :math:`\hat g_w` is undefined.
  Then ``d`` is the sum if it conflicts with no row (it attains that 0, and
  this is what the authors' code returns), else 0 (TorchJD's choice, always).
  """
  gram = _gram.normalized(gram)
  m = gram.shape[-1]
  dtype = gram.dtype
  mean = jnp.full((m,), 1 / m, dtype)
  inner_mean = gram @ mean                                                # <V_i, g0>, [P, m]
  c = jnp.asarray(c, dtype)
  phi = c ** 2 * (inner_mean @ mean)                                      # c² |g0|²
  sqrt_phi = jnp.sqrt(jnp.maximum(phi, 0))

  systems, masks = _qp.simplex_face_systems(gram)                         # [P, F, m+1, m+1]
  free = jnp.asarray(masks)
  rhs_sum = jnp.zeros(systems.shape[:-1], dtype).at[..., m].set(1)
  rhs_slope = jnp.concatenate([jnp.where(free, -inner_mean[:, None, :], 0),
                               jnp.zeros(systems.shape[:-2] + (1,), dtype)], axis=-1)
  solution = jnp.linalg.solve(systems, jnp.stack([rhs_sum, rhs_slope], axis=-1))
  p = jnp.where(free, solution[..., :m, 0], 0)
  q = jnp.where(free, solution[..., :m, 1], 0)
  quadratic = lambda x, y: jnp.einsum("pfi,pij,pfj->pf", x, gram, y)
  a = quadratic(q, q) - phi[:, None]
  b = 2 * quadratic(p, q)
  const = quadratic(p, p)
  discriminant = b ** 2 - 4 * a * const
  # Both roots without cancellation: t = -(b + sign(b)√disc)/2, roots t/a and const/t.
  t = -(b + jnp.where(b >= 0, 1, -1) * jnp.sqrt(jnp.maximum(discriminant, 0))) / 2
  roots = jnp.stack([t / jnp.where(a != 0, a, jnp.nan), const / jnp.where(t != 0, t, jnp.nan)], axis=-1)
  roots = jnp.where((discriminant >= 0)[..., None] & (roots > 0), roots, jnp.nan)
  on_faces = (p[..., None, :] + roots[..., None] * q[..., None, :]).reshape(gram.shape[0], -1, m)

  vertices = jnp.broadcast_to(jnp.eye(m, dtype=dtype), (gram.shape[0], m, m))
  min_norm = _qp.min_quadratic_on_simplex(gram)[:, None, :]
  candidates = jnp.concatenate([on_faces, vertices, min_norm], axis=1)
  feasible = (jnp.all(candidates >= -_qp.FEASIBILITY_TOLERANCE, axis=-1)
              & (jnp.abs(candidates.sum(axis=-1) - 1) <= _qp.FEASIBILITY_TOLERANCE)
              & jnp.all(jnp.isfinite(candidates), axis=-1))
  score = jnp.where(feasible, _objective(candidates, gram, inner_mean, sqrt_phi), jnp.inf)
  best = jnp.take_along_axis(candidates, jnp.argmin(score, axis=-1)[:, None, None], axis=1)[:, 0]
  best = jnp.maximum(best, 0)
  best = best / best.sum(axis=-1, keepdims=True)

  norm_w = jnp.sqrt(jnp.maximum(jnp.einsum("pi,pij,pj->p", best, gram, best), 0))
  norm_eps = jnp.asarray(norm_eps, dtype)
  corrected = 1 + (m * sqrt_phi / jnp.where(norm_w > 0, norm_w, 1))[:, None] * best
  sum_conflicts_with_none = jnp.all(inner_mean >= -_qp.FEASIBILITY_TOLERANCE, axis=-1)
  stationary = jnp.where(sum_conflicts_with_none[:, None], 1, 0).astype(dtype)
  corrected = jnp.where((norm_w >= norm_eps)[:, None], corrected, stationary)
  # φ = 0 (c = 0, or the rows sum to zero): no ball to search, d is the plain sum.
  return jnp.where((phi > 0)[:, None], corrected, 1)


def cagrad(reg_weight, *, c, norm_eps=1e-3, granularity="tree", unprojected=None
           ) -> optax.GradientTransformationExtraArgs:
  r"""Conflict-averse gradient descent on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  .. math::

    d = \operatorname*{argmax}_{\|x - g_0\| \le c \|g_0\|} \min_i \langle V_i, x\rangle,
    \qquad g_0 = g + R,

  the direction within a ball around the plain regularized gradient that
  improves the worst-off row most. By duality
  :math:`d = g_0 + c |g_0| \hat g_w`, ``w`` from :func:`cagrad_weights`
  (solved exactly per group). ``c = 0`` is :math:`g + R`; a larger ``c``
  moves further towards MGDA's common descent direction. Unlike the
  projections, ``d`` differs from :math:`g + R` even without conflict
  (whenever ``c > 0``): the ball is searched at every step.

  TorchJD's ``CAGrad`` (and the paper) centre the ball on the rows' *mean*;
  here on their sum, so that ``c = 0`` is :math:`g + R` as ``dtnh`` without
  conflict: TorchJD's direction times the number of rows, for the same
  ``c``. Neither rescales by :math:`1/(1 + c^2)` as the authors' code can.
  Also unlike TorchJD: where the rows are Pareto-stationary and their sum
  conflicts with none of them (a zero row: L2-SP's gradient at the source
  weights, where every fine-tuning run starts), ``d`` is the sum, not 0
  (TorchJD's 0 would never move the weights off the source, so ``r`` would
  stay 0); ``c = 0`` always gives the sum; and Gram matrices with a tiny
  trace are not zeroed.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    c: the ball's radius relative to :math:`|g_0|`, >= 0 (the paper uses
      0.2-0.9; no default, as in TorchJD). May be traced.
    norm_eps: below this :math:`|g_w|` (relative to the square root of the
      Gram matrix's trace) the rows count as Pareto-stationary (see
      :func:`cagrad_weights`). TorchJD's 1e-4 is meant for float64: from
      float32 Gram entries :math:`|g_w|` is resolved only to about
      :math:`\sqrt{\epsilon_{32}} \approx 3 \cdot 10^{-4}` of the rows' size
      (exactly opposite rows show that much), hence 1e-3.
    granularity: as for :func:`dtnh_jax.dtnh`.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is an :class:`AggregatorState`.

  References:
    Liu, Liu, Jin, Stone, Liu, `Conflict-Averse Gradient Descent for
    Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021.
  """
  _gram.check_nonnegative("cagrad", "c", c)
  _gram.check_nonnegative("cagrad", "norm_eps", norm_eps)

  def row_weights(gram, state):
    return cagrad_weights(gram, c, norm_eps), state

  return _gram.aggregator("cagrad", reg_weight, row_weights, granularity=granularity, unprojected=unprojected,
                          max_rows=_qp.MAX_ROWS)
