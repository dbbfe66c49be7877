"""The offline default: the paper's experiment at CPU scale, with nothing to download.

Target: scikit-learn's handwritten digits (10 training images per class).
Sources, pre-trained here and cached: ``related`` (other digits, rendered
differently) and ``unrelated`` (patches of photographs), so that the paper's
negative-transfer situation can occur. Every method runs from each source with
a few seeds, through the same model, regularizers and train step as the
full-scale runs; the table is laid out like the paper's Tables II-IV.

The sources are pre-trained in an explicit step before any run
(:func:`pretrain_sources`, which :func:`run_grid` and ``dtnh-train`` call);
a run from ``--source related`` then reads the cached checkpoint like any
other source (``dtnh_jax.train.sources``), so the training loop knows
nothing of this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dtnh_jax import models, names
from dtnh_jax.train import loop, presets, provenance, report, selection, sharding, stats
from dtnh_jax.train import metrics as metrics_lib
from dtnh_jax.train import sources as sources_lib
from dtnh_jax.train.config import ConfigError, Method, TrainConfig
from dtnh_jax.train.data import OFFLINE_PREFIX, load_data, validation_kind

__all__ = [
    "pretrain_sources",
    "Progress",
    "run_dir",
    "run_grid",
]

logger = logging.getLogger(__name__)

#: What a grid draws for its Figures 3-5 and the summary of what it drew (:func:`_draw_figures`).
FIGURE3, FIGURE4_5, FIGURES_SUMMARY = "figure3_losses.png", "figure4_5_angles.png", "figures.json"


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


def _usable(path: str) -> bool:
  """Whether the cached source at ``path`` loads and is finite; an unusable one is set aside with a warning."""
  try:
    models.check_finite(models.load_variables(path)[0], path)
    return True
  except Exception as error:  # pylint: disable=broad-except  # whatever is wrong, a fresh pre-training replaces it
    # several processes read the same files and come here together; one moves them
    sharding.sync("offline source read")
    if sharding.is_chief():
      aside = _set_aside(path)
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      warnings.warn(f"the cached offline source {path} is unusable ({reason}); moved it to {aside} and "
                    "pre-training it again.", RuntimeWarning, stacklevel=3)
    sharding.sync("offline source set aside")
    return False


def pretrain_sources(config: TrainConfig, sources: Sequence[str] = names.OFFLINE_SOURCES) -> dict[str, str]:
  """Pre-trains the offline sources among ``sources`` for ``config``'s model, once: the step before a run or
  grid from ``--source related`` or ``unrelated``. Other sources are left alone.

  Each is a plain fine-tune run from scratch on the source's data
  (``presets.offline_pretraining(config.pretrain_steps)``), exported to
  ``sources.offline_source_path`` (under ``$DTNH_JAX_CACHE``). A cached
  source that cannot be read (damaged files, checksums that do not match) or
  holds NaN/Inf weights is moved aside to ``PATH.corrupt-N`` with a warning
  and pre-trained again, so that one bad cache does not fail every later run.

  Returns:
    offline source name -> its cached checkpoint (a folder ``--source`` also takes).
  """
  paths = {}
  for name in dict.fromkeys(sources):
    if name not in names.OFFLINE_SOURCES:
      continue
    path = sources_lib.offline_source_path(name, config)
    if not (os.path.lexists(path) and _usable(path)):
      # float32 whatever the run's compute dtype: the cache key does not hold it
      # the whole source pool whatever the run's validation carve (the cache key does not hold the run's split)
      pretrain = config.replace(method="fine-tune", source=sources_lib.SCRATCH, dataset=OFFLINE_PREFIX + name,
                                seed=0, reg_decay=1.0, compute_dtype="float32", plots=False, val_fraction=0.0,
                                split_seed=None,
                                **presets.offline_pretraining(config.pretrain_steps))
      logger.info("pre-training the offline source %r once (cached in %s)", name, path)
      loop.train(pretrain, path + ".run", export_to=path)
    paths[name] = path
  return paths


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
    reg_weights: Sequence[float | None] = (None,),
    reg_decays: Sequence[float | None] = (None,),
    show_progress: bool = True,
    restart: bool = False,
) -> list[dict[str, Any]]:
  """Every method from every source over ``seeds`` (and λ, decay); prints and writes the paper-style table.

  ``restart``: each run already there is set aside (see ``loop.train``) and trained anew.

  Each run keeps its own workdir ``workdir/SOURCE/METHOD/seedK`` (``.../METHOD/lambdaL_decayD/seedK`` when
  ``reg_weights`` x ``reg_decays`` holds several combinations; None: ``base``'s), so an interrupted grid
  resumes where it stopped. Methods without regularizer run once per seed whatever the sweep, and ``scratch``
  (which ignores the source) under the first source only. Writes
  ``workdir/results.md``, ``results.json`` (one record per run), ``results.png`` (the table as bars). With a
  validation split (carved with ``base.val_fraction``, or the dataset's own) it also picks, per method and
  source, the λ and decay with the best mean validation accuracy (``dtnh_jax.train.selection``; records get
  ``selected``), and writes the tuned table with DTNH(X) − X paired over seeds (``dtnh_jax.train.stats``) and,
  for a sweep, ``lambda_curve.png``.

  The paper's figures are drawn where DTNH changes the outcome: of the regularizers X run with DTNH(X) too,
  the (X, source) whose DTNH(X) and X differ most in mean validation accuracy over seeds (test accuracy
  without a validation split), each at its pick; one seed's runs (0 if run). ``figure3_losses.png``: their
  empirical and test losses. ``figure4_5_angles.png``: DTNH(X)'s Angles 1-4 with Angle 3 and 4 along the X
  run, a line at 90° and a caption with the share of steps where Angle 2 > 90° (the paper's Fig. 2 has DTNH's
  direction acute with the regularizer's gradient), noting that Angle 1 < Angle 3 is an identity of the
  projection. ``figures.json`` says what was drawn and why, with those numbers; a line after the table says
  it too. Without such a pair nothing is drawn.
  """
  pretrain_sources(base, sources)  # the step before the grid: the offline sources, pre-trained once
  combinations = [(w, d) for w in reg_weights for d in reg_decays]
  sweep = len(combinations) > 1
  if sweep and validation_kind(base) is None:
    raise ConfigError("a sweep of reg_weight/reg_decay picks on validation accuracy; set val_fraction so that a "
                      "validation split exists.")
  datas = {}  # split seed -> this process's shard of the data (the split is redrawn per seed unless fixed)
  base = base.replace(plots=False)  # the grid draws its figures once, for all runs
  runs = grid_runs(sources, methods, seeds, combinations)
  results = []
  progress = Progress(len(runs), enabled=show_progress and sharding.is_chief())
  started = time.perf_counter()
  try:
    for source, method, seed, (weight, decay) in runs:
      config = base.replace(source=source, method=method.name, seed=seed)
      config = config.replace(**{k: v for k, v in (("reg_weight", weight), ("reg_decay", decay)) if v is not None})
      split_seed = config.seed if config.split_seed is None or not config.val_fraction else config.split_seed
      if split_seed not in datas:
        datas[split_seed] = load_data(config, *sharding.process_shard())
      combination = _combination_name(config) if sweep else None
      label = f"{_safe_name(source)} {method.name}{' ' + combination if combination else ''} seed {seed}"
      results.append(loop.train(config, run_dir(workdir, source, method.name, seed, combination),
                                data=datas[split_seed], restart=restart, progress=progress.for_run(label)))
      progress.run_done(label, results[-1])
  finally:
    progress.close()  # also before an error's message, so that it starts on a clean line
  if sharding.is_chief():  # with several processes, process 0 writes the table and figures
    results = _write_outputs(workdir, results, [m.name for m in methods], time.perf_counter() - started,
                             base.dataset, sweep)
  return results


def _combination_label(weight: float, decay: float) -> str:
  """``lambdaW_decayD``: the folder of one (λ, decay) combination of a sweep."""
  return f"lambda{weight:g}_decay{decay:g}"


def grid_runs(sources: Sequence[str], methods: Sequence[Method], seeds: Sequence[int],
              combinations: Sequence[tuple[float | None, float | None]]) -> list[tuple]:
  """The runs of a grid, ``(source, method, seed, (reg_weight, reg_decay))``, in the order they run.

  A method without regularizer runs once per seed whatever the combinations of λ and decay; ``scratch`` (which
  ignores the source) under the first source only: the tuned table and the λ curve use it for every source.
  """
  return [(source, method, seed, combination) for source in sources for method in methods for seed in seeds
          for combination in (combinations if method.has_regularizer else combinations[:1])
          if not (method.from_scratch and source != sources[0])]


def _combination_name(config: TrainConfig) -> str:
  return _combination_label(config.recipe.reg_weight, config.recipe.reg_decay)


def _safe_name(source: str) -> str:
  return os.path.basename(os.path.normpath(source)) or "source"


def run_dir(workdir: str, source: str, method: str, seed: int, combination: str | None = None) -> str:
  """Where ``dtnh-train`` keeps one run: ``workdir/SOURCE/METHOD/seedK`` (with or without ``--export``), or
  ``workdir/SOURCE/METHOD/COMBINATION/seedK`` in a sweep of λ and its decay."""
  return os.path.join(workdir, _safe_name(source), method, *([combination] if combination else []), f"seed{seed}")


def _write_outputs(workdir: str, results: list[dict[str, Any]], methods: list[str], elapsed: float,
                   dataset: str, sweep: bool) -> list[dict[str, Any]]:
  validated = all(r.get("val_accuracy") is not None for r in results)
  header = (f"Target {dataset}: test accuracy (%), mean ± std over {len({r['seed'] for r in results})} seed(s); "
            f"{len(results)} runs in {elapsed / 60:.1f} min.\n\n")
  if validated:  # the λ and decay of each method chosen on validation, then its test accuracy
    results = selection.select(results)
    tuned = report.tuned_table(selection.summary(results), stats.dtnh_pairs(results))
    table = tuned if sweep else report.results_table(results, methods) + "\n" + tuned
  else:
    table = report.results_table(results, methods)
  os.makedirs(workdir, exist_ok=True)
  machine = provenance.provenance()  # this process's; each run's own is in its record
  with open(os.path.join(workdir, "provenance.json"), "w") as f:
    json.dump(machine, f, indent=2)
  header += (f"Computed on {machine['cpu']} ({machine['cpu_count']} CPUs, jax {machine['versions']['jax']} "
             f"{machine['backend']}), commit {machine['commit']}; other machines differ within the spread.\n\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(header + table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  print("\n" + header + table)
  shown = [r for r in results if r.get("selected", True)]  # a sweep's bars: each method at its pick
  report.plot_results(shown, os.path.join(workdir, "results.png"), methods,
                      f"{dataset}: test accuracy, mean ± std over seeds")
  if sweep:
    report.plot_lambda_curve(results, os.path.join(workdir, "lambda_curve.png"),
                             f"{dataset}: accuracy against λ")
  drawn = _draw_figures(workdir, results, dataset, sweep)
  if drawn is not None:
    print(_figures_line(drawn))
  return results


def _figure_pair(results: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The regularizer X and source where DTNH(X) and X differ most: in mean validation accuracy over seeds
  (test accuracy when a run has none) at each method's pick (its records marked ``selected``; all of them when
  none is). ``None`` without a pair of X and DTNH(X) from the same source.

  Returns:
    ``regularizer``, ``source``, ``field`` (the accuracy compared), ``difference`` (DTNH(X) − X, a fraction;
    the largest in size, the first pair found on a tie) and ``candidates`` (every pair's ``regularizer``,
    ``source``, ``x_mean``, ``dtnh_mean``, ``difference``).
  """
  picked = [r for r in results if r.get("selected", True)]
  field = "val_accuracy" if all(r.get("val_accuracy") is not None for r in picked) else "test_accuracy"
  accuracies: dict[tuple[str, str], list[float]] = {}
  for r in picked:
    accuracies.setdefault(selection.group_key(r), []).append(float(r[field]))
  candidates = []
  for (method, source), values in accuracies.items():
    x = selection.plain_method(method)
    if x is None or (x, source) not in accuracies:
      continue
    x_mean, dtnh_mean = float(np.mean(accuracies[(x, source)])), float(np.mean(values))
    if math.isfinite(dtnh_mean - x_mean):
      candidates.append({"regularizer": x, "source": source, "x_mean": x_mean, "dtnh_mean": dtnh_mean,
                         "difference": dtnh_mean - x_mean})
  if not candidates:
    return None
  best = max(candidates, key=lambda c: abs(c["difference"]))
  return {"regularizer": best["regularizer"], "source": best["source"], "field": field,
          "difference": best["difference"], "candidates": candidates}


def _figure_runs(results: list[dict[str, Any]], methods: Sequence[str], source: str) -> list[dict[str, Any]]:
  """The record of each of ``methods`` from ``source`` at its pick for one seed: 0 if all ran it, else the
  smallest seed they all ran."""
  picked = [[r for r in results if r.get("selected", True) and (r["method"], r["source"]) == (method, source)]
            for method in methods]
  seeds = set.intersection(*({int(r["seed"]) for r in runs} for runs in picked))
  seed = 0 if 0 in seeds else min(seeds)
  return [next(r for r in runs if int(r["seed"]) == seed) for runs in picked]


def _metrics_of(workdir: str, record: dict[str, Any], sweep: bool) -> str:
  """The metrics.jsonl of the grid's run that ``record`` came from (see :func:`run_dir`)."""
  combination = _combination_label(record["reg_weight"], record["reg_decay"]) if sweep else None
  return os.path.join(run_dir(workdir, record["source"], record["method"], int(record["seed"]), combination),
                      metrics_lib.FILE)


def _draw_figures(workdir: str, results: list[dict[str, Any]], dataset: str, sweep: bool,
                  out_dir: str | None = None, reason: str | None = None) -> dict[str, Any] | None:
  """Figures 3-5 for the pair of :func:`_figure_pair`, and ``figures.json`` saying what was drawn and why
  (``reason``, by default the pair's rule), in ``out_dir`` (default: ``workdir``, where the runs are; the
  summary's metrics paths are relative to ``workdir``).

  Figure 3 (``figure3_losses.png``): empirical and test loss of X and DTNH(X). Figures 4-5
  (``figure4_5_angles.png``, :func:`report.plot_angles`): the angles of the DTNH(X) run, with Angle 3 and 4
  along the X run. Both runs of one seed (:func:`_figure_runs`). Returns the summary written, or ``None``
  (nothing drawn) without such a pair or when a run's metrics are missing.
  """
  pair = _figure_pair(results)
  if pair is None:
    return None
  methods = (pair["regularizer"], selection.DTNH_PREFIX + pair["regularizer"])
  runs = _figure_runs(results, methods, pair["source"])
  paths = [_metrics_of(workdir, run, sweep) for run in runs]
  if not all(os.path.exists(path) for path in paths):
    return None
  (x, dtnh), (x_metrics, dtnh_metrics) = runs, [report.read_metrics(path) for path in paths]
  where = f"{_safe_name(pair['source'])} → {dataset}, seed {x['seed']}"
  out_dir = workdir if out_dir is None else out_dir
  os.makedirs(out_dir, exist_ok=True)
  report.plot_losses({x["label"]: x_metrics, dtnh["label"]: dtnh_metrics}, os.path.join(out_dir, FIGURE3),
                     f"{where}: {x['label']} vs {dtnh['label']}")
  angles = report.plot_angles(dtnh_metrics, os.path.join(out_dir, FIGURE4_5), f"{where}: {dtnh['label']}",
                              plain=x_metrics, labels=(dtnh["label"], x["label"]))
  summary = {**pair, "dataset": dataset, "seed": int(x["seed"]), "figures": [FIGURE3, FIGURE4_5],
             "reason": reason or (f"the largest |DTNH(X) − X| in mean {pair['field']} over seeds, each method at "
                                  f"its pick, of {len(pair['candidates'])} (regularizer, source) pair(s)"),
             "runs": [{"method": run["method"], "label": run["label"], "reg_weight": run["reg_weight"],
                       "reg_decay": run["reg_decay"], "metrics": os.path.relpath(path, workdir)}
                      for run, path in zip(runs, paths)],
             "angles": angles}
  with open(os.path.join(out_dir, FIGURES_SUMMARY), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _figures_line(summary: dict[str, Any]) -> str:
  """One line on Figures 3-5 for after the table."""
  x, dtnh = summary["runs"]
  field = "validation" if summary["field"] == "val_accuracy" else "test"
  share = summary["angles"]["angle2_obtuse_share"]
  obtuse = f"; Angle 2 > 90° on {100 * share:.0f}% of its logged steps" if share is not None else ""
  return (f"Figures 3-5 ({FIGURE3}, {FIGURE4_5}): {x['label']} vs {dtnh['label']} from "
          f"{_safe_name(summary['source'])}, seed {summary['seed']}, where DTNH changes the mean {field} accuracy "
          f"most ({100 * summary['difference']:+.2f} points){obtuse}; see {FIGURES_SUMMARY}.")
