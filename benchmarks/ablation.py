"""Ablations on the offline study's protocol: DTNH's options and the gradient-surgery family, each tuned on validation.

Every variant is DTNH(X) with one setting changed (:data:`VARIANTS`): the
projection (``conflict``, the paper's Algorithm 1; ``always``), the
granularity (``tree``, the paper; ``leaf``, per tensor; ``module``, per
layer), or the correction itself (``--projection pcgrad``, ``gradvac``,
``mgda``, ``upgrad``, ``dualproj``, ``cagrad``). Each runs the study's recipe
(``--preset study``: 40 digits per class with 10 per class held out for
validation and the split redrawn per seed, 300 steps, λ decayed ×0.98 per
epoch) over the same seeds and λ values, and so does plain X. Per variant,
λ is picked on the mean validation accuracy over the seeds
(``dtnh_jax.train.selection``, which reads no test number before choosing);
test accuracy is then read for the pick only, and the variant is compared
with tuned X and with tuned DTNH(X) (``conflict``, ``tree``) by the paired
difference over seeds (``dtnh_jax.train.stats``, 95% t interval).

Runs go through ``dtnh_jax.train.grid.run_grid``, the code ``dtnh-train``
runs, one sub-workdir per variant (``WORKDIR/VARIANT``; ``WORKDIR/plain``
for X): an interrupted ablation resumes where it stopped. Writes
``WORKDIR/ablation.md`` (the table) and ``ablation.json`` (every run's
record, the table's rows, the machine); the last line printed is the rows as
JSON.

    python benchmarks/ablation.py --workdir runs/ablation     # KnowDist from `unrelated`, seeds 0-2, λ 0.01-1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from dtnh_jax import names
from dtnh_jax.train import grid, presets, provenance, selection, stats
from dtnh_jax.train.config import Method
from dtnh_jax.train.data import validation_kind

#: Variant name -> the settings of DTNH(X) it changes. The first is the reference DTNH(X).
VARIANTS: dict[str, dict[str, Any]] = {
    "conflict": {},
    "always": {"projection": "always"},
    "leaf": {"granularity": "leaf"},
    "module": {"granularity": "module"},
    **{name: {"projection": name} for name in names.AGGREGATORS},
}
REFERENCE = "conflict"


def describe(variant: str) -> str:
  settings = VARIANTS[variant]
  if not settings:
    return "DTNH (Algorithm 1: conflict, tree)"
  return ", ".join(f"--{key} {value}" for key, value in settings.items())


def run_variants(base, workdir: str, regularizer: str, source: str, seeds, reg_weights, variants,
                 show_progress=True):
  """Every run's record, each with ``variant`` (``"plain"`` for X), from the config ``base``."""
  records = []
  jobs = [("plain", Method(regularizer, False), {})] + [(v, Method(regularizer, True), VARIANTS[v]) for v in variants]
  for variant, method, settings in jobs:
    results = grid.run_grid(base.replace(**settings), os.path.join(workdir, variant), sources=[source],
                            methods=[method], seeds=seeds, reg_weights=reg_weights, show_progress=show_progress)
    records += [{**record, "variant": variant} for record in results]
  return records


def _selected_by_pair(records, variant):
  """The tuned runs of ``variant``: ``(summary row, {pair key: test accuracy})``."""
  runs = [{**r, "method": f"{r['method']}:{variant}"} for r in records if r["variant"] == variant]
  marked = selection.select(runs)
  row = selection.summary(marked)[0]
  return row, {stats.pair_key(r): r["test_accuracy"] for r in marked if r["selected"]}


def table(records, variants) -> tuple[str, list[dict[str, Any]]]:
  """The markdown table and its rows: per variant, tuned test accuracy and the paired differences."""
  plain_row, plain = _selected_by_pair(records, "plain")
  reference_row, reference = _selected_by_pair(records, REFERENCE)
  percent = lambda mean, std: f"{100 * mean:.2f} ± {100 * std:.2f}"
  interval = lambda d: (f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                        + (" *" if d["excludes_zero"] else "")).replace("-", "−")
  lines = ["| variant | settings | tuned test accuracy (λ) | val. accuracy | − X [95% CI] | − DTNH [95% CI] |",
           "|---|---|---|---|---|---|",
           f"| X (plain) | {plain_row['label']} | {percent(plain_row['test_mean'], plain_row['test_std'])} "
           f"(λ {plain_row['reg_weight']:g}) | {percent(plain_row['val_mean'], plain_row['val_std'])} | – | – |"]
  rows = [{"variant": "plain", **plain_row}]
  for variant in variants:
    row, tuned = _selected_by_pair(records, variant)
    versus_x = stats.paired_difference(tuned, plain)
    versus_dtnh = stats.paired_difference(tuned, reference) if variant != REFERENCE else None
    rows.append({"variant": variant, **row, "minus_x": versus_x, "minus_dtnh": versus_dtnh})
    lines.append(f"| {variant} | {describe(variant)} | {percent(row['test_mean'], row['test_std'])} "
                 f"(λ {row['reg_weight']:g}) | {percent(row['val_mean'], row['val_std'])} | {interval(versus_x)} | "
                 f"{interval(versus_dtnh) if versus_dtnh else '–'} |")
  return "\n".join(lines) + "\n", rows


def main(argv=None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="where the runs and the table go (resumable)")
  parser.add_argument("--regularizer", default="knowdist", choices=("l2", "l2-sp", "knowdist", "delta"))
  parser.add_argument("--source", default="unrelated", choices=names.OFFLINE_SOURCES)
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default: %(default)s)")
  parser.add_argument("--reg-weight", default="0.01,0.1,1", help="λ values swept per variant (default: %(default)s)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated among {', '.join(VARIANTS)} (default: all); {REFERENCE} always runs")
  parser.add_argument("--preset", default="study", choices=sorted(presets.PRESETS),
                      help="the recipe (default: %(default)s; a smaller one for a smoke run)")
  parser.add_argument("--val-fraction", type=float, help="share of the training pool held out (default: the preset's)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  chosen = [v for v in args.variants.split(",") if v]
  if set(chosen) - set(VARIANTS):
    parser.error(f"unknown variant(s) {sorted(set(chosen) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
  variants = [REFERENCE] + [v for v in chosen if v != REFERENCE]
  seeds = [int(s) for s in args.seeds.split(",")]
  reg_weights = [float(w) for w in args.reg_weight.split(",")]
  if len(reg_weights) < 2:
    parser.error("--reg-weight needs at least two values: λ is chosen on validation")

  base = presets.get(args.preset, **({"val_fraction": args.val_fraction} if args.val_fraction else {}))
  if validation_kind(base) is None:
    parser.error(f"--preset {args.preset} has no validation split to choose λ on; pass --val-fraction")
  started = time.perf_counter()
  records = run_variants(base, args.workdir, args.regularizer, args.source, seeds, reg_weights, variants,
                         show_progress=not args.no_progress)
  text, rows = table(records, variants)
  machine = provenance.provenance()
  header = (f"Ablation of DTNH ({args.regularizer}) from `{args.source}`, --preset {args.preset}: seeds {args.seeds}, "
            f"λ ∈ {{{args.reg_weight}}} picked per variant on validation; test accuracy (%) of the pick, mean ± std "
            f"over seeds; differences paired by seed (* the interval excludes 0). {len(records)} runs, "
            f"{(time.perf_counter() - started) / 60:.1f} min; {machine['cpu']} ({machine['cpu_count']} CPUs), "
            f"jax {machine['versions']['jax']}, commit {machine['commit']}.\n\n")
  print("\n" + header + text)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
    f.write(header + text)
  with open(os.path.join(args.workdir, "ablation.json"), "w") as f:
    json.dump({"rows": rows, "records": records, "provenance": machine}, f, indent=2, default=str)
  print(json.dumps(rows, default=str))
  return rows


if __name__ == "__main__":
  main()
