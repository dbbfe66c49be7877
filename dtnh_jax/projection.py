"""The whole DTNH algorithm as pure pytree math (Algorithm 1 of the paper).

For the empirical gradient ``g = ∇J``, regularizer gradients ``r_i = ∇Ω_i`` and
weights ``λ_i``, in every group ``p`` of parameters::

    c_ip = <g, r_i>_p / |g|_p²   if <g, r_i>_p < 0   (or always, or never: ``when``)
           0                     otherwise
    d_p  = g_p + Σ_i λ_i (r_ip - c_ip g_p)                 (Eq. 6-7, line 11)
         = (1 - Σ_i λ_i c_ip) · g_p + Σ_i λ_i r_ip

so one pass over the leaves collects the Gram matrix of ``[g, r_1, ..., r_k]``
per group, and a second pass writes ``d``. Everything the paper plots (its
Figures 4-5) is a closed form of those Gram matrices and ``λ``: no further pass.

Nothing here knows about Flax, models or optimizers: any pytree works.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "accumulation_dtype",
    "combine",
    "Diagnostics",
    "diagnostics",
    "group_grams",
    "group_leaves",
    "Grouping",
    "leaf_gram",
    "project",
    "projection_coefficients",
    "PROJECTIONS",
]

PyTree = Any


class Grouping(NamedTuple):
  """Which group each leaf's inner products are summed into.

  ``leaf_group[j]`` is the group of the j-th leaf (in ``jax.tree.leaves``
  order), an integer in ``[0, num_groups]``; the extra value ``num_groups``
  marks leaves that are never projected (``d = g + Σ λ_i r_i`` there).
  """

  leaf_group: tuple[int, ...]
  num_groups: int


def group_leaves(labels: Sequence[Hashable], unprojected: Sequence[bool]) -> Grouping:
  """Builds a :class:`Grouping` from one hashable label and one flag per leaf."""
  ids: dict[Hashable, int] = {}
  for label, skip in zip(labels, unprojected):
    if not skip:
      ids.setdefault(label, len(ids))
  num_groups = len(ids)
  return Grouping(
      tuple(num_groups if skip else ids[label] for label, skip in zip(labels, unprojected)),
      num_groups,
  )


def accumulation_dtype(dtype) -> jnp.dtype:
  """Inner products accumulate in float32, or wider when the gradient is."""
  return jnp.promote_types(dtype, jnp.float32)


def _vdot(x: jax.Array, y: jax.Array) -> jax.Array:
  acc = accumulation_dtype(jnp.result_type(x, y))
  # A fused multiply-reduce: casting inside the fusion costs no extra copy.
  return jnp.sum(x.astype(acc) * y.astype(acc), dtype=acc)


def leaf_gram(vectors: Sequence[jax.Array | None]) -> jax.Array:
  """Gram matrix of one leaf's ``[g, r_1, ..., r_k]``; ``None`` is a structural zero."""
  n = len(vectors)
  acc = accumulation_dtype(jnp.result_type(*[v for v in vectors if v is not None]))
  rows = [[jnp.zeros((), acc)] * n for _ in range(n)]
  for i in range(n):
    for j in range(i, n):
      if vectors[i] is not None and vectors[j] is not None:
        rows[i][j] = rows[j][i] = _vdot(vectors[i], vectors[j]).astype(acc)
  return jnp.stack([jnp.stack(row) for row in rows])


def group_grams(leaf_grams: Sequence[jax.Array], grouping: Grouping) -> jax.Array:
  """Sums per-leaf Gram matrices into ``[num_groups + 1, k+1, k+1]``.

  The last row collects the unprojected leaves; it enters the diagnostics
  (global norms and angles) but never a projection coefficient.
  """
  stacked = jnp.stack(leaf_grams)
  segment = np.asarray(grouping.leaf_group, dtype=np.int32)
  return jax.ops.segment_sum(stacked, segment, num_segments=grouping.num_groups + 1)


PROJECTIONS = ("conflict", "always", "none")


def projection_coefficients(grams: jax.Array, when: str = "conflict") -> tuple[jax.Array, jax.Array]:
  """The ``c_ip`` of Eq. 6, shape ``[groups + 1, k]``, and the conflict flags.

  ``when`` is one of :data:`PROJECTIONS`: project where ``<g, r_i>_p < 0`` (the
  paper), in every group (the authors' released code), or never (the plain
  regularized gradient, for baselines with the same diagnostics).
  ``c`` is 0 where ``|g|_p = 0`` (then ``d = g + λ r``, finite), and always 0 in
  the unprojected group. A NaN inner product fails every comparison, so
  ``c = 0`` and the NaN reaches ``d`` through ``g`` or ``r`` unmasked.
  """
  gg = grams[:, 0, 0]
  gr = grams[:, 0, 1:]
  conflict = gr < 0
  project = {"conflict": conflict, "always": jnp.ones_like(conflict), "none": jnp.zeros_like(conflict)}[when]
  project = project & (gg > 0)[:, None]
  project = project.at[-1].set(False)
  safe_gg = jnp.where(gg > 0, gg, 1)[:, None]
  coefficients = jnp.where(project, gr / safe_gg, 0)
  return coefficients, conflict


def combine(
    empirical: jax.Array,
    regularizers: Sequence[jax.Array | None],
    scale_empirical: jax.Array,
    reg_weights: jax.Array,
) -> jax.Array:
  """``d = a·g + Σ λ_i r_i`` for one leaf, computed wide and cast to ``g``'s dtype."""
  acc = accumulation_dtype(empirical.dtype)
  direction = scale_empirical.astype(acc) * empirical.astype(acc)
  for weight, reg in zip(reg_weights, regularizers):
    if reg is not None:
      direction = direction + weight.astype(acc) * reg.astype(acc)
  return direction.astype(empirical.dtype)


def _angle_degrees(inner, norm_sq_x, norm_sq_y):
  """Angle between x and y in degrees; a zero vector counts as orthogonal (90°)."""
  denom = jnp.sqrt(norm_sq_x * norm_sq_y)
  cosine = jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1), 0)
  return jnp.degrees(jnp.arccos(jnp.clip(cosine, -1.0, 1.0)))


class Diagnostics(NamedTuple):
  """What DTNH saw at one step, from inner products it needed anyway.

  Per-regularizer fields have shape ``()`` for one regularizer, ``(k,)`` for k.
  Norms and inner products are over the whole tree, whatever the grouping.
  Angles are in degrees; an angle with a zero vector is reported as 90.

  Attributes:
    inner_product: ``<g, r_i>``.
    empirical_norm: ``|g|``.
    regularizer_norm: ``|r_i|``.
    conflict: fraction of the projected groups where ``<g, r_i> < 0`` (with the
      default whole-tree grouping, 1.0 if the step conflicted, else 0.0).
    angle1: Angle 1 of the paper, ∠(d, g): DTNH's direction vs the empirical gradient.
    angle2: Angle 2, ∠(d, R) with ``R = Σ λ_i r_i``: DTNH's direction vs the regularizer.
    angle3: Angle 3, ∠(g + R, g): the plain regularized gradient vs the empirical one.
    angle4: Angle 4, ∠(g + R, R): the plain regularized gradient vs the regularizer.
    reg_weight: the ``λ_i`` used at this step (after any schedule).
  """

  inner_product: jax.Array
  empirical_norm: jax.Array
  regularizer_norm: jax.Array
  conflict: jax.Array
  angle1: jax.Array
  angle2: jax.Array
  angle3: jax.Array
  angle4: jax.Array
  reg_weight: jax.Array

  @classmethod
  def zeros(cls, num_regularizers: int, single: bool) -> "Diagnostics":
    # one buffer per field: a jitted step may donate the state, and XLA refuses
    # to donate one buffer twice
    per_regularizer_fields = ("inner_product", "regularizer_norm", "conflict", "reg_weight")
    per_reg = () if single else (num_regularizers,)
    return cls(**{name: jnp.zeros(per_reg if name in per_regularizer_fields else (), jnp.float32) for name in cls._fields})


def diagnostics(
    grams: jax.Array,
    coefficients: jax.Array,
    conflict: jax.Array,
    reg_weights: jax.Array,
    single: bool,
) -> Diagnostics:
  """All of :class:`Diagnostics` from the per-group Gram matrices.

  With ``V_p = [g_p, r_1p, ..., r_kp]`` and a weight vector ``w``, the inner
  product ``<w·V, w'·V>`` summed over groups is ``Σ_p wᵀ G_p w'``.
  """
  grams = grams.astype(jnp.float32)
  lam = reg_weights.astype(jnp.float32)
  num_groups = grams.shape[0] - 1
  scale_g = 1.0 - coefficients.astype(jnp.float32) @ lam                 # [P+1]
  w_direction = jnp.concatenate([scale_g[:, None], jnp.broadcast_to(lam, (grams.shape[0], lam.size))], axis=1)
  e_g = jnp.zeros(lam.size + 1).at[0].set(1.0)
  w_reg = jnp.concatenate([jnp.zeros(1), lam])                           # R = Σ λ r
  w_sum = e_g + w_reg                                                    # g + R

  def inner(wa, wb):
    wa = jnp.broadcast_to(wa, grams.shape[:2])
    wb = jnp.broadcast_to(wb, grams.shape[:2])
    return jnp.einsum("pi,pij,pj->", wa, grams, wb)

  total = grams.sum(axis=0)
  gg = total[0, 0]
  d_g, d_d = inner(w_direction, e_g), inner(w_direction, w_direction)
  d_r, r_r = inner(w_direction, w_reg), inner(w_reg, w_reg)
  s_g, s_s, s_r = inner(w_sum, e_g), inner(w_sum, w_sum), inner(w_sum, w_reg)

  conflict_fraction = (
      jnp.mean(conflict[:num_groups].astype(jnp.float32), axis=0)
      if num_groups
      else jnp.zeros(lam.shape, jnp.float32)
  )
  per_reg = (lambda x: x[0]) if single else (lambda x: x)
  return Diagnostics(
      inner_product=per_reg(total[0, 1:]),
      empirical_norm=jnp.sqrt(gg),
      regularizer_norm=per_reg(jnp.sqrt(jnp.diagonal(total)[1:])),
      conflict=per_reg(conflict_fraction),
      angle1=_angle_degrees(d_g, d_d, gg),
      angle2=_angle_degrees(d_r, d_d, r_r),
      angle3=_angle_degrees(s_g, s_s, gg),
      angle4=_angle_degrees(s_r, s_s, r_r),
      reg_weight=per_reg(lam),
  )


def project(
    empirical_leaves: Sequence[jax.Array],
    regularizer_leaves: Sequence[Sequence[jax.Array | None]],
    reg_weights: jax.Array,
    grouping: Grouping,
    when: str = "conflict",
    single: bool = True,
) -> tuple[list[jax.Array], Diagnostics]:
  """DTNH on flat leaf lists: the direction's leaves and the step's diagnostics.

  Args:
    empirical_leaves: leaves of ``g``.
    regularizer_leaves: ``regularizer_leaves[i][j]`` is leaf j of ``r_i``
      (``None`` for a leaf the regularizer does not touch).
    reg_weights: ``λ``, shape ``(k,)``.
    grouping: which leaves share one projection.
    when: which groups are projected, see :func:`projection_coefficients`.
    single: whether per-regularizer diagnostics are scalars.
  """
  per_leaf = list(zip(empirical_leaves, *regularizer_leaves))
  grams = group_grams([leaf_gram(vectors) for vectors in per_leaf], grouping)
  coefficients, conflict = projection_coefficients(grams, when)
  scale_empirical = 1.0 - coefficients @ reg_weights.astype(coefficients.dtype)
  direction = [
      combine(vectors[0], vectors[1:], scale_empirical[group], reg_weights)
      for vectors, group in zip(per_leaf, grouping.leaf_group)
  ]
  return direction, diagnostics(grams, coefficients, conflict, reg_weights, single)
