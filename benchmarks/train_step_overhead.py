"""Step time of the whole ResNet-18 train step with DTNH against without it.

For each regularizer X in L2-SP, KnowDist and DELTA, four jitted train steps
(SGD with momentum 0.9; the model, batch, reference and settings are the same)
are timed side by side:

- ``plain``: the library's step for X, ``make_train_step`` with ``Method(X)``.
  It computes the empirical and the regularizer gradient apart (one forward
  pass, one backward pass per traced term) and hands them to
  ``dtnh(projection="none")``, which forms ``g + λ r`` and the diagnostics.
- ``dtnh``: the library's step for DTNH(X), ``Method(X, dtnh=True)``.
- ``naive``: DTNH(X) as one would write it without ``split_value_and_grad``:
  ``jax.value_and_grad`` of the empirical loss and ``jax.value_and_grad`` of
  the regularizer, each tracing its own forward pass of the target network,
  then the same ``chain(dtnh, sgd)``.
- ``fused``: X without DTNH and without the split: one ``jax.value_and_grad``
  of ``J + λ Ω`` (one backward pass; L2-SP's gradient added in closed form),
  plain SGD — what X costs in a training script that does not use this library.

The frozen source network's forward pass (KnowDist, DELTA) is part of every
step; DELTA's channel attention is a fixed random one (it is computed once
before fine-tuning and is not part of the step). Data is synthetic and the
source weights are random: step time does not depend on either.

Runs are interleaved (the four steps in turn, the order rotating every round),
and ratios are medians of per-round ratios, so the shared, noisy machine
affects all sides alike. Also reported per step: the compile time
(``jit(...).lower(...)`` and ``.compile()``) and XLA's memory analysis of the
compiled step (arguments, outputs, temporaries; ``peak`` is arguments +
outputs - donated aliases + temporaries, XLA's static buffer assignment, not a
measured resident size). The last line printed is one JSON object; its keys
``l2sp``, ``knowdist``, ``delta`` hold the DTNH-to-plain ratios of the
library's steps.

    python benchmarks/train_step_overhead.py [--size 64 --batch 16 --repeats 15]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtnh_jax import models, regularizers
from dtnh_jax.train import step as step_lib
from dtnh_jax.train.config import Method, TrainConfig

#: Benchmark name (JSON key) -> the method's regularizer.
REGULARIZERS = {"l2sp": "l2-sp", "knowdist": "knowdist", "delta": "delta"}
STEPS_PER_EPOCH = 100  # only sets when λ would decay; reg_decay is 1 here


# ----------------------------------------------------------------------------
# The problem: model, synthetic batch, random source, reference.


class Problem(NamedTuple):
  model: Any
  batch: dict[str, jax.Array]
  initial: dict[str, Any]       # the variables fine-tuning starts from
  attention: dict[str, np.ndarray]


def make_problem(size: int, batch_size: int, width: float, num_classes: int = 10, seed: int = 0) -> Problem:
  """ResNet-18 (torchvision layout, ImageNet stem) with random source weights and a synthetic batch."""
  model = models.resnet18(num_classes=num_classes, width=width)
  source = models.init_variables(models.resnet18(width=width), seed, size)   # a random "ImageNet" source
  initial = models.replace_head(source, num_classes, jax.random.key(seed + 1))
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32)}
  _, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, return_features=True),
                               initial, batch["image"])
  attention = {}
  for layer in TrainConfig.feature_layers:
    logits = rng.normal(size=features[layer].shape[-1])
    attention[layer] = (np.exp(logits) / np.exp(logits).sum()).astype(np.float32)
  return Problem(model, batch, initial, attention)


def method_config(regularizer: str, dtnh: bool, size: int, batch_size: int, width: float) -> TrainConfig:
  return TrainConfig(method=Method(regularizer, dtnh).name, dataset="synthetic", width=width,
                     batch_size=batch_size, resize=size, crop=size)


# ----------------------------------------------------------------------------
# The two comparison steps that the library does not have.


def _regularizer_of(config: TrainConfig, reference: step_lib.Reference):
  """``(closed_form, feature_regularizer)`` of ``config``'s method, from the public regularizers."""
  name = config.method_spec.regularizer
  options = {"layers": config.feature_layers, "normalize": config.feature_normalize}
  if name == "l2-sp":
    return regularizers.l2_sp_regularizer(reference.variables["params"], config.l2_sp_alpha, config.l2_sp_beta), None
  if name == "knowdist":
    return None, lambda feats, source: config.knowdist_weight * regularizers.feature_distance(feats, source, **options)
  if name == "delta":
    return None, lambda feats, source: config.delta_weight * regularizers.delta(feats, source, reference.attention,
                                                                                **options)
  raise ValueError(f"no regularizer for {name!r}")


def _forward(model, state, images):
  (logits, features), updated = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                                            train=True, return_features=True, mutable=["batch_stats"])
  return logits, features, updated["batch_stats"]


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def make_naive_step(model, config: TrainConfig, tx: optax.GradientTransformation):
  """DTNH(X) from two ``jax.value_and_grad`` calls, each with its own forward pass of the target network."""

  def train_step(state, batch, reference):
    images, labels = batch["image"], batch["label"]
    closed_form, feature_regularizer = _regularizer_of(config, reference)
    source = (regularizers.source_features(model, reference.variables, images, config.feature_layers)
              if feature_regularizer is not None else None)

    def empirical(params):
      logits, _, batch_stats = _forward(model, state.replace(params=params), images)
      return _cross_entropy(logits, labels), batch_stats

    def regularizer(params):
      if closed_form is not None:
        return closed_form.value(params)   # autodiff of the value, as a user would write it
      _, features, _ = _forward(model, state.replace(params=params), images)
      return feature_regularizer(features, source)

    (loss, batch_stats), empirical_grad = jax.value_and_grad(empirical, has_aux=True)(state.params)
    reg_loss, regularizer_grad = jax.value_and_grad(regularizer)(state.params)
    updates, opt_state = tx.update((empirical_grad, regularizer_grad), state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss_empirical": loss, "loss_regularizer": reg_loss,
                       "conflict": optax.tree.get(opt_state, "diagnostics").conflict}

  return jax.jit(train_step, donate_argnums=(0,))


def make_fused_step(model, config: TrainConfig, tx: optax.GradientTransformation):
  """X without DTNH: one ``jax.value_and_grad`` of ``J + λ Ω`` (one backward pass), plain SGD."""
  reg_weight = config.reg_weight

  def train_step(state, batch, reference):
    images, labels = batch["image"], batch["label"]
    closed_form, feature_regularizer = _regularizer_of(config, reference)
    source = (regularizers.source_features(model, reference.variables, images, config.feature_layers)
              if feature_regularizer is not None else None)

    def total_loss(params):
      logits, features, batch_stats = _forward(model, state.replace(params=params), images)
      loss = _cross_entropy(logits, labels)
      if feature_regularizer is not None:
        loss = loss + reg_weight * feature_regularizer(features, source)
      return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    if closed_form is not None:
      grads = jax.tree.map(lambda g, r: g + reg_weight * r, grads, closed_form.grad(state.params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss_total": loss}

  return jax.jit(train_step, donate_argnums=(0,))


# ----------------------------------------------------------------------------
# Compiling and timing.


class CompiledStep:
  """A compiled step that owns its train state (the step donates it), with its compile stats."""

  def __init__(self, name: str, jitted: Callable, tx: optax.GradientTransformation, problem: Problem,
               reference: step_lib.Reference):
    self.name, self.batch, self.reference = name, problem.batch, reference
    self.state = step_lib.create_train_state(problem.initial, tx, jax.random.key(0))
    start = time.perf_counter()
    lowered = jitted.lower(self.state, self.batch, reference)
    self.lower_s = time.perf_counter() - start
    start = time.perf_counter()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.memory = memory_mib(self.compiled)

  def __call__(self, count: int = 1):
    """Runs ``count`` steps back to back and waits for the last one."""
    for _ in range(count):
      self.state, metrics = self.compiled(self.state, self.batch, self.reference)
    return jax.block_until_ready((self.state.params, metrics))


def memory_mib(compiled) -> dict[str, float]:
  """XLA's memory analysis of a compiled step, in MiB (empty where the backend gives none)."""
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


def interleaved_times(steps: dict[str, Callable], repeats: int, warmup: int = 2) -> dict[str, np.ndarray]:
  """Seconds per call of each step over ``repeats`` rounds; every round runs each step once, order rotating."""
  names = list(steps)
  for _ in range(warmup):
    for name in names:
      steps[name]()
  times = {name: [] for name in names}
  for round_index in range(repeats):
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      steps[name]()
      times[name].append(time.perf_counter() - start)
  return {name: np.array(values) for name, values in times.items()}


def median_ratio(times: dict[str, np.ndarray], a: str, b: str) -> float:
  return float(np.median(times[a] / times[b]))


def build_steps(problem: Problem, regularizer: str, args, variants=("plain", "dtnh", "naive", "fused")):
  """The compiled steps of one regularizer, by variant name."""
  reference = step_lib.Reference(problem.initial, problem.attention if regularizer == "delta" else None)
  plain_config = method_config(regularizer, False, args.size, args.batch, args.width)
  dtnh_config = method_config(regularizer, True, args.size, args.batch, args.width)
  plain_tx = step_lib.make_optimizer(plain_config, STEPS_PER_EPOCH)
  dtnh_tx = step_lib.make_optimizer(dtnh_config, STEPS_PER_EPOCH)
  sgd = step_lib.make_optimizer(plain_config.replace(method="fine-tune"), STEPS_PER_EPOCH)
  makers = {
      "plain": lambda: (step_lib.make_train_step(problem.model, plain_config, plain_tx), plain_tx),
      "dtnh": lambda: (step_lib.make_train_step(problem.model, dtnh_config, dtnh_tx), dtnh_tx),
      "naive": lambda: (make_naive_step(problem.model, dtnh_config, dtnh_tx), dtnh_tx),
      "fused": lambda: (make_fused_step(problem.model, plain_config, sgd), sgd),
  }
  steps = {}
  for variant in variants:
    jitted, tx = makers[variant]()
    steps[variant] = CompiledStep(variant, jitted, tx, problem, reference)
  return steps


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=64, help="image height and width (default: %(default)s)")
  parser.add_argument("--batch", type=int, default=16, help="batch size (default: %(default)s)")
  parser.add_argument("--width", type=float, default=1.0, help="ResNet-18 width multiplier (default: full)")
  parser.add_argument("--repeats", type=int, default=15, help="timed rounds per regularizer (default: %(default)s)")
  parser.add_argument("--regularizers", default=",".join(REGULARIZERS),
                      help="comma-separated subset of %(default)s")
  args = parser.parse_args(argv)
  chosen = [name for name in args.regularizers.split(",") if name]
  unknown = sorted(set(chosen) - set(REGULARIZERS))
  if unknown:
    parser.error(f"unknown regularizer(s) {unknown}; choose among {', '.join(REGULARIZERS)}")

  started = time.perf_counter()
  problem = make_problem(args.size, args.batch, args.width)
  num_params = sum(x.size for x in jax.tree.leaves(problem.initial["params"]))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{jax.device_count()} device(s)")
  print(f"ResNet-18 width {args.width:g} ({num_params / 1e6:.2f}M parameters), {args.size}x{args.size} images, "
        f"batch {args.batch}, {args.repeats} interleaved rounds per regularizer")

  result: dict[str, Any] = {}
  rows = []
  for key in chosen:
    steps = build_steps(problem, REGULARIZERS[key], args)
    times = interleaved_times(steps, args.repeats)
    ratios = {"dtnh/plain": median_ratio(times, "dtnh", "plain"),
              "naive/plain": median_ratio(times, "naive", "plain"),
              "dtnh/fused": median_ratio(times, "dtnh", "fused"),
              "plain/fused": median_ratio(times, "plain", "fused"),
              "naive/dtnh": median_ratio(times, "naive", "dtnh")}
    result[key] = ratios["dtnh/plain"]
    result[f"{key}_naive"] = ratios["naive/plain"]
    result[f"{key}_vs_fused"] = ratios["dtnh/fused"]
    result[f"{key}_plain_vs_fused"] = ratios["plain/fused"]
    result[f"{key}_ms"] = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    result[f"{key}_compile_s"] = {name: round(s.lower_s + s.compile_s, 2) for name, s in steps.items()}
    result[f"{key}_peak_mib"] = {name: round(s.memory.get("peak", float("nan")), 1) for name, s in steps.items()}
    for name, s in steps.items():
      rows.append((REGULARIZERS[key], name, 1e3 * float(np.median(times[name])), s.lower_s, s.compile_s, s.memory))
    print(f"{REGULARIZERS[key]}: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()), flush=True)
    del steps

  print("\nmethod    step   median ms  lower s  compile s  args MiB  out MiB  alias MiB  temp MiB  peak MiB")
  for regularizer, name, ms, lower_s, compile_s, memory in rows:
    m = lambda k: f"{memory[k]:9.1f}" if k in memory else f"{'n/a':>9}"
    print(f"{regularizer:<9} {name:<6} {ms:10.1f} {lower_s:8.2f} {compile_s:10.2f} {m('arguments')} {m('outputs')[1:]} "
          f"{m('aliased'):>10} {m('temporaries')} {m('peak')}")
  print("\nratios (median of per-round ratios); targets: DTNH/plain <= 1.03x for L2-SP, <= 1.4x for KnowDist/DELTA")
  print("regularizer  dtnh/plain  naive/plain  dtnh/fused  plain/fused")
  for key in chosen:
    print(f"{REGULARIZERS[key]:<12} {result[key]:10.3f} {result[key + '_naive']:12.3f} "
          f"{result[key + '_vs_fused']:11.3f} {result[key + '_plain_vs_fused']:12.3f}")
  result["config"] = {"size": args.size, "batch": args.batch, "width": args.width, "repeats": args.repeats,
                      "platform": jax.devices()[0].platform}
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(f"total {result['total_s']:.0f} s")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
