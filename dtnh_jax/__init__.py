"""dtnh_jax: DTNH ("Towards Making Deep Transfer Learning Never Hurt") for JAX.

The core is :func:`dtnh`, an ``optax`` gradient transformation that takes the
tuple ``(empirical_grad, regularizer_grad)``, or the empirical gradient with
``regularizer_grads=`` as an optax extra argument, and returns DTNH's descent
direction (:func:`multi_steps` accumulates both gradients over
micro-batches), and :func:`split_value_and_grad`, which computes both
gradients from one forward pass. The gradient-surgery family (:func:`pcgrad`,
:func:`gradvac`, :func:`mgda`, :func:`upgrad`, :func:`dualproj`,
:func:`cagrad`, from ``dtnh_jax.aggregators``) takes the same inputs. Models,
regularizers, data and training live in the submodules ``dtnh_jax.models``,
``dtnh_jax.regularizers``, ``dtnh_jax.data`` and ``dtnh_jax.train``, imported
on first use.
"""

import importlib

from dtnh_jax.accumulate import multi_steps
from dtnh_jax.aggregators import AggregatorState, GradVacState, cagrad, dualproj, gradvac, mgda, pcgrad, upgrad
from dtnh_jax.corrections import (CorrectionState, EMAState, SubspaceState, ema_projection, share_bound,
                                  subspace_projection)
from dtnh_jax.gradients import ClosedFormRegularizer, split_value_and_grad
from dtnh_jax.projection import Diagnostics
from dtnh_jax.transform import DTNHState, dtnh, projection_groups

__version__ = "0.1.0"

__all__ = [
    "AggregatorState",
    "cagrad",
    "ClosedFormRegularizer",
    "CorrectionState",
    "DTNHState",
    "Diagnostics",
    "dtnh",
    "dualproj",
    "ema_projection",
    "EMAState",
    "gradvac",
    "GradVacState",
    "mgda",
    "multi_steps",
    "pcgrad",
    "projection_groups",
    "share_bound",
    "split_value_and_grad",
    "subspace_projection",
    "SubspaceState",
    "upgrad",
]

_SUBMODULES = ("models", "regularizers", "data", "train", "cli")


def __getattr__(name):
  # Submodules pull in flax/tfds; load them only when asked for.
  if name in _SUBMODULES:
    return importlib.import_module(f"dtnh_jax.{name}")
  raise AttributeError(f"module 'dtnh_jax' has no attribute {name!r}")
