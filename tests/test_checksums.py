"""``dtnh_jax.checksums``: the sums computed with NumPy on the host equal those of the jitted program on the device,
for every kind of array a checkpoint holds; a tree summed either way verifies against the other's record."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dtnh_jax import checksums

RNG = np.random.default_rng(0)
ARRAYS = {  # one array of each element width and kind, odd sizes (no block of the reduction divides them)
    "float32": RNG.normal(size=(3, 5, 7)).astype(np.float32),
    "bfloat16": RNG.normal(size=(11,)).astype(ml_dtypes.bfloat16),
    "float16": RNG.normal(size=(2, 9)).astype(np.float16),
    "int8": RNG.integers(-128, 128, size=(13,)).astype(np.int8),
    "uint16": RNG.integers(0, 2**16, size=(5, 3)).astype(np.uint16),
    "int32": RNG.integers(-2**31, 2**31, size=(4, 4)).astype(np.int32),
    "bool": RNG.integers(0, 2, size=(6,)).astype(bool),
    "scalar": np.float32(-2.5),
    "empty": np.zeros((0, 3), np.float32),
    "large": RNG.normal(size=(70_000,)).astype(np.float32),  # the (i + 1)-weighted sum wraps around 2^32
}


def _as_leaves(kind: str):
  """The arrays as a tree whose leaves are of ``kind``: NumPy arrays, or JAX arrays on the default device."""
  tree = dict(ARRAYS)
  if kind == "jax":
    tree = {name: jnp.asarray(value) for name, value in tree.items()}
    tree["key"] = jax.random.key(3)
    tree["keys"] = jax.random.split(jax.random.key(4), 5)
  return tree


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_host_and_device_sums_are_the_same(kind):
  tree = _as_leaves(kind)
  on_device = checksums.tree_checksums(tree, on_device=True)
  assert checksums.tree_checksums(tree, on_device=False) == on_device
  assert checksums.tree_checksums(tree) == on_device
  assert len(set(on_device.values())) == len(on_device)  # no two arrays happen to share their sums


def test_host_and_device_sums_of_64_bit_arrays_are_the_same():
  """With ``jax_enable_x64`` each 64-bit element is two 32-bit words, in the same order on both paths."""
  with jax.enable_x64(True):
    tree = {"float64": RNG.normal(size=(3, 7)), "int64": RNG.integers(-2**62, 2**62, size=(5,)),
            "on_device": jnp.asarray(RNG.normal(size=(9,)))}
    assert checksums.tree_checksums(tree, on_device=False) == checksums.tree_checksums(tree, on_device=True)


def test_64_bit_host_arrays_are_summed_as_the_device_would_hold_them_without_x64():
  """float64 NumPy arrays become float32 on a device without ``jax_enable_x64``; the host path reads them so too,
  so a record written by either path verifies with the other."""
  tree = {"float64": RNG.normal(size=(3, 7)), "int64": RNG.integers(-2**40, 2**40, size=(5,))}
  assert checksums.tree_checksums(tree, on_device=False) == checksums.tree_checksums(tree, on_device=True)


def test_a_record_from_either_path_catches_one_changed_element_on_the_other():
  tree = _as_leaves("jax")
  changed = {**tree, "int32": tree["int32"].at[2, 1].add(1)}
  assert checksums.mismatches(changed, checksums.tree_checksums(tree, on_device=True)) == ["int32"]
  assert checksums.mismatches(jax.device_put(changed), checksums.tree_checksums(tree, on_device=False)) == ["int32"]
