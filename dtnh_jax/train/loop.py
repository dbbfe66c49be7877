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

Running it again with the same workdir resumes from the newest checkpoint and
produces the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import models, regularizers
from dtnh_jax.train import checkpoint, report, step as step_lib
from dtnh_jax.train.config import ConfigError, TrainConfig
from dtnh_jax.train.data import RunData, load_data
from dtnh_jax.train.sources import load_source

_BOOKKEEPING = {"eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "data_dir", "eval_batch_size"}


def _check_config(workdir: str, config: TrainConfig) -> None:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    current = json.loads(config.to_json())
    differs = sorted(k for k in current if k not in _BOOKKEEPING and previous.get(k) != current[k])
    if differs:
      raise ConfigError(
          f"--workdir {workdir} holds a run with other settings ({', '.join(differs)}); resuming it with "
          "these would mix two runs. Use a new --workdir, or the same settings to resume.")
  with open(path, "w") as f:
    f.write(config.to_json())


class MetricsLog:
  """``metrics.jsonl`` (truncated to the restored step on resume) and TensorBoard scalars."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    with open(self.path, "w") as f:
      f.writelines(kept)
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


def initial_variables(config: TrainConfig, data: RunData, offline_sources=None) -> dict[str, Any]:
  """The variables fine-tuning starts from: the source backbone and a fresh head for the target."""
  head_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  return models.replace_head(load_source(config, offline_sources), data.num_classes, head_key)


def delta_attention(model, initial, data: RunData, config: TrainConfig, num_batches: int = 4):
  """DELTA's channel attention for a run starting from ``initial``.

  As the DELTA authors' code: the new head is first fitted on the frozen
  source features (so that zeroing a channel changes a meaningful loss), then
  each channel's loss increase over a few training batches gives the attention.
  """
  loader = data.train_loader(config.seed + 1)
  batches = [next(loader) for _ in range(max(num_batches, 1))]
  fitted = regularizers.fit_head(model, initial, batches)
  return regularizers.delta_channel_attention(model, fitted, batches, config.feature_layers)


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
  os.makedirs(workdir, exist_ok=True)
  _check_config(workdir, config)
  method = config.method_spec
  data = data or load_data(config)
  model = models.create_model(config.arch, num_classes=data.num_classes, width=config.width,
                              small_stem=config.small_stem)

  initial = initial_variables(config, data, offline_sources)
  if method.regularizer == "delta" and attention is None:
    cached = os.path.join(workdir, "delta_attention.npz")
    if not os.path.exists(cached):
      regularizers.save_attention(cached, delta_attention(model, initial, data, config))
    attention = regularizers.load_attention(cached)
  reference = step_lib.Reference(initial, attention)

  tx, train_step, eval_step = step_lib.compiled_steps(model, step_lib.step_config(config), data.steps_per_epoch)
  state = step_lib.create_train_state(initial, tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  train_loader = data.train_loader(config.seed)
  checkpoints = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
  restored = checkpoints.restore(checkpoint.abstract(state))
  start = 0
  if restored is not None:
    start, state, data_state, _ = restored
    train_loader.set_state(data_state)
  log = MetricsLog(workdir, resume_step=start)

  pending: list[tuple[int, dict[str, Any]]] = []  # device metrics, fetched every log_every steps
  started = time.perf_counter()
  step = start
  try:
    while step < config.steps:
      state, metrics = train_step(state, next(train_loader), reference)
      step += 1
      pending.append((step, metrics))
      last = step == config.steps
      stopping = stop_after is not None and step - start >= stop_after
      evaluating = step % config.eval_every == 0 or last
      if step % config.log_every == 0 or last or stopping or evaluating:
        # one transfer per metric for all pending steps, not one per scalar
        stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *[values for _, values in pending]))
        for row, (logged_step, _) in enumerate(pending):
          log.write({"step": logged_step, "kind": "train", **_to_python(jax.tree.map(lambda x: x[row], stacked))})
        pending.clear()
      if evaluating:
        log.write({"step": step, "kind": "eval", **step_lib.evaluate(eval_step, state, data.eval_batches())})
      if step % config.checkpoint_every == 0 or last or stopping:
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

  records = report.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  final = [r for r in records if r["kind"] == "eval"][-1]
  results = {"method": method.name, "label": method.label, "source": config.source, "dataset": config.dataset,
             "seed": config.seed, "steps": config.steps, "test_accuracy": final["test_accuracy"],
             "test_loss": final["test_loss"]}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  report.write_run_report(workdir, records, results, plots=plots)
  if export_to is not None:
    models.save_variables(export_to, {"params": state.params, "batch_stats": state.batch_stats},
                          {"arch": config.arch, "width": config.width, "small_stem": config.small_stem,
                           "dataset": config.dataset, "method": method.name}, force=True)
  return results
