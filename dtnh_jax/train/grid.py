"""A grid of runs: every method from every source over seeds (and λ, its decay), and the paper-style summary.

:func:`run_grid` is what ``dtnh-train`` runs for more than one run (the offline default, ``--preset study``, a
``--method`` list on a dataset, a sweep of λ): each run in a folder of its own (:func:`run_dir`), so that an
interrupted grid resumes where it stopped, through the same training loop as a single run; then the table laid
out like the paper's Tables II-IV, the pick of λ on validation with paired statistics, and Figures 3-5
(:func:`draw_figures`), in files that a second grid in the same workdir adds its runs to. Which runs a command
makes is decided before, by ``dtnh_jax.train.plan``; the offline sources a grid starts from are pre-trained
first, by ``dtnh_jax.train.sources.pretrain_sources``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dtnh_jax.train import loop, provenance, report, selection, sharding, stats
from dtnh_jax.train import metrics as metrics_lib
from dtnh_jax.train import plan as plan_lib
from dtnh_jax.train import sources as sources_lib
from dtnh_jax.train import workdir as workdir_lib
from dtnh_jax.train.config import ConfigError, Method, TrainConfig, grid_runs
from dtnh_jax.train.data import load_data, validation_kind
from dtnh_jax.train.plan import source_folder

__all__ = [
    "combination_label",
    "draw_figures",
    "Progress",
    "run_dir",
    "run_grid",
]

#: What a grid draws for its Figures 3-5 and the summary of what it drew (:func:`draw_figures`).
FIGURE3, FIGURE4_5, FIGURES_SUMMARY = "figure3_losses.png", "figure4_5_angles.png", "figures.json"
#: Every file a grid writes into its workdir: the only ones there it replaces, once it listed them as its own
#: (``workdir.WRITTEN``); the runs are in folders of their own.
SUMMARY_FILES = ("results.md", workdir_lib.RESULTS, "provenance.json", "results.png", "lambda_curve.png", FIGURE3,
                 FIGURE4_5, FIGURES_SUMMARY)  # the first four always, the others when drawn
#: How long a grid waits, at its end, for another grid writing the summary of the same workdir.
_SUMMARY_WAIT_S = 600.0
#: The fields a record of a grid's results.json has (and that a results.json of dtnh_jax's is recognized by).
_RECORD_FIELDS = ("method", "source", "seed", "reg_weight", "reg_decay", "test_accuracy")


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
  ``workdir/results.md``, ``results.json`` (one record per run, with ``run``, its folder, and
  ``train_seconds``, the time this or an earlier command spent training it; None when unknown),
  ``provenance.json``, ``results.png`` (the table as bars).

  The summary is of every run in ``workdir``: a second grid there (at the same time or later) adds its runs to
  it, a run run again replaces its record (one record per source, method, seed and, for a regularized method,
  λ and decay), and runs with other settings than ``base``'s are refused before any training, as is a summary
  file that dtnh_jax did not write (``workdir.WRITTEN`` lists those it did). With a
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
  plan_lib.check_sweep(base, reg_weights, reg_decays)
  combinations = [(w, d) for w in reg_weights for d in reg_decays]
  sweep = len(combinations) > 1
  base = base.replace(plots=False)  # the grid draws its figures once, for all runs
  runs = []  # (config, its folder)
  for source, method, seed, (weight, decay) in grid_runs(sources, methods, seeds, combinations):
    config = base.replace(source=source, method=method.name, seed=seed)
    config = config.replace(**{k: v for k, v in (("reg_weight", weight), ("reg_decay", decay)) if v is not None})
    runs.append((config, run_dir(workdir, source, method.name, seed, _combination_name(config) if sweep else None)))
  # before any training: the summary files are ours to replace, and the runs already summarized go with these
  _check_summary(workdir, base, [_planned(config, folder, workdir) for config, folder in runs],
                 validation_kind(base) is not None)
  sources_lib.pretrain_sources(base, sources)  # the step before the grid: the offline sources, pre-trained once
  datas = {}  # split seed -> this process's shard of the data (plan.split_seed: the seed's unless fixed)
  results = []
  progress = Progress(len(runs), enabled=show_progress and sharding.is_chief())
  try:
    for config, folder in runs:
      split_seed = plan_lib.split_seed(config)
      if split_seed not in datas:
        datas[split_seed] = load_data(config, *sharding.process_shard())
      combination = f" {_combination_name(config)}" if sweep else ""
      label = f"{source_folder(config.source)} {config.method}{combination} seed {config.seed}"
      timed = _Timed(progress.for_run(label))
      record = loop.train(config, folder, data=datas[split_seed], restart=restart, progress=timed)
      results.append({**record, "run": _planned(config, folder, workdir)["run"], "train_seconds": timed.seconds()})
      progress.run_done(label, results[-1])
  finally:
    progress.close()  # also before an error's message, so that it starts on a clean line
  if sharding.is_chief():  # with several processes, process 0 writes the table and figures
    results = _write_outputs(workdir, results, [m.name for m in methods], base, sweep)
  return results


class _Timed:
  """A run's ``progress`` hook (around the grid's own, if any) that times the steps this command trained."""

  def __init__(self, hook: Callable[[int, int, dict[str, float]], None] | None):
    self.hook, self.started, self.steps = hook, time.perf_counter(), 0

  def __call__(self, step: int, total: int, latest: dict[str, float]) -> None:
    self.steps += 1
    if self.hook is not None:
      self.hook(step, total, latest)

  def seconds(self) -> float | None:
    """The time since this hook was made, or None when the run trained no step (it had finished before)."""
    return time.perf_counter() - self.started if self.steps else None


def _planned(config: TrainConfig, folder: str, workdir: str) -> dict[str, Any]:
  """What identifies a run of a grid in its summary (see :func:`_run_key`), and its folder in ``workdir``."""
  return {"source": config.source, "method": config.method, "seed": config.seed,
          "reg_weight": config.recipe.reg_weight, "reg_decay": config.recipe.reg_decay,
          "run": os.path.relpath(folder, workdir).replace(os.sep, "/")}


def _run_key(record: dict[str, Any]) -> tuple:
  """One record per run in a summary: its source, method, seed and, for a method with a regularizer, its λ and
  decay (fine-tuning and scratch run once per seed whatever λ a sweep gave them)."""
  key = (record["source"], record["method"], int(record["seed"]))
  try:
    regularized = Method.parse(record["method"]).has_regularizer
  except ValueError:  # a method this version does not know: λ may matter
    regularized = True
  return key + ((float(record["reg_weight"]), float(record["reg_decay"])) if regularized else ())


def _read_summary(workdir: str) -> list[dict[str, Any]] | None:
  """The records of the summary in ``workdir`` (its results.json): [] without one, None when it is not one."""
  try:
    with open(os.path.join(workdir, workdir_lib.RESULTS), encoding="utf-8") as f:
      records = json.load(f)
  except FileNotFoundError:
    return []
  except (OSError, ValueError):
    return None
  if not isinstance(records, list) or not all(
      isinstance(r, dict) and all(field in r for field in _RECORD_FIELDS) for r in records):
    return None
  return records


def _summary_from_before_the_list(workdir: str) -> Callable[[str], bool]:
  """``workdir.claim``'s test for a workdir that an older dtnh_jax wrote, without ``workdir.WRITTEN``: its
  summary files are ours when its results.json holds dtnh_jax's run records."""
  recognized = bool(_read_summary(workdir))
  return lambda path: recognized and os.path.basename(path) in SUMMARY_FILES


def _record_folder(workdir: str, record: dict[str, Any]) -> str | None:
  """The folder of the run of an earlier summary's ``record`` (its ``run``, or where a grid of an older
  dtnh_jax kept it), or None when it holds no run any more."""
  if isinstance(record.get("run"), str):
    candidates = [os.path.join(workdir, *record["run"].split("/"))]
  else:
    plain = run_dir(workdir, record["source"], record["method"], int(record["seed"]))
    candidates = [run_dir(workdir, record["source"], record["method"], int(record["seed"]),
                          combination_label(float(record["reg_weight"]), float(record["reg_decay"]))), plain]
  return next((folder for folder in candidates if os.path.exists(os.path.join(folder, workdir_lib.CONFIG))), None)


def _merge(workdir: str, base: TrainConfig, records: list[dict[str, Any]], validated: bool,
           writing: bool = False) -> list[dict[str, Any]]:
  """``records`` (this grid's runs) added to the summary already in ``workdir``: its records of other runs
  first, in their order, then these; a run in both keeps this grid's record and, when this command did not
  train it, the training time the summary had for it.

  ``writing``: a summary that cannot be read is set aside (``results.json.corrupt-N``) with a warning, and
  records whose run folder is gone are left out with one; otherwise both are only skipped.

  Raises:
    ConfigError: a run already summarized has other settings than ``base`` (beyond the grid's axes: source,
      method, seed, λ and decay), or, without a validation split, a method and source would have several
      (λ, decay) in the summary with nothing to pick between them.
  """
  earlier = _read_summary(workdir)
  if earlier is None:
    earlier = []
    if writing:
      aside = workdir_lib.set_aside_corrupt(os.path.join(workdir, workdir_lib.RESULTS))
      warnings.warn(f"{os.path.join(workdir, workdir_lib.RESULTS)} could not be read as a summary of runs; moved "
                    f"it to {aside} and wrote a summary of this grid's runs.", RuntimeWarning, stacklevel=3)
  now = {_run_key(r): r for r in records}
  kept, gone = [], []
  for record in earlier:
    key = _run_key(record)
    if key in now:
      if now[key].get("train_seconds") is None and record.get("train_seconds") is not None:
        now[key] = {**now[key], "train_seconds": record["train_seconds"]}
      continue
    folder = _record_folder(workdir, record)
    if folder is None:
      gone.append(record)
      continue
    config = base.replace(source=record["source"], method=record["method"], seed=int(record["seed"]),
                          reg_weight=float(record["reg_weight"]), reg_decay=float(record["reg_decay"]))
    differs = workdir_lib.differing_settings(workdir_lib.read_settings(folder), config)
    if differs:
      here = " ".join(workdir_lib.flag_text(name, new) for name, _, new in differs[:3])
      there = " ".join(workdir_lib.flag_text(name, old) for name, old, _ in differs[:3])
      raise ConfigError(
          f"--workdir {workdir} summarizes runs with other settings than this grid's ({here}; its run "
          f"{os.path.relpath(folder, workdir)} has {there}), and one summary does not mix them: use another "
          f"--workdir, or move its {workdir_lib.RESULTS} away to start a new summary there.")
    kept.append({k: v for k, v in record.items() if k != "selected"})
  if gone and writing:
    warnings.warn(f"{len(gone)} run(s) of the summary in {workdir} are no longer there (the first: "
                  f"{gone[0].get('run') or source_folder(gone[0]['source']) + '/' + gone[0]['method']}); left out of "
                  "it.", RuntimeWarning, stacklevel=3)
  merged = kept + [now[_run_key(r)] for r in records]
  if not validated:
    choices: dict[tuple[str, str], set] = {}
    for record in merged:
      choices.setdefault((record["method"], record["source"]), set()).add(_run_key(record)[3:])
    several = next(((group, combos) for group, combos in choices.items() if len(combos) > 1), None)
    if several is not None:
      (method, source), combos = several
      shown = " and ".join(f"λ {w:g} decay {d:g}" for w, d in sorted(combos))
      raise ConfigError(
          f"--workdir {workdir}: its summary would hold {method} from {source_folder(source)} at {shown}, and without "
          "a validation split nothing picks between them: use another --workdir, or pass --val-fraction (e.g. "
          "0.2) to pick on validation.")
  return merged


def _check_summary(workdir: str, base: TrainConfig, planned: list[dict[str, Any]], validated: bool) -> None:
  """Before a grid trains: refuses (ConfigError) a summary file in ``workdir`` that dtnh_jax did not write, and
  runs already summarized there that its runs would not go with (see :func:`_merge`)."""
  workdir_lib.check_ours(workdir, SUMMARY_FILES, _summary_from_before_the_list(workdir))
  _merge(workdir, base, planned, validated)


def combination_label(weight: float, decay: float) -> str:
  """``lambdaW_decayD``: the folder of one (λ, decay) combination of a sweep, the ``combination`` of
  :func:`run_dir` (``lambda0.1_decay1`` for λ 0.1 without decay)."""
  return f"lambda{weight:g}_decay{decay:g}"


def _combination_name(config: TrainConfig) -> str:
  return combination_label(config.recipe.reg_weight, config.recipe.reg_decay)


def run_dir(workdir: str, source: str, method: str, seed: int, combination: str | None = None) -> str:
  """Where ``dtnh-train`` keeps one run: ``workdir/SOURCE/METHOD/seedK`` (with or without ``--export``), or
  ``workdir/SOURCE/METHOD/COMBINATION/seedK`` in a sweep of λ and its decay."""
  return os.path.join(workdir, source_folder(source), method, *([combination] if combination else []), f"seed{seed}")


def _write_outputs(workdir: str, results: list[dict[str, Any]], methods: list[str], base: TrainConfig,
                   sweep: bool) -> list[dict[str, Any]]:
  """Adds ``results`` to the summary of ``workdir`` (:func:`_merge`) and writes its table, records and figures,
  under the workdir's lock (another grid there waits), each file replaced atomically and only if ours."""
  lock = workdir_lib.Lock(workdir).acquire(wait=_SUMMARY_WAIT_S)
  try:
    validated = all(r.get("val_accuracy") is not None for r in results)
    results = _merge(workdir, base, results, validated, writing=True)
    # the figures are claimed when drawn; files of an older dtnh_jax's summary here are listed now
    workdir_lib.claim(workdir, SUMMARY_FILES[:4], _summary_from_before_the_list(workdir))
    return _write_summary(workdir, results, methods, base.dataset, sweep)
  finally:
    lock.release()


def _training_time(results: list[dict[str, Any]]) -> str:
  """``3 runs, 4.2 min of training`` from the records' ``train_seconds`` (saying how many have none)."""
  timed = [float(r["train_seconds"]) for r in results if r.get("train_seconds") is not None]
  if not timed:
    return f"{len(results)} runs (training time not recorded)"
  untimed = len(results) - len(timed)
  return (f"{len(results)} runs, {math.fsum(timed) / 60:.1f} min of training"
          + (f" ({untimed} of them not timed: finished before this summary recorded times)" if untimed else ""))


def _diverged_line(results: list[dict[str, Any]]) -> str:
  """Names the runs recorded as diverged (``--on-nonfinite record``), which count at chance accuracy."""
  diverged = [r for r in results if r.get("diverged_at_step") is not None]
  if not diverged:
    return ""
  named = "; ".join(f"{r['run']} at step {r['diverged_at_step']}" for r in diverged)
  return (f"{len(diverged)} run(s) diverged (a NaN/Inf step; --on-nonfinite record) and count at chance accuracy: "
          f"{named}.\n\n")


def _write_summary(workdir: str, results: list[dict[str, Any]], methods: list[str], dataset: str,
                   sweep: bool) -> list[dict[str, Any]]:
  # earlier grids' runs: their methods too, and a sweep when the summary holds several λ of a method
  methods = list(dict.fromkeys([r["method"] for r in results] + list(methods)))  # earlier grids' first
  validated = all(r.get("val_accuracy") is not None for r in results)
  sweep = sweep or (validated and len({_run_key(r)[3:] for r in results if len(_run_key(r)) > 3}) > 1)
  seeds = len({r["seed"] for r in results})
  header = (f"Target {dataset}: test accuracy (%), mean ± sample sd (ddof=1) over {seeds} seed(s); "
            f"{_training_time(results)}.\n\n{_diverged_line(results)}")
  if validated:  # the λ and decay of each method chosen on validation, then its test accuracy
    results = selection.select(results)
    tuned = report.tuned_table(selection.summary(results), stats.dtnh_pairs(results))
    against = report.reference_table(stats.reference_pairs(results))  # empty without fine-tuning runs
    tuned += "\n" + against if against else ""
    table = tuned if sweep else report.results_table(results, methods) + "\n" + tuned
  else:
    table = report.results_table(results, methods)
  machine = provenance.provenance()  # this process's; each run's own is in its record
  write = lambda name, text: workdir_lib.write_atomically(os.path.join(workdir, name), text)
  write("provenance.json", json.dumps(machine, indent=2))
  header += (f"Computed on {machine['cpu']} ({machine['cpu_count']} CPUs, jax {machine['versions']['jax']} "
             f"{machine['backend']}), commit {machine['commit']}; other machines differ within the spread.\n\n")
  write("results.md", header + table)
  write(workdir_lib.RESULTS, json.dumps(results, indent=2))
  print("\n" + header + table)
  shown = [r for r in results if r.get("selected", True)]  # a sweep's bars: each method at its pick
  write("results.png", lambda path: report.plot_results(shown, path, methods,
                                                        f"{dataset}: test accuracy, mean ± std over seeds"))
  if sweep and any(Method.parse(r["method"]).has_regularizer for r in results):  # else no curve to draw
    workdir_lib.claim(workdir, ["lambda_curve.png"])
    write("lambda_curve.png", lambda path: report.plot_lambda_curve(results, path, f"{dataset}: accuracy against λ"))
  drawn = draw_figures(workdir, results, dataset, sweep)
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
  """The metrics.jsonl of the grid's run that ``record`` came from (its ``run``, else see :func:`run_dir`)."""
  if isinstance(record.get("run"), str):
    return os.path.join(workdir, *record["run"].split("/"), metrics_lib.FILE)
  combination = combination_label(record["reg_weight"], record["reg_decay"]) if sweep else None
  return os.path.join(run_dir(workdir, record["source"], record["method"], int(record["seed"]), combination),
                      metrics_lib.FILE)


def draw_figures(workdir: str, results: list[dict[str, Any]], dataset: str, sweep: bool,
                 out_dir: str | None = None, reason: str | None = None) -> dict[str, Any] | None:
  """Figures 3-5 of a grid for one pair of runs, X and DTNH(X), and ``figures.json`` saying what was drawn and why.

  The pair is the one of :func:`_figure_pair` among ``results``: where DTNH(X) and X differ most at their picks.
  A grid draws its own after its table; ``benchmarks/study_figures.py`` passes the records of a pair it chose
  (marked ``selected``), and an ``out_dir`` and ``reason`` of its own. Figure 3 (``figure3_losses.png``):
  empirical and test loss of X and DTNH(X). Figures 4-5 (``figure4_5_angles.png``, :func:`report.plot_angles`):
  the angles of the DTNH(X) run, with Angle 3 and 4 along the X run. Both runs of one seed
  (:func:`_figure_runs`).

  Args:
    workdir: the grid's workdir, where its runs are (the summary's metrics paths are relative to it).
    results: records of the grid's ``results.json``.
    dataset: the target, for the titles.
    sweep: whether the grid swept λ or its decay (its runs are then in a folder per combination,
      :func:`combination_label`).
    out_dir: where the figures go; by default ``workdir``, where a file is replaced only if dtnh_jax wrote it.
    reason: why this pair, for ``figures.json``; by default the pair's rule.

  Returns:
    The summary written to ``figures.json``, or ``None`` (nothing drawn) without such a pair or when a run's
    metrics are missing.
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
  where = f"{source_folder(pair['source'])} → {dataset}, seed {x['seed']}"
  if out_dir is None:  # the grid's own figures: replaced only if ours, atomically
    out_dir = workdir
    save = lambda name, write: workdir_lib.replace_ours(workdir, name, write)
  else:  # elsewhere (benchmarks/study_figures.py): its caller decides
    save = lambda name, write: write(os.path.join(out_dir, name))
  os.makedirs(out_dir, exist_ok=True)
  save(FIGURE3, lambda path: report.plot_losses({x["label"]: x_metrics, dtnh["label"]: dtnh_metrics}, path,
                                                f"{where}: {x['label']} vs {dtnh['label']}"))
  angles = {}
  save(FIGURE4_5, lambda path: angles.update(report.plot_angles(
      dtnh_metrics, path, f"{where}: {dtnh['label']}", plain=x_metrics, labels=(dtnh["label"], x["label"]))))
  summary = {**pair, "dataset": dataset, "seed": int(x["seed"]), "figures": [FIGURE3, FIGURE4_5],
             "reason": reason or (f"the largest |DTNH(X) − X| in mean {pair['field']} over seeds, each method at "
                                  f"its pick, of {len(pair['candidates'])} (regularizer, source) pair(s)"),
             "runs": [{"method": run["method"], "label": run["label"], "reg_weight": run["reg_weight"],
                       "reg_decay": run["reg_decay"], "metrics": os.path.relpath(path, workdir)}
                      for run, path in zip(runs, paths)],
             "angles": angles}
  save(FIGURES_SUMMARY, lambda path: _write_json(path, summary))
  return summary


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)


def _figures_line(summary: dict[str, Any]) -> str:
  """One line on Figures 3-5 for after the table."""
  x, dtnh = summary["runs"]
  field = "validation" if summary["field"] == "val_accuracy" else "test"
  share = summary["angles"]["angle2_obtuse_share"]
  obtuse = f"; Angle 2 > 90° on {100 * share:.0f}% of its logged steps" if share is not None else ""
  return (f"Figures 3-5 ({FIGURE3}, {FIGURE4_5}): {x['label']} vs {dtnh['label']} from "
          f"{source_folder(summary['source'])}, seed {summary['seed']}, where DTNH changes the mean {field} accuracy "
          f"most ({100 * summary['difference']:+.2f} points){obtuse}; see {FIGURES_SUMMARY}.")
