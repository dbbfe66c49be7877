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

The paper's Eq. 5 (the direction closest to ``g`` within ``s`` degrees of
``R = Σ λ_i r_i``), :func:`max_angle_scales`, is a closed form of the same
Gram matrices too, and so is every correction of ``dtnh_jax.aggregators``:
each writes ``d = a·g + Σ_i b_i r_i`` per group, with ``a`` and ``b`` from the
group's Gram matrix, through the same two passes (:func:`leaf_grams_by_group`,
:func:`combine_groups`) and the same :func:`direction_diagnostics`.

Nothing here knows about Flax, models or optimizers: any pytree works.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dtnh_jax.names import PROJECTIONS

__all__ = [
    "accumulation_dtype",
    "combine",
    "combine_groups",
    "conflict_flags",
    "Diagnostics",
    "diagnostics",
    "direction_diagnostics",
    "group_grams",
    "group_leaves",
    "Grouping",
    "leaf_gram",
    "leaf_grams_by_group",
    "max_angle_scales",
    "project",
    "projection_coefficients",
    "PROJECTIONS",
    "structural_pairs",
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


#: How a leaf's inner products are summed (:func:`leaf_gram`): one pass over the leaf sums runs of ``_ROWS``
#: consecutive slices along one axis, for every Gram entry at once; XLA's reduction then sums those partial sums.
_ROWS = 16
#: A 1-D leaf is read as blocks of ``_ROWS`` rows of ``_LANES`` consecutive elements (one AVX-512 vector of float32).
_LANES = 16
#: On a CPU, a leaf whose last axis is a multiple of this is summed in runs of ``_ROWS`` consecutive elements of
#: that axis instead (:func:`_blocked_shape`).
_MINOR_RUNS_FROM = 256


def structural_pairs(vectors: Sequence[jax.Array | None]) -> list[tuple[int, int]]:
  """The Gram entries ``(i, j)``, ``i <= j``, of one leaf's ``[g, r_1, ..., r_k]`` that are not structural zeros.

  :func:`leaf_gram` computes these and fills the others with zeros; ``None`` in ``vectors`` is a structural zero.
  """
  present = [i for i, v in enumerate(vectors) if v is not None]
  return [(i, j) for i in present for j in present if i <= j]


def _blocked_shape(shape: tuple[int, ...], minor_runs: bool = False) -> tuple[tuple[int, ...], int] | None:
  """``shape`` with one axis split into ``(size // _ROWS, _ROWS)``, and the position of the ``_ROWS`` axis.

  With ``minor_runs`` (on a CPU) and a leaf of two or more axes whose last one is a multiple of
  ``_MINOR_RUNS_FROM``, the last axis is split and the runs are ``_ROWS`` consecutive elements: XLA:CPU
  vectorizes a reduction over the minor axis, not one over the axis before it, where it sums each partial sum
  in a scalar loop (the two layouts are timed in benchmarks/RESULTS.md, the site's Results page).
  Otherwise the axis split is the last but one that divides (then the rows are ``_ROWS`` consecutive slices and
  the axes after it, contiguous in memory, are what one step adds up), else the last one split into blocks of
  ``_ROWS x _LANES``; ``None`` if no axis divides. No other axis moves, so a sharded leaf keeps its sharding
  (one all-reduce of the partial sums, as before) unless it is sharded along the split axis into pieces whose
  length is not a multiple of ``_ROWS``: then GSPMD gathers it (e.g. ``[3, 3, 48, 64]`` sharded 8 ways along
  48; the FSDP layout of ``dtnh_jax.train`` shards the largest divisible axis, the last one on ties: with
  ``minor_runs``, a last axis of 256 keeps its sharding up to 16 shards, one of 512 up to 32).
  """
  if minor_runs and len(shape) >= 2 and shape[-1] % _MINOR_RUNS_FROM == 0:
    return shape[:-1] + (shape[-1] // _ROWS, _ROWS), len(shape)
  for axis in range(len(shape) - 2, -1, -1):
    if shape[axis] % _ROWS == 0:
      return shape[:axis] + (shape[axis] // _ROWS, _ROWS) + shape[axis + 1:], axis + 1
  if shape and shape[-1] and shape[-1] % (_ROWS * _LANES) == 0:
    return shape[:-1] + (shape[-1] // (_ROWS * _LANES), _ROWS, _LANES), len(shape)
  return None


def _minor_runs() -> bool:
  """Whether :func:`_blocked_shape` sums runs along the minor axis: on a CPU, where XLA's reductions are fastest
  over that axis; elsewhere the split stays off the axis that the FSDP layout shards."""
  return jax.default_backend() == "cpu"


def _add_each(accumulators: tuple, values: tuple) -> tuple:
  return tuple(a + b for a, b in zip(accumulators, values))


def _partial_sums(vectors: Sequence[jax.Array | None], pairs: Sequence[tuple[int, int]], acc,
                  minor_runs: bool) -> list[jax.Array]:
  """For each pair ``(i, j)``, an array whose sum is ``<v_i, v_j>``.

  Where the leaf has an axis to split (:func:`_blocked_shape`), one variadic ``lax.reduce`` reads the leaf's
  vectors once and sums the products of every pair over runs of ``_ROWS`` slices: 1/16 of the leaf per pair,
  for XLA's reduction to finish. XLA:CPU would run one plain reduction per pair, each a pass over the leaf
  (and fuses none of them: its library reductions take one output each). Else the products themselves, one
  fused multiply-reduce per pair (small or oddly shaped leaves).
  """
  blocked = _blocked_shape(vectors[0].shape, minor_runs=minor_runs)
  if blocked is None:
    return [vectors[i].astype(acc) * vectors[j].astype(acc) for i, j in pairs]
  shape, rows_axis = blocked
  # Casting inside the fusion costs no extra copy.
  views = [None if v is None else v.astype(acc).reshape(shape) for v in vectors]
  products = tuple(views[i] * views[j] for i, j in pairs)
  zeros = tuple(jnp.zeros((), acc) for _ in pairs)
  return list(jax.lax.reduce(products, zeros, _add_each, (rows_axis,)))


def leaf_gram(vectors: Sequence[jax.Array | None], *, minor_runs: bool | None = None) -> jax.Array:
  """Gram matrix of one leaf's ``[g, r_1, ..., r_k]``; ``None`` is a structural zero.

  All entries come from one pass over the leaf (:func:`_partial_sums`) and XLA's reduction of the partial
  sums. Accuracy: each entry adds ``_ROWS`` products in sequence and XLA sums those partial sums in blocks,
  not in sequence, as ``numpy.sum`` does in float32 (its 8 accumulators add 16 elements each in sequence);
  ``tests/test_gram_accuracy.py`` checks the errors against the pairwise-summation bound
  ``(log2(n) + 1) · eps · Σ|x_i y_i|`` on 11.7M elements, which a sequential float32 sum exceeds 600-6800-fold.

  Args:
    vectors: the leaf of ``g`` and of each ``r_i`` (or ``None``), all of one shape.
    minor_runs: the layout of the pass (:func:`_blocked_shape`): runs of consecutive elements of the last axis
      (True: XLA:CPU's fastest) or of slices of an axis before it (False: the layout off a CPU, which keeps
      the FSDP layout's sharded last axis whole). By default the one for ``jax.default_backend()``; the
      entries are the same either way, up to float rounding.

  Returns:
    The ``[k+1, k+1]`` Gram matrix in the accumulation dtype (:func:`accumulation_dtype`).
  """
  n = len(vectors)
  acc = accumulation_dtype(jnp.result_type(*[v for v in vectors if v is not None]))
  pairs = structural_pairs(vectors)
  minor_runs = _minor_runs() if minor_runs is None else minor_runs
  sums = {pair: jnp.sum(partial, dtype=acc)
          for pair, partial in zip(pairs, _partial_sums(vectors, pairs, acc, minor_runs))}
  zero = jnp.zeros((), acc)
  return jnp.stack([jnp.stack([sums.get((min(i, j), max(i, j)), zero) for j in range(n)]) for i in range(n)])


def _pairwise_sum(terms: Sequence[jax.Array]) -> jax.Array:
  while len(terms) > 1:
    terms = [terms[k] + terms[k + 1] if k + 1 < len(terms) else terms[k] for k in range(0, len(terms), 2)]
  return terms[0]


def group_grams(leaf_grams: Sequence[jax.Array], grouping: Grouping) -> jax.Array:
  """Sums per-leaf Gram matrices into ``[num_groups + 1, k+1, k+1]`` (pairwise within each group).

  The last row collects the unprojected leaves; it enters the diagnostics
  (global norms and angles) but never a projection coefficient.
  """
  members = [[] for _ in range(grouping.num_groups + 1)]
  for gram, group in zip(leaf_grams, grouping.leaf_group):
    members[group].append(gram)
  zero = jnp.zeros_like(leaf_grams[0])
  return jnp.stack([_pairwise_sum(grams) if grams else zero for grams in members])


def leaf_grams_by_group(
    empirical_leaves: Sequence[jax.Array],
    regularizer_leaves: Sequence[Sequence[jax.Array | None]],
    grouping: Grouping,
) -> tuple[list[tuple], jax.Array]:
  """The first pass: each leaf's ``(g, r_1, ..., r_k)`` and the groups' Gram matrices ``[groups + 1, k+1, k+1]``.

  One read of every leaf of ``g`` and the ``r_i`` for all Gram entries (:func:`leaf_gram`).
  """
  per_leaf = list(zip(empirical_leaves, *regularizer_leaves))
  return per_leaf, group_grams([leaf_gram(vectors) for vectors in per_leaf], grouping)


def combine_groups(
    per_leaf: Sequence[tuple],
    grouping: Grouping,
    scale_empirical: jax.Array,
    reg_scales: jax.Array,
) -> list[jax.Array]:
  """The second pass: ``d = a_p·g + Σ_i b_ip r_i`` on every leaf, with ``a = scale_empirical[p]``.

  ``reg_scales`` is ``[k]`` (the same ``b`` in every group: Algorithm 1's
  ``λ``) or ``[groups + 1, k]`` (one row per group).
  """
  per_group = jnp.ndim(reg_scales) == 2
  return [
      combine(vectors[0], vectors[1:], scale_empirical[group], reg_scales[group] if per_group else reg_scales)
      for vectors, group in zip(per_leaf, grouping.leaf_group)
  ]


def conflict_flags(grams: jax.Array) -> jax.Array:
  """``<g, r_i>_p < 0`` per group, shape ``[groups + 1, k]``: what ``Diagnostics.conflict`` averages."""
  return grams[:, 0, 1:] < 0


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
  conflict = conflict_flags(grams)
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
    return cls(**{name: jnp.zeros(per_reg if name in per_regularizer_fields else (), jnp.float32)
                  for name in cls._fields})


def diagnostics(
    grams: jax.Array,
    coefficients: jax.Array,
    conflict: jax.Array,
    reg_weights: jax.Array,
    single: bool,
) -> Diagnostics:
  """All of :class:`Diagnostics` of Algorithm 1's direction from the per-group Gram matrices."""
  lam = reg_weights.astype(jnp.float32)
  scale_g = 1.0 - coefficients.astype(jnp.float32) @ lam                 # [P+1]
  w_direction = jnp.concatenate([scale_g[:, None], jnp.broadcast_to(lam, (grams.shape[0], lam.size))], axis=1)
  return direction_diagnostics(grams, w_direction, conflict, reg_weights, single)


def direction_diagnostics(
    grams: jax.Array,
    direction_weights: jax.Array,
    conflict: jax.Array,
    reg_weights: jax.Array,
    single: bool,
) -> Diagnostics:
  """All of :class:`Diagnostics` for a direction ``d_p = w_p · [g_p, r_1p, ..., r_kp]``.

  ``direction_weights`` is ``w``, shape ``[groups + 1, k+1]``. With
  ``V_p = [g_p, r_1p, ..., r_kp]`` and a weight vector ``w``, the inner
  product ``<w·V, w'·V>`` summed over groups is ``Σ_p wᵀ G_p w'``.
  """
  grams = grams.astype(jnp.float32)
  lam = reg_weights.astype(jnp.float32)
  num_groups = grams.shape[0] - 1
  w_direction = direction_weights.astype(jnp.float32)
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


#: Below this ``sin²∠(g, R)`` a group's ``g`` and ``R`` count as (anti)parallel for Eq. 5: the component of ``g``
#: orthogonal to ``R`` is then below what float32 Gram entries resolve (``|g|²|R|² - <g, R>²`` cancels to ~1e-7).
PARALLEL_SIN2 = 1e-6


def max_angle_scales(
    grams: jax.Array,
    scale_empirical: jax.Array,
    reg_weights: jax.Array,
    max_angle: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
  r"""Eq. 5 per group: ``(a, b)`` with ``d_p = a_p·g_p + Σ_i b_ip r_ip`` (shapes ``[groups + 1]``, ``[groups + 1, k]``).

  The paper's Eq. 5 asks for the direction with the smallest angle to ``g``
  such that :math:`ngle(d, R) \le s`, ``R = Σ λ_i r_i``. In the plane of ``g``
  and ``R``, with :math:`	heta = ngle(g, R)`, it is ``ĝ`` when
  :math:`	heta \le s` and otherwise the unit vector at angle ``s`` from ``R̂``
  towards ``ĝ`` (spherical interpolation, read off the Gram matrix)::

      d̂ = (sin(θ - s) R̂ + sin(s) ĝ) / sin θ      so ∠(d̂, R) = s and ∠(d̂, g) = θ - s.

  Eq. 5 fixes a direction only; ``d`` takes the length of Algorithm 1's
  direction ``scale_empirical·g + R`` (the one :func:`project` would return),
  so that a learning rate and ``λ`` schedule tuned for DTNH keep their meaning,
  and ``|d| >= |g|`` where Algorithm 1 projects, as in DTNH. Degenerate groups:
  ``R = 0`` has nothing to keep (``d̂ = ĝ``); ``g = 0`` gives ``d̂ = R̂``;
  ``g`` and ``R`` antiparallel (within :data:`PARALLEL_SIN2`) leave the plane a
  line, where only ``R̂`` is within ``s < 180°`` of ``R``; both zero give ``d = 0``.
  The unprojected group (the last) keeps ``d = g + R``.

  ``max_angle`` (``s``, degrees) may be traced (``optax.inject_hyperparams``):
  only ``jnp.where`` decides.
  """
  acc = grams.dtype
  lam = reg_weights.astype(acc)
  scale_empirical = scale_empirical.astype(acc)
  gg = grams[:, 0, 0]
  g_reg = grams[:, 0, 1:] @ lam                                          # <g, R>
  reg_reg = jnp.einsum("i,pij,j->p", lam, grams[:, 1:, 1:], lam)         # |R|²
  norm_g, norm_reg = jnp.sqrt(jnp.maximum(gg, 0)), jnp.sqrt(jnp.maximum(reg_reg, 0))
  has_g, has_reg = norm_g > 0, norm_reg > 0
  safe_norm_g, safe_norm_reg = jnp.where(has_g, norm_g, 1), jnp.where(has_reg, norm_reg, 1)
  # |Algorithm 1's direction|² = |a g + R|² = |g|²(a + <g,R>/|g|²)² + |R⊥|², R⊥ = R's part orthogonal to g,
  # |R⊥|² = (|g|²|R|² - <g,R>²)/|g|²: two terms, not a² |g|² + 2a<g,R> + |R|², whose terms cancel in float32
  # when g and R are nearly antiparallel and |a| is large (a = 1 - <g,R>/|g|² where Algorithm 1 projects).
  safe_gg = safe_norm_g ** 2
  along = gg * (scale_empirical + g_reg / safe_gg) ** 2
  across = jnp.where(has_g, jnp.maximum(gg * reg_reg - g_reg ** 2, 0) / safe_gg, reg_reg)
  length = jnp.sqrt(jnp.maximum(along + across, 0))
  cos_theta = jnp.clip(g_reg / (safe_norm_g * safe_norm_reg), -1, 1)
  sin_theta = jnp.sqrt(jnp.maximum(1 - cos_theta ** 2, 0))
  theta = jnp.arccos(cos_theta)
  s = jnp.radians(jnp.asarray(max_angle, acc))

  along_g = has_g & (~has_reg | (theta <= s))
  along_reg = ~along_g & has_reg & (~has_g | (sin_theta ** 2 < PARALLEL_SIN2))
  safe_sin = jnp.where(along_g | along_reg, 1, sin_theta)
  # sin(θ - s) expanded: sin(arccos(cos θ)) loses digits where g and R are nearly antiparallel (θ near π)
  sin_theta_minus_s = sin_theta * jnp.cos(s) - cos_theta * jnp.sin(s)
  unit_g = jnp.where(along_g, 1 / safe_norm_g, jnp.where(along_reg, 0, jnp.sin(s) / (safe_norm_g * safe_sin)))
  unit_reg = jnp.where(along_g, 0, jnp.where(along_reg, 1 / safe_norm_reg,
                                                 sin_theta_minus_s / (safe_norm_reg * safe_sin)))
  scale_g = (length * unit_g).at[-1].set(1)
  scale_reg = (length * unit_reg).at[-1].set(1)
  return scale_g, scale_reg[:, None] * lam


def project(
    empirical_leaves: Sequence[jax.Array],
    regularizer_leaves: Sequence[Sequence[jax.Array | None]],
    reg_weights: jax.Array,
    grouping: Grouping,
    when: str = "conflict",
    single: bool = True,
    max_angle: jax.Array | float | None = None,
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
    max_angle: ``None`` for Algorithm 1; else ``s`` of Eq. 5 in degrees, see
      :func:`max_angle_scales` (``when`` then sets only the length of ``d``).
  """
  per_leaf, grams = leaf_grams_by_group(empirical_leaves, regularizer_leaves, grouping)
  coefficients, conflict = projection_coefficients(grams, when)
  scale_empirical = 1.0 - coefficients @ reg_weights.astype(coefficients.dtype)
  if max_angle is None:
    direction = combine_groups(per_leaf, grouping, scale_empirical, reg_weights)
    return direction, diagnostics(grams, coefficients, conflict, reg_weights, single)
  scale_empirical, reg_scales = max_angle_scales(grams, scale_empirical, reg_weights, max_angle)
  direction = combine_groups(per_leaf, grouping, scale_empirical, reg_scales)
  weights = jnp.concatenate([scale_empirical[:, None], reg_scales], axis=1)   # on the unweighted [g, r_1..r_k]
  return direction, direction_diagnostics(grams, weights, conflict, reg_weights, single)
