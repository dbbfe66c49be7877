"""Each convolution formulation per layer shape, the table the models choose from, and Lite0 beside PyTorch.

``dtnh_jax.models.conv`` computes a convolution as XLA's convolution
(``xla``), as windows concatenated on the channel axis and one matmul
(``im2col``), as XLA's convolution with the kernel's gradient one matmul per
kernel position (``taps``), or, for a depthwise layer, as k² shifted
multiply-adds (``shifted``), and picks one per layer from a table measured here.

``layers``: every distinct convolution of the models of ``MODELS`` (the
ResNets and Lite0 at the sizes this project trains them: the benchmarks'
96x96/16, the offline study's preset, its evaluation batch, Lite0 at 32x32/48),
found by tracing the models; for each, the forward and backward pass
(gradients of the input and the kernel, jitted, one program per formulation;
a model's first layer reads the images, which a train step does not
differentiate: the kernel's gradient only, ``input_gradient`` false)
of every formulation that applies, timed interleaved: each round runs each
formulation once, the order rotating; medians and the median of the per-round
ratios to ``xla`` with a 95% bootstrap interval. ``--candidates`` adds
formulations the package does not ship: ``im2col-autodiff``, im2col's forward
pass differentiated by JAX, and ``im2col-transposed``, im2col whose input
gradient is the transposed convolution as one stride-1 im2col matmul per
output phase (no product with the zeros of a dilated cotangent). A layer's ``choice`` is ``xla`` unless another shipped
formulation's median ratio is below ``conv.MARGIN`` (0.97) and its 95% interval
below 1 (faster beyond the noise of the shared machine), then the fastest.
``--write`` writes the table (this backend's entries, on the CPU this
instruction set's, ``conv.table_key()``; others kept) to
``dtnh_jax/models/conv_table.json`` with host, date, jax version and command.

``choices``: per layer of each model of ``MODELS``, the formulation the
shipped table gives it on this backend, with the measured ratio.

``maxpool``: the ResNet stem's 3x3 stride-2 max-pool (``dtnh_jax.models.pool``) on
the stem's ReLU output at ``--size``/``--batch``, forward and backward, as XLA's
``reduce_window`` (``xla``) and as shifted windows (``shifted``), interleaved:
medians and the per-round ratio with its 95% bootstrap interval.

``lite0``: EfficientNet-Lite0's fine-tuning step (cross-entropy, SGD momentum
0.9, train-mode BatchNorm, a new 10-class head, synthetic data) in JAX under
``before`` (the model as it was: depthwise layers ``shifted``, every other
convolution XLA's), ``auto`` (the table's choice) and optionally ``xla``
(every layer XLA's, the grouped convolution for depthwise), beside the same
step in PyTorch (the checkpoint's architecture written as a careful user
would: TF-'SAME' padding as the convolution's own when symmetric, ``F.pad``
when not; ``foreach`` SGD; NCHW; ``torch.set_num_threads`` = usable cores),
from the same weights, interleaved in one process (blocks of ``--block``
steps, the order rotating). The last line printed is one JSON object.

    python benchmarks/conv_formulations.py layers [--repeats 7] [--models resnet18-96,...] [--candidates] [--write]
    python benchmarks/conv_formulations.py choices
    python benchmarks/conv_formulations.py lite0 [--size 32 --batch 48 --repeats 10 --block 2] [--with-xla]
    python benchmarks/conv_formulations.py maxpool [--size 96 --batch 16 --repeats 15]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dtnh_jax import models
from dtnh_jax.models import conv, efficientnet, pool
from dtnh_jax.train import presets
from train_step_overhead import interleaved_times, median_interval

NUM_CLASSES = 10
#: What the table's times are.
MEASURED = ("median ms of the forward and backward pass (the input's gradient where input_gradient, the kernel's), "
            "float32, jitted")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "dtnh_jax", "models",
                          conv.TABLE_FILE)


def _study() -> tuple[dict[str, Any], int, int, int]:
  study = presets.settings("study")
  return ({"width": study["width"], "small_stem": study["small_stem"]}, study["crop"], study["batch_size"],
          study["eval_batch_size"])


_STUDY_MODEL, _STUDY_SIZE, _STUDY_BATCH, _STUDY_EVAL_BATCH = _study()
#: name -> (arch, model attributes, image size, batch): the models and sizes whose layers the table measures.
MODELS = {
    "resnet18-96": ("resnet18", {}, 96, 16),
    "resnet18-study": ("resnet18", _STUDY_MODEL, _STUDY_SIZE, _STUDY_BATCH),
    "resnet18-study-eval": ("resnet18", _STUDY_MODEL, _STUDY_SIZE, _STUDY_EVAL_BATCH),
    "resnet50-96": ("resnet50", {}, 96, 16),
    "lite0-32": ("efficientnet-lite0", {}, 32, 48),
}


def host() -> str:
  """The CPU model and cores (``/proc/cpuinfo``), or ``platform.processor()``."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as file:
      lines = file.read().splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {isa}"
  except (OSError, StopIteration):
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------
# The layers of the models.


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class Layer(dict):
  """One convolution: ``path``, ``input_shape``, ``kernel_shape``, ``strides``, ``padding``, ``groups``,
  ``input_gradient`` (false for a model's first layer, which reads the images)."""

  def key(self) -> tuple:
    return (tuple(self["input_shape"]), tuple(self["kernel_shape"]), tuple(self["strides"]),
            tuple(map(tuple, self["padding"])), self["groups"], self["input_gradient"])


def model_layers(name: str) -> list[Layer]:
  """Every convolution of ``MODELS[name]`` in a train-mode forward pass, in order, with its Flax path."""
  arch, attributes, size, batch = MODELS[name]
  model = models.create_model(arch, NUM_CLASSES, **attributes)
  layers = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, conv.Conv) and context.method_name == "__call__":
      module, x = context.module, args[0]
      kernel_hw, strides = _pair(module.kernel_size), _pair(module.strides)
      layers.append(Layer(
          path="/".join(module.path), input_shape=tuple(x.shape),
          kernel_shape=(*kernel_hw, x.shape[-1] // module.feature_group_count, module.features), strides=strides,
          padding=(tuple(map(tuple, module.padding)) if not isinstance(module.padding, str) else
                   tuple(lax.padtype_to_pads(x.shape[1:3], kernel_hw, strides, module.padding))),
          groups=module.feature_group_count, input_gradient=bool(layers)))
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: models.init_variables(model, 0, size))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
  return layers


# ----------------------------------------------------------------------------
# Candidates the package does not ship.


def _matmul(patches, kernel):
  """``patches @ kernel`` reshaped to ``(kh * kw * C_in, C_out)`` (float32)."""
  return lax.dot_general(patches, kernel.reshape(-1, kernel.shape[-1]), (((3,), (0,)), ((), ())))


def _transposed_phase(cotangent, taps, first, count):
  """``Σ_t cotangent[q - t] · taps[t]`` for q in ``[first, first + count)`` per axis: one stride-1 im2col matmul
  with the flipped taps."""
  padding = tuple((t - 1 - f, f + c - cotangent.shape[1 + axis])
                  for axis, (t, f, c) in enumerate(zip(taps.shape[:2], first, count)))
  return _matmul(conv.patches(cotangent, taps.shape[:2], 1, padding), taps[::-1, ::-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_transposed(x, kernel, strides, padding):
  return conv.conv(x, kernel, strides, padding, formulation="im2col")


def _im2col_transposed_forward(x, kernel, strides, padding):
  return im2col_transposed(x, kernel, strides, padding), (x, kernel)


def _im2col_transposed_backward(strides, padding, residuals, cotangent):
  x, kernel = residuals
  batch, height, width, in_channels = x.shape
  patches = conv.patches(x, kernel.shape[:2], strides, padding)
  kernel_grad = lax.dot_general(patches, cotangent, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                preferred_element_type=jnp.float32).reshape(kernel.shape).astype(kernel.dtype)
  # x[h] with h + top = q·stride + r received cotangent[q - t] through tap r + stride·t: per phase r a stride-1
  # correlation with the taps r, r + stride, ...; the phases interleaved, then cropped to the input
  (top, _), (left, _) = padding
  stride_h, stride_w = strides
  first = (top // stride_h, left // stride_w)
  count = (-(-(height + top) // stride_h) - first[0], -(-(width + left) // stride_w) - first[1])
  transposed = jnp.swapaxes(kernel, 2, 3)
  rows = [[_transposed_phase(cotangent, transposed[r::stride_h, c::stride_w], first, count)
           if r < kernel.shape[0] and c < kernel.shape[1] else jnp.zeros((batch, *count, in_channels), x.dtype)
           for c in range(stride_w)] for r in range(stride_h)]
  interleaved = jnp.stack([jnp.stack(row, axis=3) for row in rows], axis=2).reshape(
      batch, count[0] * stride_h, count[1] * stride_w, in_channels)
  start = (top - first[0] * stride_h, left - first[1] * stride_w)
  input_grad = lax.slice(interleaved, (0, *start, 0), (batch, start[0] + height, start[1] + width, in_channels))
  return input_grad.astype(x.dtype), kernel_grad


im2col_transposed.defvjp(_im2col_transposed_forward, _im2col_transposed_backward)


def im2col_autodiff(x, kernel, strides, padding):
  """The forward pass of ``im2col``, differentiated by JAX."""
  return _matmul(conv.patches(x, kernel.shape[:2], strides, padding), kernel)


#: Candidates: name -> (applies to a layer kind, ``(x, kernel, strides, padding) -> y``).
CANDIDATES = {"im2col-autodiff": ("dense", im2col_autodiff), "im2col-transposed": ("dense", im2col_transposed)}


# ----------------------------------------------------------------------------
# Timing the layers.


def _layer_function(layer: Layer, formulation: str):
  """The jitted forward and backward pass ``(x, kernel, cotangent) -> (dx, dkernel)`` (``dkernel`` alone where the
  layer's ``input_gradient`` is false); ``y`` is consumed by ``<y, cotangent>`` so that nothing but the convolution
  and its gradients is computed."""
  strides, padding, groups = tuple(layer["strides"]), tuple(map(tuple, layer["padding"])), layer["groups"]
  if formulation in CANDIDATES:
    candidate = CANDIDATES[formulation][1]
    apply = lambda x, kernel: candidate(x, kernel, strides, padding)
  else:
    apply = lambda x, kernel: conv.conv(x, kernel, strides, padding, groups, formulation=formulation)
  loss = lambda x, kernel, cotangent: jnp.vdot(apply(x, kernel), cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1) if layer["input_gradient"] else 1))


def _kind(layer: Layer) -> str:
  return conv.layer_kind(layer["input_shape"][-1], layer["kernel_shape"], layer["groups"])


def time_layer(layer: Layer, repeats: int, candidates: bool) -> dict[str, Any]:
  """Median ms per formulation, and the per-round ratios to ``xla`` (median, 95% interval)."""
  kind = _kind(layer)
  names = list(conv.applicable(layer["input_shape"][-1], layer["kernel_shape"], layer["groups"]))
  if candidates:
    names += [name for name, (applies, _) in CANDIDATES.items() if applies == kind]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=layer["input_shape"]), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=layer["kernel_shape"]) / np.sqrt(np.prod(layer["kernel_shape"][:3])),
                       jnp.float32)
  out_shape = jax.eval_shape(lambda x, k: conv.conv(x, k, tuple(layer["strides"]), tuple(map(tuple, layer["padding"])),
                                                    layer["groups"], formulation="xla"), x, kernel).shape
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  functions = {name: _layer_function(layer, name) for name in names}
  calls = {name: (lambda count=1, f=f: [jax.block_until_ready(f(x, kernel, cotangent)) for _ in range(count)])
           for name, f in functions.items()}
  times = interleaved_times(calls, repeats, warmup=1)
  ms = {name: round(1e3 * float(np.median(t)), 3) for name, t in times.items()}
  ratios = {}
  for name in names[1:]:
    per_round = times[name] / times["xla"]
    ratios[name] = [round(float(np.median(per_round)), 3), *(round(v, 3) for v in median_interval(per_round))]
  # faster beyond the noise: the median ratio below MARGIN and its whole 95% interval below 1
  shipped = [name for name in names[1:]
             if name in conv.FORMULATIONS and ratios[name][0] < conv.MARGIN and ratios[name][2] < 1.0]
  choice = min(shipped, key=lambda name: ratios[name][0]) if shipped else "xla"
  return {"ms": ms, "ratio_to_xla": ratios, "choice": choice, "out_hw": list(out_shape[1:3])}


def table_entry(layer: Layer, timing: dict[str, Any], model_names: list[str]) -> dict[str, Any]:
  """The table's record of one layer shape (see ``conv.load_table``)."""
  return {"kind": _kind(layer), "kernel": list(layer["kernel_shape"][:2]), "stride": list(layer["strides"]),
          "padding": [list(p) for p in layer["padding"]], "batch": layer["input_shape"][0],
          "in_hw": list(layer["input_shape"][1:3]), "out_hw": timing["out_hw"],
          "in_channels": layer["input_shape"][-1], "out_channels": layer["kernel_shape"][-1],
          "input_gradient": layer["input_gradient"], "ms": timing["ms"], "ratio_to_xla": timing["ratio_to_xla"],
          "choice": timing["choice"], "models": model_names}


def run_layers(args) -> dict[str, Any]:
  started = time.perf_counter()
  chosen = [name for name in args.models.split(",") if name]
  unknown = sorted(set(chosen) - set(MODELS))
  if unknown:
    raise SystemExit(f"unknown model(s) {unknown}; choose among {', '.join(MODELS)}")
  shapes: dict[tuple, tuple[Layer, list[str]]] = {}
  for name in chosen:
    for layer in model_layers(name):
      _, users = shapes.setdefault(layer.key(), (layer, []))
      if name not in users:
        users.append(name)
  backend = jax.default_backend()
  print(f"jax {jax.__version__} on {backend}; {host()}; {len(shapes)} distinct convolutions of {', '.join(chosen)}; "
        f"{args.repeats} interleaved rounds each", flush=True)
  print(f"{'kind':<9} {'k':>3} {'s':>2} {'N':>4} {'H':>4} {'C_in':>5} {'C_out':>5}  {'ms per formulation':<46} "
        f"{'ratio to xla (95%)':<44} choice")
  entries = []
  for layer, users in shapes.values():
    timing = time_layer(layer, args.repeats, args.candidates)
    entry = table_entry(layer, timing, users)
    entries.append(entry)
    ms = ", ".join(f"{name} {value:.2f}" for name, value in timing["ms"].items())
    ratios = ", ".join(f"{name} {r:.2f} ({lo:.2f}-{hi:.2f})" for name, (r, lo, hi) in timing["ratio_to_xla"].items())
    print(f"{entry['kind']:<9} {entry['kernel'][0]:>3} {entry['stride'][0]:>2} {entry['batch']:>4} "
          f"{entry['in_hw'][0]:>4} {entry['in_channels']:>5} {entry['out_channels']:>5}  {ms:<46} {ratios:<44} "
          f"{entry['choice']}", flush=True)
  command = "python benchmarks/conv_formulations.py " + " ".join(args.argv)
  key = conv.table_key(backend)
  record = {"host": host(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "jax": jax.__version__, "command": command, "repeats": args.repeats, "margin": conv.MARGIN,
            "layers": entries}
  table = {"measured": MEASURED, "backends": {key: record}}
  if args.write:
    try:
      previous = conv.load_table(TABLE_PATH)
    except (OSError, ValueError):
      previous = {}
    for other, other_record in previous.get("backends", {}).items():
      if other != key:   # another backend's or instruction set's measurements stay, with their own host and date
        table["backends"][other] = other_record
    table["backends"] = dict(sorted(table["backends"].items()))
    with open(TABLE_PATH, "w", encoding="utf-8") as file:
      json.dump(table, file, indent=1)
      file.write("\n")
    print(f"wrote {os.path.normpath(TABLE_PATH)} ({key})")
  summary = {name: value for name, value in record.items() if name != "layers"}
  summary["total_s"] = round(time.perf_counter() - started, 1)
  print(json.dumps(summary | {"key": key, "choices": {key: [
      (e["kind"], e["kernel"][0], e["stride"][0], e["batch"], e["in_hw"][0], e["in_channels"], e["out_channels"],
       e["choice"]) for e in entries]}}))
  return table


def run_choices(args) -> dict[str, Any]:
  """Per layer of each model: the shipped table's choice, and the measured ratio where the table has the shape."""
  table, key = conv.load_table(), conv.table_key()
  record = table.get("backends", {}).get(key, {})
  print(f"table for {key}: {record.get('host', 'not measured: the first CPU table')}, {record.get('date', '?')}, "
        f"jax {record.get('jax', '?')}")
  result = {}
  measured = {(e["kind"], tuple(e["kernel"]), tuple(e["stride"]), e["batch"], tuple(e["in_hw"]), e["in_channels"],
               e["out_channels"]): e for e in conv.table_layers(table, key)}
  for name in [name for name in args.models.split(",") if name]:
    print(f"\n{name}: {MODELS[name]}; the measured time over XLA's of the other formulation (95% interval), where "
          "this shape was measured")
    rows = []
    for layer in model_layers(name):
      choice = conv.choose(layer["input_shape"], layer["kernel_shape"], layer["strides"], layer["padding"],
                           layer["groups"])
      batch, height, width, in_channels = layer["input_shape"]
      entry = measured.get((_kind(layer), tuple(layer["kernel_shape"][:2]), tuple(layer["strides"]), batch,
                            (height, width), in_channels, layer["kernel_shape"][-1]))
      ratio = ", ".join(f"{other} {r:.2f} ({lo:.2f}-{hi:.2f})" for other, (r, lo, hi) in
                        (entry or {}).get("ratio_to_xla", {}).items() if other in conv.FORMULATIONS)
      rows.append((layer["path"], choice, ratio))
      print(f"  {layer['path']:<24} {str(tuple(layer['input_shape'])):<20} k{layer['kernel_shape'][0]} "
            f"s{layer['strides'][0]} -> {layer['kernel_shape'][-1]:<5} {choice:<8} {ratio}")
    result[name] = rows
  print(json.dumps(result))
  return result


# ----------------------------------------------------------------------------
# Lite0 beside PyTorch.


def torch_lite0(state_dict, device):
  """EfficientNet-Lite0 in PyTorch with the checkpoint's layout (``efficientnet.LITE0_STAGES``), ``state_dict``
  loaded strictly."""
  import torch  # pylint: disable=g-import-not-at-top
  functional = torch.nn.functional

  class SameConv(torch.nn.Conv2d):
    """TensorFlow's 'SAME': the convolution's own padding when symmetric, an ``F.pad`` first when not."""

    def __init__(self, inputs, outputs, kernel, stride=1, groups=1):
      super().__init__(inputs, outputs, kernel, stride, groups=groups, bias=False)
      self.asymmetric = {}

    def forward(self, x):
      size = tuple(x.shape[-2:])
      if size not in self.asymmetric:
        pads = efficientnet.same_padding(size, self.kernel_size[0], self.stride[0])
        symmetric = all(low == high for low, high in pads)
        self.padding = (pads[0][0], pads[1][0]) if symmetric else (0, 0)
        self.asymmetric[size] = None if symmetric else (*pads[1], *pads[0])
      if self.asymmetric[size] is not None:
        x = functional.pad(x, self.asymmetric[size])
      return super().forward(x)

  def norm(channels):
    return torch.nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

  class Block(torch.nn.Module):

    def __init__(self, kernel, stride, expansion, inputs, outputs):
      super().__init__()
      hidden = inputs * expansion
      self.expansion, self.skip = expansion, stride == 1 and inputs == outputs
      if expansion != 1:
        self._expand_conv, self._bn0 = SameConv(inputs, hidden, 1), norm(hidden)
      self._depthwise_conv, self._bn1 = SameConv(hidden, hidden, kernel, stride, groups=hidden), norm(hidden)
      self._project_conv, self._bn2 = SameConv(hidden, outputs, 1), norm(outputs)

    def forward(self, inputs):
      x = inputs
      if self.expansion != 1:
        x = functional.relu6(self._bn0(self._expand_conv(x)))
      x = self._bn2(self._project_conv(functional.relu6(self._bn1(self._depthwise_conv(x)))))
      return x + inputs if self.skip else x

  class Lite0(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2), norm(32)
      blocks, inputs = [], 32
      for repeats, kernel, stride, expansion, outputs in efficientnet.LITE0_STAGES:
        for index in range(repeats):
          blocks.append(Block(kernel, stride if index == 0 else 1, expansion, inputs, outputs))
          inputs = outputs
      self._blocks = torch.nn.ModuleList(blocks)
      self._conv_head, self._bn1 = SameConv(inputs, 1280, 1), norm(1280)
      self._fc = torch.nn.Linear(1280, NUM_CLASSES)

    def forward(self, x):
      x = functional.relu6(self._bn0(self._conv_stem(x)))
      for block in self._blocks:
        x = block(x)
      return self._fc(functional.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3)))

  model = Lite0()
  model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()})
  return model.to(device)


def run_lite0(args) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from depthwise import train_step_of  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  started = time.perf_counter()
  rng = np.random.RandomState(0)
  images = rng.randn(args.batch, args.size, args.size, 3).astype(np.float32)
  labels = rng.randint(0, NUM_CLASSES, args.batch)
  # the images go to the stem as they are on both sides (the package's ImageNet-to-Lite map is one affine op)
  lite0 = functools.partial(models.efficientnet_lite0, num_classes=NUM_CLASSES, input_normalization="none")
  model = lite0()
  variables = models.init_variables(model, 0, args.size)
  tx = optax.sgd(args.learning_rate, momentum=0.9)
  print(f"jax {jax.__version__} on {jax.default_backend()}; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; {host()}")
  print(f"EfficientNet-Lite0 ({NUM_CLASSES}-class head), {args.size}x{args.size}, batch {args.batch}, "
        f"{args.repeats} interleaved rounds of {args.block}-step blocks", flush=True)

  # (model, forced formulation): before = the model as it was, depthwise shifted and every other layer XLA's
  variants = {"before": (lite0(depthwise="shifted"), "xla"),
              "auto": (model, None)}
  if args.with_xla:
    variants["xla"] = (model, "xla")
  steps, compile_s = {}, {}
  for name, (variant_model, forced) in variants.items():
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
    jx, jy = jnp.asarray(images), jnp.asarray(labels)
    start = time.perf_counter()
    with conv.force(forced):
      compiled = train_step_of(variant_model, tx).lower(*state, jx, jy).compile()
    compile_s[name] = round(time.perf_counter() - start, 1)

    def run(count=1, compiled=compiled, state=state, jx=jx, jy=jy):
      for _ in range(count):
        state[0], state[1], state[2], loss, _ = compiled(*state, jx, jy)
      return jax.block_until_ready(loss)

    steps[f"jax {name}"] = run

  device = torch.device("cpu")
  torch_model = torch_lite0(models.to_torchvision(jax.device_get(variables), arch="efficientnet-lite0",
                                                  num_classes=NUM_CLASSES), device).train()
  optimizer = torch.optim.SGD(torch_model.parameters(), lr=args.learning_rate, momentum=0.9, foreach=True)
  torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  torch_labels = torch.from_numpy(labels.astype(np.int64))
  # the same function on both sides: train-mode logits (batch statistics) from the same weights, before any step
  jax_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
  initial = {key: value.clone() for key, value in torch_model.state_dict().items()}
  with torch.no_grad():
    reference = torch_model(torch_images).numpy().astype(np.float64)
  torch_model.load_state_dict(initial)   # the running statistics as they were
  logits_difference = float(np.max(np.abs(np.asarray(jax_logits, np.float64) - reference)) / np.max(np.abs(reference)))
  print(f"train-mode logits, JAX vs PyTorch from the same weights: {logits_difference:.1e} of the largest", flush=True)

  def torch_step(count=1):
    for _ in range(count):
      optimizer.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(torch_model(torch_images), torch_labels).backward()
      optimizer.step()

  steps["torch"] = torch_step
  times = interleaved_times(steps, args.repeats, warmup=1, block=args.block)
  result: dict[str, Any] = {"ms": {name: round(1e3 * float(np.median(t)), 1) for name, t in times.items()},
                            "ratios": {}, "compile_s": compile_s, "logits_difference": logits_difference}
  pairs = [(f"jax {name}", "torch") for name in variants] + [("jax auto", "jax before")]
  if args.with_xla:
    pairs.append(("jax auto", "jax xla"))
  print(f"\n{'step':<11} {'median ms':>10}")
  for name, t in times.items():
    print(f"{name:<11} {1e3 * float(np.median(t)):10.1f}")
  print(f"\n{'ratio':<24} {'median':>7} {'95% interval':>14}")
  for a, b in pairs:
    per_round = times[a] / times[b]
    low, high = median_interval(per_round)
    result["ratios"][f"{a} / {b}"] = [round(float(np.median(per_round)), 3), round(low, 3), round(high, 3)]
    print(f"{a + ' / ' + b:<24} {float(np.median(per_round)):7.3f} {f'{low:.3f}-{high:.3f}':>14}")
  result["config"] = {"size": args.size, "batch": args.batch, "repeats": args.repeats, "block": args.block,
                      "threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
                      "host": host(), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
  result["total_s"] = round(time.perf_counter() - started, 1)
  print(f"total {result['total_s']:.0f} s")
  print(json.dumps(result))
  return result


def run_maxpool(args) -> dict[str, Any]:
  """The ResNet stem's max-pool (3x3, stride 2, padding 1), forward and backward, in both formulations."""
  rng = np.random.default_rng(0)
  # the stem's ReLU output: the max-pool's input in the ResNets, with its ties at zero
  x = jnp.asarray(np.maximum(rng.normal(size=(args.batch, args.size // 2, args.size // 2, args.channels)), 0),
                  jnp.float32)
  out_shape = jax.eval_shape(lambda x: pool.max_pool(x, 3, 2, ((1, 1), (1, 1)), "xla"), x).shape
  cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
  functions = {name: jax.jit(jax.grad(lambda x, c, name=name: jnp.vdot(
      pool.max_pool(x, 3, 2, ((1, 1), (1, 1)), name), c))) for name in pool.FORMULATIONS}
  calls = {name: (lambda count=1, f=f: [jax.block_until_ready(f(x, cotangent)) for _ in range(count)])
           for name, f in functions.items()}
  print(f"jax {jax.__version__} on {jax.default_backend()}; {host()}; max-pool of {tuple(x.shape)}; "
        f"{args.repeats} interleaved rounds", flush=True)
  times = interleaved_times(calls, args.repeats, warmup=1)
  per_round = times["shifted"] / times["xla"]
  result = {"input": list(x.shape), "ms": {name: round(1e3 * float(np.median(t)), 3) for name, t in times.items()},
            "shifted_over_xla": [round(float(np.median(per_round)), 3),
                                 *(round(v, 3) for v in median_interval(per_round))],
            "chosen_here": pool.choose()}
  print(json.dumps(result))
  return result


def main(argv=None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  layers = commands.add_parser("layers", help="time every formulation per layer shape (the table)")
  layers.add_argument("--repeats", type=int, default=7, help="interleaved rounds per layer (default: %(default)s)")
  layers.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
  layers.add_argument("--candidates", action="store_true", help="also time the formulations the package does not ship")
  layers.add_argument("--write", action="store_true", help=f"write the table to dtnh_jax/models/{conv.TABLE_FILE}")
  choices = commands.add_parser("choices", help="the shipped table's choice per layer of each model")
  choices.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
  lite0 = commands.add_parser("lite0", help="Lite0's fine-tuning step in JAX (before, after) and in PyTorch")
  lite0.add_argument("--size", type=int, default=32, help="image height and width (default: %(default)s)")
  lite0.add_argument("--batch", type=int, default=48, help="images per step (default: %(default)s)")
  lite0.add_argument("--repeats", type=int, default=10, help="timed rounds (default: %(default)s)")
  lite0.add_argument("--block", type=int, default=2, help="steps per variant and round (default: %(default)s)")
  lite0.add_argument("--learning-rate", type=float, default=0.01, help="SGD's (default: %(default)s)")
  lite0.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count(), help="torch.set_num_threads (default: the usable cores, %(default)s)")
  lite0.add_argument("--with-xla", action="store_true",
                     help="also every layer XLA's (the grouped convolution for depthwise layers: slow on a CPU)")
  maxpool = commands.add_parser("maxpool", help="the ResNet stem's max-pool, forward and backward, both formulations")
  maxpool.add_argument("--size", type=int, default=96, help="the images' height and width (default: %(default)s)")
  maxpool.add_argument("--batch", type=int, default=16, help="images per call (default: %(default)s)")
  maxpool.add_argument("--channels", type=int, default=64, help="the stem's output channels (default: %(default)s)")
  maxpool.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default: %(default)s)")
  args = parser.parse_args(argv)
  args.argv = argv
  if args.command == "layers":
    return run_layers(args)
  if args.command == "choices":
    return run_choices(args)
  if args.command == "maxpool":
    return run_maxpool(args)
  return run_lite0(args)


if __name__ == "__main__":
  main()
