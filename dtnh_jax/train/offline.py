"""The offline default: the paper's experiment at CPU scale, with nothing to download.

Target: scikit-learn's handwritten digits (10 training images per class).
Sources, pre-trained here and cached: ``related`` (other digits, rendered
differently) and ``unrelated`` (patches of photographs), so that the paper's
negative-transfer situation can occur. Every method runs from each source with
a few seeds, through the same model, regularizers and train step as the
full-scale runs; the table is laid out like the paper's Tables II-IV.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from dtnh_jax import data as data_lib
from dtnh_jax import models, regularizers
from dtnh_jax.train import loop, report, sharding
from dtnh_jax.train.config import ALL_METHODS, OFFLINE_PRESET, Method, TrainConfig
from dtnh_jax.train.data import OFFLINE_PREFIX, load_data

__all__ = [
    "cache_dir",
    "OFFLINE_SOURCES",
    "PRETRAIN",
    "pretrained_source",
    "Progress",
    "run_dir",
    "run_grid",
    "run_offline_default",
]

logger = logging.getLogger(__name__)

#: Pre-training of the offline sources: a plain fine-tune run from scratch on the source data.
PRETRAIN = {"steps": 300, "lr_drop_steps": (240,), "learning_rate": 0.05, "eval_every": 300, "log_every": 50,
            "checkpoint_every": 300}


def cache_dir() -> str:
  """Where pre-trained offline sources are kept: ``$DTNH_JAX_CACHE`` or ``~/.cache/dtnh_jax``."""
  return os.environ.get("DTNH_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dtnh_jax"))


def _model_key(config: TrainConfig) -> dict[str, Any]:
  return {"arch": config.arch, "width": config.width, "small_stem": config.small_stem, "resize": config.resize,
          "crop": config.crop}


_LOADED: dict[str, Any] = {}  # path -> variables, so a grid of runs reads each source once


def _set_aside(path: str) -> str:
  """Renames ``path`` to the first free ``path.corrupt-N``: kept for a look, never deleted."""
  n = 1
  while True:
    aside = f"{path}.corrupt-{n}"
    if not os.path.lexists(aside):
      try:
        os.rename(path, aside)
        return aside
      except OSError:
        if not os.path.lexists(aside):  # not taken meanwhile: a real failure
          raise
    n += 1


def pretrained_source(name: str, config: TrainConfig) -> dict[str, Any]:
  """The variables of offline source ``name`` for ``config``'s model, pre-trained once and cached.

  A cached source that cannot be read (damaged files, checksums that do not
  match) or holds NaN/Inf weights is moved aside to ``PATH.corrupt-N`` with
  a warning and pre-trained again, so that one bad cache does not fail every
  later run.
  """
  settings = {"source": name, **_model_key(config), **PRETRAIN}
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.join(cache_dir(), "offline-sources", f"{name}-{digest}")
  if path in _LOADED:
    return _LOADED[path]
  if os.path.lexists(path):
    try:
      variables, _ = models.load_variables(path)
      models.check_finite(variables, path)
    except Exception as error:  # whatever is wrong with it, a fresh pre-training replaces it
      # several processes read the same files and come here together; one moves them
      sharding.sync("offline source read")
      if sharding.is_chief():
        aside = _set_aside(path)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"the cached offline source {path} is unusable ({reason}); moved it to {aside} and "
                      "pre-training it again.", RuntimeWarning, stacklevel=2)
      sharding.sync("offline source set aside")
    else:
      _LOADED[path] = variables
      return variables
  workdir = path + ".run"
  # float32 whatever the run's compute dtype: the cache key does not hold it
  pretrain = config.replace(method="fine-tune", source="scratch", dataset=OFFLINE_PREFIX + name, seed=0,
                            reg_decay=1.0, compute_dtype="float32", **PRETRAIN)
  logger.info("pre-training the offline source %r once (cached in %s)", name, path)
  loop.train(pretrain, workdir, export_to=path, plots=False)
  _LOADED[path], _ = models.load_variables(path)
  return _LOADED[path]


#: What ``--source`` accepts for the offline problem.
OFFLINE_SOURCES = {name: (lambda config, name=name: pretrained_source(name, config)) for name in data_lib.offline.SOURCES}


class Progress:
  """The progress bars of a command: per step for a single run; for a grid, a runs bar over a steps bar.

  ``for_run()`` gives the ``progress`` hook of ``loop.train``; it shows the
  values the loop fetched anyway (the loss, λ, the conflict rate over the
  last fetched steps, the last test accuracy), so the bars add no
  device-to-host transfer, and it redraws only when tqdm's interval allows.
  Everything is a no-op when disabled.
  """

  def __init__(self, total_runs: int, enabled: bool = True):
    self.enabled = enabled
    self.nested = total_runs > 1
    self._runs = self._bar(total=total_runs, desc="runs", unit="run", position=0) if enabled and self.nested else None
    self._steps = None

  @staticmethod
  def _bar(**options):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(file=sys.stderr, dynamic_ncols=True, **options)

  def for_run(self, label: str) -> Callable[[int, int, dict[str, float]], None] | None:
    """The ``progress`` hook of the run called ``label`` (a steps bar made at its first step)."""
    if not self.enabled:
      return None
    shown = None

    def progress(step: int, total: int, latest: dict[str, float]) -> None:
      nonlocal shown
      if self._steps is None:  # at the first step of this call: a resumed run starts where it stopped
        self._steps = self._bar(total=total, initial=step - 1, desc=label, unit="step",
                                position=1 if self.nested else 0, leave=not self.nested)
      if latest is not shown:  # a new dict only when the loop fetched or evaluated
        shown = latest
        self._steps.set_postfix_str(_postfix(latest), refresh=False)
      self._steps.update(step - self._steps.n)

    return progress

  def run_done(self, label: str, result: dict[str, Any]) -> None:
    if self._steps is not None:
      self._steps.close()
      self._steps = None
    if self._runs is not None:
      if "test_accuracy" in result:
        self._runs.set_postfix_str(f"{label}: {100 * result['test_accuracy']:.1f}%", refresh=False)
      self._runs.update()

  def close(self) -> None:
    for bar in (self._steps, self._runs):
      if bar is not None:
        bar.close()
    self._steps = self._runs = None


def _postfix(latest: dict[str, float]) -> str:
  """``loss 0.512 λ 0.01 conflict 35% acc 71.2%`` from what the loop last fetched (what exists of it).

  The loss is the empirical one, J: what DTNH keeps from being slowed down (the total adds λΩ).
  """
  parts = []
  if "loss_empirical" in latest:
    parts.append(f"loss {latest['loss_empirical']:.4g}")
  if "reg_weight" in latest:
    parts.append(f"λ {latest['reg_weight']:.3g}")
  if "conflict_rate" in latest:
    parts.append(f"conflict {100 * latest['conflict_rate']:.0f}%")
  if "test_accuracy" in latest:
    parts.append(f"acc {100 * latest['test_accuracy']:.1f}%")
  return " ".join(parts)


def run_grid(
    base: TrainConfig,
    workdir: str,
    *,
    sources: Sequence[str],
    methods: Sequence[Method],
    seeds: Sequence[int],
    show_progress: bool = True,
    restart: bool = False,
) -> list[dict[str, Any]]:
  """Every method from every source over ``seeds``; prints and writes the paper-style table.

  ``restart``: each run already there is set aside (see ``loop.train``) and trained anew.

  Each run keeps its own workdir ``workdir/SOURCE/METHOD/seedK``, so an
  interrupted grid resumes where it stopped. Writes ``workdir/results.md``,
  ``results.json``, ``results.png`` (the table as bars), and, when the runs
  exist, ``figure3_losses.png`` (L2-SP vs DTNH (L2-SP) from the last source)
  and ``figure4_5_angles.png``.
  """
  data = load_data(base, *sharding.process_shard())  # this process's shard of the data
  results = []
  progress = Progress(len(sources) * len(methods) * len(seeds), enabled=show_progress and sharding.is_chief())
  started = time.perf_counter()
  try:
    for source in sources:
      attention = None
      source_dir = os.path.join(workdir, _safe_name(source))
      for method in methods:
        for seed in seeds:
          config = base.replace(source=source, method=method.name, seed=seed)
          if method.regularizer == "delta" and attention is None:
            attention = _shared_attention(config, data, source_dir)
          label = f"{_safe_name(source)} {method.name} seed {seed}"
          results.append(loop.train(config, run_dir(workdir, source, method.name, seed),
                                    offline_sources=OFFLINE_SOURCES, data=data, attention=attention,
                                    restart=restart, plots=False, progress=progress.for_run(label)))
          progress.run_done(label, results[-1])
  finally:
    progress.close()  # also before an error's message, so that it starts on a clean line
  if sharding.is_chief():  # with several processes, process 0 writes the table and figures
    _write_outputs(workdir, results, [m.name for m in methods], time.perf_counter() - started,
                   _safe_name(sources[-1]), base.dataset)
  return results


def run_offline_default(workdir: str, *, seeds: Sequence[int] = (0, 1, 2),
                        overrides: dict[str, Any] | None = None, show_progress: bool = True) -> list[dict[str, Any]]:
  """The offline default: every method, from the related and the unrelated source, on digits."""
  base = TrainConfig(**{**OFFLINE_PRESET, **(overrides or {})})
  return run_grid(base, workdir, sources=data_lib.offline.SOURCES, methods=ALL_METHODS, seeds=seeds,
                  show_progress=show_progress)


def _safe_name(source: str) -> str:
  return os.path.basename(os.path.normpath(source)) or "source"


def run_dir(workdir: str, source: str, method: str, seed: int) -> str:
  """Where ``dtnh-train`` keeps one run: ``workdir/SOURCE/METHOD/seedK`` (with or without ``--export``)."""
  return os.path.join(workdir, _safe_name(source), method, f"seed{seed}")


def _shared_attention(config: TrainConfig, data, directory: str):
  """DELTA's attention for one source, computed once and shared by its seeds."""
  os.makedirs(directory, exist_ok=True)
  compute = lambda: loop.delta_attention(loop.create_model(config, data.num_classes),
                                         loop.initial_variables(config, data, OFFLINE_SOURCES), data, config)
  return loop.cached_attention(os.path.join(directory, "delta_attention.npz"), compute)


def _write_outputs(workdir: str, results: list[dict[str, Any]], methods: list[str], elapsed: float,
                   figure_source: str, dataset: str) -> None:
  table = report.results_table(results, methods)
  header = (f"Target {dataset}: test accuracy (%), mean ± std over {len({r['seed'] for r in results})} seed(s); "
            f"{len(results)} runs in {elapsed / 60:.1f} min.\n\n")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(header + table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + header + table)
  report.plot_results(results, os.path.join(workdir, "results.png"), methods,
                      f"{dataset}: test accuracy, mean ± std over seeds")
  metrics = lambda method: os.path.join(workdir, figure_source, method, "seed0", "metrics.jsonl")
  figure_runs = {Method.parse(m).label: report.read_metrics(metrics(m))
                 for m in ("l2-sp", "dtnh-l2-sp") if os.path.exists(metrics(m))}
  if figure_runs:
    report.plot_losses(figure_runs, os.path.join(workdir, "figure3_losses.png"),
                       f"{figure_source} → {dataset}: L2-SP vs DTNH (L2-SP)")
  if os.path.exists(metrics("dtnh-l2-sp")):
    report.plot_angles(report.read_metrics(metrics("dtnh-l2-sp")), os.path.join(workdir, "figure4_5_angles.png"),
                       f"{figure_source} → {dataset}, DTNH (L2-SP)")
