"""Exact small quadratic programs by enumerating faces: jit-friendly, no iterations, no host round-trips.

MGDA, UPGrad, DualProj and CAGrad each solve, per group, a convex problem in
``m = k + 1`` variables (one per row ``g, λ_1 r_1, ..., λ_k r_k``): a
quadratic over the simplex, or over the box ``v >= u``. Its solution lies in
the relative interior of one face of the feasible set, where it solves the
face's KKT equations, a linear system. With a handful of rows there are at
most ``2^m`` faces, so every face's system is solved at once (one batched
``jnp.linalg.solve``), infeasible and non-finite candidates are dropped, and
the feasible candidate with the smallest objective is the answer. No step
size, no iteration count, no convergence test: the result is the exact
solution up to float rounding of an ``(m+1)×(m+1)`` solve.

Why singular Gram matrices (parallel or zero rows) are no obstacle: the
objectives depend on the weights ``w`` only through the direction ``Jᵀw``, so
along a null direction of a face's system the objective is constant, and an
extreme point of the (convex, pointed) set of minimizers lies on a face
whose system is non-singular. Singular faces give non-finite candidates,
which are dropped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FEASIBILITY_TOLERANCE",
    "MAX_ROWS",
    "face_masks",
    "min_quadratic_above",
    "min_quadratic_on_simplex",
    "simplex_face_systems",
]

#: A candidate counts as feasible when it violates its bounds by at most this (relative to the weights' size).
FEASIBILITY_TOLERANCE = 1e-5
#: Enumeration costs 2^m small solves per group; beyond this many rows that stops being small.
MAX_ROWS = 10


@functools.lru_cache(maxsize=None)
def face_masks(m: int) -> np.ndarray:
  """All ``2^m`` subsets of ``range(m)`` as a boolean array ``[2^m, m]`` (row ``b``: the bits of ``b``)."""
  if m > MAX_ROWS:
    raise ValueError(f"at most {MAX_ROWS} rows (the empirical gradient and {MAX_ROWS - 1} regularizers); got {m}.")
  return (np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1 == 1


def _quadratic(weights: jax.Array, gram: jax.Array) -> jax.Array:
  """``wᵀ G w`` for weights ``[..., F, m]`` and Gram matrices ``[..., m, m]``."""
  return jnp.einsum("...fi,...ij,...fj->...f", weights, gram, weights)


def _pick(candidates: jax.Array, feasible: jax.Array, objective: jax.Array) -> jax.Array:
  """The feasible candidate ``[..., F, m]`` with the smallest objective ``[..., F]``."""
  score = jnp.where(feasible & jnp.isfinite(objective), objective, jnp.inf)
  best = jnp.argmin(score, axis=-1)
  return jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]


def simplex_face_systems(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The KKT matrices of every non-empty face of the simplex, and the faces' masks.

  For a face ``S`` (the support of ``w``): ``(G w)_i + μ = ...`` for ``i ∈ S``,
  ``w_i = 0`` for ``i ∉ S``, ``Σ w = 1``. Returns ``[..., F, m+1, m+1]`` and
  ``[F, m]`` with ``F = 2^m - 1``; the right-hand sides are the caller's.
  """
  m = gram.shape[-1]
  masks = face_masks(m)[1:]
  free = jnp.asarray(masks)[:, :, None]                                  # [F, m, 1]
  eye = jnp.eye(m, dtype=gram.dtype)
  rows = jnp.where(free, gram[..., None, :, :], eye)                     # [..., F, m, m]
  multiplier = jnp.broadcast_to(free.astype(gram.dtype), rows.shape[:-1] + (1,))
  top = jnp.concatenate([rows, multiplier], axis=-1)                     # [..., F, m, m+1]
  bottom = jnp.broadcast_to(jnp.concatenate([jnp.ones(m, gram.dtype), jnp.zeros(1, gram.dtype)]),
                            rows.shape[:-2] + (1, m + 1))
  return jnp.concatenate([top, bottom], axis=-2), masks


def min_quadratic_on_simplex(gram: jax.Array) -> jax.Array:
  """``argmin_w wᵀ G w`` over the simplex ``{w >= 0, Σ w = 1}``, per leading index: the min-norm point of the hull.

  ``gram``: ``[..., m, m]``, symmetric positive semi-definite. Returns
  ``[..., m]``, clipped to the simplex (the solve's rounding can leave
  ``-1e-7``-sized weights).
  """
  m = gram.shape[-1]
  systems, masks = simplex_face_systems(gram)
  rhs = jnp.zeros(systems.shape[:-1], gram.dtype).at[..., m].set(1)
  solution = jnp.linalg.solve(systems, rhs[..., None])[..., 0]
  candidates = jnp.where(jnp.asarray(masks), solution[..., :m], 0)
  feasible = (jnp.all(candidates >= -FEASIBILITY_TOLERANCE, axis=-1)
              & (jnp.abs(candidates.sum(axis=-1) - 1) <= FEASIBILITY_TOLERANCE)
              & jnp.all(jnp.isfinite(candidates), axis=-1))
  best = jnp.maximum(_pick(candidates, feasible, _quadratic(candidates, gram)), 0)
  # A vertex is always feasible, so some candidate is; renormalize after clipping.
  return best / best.sum(axis=-1, keepdims=True)


def min_quadratic_above(gram: jax.Array, lower: jax.Array) -> jax.Array:
  """``argmin_v vᵀ G v`` subject to ``v >= lower``: the weights of a projection onto the rows' dual cone.

  ``gram``: ``[..., m, m]``; ``lower``: ``[..., m]`` (``u`` of TorchJD's
  ``DualConeProjector``: with ``d = Jᵀv``, ``Jᵀu`` projected onto the cone
  ``{x : J x >= 0}``). On a face, the active ``v_i = u_i`` are fixed and the
  free ones solve ``(G v)_i = 0``; the face with all bounds active (``v = u``)
  is always feasible. Returns ``[..., m]``, at least ``lower``.
  """
  m = gram.shape[-1]
  masks = face_masks(m)                                                  # True: free (bound inactive)
  free = jnp.asarray(masks)
  eye = jnp.eye(m, dtype=gram.dtype)
  systems = jnp.where(free[:, :, None], gram[..., None, :, :], eye)      # [..., F, m, m]
  rhs = jnp.where(free, 0, lower[..., None, :])                          # [..., F, m]
  solution = jnp.linalg.solve(systems, rhs[..., None])[..., 0]
  candidates = jnp.where(free, solution, lower[..., None, :])
  size = jnp.maximum(1, jnp.max(jnp.abs(candidates), axis=-1))
  feasible = (jnp.all(candidates >= lower[..., None, :] - FEASIBILITY_TOLERANCE * size[..., None], axis=-1)
              & jnp.all(jnp.isfinite(candidates), axis=-1))
  return jnp.maximum(_pick(candidates, feasible, _quadratic(candidates, gram)), lower)
