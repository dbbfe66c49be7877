"""Fine-tuning with and without DTNH: configs, the train step, the loop, checkpoints, reports.

``dtnh_jax.train.train(config, workdir)`` runs one method; the ``dtnh-train``
command (``dtnh_jax.cli``) wraps it and, with no arguments, runs the offline
default (``dtnh_jax.train.offline``).
"""

from dtnh_jax.train.config import ALL_METHODS, METHODS, ConfigError, Method, TrainConfig
from dtnh_jax.train.loop import train
from dtnh_jax.train.step import Reference, TrainState, make_eval_step, make_optimizer, make_train_step

__all__ = ["ALL_METHODS", "METHODS", "ConfigError", "Method", "Reference", "TrainConfig", "TrainState",
           "make_eval_step", "make_optimizer", "make_train_step", "train"]
