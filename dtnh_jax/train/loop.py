"""The training loop: one run of one method, resumable from its workdir.

``train(config, workdir)`` fine-tunes from ``config.source`` on
``config.dataset`` and leaves in ``workdir``:

- ``config.json`` — the run's settings (a command with other settings is
  refused, naming the flags; ``restart=True`` sets the old run aside:
  ``dtnh_jax.train.workdir``);
- ``metrics.jsonl`` — one strict-JSON line per train step (losses split into
  empirical and regularizer parts, DTNH's angles and conflict) and per
  evaluation (``dtnh_jax.train.metrics``);
- ``tensorboard/`` — the same scalars for TensorBoard;
- ``checkpoints/`` — orbax checkpoints (state, data position, RNG), verified
  against their checksums when restored (``dtnh_jax.train.checkpoint``);
- ``results.json`` / ``results.md`` and the plots ``losses.png``, ``angles.png``.

Every check that can fail runs before the first write, and one process at a
time works in a workdir. Running the same command again resumes from the
newest checkpoint that verifies and produces the same metrics and parameters
as an uninterrupted run, also after a kill at any point
(``tests/test_faults.py``): the files besides the checkpoints are replaced
atomically, and metric lines after the checkpoint resumed from (or cut short
by the kill) are dropped. SIGINT/SIGTERM finish the step and checkpoint it
first (``dtnh_jax.train.interrupts``). A finished run returns its results.

A step whose loss or update is NaN/Inf is never applied (see ``step.py``);
with ``on_nonfinite="stop"`` the run then stops with
:class:`NonFiniteLossError` before its next checkpoint, with ``"skip"`` it
goes on (the metric ``skipped`` marks such steps) until more than
``skip_limit`` of the steps were skipped, and with ``"record"`` the run ends
there and its results record it as diverged (``diverged_at_step``) at chance
accuracy, what a network whose weights went to NaN/Inf is worth: a grid goes
on to its next run, and a λ grid's selection never picks it over a run that
learned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dtnh_jax import models, names, regularizers
from dtnh_jax.train import checkpoint, interrupts, plan, provenance, report, sharding, step as step_lib
from dtnh_jax.train import metrics as metrics_lib
from dtnh_jax.train import workdir as workdir_lib
from dtnh_jax.train.config import ConfigError, TrainConfig
from dtnh_jax.train.data import RunData, load_data
from dtnh_jax.train.sources import load_source

__all__ = [
    "cached_attention",
    "create_model",
    "delta_attention",
    "initial_variables",
    "NonFiniteLossError",
    "train",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A step's loss or update was NaN/Inf and ``config.run.on_nonfinite`` is ``"stop"``, or more steps were
  skipped than ``config.run.skip_limit`` allows."""


def create_model(config: TrainConfig, num_classes: int):
  """The run's network; with ``compute_dtype="bfloat16"`` it computes in bf16 and keeps float32
  parameters, so that gradients (and DTNH's inner products) are float32."""
  return models.create_model(config.model.arch, num_classes=num_classes, width=config.model.width,
                             small_stem=config.model.small_stem, dtype=jnp.dtype(config.model.compute_dtype),
                             bn_momentum=config.model.bn_momentum)


def initial_variables(config: TrainConfig, data: RunData) -> dict[str, Any]:
  """The variables fine-tuning starts from: the source backbone and a fresh head for the target."""
  head_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
  return models.replace_head(load_source(config), data.num_classes, head_key)


def delta_attention(model, config: TrainConfig, data: RunData, num_batches: int = 4):
  """DELTA's channel attention for ``config``'s source and data.

  As the DELTA authors' ``channel_eval.py``: the new head is first fitted on
  the frozen source network over the whole training loader for 10 epochs
  (``train_classifier``; here the pooled features of one pass over the
  training set, ``data.steps_per_epoch`` batches, reused each epoch, see
  ``regularizers.fit_head``), so that zeroing a channel changes a meaningful
  loss; then each channel's loss increase over the first ``num_batches``
  batches of a fresh pass (``feature_weight``: 4) gives the attention.
  It describes the source network on the target data, not a run: the same for
  every seed (the head it fits starts from seed 0's and the batches are seed
  1's), so runs that differ in their seed share it. Computed in float32
  whatever the run's compute dtype: it ranks channels by small differences of
  the loss.
  """
  model = model.clone(dtype=jnp.float32)
  config = config.replace(seed=0)
  initial = initial_variables(config, data)
  loader = data.train_loader(config.seed + 1)
  # a generator: one epoch of images is never held in memory at once (only its pooled features are)
  fitted = regularizers.fit_head(model, initial, (next(loader) for _ in range(data.steps_per_epoch)))
  batches = [next(loader) for _ in range(max(num_batches, 1))]
  return regularizers.delta_channel_attention(model, fitted, batches, config.regularizer.feature_layers)


def cached_attention(path: str, compute: Callable[[], dict[str, Any]]) -> dict[str, np.ndarray]:
  """DELTA's attention from ``path``, computed with ``compute()`` and saved there first if missing."""
  if not os.path.exists(path):
    regularizers.save_attention(path, compute())
  return regularizers.load_attention(path)


class _SkippedSteps:
  """The steps ``--on-nonfinite skip`` skipped: one warning at the first, a stop past ``config.run.skip_limit``."""

  def __init__(self, config: TrainConfig, count: int):
    self.config, self.count, self._warned = config, count, False
    self.limit = math.ceil(config.run.skip_limit * config.recipe.steps)  # at most this many

  def add(self, record: dict[str, Any]) -> None:
    self.count += 1
    what = f"step {record['step']}: the loss or the update is not finite"
    if self.count > self.limit:
      raise NonFiniteLossError(
          f"{what}; {self.count} of {self.config.recipe.steps} steps skipped, more than --skip-limit "
          f"{self.config.run.skip_limit:g} allows: the run is diverging, not meeting a few bad batches. Lower "
          "--learning-rate (with --restart), or check the data.")
    if not self._warned:
      self._warned = True
      warnings.warn(f"{what} (empirical loss {record['loss_empirical']}); the step was skipped (--on-nonfinite "
                    "skip). Further skipped steps are counted, not reported one by one; the run stops if more "
                    f"than {self.limit} are.", RuntimeWarning, stacklevel=3)


def _stop_on_non_finite(record: dict[str, Any], log: metrics_lib.MetricsLog,
                        checkpoints: checkpoint.Checkpoints) -> None:
  """A step whose update was not applied (NaN/Inf) with ``--on-nonfinite stop``."""
  log.flush()
  checkpoints.wait()
  last = checkpoints.latest_step()
  kept = (f"its newest checkpoint (step {last}) was saved before that step: a rerun resumes from the newest "
          "checkpoint that verifies" if last is not None else "no checkpoint was written before that step")
  raise NonFiniteLossError(
      f"step {record['step']}: the loss or the update is not finite (empirical loss {record['loss_empirical']}); "
      f"the run stops, and {kept}. Rerun with --on-nonfinite skip to skip such steps, or with a lower "
      "--learning-rate and --restart (the stopped run is set aside), or check the data.")


def _fetch(pending: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, np.ndarray]]]:
  """The pending steps' device metrics on the host: one transfer per metric for all the steps that have it,
  not one per scalar (a plain method's steps that log no angles have fewer metrics)."""
  keys = list(dict.fromkeys(key for _, values in pending for key in values))
  rows = {key: [row for row, (_, values) in enumerate(pending) if key in values] for key in keys}
  stacked = jax.device_get({key: jnp.stack([pending[row][1][key] for row in rows[key]]) for key in keys})
  fetched = [(step, {}) for step, _ in pending]
  for key in keys:
    for position, row in enumerate(rows[key]):
      fetched[row][1][key] = stacked[key][position]
  return fetched


def _progress_values(fetched: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, float]:
  """What a progress display shows of the steps just fetched: the newest value of each scalar metric, and the
  fraction of the steps that log angles where the gradients conflicted."""
  shown = {k: float(v) for _, values in fetched for k, v in values.items() if np.ndim(v) == 0}
  conflicts = [values["conflict"] for _, values in fetched if "conflict" in values]
  if conflicts:
    shown["conflict_rate"] = float(np.mean(conflicts))
  return shown


def _to_python(metrics: dict[str, Any]) -> dict[str, Any]:
  return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in metrics.items()}


def _has_checkpoint(workdir: str) -> bool:
  try:
    return any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
  except (FileNotFoundError, NotADirectoryError):
    return False


def _finished(workdir: str) -> dict[str, Any] | None:
  """The results of the run in ``workdir`` if it ran to its end, else None."""
  try:
    with open(os.path.join(workdir, workdir_lib.RESULTS)) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None  # not finished, or its results.json is damaged: the final checkpoint writes it again
  return results if isinstance(results, dict) and "test_accuracy" in results else None


def _prepare_workdir(workdir: str, config: TrainConfig, restart: bool) -> dict[str, Any] | None:
  """Checks the run already in ``workdir`` against ``config``, before anything is written.

  Returns its results if it is finished (nothing to do). A run with other
  settings is refused, unless ``restart``, or unless it has neither a
  checkpoint nor results (a start that failed: nothing to resume), in which
  case it is set aside when the new run begins (:func:`_begin`).
  """
  previous = workdir_lib.read_settings(workdir) if not restart else None
  if previous is None:
    return None
  if _has_checkpoint(workdir) or _finished(workdir) is not None:
    workdir_lib.check_settings(workdir, config, previous)
  elif workdir_lib.differing_settings(previous, config):
    return None
  return _finished(workdir)


def _begin(workdir: str, config: TrainConfig, restart: bool) -> None:
  """The first writes of a run: an old run set aside when it must be, then ``config.json``."""
  previous = workdir_lib.read_settings(workdir) if not restart else None
  if restart or (previous is not None and workdir_lib.differing_settings(previous, config)):
    aside = workdir_lib.set_aside(workdir)
    if aside is not None:
      # asked for with --restart; otherwise the user's files moved unasked, which they must hear of
      log = logger.info if restart else logger.warning
      why = "--restart" if restart else "it had other settings and neither a checkpoint nor results"
      log("the run in %s was set aside in %s (%s).", workdir, aside, why)
  workdir_lib.write_atomically(os.path.join(workdir, workdir_lib.CONFIG), config.to_json())


def train(
    config: TrainConfig,
    workdir: str | os.PathLike,
    *,
    stop_after: int | None = None,
    data: RunData | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
    export_to: str | os.PathLike | None = None,
    force_export: bool = False,
    restart: bool = False,
) -> dict[str, Any]:
  """Fine-tunes one method; resumes from ``workdir`` if it holds checkpoints.

  Every check that can fail (settings, export target, data, source, devices)
  runs before anything is written to ``workdir``; a failed start leaves
  nothing behind that blocks the corrected command. One process at a time
  works in a workdir (:class:`dtnh_jax.train.workdir.Lock`). A finished run
  run again returns its results without touching its files.

  Args:
    config: the run's settings.
    workdir: where checkpoints, metrics, plots and results go.
    stop_after: return after this many steps of this call (checkpointing
      first), as if the run were interrupted; run again to resume.
    progress: called as ``progress(step, total, latest)`` after each step, with
      ``latest`` the newest host values (Python floats): the last fetched
      train step's metrics (fetched every ``log_every`` steps, so the hook
      adds no device-to-host transfer), ``conflict_rate`` (the mean of
      ``conflict`` over the steps fetched with it) and, once there was an
      evaluation, ``test_accuracy``, ``test_loss`` and ``eval_step``. A new
      dict whenever something in it changed.
    data: the run's data (``load_data(config, ...)``), if already built; a
      grid of runs on one dataset shares it.
    export_to: also write the final variables there as an orbax checkpoint
      that ``--source`` and ``dtnh_jax.models.load_variables`` read: a new
      or empty folder, or one holding a checkpoint dtnh_jax wrote when
      ``force_export`` (see ``dtnh_jax.models.save_variables``).
    force_export: let ``export_to`` replace a checkpoint dtnh_jax wrote there.
    restart: set the run already in ``workdir`` aside (to
      ``workdir/set-aside/N``; nothing is deleted) and start anew.

  Returns:
    The final results: test accuracy and loss, and the run's settings; also
    written to ``workdir/results.json``. With ``stop_after`` and steps left,
    ``{"stopped_at": step}``.

  Raises:
    ConfigError: bad settings, source, data or export target; a workdir
      holding a run with other settings, or in use by another process.
    NonFiniteLossError: see ``config.run.on_nonfinite``.
    dtnh_jax.train.interrupts.Interrupted: SIGINT/SIGTERM during training,
      after the checkpoint of the current step is written.
  """
  workdir = os.fspath(workdir)
  plan.check_workdir(workdir)
  lock = workdir_lib.Lock(workdir).acquire() if sharding.is_chief() else None
  begun = False
  try:
    finished = _prepare_workdir(workdir, config, restart)
    if finished is not None and export_to is None:
      return finished
    if export_to is not None:
      try:
        models.check_save_target(export_to, force=force_export)
      except ValueError as error:
        raise ConfigError(f"--export: {error}") from None
    method = config.method_spec
    data = data or load_data(config, *sharding.process_shard())  # this process's shard of the data
    model = create_model(config, data.num_classes)
    initial = initial_variables(config, data)
    # one compiled step for every run with the same step_key: λ, its decay, the learning rate and its drops are
    # its inputs, in the reference
    steps = step_lib.steps_for(model, config, data.steps_per_epoch)
    state = step_lib.create_train_state(initial, steps.tx, jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
    reference = step_lib.Reference.of(config, initial)
    sharding.Placement.create(state, reference, fsdp=config.run.fsdp,
                              batch_size=config.recipe.batch_size)  # the devices' checks (the batch must split)

    # checks done: the run's first writes
    if sharding.is_chief():
      _begin(workdir, config, restart)
    begun = True
    sharding.sync("workdir ready")
    attention = None
    if method.regularizer == "delta":
      attention = cached_attention(os.path.join(workdir, "delta_attention.npz"),
                                   lambda: delta_attention(model, config, data))
    return _run(config, workdir, data, steps, state,
                reference._replace(attention=attention), stop_after=stop_after, progress=progress,
                export_to=export_to, force_export=force_export)
  finally:
    if lock is not None:
      lock.release(remove_empty_workdir=not begun)


def _evaluate(eval_step, state, data: RunData, placement) -> dict[str, float]:
  """Test loss and accuracy, and validation loss and accuracy when the data has a validation split."""
  evaluation = {}
  if data.val_batches is not None:
    evaluation.update(step_lib.evaluate(eval_step, state, map(placement.put_batch, data.val_batches()), "val"))
  evaluation.update(step_lib.evaluate(eval_step, state, map(placement.put_batch, data.eval_batches())))
  return evaluation


def _run(config, workdir, data, steps: step_lib.Steps, state, reference, *, stop_after, progress,
         export_to, force_export) -> dict[str, Any]:
  """The training loop of :func:`train`, once the workdir is ready."""
  method = config.method_spec
  # on the mesh of all devices: batches split over them, state and reference replicated or FSDP-sharded
  placement = sharding.Placement.create(state, reference, fsdp=config.run.fsdp, batch_size=config.recipe.batch_size)
  state, reference = placement.put_state(state), placement.put_reference(reference)
  # a plain regularized method's steps that log no angles run its one-backward-pass step (steps.train_step_at)
  steps = steps._replace(
      train_step=placement.jit_train_step(steps.train_step), eval_step=placement.jit_eval_step(steps.eval_step),
      summed_train_step=steps.summed_train_step and placement.jit_train_step(steps.summed_train_step))
  eval_step = steps.eval_step
  train_loader = data.train_loader(config.seed)
  checkpoints = checkpoint.Checkpoints(workdir, keep=config.run.keep_checkpoints)
  restored = checkpoints.restore(checkpoint.abstract(state))
  start, extra = 0, {}
  if restored is not None:
    start, state, data_state, extra = restored
    try:
      train_loader.set_state(sharding.local_data_state(data_state))
    except ValueError as error:  # e.g. a folder dataset whose files changed since the checkpoint
      checkpoints.close()
      raise ConfigError(f"--workdir {workdir}: the checkpoint of step {start} cannot resume on this data "
                        f"({error}). Restore the data the run started with, or pass --restart to set the run "
                        "aside and start anew.") from None
  skipped = _SkippedSteps(config, int(extra.get("skipped_steps", 0)))
  log = metrics_lib.MetricsLog(workdir, resume_step=start) if sharding.is_chief() else metrics_lib.OtherProcessLog()

  pending: list[tuple[int, dict[str, Any]]] = []  # device metrics, fetched every log_every steps
  latest: dict[str, Any] = {}  # what progress() shows: host values fetched anyway, never a transfer of its own
  started = time.perf_counter()
  step = start
  diverged = None  # with --on-nonfinite record: the first step whose loss or update was not finite
  try:
    with interrupts.deferred() as interrupt:
      while step < config.recipe.steps:
        train_step = steps.train_step_at(step + 1, config.run.log_every, config.recipe.steps)
        state, metrics = train_step(state, placement.put_batch(next(train_loader)), reference)
        step += 1
        pending.append((step, metrics))
        last = step == config.recipe.steps
        interrupted = interrupt.signum is not None
        stopping = (stop_after is not None and step - start >= stop_after) or interrupted
        evaluating = step % config.run.eval_every == 0 or last
        checkpointing = step % config.run.checkpoint_every == 0 or last or stopping
        # before an evaluation or a checkpoint every step's metrics are on hand: a checkpoint
        # covers all lines up to its step, and none is written after a non-finite step
        if step % config.run.log_every == 0 or last or stopping or evaluating or checkpointing:
          fetched = _fetch(pending)
          latest = {**latest, **_progress_values(fetched)}
          for logged_step, values in fetched:
            record = {"step": logged_step, "kind": "train", **_to_python(values)}
            log.write(record)
            if record["skipped"]:
              if config.run.on_nonfinite == "skip":
                skipped.add(record)
              elif config.run.on_nonfinite == "record":
                diverged = record["step"]
                break
              else:
                _stop_on_non_finite(record, log, checkpoints)
          pending.clear()
          if diverged is not None:  # no evaluation, no checkpoint of the steps after it
            break
        if evaluating:
          evaluation = _evaluate(eval_step, state, data, placement)
          log.write({"step": step, "kind": "eval", **evaluation})
          latest = {**latest, **evaluation, "eval_step": step}
          logger.info("%s: step %d/%d: test accuracy %.2f%%, test loss %.4f", workdir, step, config.recipe.steps,
                      100 * evaluation["test_accuracy"], evaluation["test_loss"])
        if checkpointing:
          log.flush()  # metrics up to this step are on disk before the checkpoint that covers them
          checkpoints.save(step, state, train_loader.get_state(),
                           {"elapsed_s": time.perf_counter() - started, "method": method.name,
                            "skipped_steps": skipped.count})
        if progress is not None:
          progress(step, config.recipe.steps, latest)
        if interrupted:
          raise interrupts.Interrupted(interrupt.signum, step)
        if stopping and not last:
          return {"stopped_at": step}
  finally:
    checkpoints.close()  # waits for the save in flight
    log.close()

  sharding.sync("metrics written")  # process 0's metrics.jsonl is complete before any process reads it
  records = report.read_metrics(os.path.join(workdir, metrics_lib.FILE))
  final = [r for r in records if r["kind"] == "eval" and r["step"] == config.recipe.steps]
  if diverged is not None:  # what a diverged network is worth: chance (its parameters would be NaN/Inf)
    chance = 1 / data.num_classes
    final = {"test_accuracy": chance, "test_loss": None, "val_loss": None,
             "val_accuracy": chance if data.val_batches is not None else None}
    warnings.warn(f"{workdir}: step {diverged}: the loss or the update is not finite; the run stops and is recorded "
                  f"as diverged at chance accuracy (1/{data.num_classes}; --on-nonfinite record).", RuntimeWarning,
                  stacklevel=3)
  elif final:
    final = final[-1]
  else:  # its line was damaged (and set aside): evaluate the final state again
    final = {"step": config.recipe.steps, "kind": "eval", **_evaluate(eval_step, state, data, placement)}
  results = {"method": method.name, "label": method.label_with(config.dtnh.projection),
             "projection": config.dtnh.projection if method.dtnh else None, "source": config.source,
             "dataset": config.dataset,
             "seed": config.seed, "steps": config.recipe.steps, "test_accuracy": final["test_accuracy"],
             "test_loss": final["test_loss"], "val_accuracy": final.get("val_accuracy"),
             "val_loss": final.get("val_loss"), "reg_weight": config.recipe.reg_weight,
             "reg_decay": config.recipe.reg_decay, "split": data.split, "skipped_steps": skipped.count,
             "provenance": provenance.provenance()}
  if config.source in names.OFFLINE_SOURCES:  # which pre-training of the toy source the run started from
    results["pretrain_seed"] = config.pretrain_seed
  if diverged is not None:
    results["diverged_at_step"] = diverged
  if skipped.count:
    warnings.warn(f"{workdir}: {skipped.count} of {config.recipe.steps} steps were skipped (non-finite loss or update; "
                  "'skipped' in metrics.jsonl marks them).", RuntimeWarning, stacklevel=3)
  if sharding.is_chief():
    workdir_lib.write_atomically(os.path.join(workdir, workdir_lib.RESULTS), json.dumps(results, indent=2))
    report.write_run_report(workdir, records, results, plots=config.run.plots)
  if export_to is not None:
    # host copies: the exported weights load on any number of devices
    models.save_variables(export_to, sharding.to_host({"params": state.params, "batch_stats": state.batch_stats}),
                          {"arch": config.model.arch, "width": config.model.width,
                           "small_stem": config.model.small_stem, "dataset": config.dataset, "method": method.name},
                          force=force_export)
  return results
