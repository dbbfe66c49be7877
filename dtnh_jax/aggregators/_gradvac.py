"""GradVac: rows pulled towards a moving-average target cosine with each other (Wang et al. 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax.aggregators import _gram
from dtnh_jax.projection import Diagnostics

__all__ = [
    "gradvac",
    "gradvac_weights",
    "GradVacState",
]


class GradVacState(NamedTuple):
  """State of :func:`gradvac`: step count, diagnostics, and the target cosines.

  ``target_cosine[p, i, j]`` is :math:`\\hat\\phi_{ij}` of group ``p``: the
  moving average of the cosine between (corrected) row ``i`` and row ``j``,
  rows ordered ``[g, λ_1 r_1, ..., λ_k r_k]``; it starts at 0.
  """

  count: jax.Array
  diagnostics: Diagnostics
  target_cosine: jax.Array


def gradvac_weights(gram: jax.Array, target_cosine: jax.Array, beta, eps) -> tuple[jax.Array, jax.Array]:
  """GradVac's weights ``[groups, m]`` and the updated targets ``[groups, m, m]``.

  For row ``i`` (``c = e_i``) and each other row ``j`` in index order, with
  :math:`\\phi = \\cos(c·V, V_j)` and target :math:`\\hat\\phi`: if
  :math:`\\phi < \\hat\\phi`, add to row ``i``

  .. math::

    \\frac{|c·V| (\\hat\\phi \\sqrt{1 - \\phi^2} - \\phi \\sqrt{1 - \\hat\\phi^2})}
         {|V_j| \\sqrt{1 - \\hat\\phi^2}} V_j,

  which makes its cosine with :math:`V_j` exactly :math:`\\hat\\phi`; then
  :math:`\\hat\\phi \\leftarrow (1 - \\beta) \\hat\\phi + \\beta \\phi`.
  The weights are the sum of the ``c``. ``gram`` is trace-normalized here,
  so ``eps`` (added to denominators) is relative to the rows' size.
  """
  gram = _gram.normalized(gram)
  m = gram.shape[-1]
  eye = jnp.eye(m, dtype=gram.dtype)
  beta = jnp.asarray(beta, gram.dtype)
  eps = jnp.asarray(eps, gram.dtype)
  target = target_cosine.astype(gram.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram, axis1=-2, axis2=-1), 0))   # [P, m]
  total = jnp.zeros(gram.shape[:-1], gram.dtype)
  for i in range(m):
    weights = jnp.broadcast_to(eye[i], total.shape)
    products = gram[:, i]                                                 # <c·V, V_j> for every j
    for j in range(m):
      if j == i:
        continue
      norm_i = jnp.sqrt(jnp.maximum(jnp.einsum("pk,pk->p", products, weights), 0))
      cosine = products[:, j] / (norm_i * norms[:, j] + eps)
      wanted = target[:, i, j]
      sine = jnp.sqrt(jnp.maximum(1 - cosine ** 2, 0))
      wanted_sine = jnp.sqrt(jnp.maximum(1 - wanted ** 2, 0))
      step = norm_i * (wanted * sine - cosine * wanted_sine) / (norms[:, j] * wanted_sine + eps)
      step = jnp.where(cosine < wanted, step, 0)
      weights = weights + step[:, None] * eye[j]
      products = products + step[:, None] * gram[:, j]
      target = target.at[:, i, j].set((1 - beta) * wanted + beta * cosine)
    total = total + weights
  return total, target


def gradvac(reg_weight, *, beta=0.5, eps=1e-8, granularity="tree", unprojected=None
            ) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Vaccine on the rows :math:`V = [g, \lambda_1 r_1, \dots, \lambda_k r_k]`, per group.

  PCGrad corrects a row only when its cosine with another is negative, and
  then to exactly 0. GradVac keeps, per pair of rows and group, a moving
  average :math:`\hat\phi_{ij}` of their cosine and corrects row ``i``
  whenever its cosine with row ``j`` falls below it, to exactly
  :math:`\hat\phi_{ij}` (:func:`gradvac_weights`): pairs that usually agree
  are kept agreeing. :math:`d = \sum_i v_i`; with all targets at 0 (the
  first step) it is PCGrad's direction. The targets live in the state
  (:class:`GradVacState`, one ``[m, m]`` matrix per projected group), so
  ``init`` must see the parameters (or a tree of their structure) to count
  the groups.

  Conventions of TorchJD's ``GradVac`` (``beta=0.5``, ``eps=1e-8``), except:
  rows are visited in index order rather than a random one (a step is then a
  deterministic function of its inputs; TorchJD's weights are the same when
  ``torch.randperm`` returns the identity), and ``eps`` is relative to the
  group's Gram matrix trace rather than absolute (the correction does not
  then depend on the gradients' scale). The paper uses ``beta=0.01``.

  Args:
    reg_weight: :math:`\lambda`, as for :func:`dtnh_jax.dtnh`.
    beta: the moving average's rate, in [0, 1] (may be traced).
    eps: added to the denominators, >= 0 (may be traced).
    granularity: as for :func:`dtnh_jax.dtnh`.
    unprojected: as for :func:`dtnh_jax.dtnh` (``d = g + R`` there).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``dtnh``'s update
    contract; its state is a :class:`GradVacState`.

  References:
    Wang, Tsvetkov, Firat, Cao, `Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021.
  """
  if not isinstance(beta, jax.core.Tracer) and not 0 <= float(np.asarray(beta)) <= 1:
    raise ValueError(f"gradvac: beta must be in [0, 1], got {float(np.asarray(beta))}.")
  _gram.check_nonnegative("gradvac", "eps", eps)

  def init_state(params, num_regularizers, single):
    groups = _gram.groups_of("gradvac", params, granularity, unprojected)
    rows = num_regularizers + 1
    return GradVacState(count=jnp.zeros([], jnp.int32), diagnostics=Diagnostics.zeros(num_regularizers, single),
                        target_cosine=jnp.zeros((groups, rows, rows), jnp.float32))

  def row_weights(gram, state):
    if state.target_cosine.shape != gram.shape:
      raise ValueError(
          f"gradvac: the state holds target cosines of shape {state.target_cosine.shape} (groups, rows, rows) "
          f"but this step has {gram.shape}; call init with parameters of the structure given to update.")
    weights, target = gradvac_weights(gram, state.target_cosine, beta, eps)
    return weights, state._replace(target_cosine=target.astype(state.target_cosine.dtype))

  return _gram.aggregator("gradvac", reg_weight, row_weights, granularity=granularity, unprojected=unprojected,
                          init_state=init_state)
