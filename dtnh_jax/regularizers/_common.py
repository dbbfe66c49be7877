"""What the regularizer modules share: the pytree alias, the default layers and the argument checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import names

PyTree = Any

DEFAULT_LAYERS = names.DEFAULT_FEATURE_LAYERS
"""The four ResNet stage outputs: KnowDist's and DELTA's default layers."""


def _check_nonnegative(caller: str, name: str, value) -> None:
  """Rejects negative weights when they are known in Python (not under ``jit``)."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.number):
    raise TypeError(f"{caller}: {name} must be a number, got {value!r}.")
  if np.any(array < 0):
    raise ValueError(f"{caller}: {name} must be >= 0, got {value!r}.")


def _accumulate(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _as_layers(layers, caller: str) -> tuple[str, ...]:
  if isinstance(layers, str):
    layers = (layers,)
  layers = tuple(layers)
  if not layers:
    raise ValueError(f"{caller}: layers is empty; name at least one feature map, e.g. {DEFAULT_LAYERS}.")
  return layers


def _check_layers(features: Mapping[str, Any], layers: Sequence[str], caller: str, what: str = "the features") -> None:
  if not isinstance(features, Mapping):
    raise TypeError(
        f"{caller}: {what} must be a dict of feature maps (as returned by "
        f"model.apply(..., return_features=True)); got {type(features).__name__}."
    )
  unknown = [layer for layer in layers if layer not in features]
  if unknown:
    raise ValueError(
        f"{caller}: unknown layer(s) {unknown} in layers; {what} hold {sorted(features)}."
    )
