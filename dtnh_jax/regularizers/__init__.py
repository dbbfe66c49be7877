r"""Transfer regularizers Ω(ω, ω_s): L2, L2-SP, KnowDist and DELTA.

Each regularizer is a plain function of the parameters, or of the feature maps
the model returns; none of them touches an optimizer. Their gradients go to
:func:`dtnh_jax.dtnh` as the second element of the gradient tuple:

* parameter regularizers (:func:`l2`, :func:`l2_sp`) have closed-form
  gradients; :func:`l2_regularizer` and :func:`l2_sp_regularizer` wrap them in
  a :class:`dtnh_jax.ClosedFormRegularizer`, so :func:`dtnh_jax.split_value_and_grad`
  needs no backward pass for them;
* feature regularizers (:func:`feature_distance` for KnowDist, :func:`delta`)
  are returned by the loss function next to the empirical loss, from the same
  forward pass; the frozen source network runs one extra forward pass
  (:func:`source_features`) on the same batch.

Conventions shared by every function here:

* Parameter regularizers carry a factor 1/2 (``α/2 |w - w0|²``), as the
  L2-SP paper and both official codes (``tf.nn.l2_loss``, ``0.5 * norm**2``)
  do, so the gradient is ``α (w - w0)``. The DTNH paper's Eq. 2 writes no 1/2:
  with DTNH weight λ, the weight on ``|w - w0|²`` is ``λ α / 2`` here and
  ``λ_paper`` there.
* Leaves a regularizer does not count get an exact zero (``jnp.zeros_like``)
  in the closed-form gradient, never ``None``: the gradient then has the
  parameters' structure and equals ``jax.grad`` of the value leaf for leaf,
  and it can be added to the empirical gradient with ``jax.tree.map`` when
  DTNH is not used.
* Feature regularizers average over the batch (the 1/n of Eq. 3), so their
  weight does not depend on the batch size, like a mean cross-entropy.
* Sums accumulate in float32 (or wider); gradients keep each leaf's dtype.
"""

# PyTree, Path and Include (the signatures' type aliases) stay importable from here, outside __all__.
from dtnh_jax.regularizers._common import DEFAULT_LAYERS, PyTree  # noqa: F401
from dtnh_jax.regularizers.attention import (
    attention_from_loss_increase, channel_loss_increase, delta_channel_attention, fit_head, load_attention,
    save_attention)
from dtnh_jax.regularizers.feature import delta, feature_distance, source_features
from dtnh_jax.regularizers.parameter import (
    Include, Path, l2, l2_grad, l2_regularizer, l2_sp, l2_sp_grad, l2_sp_regularizer, l2_sp_roles)  # noqa: F401

__all__ = [
    "DEFAULT_LAYERS",
    "attention_from_loss_increase",
    "channel_loss_increase",
    "delta",
    "delta_channel_attention",
    "feature_distance",
    "fit_head",
    "l2",
    "l2_grad",
    "l2_regularizer",
    "l2_sp",
    "l2_sp_grad",
    "l2_sp_regularizer",
    "l2_sp_roles",
    "load_attention",
    "save_attention",
    "source_features",
]
