"""The regularizer's share of the step bounded by ``κ |g|``, on ``g + λ r`` or after DTNH's projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax import names
from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.corrections import _common

__all__ = [
    "share_bound",
    "share_scales",
]


def share_scales(grams: jax.Array, coefficients: jax.Array, reg_weights: jax.Array, kappa) -> jax.Array:
  """The factor ``s_p = min(1, κ |g|_p / |R'|_p)`` per group, ``[groups + 1]`` (1 in the unprojected group).

  ``R' = Σ_i λ_i (r_i - c_i g)`` with DTNH's coefficients ``c`` (:func:`dtnh_jax.projection.projection_coefficients`,
  zero for ``projection="none"``). ``s = 1`` where ``R' = 0``; ``s = 0`` where ``g = 0`` but ``R' ≠ 0``.
  """
  acc = grams.dtype
  lam = reg_weights.astype(acc)
  weights = jnp.concatenate([-(coefficients.astype(acc) @ lam)[:, None], jnp.broadcast_to(lam, coefficients.shape)],
                            axis=1)                                           # R' on [g, r_1, ..., r_k]
  reg_sq = jnp.einsum("pi,pij,pj->p", weights, grams, weights)
  norm_reg = jnp.sqrt(jnp.maximum(reg_sq, 0))
  bound = jnp.asarray(kappa, acc) * jnp.sqrt(jnp.maximum(grams[:, 0, 0], 0))
  scale = jnp.where(norm_reg > bound, bound / jnp.where(norm_reg > 0, norm_reg, 1), 1)
  return scale.at[-1].set(1)


def share_bound(reg_weight, *, kappa=1.0, projection: str = "none", granularity="tree", unprojected=None
                ) -> optax.GradientTransformationExtraArgs:
  r"""The regularizer's part of the step never longer than :math:`\kappa |g|`.

  With :math:`R' = \sum_i \lambda_i r_i` (``projection="none"``) or DTNH's
  :math:`R' = \sum_i \lambda_i (r_i - c_i g)` (``"conflict"``: Algorithm 1; ``"always"``), per group

  .. math::

    d = g + \min\left(1, \frac{\kappa |g|}{|R'|}\right) R',

  so :math:`|d - g| \le \kappa |g|`: a regularizer far stronger than the
  data's gradient (a large :math:`\lambda`, a bad source) cannot take over
  the step, and where it is weaker nothing changes (:math:`d = g + R'`). The
  scale is positive, so after DTNH's projection :math:`\langle d, g\rangle
  \ge |g|^2` still holds. Where :math:`g = 0` the regularizer makes no step.
  ``state.removed_fraction`` is :math:`1 - s` for ``"none"``.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    kappa: :math:`\kappa \ge 0`, the largest ratio :math:`|d - g| / |g|`
      (may be traced, e.g. by ``optax.inject_hyperparams``).
    projection: ``"none"`` bounds the plain :math:`g + \lambda r`;
      ``"conflict"`` or ``"always"`` bound DTNH's direction with that
      ``projection`` (:func:`dtnh_jax.dtnh`).
    granularity: as for :func:`dtnh_jax.dtnh`: each group is projected and
      bounded on its own.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there, unbounded).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is a :class:`~dtnh_jax.corrections.CorrectionState`.
  """
  _common.check_in_range("share_bound", "kappa", kappa, 0.0, float("inf"), high_included=False)
  if projection not in names.PROJECTIONS:
    raise ValueError(f"share_bound: projection must be one of {names.PROJECTIONS}, got {projection!r}.")

  def init_state(params, num_regularizers, single):
    del params
    return _common.CorrectionState(**_common.zero_state_fields(num_regularizers, single))

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    per_leaf, grams = projection_lib.leaf_grams_by_group(empirical_leaves, regularizer_leaves, grouping)
    coefficients, _ = projection_lib.projection_coefficients(grams, projection)
    scale = share_scales(grams, coefficients, reg_weights, kappa)
    lam = reg_weights.astype(grams.dtype)
    scale_empirical = 1 - scale * (coefficients @ lam)
    reg_scales = scale[:, None] * lam
    leaves = projection_lib.combine_groups(per_leaf, grouping, scale_empirical, reg_scales)
    weights = jnp.concatenate([scale_empirical[:, None], reg_scales], axis=1)
    return leaves, state._replace(diagnostics=_common.diagnostics_of(grams, weights, reg_weights, single),
                                  removed_fraction=_common.removed_fraction(grams, weights, reg_weights))

  return transform.gram_transformation("share_bound", reg_weight, granularity=granularity, unprojected=unprojected,
                                       init_state=init_state, direction=direction)
