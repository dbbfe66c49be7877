"""The training loop: one run of one method, resumable from its workdir.

``train(config, workdir)`` fine-tunes from ``config.source`` on
``config.dataset`` and leaves in ``workdir``:

- ``config.json`` — the run's settings (a different config in the same
  workdir is refused: it would mix two runs);
- ``metrics.jsonl`` — one line per train step (losses split into empirical
  and regularizer parts, DTNH's angles and conflict) and per evaluation;
- ``tensorboard/`` — the same scalars for TensorBoard;
- ``checkpoints/`` — orbax checkpoints (state, data position, RNG);
- ``results.json`` / ``results.md`` and the plots ``losses.png``, ``angles.png``.

Running it again with the same workdir resumes from the newest readable
checkpoint and produces the same metrics and parameters as an uninterrupted
run, also after a kill at any point (``tests/test_faults.py``): the files
besides the checkpoints are replaced atomically, and metric lines after the
checkpoint resumed from (or cut short by the kill) are dropped.

A step whose loss or update is NaN/Inf is never applied (see ``step.py``);
with ``on_nonfinite="stop"`` the run then stops with
:class:`NonFiniteLossError` before its next checkpoint, with ``"skip"`` it
goes on (the metric ``skipped`` marks such steps).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import models, regularizers
from dtnh_jax.train import checkpoint, report, sharding, step as step_lib
from dtnh_jax.train.config import ConfigError, TrainConfig
from dtnh_jax.train.data import RunData, load_data
from dtnh_jax.train.sources import load_source

# Settings a run may resume with changed: they do not change its numbers (on_nonfinite: a run
# stopped by a NaN loss can go on with "skip"; fsdp, like the number of devices, only lays the
# state out differently: rounding-level differences).
_BOOKKEEPING = {"eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "data_dir", "eval_batch_size",
                "on_nonfinite", "fsdp"}


class NonFiniteLossError(RuntimeError):
  """A step's loss or update was NaN/Inf and ``config.on_nonfinite`` is ``"stop"``."""


def _write_atomically(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that a kill leaves the old file or the new one, never a part."""
  partial = f"{path}.tmp{os.getpid()}"
  with open(partial, "w") as f:
    f.write(text)
  os.replace(partial, path)


def _check_config(workdir: str, config: TrainConfig) -> None:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    current = json.loads(config.to_json())
    # a setting added to TrainConfig after the run started has its default there
    defaults = json.loads(TrainConfig().to_json())
    differs = sorted(k for k in current
                     if k not in _BOOKKEEPING and previous.get(k, defaults.get(k)) != current[k])
    if differs:
      raise ConfigError(
          f"--workdir {workdir} holds a run with other settings ({', '.join(differs)}); resuming it with "
          "these would mix two runs. Use a new --workdir, or the same settings to resume.")
  _write_atomically(path, config.to_json())


class MetricsLog:
  """``metrics.jsonl`` (truncated to the restored step on resume) and TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:  # the last line, cut short by a kill (only whole lines are before it)
            break
          if record["step"] <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    # lines after the checkpoint resumed from would be written again; a kill while this
    # runs leaves the old file or the new one
    _write_atomically(self.path, "".join(kept))
    self._file = open(self.path, "a")
    self._tensorboard = None
    try:
      from tensorboardX import SummaryWriter  # optional; metrics.jsonl is the record
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    if self._tensorboard is not None:
      for key, value in record.items():
        if key not in ("step", "kind") and np.ndim(value) == 0:
          self._tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])

  def flush(self) -> None:
    self._file.flush()
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    self._file.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


class _OtherProcessLog:
  """The metrics log of processes other than 0: process 0 writes the run's files."""

  def write(self, record: dict[str, Any]) -> None:
    del record

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def create_model(config: TrainConfig, num_classes: int):
  """The run's network; with ``compute_dtype="bfloat16"`` it computes in bf16 and keeps float32
  parameters, so that gradients (and DTNH's inner products) are float32."""
  return models.create_model(config.arch, num_classes=num_classes, width=config.width,
                             small_stem=config.small_stem, dtype=jnp.dtype(config.compute_dtype))


def initial_variables(config: TrainConfig, data: RunData, offline_sources=None) -> dict[str, Any]:
  """The variables fine-tuning starts from: the source backbone and a fresh head for the target."""
  head_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  return models.replace_head(load_source(config, offline_sources), data.num_classes, head_key)


def delta_attention(model, initial, data: RunData, config: TrainConfig, num_batches: int = 4):
  """DELTA's channel attention for a run starting from ``initial``.

  As the DELTA authors' code: the new head is first fitted on the frozen
  source features (so that zeroing a channel changes a meaningful loss), then
  each channel's loss increase over a few training batches gives the attention.
  Computed in float32 whatever the run's compute dtype: it ranks channels by
  small differences of the loss.
  """
  model = model.clone(dtype=jnp.float32)
  loader = data.train_loader(config.seed + 1)
  batches = [next(loader) for _ in range(max(num_batches, 1))]
  fitted = regularizers.fit_head(model, initial, batches)
  return regularizers.delta_channel_attention(model, fitted, batches, config.feature_layers)


def cached_attention(path: str, compute: Callable[[], dict[str, Any]]) -> dict[str, np.ndarray]:
  """DELTA's attention from ``path``, computed with ``compute()`` and saved there first if missing."""
  if not os.path.exists(path):
    regularizers.save_attention(path, compute())
  return regularizers.load_attention(path)


def _non_finite(config: TrainConfig, record: dict[str, Any], log: MetricsLog,
                checkpoints: checkpoint.Checkpoints) -> None:
  """A step whose update was not applied (NaN/Inf): warn and go on, or stop the run."""
  what = f"step {record['step']}: the loss or the update is not finite (empirical loss {record['loss_empirical']})"
  if config.on_nonfinite == "skip":
    warnings.warn(f"{what}; the step was skipped (--on-nonfinite skip).", RuntimeWarning, stacklevel=3)
    return
  log.flush()
  checkpoints.wait()
  last_good = checkpoints.latest_step()
  kept = (f"the newest checkpoint (step {last_good}) holds the last good state and a rerun resumes from it"
          if last_good is not None else "no checkpoint was written before it")
  raise NonFiniteLossError(
      f"{what}; the run stops, and {kept}. Lower --learning-rate or check the data, or rerun with "
      "--on-nonfinite skip to skip such steps.")


def _to_python(metrics: dict[str, Any]) -> dict[str, Any]:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}


def train(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    stop_after: int | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    offline_sources: dict[str, Callable] | None = None,
    data: RunData | None = None,
    attention: Any = None,
    export_to: str | os.PathLike | None = None,
    plots: bool = True,
) -> dict[str, Any]:
  """Fine-tunes one method; resumes from ``workdir`` if it holds checkpoints.

  Args:
    config: the run's settings.
    workdir: where checkpoints, metrics, plots and results go.
    stop_after: return after this many steps of this call (checkpointing
      first), as if the run were interrupted; run again to resume.
    progress: called as ``progress(step, total, latest_metrics)`` after each step.
    offline_sources: loaders of named sources (see ``dtnh_jax.train.offline``).
    data: the run's data, if already built (the offline default shares it).
    attention: DELTA's channel attention, if already computed; otherwise it
      is computed once and cached in ``workdir/delta_attention.npz``.
    export_to: also write the final variables there as an orbax checkpoint
      that ``--source`` and ``dtnh_jax.models.load_variables`` read.
    plots: write ``losses.png`` and ``angles.png`` (a grid of runs plots once
      for all of them instead).

  Returns:
    The final results: test accuracy and loss, and the run's settings; also
    written to ``workdir/results.json``. With ``stop_after`` and steps left,
    ``{"stopped_at": step}``.
  """
  workdir = os.fspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:  # a file in the way, no permission, ...
    raise ConfigError(f"--workdir: cannot create the directory {workdir} ({error.strerror or error}).") from None
  _check_config(workdir, config)
  method = config.method_spec
  data = data or load_data(config, *sharding.process_shard())  # this process's shard of the data
  model = create_model(config, data.num_classes)

  initial = initial_variables(config, data, offline_sources)
  if method.regularizer == "delta" and attention is None:
    attention = cached_attention(os.path.join(workdir, "delta_attention.npz"),
                                 lambda: delta_attention(model, initial, data, config))
  reference = step_lib.Reference(initial, attention)

  tx, train_step, eval_step = step_lib.compiled_steps(model, step_lib.step_config(config), data.steps_per_epoch)
  state = step_lib.create_train_state(initial, tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  # on the mesh of all devices: batches split over them, state and reference replicated or FSDP-sharded
  placement = sharding.Placement.create(state, reference, fsdp=config.fsdp, batch_size=config.batch_size)
  state, reference = placement.put_state(state), placement.put_reference(reference)
  train_step, eval_step = placement.jit_train_step(train_step), placement.jit_eval_step(eval_step)
  train_loader = data.train_loader(config.seed)
  checkpoints = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
  restored = checkpoints.restore(checkpoint.abstract(state))
  start = 0
  if restored is not None:
    start, state, data_state, _ = restored
    train_loader.set_state(sharding.local_data_state(data_state))
  log = MetricsLog(workdir, resume_step=start) if sharding.is_chief() else _OtherProcessLog()

  pending: list[tuple[int, dict[str, Any]]] = []  # device metrics, fetched every log_every steps
  started = time.perf_counter()
  step = start
  try:
    while step < config.steps:
      state, metrics = train_step(state, placement.put_batch(next(train_loader)), reference)
      step += 1
      pending.append((step, metrics))
      last = step == config.steps
      stopping = stop_after is not None and step - start >= stop_after
      evaluating = step % config.eval_every == 0 or last
      checkpointing = step % config.checkpoint_every == 0 or last or stopping
      # before an evaluation or a checkpoint every step's metrics are on hand: a checkpoint
      # covers all lines up to its step, and none is written after a non-finite step
      if step % config.log_every == 0 or last or stopping or evaluating or checkpointing:
        # one transfer per metric for all pending steps, not one per scalar
        stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *[values for _, values in pending]))
        for row, (logged_step, _) in enumerate(pending):
          record = {"step": logged_step, "kind": "train", **_to_python(jax.tree.map(lambda x: x[row], stacked))}
          log.write(record)
          if record["skipped"]:
            _non_finite(config, record, log, checkpoints)
        pending.clear()
      if evaluating:
        eval_batches = map(placement.put_batch, data.eval_batches())
        log.write({"step": step, "kind": "eval", **step_lib.evaluate(eval_step, state, eval_batches)})
      if checkpointing:
        log.flush()  # metrics up to this step are on disk before the checkpoint that covers them
        checkpoints.save(step, state, train_loader.get_state(),
                         {"elapsed_s": time.perf_counter() - started, "method": method.name})
      if progress is not None:
        progress(step, config.steps, metrics)
      if stopping and not last:
        return {"stopped_at": step}
  finally:
    checkpoints.close()
    log.close()

  sharding.sync("metrics written")  # process 0's metrics.jsonl is complete before any process reads it
  records = report.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  final = [r for r in records if r["kind"] == "eval"][-1]
  results = {"method": method.name, "label": method.label, "source": config.source, "dataset": config.dataset,
             "seed": config.seed, "steps": config.steps, "test_accuracy": final["test_accuracy"],
             "test_loss": final["test_loss"]}
  if sharding.is_chief():
    _write_atomically(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    report.write_run_report(workdir, records, results, plots=plots)
  if export_to is not None:
    # host copies: the exported weights load on any number of devices
    models.save_variables(export_to, sharding.to_host({"params": state.params, "batch_stats": state.batch_stats}),
                          {"arch": config.arch, "width": config.width, "small_stem": config.small_stem,
                           "dataset": config.dataset, "method": method.name}, force=True)
  return results
