"""Reading metrics back, the paper's plots (Figures 3-5) and tables (II-IV)."""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dtnh_jax.train import metrics as metrics_lib
from dtnh_jax.train import selection, stats
from dtnh_jax.train import workdir as workdir_lib

__all__ = [
    "ANGLE_IDENTITY",
    "angle_summary",
    "plot_angles",
    "plot_lambda_curve",
    "plot_losses",
    "plot_results",
    "read_metrics",
    "reference_table",
    "results_table",
    "tuned_table",
    "write_run_report",
]

read_metrics = metrics_lib.read_metrics  # the records of a metrics.jsonl, non-finite values restored


def _series(records, kind, key):
  points = [(r["step"], r[key]) for r in records if r["kind"] == kind and key in r]
  return np.array(points, dtype=float).reshape(-1, 2)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
  """Figure 3: empirical (training) loss and test loss over steps, one line per run."""
  plt = _pyplot()
  fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, records in runs.items():
    train = _series(records, "train", "loss_empirical")
    test = _series(records, "eval", "test_loss")
    line, = ax_train.plot(train[:, 0], train[:, 1], label=label, lw=1)
    ax_test.plot(test[:, 0], test[:, 1], "o-", label=label, color=line.get_color())
  ax_train.set(xlabel="step", ylabel="empirical loss", title="empirical loss (training)")
  ax_test.set(xlabel="step", ylabel="test loss", title="test loss")
  _save(plt, fig, (ax_train, ax_test), path, title)


#: The caveat every angles figure states: after DTNH's projection of a conflicting step, <d, ∇J> = |∇J|², so
#: Angle 1 is below Angle 3 whatever the data (no evidence for DTNH).
ANGLE_IDENTITY = ("Angle 1 < Angle 3 is an identity whenever the step conflicts "
                  "(cos∠(d, ∇J) = |∇J|/|d| after the projection)")

# Figures 4-5's panels: (key, legend) of the run's own angle, then of the one it is compared with.
_ANGLE_PANELS = ((("angle1", "Angle 1: ∠(d, ∇J)"), ("angle3", "Angle 3: ∠(∇J + λ∇Ω, ∇J)")),
                 (("angle2", "Angle 2: ∠(d, ∇Ω)"), ("angle4", "Angle 4: ∠(∇J + λ∇Ω, ∇Ω)")))


def _finite_values(records: list[dict[str, Any]], key: str) -> np.ndarray:
  """The finite values of ``key`` over the train records that log it."""
  values = _series(records, "train", key)[:, 1]
  return values[np.isfinite(values)]


def _mean_or_none(values: np.ndarray) -> float | None:
  return float(np.mean(values)) if values.size else None


def angle_summary(records: list[dict[str, Any]], plain: list[dict[str, Any]] | None = None) -> dict[str, Any]:
  """The numbers behind Figures 4-5, over the logged train steps (non-finite values left out).

  Args:
    records: the metrics of a run that logs ``angle1``-``angle4`` (a DTNH run: every step).
    plain: the metrics of the plain regularized run X, if any (angles on its logging steps only).

  Returns:
    ``angle_steps`` (steps with a finite Angle 2), ``angle2_obtuse_share`` (the share of them with Angle 2 >
    90°: DTNH's direction against the regularizer's gradient), ``angle1_mean`` ... ``angle4_mean`` (degrees),
    ``conflict_share`` (the share of steps logged with ``conflict`` where <∇J, ∇Ω> < 0); with ``plain``,
    ``plain_angle_steps``, ``plain_angle3_mean`` and ``plain_angle4_mean`` of that run. A number without any
    step to average is ``None``.
  """
  angle2 = _finite_values(records, "angle2")
  summary: dict[str, Any] = {"angle_steps": int(angle2.size), "angle2_obtuse_share": _mean_or_none(angle2 > 90)}
  summary.update({f"angle{k}_mean": _mean_or_none(_finite_values(records, f"angle{k}")) for k in range(1, 5)})
  summary["conflict_share"] = _mean_or_none(_finite_values(records, "conflict"))
  if plain is not None:
    summary["plain_angle_steps"] = int(_finite_values(plain, "angle3").size)
    summary.update({f"plain_angle{k}_mean": _mean_or_none(_finite_values(plain, f"angle{k}")) for k in (3, 4)})
  return summary


def _angles_caption(summary: dict[str, Any], label: str) -> str:
  """The figure's caption: how often Angle 2 is obtuse and the steps conflict, then :data:`ANGLE_IDENTITY`."""
  facts = []
  if summary["angle2_obtuse_share"] is not None:
    facts.append(f"Angle 2 > 90° on {100 * summary['angle2_obtuse_share']:.0f}% of the {summary['angle_steps']} "
                 f"logged steps of {label}")
  if summary["conflict_share"] is not None:
    facts.append(f"conflicting steps: {100 * summary['conflict_share']:.0f}%")
  return (("; ".join(facts) + ".\n") if facts else "") + ANGLE_IDENTITY + ": no evidence for DTNH."


def plot_angles(records: list[dict[str, Any]], path: str, title: str = "", *,
                plain: list[dict[str, Any]] | None = None,
                labels: tuple[str, str] = ("this run", "the plain run")) -> dict[str, Any]:
  """Figures 4-5, in degrees over steps: Angle 1 with Angle 3 (left), Angle 2 with Angle 4 (right), a line at 90°.

  Args:
    records: the metrics of the run drawn (a DTNH (X) run).
    path: the PNG written.
    title: of the figure.
    plain: the metrics of the plain X run: its Angle 3 and Angle 4 (on its logging steps) are drawn too,
      dashed, beside those at ``records``' iterate.
    labels: the names of the run and of the plain run, in the legends (with ``plain``) and the caption.

  The caption gives the share of logged steps with Angle 2 > 90° and of
  conflicting steps, and says that Angle 1 < Angle 3 is an identity of the
  projection (:data:`ANGLE_IDENTITY`), so that the left panel shows no gain.

  Returns:
    :func:`angle_summary` of ``records`` and ``plain``.
  """
  summary = angle_summary(records, plain)
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
  for ax, ((own, own_label), (other, other_label)) in zip(axes, _ANGLE_PANELS):
    lines = [(records, own, own_label, {}), (records, other, other_label, {})]
    if plain is not None:
      lines = [(records, own, f"{own_label}, {labels[0]}", {}),
               (records, other, f"{other_label} at {labels[0]}'s iterate", {}),
               (plain, other, f"{other_label.split(':')[0]} along {labels[1]}", {"ls": "--", "marker": "."})]
    for run, key, label, style in lines:
      series = _series(run, "train", key)
      ax.plot(series[:, 0], series[:, 1], lw=1, label=label, **style)
    ax.axhline(90, color="black", ls=":", lw=0.8)
    ax.set(xlabel="step", ylabel="degrees")
  fig.supxlabel(_angles_caption(summary, labels[0]), fontsize=8)
  _save(plt, fig, axes, path, title, legend_size="x-small")
  return summary


def plot_results(results: Iterable[dict[str, Any]], path: str, methods: Sequence[str] | None = None,
                 title: str = "") -> None:
  """The results table as bars: mean test accuracy (%) per method, ± std over seeds, one panel per source."""
  plt = _pyplot()
  cells, labels = _accuracies(results)
  methods = [m for m in (methods or labels) if m in labels]
  fig, axes = plt.subplots(1, len(cells), figsize=(1.2 + 0.55 * len(methods) * len(cells), 3.8), squeeze=False)
  for ax, ((source, dataset), by_method) in zip(axes[0], cells.items()):
    shown = [m for m in methods if by_method.get(m)]
    values = [100 * np.asarray(by_method[m]) for m in shown]
    means = np.array([v.mean() for v in values])
    colors = ["tab:orange" if labels[m].startswith("DTNH") else "tab:blue" for m in shown]
    ax.bar(range(len(shown)), means, yerr=[v.std() for v in values], color=colors, capsize=3)
    ax.set_xticks(range(len(shown)), [labels[m] for m in shown], rotation=60, ha="right", fontsize=8)
    low = float(min(v.min() for v in values))
    ax.set_ylim(max(0.0, low - 0.25 * (100 - low) - 1), min(100.0, float(means.max()) + 0.1 * (100 - low) + 1))
    ax.set(ylabel="test accuracy (%)", title=f"{source} → {dataset}")
    ax.grid(alpha=0.3, axis="y")
  _finish(plt, fig, path, title)


def _save(plt, fig, axes, path: str, title: str, legend_size: str | None = None) -> None:
  """Grid and legend (of font size ``legend_size``: matplotlib's default if None) on each of ``axes`` (line
  plots), then :func:`_finish`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
  _finish(plt, fig, path, title)


def _finish(plt, fig, path: str, title: str) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


#: The files :func:`write_run_report` writes into a run's folder.
RUN_REPORT = ("results.md", "losses.png", "angles.png")


def _run_report_from_before_the_list(workdir: str):
  """``workdir.claim``'s test for a run folder an older dtnh_jax wrote (without ``workdir.WRITTEN``): its report
  files are ours when its results.md is one of our tables."""
  try:
    with open(os.path.join(workdir, RUN_REPORT[0]), encoding="utf-8") as f:
      recognized = f.read(len(_TABLE_START)) == _TABLE_START
  except (OSError, UnicodeDecodeError):
    recognized = False
  return lambda path: recognized and os.path.basename(path) in RUN_REPORT


def write_run_report(workdir: str, records: list[dict[str, Any]], results: dict[str, Any], plots: bool = True) -> None:
  """``results.md`` and, with ``plots``, ``losses.png`` and ``angles.png`` (when there is a regularizer) of one run.

  Each is replaced atomically, and only if dtnh_jax wrote it (``dtnh_jax.train.workdir.replace_ours``).

  Raises:
    ConfigError: one of them is there and dtnh_jax did not write it (it is left as it is).
  """
  written_before = _run_report_from_before_the_list(workdir)
  workdir_lib.claim(workdir, RUN_REPORT[:1] + (RUN_REPORT[1:] if plots else ()), written_before)
  workdir_lib.write_atomically(os.path.join(workdir, RUN_REPORT[0]), results_table([results]))
  if not plots:
    return
  workdir_lib.write_atomically(os.path.join(workdir, "losses.png"),
                               lambda path: plot_losses({results["label"]: records}, path, results["label"]))
  if any("angle1" in r for r in records):
    workdir_lib.write_atomically(os.path.join(workdir, "angles.png"),
                                 lambda path: plot_angles(records, path, results["label"]))


def _mean_std(values: Sequence[float]) -> str:
  """``mean ± sd`` in %, the sample sd (``ddof=1``; 0 for one value)."""
  values = 100 * np.asarray(values)
  return f"{values.mean():.2f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.2f}"


_TABLE_START = "| source | target | "


def results_table(results: Iterable[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
  """Markdown in the layout of the paper's Tables II-IV: mean ± sample sd (ddof=1) test accuracy (%).

  One table row per (source, dataset), one column per method, over seeds.
  """
  cells, labels = _accuracies(results)
  methods = [m for m in (methods or labels) if m in labels]
  lines = [_TABLE_START + " | ".join(labels[m] for m in methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for (source, dataset), by_method in cells.items():
    row = [_mean_std(by_method[m]) if by_method.get(m) else "–" for m in methods]
    lines.append(f"| {source} | {dataset} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def _accuracies(results: Iterable[dict[str, Any]]):
  """``({(source, dataset): {method: [accuracy per seed]}}, {method: label})`` in the order first seen."""
  cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
  labels: dict[str, str] = {}
  for r in results:
    cells[(r["source"], r["dataset"])][r["method"]].append(r["test_accuracy"])
    labels[r["method"]] = r["label"]
  return cells, labels


# The tuned comparison (the evidence protocol of DESIGN.md): each method at the λ and decay chosen on validation.


def _percent(mean: float, std: float) -> str:
  return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _test_cell(row: dict[str, Any]) -> str:
  """A summary row's test accuracy, ``mean ± sd`` in %, the sample sd (``ddof=1``) from the summary's ``ddof=0``
  one (``selection.summary``): ``sd_1 = sd_0 · sqrt(n / (n − 1))``; 0 for one seed."""
  n = int(row["n_seeds"])
  return _percent(row["test_mean"], row["test_std"] * math.sqrt(n / (n - 1)) if n > 1 else 0.0)


def _holm(pair: dict[str, Any] | None) -> str:
  """``0.012 †``: the Holm-adjusted p-value of the table's family, ``†`` where it stays below 1 − confidence."""
  if pair is None or math.isnan(pair.get("p_holm", math.nan)):
    return "–"
  return f"{pair['p_holm']:.3f}" + (" †" if pair["holm_excludes_zero"] else "")


def _choice(row: dict[str, Any]) -> str:
  return f"λ {row['reg_weight']:g}, decay {row['reg_decay']:g}"


def _delta(pair: dict[str, Any] | None) -> str:
  """``+1.80 [+0.20, +3.40] *`` in points; ``*`` when the interval excludes 0."""
  if pair is None:
    return "–"
  if pair["n"] < 2:
    return f"{100 * pair['mean']:+.2f} (n={pair['n']}: no interval)"
  mark = " *" if pair["excludes_zero"] else ""
  return f"{100 * pair['mean']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]{mark}"


def _interval_label(pairs: Sequence[dict[str, Any]]) -> str:
  """``95% CI`` when every pair has the same confidence, else ``CI``."""
  confidences = {pair["confidence"] for pair in pairs}
  return f"{100 * confidences.pop():g}% CI" if len(confidences) == 1 else "CI"


def reference_table(pairs: Sequence[dict[str, Any]]) -> str:
  """Markdown: each tuned method − fine-tuning from the same source (:func:`dtnh_jax.train.stats.reference_pairs`),
  in points with its t interval over the seed pairs (``*``: it excludes 0) and its Holm-adjusted p-value over the
  table's rows (``†``: below 1 − the confidence); a footnote says so. Empty without pairs."""
  if not pairs:
    return ""
  level = _interval_label(pairs)
  lines = [f"| source | method (at its pick) | − fine-tuning [{level}] | Holm p |", "|---|---|---|---|"]
  for pair in stats.with_holm(pairs):
    lines.append(f"| {pair['source']} | {pair['method']} | {_delta(pair)} | {_holm(pair)} |")
  lines += ["", "Each method at the λ and decay chosen on validation minus fine-tuning from the same source, test "
            "accuracy in points, paired over seeds (mean [t interval], * where it excludes 0); Holm p adjusts the "
            "rows' paired t-tests for this table († where below 1 − confidence). From scratch against fine-tuning "
            "is what the source's pre-training is worth; X against fine-tuning, whether regularizing helps."]
  return "\n".join(lines) + "\n"


def tuned_table(summary: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]) -> str:
  """Markdown: per source, X and DTNH(X) each at its own pick, and their paired difference Δ.

  Args:
    summary: :func:`dtnh_jax.train.selection.summary` of a study.
    pairs: :func:`dtnh_jax.train.stats.dtnh_pairs` of the same study (test accuracy).

  One block of rows per source: fine-tuning from it and training from scratch
  first, as references, then one row per regularizer X with columns
  ``X tuned | DTNH(X) tuned | Δ [CI]``. Each cell is the test accuracy (%),
  mean ± sample sd (ddof=1) over seeds, with the λ and decay chosen on validation; Δ is
  DTNH(X) − X in points with its t interval over the seed pairs, marked
  ``*`` when the interval excludes 0, and its Holm-adjusted p-value over the
  table's Δs (:func:`dtnh_jax.train.stats.with_holm`), marked ``†`` when it
  stays below 1 − the confidence. A footnote says all of this under the table.
  """
  by_key = {(row["method"], row["source"]): row for row in summary}
  pair_of = {(pair["method"], pair["source"]): pair for pair in stats.with_holm(pairs)}  # the table is the family
  scratch = [row for row in summary if selection.is_scratch(row["method"], row["source"])]
  sources = list(dict.fromkeys(row["source"] for row in summary if not selection.is_scratch(row["method"],
                                                                                             row["source"])))
  level = _interval_label(pairs)
  lines = [f"| source | target | method | X tuned | DTNH (X) tuned | Δ [{level}] | Holm p |",
           "|---|---|---|---|---|---|---|"]
  for source in sources:
    rows = [row for row in summary if row["source"] == source]
    target = next((row["dataset"] for row in rows if row.get("dataset")), None) or "–"
    # from scratch does not depend on the source: this source's runs if there are, else the first found
    own_scratch = [row for row in scratch if row["source"] == source]
    references = [row for row in rows if row["method"] == selection.FINE_TUNE] + (own_scratch or scratch[:1])
    for row in references:
      label = "From scratch" if selection.is_scratch(row["method"], row["source"]) else row["label"]
      lines.append(f"| {source} | {target} | {label} (reference) | {_test_cell(row)} | – | – | – |")
    plain = [row["method"] for row in rows if selection.plain_method(row["method"]) is None
             and row["method"] not in (selection.FINE_TUNE, selection.SCRATCH)]
    plain += [selection.plain_method(row["method"]) for row in rows if selection.plain_method(row["method"])]
    for method in dict.fromkeys(plain):
      x, dtnh = by_key.get((method, source)), by_key.get((selection.DTNH_PREFIX + method, source))
      label = x["label"] if x else method
      cells = [f"{_test_cell(r)} ({_choice(r)})" if r else "–" for r in (x, dtnh)]
      pair = pair_of.get((method, source))
      lines.append(f"| {source} | {target} | {label} | {cells[0]} | {cells[1]} | {_delta(pair)} | {_holm(pair)} |")
  seeds = sorted({row["n_seeds"] for row in summary})
  lines += ["", (f"Test accuracy (%), mean ± sample sd (ddof=1) over {'/'.join(map(str, seeds))} seed(s), of each "
                 "method at the λ and decay chosen on validation accuracy (best mean over seeds). Δ = DTNH(X) − X in "
                 "points, paired by seed, with its t interval; * marks an interval that excludes 0. Holm p: the "
                 "paired t-test's p-value adjusted (Holm) over this table's Δs; † where it stays below 1 − the "
                 "confidence.")]
  return "\n".join(lines) + "\n"


def _by_seed(records: Iterable[dict[str, Any]], field: str) -> np.ndarray:
  return np.array([r[field] for r in sorted(records, key=lambda r: int(r["seed"]))], dtype=float)


def _lambda_profile(records: list[dict[str, Any]], seeds: set[int],
                    decay: float | None) -> list[tuple[float, float]]:
  """``[(λ, decay)]`` by λ: with ``decay`` given, that decay; else, per λ, the decay of best mean validation
  accuracy.

  The per-λ choice is :func:`selection.choose` on the runs of one λ (the same
  eligibility and ties as the pick); its warnings were given by the study's
  own selection already.
  """
  weights = sorted({float(r["reg_weight"]) for r in records})
  profile = []
  for weight in weights:
    at_weight = [r for r in records if float(r["reg_weight"]) == weight
                 and (decay is None or float(r["reg_decay"]) == float(decay))]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      chosen = selection.choose(at_weight, seeds)
    if chosen:
      profile.append(next(iter(chosen.values())))
  return profile


def plot_lambda_curve(records: Iterable[dict[str, Any]], path: str, title: str = "", decay: float | None = None,
                      fields: Sequence[str] = ("val_accuracy", "test_accuracy")) -> list[tuple[str, str]]:
  """The λ curve: accuracy against λ for X and DTNH(X), one panel per (regularizer, source).

  Args:
    records: every run of a sweep (``method``, ``source``, ``seed``,
      ``reg_weight``, ``reg_decay``, ``val_accuracy``, ``test_accuracy``; ``label``, ``dataset`` if any).
    path: the PNG written.
    title: of the figure.
    decay: draw the runs of this ``reg_decay`` only; ``None``: at each λ, the
      decay with the best mean validation accuracy (chosen as the pick is).
    fields: the accuracies drawn, solid for the first (validation), dashed for the others (test).

  Each curve is the mean over seeds with a band of ± std (``ddof=0``); only
  combinations run with every seed are drawn. A star marks each method's pick
  (on validation, :mod:`~dtnh_jax.train.selection`). Fine-tuning from the
  panel's source and training from scratch are horizontal bands (mean ± std
  of their picks). The x axis is logarithmic, where λ = 0 has no place: it is
  drawn one decade left of the smallest positive λ, its tick labelled ``0``,
  with a dotted line between it and the rest of the axis, as a point with an
  error bar that no line joins to the curve (a line across the break would
  draw values for λ between 0 and the smallest one, never run); DTNH(X)'s is
  set a little to the right of X's, which it equals up to noise. The test curves
  show every λ, not only the pick's: they are labelled test, and the pick was
  made on validation.

  Returns:
    The panels drawn, ``[(regularizer, source)]``, row by row (rows: regularizers, columns: sources).
  """
  records = list(records)
  marked = selection.select(records)
  seeds = {int(r["seed"]) for r in records}
  label_of = {r["method"]: r.get("label", r["method"]) for r in records}
  sources = list(dict.fromkeys(r["source"] for r in records if not selection.is_scratch(r["method"], r["source"])))
  regularizers = list(dict.fromkeys(selection.plain_method(r["method"]) or r["method"] for r in records
                                    if r["method"] not in (selection.FINE_TUNE, selection.SCRATCH)
                                    and not selection.is_scratch(r["method"], r["source"])))
  ran = {(selection.plain_method(r["method"]) or r["method"], r["source"]) for r in records}
  sources = [source for source in sources if any((x, source) in ran for x in regularizers)]
  panels = [(x, source) for x in regularizers for source in sources if (x, source) in ran]
  if not panels:
    raise ValueError("no run of a regularized method (X or dtnh-X) to draw a λ curve of")
  positive = sorted({float(r["reg_weight"]) for r in records if float(r["reg_weight"]) > 0
                     and (selection.plain_method(r["method"]) or r["method"]) in regularizers})
  zero_at = positive[0] / 10 if positive else 1.0
  place = lambda weight: weight if weight > 0 else zero_at
  styles = dict(zip(fields, ["-"] + ["--"] * (len(fields) - 1)))
  short = lambda field: field.replace("_accuracy", "").replace("val", "validation")

  plt = _pyplot()
  fig, axes = plt.subplots(len(regularizers), len(sources), figsize=(4.6 * len(sources), 3.6 * len(regularizers)),
                           squeeze=False)
  for ax in axes.flat:
    ax.set_visible(False)
  picks = [r for r in marked if r["selected"]]
  for x, source in panels:
    ax = axes[regularizers.index(x), sources.index(source)]
    ax.set_visible(True)
    references = [("fine-tuning", "tab:green", [r for r in picks if r["method"] == selection.FINE_TUNE
                                                  and r["source"] == source]),
                  ("from scratch", "tab:gray", [r for r in picks if selection.is_scratch(r["method"], r["source"])])]
    for name, color, runs in references:
      for field in fields if runs else ():
        values = 100 * _by_seed(runs, field)
        ax.axhspan(values.mean() - values.std(), values.mean() + values.std(), color=color, alpha=0.12, lw=0)
        ax.axhline(values.mean(), color=color, ls=styles[field], lw=1, label=f"{name} ({short(field)})")
    for method, color in ((x, "tab:blue"), (selection.DTNH_PREFIX + x, "tab:orange")):
      runs = [r for r in records if r["method"] == method and r["source"] == source]
      profile = _lambda_profile(runs, seeds, decay)
      if not profile:
        continue
      at = {c: [r for r in runs if (float(r["reg_weight"]), float(r["reg_decay"])) == c] for c in profile}
      # X and DTNH(X) coincide at λ = 0 (nothing to project): DTNH(X)'s point a little to the right, to be seen
      dodge = 1.0 if method == x else 1.25
      xs = np.array([place(weight) * (1.0 if weight > 0 else dodge) for weight, _ in profile])
      pick = next(((float(r["reg_weight"]), float(r["reg_decay"])) for r in picks
                   if r["method"] == method and r["source"] == source), None)
      for field in fields:
        values = np.stack([100 * _by_seed(at[c], field) for c in profile])
        mean, std = values.mean(axis=1), values.std(axis=1)
        label = f"{label_of[method]} ({short(field)})"
        # λ = 0 is a point of its own: a line from it across the break would draw values between 0 and the smallest λ
        line = np.array([weight > 0 for weight, _ in profile])
        if line.any():
          ax.plot(xs[line], mean[line], marker="o", ms=3, color=color, ls=styles[field], lw=1.2, label=label)
          ax.fill_between(xs[line], (mean - std)[line], (mean + std)[line], color=color, alpha=0.15, lw=0)
        if not line.all():
          ax.errorbar(xs[~line], mean[~line], yerr=std[~line], marker="o", ms=3, color=color, ls="none", capsize=3,
                      label=None if line.any() else label)
        if pick in profile:
          k = profile.index(pick)
          ax.plot(xs[k], mean[k], marker="*", ms=11, color=color, mec="black", mew=0.6, ls="none")
    ax.set_xscale("log")
    shown = sorted({float(r["reg_weight"]) for r in records if r["source"] == source
                    and (selection.plain_method(r["method"]) or r["method"]) == x})
    ax.set_xticks([place(w) for w in shown], ["0" if w == 0 else f"{w:g}" for w in shown],
                  rotation=45 if len(shown) > 6 else 0, fontsize=8)
    ax.minorticks_off()
    if 0.0 in shown and positive:
      ax.axvline(math.sqrt(zero_at * positive[0]), color="black", ls=":", lw=0.8)  # the break before λ = 0
    dataset = next((r.get("dataset") for r in records if r["source"] == source and r.get("dataset")), None)
    ax.set(xlabel="λ (reg_weight)" + (f", decay {decay:g}" if decay is not None else ""), ylabel="accuracy (%)",
           title=f"{label_of.get(x, x)}: {source}" + (f" → {dataset}" if dataset else ""))
    ax.grid(alpha=0.3)
  first = axes[regularizers.index(panels[0][0]), sources.index(panels[0][1])]
  first.legend(fontsize=6, loc="best")
  _finish(plt, fig, path, title or "accuracy against λ (mean ± std over seeds; ★ pick on validation)")
  return panels
