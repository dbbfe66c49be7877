"""Step time of the whole ResNet-18 train step with DTNH against without it.

For each regularizer X in L2, L2-SP, KnowDist and DELTA, six train steps (SGD
with momentum 0.9; the same model, batch, reference and settings) are timed
side by side. The headline is DTNH(X) over X as it is usually written
(``dtnh/summed``): what a user pays for DTNH on top of the regularizer.

- ``summed``: X as usually written: one ``jax.value_and_grad`` of
  ``J + λ Ω`` (one backward pass; L2's and L2-SP's gradients added in closed form) and
  SGD, no DTNH, no diagnostics and no NaN guard: the baseline.
- ``dtnh``: the library's jitted step for DTNH(X), ``Method(X, dtnh=True)``:
  one forward pass, one backward pass per traced loss term (none for L2's or L2-SP's
  closed form), ``chain(dtnh, sgd)``, the NaN/Inf guard and the metrics.
- ``plain``: the library's jitted step for X on the steps that log no
  angles (all but every ``log_every``-th): ``make_train_step`` with
  ``Method(X)`` and ``summed=True``: one backward pass of ``J + λ Ω``,
  then SGD, with the library's NaN/Inf guard and metrics. ``plain/summed``
  is what the library's baseline costs over X as usually written.
- ``angles``: the library's jitted step for X on the steps that log angles.
  It holds the empirical and the regularizer gradient apart
  (``split_value_and_grad``: one forward pass, one backward pass per traced
  term, none for L2's and L2-SP's closed forms) and hands them to
  ``dtnh(projection="none")``, which forms ``g + λ r`` and the diagnostics;
  ``dtnh/angles`` isolates the projection itself.
- ``naive``: DTNH(X) in one jitted step written without
  ``split_value_and_grad``: ``jax.value_and_grad`` of the empirical loss and
  ``jax.value_and_grad`` of the regularizer, each tracing its own forward pass
  of the target network, then the same ``chain(dtnh, sgd)``.
- ``separate``: the same two ``jax.value_and_grad`` calls jitted apart, and
  the DTNH update jitted on its own: three programs per step, so XLA cannot
  merge the two forward passes: DTNH done the naive way.

The frozen source network's forward pass (KnowDist, DELTA) is part of every
step; DELTA's channel attention is a fixed random one (it is computed once
before fine-tuning and is not part of the step). Data is synthetic and the
source weights are random: step time depends on neither.

Runs are interleaved: each round runs every variant for a block of
``--block`` consecutive steps (3; the order rotating between rounds), and
ratios are medians of per-round ratios of the mean step time of the blocks, so
the shared, noisy machine affects all sides alike. Blocks, not single steps:
a step timed right after another program's pays for that program's caches,
and more so the larger its own temporaries (benchmarks/RESULTS.md has the
figures). Also reported per step, independent of the machine's load:
the number of convolutions in the optimized XLA program(s) (each forward or
backward pass of a ResNet-18 adds about 20, a backward pass 39: weights and
inputs), XLA's flop count and the optimized program's size in HLO instructions (JSON key
``X_instructions``); and the compile time (``jit(...).lower(...)``
then ``.compile()``) and XLA's memory analysis of the compiled step
(arguments, outputs, temporaries; ``peak`` = arguments + outputs - donated
aliases + temporaries: XLA's static buffer assignment, not a measured resident
size; for ``separate`` the largest of its programs). The last line printed is
one JSON object; its keys ``l2sp``, ``knowdist``, ``delta`` hold the
``dtnh/summed`` ratios, DTNH(X) over X; the other keys the rest.

The default size keeps the last stage's maps at 3x3: at 2x2 (64x64 images)
XLA:CPU runs the 512-channel 3x3 convolutions ~50 times slower per flop
(measured 0.7 GFLOP/s against 40-80 at 3x3 and 7x7), which would swamp the
comparison.

    python benchmarks/train_step_overhead.py [--size 96 --batch 16 --repeats 10 --block 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from typing import Any, Callable, NamedTuple

from dtnh_jax import host_memory

#: Whether XLA:CPU's freed memory is kept for the next step (``dtnh_jax.host_memory``), as ``dtnh-train`` does
#: with ``DTNH_JAX_KEEP_FREED_MEMORY=1``: set, if so, before any JAX computation of the benchmarks that import this
#: module, and recorded in their JSON.
KEEPS_FREED_MEMORY = host_memory.wanted() and host_memory.keep_freed_memory()

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax import models, names, regularizers
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.config import Method, TrainConfig

#: Benchmark name (JSON key) -> the method's regularizer.
REGULARIZERS = {"l2": "l2", "l2sp": "l2-sp", "knowdist": "knowdist", "delta": "delta"}
STEPS_PER_EPOCH = 100  # only sets when λ would decay; reg_decay is 1 here


# ----------------------------------------------------------------------------
# The problem: model, synthetic batch, random source, reference.


class Problem(NamedTuple):
  arch: str                     # a ResNet of dtnh_jax.names.ARCHITECTURES
  model: Any
  batch: dict[str, jax.Array]
  initial: dict[str, Any]       # the variables fine-tuning starts from
  attention: dict[str, np.ndarray]


def make_problem(size: int, batch_size: int, width: float, num_classes: int = 10, seed: int = 0,
                 small_stem: bool = False, arch: str = "resnet18") -> Problem:
  """A ResNet (ResNet-18 unless ``arch``; torchvision layout, ImageNet stem unless ``small_stem``) with random
  source weights and a synthetic batch."""
  model = models.create_model(arch, num_classes=num_classes, width=width, small_stem=small_stem)
  source = models.init_variables(models.create_model(arch, width=width, small_stem=small_stem), seed, size)
  initial = models.replace_head(source, num_classes, jax.random.key(seed + 1))
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)}
  _, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, return_features=True),
                               initial, batch["image"])
  attention = {}
  for layer in names.DEFAULT_FEATURE_LAYERS:
    logits = rng.normal(size=features[layer].shape[-1])
    attention[layer] = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
  return Problem(arch, model, batch, initial, attention)


def method_config(regularizer: str, dtnh: bool, size: int, batch_size: int, width: float,
                  arch: str = "resnet18") -> TrainConfig:
  # KnowDist/DELTA averaged over positions at weight 1, as every figure in RESULTS.md (and peer_torch's PyTorch side)
  return TrainConfig.create(method=Method(regularizer, dtnh).name, dataset="synthetic", arch=arch, width=width,
                            batch_size=batch_size, resize=size, crop=size, feature_normalize="spatial_mean",
                            knowdist_weight=1.0, delta_weight=1.0)


# ----------------------------------------------------------------------------
# The comparison steps that the library does not have.


def _regularizer_of(config: TrainConfig, reference: step_lib.Reference):
  """``(closed_form, feature_regularizer)`` of ``config``'s method: the library step's own (one is None)."""
  closed_form = step_lib.closed_form_regularizers(config, reference)
  return (closed_form[0] if closed_form else None), step_lib.feature_regularizer(config, reference)


def _separate_losses(model, config: TrainConfig):
  """``(empirical, regularizer)``: the two losses as separate functions, each running the target network itself.

  ``empirical(params, batch_stats, batch) -> (J, new batch_stats)``;
  ``regularizer(params, batch_stats, batch, reference) -> Ω``.
  """

  def forward(params, batch_stats, images):
    (logits, features), updated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                              return_features=True, mutable=["batch_stats"])
    return logits, features, updated["batch_stats"]

  def empirical(params, batch_stats, batch):
    logits, _, batch_stats = forward(params, batch_stats, batch["image"])
    return step_lib.cross_entropy(logits, batch["label"]), batch_stats

  def regularizer(params, batch_stats, batch, reference):
    closed_form, feature_regularizer = _regularizer_of(config, reference)
    if closed_form is not None:
      return closed_form.value(params)   # autodiff of the value, as one would write it
    source = regularizers.source_features(model, reference.variables, batch["image"], config.regularizer.feature_layers)
    return feature_regularizer(forward(params, batch_stats, batch["image"])[1], source)

  return forward, empirical, regularizer


def _apply_dtnh(tx, state, empirical_grad, regularizer_grad, batch_stats, losses):
  updates, opt_state = tx.update((empirical_grad, regularizer_grad), state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  return new_state, {"loss_empirical": losses[0], "loss_regularizer": losses[1],
                     "conflict": optax.tree.get(opt_state, "diagnostics").conflict}


def make_naive_step(model, config: TrainConfig, tx: optax.GradientTransformation):
  """DTNH(X) in one jitted step from two ``jax.value_and_grad`` calls, each tracing its own forward pass."""
  _, empirical, regularizer = _separate_losses(model, config)

  def train_step(state, batch, reference):
    (loss, batch_stats), empirical_grad = jax.value_and_grad(empirical, has_aux=True)(
        state.params, state.batch_stats, batch)
    reg_loss, regularizer_grad = jax.value_and_grad(regularizer)(state.params, state.batch_stats, batch, reference)
    return _apply_dtnh(tx, state, empirical_grad, regularizer_grad, batch_stats, (loss, reg_loss))

  return jax.jit(train_step, donate_argnums=(0,))


def make_separate_programs(model, config: TrainConfig, tx: optax.GradientTransformation):
  """DTNH(X) from two separately jitted ``jax.value_and_grad`` calls and a jitted update: three programs."""
  _, empirical, regularizer = _separate_losses(model, config)
  empirical_grad = jax.jit(jax.value_and_grad(empirical, has_aux=True))
  regularizer_grad = jax.jit(jax.value_and_grad(regularizer))
  update = jax.jit(functools.partial(_apply_dtnh, tx), donate_argnums=(0,))
  return empirical_grad, regularizer_grad, update


def make_summed_step(model, config: TrainConfig, tx: optax.GradientTransformation):
  """X as usually written: one ``jax.value_and_grad`` of ``J + λ Ω`` (one backward pass), plain SGD."""
  forward, _, _ = _separate_losses(model, config)
  reg_weight = config.recipe.reg_weight  # constant: reg_decay is 1

  def train_step(state, batch, reference):
    closed_form, feature_regularizer = _regularizer_of(config, reference)
    layers = config.regularizer.feature_layers
    source = (regularizers.source_features(model, reference.variables, batch["image"], layers)
              if feature_regularizer is not None else None)

    def total_loss(params):
      logits, features, batch_stats = forward(params, state.batch_stats, batch["image"])
      loss = step_lib.cross_entropy(logits, batch["label"])
      if feature_regularizer is not None:
        loss = loss + reg_weight * feature_regularizer(features, source)
      return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    if closed_form is not None:  # L2-SP's gradient in closed form, as the library's steps add it
      grads = jax.tree.map(lambda g, r: g + reg_weight * r, grads, closed_form.grad(state.params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss_total": loss}

  return jax.jit(train_step, donate_argnums=(0,))


# ----------------------------------------------------------------------------
# Compiling and timing.


class ProgramStats(NamedTuple):
  lower_s: float
  compile_s: float
  memory: dict[str, float]   # MiB, from XLA's memory analysis (empty where the backend gives none)
  convolutions: int | None   # convolution ops in the optimized program: forward and backward passes, counted
  gflop: float | None        # XLA's cost analysis (None where the backend gives none)
  instructions: int | None   # HLO instructions of the optimized program, fusions' bodies included: its size


def compile_program(jitted, *args):
  """``(compiled, ProgramStats)`` of ``jitted`` for these arguments."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  convolutions, instructions = count_ops(compiled)
  return compiled, ProgramStats(lower_s, compile_s, memory_mib(compiled), convolutions, gflop_of(compiled),
                                instructions)


def memory_mib(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled program in MiB; ``peak`` = arguments + outputs - aliased + temporaries."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend/version implements it)
    stats = None
  if stats is None:
    return {}
  mib = lambda n: n / 2**20
  sizes = {"arguments": mib(stats.argument_size_in_bytes), "outputs": mib(stats.output_size_in_bytes),
           "aliased": mib(stats.alias_size_in_bytes), "temporaries": mib(stats.temp_size_in_bytes)}
  sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
  return sizes


def count_ops(compiled) -> tuple[int | None, int | None]:
  """``(convolutions, instructions)`` of the optimized program, read from its text once: its convolution ops, and
  its HLO instructions (every computation's, fusions' included: how much XLA compiled, a figure that does not
  depend on the machine's load); ``(None, None)`` where the backend gives no text."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return None, None
  return (len(re.findall(r"\bconvolution\(", text)),
          len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, flags=re.MULTILINE)))


def gflop_of(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) / 1e9
  except Exception:  # pylint: disable=broad-except
    return None


def fresh_state(problem: Problem, tx: optax.GradientTransformation) -> step_lib.TrainState:
  """A train state whose every leaf is its own buffer.

  The steps donate their state, and XLA refuses a buffer donated twice in one
  call; an optimizer's ``init`` may hand out one array for several leaves
  (e.g. equal zeros), so each leaf is copied.
  """
  return jax.tree.map(jnp.copy, step_lib.create_train_state(problem.initial, tx, jax.random.key(0)))


class CompiledStep:
  """One variant's step, compiled; it owns its train state (the steps donate it)."""

  def __init__(self, jitted: Callable, tx: optax.GradientTransformation, problem: Problem,
               reference: step_lib.Reference):
    self.batch, self.reference = problem.batch, reference
    self.state = fresh_state(problem, tx)
    self.compiled, self.stats = compile_program(jitted, self.state, self.batch, reference)

  def __call__(self, count: int = 1):
    """Runs ``count`` steps back to back and waits for the last one."""
    for _ in range(count):
      self.state, metrics = self.compiled(self.state, self.batch, self.reference)
    return jax.block_until_ready((self.state.params, metrics))


class SeparateStep(CompiledStep):
  """The ``separate`` variant: three compiled programs per step; stats summed (memory: the largest program)."""

  def __init__(self, programs, tx: optax.GradientTransformation, problem: Problem, reference: step_lib.Reference):
    self.batch, self.reference = problem.batch, reference
    self.state = fresh_state(problem, tx)
    empirical_grad, regularizer_grad, update = programs
    params, batch_stats = self.state.params, self.state.batch_stats
    self.empirical_grad, empirical_stats = compile_program(empirical_grad, params, batch_stats, self.batch)
    self.regularizer_grad, regularizer_stats = compile_program(regularizer_grad, params, batch_stats, self.batch,
                                                               reference)
    (_, new_batch_stats), grad = jax.eval_shape(empirical_grad, params, batch_stats, self.batch)
    loss = jax.ShapeDtypeStruct((), jnp.float32)
    self.update, update_stats = compile_program(update, self.state, grad, grad, new_batch_stats, (loss, loss))
    parts = (empirical_stats, regularizer_stats, update_stats)
    # a count one program lacks makes the sum unknown, not smaller
    total = lambda field: None if any(getattr(p, field) is None for p in parts) else sum(getattr(p, field)
                                                                                        for p in parts)
    self.stats = ProgramStats(
        lower_s=sum(p.lower_s for p in parts), compile_s=sum(p.compile_s for p in parts),
        memory=max((p.memory for p in parts), key=lambda m: m.get("peak", 0.0)),
        convolutions=total("convolutions"), instructions=total("instructions"), gflop=total("gflop"))

  def __call__(self, count: int = 1):
    for _ in range(count):
      params, batch_stats = self.state.params, self.state.batch_stats
      (loss, new_batch_stats), empirical = self.empirical_grad(params, batch_stats, self.batch)
      reg_loss, regularizer = self.regularizer_grad(params, batch_stats, self.batch, self.reference)
      self.state, metrics = self.update(self.state, empirical, regularizer, new_batch_stats, (loss, reg_loss))
    return jax.block_until_ready((self.state.params, metrics))


def interleaved_times(steps: dict[str, Callable], repeats: int, warmup: int = 1, block: int = 1
                      ) -> dict[str, np.ndarray]:
  """Seconds per step of each step function over ``repeats`` rounds.

  Every round runs each step function for ``block`` consecutive steps (the
  order rotating between rounds) and records the mean time per step of the
  block: back-to-back steps of one program, as in training, so that one
  program's caches are not measured right after another's.
  """
  names = list(steps)
  for _ in range(warmup):
    for name in names:
      steps[name]()
  times = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      steps[name](block)
      times[name].append((time.perf_counter() - start) / block)
  return {name: np.array(values) for name, values in times.items()}


def median_ratio(times: dict[str, np.ndarray], a: str, b: str) -> float:
  return float(np.median(times[a] / times[b]))


def median_interval(ratios, level: float = 0.95, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
  """A percentile-bootstrap ``level`` interval of the median of per-round ratios.

  The rounds are resampled (they are the independent units: within one the
  variants ran back to back). An interval that excludes 1 says that the two
  sides differ beyond the machine's noise in this run; one that contains 1,
  that this run cannot tell them apart.
  """
  ratios = np.asarray(ratios, np.float64)
  if ratios.size < 2:
    return float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  medians = np.median(ratios[rng.integers(0, ratios.size, (resamples, ratios.size))], axis=1)
  tail = 100 * (1 - level) / 2
  return float(np.percentile(medians, tail)), float(np.percentile(medians, 100 - tail))


def ratio_interval(times: dict[str, np.ndarray], a: str, b: str, level: float = 0.95) -> tuple[float, float]:
  """:func:`median_interval` of time(a)/time(b) over the rounds of :func:`interleaved_times`."""
  return median_interval(times[a] / times[b], level)


VARIANTS = ("plain", "angles", "dtnh", "naive", "separate", "summed")


def library_step(model, config: TrainConfig, **options):
  """The library's train step jitted as ``Placement.jit_train_step`` does on one device (state donated)."""
  return jax.jit(step_lib.make_train_step(model, config, STEPS_PER_EPOCH, **options), donate_argnums=(0,))


def build_steps(problem: Problem, regularizer: str, args, variants=VARIANTS) -> dict[str, CompiledStep]:
  """The compiled steps of one regularizer, by variant name (see the module's docstring)."""
  reference = step_lib.Reference(problem.initial, problem.attention if regularizer == "delta" else None)
  plain_config = method_config(regularizer, False, args.size, args.batch, args.width, problem.arch)
  plain_tx = step_lib.make_optimizer(plain_config, STEPS_PER_EPOCH)
  if regularizer != "fine-tune":
    dtnh_config = method_config(regularizer, True, args.size, args.batch, args.width, problem.arch)
    dtnh_tx = step_lib.make_optimizer(dtnh_config, STEPS_PER_EPOCH)
    sgd = step_lib.make_optimizer(plain_config.replace(method="fine-tune"), STEPS_PER_EPOCH)
  model = problem.model
  makers = {
      "plain": lambda: CompiledStep(library_step(model, plain_config, summed=True), plain_tx, problem, reference),
      "angles": lambda: CompiledStep(library_step(model, plain_config), plain_tx, problem, reference),
      "dtnh": lambda: CompiledStep(library_step(model, dtnh_config), dtnh_tx, problem, reference),
      "naive": lambda: CompiledStep(make_naive_step(model, dtnh_config, dtnh_tx), dtnh_tx, problem, reference),
      "separate": lambda: SeparateStep(make_separate_programs(model, dtnh_config, dtnh_tx), dtnh_tx, problem,
                                       reference),
      "summed": lambda: CompiledStep(make_summed_step(model, plain_config, sgd), sgd, problem, reference),
  }
  return {variant: makers[variant]() for variant in variants}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=96, help="image height and width (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
  parser.add_argument("--arch", default="resnet18", choices=names.ARCHITECTURES,
                      help="the ResNet (default: %(default)s)")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet width multiplier (default: 1, full width)")
  parser.add_argument("--repeats", type=int, default=10, help="timed rounds per regularizer (default: %(default)s)")
  parser.add_argument("--block", type=int, default=3,
                      help="consecutive steps of one variant per timed block (default: %(default)s)")
  parser.add_argument("--regularizers", default=",".join(REGULARIZERS), help="comma-separated subset of %(default)s")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated steps to time, among %(default)s (ratios need both sides)")
  args = parser.parse_args(argv)
  chosen = [name for name in args.regularizers.split(",") if name]
  unknown = sorted(set(chosen) - set(REGULARIZERS))
  if unknown:
    parser.error(f"unknown regularizer(s) {unknown}; choose among {', '.join(REGULARIZERS)}")
  variants = tuple(name for name in args.variants.split(",") if name)
  if set(variants) - set(VARIANTS) or not {"dtnh", "summed"} <= set(variants):
    parser.error(f"--variants must name steps among {', '.join(VARIANTS)}, including dtnh and summed")

  started = time.perf_counter()
  problem = make_problem(args.size, args.batch, args.width, arch=args.arch)
  num_params = sum(x.size for x in jax.tree.leaves(problem.initial["params"]))
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}), {jax.device_count()} device(s)")
  print(f"{args.arch} width {args.width:g} ({num_params / 1e6:.2f}M parameters), {args.size}x{args.size} images, "
        f"batch {args.batch}, {args.repeats} interleaved rounds per regularizer", flush=True)

  result: dict[str, Any] = {}
  rows = []
  for key in chosen:
    steps = build_steps(problem, REGULARIZERS[key], args, variants)
    times = interleaved_times(steps, args.repeats, block=args.block)
    ratios = {f"{a}/{b}": median_ratio(times, a, b) for a, b in RATIOS if a in steps and b in steps}
    result[f"{key}_intervals"] = {f"{a}/{b}": [round(x, 3) for x in ratio_interval(times, a, b)]
                                  for a, b in RATIOS if a in steps and b in steps}
    result[key] = ratios["dtnh/summed"]
    for a, b in RATIOS[1:]:
      if f"{a}/{b}" in ratios:
        result[f"{key}_{a}_vs_{b}"] = ratios[f"{a}/{b}"]
    result[f"{key}_ms"] = {name: round(1e3 * float(np.median(t)), 2) for name, t in times.items()}
    result[f"{key}_compile_s"] = {name: round(s.stats.lower_s + s.stats.compile_s, 2) for name, s in steps.items()}
    result[f"{key}_peak_mib"] = {name: round(s.stats.memory.get("peak", float("nan")), 1) for name, s in steps.items()}
    result[f"{key}_convolutions"] = {name: s.stats.convolutions for name, s in steps.items()}
    result[f"{key}_instructions"] = {name: s.stats.instructions for name, s in steps.items()}
    for name, s in steps.items():
      rows.append((REGULARIZERS[key], name, 1e3 * float(np.median(times[name])), s.stats))
    print(f"{REGULARIZERS[key]} ({time.perf_counter() - started:.0f} s): "
          + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()), flush=True)
    del steps

  print("\nper step: median time; lowering + compiling; convolutions in the optimized XLA program(s); XLA's GFLOP;")
  print("XLA's static memory: arguments + outputs - donated aliases + temporaries = peak (MiB)")
  print(f"{'method':<9} {'step':<9} {'median ms':>10} {'compile s':>10} {'convs':>6} {'GFLOP':>7} "
        f"{'args':>7} {'outputs':>8} {'aliased':>8} {'temp':>7} {'peak':>7}")
  for regularizer, name, ms, stats in rows:
    memory = lambda k: f"{stats.memory[k]:{7 if k != 'outputs' and k != 'aliased' else 8}.1f}" if k in stats.memory \
        else "n/a".rjust(7)
    gflop = f"{stats.gflop:7.2f}" if stats.gflop is not None else "n/a".rjust(7)
    convolutions = f"{stats.convolutions:6d}" if stats.convolutions is not None else "n/a".rjust(6)
    print(f"{regularizer:<9} {name:<9} {ms:10.1f} {stats.lower_s + stats.compile_s:10.1f} {convolutions} "
          f"{gflop} {memory('arguments')} {memory('outputs')} {memory('aliased')} {memory('temporaries')} "
          f"{memory('peak')}")
  print("\nmedians of per-round time ratios; targets: dtnh/summed (DTNH(X) over X) <= 1.03x L2-SP and <= naive/summed "
        "for KnowDist and DELTA; plain/summed (the library's X over X) <= 1.02x")
  shown = [(a, b) for a, b in RATIOS if a in variants and b in variants]
  print(f"{'method':<12}" + "".join(f"{a + '/' + b:>16}" for a, b in shown))
  for key in chosen:
    values = [result[key]] + [result[f"{key}_{a}_vs_{b}"] for a, b in shown[1:]]
    print(f"{REGULARIZERS[key]:<12}" + "".join(f"{v:16.3f}" for v in values))
  print("95% bootstrap intervals of those medians (over rounds; one that contains 1.000 cannot tell the two apart)")
  for key in chosen:
    intervals = [result[f"{key}_intervals"][f"{a}/{b}"] for a, b in shown]
    print(f"{REGULARIZERS[key]:<12}" + "".join(f"{f'{lo:.3f}-{hi:.3f}':>16}" for lo, hi in intervals))
  result["config"] = {"arch": args.arch, "size": args.size, "batch": args.batch, "width": args.width,
                      "repeats": args.repeats, "block": args.block,
                      "variants": list(variants),
                      "platform": device.platform, "keeps_freed_memory": KEEPS_FREED_MEMORY,
                      "jax": jax.__version__}
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(f"total {result['total_s']:.0f} s")
  print(json.dumps(result))
  return result


#: Ratios reported, ``(a, b)`` for time(a) / time(b); the first is the headline: DTNH(X) over X.
RATIOS = (("dtnh", "summed"), ("naive", "summed"), ("separate", "summed"), ("separate", "dtnh"), ("plain", "summed"),
          ("angles", "summed"), ("dtnh", "angles"), ("dtnh", "naive"))


if __name__ == "__main__":
  main()
