"""What every gradient-surgery correction shares: its rows' Gram matrix, and one optax transformation around it.

Each correction here sees, per group of parameters, the rows
``V = [g, λ_1 r_1, ..., λ_k r_k]`` (the empirical gradient and the weighted
regularizer gradients: the terms whose plain sum is the regularized gradient
``g + R``). Its direction is a linear combination ``d = wᵀ V`` whose weights
``w`` are a function of the Gram matrix ``V Vᵀ`` alone, so:

- the Gram matrix is the one ``dtnh`` already computes, of the unweighted
  ``[g, r_1, ..., r_k]`` (:func:`dtnh_jax.projection.leaf_grams_by_group`),
  rescaled by ``λ`` here: one pass over the leaves, fused, sharding-agnostic;
- ``w`` is tiny math on ``[groups, k+1, k+1]`` arrays, under ``jit``;
- ``d = w_0 g + Σ_i (w_i λ_i) r_i`` is written by the same second pass as
  DTNH's (:func:`dtnh_jax.projection.combine_groups`), and the diagnostics
  are DTNH's, of this ``d`` (:func:`dtnh_jax.projection.direction_diagnostics`).

``unprojected`` leaves get ``d = g + R``, as with ``dtnh``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax import projection as projection_lib
from dtnh_jax import transform
from dtnh_jax.projection import Diagnostics

__all__ = [
    "aggregator",
    "AggregatorState",
    "check_nonnegative",
    "groups_of",
    "normalized",
    "weighted_grams",
]

PyTree = Any
#: ``(gram [groups, m, m] of the rows [g, λ_1 r_1, ...], state) -> (weights [groups, m], state)``.
RowWeights = Callable[[jax.Array, NamedTuple], tuple[jax.Array, NamedTuple]]


class AggregatorState(NamedTuple):
  """State of a stateless correction: the step count (for ``reg_weight`` schedules) and the last diagnostics."""

  count: jax.Array
  diagnostics: Diagnostics


def weighted_grams(grams: jax.Array, reg_weights: jax.Array) -> jax.Array:
  """``D G D`` with ``D = diag(1, λ_1, ..., λ_k)``: the Gram matrices of ``[g, λ_1 r_1, ..., λ_k r_k]``."""
  scale = jnp.concatenate([jnp.ones(1, grams.dtype), reg_weights.astype(grams.dtype)])
  return grams * scale[:, None] * scale[None, :]


def normalized(gram: jax.Array) -> jax.Array:
  """Each ``[m, m]`` Gram matrix over its trace (0 stays 0).

  The weights of every correction here are invariant to scaling all rows
  alike; dividing by the trace keeps the small solves near 1 whatever the
  gradients' scale (TorchJD does the same, but zeroes Gram matrices with
  trace below an absolute 1e-4, which here would erase small groups, e.g.
  one bias vector with ``granularity="leaf"``).
  """
  trace = jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
  return jnp.where(trace > 0, gram / jnp.where(trace > 0, trace, 1), 0)


def check_nonnegative(name: str, option: str, value) -> None:
  """Refuses a concrete negative or non-finite option; traced ones (inject_hyperparams under jit) pass."""
  if isinstance(value, jax.core.Tracer):
    return
  number = float(np.asarray(value))
  if not (np.isfinite(number) and number >= 0):
    raise ValueError(f"{name}: {option} must be >= 0 and finite, got {number}.")


def _init_stateless(params, num_regularizers: int, single: bool) -> AggregatorState:
  del params
  return AggregatorState(count=jnp.zeros([], jnp.int32), diagnostics=Diagnostics.zeros(num_regularizers, single))


def aggregator(
    name: str,
    reg_weight,
    row_weights: RowWeights,
    *,
    granularity,
    unprojected,
    init_state: Callable[[PyTree, int, bool], NamedTuple] = _init_stateless,
    max_rows: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """An optax transformation with ``dtnh``'s update contract whose direction per group is ``row_weights``'.

  ``row_weights`` gets the projected groups' Gram matrices of the weighted
  rows (the unprojected group is not passed) and the state, and returns one
  weight per row and group, and the state (e.g. GradVac's moving averages).
  """

  def direction(empirical_leaves, regularizer_leaves, reg_weights, grouping, single, state):
    num_rows = len(regularizer_leaves) + 1
    if max_rows is not None and num_rows > max_rows:
      raise ValueError(f"{name}: at most {max_rows - 1} regularizers; got {num_rows - 1}.")
    per_leaf, grams = projection_lib.leaf_grams_by_group(empirical_leaves, regularizer_leaves, grouping)
    weights, state = row_weights(weighted_grams(grams[:-1], reg_weights), state)
    unprojected_row = jnp.ones((1, num_rows), weights.dtype)
    weights = jnp.concatenate([weights.astype(grams.dtype), unprojected_row.astype(grams.dtype)], axis=0)
    # On the unweighted [g, r_1, ..., r_k]: w_0 for g, w_i λ_i for r_i.
    direction_weights = weights * jnp.concatenate([jnp.ones(1, grams.dtype), reg_weights.astype(grams.dtype)])
    leaves = projection_lib.combine_groups(per_leaf, grouping, direction_weights[:, 0], direction_weights[:, 1:])
    diagnostics = projection_lib.direction_diagnostics(
        grams, direction_weights, projection_lib.conflict_flags(grams), reg_weights, single)
    return leaves, state._replace(diagnostics=diagnostics)

  return transform.gram_transformation(name, reg_weight, granularity=granularity, unprojected=unprojected,
                                       init_state=init_state, direction=direction)


def groups_of(name: str, params: PyTree, granularity, unprojected) -> int:
  """How many projected groups ``params`` has: the size of per-group state."""
  return transform.projection_groups(params, granularity, unprojected, name).num_groups
