"""Step time of the same ResNet-18 fine-tuning step in PyTorch and in dtnh_jax, with and without DTNH.

The peer comparison: what the JAX library's train step costs next to the step
a careful PyTorch user writes for the same method, on the same machine, in
the same process, interleaved. Four methods: plain L2-SP, DTNH(L2-SP), plain
KnowDist, DTNH(KnowDist); ResNet-18 (torchvision's, full width, a new
10-class ``fc``), SGD with momentum 0.9, learning rate 0.01, the target in
train mode (batch statistics, running statistics updated), synthetic data.
Both sides start from the same weights: the JAX problem's
(``train_step_overhead.make_problem``: a random "source" with a new head)
converted to torchvision's layout (``dtnh_jax.models.to_torchvision``); that
is also L2-SP's ``w0`` and the frozen source network of KnowDist. The
coefficients are the library's defaults (``TrainConfig``): λ = 1, L2-SP α 0.1 on
the conv kernels and β 0.01 on the head's kernel (BatchNorm and biases
unregularized: ``include="kernels"``), KnowDist over the outputs of
``layer1``-``layer4`` (``feature_layers``), per channel the mean over positions
of the squared difference (``feature_normalize="spatial_mean"``), summed over
channels and layers, averaged over the batch.

PyTorch, eager, as a careful user writes it: ``torchvision.models.resnet18``,
``model.train()``, ``torch.optim.SGD(..., momentum=0.9, foreach=True)``,
``torch.set_num_threads`` = the cores this process may use, NCHW tensors
(torchvision's default layout; ``--channels-last`` for the other one).

- ``torch plain`` L2-SP, two forms, both timed; the faster one is the
  reference of the ratios (the JSON says which): ``loss``, the penalty
  ``α/2 Σ‖w - w0‖² + β/2 ‖w_fc‖²`` added to the loss before ``backward()``;
  ``foreach``, ``backward()`` of the loss alone, then the penalty's gradient
  ``α(w - w0)``, ``β w_fc`` added to the ``.grad``s with ``torch._foreach``
  ops. KnowDist: the feature distance added to the loss (its gradient needs
  autograd), the source's maps from a frozen copy in eval mode under
  ``torch.no_grad()``.
- ``torch dtnh``: ``g`` and ``r`` apart: L2-SP ``backward()`` of the loss and
  ``r`` in closed form; KnowDist one forward pass and two
  ``torch.autograd.grad`` calls (the first with ``retain_graph=True``). Then,
  with no Python-side synchronization (no ``.item()``): ``<g, r>`` (a
  ``torch.dot`` per tensor, stacked and summed) and ``|g|²``
  (``torch._foreach_norm``), ``c = where(<g,r> < 0, <g,r>/|g|², 0)`` as a
  0-d tensor, and ``d = g + λ(r - c g) = (1 - λc) g + λ r`` by
  ``torch._foreach_mul_`` and ``torch._foreach_add_`` in place of ``.grad``;
  ``optimizer.step()``.
- ``jax summed``: X as usually written in JAX (``train_step_overhead``'s
  ``summed``: one ``value_and_grad`` of ``J + λΩ``, L2-SP's gradient in closed
  form, SGD; no diagnostics, no NaN guard): the same computation as
  ``torch plain``, so ``jax summed / torch plain`` is the framework gap.
- ``jax plain``, ``jax dtnh``: the library's jitted steps for X (on the steps
  that log no angles: one backward pass of ``J + λΩ``, with the library's
  NaN/Inf guard and metrics) and for DTNH(X) (split gradients,
  ``chain(dtnh, sgd)``, the guard, the metrics), what ``dtnh-train`` runs;
  ``--jax-variants`` may add ``angles``, the library's X on the steps that
  log angles. All are built by ``train_step_overhead.build_steps``, whose
  docstring defines them.

Timing is ``train_step_overhead``'s: each round runs every step for a block of
``--block`` consecutive steps (the order rotating between rounds) and records
the mean time per step of the block; ratios are medians of the per-round
ratios, so the shared, noisy machine affects both frameworks alike
(``interleaved_times`` and ``median_ratio`` are imported from there). Both
frameworks run in this one process: ``XLA_FLAGS`` changes the JAX side only,
and the PyTorch side is the reference that stays put. Two things they share:
the cores (PyTorch's OpenMP threads spin a while after each parallel region,
XLA's pool too, so a block may start with the other's threads still awake:
blocks, not single steps), and the machine's load, to which PyTorch's
OpenMP is far more sensitive than XLA's work-stealing pool (a barrier waits
for a descheduled thread): on the shared 2-core machine a 2-thread PyTorch
step took 4-7 s at a load of about 6 against 0.3 s at load 1, a JAX step
1-2 s against 0.5 s, so a ratio means something only with the load it was
measured at, and a low one.

On a GPU (``--device cuda``, the default when JAX runs on one and torch sees
one): ``torch.backends.cudnn.benchmark = True`` (fixed shapes), PyTorch's
default TF32 convolutions and JAX's default precision (TF32 convolutions and
dots on Ampere and later) alike, and JAX does not preallocate (this module
sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless it is set) so that both
fit on one device. Not yet run on one.

``--check`` first runs every step ``--check-steps`` times (1) from the same
weights on both sides and compares the results: the relative difference
``|a - b| / |b|`` of the updates (``after - start``, all weights as one
vector), of the BatchNorm running statistics' updates, and of the weights
themselves. It runs against a reference ``w0`` moved off the start (see
:func:`moved_reference`), so that L2-SP's term is as large as the loss's
gradient and KnowDist's source differs from the target, and DTNH projects
(JAX's ``conflict`` metric is printed); the shares of the update that the
regularizer and the projection make (from PyTorch runs without them) are
printed beside the differences, to show the check would see a wrong term.
It fails (exit 1) above ``--check-tolerance`` (5e-3 on the updates, far
below the regularizer's and the projection's shares of 0.1-1). JAX's own
float32 math sets that level: with XLA:CPU's default platform-dependent
math (approximate transcendental functions), JAX's one-step L2-SP update
at 96x96/16 is 1.5e-3 from PyTorch's, and 1.0e-5 with
``XLA_FLAGS=--xla_cpu_enable_platform_dependent_math=false`` (and with the
test suite's unoptimized compiles), as PyTorch is from float64. One step
by default: at 96x96, batch 16, float32 PyTorch is 1.6e-5 from float64 PyTorch
after one step and 5e-4 after two (the random network's second step is
ill-conditioned), and below 32x32 or batch 4 BatchNorm over a few values
makes float32 itself unreliable (7% at 32x32, batch 2). PyTorch in
channels_last is not a float32 reference on this CPU: 0.9% from float64 after
one step at 96x96.

The last line printed is one JSON object: ``jax_vs_torch`` (per method, JAX's
step time over PyTorch's: ``l2sp``, ``dtnh_l2sp``, ... for the library's steps,
``l2sp_summed``, ``knowdist_summed`` for JAX's usual form), ``dtnh_vs_plain``
per framework (``jax``: over ``summed``; ``jax_library``: over the library's
plain step), the median ms of every step, the PyTorch form chosen, and with
``--check`` the differences found (``check``, ``check_ok``).

    python benchmarks/peer_torch.py [--size 96 --batch 16 --repeats 10 --block 3] [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# PyTorch shares the accelerator: JAX takes memory as it needs it rather than 75% of it up front
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import train_step_overhead as bench
from dtnh_jax import models
from dtnh_jax.models import conv
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.config import TrainConfig

#: JSON key -> the library's regularizer name.
REGULARIZERS = {"l2sp": "l2-sp", "knowdist": "knowdist"}
NUM_CLASSES = 10
#: The JAX steps timed by default, in ``train_step_overhead``'s names (its docstring defines them all).
JAX_VARIANTS = ("summed", "plain", "dtnh")
#: Those ``--jax-variants`` may name.
JAX_CHOICES = ("summed", "plain", "angles", "dtnh")


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------
# The PyTorch side.


class TorchSettings:
  """The method's coefficients as the library's config has them (``TrainConfig`` defaults)."""

  def __init__(self, config: TrainConfig, reg_weight: float | None = None):
    self.learning_rate = config.recipe.learning_rate
    self.momentum = config.recipe.momentum
    self.reg_weight = config.recipe.reg_weight if reg_weight is None else reg_weight
    self.alpha, self.beta = config.regularizer.l2_sp_alpha, config.regularizer.l2_sp_beta
    self.knowdist_weight = config.regularizer.knowdist_weight
    self.model = {"width": config.model.width, "small_stem": config.model.small_stem}
    self.layers = tuple(config.regularizer.feature_layers)
    if config.regularizer.feature_normalize != "spatial_mean" or not set(self.layers) <= {
        "layer1", "layer2", "layer3", "layer4"}:
      raise NotImplementedError("the PyTorch KnowDist here is spatial_mean over stage outputs")
    if config.recipe.optimizer != "sgd" or config.dtnh.granularity != "tree" or config.dtnh.projection != "conflict":
      raise NotImplementedError("the PyTorch side is SGD and DTNH's default (tree, conflict)")
    # settings newer than this script: only their defaults are what the PyTorch side computes
    defaults = {"l2_sp_include": "kernels", "head_beta": 0.0, "project_head": True, "max_angle": None}
    for name, default in defaults.items():
      group = config.regularizer if hasattr(config.regularizer, name) else config.dtnh
      if getattr(group, name, default) != default:
        raise NotImplementedError(f"the PyTorch side has {name}={default!r} only")


def torch_state_dict(variables, model: dict[str, Any]) -> dict[str, torch.Tensor]:
  return {key: torch.from_numpy(np.array(value)) for key, value in
          models.to_torchvision(jax.device_get(variables), num_classes=NUM_CLASSES, **model).items()}


def torchvision_resnet18(width: float = 1.0, small_stem: bool = False) -> torch.nn.Module:
  """torchvision's ResNet-18 with ``dtnh_jax.models.resnet18(width=..., small_stem=...)``'s channels and stem."""
  model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
  if width == 1.0 and not small_stem:
    return model
  channels = lambda count: count if count == 3 else max(1, int(round(count * width)))  # ResNet._channels

  def rebuild(module):
    for name, child in module.named_children():
      if isinstance(child, torch.nn.Conv2d):
        setattr(module, name, torch.nn.Conv2d(channels(child.in_channels), channels(child.out_channels),
                                              child.kernel_size, child.stride, child.padding, bias=False))
      elif isinstance(child, torch.nn.BatchNorm2d):
        setattr(module, name, torch.nn.BatchNorm2d(channels(child.num_features)))
      else:
        rebuild(child)

  rebuild(model)
  model.fc = torch.nn.Linear(channels(512), NUM_CLASSES)
  if small_stem:   # a 3x3 stride-1 conv1 and no max-pool
    model.conv1, model.maxpool = torch.nn.Conv2d(3, channels(64), 3, 1, 1, bias=False), torch.nn.Identity()
  return model


def torch_model(state_dict, device, channels_last: bool, model: dict[str, Any]) -> torch.nn.Module:
  model = torchvision_resnet18(**model)
  model.load_state_dict(state_dict)
  model = model.to(device)
  return model.to(memory_format=torch.channels_last) if channels_last else model


def forward_features(model: torch.nn.Module, images: torch.Tensor, layers):
  """``(logits, {layer: output})``: torchvision's ``ResNet._forward_impl``, keeping the stage outputs."""
  x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
  features = {}
  for name in ("layer1", "layer2", "layer3", "layer4"):
    x = getattr(model, name)(x)
    features[name] = x
  logits = model.fc(torch.flatten(model.avgpool(x), 1))
  return logits, [features[name] for name in layers]


def feature_distance(features, source_features) -> torch.Tensor:
  """KnowDist, ``spatial_mean``: Σ_layers mean_batch Σ_channels mean_positions (F - F_s)²."""
  return sum(((f - s) ** 2).mean(dim=(2, 3)).sum(dim=1).mean() for f, s in zip(features, source_features))


class TorchStep:
  """One PyTorch variant's step: its own model and optimizer from the same start; ``step(count)`` runs ``count``."""

  def __init__(self, regularizer: str, variant: str, settings: TorchSettings, start, reference, batch,
               device: torch.device, channels_last: bool = False):
    self.regularizer, self.variant, self.s = regularizer, variant, settings
    self.device = device
    self.model = torch_model(start, device, channels_last, settings.model).train()
    self.images, self.labels = batch
    self.params = list(self.model.parameters())
    named = dict(self.model.named_parameters())
    # L2-SP's leaves (include="kernels"): conv kernels pulled to w0, the head's kernel to 0
    self.conv_names = [name for name, module in self.model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    self.convs = [named[f"{name}.weight"] for name in self.conv_names]
    self.convs0 = [reference[f"{name}.weight"].to(device) for name in self.conv_names]
    self.fc_weight = self.model.fc.weight
    self.backbone = [p for name, p in self.model.named_parameters() if not name.startswith("fc.")]
    if regularizer == "knowdist":
      self.source = torch_model(reference, device, channels_last, settings.model).eval()
      for p in self.source.parameters():
        p.requires_grad_(False)
    self.optimizer = torch.optim.SGD(self.params, lr=settings.learning_rate, momentum=settings.momentum,
                                     foreach=True)
    self._step = getattr(self, f"_{regularizer}_{variant}")

  def __call__(self, count: int = 1):
    for _ in range(count):
      self._step()
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  # L2-SP ---------------------------------------------------------------------

  def _l2sp_penalty(self) -> torch.Tensor:
    s = self.s
    transferred = sum(((w - w0) ** 2).sum() for w, w0 in zip(self.convs, self.convs0))
    return s.alpha / 2 * transferred + s.beta / 2 * (self.fc_weight ** 2).sum()

  def _l2sp_loss(self):
    """L2-SP added to the loss: one backward pass of ``J + λΩ``."""
    self.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(self.model(self.images), self.labels)
    (loss + self.s.reg_weight * self._l2sp_penalty()).backward()
    self.optimizer.step()

  def _l2sp_closed_form(self):
    """``r``: α(w - w0) on the conv kernels, β w on the head's kernel (a new list)."""
    r = list(torch._foreach_sub(self.convs, self.convs0))
    torch._foreach_mul_(r, self.s.alpha)
    return r + [self.fc_weight.detach() * self.s.beta]

  def _l2sp_foreach(self):
    """``backward()`` of J, then the penalty's gradient added to the ``.grad``s with foreach ops."""
    self.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(self.model(self.images), self.labels).backward()
    with torch.no_grad():
      lam = self.s.reg_weight
      torch._foreach_add_([w.grad for w in self.convs], torch._foreach_sub(self.convs, self.convs0),
                          alpha=lam * self.s.alpha)
      self.fc_weight.grad.add_(self.fc_weight, alpha=lam * self.s.beta)
    self.optimizer.step()

  def _l2sp_dtnh(self):
    self.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(self.model(self.images), self.labels).backward()
    with torch.no_grad():
      r = self._l2sp_closed_form()
      g = [p.grad for p in self.params]
      self._project_into(g, [w.grad for w in self.convs] + [self.fc_weight.grad], r)
    self.optimizer.step()

  # KnowDist ------------------------------------------------------------------

  def _knowdist_terms(self):
    with torch.no_grad():
      _, source = forward_features(self.source, self.images, self.s.layers)
    logits, features = forward_features(self.model, self.images, self.s.layers)
    return F.cross_entropy(logits, self.labels), self.s.knowdist_weight * feature_distance(features, source)

  def _knowdist_loss(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss, omega = self._knowdist_terms()
    (loss + self.s.reg_weight * omega).backward()
    self.optimizer.step()

  def _knowdist_dtnh(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss, omega = self._knowdist_terms()
    g = list(torch.autograd.grad(loss, self.params, retain_graph=True))
    r = list(torch.autograd.grad(omega, self.backbone))   # Ω does not reach the head
    with torch.no_grad():
      self._project_into(g, g[:len(self.backbone)], r)
      for p, d in zip(self.params, g):
        p.grad = d
    self.optimizer.step()

  # DTNH ----------------------------------------------------------------------

  def _project_into(self, g, g_paired, r):
    """In place: ``g <- g + λ(r - c g)``, ``c = <g,r>/|g|²`` where ``<g,r> < 0`` else 0.

    ``g`` is every parameter's gradient, ``g_paired`` those of its tensors that
    ``r`` (zero elsewhere) pairs with, in ``r``'s order. No host sync.
    """
    lam = self.s.reg_weight
    inner = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g_paired, r)]).sum()
    squared_norm = torch.stack(torch._foreach_norm(g)).square().sum()
    c = torch.where(inner < 0, inner / squared_norm, torch.zeros_like(inner))
    torch._foreach_mul_(g, 1 - lam * c)   # d = (1 - λc) g + λ r
    torch._foreach_add_(g_paired, r, alpha=lam)


TORCH_VARIANTS = {"l2sp": ("loss", "foreach", "dtnh"), "knowdist": ("loss", "dtnh")}


def torch_batch(problem: bench.Problem, device, channels_last: bool):
  images = torch.from_numpy(np.array(problem.batch["image"])).permute(0, 3, 1, 2).contiguous()
  images = images.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
  return images, torch.from_numpy(np.array(problem.batch["label"]).astype(np.int64)).to(device)


# ----------------------------------------------------------------------------
# The JAX side, with train_step_overhead's helpers.


def jax_config(regularizer: str, dtnh: bool, args) -> TrainConfig:
  return bench.method_config(regularizer, dtnh, args.size, args.batch, args.width).replace(small_stem=args.small_stem)


def jax_steps(problem: bench.Problem, regularizer: str, args, variants=JAX_VARIANTS,
              formulation: str = "auto") -> dict[str, bench.CompiledStep]:
  """``train_step_overhead``'s compiled steps of one method, against ``problem.initial``, with every convolution
  that ``formulation`` can compute traced as it (``auto``: ``dtnh_jax.models.conv``'s choice per layer;
  ``table:KEY``: the choices of the table measured for ``KEY``, e.g. another instruction set's)."""
  key = formulation.removeprefix("table:") if formulation.startswith("table:") else None
  with conv.force(None if formulation == "auto" or key else formulation), conv.choose_from(key):
    return bench.build_steps(problem, regularizer, argparse.Namespace(size=args.size, batch=args.batch,
                                                                      width=args.width), variants)


def use_reference(steps: dict[str, bench.CompiledStep], reference: step_lib.Reference):
  """The same compiled programs against another reference (it is an argument of the step), each from a copy of
  its state (a step donates its state); returns the states to go back to."""
  saved = {}
  for variant, compiled in steps.items():
    saved[variant] = compiled.state
    compiled.state, compiled.reference = jax.tree.map(jnp.copy, compiled.state), reference
  return saved


def restore(steps: dict[str, bench.CompiledStep], saved, reference: step_lib.Reference):
  for variant, compiled in steps.items():
    compiled.state, compiled.reference = saved[variant], reference


# ----------------------------------------------------------------------------
# The correctness check.


def moved_reference(problem: bench.Problem, key: str, batch, device, settings: TorchSettings, seed: int = 1):
  """``(start, reference, reference in Flax layout)``: torchvision state dicts, the reference's kernels moved.

  Per conv kernel ``w0 = w + κ u`` with ``u`` the unit vector of ``ĝ + n``:
  ``ĝ`` the unit direction of the kernel's first empirical gradient (from a
  throw-away PyTorch model), ``n`` a random unit direction. For L2-SP
  ``κ = |g|/α``: ``r = α(w - w0)`` is as long as ``g`` on every kernel and at
  135° from it, so the regularizer is a large part of the update and DTNH
  projects (with ``w0`` 1% away, ``r`` would be 1e-5 of it: L2-SP's gradient
  on a BatchNorm network is small next to the loss's). For KnowDist
  ``κ = 10% |w|``: a source network that differs from the target, and for
  which ``<g, r>`` came out negative at the sizes tried (the check prints
  whether JAX's DTNH step projected).
  """
  start = torch_state_dict(problem.initial, settings.model)
  model = torch_model(start, device, False, settings.model).train()
  F.cross_entropy(model(batch[0]), batch[1]).backward()
  rng = np.random.default_rng(seed)
  reference = dict(start)
  for name, module in model.named_modules():
    if isinstance(module, torch.nn.Conv2d):
      w, g = start[f"{name}.weight"], module.weight.grad.cpu()
      noise = torch.from_numpy(rng.normal(size=w.shape).astype(np.float32))
      direction = g / g.norm() + noise / noise.norm()
      length = g.norm() / settings.alpha if key == "l2sp" else 0.1 * w.norm()
      reference[f"{name}.weight"] = w + length * direction / direction.norm()
  return start, reference, models.convert_torchvision(reference, num_classes=NUM_CLASSES, **settings.model)


def flat_state(state_dict: dict[str, Any], keys) -> dict[str, np.ndarray]:
  """float64 copies of the weights (``params``) and of the running statistics (``batch_stats``) in ``keys``, each
  concatenated in that order."""
  parts = {"params": [], "batch_stats": []}
  for key in keys:
    if key.endswith("num_batches_tracked"):
      continue
    value = state_dict[key]
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    parts["batch_stats" if key.endswith(("running_mean", "running_var")) else "params"].append(
        value.astype(np.float64).ravel())
  return {kind: np.concatenate(values) for kind, values in parts.items()}


def jax_flat_state(jax_state, keys, model: dict[str, Any]) -> dict[str, np.ndarray]:
  variables = jax.device_get({"params": jax_state.params, "batch_stats": jax_state.batch_stats})
  return flat_state(models.to_torchvision(variables, num_classes=NUM_CLASSES, **model), keys)


def differences(after_a, after_b, start) -> dict[str, float]:
  """Relative differences of two runs' results: of their updates ``after - start`` (weights, running statistics)
  and of the weights themselves, ``|a - b| / |b|`` (2-norms over all tensors)."""
  relative = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  return {"update": relative(after_a["params"] - start["params"], after_b["params"] - start["params"]),
          "running_stats": relative(after_a["batch_stats"] - start["batch_stats"],
                                    after_b["batch_stats"] - start["batch_stats"]),
          "weights": relative(after_a["params"], after_b["params"])}


#: (JAX step, PyTorch step) pairs the check compares; the PyTorch pair shows PyTorch's own float32 noise.
CHECK_PAIRS = {"l2sp": (("summed", "loss"), ("summed", "foreach"), ("plain", "foreach"), ("angles", "foreach"),
                        ("dtnh", "dtnh")),
               "knowdist": (("summed", "loss"), ("plain", "loss"), ("angles", "loss"), ("dtnh", "dtnh"))}


def check(problem: bench.Problem, key: str, steps: dict[str, bench.CompiledStep], start, reference,
          settings: TorchSettings, args, device) -> dict[str, Any]:
  """Runs every step ``args.check_steps`` times from the same weights in both frameworks; their differences.

  Also the share of the update that the regularizer makes (PyTorch with λ = 0
  against the plain step) and that DTNH's projection makes (PyTorch's DTNH
  step against its plain one): differences well below these show that the
  check sees the regularizer and the projection.
  """
  batch = torch_batch(problem, device, args.channels_last)
  keys = list(start)
  start_flat = flat_state(start, keys)
  jax_after, conflict = {}, None
  for variant, compiled in steps.items():
    for _ in range(args.check_steps):
      compiled.state, metrics = compiled.compiled(compiled.state, compiled.batch, compiled.reference)
    jax_after[variant] = jax_flat_state(compiled.state, keys, settings.model)
    if variant == "dtnh":
      conflict = float(metrics["conflict"])
  torch_after = {}
  for variant in TORCH_VARIANTS[key]:
    torch_step = TorchStep(key, variant, settings, start, reference, batch, device, args.channels_last)
    torch_step(args.check_steps)
    torch_after[variant] = flat_state(torch_step.model.state_dict(), keys)
  unregularized = TorchStep(key, "loss", TorchSettings(jax_config(REGULARIZERS[key], True, args), reg_weight=0.0),
                            start, reference, batch, device, args.channels_last)
  unregularized(args.check_steps)
  torch_plain = torch_after[TORCH_VARIANTS[key][0]]
  result = {f"jax {a} vs torch {b}": differences(jax_after[a], torch_after[b], start_flat)
            for a, b in CHECK_PAIRS[key] if a in jax_after}
  if len(TORCH_VARIANTS[key]) > 2:
    result["torch foreach vs torch loss"] = differences(torch_after["foreach"], torch_after["loss"], start_flat)
  shares = {"regularizer_share": differences(flat_state(unregularized.model.state_dict(), keys), torch_plain,
                                             start_flat)["update"],
            "dtnh_share": differences(torch_after["dtnh"], torch_plain, start_flat)["update"],
            "dtnh_conflict": conflict}
  for name, d in result.items():
    print(f"  {key}: {name:<28} update {d['update']:.2e}, running statistics {d['running_stats']:.2e}, "
          f"weights {d['weights']:.2e}")
  print(f"  {key}: PyTorch's update changes by {shares['regularizer_share']:.2e} without the regularizer and by "
        f"{shares['dtnh_share']:.2e} with DTNH; JAX's DTNH projected on the last step: {conflict}", flush=True)
  return {**result, **shares}


# ----------------------------------------------------------------------------
# Timing.


def torch_steps(key: str, settings: TorchSettings, start, batch, args, device) -> dict[str, TorchStep]:
  """PyTorch's steps of one method from ``start``, which is also ``w0`` and the source network."""
  return {f"torch {variant}": TorchStep(key, variant, settings, start, start, batch, device, args.channels_last)
          for variant in TORCH_VARIANTS[key]}


def summarize(times: dict[str, dict[str, np.ndarray]]):
  """``(result, rows)``: the JSON's ratios and the table's rows."""
  result: dict[str, Any] = {"jax_vs_torch": {}, "dtnh_vs_plain": {"torch": {}, "jax": {}, "jax_library": {},
                                                                    "jax_angles": {}},
                            "torch_plain_form": {}, "ms": {}}
  rows = []
  for key, t in times.items():
    forms = [name for name in t if name.startswith("torch ") and name != "torch dtnh"]
    plain = min(forms, key=lambda name: float(np.median(t[name])))
    result["torch_plain_form"][key] = plain.removeprefix("torch ")
    pairs = {f"{key}_summed": ("jax summed", plain), key: ("jax plain", plain), f"{key}_angles": ("jax angles", plain),
             f"dtnh_{key}": ("jax dtnh", "torch dtnh")}
    for name, (a, b) in pairs.items():
      if a in t:
        result["jax_vs_torch"][name] = bench.median_ratio(t, a, b)
        rows.append((name, b, 1e3 * float(np.median(t[b])), a, 1e3 * float(np.median(t[a])),
                     result["jax_vs_torch"][name]))
    result["dtnh_vs_plain"]["torch"][key] = bench.median_ratio(t, "torch dtnh", plain)
    for name, baseline in (("jax", "jax summed"), ("jax_library", "jax plain"), ("jax_angles", "jax angles")):
      if baseline in t:
        result["dtnh_vs_plain"][name][key] = bench.median_ratio(t, "jax dtnh", baseline)
    if len(forms) > 1:
      result["torch_foreach_vs_loss"] = bench.median_ratio(t, "torch foreach", "torch loss")
    result["ms"][key] = {name: round(1e3 * float(np.median(v)), 2) for name, v in t.items()}
  return result, rows


def jax_step_name(variant: str, formulation: str, formulations) -> str:
  """A JAX step's name in the timings: ``jax dtnh``, or ``jax dtnh [xla]`` for a formulation but the first."""
  return f"jax {variant}" if formulation == formulations[0] else f"jax {variant} [{formulation}]"


def by_formulation(times: dict[str, dict[str, np.ndarray]], torch_plain_form: dict[str, str], formulations):
  """Per formulation of the convolutions: each JAX step over PyTorch's, and over the same step with the first
  formulation (both medians of the per-round ratios, with 95% bootstrap intervals)."""
  result = {"jax_vs_torch": {}, "vs_first": {}}
  print("\nper convolution formulation: JAX/PyTorch, and JAX over the same step with the first formulation "
        f"({formulations[0]}); medians of the per-round ratios (95% interval)")
  for formulation in formulations:
    result["jax_vs_torch"][formulation], result["vs_first"][formulation] = {}, {}
    for key, t in times.items():
      plain = f"torch {torch_plain_form[key]}"
      pairs = {f"{key}_summed": ("summed", plain), key: ("plain", plain), f"{key}_angles": ("angles", plain),
               f"dtnh_{key}": ("dtnh", "torch dtnh")}
      for name, (variant, reference) in pairs.items():
        step = jax_step_name(variant, formulation, formulations)
        if step not in t:
          continue
        ratios = {"jax_vs_torch": t[step] / t[reference], "vs_first": t[step] / t[f"jax {variant}"]}
        for kind, per_round in ratios.items():
          result[kind][formulation][name] = [round(float(np.median(per_round)), 3),
                                             *(round(v, 3) for v in bench.median_interval(per_round))]
        cells = [f"{kind} {r:.3f} ({lo:.3f}-{hi:.3f})" for kind, (r, lo, hi) in
                 ((kind, result[kind][formulation][name]) for kind in ratios)]
        print(f"  {formulation:<7} {name:<16} " + ", ".join(cells))
  return result


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=96, help="image height and width (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
  parser.add_argument("--repeats", type=int, default=10, help="timed rounds per method (default: %(default)s)")
  parser.add_argument("--block", type=int, default=3,
                      help="consecutive steps of one variant per timed block (default: %(default)s)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first (default: 1)")
  parser.add_argument("--regularizers", default=",".join(REGULARIZERS), help="comma-separated subset of %(default)s")
  parser.add_argument("--jax-variants", default=",".join(JAX_VARIANTS),
                      help=f"comma-separated JAX steps among {', '.join(JAX_CHOICES)}, dtnh and one other at least "
                      "(default: %(default)s)")
  parser.add_argument("--threads", type=int, default=usable_cores(),
                      help="torch.set_num_threads (default: the cores this process may use, %(default)s)")
  parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="PyTorch's device; auto: cuda when JAX runs on a GPU and torch sees one, else cpu")
  parser.add_argument("--channels-last", action="store_true", help="PyTorch in channels_last (NHWC) memory format")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet-18's channel multiplier (default: 1)")
  parser.add_argument("--small-stem", action="store_true", help="ResNet-18 with a 3x3 stride-1 stem, no max-pool")
  parser.add_argument("--conv-formulations", default="auto",
                      help=f"comma-separated: JAX's steps once per formulation of its convolutions, interleaved, "
                      f"among auto (dtnh_jax.models.conv's choice per layer), {', '.join(conv.FORMULATIONS)} and "
                      "table:KEY (the choices of the table measured for KEY, e.g. table:cpu-avx512); the first is the "
                      "one the main table shows (default: %(default)s)")
  parser.add_argument("--check", action="store_true",
                      help="first check that both frameworks compute the same steps (exit 1 if not)")
  parser.add_argument("--check-only", action="store_true", help="the check and no timing")
  parser.add_argument("--check-steps", type=int, default=1, help="steps the check runs (default: %(default)s)")
  parser.add_argument("--check-tolerance", type=float, default=5e-3,
                      help="largest relative difference of the updates the check accepts (default: %(default)s)")
  args = parser.parse_args(argv)
  chosen = [name for name in args.regularizers.split(",") if name]
  unknown = sorted(set(chosen) - set(REGULARIZERS))
  if unknown:
    parser.error(f"unknown regularizer(s) {unknown}; choose among {', '.join(REGULARIZERS)}")
  jax_variants = tuple(name for name in JAX_CHOICES if name in args.jax_variants.split(","))
  if set(args.jax_variants.split(",")) - set(JAX_CHOICES) or "dtnh" not in jax_variants or len(jax_variants) < 2:
    parser.error(f"--jax-variants must name dtnh and one of summed, plain, angles, among {', '.join(JAX_CHOICES)}")
  formulations = [name for name in args.conv_formulations.split(",") if name]
  known = {"auto", *conv.FORMULATIONS, *(f"table:{key}" for key in conv.load_table()["backends"]
                                          if key.startswith("cpu-"))}
  if not formulations or set(formulations) - known or len(set(formulations)) < len(formulations):
    parser.error(f"--conv-formulations must name distinct formulations among {', '.join(sorted(known))}")
  jax_device = jax.devices()[0]
  if args.device == "auto":
    args.device = "cuda" if jax_device.platform == "gpu" and torch.cuda.is_available() else "cpu"
  device = torch.device(args.device)
  torch.set_num_threads(args.threads)
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True   # fixed shapes: what a careful user sets
  checking = args.check or args.check_only

  started = time.perf_counter()
  settings = TorchSettings(jax_config("l2-sp", True, args))
  problem = bench.make_problem(args.size, args.batch, args.width, NUM_CLASSES, small_stem=args.small_stem)
  print(f"jax {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}); torch {torch.__version__} on "
        f"{device} with {torch.get_num_threads()} threads, torchvision {torchvision.__version__}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"ResNet-18 ({NUM_CLASSES}-class head, width {args.width:g}{', small stem' if args.small_stem else ''}), "
        f"{args.size}x{args.size} images, batch {args.batch}, {args.repeats} interleaved rounds of {args.block}-step "
        f"blocks per method; JAX's convolutions: {', '.join(formulations)}", flush=True)

  batch = torch_batch(problem, device, args.channels_last)
  start = torch_state_dict(problem.initial, settings.model)
  timing_reference = step_lib.Reference(problem.initial)
  if checking:
    print(f"check: {args.check_steps} step(s) from the same weights, w0 moved off the start; relative differences "
          "|a - b| / |b| of the updates (after - start) and of the weights, all tensors as one vector", flush=True)
  result: dict[str, Any] = {"check": {}} if checking else {}
  times = {}
  for key in chosen:
    if checking:
      _, check_reference, check_reference_flax = moved_reference(problem, key, batch, device, settings)
      check_reference_jax = step_lib.Reference(jax.tree.map(jnp.asarray, check_reference_flax))
    timed = {}
    for formulation in formulations:
      steps = jax_steps(problem, REGULARIZERS[key], args, jax_variants, formulation)
      if checking:
        saved = use_reference(steps, check_reference_jax)
        checked = key if formulation == formulations[0] else f"{key} [{formulation}]"
        result["check"][checked] = check(problem, key, steps, start, check_reference, settings, args, device)
        restore(steps, saved, timing_reference)
      timed.update({jax_step_name(variant, formulation, formulations): compiled for variant, compiled in steps.items()})
    if not args.check_only:
      timed = {**torch_steps(key, settings, start, batch, args, device), **timed}
      times[key] = bench.interleaved_times(timed, args.repeats, warmup=args.warmup, block=args.block)
    print(f"{key}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    del steps, timed

  if checking:
    compared = [d for checked in result["check"].values() for name, d in checked.items() if name.startswith("jax ")]
    worst = max(max(d["update"], d["running_stats"]) for d in compared)
    result["check_ok"] = bool(worst <= args.check_tolerance)
    print(f"check: largest difference of JAX's updates to PyTorch's {worst:.2e} (tolerance {args.check_tolerance:g}): "
          f"{'ok' if result['check_ok'] else 'FAILED'}")
  if times:
    summary, rows = summarize(times)
    result.update(summary)
    print("\nmedian ms per step; JAX/PyTorch: median of the per-round ratios")
    print(f"{'method':<16} {'PyTorch step':<14} {'ms':>8}   {'JAX step':<11} {'ms':>8} {'JAX/PyTorch':>12}")
    for name, torch_name, torch_ms, jax_name, jax_ms, ratio in rows:
      print(f"{name:<16} {torch_name:<14} {torch_ms:8.1f}   {jax_name:<11} {jax_ms:8.1f} {ratio:12.3f}")
    print("\nDTNH(X) / X within each framework (medians of the per-round ratios)")
    print(f"{'X':<10} {'PyTorch':>10} {'JAX / summed':>14} {'JAX / library plain':>20} {'JAX / angles':>14}")
    cell = lambda values, key: f"{values[key]:.3f}" if key in values else "n/a"
    for key in chosen:
      ratios = result["dtnh_vs_plain"]
      print(f"{key:<10} {cell(ratios['torch'], key):>10} {cell(ratios['jax'], key):>14} "
            f"{cell(ratios['jax_library'], key):>20} {cell(ratios['jax_angles'], key):>14}")
    forms = ", ".join(f"{k} {v}" for k, v in result["torch_plain_form"].items())
    print(f"PyTorch's plain form, the faster one: {forms}"
          + (f" (foreach / loss {result['torch_foreach_vs_loss']:.3f})" if "torch_foreach_vs_loss" in result else ""))
    result["conv"] = by_formulation(times, result["torch_plain_form"], formulations)
  result["config"] = {"size": args.size, "batch": args.batch, "width": args.width, "small_stem": args.small_stem,
                      "conv_formulations": formulations, "repeats": args.repeats, "block": args.block,
                      "jax_variants": list(jax_variants), "torch_device": str(device),
                      "torch_threads": torch.get_num_threads(), "channels_last": args.channels_last,
                      "xla_flags": os.environ.get("XLA_FLAGS", ""), "platform": jax_device.platform,
                      "keeps_freed_memory": bench.KEEPS_FREED_MEMORY, "jax": jax.__version__,
                      "torch": torch.__version__}
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(f"total {result['total_s']:.0f} s")
  print(json.dumps(result))
  if not result.get("check_ok", True):
    sys.exit(1)
  return result


if __name__ == "__main__":
  main()
