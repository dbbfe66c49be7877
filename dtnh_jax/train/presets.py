"""Named presets: the settings of a kind of run, each defined once.

In the style of big_vision's config files: a preset is a function returning
flat settings (the names of the flags), and :func:`get` turns one into a
:class:`~dtnh_jax.train.config.TrainConfig` with overrides on top. The CLI
(``dtnh-train --preset NAME``), the tests and the notebooks all start from
these:

- ``paper``: the paper's recipe (Section V.A) for a target dataset;
- ``released-code``: DTNH(L2-SP) as the authors' released ``grod.py`` runs it;
- ``offline``: the offline default, the same code at CPU scale on
  scikit-learn's digits, every method from two sources pre-trained here
  (``GRIDS["offline"]``);
- ``study``, ``study-imagenet``: the offline study, from the toy sources and
  from EfficientNet-Lite0's ImageNet weights;
- ``tiny``: the offline default shrunk until a run takes seconds: what the
  test suite and the notebooks' smoke runs use.

``offline_pretraining`` holds how the offline sources are pre-trained (part
of their cache key; ``tiny`` pre-trains for 4 steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtnh_jax import names
from dtnh_jax.train.config import ConfigError, TrainConfig

__all__ = [
    "get",
    "offline",
    "offline_pretraining",
    "paper",
    "GRIDS",
    "released_code",
    "settings",
    "PRESETS",
    "study",
    "study_imagenet",
    "tiny",
]


def paper(dataset: str = TrainConfig.dataset) -> dict[str, Any]:
  """The paper's schedule: 8000 iterations of 48 images, 20000 for CIFAR-10; lr / 10 after 6000."""
  steps = 20000 if dataset.startswith("cifar10") else 8000
  # head_beta: the official KnowDist/DELTA code's β/2·|fc|² (used by those methods only)
  return {"dataset": dataset, "steps": steps, "lr_drop_steps": (6000,), "head_beta": 0.01}


def released_code(dataset: str = TrainConfig.dataset) -> dict[str, Any]:
  """DTNH(L2-SP) as the authors' released code runs it, at the paper's schedule.

  ``grod.py`` of github.com/xhyccc/Paddle-based-GroD (commit b6421b3), ``GrodOptimizer.minimize``: every
  parameter tensor whose name lacks ``FC`` (convolutions and BatchNorm scales and biases: ``l2_sp_include
  all``) has its gradient corrected one tensor at a time (``granularity leaf``) on every step, conflict or not
  (``projection always``); the head is neither regularized (``l2_sp_beta 0``) nor projected
  (``--no-project-head``); the regularizer's gradient is ``w - w0`` (``l2_sp_alpha 1``) weighted by
  ``0.1 · 0.99^(counter // 5000)`` with a counter that advances once per corrected tensor and skips the first
  step (``reg_schedule released-code``); the optimizer's 1e-4 L2 decay is added after the correction
  (``weight_decay``). The correction is the one of the PyTorch lines left commented out in that file (the
  gradient's norm and its inner product with ``w - w0``); the Paddle lines that run use the *parameter* in
  place of the gradient in both (``np.linalg.norm(param_np)``, ``np.dot(param_np, ...)``), a bug that this
  preset does not reproduce (docs/guides/regularizers.md, "The released code").
  """
  return {**paper(dataset), "method": "dtnh-l2-sp", "granularity": "leaf", "projection": "always",
          "project_head": False, "l2_sp_include": "all", "l2_sp_alpha": 1.0, "l2_sp_beta": 0.0, "reg_weight": 0.1,
          "reg_decay": 0.99, "reg_schedule": "released-code", "weight_decay": 1e-4}


def offline() -> dict[str, Any]:
  """The offline default, what ``dtnh-train`` runs with no flags: a validation-selected comparison on digits.

  From the two offline sources (``GRIDS["offline"]``), fine-tuning, training from scratch, L2-SP and DTNH(L2-SP)
  with λ chosen on validation among 0.1, 1 and 10 (× L2-SP's official α 0.1, β 0.01, fixed before any run),
  3 seeds; the study's carve (40 digits per class, 10 of them a validation split redrawn per seed). The table
  gives each method at its pick and each tuned method − fine-tuning paired over seeds with its interval. The
  weights of L2, KnowDist and DELTA below (``--method all`` runs them, at the same λ grid) were set on the test
  accuracy of an earlier study (benchmarks/RESULTS.md); L2-SP's are the official ones.
  """
  return {
      "dataset": names.OFFLINE_TARGET,
      "arch": "resnet18",
      "width": 0.125,
      "small_stem": True,
      "resize": 18,
      "crop": 16,
      "batch_size": 48,
      "learning_rate": 0.01,
      "steps": 120,
      "lr_drop_steps": (90,),
      "reg_decay": 0.9,
      "target_per_class": 40,
      "val_fraction": 0.25,
      # strong enough to matter in 120 steps (see benchmarks/RESULTS.md for how they were chosen)
      "l2_weight": 0.01,
      "knowdist_weight": 1.0,
      "delta_weight": 1.0,
      "feature_normalize": "spatial_mean",
      "eval_every": 40,
      "log_every": 40,
      "checkpoint_every": 120,
      "eval_batch_size": 500,
  }


def tiny() -> dict[str, Any]:
  """The offline default at 8x8 pixels for 6 steps from scratch on a ResNet-10 (the ResNet-18 of the others with one
  block per stage: the same layers, a third less to compile), no plots: seconds per run, every code path."""
  return {**offline(), "arch": "resnet10", "source": "scratch", "method": "dtnh-l2-sp", "target_per_class": 10,
          "val_fraction": 0.0, "l2_sp_alpha": 1.0, "reg_weight": 1.0, "resize": 10, "crop": 8, "batch_size": 16,
          "steps": 6, "lr_drop_steps": (4,), "eval_every": 3, "log_every": 3, "checkpoint_every": 2,
          "keep_checkpoints": 3, "eval_batch_size": 200, "pretrain_steps": 4, "plots": False}


def offline_pretraining(steps: int = TrainConfig.pretrain_steps) -> dict[str, Any]:
  """How an offline source is pre-trained (``--pretrain-steps`` of them): a plain fine-tune run from scratch on
  the source's data, batches of 48 whatever the fine-tuning run's, the learning rate dropped for the last fifth."""
  return {"steps": steps, "batch_size": 48, "lr_drop_steps": (max(1, steps * 4 // 5),), "learning_rate": 0.05,
          "eval_every": steps, "log_every": min(50, steps), "checkpoint_every": steps}


def study() -> dict[str, Any]:
  """The offline study (benchmarks/RESULTS.md): the offline default made able to show negative transfer and its
  relief. 40 digits per class, of which 10 go to a validation split redrawn per seed; 300 steps (50 epochs of 6
  steps) so that the weights leave the source; λ decayed per epoch on the paper's scale (0.98^50 ≈ 0.36 at the
  end, the paper ≈ 50 decays of 0.9-1 over its 8000 iterations). ``GRIDS["study"]`` sweeps λ and the methods."""
  return {**offline(), "l2_sp_alpha": 1.0, "steps": 300, "lr_drop_steps": (240,),
          "reg_decay": 0.98, "eval_every": 300, "log_every": 50, "checkpoint_every": 300}


def study_imagenet() -> dict[str, Any]:
  """The real-source study (benchmarks/RESULTS.md): EfficientNet-Lite0 from its ImageNet weights (``--source
  imagenet``, the ``imagenet-lite`` extra) on the offline digit targets, at 32x32 pixels (the stride-2 stem: a
  Lite0 train step of batch 48 is short on a CPU; its time: the Results page) with the study's carve (30 training + 10
  validation images per class, redrawn per seed), 120 steps (~19 epochs; sized to an hour on a loaded shared
  CPU) at a learning rate of 0.05 (at the paper's 0.01, fine-tuning reached 30-71% validation accuracy in
  these 120 steps), λ decayed per epoch by 0.98, BatchNorm running statistics decayed by 0.9 per step (PyTorch's
  and Paddle's default; the checkpoint's own 0.99 kept 30% of ImageNet's statistics after 120 steps, and
  fine-tuning ended at 98% training and 19% validation accuracy: benchmarks/RESULTS.md).

  The regularizers' own coefficients are their official values, fixed before any run of this study (not chosen on
  any of its results): L2-SP α 0.1, β 0.01 (the L2-SP paper's); KnowDist with the official normalization (summed
  over positions) and head term (β 0.01), its weight the official code's 0.01 at batch 48 (0.24 per example).
  ``GRIDS["study-imagenet"]`` sweeps λ ∈ {0.1, 1, 10} around them; λ 0 is fine-tuning (the same runs).
  ``--dataset offline-mnist`` runs it on MNIST-5k.
  """
  return {**study(), "arch": "efficientnet-lite0", "width": 1.0, "small_stem": False, "resize": 36, "crop": 32,
          "source": "imagenet", "bn_momentum": 0.9, "learning_rate": 0.05, "steps": 120, "lr_drop_steps": (100,),
          "eval_every": 120,
          "log_every": 20, "checkpoint_every": 120, "l2_sp_alpha": 0.1, "l2_sp_beta": 0.01, "knowdist_weight": 0.24,
          "head_beta": 0.01, "feature_normalize": "official"}


#: The presets ``get`` and ``dtnh-train --preset`` know.
PRESETS: dict[str, Callable[[], dict[str, Any]]] = {"paper": paper, "released-code": released_code,
                                                    "offline": offline, "tiny": tiny, "study": study,
                                                    "study-imagenet": study_imagenet}
#: The presets whose settings follow the ``dataset`` override (the paper's schedule: CIFAR-10 trains longer).
_PER_DATASET = ("paper", "released-code")

#: The runs ``dtnh-train --preset NAME`` makes by default (flags and --config override each): methods, seeds,
#: sources and the sweep of λ. Presets not listed: one run, or on the offline target the offline default's
#: methods and sources (``dtnh_jax.train.plan.default_runs``).
GRIDS: dict[str, dict[str, Any]] = {
    # the offline default: fine-tuning, from scratch and L2-SP ± DTNH from both offline sources, 3 seeds, λ picked
    # on validation among the official value's 0.1x, 1x and 10x
    "offline": {"method": "scratch,fine-tune,l2-sp,dtnh-l2-sp", "seed": [0, 1, 2],
                "source": list(names.OFFLINE_SOURCES), "reg_weight": [0.1, 1.0, 10.0]},
    # every regularizer ± DTNH, 5 seeds, λ from 0.001 (the 3-seed study's edge, 0.01, won everywhere) to 10
    "study": {"method": "scratch,fine-tune,l2,dtnh-l2,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist,delta,dtnh-delta",
              "seed": [0, 1, 2, 3, 4], "source": list(names.OFFLINE_SOURCES),
              "reg_weight": [0.001, 0.01, 0.1, 1.0, 10.0]},
    # ImageNet Lite0 on digits: λ 0 is fine-tuning (its runs; benchmarks/study_records.py puts them there), so a
    # pick at 0.1 lies inside the grid; 10 (the toy study's α 1) so that an over-strong pull can show; 3 seeds.
    # The methods in the order they matter (an interrupted study has the first); the candidate runs apart (one
    # --projection per grid), see benchmarks/study_imagenet.sh
    "study-imagenet": {"method": "fine-tune,l2-sp,dtnh-l2-sp,knowdist,dtnh-knowdist,scratch", "seed": [0, 1, 2],
                       "source": ["imagenet"], "reg_weight": [0.1, 1.0, 10.0]},
}


def get(name: str, **overrides: Any) -> TrainConfig:
  """The config of preset ``name`` with ``overrides`` (flat settings) on top.

  ``paper``'s and ``released-code``'s schedule follows the ``dataset`` override (CIFAR-10 trains longer).

  Raises:
    ConfigError: an unknown preset, or a bad override.
  """
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
  return TrainConfig.create(**{**settings(name, overrides.get("dataset", TrainConfig.dataset)), **overrides})


def settings(name: str, dataset: str = TrainConfig.dataset) -> dict[str, Any]:
  """Preset ``name``'s flat settings; ``paper`` and ``released-code`` for ``dataset``."""
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
  return PRESETS[name](dataset) if name in _PER_DATASET else PRESETS[name]()
