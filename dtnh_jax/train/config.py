"""What a training run is: the method, the data, the model and the paper's recipe.

A method is data, not code: ``Method("l2-sp", dtnh=True)`` selects the
regularizer and whether DTNH projects its gradient; the train step is the same
function for every method.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

#: Regularizers of the paper (L2-SP, KnowDist), its baselines and DELTA.
METHODS = ("fine-tune", "l2", "l2-sp", "knowdist", "delta")
_LABELS = {"fine-tune": "Fine-tuning", "l2": "L2", "l2-sp": "L2-SP", "knowdist": "KnowDist", "delta": "DELTA"}
# As dtnh_jax.models.ARCHITECTURES and FEATURE_NAMES (kept here so that configs load without jax; a test
# checks that they agree).
ARCHS = ("resnet18", "resnet34", "resnet50")
FEATURE_LAYERS = ("layer1", "layer2", "layer3", "layer4", "pool")
COMPUTE_DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")


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
    if self.dtnh and self.regularizer == "fine-tune":
      raise ConfigError("dtnh-fine-tune has no regularizer to project; use fine-tune.")

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
    label = _LABELS[self.regularizer]
    return f"DTNH ({label})" if self.dtnh else label

  @property
  def uses_features(self) -> bool:
    return self.regularizer in ("knowdist", "delta")

  @property
  def has_regularizer(self) -> bool:
    return self.regularizer != "fine-tune"


#: Every method of the paper's tables plus L2 and DELTA, in table order.
ALL_METHODS = tuple(
    [Method("fine-tune")] + [Method(r, dtnh) for r in METHODS[1:] for dtnh in (False, True)]
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every hyper-parameter of one fine-tuning run; defaults are the paper's recipe (V.A).

  The regularizer enters as ``λ Ω`` with ``Ω`` one of the regularizers and
  ``λ = reg_weight · reg_decay^epoch`` (the paper decays the coefficient per
  epoch); the regularizers' own coefficients (``alpha``, ``beta``, ...) keep
  the values of their original papers.
  """

  # what to train
  method: str = "l2-sp"
  dataset: str = "caltech256/30"
  source: str = "imagenet"
  data_dir: str | None = None
  # the model
  arch: str = "resnet18"
  width: float = 1.0
  small_stem: bool = False
  # the paper's recipe
  batch_size: int = 48
  learning_rate: float = 0.01
  momentum: float = 0.9
  steps: int = 8000
  lr_drop_steps: tuple[int, ...] = (6000,)
  lr_drop_factor: float = 0.1
  reg_weight: float = 1.0
  reg_decay: float = 1.0
  resize: int = 256
  crop: int = 224
  # the regularizers' own coefficients
  l2_weight: float = 1e-4
  l2_sp_alpha: float = 0.1
  l2_sp_beta: float = 0.01
  knowdist_weight: float = 1.0
  delta_weight: float = 1.0
  feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
  # "spatial_mean" (DELTA's code) for both feature regularizers: KnowDist is then
  # DELTA with uniform attention and one weight scale serves both; "sum" is Eq. 3
  feature_normalize: str = "spatial_mean"
  # DTNH's options (see dtnh_jax.dtnh)
  granularity: str = "tree"
  projection: str = "conflict"
  # numerics: "bfloat16" runs the network in bf16; parameters, BatchNorm statistics,
  # gradients, the regularizers' sums and DTNH's inner products stay float32
  compute_dtype: str = "float32"
  # a step whose loss or update is NaN/Inf is never applied; then "stop" the run
  # (the last checkpoint stays the last good one) or "skip" the step and go on
  on_nonfinite: str = "stop"
  # with "skip": the run stops (exit 1) once more than this fraction of --steps was skipped, so
  # a diverged run cannot end "successfully" having skipped most of its steps
  skip_limit: float = 0.05
  # scale-out (dtnh_jax.train.sharding): the batch is always split over all devices; with fsdp the
  # parameters and optimizer state are sharded over them too instead of replicated
  fsdp: bool = False
  # bookkeeping
  seed: int = 0
  eval_every: int = 1000
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  eval_batch_size: int = 100

  def __post_init__(self):
    self.method_spec  # validates the method name
    for field in dataclasses.fields(self):  # NaN would pass every comparison below
      value = getattr(self, field.name)
      if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--{field.name.replace('_', '-')} must be a finite number, got {value}.")
    positive = ("batch_size", "steps", "resize", "crop", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints", "eval_batch_size", "width")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}.")
    non_negative = ("learning_rate", "momentum", "reg_weight", "l2_weight", "l2_sp_alpha", "l2_sp_beta",
                    "knowdist_weight", "delta_weight", "lr_drop_factor")
    for name in non_negative:
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}.")
    if not 0 <= self.skip_limit <= 1:
      raise ConfigError(f"--skip-limit is a fraction of --steps in [0, 1], got {self.skip_limit}.")
    if not 0 <= self.reg_decay <= 1:
      raise ConfigError(f"--reg-decay is a per-epoch factor in [0, 1], got {self.reg_decay}.")
    if self.crop > self.resize:
      raise ConfigError(f"--crop ({self.crop}) cannot exceed --resize ({self.resize}).")
    if self.granularity not in ("tree", "leaf", "module"):
      raise ConfigError(f"--granularity must be tree, leaf or module, got {self.granularity!r}.")
    if self.feature_normalize not in ("sum", "spatial_mean", "mean"):
      raise ConfigError(f"--feature-normalize must be sum, spatial_mean or mean, got {self.feature_normalize!r}.")
    if self.projection not in ("conflict", "always"):
      raise ConfigError(f"--projection must be conflict or always, got {self.projection!r}.")
    if self.arch not in ARCHS:
      raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}.")
    unknown_layers = [layer for layer in self.feature_layers if layer not in FEATURE_LAYERS]
    if unknown_layers or not self.feature_layers:
      raise ConfigError(f"--feature-layers takes comma-separated names among {', '.join(FEATURE_LAYERS)}, got "
                        f"{','.join(self.feature_layers)!r}.")
    if any(step <= 0 for step in self.lr_drop_steps):
      raise ConfigError(f"--lr-drop-steps must be positive steps, got {','.join(map(str, self.lr_drop_steps))}.")
    if not 0 <= self.seed < 2**31:
      raise ConfigError(f"--seed must be in [0, 2**31), got {self.seed}.")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ConfigError(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}.")
    if self.on_nonfinite not in ON_NONFINITE:
      raise ConfigError(f"--on-nonfinite must be one of {', '.join(ON_NONFINITE)}, got {self.on_nonfinite!r}.")

  @property
  def method_spec(self) -> Method:
    return Method.parse(self.method)

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ConfigError(f"unknown setting(s) {unknown}.")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def paper_preset(dataset: str) -> dict[str, Any]:
  """The paper's schedule: 8000 iterations, 20000 for CIFAR-10; lr / 10 after 6000."""
  steps = 20000 if dataset.startswith("cifar10") else 8000
  return {"steps": steps, "lr_drop_steps": (6000,)}


#: The offline default: the same code at CPU scale (see dtnh_jax.train.offline).
OFFLINE_PRESET: dict[str, Any] = {
    "dataset": "offline-digits",
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
    # strong enough to matter in 120 steps (chosen on the unrelated source, seed 0; see benchmarks/RESULTS.md)
    "l2_weight": 0.01,
    "l2_sp_alpha": 1.0,
    "knowdist_weight": 1.0,
    "delta_weight": 1.0,
    "eval_every": 40,
    "log_every": 40,
    "checkpoint_every": 120,
    "eval_batch_size": 500,
}
