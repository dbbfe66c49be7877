"""Candidate corrections for "never hurts at any λ", with ``dtnh``'s update contract.

DTNH (and PCGrad, GradVac) reshape only the regularizer gradient's component
along the current minibatch's ``g``; the pull towards the source orthogonal
to ``g`` stays whole, and in expectation over minibatches DTNH removes the
conflicting pull along at most one direction. Each candidate here takes the
same inputs as :func:`dtnh_jax.dtnh` (the tuple ``(g, r_1, ..., r_k)`` or ``g``
with ``regularizer_grads=``; ``reg_weight`` floats or schedules;
``granularity``; ``unprojected``) and keeps DTNH's
:class:`~dtnh_jax.Diagnostics` of its direction in its state, beside
``removed_fraction`` (:class:`CorrectionState`):

- :func:`subspace_projection`: ``r`` loses its components against ``g`` along
  an orthonormal basis of the last ``memory`` gradients (OGD/GEM's memory);
  ``⟨d, g⟩ ≥ |g|²``; ``memory=1`` is DTNH;
- :func:`ema_projection`: ``r`` projected against the moving average of ``g``
  (A-GEM's rule with the persistent direction as the reference), optionally
  also against the current ``g`` (GEM's cone with both); ``decay=0`` is DTNH;
- :func:`share_bound`: the regularizer's part of the step bounded by
  ``κ |g|``, on ``g + λ r`` or after DTNH's projection.

Without conflict (and, for the bound, below ``κ |g|``) each gives ``g + Σ λ_i r_i``.
"""

from dtnh_jax.corrections._common import CorrectionState
from dtnh_jax.corrections._ema import EMAState, cone_multipliers, ema_projection
from dtnh_jax.corrections._share_bound import share_bound, share_scales
from dtnh_jax.corrections._subspace import NEW_DIRECTION_TOLERANCE, SubspaceState, subspace_projection, subspace_weights

__all__ = [
    "cone_multipliers",
    "CorrectionState",
    "CORRECTIONS",
    "ema_projection",
    "EMAState",
    "NEW_DIRECTION_TOLERANCE",
    "share_bound",
    "share_scales",
    "subspace_projection",
    "subspace_weights",
    "SubspaceState",
]

#: The candidates' names, each the name of its factory here (``getattr(dtnh_jax.corrections, name)``).
CORRECTIONS = ("subspace_projection", "ema_projection", "share_bound")
