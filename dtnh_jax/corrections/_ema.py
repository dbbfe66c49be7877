"""The regularizer projected against a moving average of ``g``: the persistent descent direction, not one batch's."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.corrections import _common
from dtnh_jax.projection import Diagnostics

__all__ = [
    "averages_state",
    "cone_multipliers",
    "ema_projection",
    "EMAState",
    "updated_averages",
    "zero_averages",
]

#: A candidate of :func:`cone_multipliers` counts as inside a constraint it was not built on when it violates it
#: by at most this, relative to ``|r| |a|``: where ``g`` and the average are (anti)parallel, the other constraint
#: holds with equality, up to float32 rounding of the Gram entries.
CONE_TOLERANCE = 1e-6


class EMAState(NamedTuple):
  """State of :func:`ema_projection`: DTNH's fields, ``removed_fraction``, and the moving average of ``g``.

  ``ema`` has the parameters' structure: ``m_t = β m_{t-1} + (1 - β) g_t`` (float32, or wider for wider
  gradients), as ``optax.scale_by_adam``'s ``mu``; an ``unprojected`` leaf holds an empty array instead.
  """

  count: jax.Array
  diagnostics: Diagnostics
  removed_fraction: jax.Array
  ema: Any


def zero_averages(name: str, params, granularity, unprojected):
  """The zero moving average of ``g``: ``params``' structure, float32 (or wider), an empty array per unprojected
  leaf."""
  leaf_group, num_groups = _common.leaf_groups(name, params, granularity, unprojected)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      jnp.zeros(jnp.shape(leaf) if group < num_groups else (0,),
                projection_lib.accumulation_dtype(jnp.result_type(leaf)))
      for leaf, group in zip(leaves, leaf_group)])


def updated_averages(name: str, empirical_leaves, ema, grouping, decay) -> list:
  """``m_t = β m_{t-1} + (1 - β) g_t`` per projected leaf (``None`` for an unprojected one); an element where
  ``g`` is not finite keeps its old value."""
  ema_leaves = jax.tree.leaves(ema)
  if len(ema_leaves) != len(empirical_leaves):
    raise ValueError(f"{name}: the state holds {len(ema_leaves)} averages but the gradient has "
                     f"{len(empirical_leaves)} leaves; call init with parameters of the structure given to update.")
  beta = jnp.asarray(decay, jnp.float32)
  num_groups = grouping.num_groups
  # Written first, and read back by every later pass: the old average then has no reader after the new one is
  # written, so XLA updates it in place (rather than copying it first, as it must if a pass recomputes it).
  return jax.lax.optimization_barrier([
      None if group == num_groups else jnp.where(
          jnp.isfinite(g), beta.astype(m.dtype) * m + (1 - beta).astype(m.dtype) * g.astype(m.dtype), m)
      for g, m, group in zip(empirical_leaves, ema_leaves, grouping.leaf_group)])


def averages_state(ema, averages: list):
  """The state's new ``ema`` tree: ``averages`` where a leaf is projected, the old (empty) leaf elsewhere."""
  return jax.tree.unflatten(jax.tree.structure(ema), [m if average is None else average
                                                      for m, average in zip(jax.tree.leaves(ema), averages)])


def cone_multipliers(aa, ab, bb, ha, hb, rr, *, guard_current: bool) -> tuple[jax.Array, jax.Array]:
  """``(μ_a, μ_b)`` with ``π(r) = r + μ_a a + μ_b b`` the projection of ``r`` onto a cone, from inner products.

  The cone is ``{v : <v, b> >= 0}`` (a half-space), and with ``guard_current`` also ``<v, a> >= 0``. Arguments:
  ``aa = |a|²``, ``ab = <a, b>``, ``bb = |b|²`` (shape ``[P]``), ``ha = <r, a>``, ``hb = <r, b>``, ``rr = |r|²``
  (``[P, k]``).
  The projection is the point of the cone nearest ``r``; it is the projection onto the span of the constraints
  active at it, so it is the nearest, among those candidates (none, ``a``, ``b``, both active), that lies in
  the cone. A zero ``a`` or ``b`` constrains nothing.
  """
  aa, ab, bb = (x[:, None] for x in (aa, ab, bb))
  has_a, has_b = aa > 0, bb > 0
  safe_aa, safe_bb = jnp.where(has_a, aa, 1), jnp.where(has_b, bb, 1)
  if not guard_current:
    mu_b = jnp.where((hb < 0) & has_b, -hb / safe_bb, 0)
    return jnp.zeros_like(mu_b), mu_b
  tol_a = CONE_TOLERANCE * jnp.sqrt(jnp.maximum(rr * aa, 0))
  tol_b = CONE_TOLERANCE * jnp.sqrt(jnp.maximum(rr * bb, 0))
  zero = jnp.zeros_like(ha)
  # candidates: (μ_a, μ_b), and whether the point r + μ_a a + μ_b b is in the cone
  only_a = jnp.where(has_a, -ha / safe_aa, 0)
  only_b = jnp.where(has_b, -hb / safe_bb, 0)
  # both active: only where a and b are not (anti)parallel; there the cone is a half-space or a hyperplane, and
  # one of the single faces is the projection (the 2x2 solve would be float32 rounding)
  det = aa * bb - ab ** 2
  independent = det > projection_lib.PARALLEL_SIN2 * aa * bb
  safe_det = jnp.where(independent, det, 1)
  both_a = jnp.where(independent, (ab * hb - bb * ha) / safe_det, jnp.nan)
  both_b = jnp.where(independent, (ab * ha - aa * hb) / safe_det, jnp.nan)
  mu_a = jnp.stack([zero, only_a, zero, both_a], axis=-1)
  mu_b = jnp.stack([zero, zero, only_b, both_b], axis=-1)
  # a zero constraint (|a|² may also underflow in float32 while <r, a> does not) holds for every point
  inside = jnp.stack([
      ((ha >= 0) | ~has_a) & ((hb >= 0) | ~has_b),
      (hb + only_a * ab >= -tol_b) | ~has_b,
      (ha + only_b * ab >= -tol_a) | ~has_a,
      jnp.isfinite(both_a) & jnp.isfinite(both_b),
  ], axis=-1)
  distance = mu_a ** 2 * aa[..., None] + 2 * mu_a * mu_b * ab[..., None] + mu_b ** 2 * bb[..., None]
  score = jnp.where(inside & jnp.isfinite(distance), distance, jnp.inf)
  # nothing inside only by rounding where a and b are parallel: then projecting on a alone keeps <d, g> >= |g|²
  choice = jnp.where(jnp.isfinite(jnp.min(score, axis=-1)), jnp.argmin(score, axis=-1), 1)
  pick = lambda values: jnp.take_along_axis(values, choice[..., None], axis=-1)[..., 0]
  return pick(mu_a), pick(mu_b)


def ema_projection(reg_weight, *, decay=0.9, guard_current: bool = False, granularity="tree", unprojected=None
                   ) -> optax.GradientTransformationExtraArgs:
  r"""Each regularizer gradient projected against the moving average of the empirical gradient.

  DTNH removes from :math:`r` its component along one minibatch's :math:`g`;
  averaged over minibatches, it removes the regularizer's pull against the
  task along at most one direction, and the pull orthogonal to each noisy
  :math:`g` stays. Here the reference is the persistent descent direction,
  the moving average (bias-corrected as Adam's first moment)

  .. math::

    m_t = \beta m_{t-1} + (1 - \beta) g_t, \qquad \hat m_t = m_t / (1 - \beta^t),

  and, per group and regularizer, :math:`r_i` is replaced by its projection
  onto the half-space :math:`\{v : \langle v, \hat m_t\rangle \ge 0\}` (A-GEM's
  rule with :math:`\hat m_t` as the reference gradient):

  .. math::

    d = g + \sum_i \lambda_i \left(r_i - \frac{\min(0, \langle r_i, \hat m_t\rangle)}{|\hat m_t|^2} \hat m_t\right),

  so :math:`\langle d - g, \hat m_t\rangle \ge 0`. ``decay=0`` is DTNH
  (:math:`\hat m_t = g_t`). The projection depends on the direction of
  :math:`\hat m_t` only, so the bias correction changes no number; the state
  keeps :math:`m_t`. This bound holds for the average, not for the minibatch:
  :math:`\langle d, g\rangle \ge |g|^2` may fail, unless ``guard_current``,
  which projects :math:`r_i` onto the cone :math:`\{v : \langle v, g\rangle
  \ge 0, \langle v, \hat m_t\rangle \ge 0\}` instead (GEM's projection with
  the two constraints, the nearest vector to :math:`r_i` that conflicts with
  neither; :func:`cone_multipliers`), so both hold.

  Where an element of the empirical gradient is not finite, the average
  keeps that element as it was (the step's ``d`` is not finite, as with
  ``dtnh``), so one bad batch skipped by ``optax.apply_if_finite`` does not
  spoil every later step. Memory: one float32 copy of the projected
  parameters.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    decay: :math:`\beta \in [0, 1)` (may be traced).
    guard_current: also never conflict with the current :math:`g` (static).
    granularity: as for :func:`dtnh_jax.dtnh`: inner products, and so each
      projection, per group.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there, and no
      average is kept).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is an :class:`EMAState` (``init`` must see the
    parameters, or a tree of their structure and shapes).

  References:
    Chaudhry, Ranzato, Rohrbach, Elhoseiny, `Efficient Lifelong Learning with
    A-GEM <https://arxiv.org/abs/1812.00420>`_, ICLR 2019; Lopez-Paz, Ranzato,
    `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  """
  _common.check_in_range("ema_projection", "decay", decay, 0.0, 1.0, high_included=False)
  guard_current = bool(guard_current)

  def init_state(params, num_regularizers, single):
    return EMAState(**_common.zero_state_fields(num_regularizers, single),
                    ema=zero_averages("ema_projection", params, granularity, unprojected))

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    averages = updated_averages("ema_projection", empirical_leaves, state.ema, grouping, decay)
    num_groups = grouping.num_groups
    per_leaf, grams = projection_lib.leaf_grams_by_group(empirical_leaves, regularizer_leaves + [averages], grouping)
    k = reg_weights.shape[0]
    mu_g, mu_m = cone_multipliers(grams[:, 0, 0], grams[:, 0, k + 1], grams[:, k + 1, k + 1], grams[:, 1:k + 1, 0],
                                  grams[:, 1:k + 1, k + 1], jnp.diagonal(grams, axis1=1, axis2=2)[:, 1:k + 1],
                                  guard_current=guard_current)
    projected = jnp.arange(num_groups + 1) < num_groups
    lam = reg_weights.astype(grams.dtype)
    scale_empirical = 1 + jnp.where(projected, mu_g @ lam, 0)
    scale_average = jnp.where(projected, mu_m @ lam, 0)
    reg_scales = jnp.concatenate([jnp.broadcast_to(lam, (num_groups + 1, k)), scale_average[:, None]], axis=1)
    leaves = projection_lib.combine_groups(per_leaf, grouping, scale_empirical, reg_scales)
    weights = jnp.concatenate([scale_empirical[:, None], reg_scales], axis=1)
    return leaves, state._replace(diagnostics=_common.diagnostics_of(grams, weights, reg_weights, single),
                                  removed_fraction=_common.removed_fraction(grams, weights, reg_weights),
                                  ema=averages_state(state.ema, averages))

  return transform.gram_transformation("ema_projection", reg_weight, granularity=granularity, unprojected=unprojected,
                                       init_state=init_state, direction=direction)
