"""Checksums of pytrees of arrays, to tell a saved array from a damaged one.

Each array's elements are read as unsigned integers of their own width and
reduced, on the device that holds the array (sharded arrays included), to
two 32-bit sums that wrap around:

    s1 = Σ_i u_i                 s2 = Σ_i (i + 1) · u_i        (mod 2^32)

A change of any single element changes ``s1`` (its bits differ by less than
2^32), and ``s2`` catches swapped or shifted elements. This detects flipped
bytes and truncated or misplaced data; it is not a cryptographic hash. Only
the two sums travel to the host, so a checkpoint of any size costs one pass
over its arrays on the device, no copy. Arrays that are already in host memory
(NumPy arrays, and JAX arrays on the CPU backend that this process holds
whole) are summed with NumPy where they lie, to the same values: a jitted
reduction over a tree of hundreds of leaves is compiled once per tree
structure and process, which costs far more than reading the arrays once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "mismatches",
    "tree_checksums",
]

# Unsigned type of each element width (64-bit values are read as two 32-bit words).
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
_HOST_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as a flat vector of uint32 (one word per element of width <= 4)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize
  if width == 8:  # only with jax_enable_x64: two words per element
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[width]).astype(jnp.uint32).reshape(-1)


@jax.jit
def _sums(leaves: list[jax.Array]) -> jax.Array:
  def one(x):
    words = _words(x)
    index = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * index, dtype=jnp.uint32)])
  return jnp.stack([one(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def _host_sums(leaf) -> np.ndarray:
  """``_sums``'s row of one array, with NumPy on the host (the array in host memory, or copied there)."""
  if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  x = np.ascontiguousarray(leaf)
  x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)  # as jnp.asarray: float64 -> float32 without x64
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  # little-endian words, as XLA's bitcast of a 64-bit element gives them: low word first
  words = x.view(_HOST_UNSIGNED[x.dtype.itemsize]).astype(np.uint32, copy=False).reshape(-1)
  index = np.arange(1, words.size + 1, dtype=np.uint32)
  return np.array([np.sum(words, dtype=np.uint32), np.sum(words * index, dtype=np.uint32)], np.uint32)


def _in_host_memory(leaf) -> bool:
  """A NumPy array, or a JAX array on the CPU backend that this process holds whole."""
  if not isinstance(leaf, jax.Array):
    return True
  return leaf.is_fully_addressable and all(device.platform == "cpu" for device in leaf.sharding.device_set)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_checksums(tree: Any, *, on_device: bool | None = None) -> dict[str, str]:
  """``{"params/conv1/kernel": "shape dtype s1 s2", ...}`` for every array leaf of ``tree``.

  JSON-ready (store it beside the arrays); compare with :func:`mismatches`.
  Leaves that are not arrays (``None``, Python scalars) are skipped.

  Args:
    tree: a pytree of JAX and NumPy arrays.
    on_device: where the sums are computed; both give the same values. ``None`` (the default): with NumPy for
      the arrays in host memory (NumPy arrays, JAX arrays on the CPU that this process holds whole), in one
      jitted program on their devices for the others (accelerators, arrays sharded over several processes).
      ``True``: every array in the jitted program (host arrays on the default device); ``False``: every array
      with NumPy (JAX arrays copied to the host; not for arrays sharded over several processes).
  """
  named = [(_path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
           if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]
  on_host = [_in_host_memory(leaf) if on_device is None else not on_device for _, leaf in named]
  rows = [_host_sums(leaf) if host else None for (_, leaf), host in zip(named, on_host)]
  device = [index for index, host in enumerate(on_host) if not host]
  if device:
    sums = _sums([jnp.asarray(named[index][1]) for index in device])
    if not sums.is_fully_addressable:  # inputs sharded over several processes: the sums are replicated
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      sums = multihost_utils.process_allgather(sums, tiled=True)
    for index, row in zip(device, np.asarray(jax.device_get(sums))):
      rows[index] = row
  return {name: _describe(leaf, row) for (name, leaf), row in zip(named, rows)}


def _describe(leaf, row) -> str:
  dtype = leaf.dtype
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    dtype = jax.random.key_data(leaf).dtype
  shape = "x".join(map(str, np.shape(leaf))) or "scalar"
  return f"{shape} {np.dtype(dtype).name} {int(row[0]):08x} {int(row[1]):08x}"


def mismatches(tree: Any, expected: dict[str, str]) -> list[str]:
  """Names of the arrays of ``tree`` whose checksum differs from ``expected`` (or that are missing in
  one of the two), in order; empty when ``tree`` is what was checksummed."""
  actual = tree_checksums(tree)
  names = list(dict.fromkeys([*expected, *actual]))
  return [name for name in names if actual.get(name) != expected.get(name)]

