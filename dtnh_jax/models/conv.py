"""Convolutions whose formulation is chosen per layer shape and backend from measurements.

One convolution can be computed several ways that give the same numbers (to
float32 rounding) from the same HWIO kernel; which is fastest depends on the
layer and the machine:

* ``"xla"``: ``lax.conv_general_dilated``, XLA's convolution.
* ``"im2col"``: the ``kh * kw`` strided windows of the padded input
  concatenated on the channel axis (:func:`patches`), then one matmul with the
  kernel reshaped to ``(kh * kw * C_in, C_out)`` (a 1x1 convolution is a
  strided slice and a matmul). Its backward pass is two more matmuls, the
  kernel's gradient contracting the patches with the cotangent over the
  pixels, the input's scattering ``cotangent @ kernel^T`` back through the
  windows.
* ``"taps"``: XLA's convolution forward and for the input's gradient, the
  kernel's gradient one contraction per kernel position ("tap"): the strided
  window of the input that position multiplies (:func:`windows`) with the
  cotangent, over the batch and the pixels. XLA:CPU computes the kernel's
  gradient of a convolution with large maps as a convolution over the whole
  map, at a fraction of the speed of its forward pass; the taps are matmuls.
* ``"shifted"``, for depthwise convolutions (``feature_group_count`` equal to
  the input channels, one output channel per input channel): the sum over the
  kernel positions of a strided window of the padded input (:func:`windows`)
  times that position's weights.

On GPUs and TPUs XLA's convolution calls the vendor's kernels and stays. On
XLA:CPU it runs large maps with few channels at matmul speed, but small maps
with many channels, 1x1 and strided layers, and grouped convolutions well
below it. The choice is made while tracing, from static shapes only (nothing
is measured inside ``jit``): :func:`choose` takes the formulation measured
fastest, forward and backward pass together, for the nearest layer shape in a
table measured once per backend by ``benchmarks/conv_formulations.py`` and
shipped beside this module (``conv_table.json``, with its host, date and
command). On the CPU the instruction set changes which is fastest (XLA:CPU's
convolution and its matmuls take other paths with AVX-512 than with AVX2), so
the CPU has one table per instruction set (:func:`table_key`); a CPU whose
instruction set the file has not measured takes its first CPU table's choices.
A backend the table does not cover gets ``"xla"``.

Every formulation computes with the same ``(kh, kw, C_in / groups, C_out)``
kernel under the same parameter name as ``flax.linen.Conv``: the choice changes
no parameter, no initial value and no checkpoint. To choose by hand, give
:class:`Conv` a ``formulation``, trace under :func:`force`::

  with conv.force("xla"):
    compiled = jax.jit(train_step).lower(state, batch).compile()

or set the environment variable ``DTNH_JAX_CONV`` (e.g. ``DTNH_JAX_CONV=xla
dtnh-train ...``). Both act when a function is traced: a jitted function
already traced for these shapes keeps its program (trace a new ``jax.jit``).
``"im2col"``, ``"taps"`` and ``"shifted"`` have hand-written backward passes: reverse-mode
differentiation (``jax.grad``, ``jax.vjp``, also under ``jax.vmap``) works,
forward mode (``jax.jvp``) needs ``"xla"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.resources
import json
import math
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "FORMULATIONS",
    "MARGIN",
    "TABLE_FILE",
    "Conv",
    "applicable",
    "choose",
    "choose_from",
    "conv",
    "force",
    "forced",
    "layer_kind",
    "load_table",
    "patches",
    "table_key",
    "table_layers",
    "windows",
]

#: Every formulation, in the order the table lists them.
FORMULATIONS = ("xla", "im2col", "taps", "shifted")
#: The measured table shipped with the package (``benchmarks/conv_formulations.py --write`` regenerates it).
TABLE_FILE = "conv_table.json"
#: Another formulation is chosen only if its measured time over XLA's is below this, with its 95% interval below 1
#: (the noise of the measurements; ``benchmarks/conv_formulations.py`` applies it when it writes the table).
MARGIN = 0.97
#: Forces a formulation, as :func:`force` does, in every process that sees it (``xla``, ``im2col``, ``shifted``).
ENVIRONMENT_VARIABLE = "DTNH_JAX_CONV"

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("dtnh_jax_conv_formulation", default=None)
_TABLE_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("dtnh_jax_conv_table_key", default=None)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  first, second = value
  return int(first), int(second)


def _explicit_padding(padding: str | Sequence[tuple[int, int]], spatial_shape: Sequence[int],
                      kernel_hw: tuple[int, int], strides: tuple[int, int]) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(tuple(spatial_shape), kernel_hw, strides, padding))
  return tuple((int(low), int(high)) for low, high in padding)


def layer_kind(in_channels: int, kernel_shape: Sequence[int], feature_group_count: int = 1) -> str:
  """``"dense"``, ``"depthwise"`` (one output channel per input channel) or ``"grouped"`` (any other)."""
  if feature_group_count == 1:
    return "dense"
  if feature_group_count == in_channels and kernel_shape[-2] == 1 and kernel_shape[-1] == in_channels:
    return "depthwise"
  return "grouped"


def applicable(in_channels: int, kernel_shape: Sequence[int], feature_group_count: int = 1) -> tuple[str, ...]:
  """The formulations that compute a convolution with this kernel (HWIO) and grouping."""
  return {"dense": ("xla", "im2col", "taps"), "depthwise": ("xla", "shifted"), "grouped": ("xla",)}[
      layer_kind(in_channels, kernel_shape, feature_group_count)]


# ----------------------------------------------------------------------------
# The measured table and the choice.


@functools.lru_cache(maxsize=None)
def load_table(path: str | None = None) -> Mapping[str, Any]:
  """The measured table: the shipped ``conv_table.json``, or the JSON file at ``path``.

  ``{"measured": ..., "backends": {key: {"host", "date", "jax", "command", "repeats", "margin", "layers":
  [entry, ...]}}}``, one record per :func:`table_key` measured, each entry a layer shape (``kind``, ``kernel``,
  ``stride``, ``batch``, ``out_hw``, ``in_channels``, ``out_channels``, ``input_gradient``: whether the
  measurement includes the input's gradient, which a model's first layer does not need), the median ms of each
  applicable formulation's forward and backward pass (``ms``) and the ``choice`` (the fastest, with ``MARGIN``).
  """
  if path is None:
    text = importlib.resources.files(__package__).joinpath(TABLE_FILE).read_text()
  else:
    with open(path, encoding="utf-8") as file:
      text = file.read()
  return json.loads(text)


@functools.lru_cache(maxsize=None)
def _cpu_instruction_set() -> str:
  machine = platform.machine().lower()
  if machine not in ("x86_64", "amd64"):
    return machine or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as file:
      flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
  except OSError:
    flags = []
  return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "x86_64"


def table_key(backend: str | None = None) -> str:
  """The table's key for ``backend`` (``jax.default_backend()``) on this machine.

  The backend's name, and on the CPU its instruction set too: ``"cpu-avx512"``, ``"cpu-avx2"``, ``"cpu-x86_64"``
  (an x86 CPU with neither, or whose flags cannot be read), ``"cpu-arm64"``/``"cpu-aarch64"`` (the machine's name).
  Inside :func:`choose_from`, on the CPU, the key it names.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return backend
  return _TABLE_KEY.get() or f"cpu-{_cpu_instruction_set()}"


def table_layers(table: Mapping[str, Any] | None = None, key: str | None = None) -> Sequence[Mapping[str, Any]]:
  """The measured layers :func:`choose` reads for ``key`` (:func:`table_key`'s) in ``table`` (:func:`load_table`'s):
  that key's, or for a CPU key the file does not have its first CPU table's; ``()`` where there is none."""
  table = load_table() if table is None else table
  key = table_key() if key is None else key
  backends = table.get("backends", {})
  record = backends.get(key)
  if record is None and key.startswith("cpu"):   # an instruction set not measured: the first CPU table's choices
    record = next((value for name, value in backends.items() if name.startswith("cpu")), None)
  return () if record is None else record["layers"]


def _features(kernel_hw, strides, batch, out_hw, in_channels, out_channels) -> tuple[float, ...]:
  # where the formulations' speeds cross: the work per output pixel (k² C_in C_out) against the pixels per call;
  # the kernel and stride weigh most (another kernel or stride is another computation)
  log = lambda value: math.log2(max(value, 1))
  return (4 * log(kernel_hw[0] * kernel_hw[1]), 4 * log(strides[0] * strides[1]), log(batch),
          log(out_hw[0] * out_hw[1]), log(in_channels), log(out_channels))


def _nearest(entries, kind: str, features: tuple[float, ...]) -> Mapping[str, Any] | None:
  best, best_distance = None, math.inf
  for entry in entries:
    if entry["kind"] != kind:
      continue
    distance = math.dist(features, _features(_pair(entry["kernel"]), _pair(entry["stride"]), entry["batch"],
                                             _pair(entry["out_hw"]), entry["in_channels"], entry["out_channels"]))
    if distance < best_distance:
      best, best_distance = entry, distance
  return best


def choose(input_shape: Sequence[int], kernel_shape: Sequence[int], strides: int | Sequence[int] = 1,
           padding: str | Sequence[tuple[int, int]] = "VALID", feature_group_count: int = 1,
           backend: str | None = None, table: Mapping[str, Any] | None = None) -> str:
  """The formulation for a convolution of an NHWC input with an HWIO kernel, from static shapes only.

  A formulation forced with :func:`force` (or else by ``DTNH_JAX_CONV``) if it applies to this layer; else
  the choice of the nearest layer of the same kind (dense, depthwise) measured on ``backend``
  (``jax.default_backend()``; on the CPU, this machine's instruction set: :func:`table_key`) in ``table``
  (:func:`load_table`'s); ``"xla"`` where the table has none. The
  distance is taken in log scale over the kernel size and stride (weighted most), the batch, the output
  pixels and the channels.
  """
  candidates = applicable(input_shape[-1], kernel_shape, feature_group_count)
  by_hand = forced()
  if by_hand in candidates:
    return by_hand
  kernel_hw, strides = tuple(kernel_shape[:2]), _pair(strides)
  padding = _explicit_padding(padding, input_shape[1:3], kernel_hw, strides)
  out_hw = tuple((size + low + high - k) // s + 1
                 for size, (low, high), k, s in zip(input_shape[1:3], padding, kernel_hw, strides))
  table = load_table() if table is None else table
  entries = table_layers(table, backend if backend and backend.startswith("cpu-") else table_key(backend))
  entry = _nearest(entries, layer_kind(input_shape[-1], kernel_shape, feature_group_count),
                   _features(kernel_hw, strides, input_shape[0], out_hw, input_shape[-1], kernel_shape[-1]))
  if entry is None or entry["choice"] not in candidates:
    return "xla"
  return entry["choice"]


def forced() -> str | None:
  """The formulation forced here: :func:`force`'s while tracing inside it, else ``DTNH_JAX_CONV``'s, else ``None``.

  Other layers whose formulations are chosen by measurement (the ResNets' max-pool,
  :mod:`~dtnh_jax.models.pool`) follow it too, where it names one of theirs.
  """
  value = _FORCED.get()
  if value is None:
    value = os.environ.get(ENVIRONMENT_VARIABLE) or None
    if value is not None and value not in FORMULATIONS:
      raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r} is not a formulation; set one of {FORMULATIONS} or unset "
                       "it.")
  return value


@contextlib.contextmanager
def _while_set(variable: contextvars.ContextVar, value: Any) -> Iterator[None]:
  token = variable.set(value)
  try:
    yield
  finally:
    variable.reset(token)


def force(formulation: str | None) -> contextlib.AbstractContextManager[None]:
  """While tracing inside this block, every convolution that ``formulation`` can compute uses it.

  The others (e.g. the dense layers under ``force("shifted")``) and layers whose :class:`Conv` names its own
  ``formulation`` keep theirs. ``None`` restores the measured choice.
  """
  if formulation is not None and formulation not in FORMULATIONS:
    raise ValueError(f"formulation must be one of {FORMULATIONS} or None, got {formulation!r}.")
  return _while_set(_FORCED, formulation)


def choose_from(key: str | None) -> contextlib.AbstractContextManager[None]:
  """While tracing inside this block, CPU layers choose from the table measured for ``key`` (e.g.
  ``"cpu-avx512"`` on an AVX2 machine: what that machine's choices compute here); ``None``: this machine's.

  For comparisons (``benchmarks/peer_torch.py --conv-formulations auto,table:cpu-avx512``); :func:`force` and a
  layer's own ``formulation`` still win.
  """
  if key is not None and not key.startswith("cpu-"):
    raise ValueError(f"key must name a CPU table ('cpu-avx512', 'cpu-avx2', ...) or be None, got {key!r}.")
  return _while_set(_TABLE_KEY, key)


# ----------------------------------------------------------------------------
# The formulations.


def _pad(x: jax.Array, padding, interior=(0, 0), value: float = 0.0) -> jax.Array:
  """Padding of the spatial axes of NHWC ``x`` with ``value`` (negative amounts crop, ``interior`` dilates)."""
  (top, bottom), (left, right) = padding
  return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (top, bottom, interior[0]),
                                                  (left, right, interior[1]), (0, 0, 0)))


def windows(x: jax.Array, kernel_hw: int | Sequence[int], strides: int | Sequence[int] = 1,
            padding: str | Sequence[tuple[int, int]] = "VALID", pad_value: float = 0.0) -> list[jax.Array]:
  """For every kernel position ``(i, j)``, row-major, the strided window of padded NHWC ``x`` it multiplies.

  Each window is ``(N, H', W', C)``, the convolution's output size; ``Σ_ij windows[i * kw + j] @ kernel[i, j]``
  is the convolution with an HWIO ``kernel``. The padding is zeros, or ``pad_value`` (a max-pool's ``-inf``).
  """
  kernel_hw, strides = _pair(kernel_hw), _pair(strides)
  padding = _explicit_padding(padding, x.shape[1:3], kernel_hw, strides)
  return _windows(_pad(x, padding, value=pad_value), kernel_hw, strides,
                  _out_hw(x.shape[1:3], kernel_hw, strides, padding))


def patches(x: jax.Array, kernel_hw: int | Sequence[int], strides: int | Sequence[int] = 1,
            padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
  """``(N, H', W', kh * kw * C)``: the :func:`windows` concatenated on the channel axis.

  The position-major order of an HWIO kernel's rows: ``patches(x, ...) @ kernel.reshape(-1, C_out)`` is the
  convolution.
  """
  windows_ = windows(x, kernel_hw, strides, padding)
  return windows_[0] if len(windows_) == 1 else jnp.concatenate(windows_, axis=-1)


def _windows(padded: jax.Array, kernel_hw, strides, out_hw) -> list[jax.Array]:
  batch, _, _, channels = padded.shape
  return [lax.slice(padded, (0, i, j, 0),
                    (batch, i + (out_hw[0] - 1) * strides[0] + 1, j + (out_hw[1] - 1) * strides[1] + 1, channels),
                    (1, strides[0], strides[1], 1))
          for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


def _accumulation(dtype) -> Any:
  # products of low-precision values are summed in float32 (as XLA's convolution does) and rounded once
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else None


def _matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """``patches @ kernel`` reshaped to ``(kh * kw * C_in, C_out)``, in the patches' dtype."""
  matrix = kernel.reshape(-1, kernel.shape[-1])
  out = lax.dot_general(patches, matrix, (((3,), (0,)), ((), ())), preferred_element_type=_accumulation(patches.dtype))
  return out.astype(patches.dtype)


def _out_hw(in_hw, kernel_hw, strides, padding) -> tuple[int, int]:
  return tuple((size + low + high - k) // s + 1 for size, k, s, (low, high) in zip(in_hw, kernel_hw, strides, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _im2col_conv(x, kernel, strides, padding, in_hw):
  # in_hw, x's height and width (static), lets the backward pass scatter into x's shape without keeping x
  del in_hw
  return _matmul(patches(x, kernel.shape[:2], strides, padding), kernel)


def _im2col_forward(x, kernel, strides, padding, in_hw):
  del in_hw
  # the residuals are the patches (as JAX's own differentiation keeps them; recomputed in the backward pass they
  # cost a copy of k² inputs per pull-back, and DTNH's steps pull back twice) and the kernel
  windows_of_x = patches(x, kernel.shape[:2], strides, padding)
  return _matmul(windows_of_x, kernel), (windows_of_x, kernel)


def _im2col_backward(strides, padding, in_hw, residuals, cotangent):
  # JAX's own transpose of the forward pass computes the same two matmuls, but XLA:CPU lays the kernel's out
  # as a transposed copy of the cotangent and a generic dot: 3-4x slower for a 1x1 convolution
  # (benchmarks/conv_formulations.py, candidate "im2col-autodiff"). Contracting the patches and the cotangent
  # over their leading (pixel) axes as they are runs at matmul speed.
  windows_of_x, kernel = residuals
  x = jax.ShapeDtypeStruct((cotangent.shape[0], *in_hw, kernel.shape[2]), windows_of_x.dtype)
  scatter = jax.linear_transpose(lambda x: patches(x, kernel.shape[:2], strides, padding), x)
  kernel_grad = lax.dot_general(windows_of_x, cotangent, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                preferred_element_type=jnp.promote_types(windows_of_x.dtype, jnp.float32))
  matrix = kernel.reshape(-1, kernel.shape[-1]).astype(cotangent.dtype)
  windows_grad = lax.dot_general(cotangent, matrix, (((3,), (1,)), ((), ())),
                                 preferred_element_type=_accumulation(cotangent.dtype)).astype(windows_of_x.dtype)
  # the input's gradient: each window's gradient added back where the window came from (JAX's transpose of the
  # slices and the concatenation: padded copies, summed)
  input_grad, = scatter(windows_grad)
  return input_grad, kernel_grad.reshape(kernel.shape).astype(kernel.dtype)


_im2col_conv.defvjp(_im2col_forward, _im2col_backward)


def _xla_conv(x, kernel, strides, padding, feature_group_count=1):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS,
                                  feature_group_count=feature_group_count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _taps_conv(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _taps_forward(x, kernel, strides, padding):
  # the residuals XLA's own differentiation keeps: the input (for the kernel's gradient) and the kernel
  return _taps_conv(x, kernel, strides, padding), (x, kernel)


def _taps_backward(strides, padding, residuals, cotangent):
  x, kernel = residuals
  # the input's gradient as XLA differentiates its convolution (a convolution of the cotangent with the flipped
  # kernel); a train step that does not differentiate the input (a model's first layer) drops it unused
  _, pullback = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)
  input_grad, = pullback(cotangent)
  # the kernel's: per position (i, j), the window of x it multiplied contracted with the cotangent over the batch
  # and the pixels, a (C_in, C_out) matmul; float32 sums for low-precision inputs, as XLA's convolution.
  # XLA:CPU's matmul wants its first operand's contracted (pixel) axis minor, so it transposes that operand: the
  # windows (one copy per position) where they have fewer channels than the cotangent, else the cotangent once,
  # as the first operand of k² (C_out, C_in) matmuls (measured both ways: benchmarks/RESULTS.md, "The kernel's
  # gradient as matmuls").
  accumulation = jnp.promote_types(x.dtype, jnp.float32)
  contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
  windows_of_x = windows(x, kernel.shape[:2], strides, padding)
  if x.shape[-1] < cotangent.shape[-1]:
    taps = jnp.stack([lax.dot_general(window, cotangent, contract, preferred_element_type=accumulation)
                      for window in windows_of_x])
  else:
    taps = jnp.swapaxes(jnp.stack([lax.dot_general(cotangent, window, contract, preferred_element_type=accumulation)
                                   for window in windows_of_x]), 1, 2)
  return input_grad, taps.reshape(kernel.shape).astype(kernel.dtype)


_taps_conv.defvjp(_taps_forward, _taps_backward)


def _windows_sum(padded: jax.Array, kernel: jax.Array, strides, out_hw) -> jax.Array:
  """Σ over kernel positions (i, j) of the strided window of ``padded`` at (i, j) times ``kernel[i, j, 0]``."""
  windows = _windows(padded, kernel.shape[:2], strides, out_hw)
  taps = kernel.reshape(-1, kernel.shape[-1])
  out = None
  for index, window in enumerate(windows):
    term = window * taps[index]
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_conv(x, kernel, strides, padding):
  out_hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding)
  return _windows_sum(_pad(x, padding), kernel, strides, out_hw)


def _shifted_forward(x, kernel, strides, padding):
  return _shifted_conv(x, kernel, strides, padding), (x, kernel)


def _shifted_backward(strides, padding, residuals, cotangent):
  # Written out rather than left to autodiff, whose transpose of each strided slice is a padded copy of the
  # cotangent: the train step was slower that way (benchmarks/depthwise.py, "shifted-autodiff").
  x, kernel = residuals
  _, height, width, _ = x.shape
  kernel_hw = kernel.shape[:2]
  out_hw = cotangent.shape[1:3]
  # y[o] = Σ_i x_padded[o·stride + i]·w[i], so the input's gradient is dx[h] = Σ_i' c[h + i']·w[k - 1 - i']:
  # a stride-1 correlation with the flipped kernel of c, the cotangent dilated by the stride and padded to
  # height + k - 1 (negative paddings crop).
  dilation = tuple(s - 1 for s in strides)
  dilated_padding = tuple((k - 1 - low, size + low - (out - 1) * s - 1)
                          for k, (low, _), size, out, s in zip(kernel_hw, padding, (height, width), out_hw, strides))
  input_grad = _windows_sum(_pad(cotangent, dilated_padding, dilation), kernel[::-1, ::-1], (1, 1), (height, width))
  # The kernel's: per position, the window it multiplied times the cotangent, summed over batch and pixels.
  accumulation = jnp.promote_types(x.dtype, jnp.float32)
  taps = [jnp.sum(window * cotangent, axis=(0, 1, 2), dtype=accumulation)
          for window in _windows(_pad(x, padding), kernel_hw, strides, out_hw)]
  kernel_grad = jnp.stack(taps).reshape(kernel.shape)
  return input_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


_shifted_conv.defvjp(_shifted_forward, _shifted_backward)


def conv(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int] = 1,
         padding: str | Sequence[tuple[int, int]] = "VALID", feature_group_count: int = 1,
         formulation: str | None = None) -> jax.Array:
  """A convolution (cross-correlation, as every deep learning framework's) of NHWC ``x`` with an HWIO kernel.

  Args:
    x: ``(N, H, W, C_in)``.
    kernel: ``(kh, kw, C_in / feature_group_count, C_out)``.
    strides: one stride for both spatial axes, or ``(stride_h, stride_w)``.
    padding: ``((top, bottom), (left, right))``, or ``"SAME"`` / ``"VALID"`` (``lax.padtype_to_pads``).
    feature_group_count: groups of input channels (``C_in`` with ``C_out == C_in`` is depthwise).
    formulation: one of ``FORMULATIONS`` that applies to this layer (:func:`applicable`); ``None``:
      :func:`choose`.

  Returns:
    ``(N, H', W', C_out)`` in ``x``'s dtype, ``H' = (H + top + bottom - kh) // stride_h + 1``.
  """
  strides = _pair(strides)
  padding = _explicit_padding(padding, x.shape[1:3], tuple(kernel.shape[:2]), strides)
  if formulation is None:
    formulation = choose(x.shape, kernel.shape, strides, padding, feature_group_count)
  candidates = applicable(x.shape[-1], kernel.shape, feature_group_count)
  if formulation not in candidates:
    raise ValueError(f"formulation must be one of {candidates} for this convolution (kernel {kernel.shape}, "
                     f"{feature_group_count} group(s)), got {formulation!r}.")
  if formulation == "im2col":
    return _im2col_conv(x, kernel, strides, padding, tuple(x.shape[1:3]))
  if formulation == "taps":
    return _taps_conv(x, kernel, strides, padding)
  if formulation == "shifted":
    return _shifted_conv(x, kernel, strides, padding)
  return _xla_conv(x, kernel, strides, padding, feature_group_count)


class Conv(nn.Module):
  """A bias-free 2-D convolution (NHWC) with ``flax.linen.Conv``'s ``kernel`` parameter, in any formulation.

  The parameter is ``kernel`` of shape ``(kh, kw, C_in / feature_group_count, features)`` initialized by
  ``kernel_init`` exactly as ``flax.linen.Conv(..., use_bias=False)`` does, so the two are interchangeable in a
  model's parameters and checkpoints.

  Attributes:
    features: output channels.
    kernel_size: ``k`` or ``(kh, kw)``.
    strides: ``s`` or ``(stride_h, stride_w)``.
    padding: ``((top, bottom), (left, right))`` or ``"SAME"``/``"VALID"``.
    feature_group_count: groups of input channels (the input channels for a depthwise convolution).
    formulation: one of ``FORMULATIONS``; ``None`` (default): :func:`choose`, from the shapes at trace time.
    dtype: the compute dtype; input and kernel are cast to it.
    param_dtype: the kernel's dtype.
    kernel_init: the kernel's initializer.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = "SAME"
  feature_group_count: int = 1
  formulation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_hw = _pair(self.kernel_size)
    kernel = self.param("kernel", self.kernel_init,
                        (*kernel_hw, x.shape[-1] // self.feature_group_count, self.features), self.param_dtype)
    return conv(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), self.strides, self.padding,
                self.feature_group_count, self.formulation)
