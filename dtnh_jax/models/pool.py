"""Max-pooling whose formulation is chosen per backend from measurements, as :mod:`~dtnh_jax.models.conv`'s.

Two formulations give the same values and the same gradients:

* ``"xla"``: ``lax.reduce_window`` with ``max`` (``flax.linen.max_pool``). Its gradient is XLA's
  select-and-scatter: on XLA:CPU a variadic window reduction over the values and four index arrays (one per
  axis), then a scatter.
* ``"shifted"``: the running maximum of the ``kh * kw`` strided windows of the ``-inf``-padded input
  (:func:`dtnh_jax.models.conv.windows`), which keeps, as an ``int8`` per output, the window position of the
  maximum. Its backward pass routes each output's cotangent to that position and adds the windows back where
  they came from (the transpose of the strided slices).

Both send an output's gradient to the *first* maximum of its window in row-major order, as XLA's
select-and-scatter and PyTorch's ``MaxPool2d`` do, so ties (frequent after a ReLU) are routed identically; where
windows overlap, an input's gradient sums those of the outputs it is the maximum of. A window holding a NaN
gives NaN (``lax.max``), its gradient to the first NaN.

On XLA:CPU ``"shifted"`` is the faster formulation (the ResNet stem's max-pool, forward and backward:
``benchmarks/RESULTS.md``, "Convolutions chosen per layer on the CPU"); on GPUs and TPUs ``"xla"`` stays. A
formulation forced with :func:`dtnh_jax.models.conv.force` or ``DTNH_JAX_CONV`` applies here too where it names
one of these (``force("xla")`` gives every layer XLA's own operation). ``"shifted"`` has a hand-written backward
pass: reverse-mode differentiation works (also under ``jax.vmap``), forward mode (``jax.jvp``) needs ``"xla"``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dtnh_jax.models import conv as conv_lib

__all__ = ["FORMULATIONS", "choose", "max_pool"]

#: Every formulation of the max-pool.
FORMULATIONS = ("xla", "shifted")


def choose(backend: str | None = None) -> str:
  """The max-pool's formulation: the one forced (:func:`dtnh_jax.models.conv.forced`) if it is one of
  ``FORMULATIONS``, else ``"shifted"`` on the CPU and ``"xla"`` on any other ``backend``
  (``jax.default_backend()``)."""
  by_hand = conv_lib.forced()
  if by_hand in FORMULATIONS:
    return by_hand
  return "shifted" if (backend or jax.default_backend()) == "cpu" else "xla"


def _window_max(x, window, strides, padding):
  # the window position of each maximum: one byte where the window has at most 127 positions (3x3: 9)
  index_type = jnp.int8 if window[0] * window[1] <= jnp.iinfo(jnp.int8).max else jnp.int32
  maximum, position = None, None
  for index, candidate in enumerate(conv_lib.windows(x, window, strides, padding, pad_value=-jnp.inf)):
    if maximum is None:
      maximum, position = candidate, jnp.zeros(candidate.shape, index_type)
      continue
    # strictly greater keeps the first maximum of a tie; a NaN takes the place once (lax.max propagates it)
    later = (candidate > maximum) | (jnp.isnan(candidate) & ~jnp.isnan(maximum))
    maximum, position = lax.max(maximum, candidate), jnp.where(later, jnp.asarray(index, index_type), position)
  return maximum, position


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _shifted_max_pool(x, window, strides, padding):
  return _window_max(x, window, strides, padding)[0]


def _shifted_forward(x, window, strides, padding):
  maximum, position = _window_max(x, window, strides, padding)
  return maximum, (position, jax.ShapeDtypeStruct(x.shape, x.dtype))


def _shifted_backward(window, strides, padding, residuals, cotangent):
  position, x = residuals
  zero = jnp.zeros((), cotangent.dtype)
  routed = [jnp.where(position == index, cotangent, zero) for index in range(window[0] * window[1])]
  # the transpose of the windows of the zero-padded input: each window's gradient added back where it came from
  scatter = jax.linear_transpose(lambda x: conv_lib.windows(x, window, strides, padding), x)
  return scatter(routed)


_shifted_max_pool.defvjp(_shifted_forward, _shifted_backward)


def max_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID", formulation: str | None = None) -> jax.Array:
  """The maximum of each window of NHWC ``x``, padded with ``-inf`` (``flax.linen.max_pool``'s values).

  Args:
    x: ``(N, H, W, C)``.
    window: ``k`` or ``(kh, kw)``.
    strides: ``s`` or ``(stride_h, stride_w)``; ``None``: 1.
    padding: ``((top, bottom), (left, right))``, or ``"SAME"`` / ``"VALID"``.
    formulation: one of ``FORMULATIONS``; ``None``: :func:`choose`.

  Returns:
    ``(N, H', W', C)``, ``H' = (H + top + bottom - kh) // stride_h + 1``.
  """
  window = (window, window) if isinstance(window, int) else tuple(window)
  strides = (1, 1) if strides is None else (strides, strides) if isinstance(strides, int) else tuple(strides)
  if isinstance(padding, str):
    padding = tuple(lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
  padding = tuple((int(low), int(high)) for low, high in padding)
  formulation = choose() if formulation is None else formulation
  if formulation not in FORMULATIONS:
    raise ValueError(f"formulation must be one of {FORMULATIONS} for a max-pool, got {formulation!r}.")
  if formulation == "shifted":
    return _shifted_max_pool(x, window, strides, padding)
  # a Python scalar identity lets JAX see the max monoid (differentiable), as flax.linen.max_pool gives it
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0)))
