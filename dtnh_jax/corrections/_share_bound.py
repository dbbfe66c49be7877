"""The regularizer's share of the step bounded by ``κ |g|`` (or ``κ |m̂|``, the moving average of ``g``), on
``g + λ r`` or after DTNH's projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax import names
from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.corrections import _common, _ema

__all__ = [
    "REFERENCES",
    "share_bound",
    "share_scales",
]


#: What ``share_bound`` measures the regularizer's share against: the minibatch's ``g``, or its moving average.
REFERENCES = ("current", "average")


def share_scales(grams: jax.Array, coefficients: jax.Array, reg_weights: jax.Array, kappa,
                 reference_sq: jax.Array | None = None) -> jax.Array:
  """The factor ``s_p = min(1, κ |h|_p / |R'|_p)`` per group, ``[groups + 1]`` (1 in the unprojected group).

  ``R' = Σ_i λ_i (r_i - c_i g)`` with DTNH's coefficients ``c`` (:func:`dtnh_jax.projection.projection_coefficients`,
  zero for ``projection="none"``); ``grams`` are those of ``[g, r_1, ..., r_k]``. The reference ``h`` is ``g``,
  or the vector whose squared norm per group is ``reference_sq`` (``[groups + 1]``). ``s = 1`` where ``R' = 0``;
  ``s = 0`` where ``h = 0`` but ``R' ≠ 0``.
  """
  acc = grams.dtype
  lam = reg_weights.astype(acc)
  weights = jnp.concatenate([-(coefficients.astype(acc) @ lam)[:, None], jnp.broadcast_to(lam, coefficients.shape)],
                            axis=1)                                           # R' on [g, r_1, ..., r_k]
  reg_sq = jnp.einsum("pi,pij,pj->p", weights, grams, weights)
  norm_reg = jnp.sqrt(jnp.maximum(reg_sq, 0))
  reference_sq = grams[:, 0, 0] if reference_sq is None else reference_sq.astype(acc)
  bound = jnp.asarray(kappa, acc) * jnp.sqrt(jnp.maximum(reference_sq, 0))
  scale = jnp.where(norm_reg > bound, bound / jnp.where(norm_reg > 0, norm_reg, 1), 1)
  return scale.at[-1].set(1)


def share_bound(reg_weight, *, kappa=1.0, projection: str = "none", reference: str = "current", decay=0.9,
                granularity="tree", unprojected=None) -> optax.GradientTransformationExtraArgs:
  r"""The regularizer's part of the step never longer than :math:`\kappa |g|` (or :math:`\kappa |\hat m|`).

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

  ``reference="average"`` bounds by the moving average of the empirical
  gradient instead, :math:`|d - g| \le \kappa |\hat m_t|` with
  :math:`m_t = \beta m_{t-1} + (1 - \beta) g_t`, :math:`\hat m_t = m_t / (1 -
  \beta^t)` (Adam's bias-corrected first moment; ``decay`` is :math:`\beta`).
  Over many minibatches, :math:`g`'s noise cancels and the data's persistent
  drift is :math:`\hat m`; a pull towards the source that stays below
  :math:`|g|` at every step (as L2-SP's does) can still outweigh that drift
  and hold the weights at the regularized optimum, where
  :math:`\lambda |r| = |E g|`. With :math:`\kappa < 1` it cannot: the
  regularizer's part stays shorter than the drift, so the only point where
  both balance is :math:`\hat m = 0`, the empirical loss's own stationary
  point; the regularizer shapes the path, not the destination. Memory: one
  float32 copy of the bounded parameters (as :func:`ema_projection`).

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    kappa: :math:`\kappa \ge 0`, the largest ratio :math:`|d - g| / |g|`
      (may be traced, e.g. by ``optax.inject_hyperparams``).
    projection: ``"none"`` bounds the plain :math:`g + \lambda r`;
      ``"conflict"`` or ``"always"`` bound DTNH's direction with that
      ``projection`` (:func:`dtnh_jax.dtnh`).
    reference: ``"current"`` bounds by :math:`|g|`, ``"average"`` by the
      bias-corrected moving average :math:`|\hat m_t|` (static).
    decay: :math:`\beta \in [0, 1)` of the average (``reference="average"``;
      may be traced). ``decay=0`` is ``reference="current"``.
    granularity: as for :func:`dtnh_jax.dtnh`: each group is projected and
      bounded on its own.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there, unbounded).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is a :class:`~dtnh_jax.corrections.CorrectionState`,
    or with ``reference="average"`` an :class:`~dtnh_jax.corrections.EMAState`
    (whose ``init`` must see the parameters, or a tree of their structure and
    shapes).
  """
  _common.check_in_range("share_bound", "kappa", kappa, 0.0, float("inf"), high_included=False)
  if projection not in names.PROJECTIONS:
    raise ValueError(f"share_bound: projection must be one of {names.PROJECTIONS}, got {projection!r}.")
  if reference not in REFERENCES:
    raise ValueError(f"share_bound: reference must be one of {REFERENCES}, got {reference!r}.")
  averaged = reference == "average"
  if averaged:
    _common.check_in_range("share_bound", "decay", decay, 0.0, 1.0, high_included=False)

  def init_state(params, num_regularizers, single):
    fields = _common.zero_state_fields(num_regularizers, single)
    if not averaged:
      return _common.CorrectionState(**fields)
    return _ema.EMAState(**fields, ema=_ema.zero_averages("share_bound", params, granularity, unprojected))

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    k = reg_weights.shape[0]
    averages = (_ema.updated_averages("share_bound", empirical_leaves, state.ema, grouping, decay) if averaged
                else None)
    per_leaf, grams = projection_lib.leaf_grams_by_group(
        empirical_leaves, regularizer_leaves + ([averages] if averaged else []), grouping)
    reference_sq = None
    if averaged:  # |m̂_t|² = |m_t|² / (1 - β^t)², t = count + 1 (the first average is (1 - β) g)
      unbiased = 1 - jnp.asarray(decay, grams.dtype) ** (state.count.astype(grams.dtype) + 1)
      reference_sq = grams[:, k + 1, k + 1] / unbiased ** 2
      grams = grams[:, :k + 1, :k + 1]
    coefficients, _ = projection_lib.projection_coefficients(grams, projection)
    scale = share_scales(grams, coefficients, reg_weights, kappa, reference_sq)
    lam = reg_weights.astype(grams.dtype)
    scale_empirical = 1 - scale * (coefficients @ lam)
    reg_scales = scale[:, None] * lam
    weights = jnp.concatenate([scale_empirical[:, None], reg_scales], axis=1)
    if averaged:  # the average is measured, never added
      per_leaf = [vectors[:-1] for vectors in per_leaf]
    leaves = projection_lib.combine_groups(per_leaf, grouping, scale_empirical, reg_scales)
    new_state = state._replace(diagnostics=_common.diagnostics_of(grams, weights, reg_weights, single),
                               removed_fraction=_common.removed_fraction(grams, weights, reg_weights))
    return leaves, (new_state._replace(ema=_ema.averages_state(state.ema, averages)) if averaged else new_state)

  return transform.gram_transformation("share_bound", reg_weight, granularity=granularity, unprojected=unprojected,
                                       init_state=init_state, direction=direction)
