"""PCGrad: every row projected off each row it conflicts with, then summed (Yu et al. 2020, Algorithm 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dtnh_jax.aggregators import _gram

__all__ = [
    "pcgrad",
    "pcgrad_weights",
]


def pcgrad_weights(gram: jax.Array) -> jax.Array:
  """PCGrad's weights on the rows, ``[groups, m]``, from their Gram matrices ``[groups, m, m]``.

  Row ``i`` starts as itself (``c = e_i``); for each other row ``j`` in index
  order, if ``<c·V, V_j> < 0`` it loses its component along ``V_j``:
  ``c_j -= <c·V, V_j> / |V_j|²``. The weights are the sum of the ``c``.
  """
  m = gram.shape[-1]
  eye = jnp.eye(m, dtype=gram.dtype)
  total = jnp.zeros(gram.shape[:-1], gram.dtype)
  for i in range(m):
    weights = jnp.broadcast_to(eye[i], total.shape)
    for j in range(m):
      if j == i:
        continue
      inner = jnp.einsum("pk,pk->p", gram[:, j], weights)              # <row i so far, row j>
      norm_sq = gram[:, j, j]
      step = jnp.where((inner < 0) & (norm_sq > 0), inner / jnp.where(norm_sq > 0, norm_sq, 1), 0)
      weights = weights - step[:, None] * eye[j]
    total = total + weights
  return total


def pcgrad(reg_weight, *, granularity="tree", unprojected=None) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  Each row is projected, one after the other, onto the normal plane of every
  other row it conflicts with,

  .. math::

    v_i \leftarrow v_i - \frac{\min(0, \langle v_i, V_j\rangle)}{\|V_j\|^2} V_j
    \quad (j \ne i), \qquad d = \sum_i v_i,

  so without conflict :math:`d = g + \sum_i \lambda_i r_i`, as ``dtnh``. With
  one regularizer and :math:`\langle g, r\rangle < 0`,
  :math:`d = (g - \frac{\langle g, r\rangle}{|r|^2} r) + \lambda (r - \frac{\langle g, r\rangle}{|g|^2} g)`:
  DTNH's direction plus the symmetric correction of :math:`g` (PCGrad
  protects the regularizer too, DTNH only the empirical loss).

  The paper draws the order of the other rows at random; here it is the
  index order (``g`` first, then the regularizers as given) so that a step
  is a deterministic function of its inputs. With two rows the order does
  not matter. TorchJD's ``PCGrad`` gives the same weights when its
  ``torch.randperm`` returns the identity.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh` (floats or
      schedules; a sequence for several regularizers).
    granularity: as for :func:`dtnh_jax.dtnh`: over which parameters each
      Gram matrix (and so each correction) is computed.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract (``update((g, r_1, ...), state, params)`` or
    ``update(g, state, params, regularizer_grads=...)``); ``state`` is an
    :class:`AggregatorState` whose ``diagnostics`` describe this ``d``.

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, `Gradient Surgery for Multi-Task
    Learning <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """

  def row_weights(gram, state):
    return pcgrad_weights(gram), state

  return _gram.aggregator("pcgrad", reg_weight, row_weights, granularity=granularity, unprojected=unprojected)
