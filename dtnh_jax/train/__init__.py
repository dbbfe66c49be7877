"""Fine-tuning with and without DTNH: configs, the train step, the loop, checkpoints, reports.

``dtnh_jax.train.train(config, workdir)`` runs one method; the ``dtnh-train``
command (``dtnh_jax.cli``) resolves what to run (``dtnh_jax.train.plan``) and
runs it: one run, or a grid of them (``dtnh_jax.train.grid``), with no
arguments the offline default.

The names below and the submodules are imported on first use (as in the
package's ``__init__``): the configs, presets and the plan (``config``,
``presets``, ``plan``) load no jax, so ``dtnh-train --help`` and
``--print-config`` start fast.
"""

import typing

from dtnh_jax import _lazy

#: Each public name, and the module of this package that defines it (imported when the name is first used).
_EXPORTS = {
    "ALL_METHODS": "config",
    "METHODS": "config",
    "ConfigError": "config",
    "Method": "config",
    "TrainConfig": "config",
    "train": "loop",
    "Reference": "step",
    "TrainState": "step",
    "make_eval_step": "step",
    "make_optimizer": "step",
    "make_train_step": "step",
}

#: The submodules, reachable as attributes (``dtnh_jax.train.loop``) once the package is imported.
_SUBMODULES = ("checkpoint", "config", "data", "grid", "guard", "interrupts", "loop", "metrics", "plan", "presets",
               "provenance", "report", "selection", "sharding", "sources", "stats", "step", "workdir")

__all__ = ["ALL_METHODS", "METHODS", "ConfigError", "Method", "Reference", "TrainConfig", "TrainState",
           "make_eval_step", "make_optimizer", "make_train_step", "train"]

if typing.TYPE_CHECKING:  # what type checkers and IDEs read; at run time, __getattr__ below
  # pylint: disable=g-bad-import-order,g-multiple-import,unused-import
  from dtnh_jax.train.config import ALL_METHODS, METHODS, ConfigError, Method, TrainConfig
  from dtnh_jax.train.loop import train
  from dtnh_jax.train.step import Reference, TrainState, make_eval_step, make_optimizer, make_train_step


__getattr__, __dir__ = _lazy.attach(__name__, globals(), _EXPORTS, _SUBMODULES)
