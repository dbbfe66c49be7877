"""What the never-hurt corrections share: extra rows beside ``[g, r_1, ..., r_k]``, their diagnostics, option checks.

A correction here writes, per group of parameters, ``d = a·g + Σ_i b_i r_i + Σ_j c_j s_j`` where the
``s_j`` are vectors it keeps in its state (a moving average of ``g``, a basis of recent gradients). The
weights come from the group's Gram matrix of the rows ``[g, r_1, ..., r_k, s_1, ..., s_M]``, computed in the
same single pass over the leaves as DTNH's (:func:`dtnh_jax.projection.leaf_grams_by_group`, with the state
rows as further vectors), and ``d`` is written by DTNH's second pass
(:func:`dtnh_jax.projection.combine_groups`). Diagnostics are DTNH's, of this ``d``, plus
``removed_fraction``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.projection import Diagnostics

__all__ = [
    "check_in_range",
    "CorrectionState",
    "diagnostics_of",
    "leaf_groups",
    "plain_weights",
    "removed_fraction",
    "zero_state_fields",
]


class CorrectionState(NamedTuple):
  """State of a correction without memory: the step count, the last diagnostics and ``removed_fraction``.

  ``removed_fraction`` is ``|(g + R) - d| / |R|`` with ``R = Σ_i λ_i r_i``: the size of what the correction
  took from the plain regularized gradient, relative to the regularizer's step (0: ``d = g + R``; 1: as much as
  all of ``R``; 0 where ``R = 0``). Over the whole tree, whatever the grouping.
  """

  count: jax.Array
  diagnostics: Diagnostics
  removed_fraction: jax.Array


def check_in_range(name: str, option: str, value, low: float, high: float, *, high_included: bool = True) -> None:
  """Refuses a concrete option outside ``[low, high]`` (or ``[low, high)``), or not finite; traced ones pass."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    number = float(np.asarray(value))
  except (TypeError, ValueError):
    raise TypeError(f"{name}: {option} must be a number; got {value!r}.") from None
  inside = np.isfinite(number) and low <= number and (number <= high if high_included else number < high)
  if not inside:
    bound = f"[{low}, {high}]" if high_included else f"[{low}, {high})"
    raise ValueError(f"{name}: {option} must be in {bound}, got {number}.")


def leaf_groups(name: str, params, granularity, unprojected) -> tuple[list[int], int]:
  """Each leaf's group (in ``jax.tree.leaves`` order) and the number of projected groups.

  The group number equal to the count marks an unprojected leaf (:class:`dtnh_jax.projection.Grouping`).
  """
  grouping = transform.projection_groups(params, granularity, unprojected, name)
  return list(grouping.leaf_group), grouping.num_groups


def plain_weights(num_groups: int, reg_weights: jax.Array, num_rows: int, dtype) -> jax.Array:
  """The weights ``[groups + 1, m]`` of ``g + Σ λ_i r_i`` on the rows ``[g, r_1..r_k, s_1..]``."""
  k = reg_weights.shape[0]
  row = jnp.concatenate([jnp.ones(1, dtype), reg_weights.astype(dtype), jnp.zeros(num_rows - 1 - k, dtype)])
  return jnp.broadcast_to(row, (num_groups + 1, num_rows))


def diagnostics_of(grams: jax.Array, direction_weights: jax.Array, reg_weights: jax.Array, single: bool
                   ) -> Diagnostics:
  """DTNH's :class:`~dtnh_jax.Diagnostics` of ``d = w_p · [g, r_1, ..., r_k, s_1, ...]_p``.

  The state rows ``s_j`` enter ``d`` only; ``R = Σ_i λ_i r_i``, the conflict flags and the per-regularizer
  fields are those of the regularizers, as for ``dtnh``.
  """
  k = reg_weights.shape[0]
  extra = grams.shape[-1] - 1 - k
  padded = jnp.concatenate([reg_weights.astype(jnp.float32), jnp.zeros(extra, jnp.float32)])
  full = projection_lib.direction_diagnostics(grams, direction_weights, projection_lib.conflict_flags(grams), padded,
                                              single=False)
  per_reg = (lambda x: x[0]) if single else (lambda x: x[:k])
  return full._replace(inner_product=per_reg(full.inner_product), regularizer_norm=per_reg(full.regularizer_norm),
                       conflict=per_reg(full.conflict), reg_weight=per_reg(full.reg_weight))


def removed_fraction(grams: jax.Array, direction_weights: jax.Array, reg_weights: jax.Array) -> jax.Array:
  """``|(g + R) - d| / |R|`` over the whole tree (0 where ``R = 0``); see :class:`CorrectionState`."""
  grams = grams.astype(jnp.float32)
  num_rows = grams.shape[-1]
  plain = plain_weights(grams.shape[0] - 1, reg_weights, num_rows, jnp.float32)
  removed = plain - direction_weights.astype(jnp.float32)
  regularizer = plain.at[:, 0].set(0.0)
  removed_sq = jnp.einsum("pi,pij,pj->", removed, grams, removed)
  regularizer_sq = jnp.einsum("pi,pij,pj->", regularizer, grams, regularizer)
  safe = jnp.where(regularizer_sq > 0, regularizer_sq, 1.0)
  return jnp.where(regularizer_sq > 0, jnp.sqrt(jnp.maximum(removed_sq, 0.0) / safe), 0.0)


def zero_state_fields(num_regularizers: int, single: bool) -> dict:
  """``count``, ``diagnostics`` and ``removed_fraction`` of a fresh state."""
  return {"count": jnp.zeros([], jnp.int32), "diagnostics": Diagnostics.zeros(num_regularizers, single),
          "removed_fraction": jnp.zeros([], jnp.float32)}
