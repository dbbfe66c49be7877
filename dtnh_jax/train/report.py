"""Reading metrics back, the paper's plots (Figures 3-5) and tables (II-IV)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dtnh_jax.train import metrics as metrics_lib

__all__ = [
    "plot_angles",
    "plot_losses",
    "plot_results",
    "read_metrics",
    "results_table",
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


def plot_angles(records: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Figures 4-5: Angle 1 vs Angle 3 and Angle 2 vs Angle 4 over steps, in degrees."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  pairs = (("angle1", "Angle 1: ∠(d, ∇J)", "angle3", "Angle 3: ∠(∇J + λ∇Ω, ∇J)"),
           ("angle2", "Angle 2: ∠(d, ∇Ω)", "angle4", "Angle 4: ∠(∇J + λ∇Ω, ∇Ω)"))
  for ax, (a, a_label, b, b_label) in zip(axes, pairs):
    for key, label in ((a, a_label), (b, b_label)):
      series = _series(records, "train", key)
      ax.plot(series[:, 0], series[:, 1], lw=1, label=label)
    ax.set(xlabel="step", ylabel="degrees")
  _save(plt, fig, axes, path, title)


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


def _save(plt, fig, axes, path: str, title: str) -> None:
  """Grid and legend on each of ``axes`` (line plots), then :func:`_finish`."""
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  _finish(plt, fig, path, title)


def _finish(plt, fig, path: str, title: str) -> None:
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_run_report(workdir: str, records: list[dict[str, Any]], results: dict[str, Any], plots: bool = True) -> None:
  """``results.md`` and, with ``plots``, ``losses.png`` and ``angles.png`` (when there is a regularizer) of one run."""
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_table([results]))
  if not plots:
    return
  plot_losses({results["label"]: records}, os.path.join(workdir, "losses.png"), results["label"])
  if any("angle1" in r for r in records):
    plot_angles(records, os.path.join(workdir, "angles.png"), results["label"])


def _mean_std(values: Sequence[float]) -> str:
  values = 100 * np.asarray(values)
  return f"{values.mean():.2f} ± {values.std():.2f}"


def results_table(results: Iterable[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
  """Markdown in the layout of the paper's Tables II-IV: mean ± std test accuracy (%).

  One table row per (source, dataset), one column per method, over seeds.
  """
  cells, labels = _accuracies(results)
  methods = [m for m in (methods or labels) if m in labels]
  lines = ["| source | target | " + " | ".join(labels[m] for m in methods) + " |",
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
