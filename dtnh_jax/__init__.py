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
``dtnh_jax.regularizers``, ``dtnh_jax.data`` and ``dtnh_jax.train``.

Everything here is imported on first use (PEP 562's module ``__getattr__``,
as numpy and scipy do): ``import dtnh_jax.names`` and ``dtnh-train --help``
load no jax, and ``dtnh_jax.dtnh`` loads jax and optax only when it is used.
"""

import typing

from dtnh_jax import _lazy

__version__ = "0.1.0"

#: Each public name, and the module that defines it (imported when the name is first used).
_EXPORTS = {
    "multi_steps": "dtnh_jax.accumulate",
    "AggregatorState": "dtnh_jax.aggregators",
    "GradVacState": "dtnh_jax.aggregators",
    "cagrad": "dtnh_jax.aggregators",
    "dualproj": "dtnh_jax.aggregators",
    "gradvac": "dtnh_jax.aggregators",
    "mgda": "dtnh_jax.aggregators",
    "pcgrad": "dtnh_jax.aggregators",
    "upgrad": "dtnh_jax.aggregators",
    "CorrectionState": "dtnh_jax.corrections",
    "EMAState": "dtnh_jax.corrections",
    "SubspaceState": "dtnh_jax.corrections",
    "ema_projection": "dtnh_jax.corrections",
    "share_bound": "dtnh_jax.corrections",
    "subspace_projection": "dtnh_jax.corrections",
    "ClosedFormRegularizer": "dtnh_jax.gradients",
    "split_value_and_grad": "dtnh_jax.gradients",
    "Diagnostics": "dtnh_jax.projection",
    "DTNHState": "dtnh_jax.transform",
    "dtnh": "dtnh_jax.transform",
    "projection_groups": "dtnh_jax.transform",
}

#: The submodules, reachable as attributes (``dtnh_jax.train``) once the package is imported.
_SUBMODULES = ("accumulate", "aggregators", "checksums", "cli", "corrections", "data", "demo", "gradients",
               "host_memory", "models", "names", "projection", "regularizers", "train", "transform")

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

if typing.TYPE_CHECKING:  # what type checkers and IDEs read; at run time, __getattr__ below
  # pylint: disable=g-bad-import-order,g-multiple-import,unused-import
  from dtnh_jax.accumulate import multi_steps
  from dtnh_jax.aggregators import AggregatorState, GradVacState, cagrad, dualproj, gradvac, mgda, pcgrad, upgrad
  from dtnh_jax.corrections import (CorrectionState, EMAState, SubspaceState, ema_projection, share_bound,
                                    subspace_projection)
  from dtnh_jax.gradients import ClosedFormRegularizer, split_value_and_grad
  from dtnh_jax.projection import Diagnostics
  from dtnh_jax.transform import DTNHState, dtnh, projection_groups


__getattr__, __dir__ = _lazy.attach(__name__, globals(), _EXPORTS, _SUBMODULES)
