"""The regularizer projected off the subspace of recent empirical gradients where it conflicts (OGD/GEM's memory)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.corrections import _common
from dtnh_jax.projection import Diagnostics

__all__ = [
    "NEW_DIRECTION_TOLERANCE",
    "subspace_projection",
    "subspace_weights",
    "SubspaceState",
]

#: The current gradient adds a direction to the basis only where its part outside the basis, ``ρ``, has
#: ``|ρ|² > NEW_DIRECTION_TOLERANCE · |g|²`` (1% of ``|g|`` in length): a shorter ``ρ`` is mostly float32 rounding
#: of the Gram entries it is computed from, and a direction normalized from it would be noise.
NEW_DIRECTION_TOLERANCE = 1e-4


class SubspaceState(NamedTuple):
  """State of :func:`subspace_projection`: DTNH's fields, ``removed_fraction``, and the basis.

  Attributes:
    count: the step count (for ``reg_weight`` schedules).
    diagnostics: DTNH's :class:`~dtnh_jax.Diagnostics` of the returned direction.
    removed_fraction: see :class:`~dtnh_jax.corrections.CorrectionState`.
    basis: the parameters' structure, each leaf ``[memory, *shape]`` (float32, or wider): a ring of ``memory``
      slots per group, slot ``j`` of every leaf of a group together one vector of that group. The ``filled``
      slots just before ``position`` (cyclically) hold the group's last directions, orthonormal, the newest at
      ``position - 1``; slot ``position`` is where the next one is written (``memory=1`` keeps no ring, and an
      ``unprojected`` leaf holds ``[0, *shape]``).
    filled: ``[groups]`` int32: how many directions each group holds, at most ``memory - 1``.
    position: ``[groups]`` int32: the slot each group's next direction is written to.
  """

  count: jax.Array
  diagnostics: Diagnostics
  removed_fraction: jax.Array
  basis: Any
  filled: jax.Array
  position: jax.Array


def subspace_weights(grams: jax.Array, valid: jax.Array, num_regularizers: int,
                     tolerance: float = NEW_DIRECTION_TOLERANCE) -> tuple[jax.Array, ...]:
  """Per group, the corrected regularizers and the new basis direction as weights on the rows.

  ``grams`` ``[P, m, m]`` are the Gram matrices of the rows ``[g, r_1..r_k, b_1..b_M]`` (``b``: the stored
  slots), ``valid`` ``[P, M]`` says which of them hold a direction. The stored slots are orthonormalized once
  more from their measured Gram matrix (``u = B L⁻ᵀ``, ``L`` its Cholesky factor), so rounding in the stored
  vectors never accumulates.

  Returns:
    ``alpha`` ``[P, k]`` and ``beta`` ``[P, M, k]``: ``r_i'' = r_i + alpha_i g + Σ_j beta_ji b_j``;
    ``add`` ``[P]``: whether ``g`` gives a new direction; ``new_g`` ``[P]`` and ``new_b`` ``[P, M]``: the new
    direction ``q = new_g · g + Σ_j new_b_j b_j`` (zero where not ``add``).
  """
  acc = grams.dtype
  k = num_regularizers
  num_slots = grams.shape[-1] - 1 - k
  gg = grams[:, 0, 0]
  gr = grams[:, 0, 1:k + 1]                                                  # <g, r_i>       [P, k]
  valid = valid.astype(acc)
  eye = jnp.eye(num_slots, dtype=acc)
  # empty slots: identity rows, zero inner products, so they take no part
  slot_gram = grams[:, k + 1:, k + 1:] * valid[:, :, None] * valid[:, None, :] + eye * (1 - valid)[:, :, None]
  cholesky = jnp.linalg.cholesky(slot_gram)
  to_orthonormal = jax.scipy.linalg.solve_triangular(                         # T = L⁻ᵀ: u_j = Σ_l T_lj b_l
      jnp.swapaxes(cholesky, -1, -2), jnp.broadcast_to(eye, slot_gram.shape), lower=False)
  a = jnp.einsum("plj,pl->pj", to_orthonormal, grams[:, k + 1:, 0] * valid)   # <g, u_j>       [P, M]
  c = jnp.einsum("plj,pli->pji", to_orthonormal, grams[:, k + 1:, 1:k + 1] * valid[..., None])   # <r_i, u_j>
  residual_sq = gg - jnp.sum(a ** 2, axis=-1)                                # |ρ|², ρ = g - Σ_j a_j u_j
  residual_reg = gr - jnp.einsum("pj,pji->pi", a, c)                         # <r_i, ρ>
  add = (gg > 0) & (residual_sq > tolerance * gg)
  safe_residual_sq = jnp.where(add, residual_sq, 1)
  # a stored direction conflicts where r_i and g point opposite ways along it; the new one, where <r_i, ρ> < 0
  removed = jnp.where(c * a[..., None] < 0, c, 0)                            # [P, M, k]
  along_new = jnp.where(add[:, None] & (residual_reg < 0), residual_reg / safe_residual_sq[:, None], 0)
  alpha = -along_new                                                         # r' = r - U removed - along_new ρ
  on_u = -removed + along_new[:, None, :] * a[..., None]
  # DTNH's projection of what is left, which acts only where g added no direction (and by rounding)
  left = gr - jnp.einsum("pji,pj->pi", removed, a) - along_new * residual_sq[:, None]   # <r_i', g>
  alpha = alpha - jnp.where((left < 0) & (gg > 0)[:, None], left / jnp.where(gg > 0, gg, 1)[:, None], 0)
  beta = jnp.einsum("plj,pji->pli", to_orthonormal, on_u)
  new_g = jnp.where(add, jax.lax.rsqrt(safe_residual_sq), 0)
  new_b = -jnp.einsum("plj,pj->pl", to_orthonormal, a) * new_g[:, None]
  return alpha, beta, add, new_g, new_b


def subspace_projection(reg_weight, *, memory: int = 4, granularity="tree", unprojected=None
                        ) -> optax.GradientTransformationExtraArgs:
  r"""Each regularizer gradient projected off the span of the last empirical gradients, where it conflicts.

  DTNH removes the component of :math:`r` along the current :math:`g` when
  they conflict; in expectation over minibatches that is a projection
  :math:`P = E[1\{\langle g, r\rangle < 0\} \hat g \hat g^\top]` of trace at
  most 1, so the regularizer's pull against the task orthogonal to each
  :math:`g` stays. Here the state keeps an orthonormal basis of
  ``memory - 1`` directions of recent gradients (per group), as OGD keeps one
  of past tasks' gradients, and each step, per group:

  1. Gram–Schmidt of :math:`g` against the basis :math:`u_1, \dots, u_M`:
     :math:`\rho = g - \sum_j \langle g, u_j\rangle u_j`; where
     :math:`|\rho|^2 > \tau |g|^2` (:data:`NEW_DIRECTION_TOLERANCE`),
     :math:`q = \rho / |\rho|` joins the directions, so :math:`g` lies in
     their span.
  2. With :math:`a_j = \langle g, u_j\rangle` and
     :math:`c_{ij} = \langle r_i, u_j\rangle` over those orthonormal
     directions (:math:`a_q = |\rho| > 0`), :math:`r_i` loses its component
     along every direction where it points against :math:`g`:

     .. math::

       r_i' = r_i - \sum_{j : c_{ij} a_j < 0} c_{ij} u_j,
       \qquad d = g + \sum_i \lambda_i r_i'.

     Then :math:`\langle r_i', g\rangle = \sum_{j \text{ kept}} c_{ij} a_j \ge 0`,
     so :math:`\langle d, g\rangle \ge |g|^2`, as with DTNH. Where :math:`q`
     was not added, :math:`g` is in the span only up to :math:`\rho`, and
     DTNH's projection of what is left on :math:`g` keeps the bound.
  3. :math:`q` is stored; beyond ``memory - 1`` directions the oldest is dropped.

  The expected projection then has trace up to ``memory`` instead of 1.
  ``memory=1`` stores nothing and is DTNH exactly. The removal is per
  regularizer; without any conflict :math:`d = g + \sum_i \lambda_i r_i`.
  The basis is orthonormalized again from its measured Gram matrix each step
  (:func:`subspace_weights`), so float rounding in the stored vectors never
  accumulates. A non-finite :math:`g` adds no direction.

  Memory: ``memory`` float32 copies of the projected parameters (for
  ``memory > 1``): the ``memory - 1`` directions, and the slot the next one
  is written to, so that XLA writes it in place rather than copying the
  ring. Cost: the Gram pass reads the stored directions too (``k + memory``
  rows instead of ``k + 1``), and the second pass reads them and writes one.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    memory: the number of directions projected against, the current
      gradient's included, >= 1 (static: with ``optax.inject_hyperparams``
      pass ``static_args="memory"``).
    granularity: as for :func:`dtnh_jax.dtnh`: one basis per group.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there, nothing
      stored).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is a :class:`SubspaceState` (``init`` must see the
    parameters, or a tree of their structure and shapes).

  References:
    Farajtabar, Azizan, Mott, Li, `Orthogonal Gradient Descent for Continual
    Learning <https://arxiv.org/abs/1910.07104>`_, AISTATS 2020; Lopez-Paz,
    Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  """
  if isinstance(memory, (bool, np.bool_)) or not isinstance(memory, (int, np.integer)) or memory < 1:
    raise ValueError(f"subspace_projection: memory must be an integer >= 1, got {memory!r}.")
  ring = int(memory) if memory > 1 else 0       # memory=1 stores nothing: DTNH
  num_slots = max(ring - 1, 0)                  # the directions kept; the ring's last slot takes the next one

  def init_state(params, num_regularizers, single):
    leaf_group, num_groups = _common.leaf_groups("subspace_projection", params, granularity, unprojected)
    leaves, treedef = jax.tree.flatten(params)
    basis = [jnp.zeros((ring if group < num_groups else 0,) + jnp.shape(leaf),
                       projection_lib.accumulation_dtype(jnp.result_type(leaf)))
             for leaf, group in zip(leaves, leaf_group)]
    return SubspaceState(**_common.zero_state_fields(num_regularizers, single),
                         basis=jax.tree.unflatten(treedef, basis), filled=jnp.zeros((num_groups,), jnp.int32),
                         position=jnp.zeros((num_groups,), jnp.int32))

  def stored_directions(basis_leaves, grouping, position):
    """Per stored slot (oldest first: ``position + 1``, ..., ``position + memory - 1``), its leaves."""
    return [[None if group == grouping.num_groups else
             jax.lax.dynamic_index_in_dim(b, (position[group] + j) % ring, axis=0, keepdims=False)
             for b, group in zip(basis_leaves, grouping.leaf_group)] for j in range(1, ring)]

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    basis_leaves = jax.tree.leaves(state.basis)
    num_groups = grouping.num_groups
    if len(basis_leaves) != len(empirical_leaves) or state.filled.shape != (num_groups,):
      raise ValueError(
          f"subspace_projection: the state holds a basis of {len(basis_leaves)} leaves and {state.filled.shape[0]} "
          f"groups, but this step has {len(empirical_leaves)} leaves and {num_groups} groups; call init with "
          "parameters of the structure given to update.")
    position = state.position
    slots = stored_directions(basis_leaves, grouping, position)
    _, grams = projection_lib.leaf_grams_by_group(empirical_leaves, regularizer_leaves + slots, grouping)
    k = reg_weights.shape[0]
    valid = jnp.arange(num_slots)[None, :] >= num_slots - state.filled[:, None]   # the newest `filled` slots
    alpha, beta, add, new_g, new_b = subspace_weights(grams[:num_groups], valid, k)
    lam = reg_weights.astype(grams.dtype)
    plain = _common.plain_weights(num_groups, reg_weights, grams.shape[-1], grams.dtype)
    corrected = jnp.concatenate([(1 + alpha @ lam)[:, None], plain[:num_groups, 1:k + 1], beta @ lam], axis=1)
    weights = jnp.concatenate([corrected, plain[num_groups:]], axis=0)
    new_state = state._replace(diagnostics=_common.diagnostics_of(grams, weights, reg_weights, single),
                               removed_fraction=_common.removed_fraction(grams, weights, reg_weights))
    if ring:
      # The new direction goes to the free slot, which no stored direction uses; d then reads the stored ones from
      # the updated ring, so XLA writes it in place instead of copying the whole ring first.
      basis = []
      for g, stored, group, *rows in zip(empirical_leaves, basis_leaves, grouping.leaf_group, *slots):
        if group == num_groups:
          basis.append(stored)
          continue
        written = new_g[group].astype(stored.dtype) * g.astype(stored.dtype)
        for j, row in enumerate(rows):
          written = written + new_b[group, j].astype(stored.dtype) * row
        basis.append(jax.lax.dynamic_update_index_in_dim(stored, written, position[group], axis=0))
      slots = stored_directions(basis, grouping, position)
      new_state = new_state._replace(
          basis=jax.tree.unflatten(jax.tree.structure(state.basis), basis),
          filled=jnp.where(add, jnp.minimum(state.filled + 1, num_slots), state.filled).astype(jnp.int32),
          position=jnp.where(add, (position + 1) % ring, position).astype(jnp.int32))
    per_leaf = list(zip(empirical_leaves, *regularizer_leaves, *slots))
    return projection_lib.combine_groups(per_leaf, grouping, weights[:, 0], weights[:, 1:]), new_state

  return transform.gram_transformation("subspace_projection", reg_weight, granularity=granularity,
                                       unprojected=unprojected, init_state=init_state, direction=direction)
