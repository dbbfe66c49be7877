"""Figures 3-5 of a grid for a pair of runs you name: X and DTNH(X) from one source at one λ.

``dtnh-train`` draws its Figures 3-5 for the pair where DTNH changes the
tuned outcome most (``dtnh_jax.train.grid``). When DTNH changes little at
the tuned λ, that pair shows little; this script draws the same figures,
with the same code, for the pair you choose, e.g. KnowDist from ``unrelated``
at an over-strong λ, where the study found DTNH relieving the damage:

    python benchmarks/study_figures.py --workdir runs/study --method knowdist --source unrelated \\
        --reg-weight 1 --out benchmarks/figures/study5_knowdist_unrelated_lambda1

It reads the grid's ``results.json`` (no run is trained or changed), keeps
the runs of X and DTNH(X) from ``--source`` at ``--reg-weight`` (and
``--reg-decay`` where the grid swept it), and writes ``figure3_losses.png``,
``figure4_5_angles.png`` and ``figures.json`` (what was drawn, the angle
summary: the share of logged steps with Angle 2 > 90°) into ``--out``, of the
smallest seed both ran (0 where both ran it). It refuses to overwrite those
files without ``--force``. The last line printed is the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from dtnh_jax.train import grid, selection


def pair_records(results: list[dict[str, Any]], method: str, source: str, reg_weight: float,
                 reg_decay: float | None) -> list[dict[str, Any]]:
  """The records of X and DTNH(X) from ``source`` at ``reg_weight`` (and ``reg_decay``), marked selected.

  Raises:
    ValueError: what is missing, with the values the grid has.
  """
  if method.startswith(selection.DTNH_PREFIX):
    method = selection.plain_method(method)
  wanted = (method, selection.DTNH_PREFIX + method)
  candidates = [r for r in results if r["method"] in wanted and r["source"] == source]
  if not candidates:
    raise ValueError(f"no run of {method} or {wanted[1]} from source {source!r} in the grid; it has "
                     f"{sorted({(r['method'], r['source']) for r in results})}.")
  close = lambda a, b: b is None or (a is not None and math.isclose(float(a), float(b), rel_tol=1e-9))
  chosen = [r for r in candidates if close(r.get("reg_weight"), reg_weight) and close(r.get("reg_decay"), reg_decay)]
  for name in wanted:
    if not any(r["method"] == name for r in chosen):
      combos = sorted({(r.get("reg_weight"), r.get("reg_decay")) for r in candidates if r["method"] == name})
      raise ValueError(f"no run of {name} from {source!r} at λ {reg_weight:g}"
                       + (f", decay {reg_decay:g}" if reg_decay is not None else "")
                       + f"; it ran (λ, decay) {combos}.")
  return [{**r, "selected": True} for r in chosen]


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the grid's workdir (its results.json and runs)")
  parser.add_argument("--method", required=True, help="the regularizer X (dtnh-X is read as X)")
  parser.add_argument("--source", required=True)
  parser.add_argument("--reg-weight", type=float, required=True)
  parser.add_argument("--reg-decay", type=float, default=None, help="where the grid swept it (default: any)")
  parser.add_argument("--out", required=True, help="folder for the figures and figures.json")
  parser.add_argument("--force", action="store_true", help="overwrite figures already in --out")
  args = parser.parse_args(argv)

  results_path = os.path.join(args.workdir, "results.json")
  if not os.path.exists(results_path):
    parser.error(f"{results_path} is missing: run the grid first (dtnh-train ... --workdir {args.workdir}).")
  with open(results_path) as f:
    results = json.load(f)
  existing = [name for name in (grid.FIGURE3, grid.FIGURE4_5, grid.FIGURES_SUMMARY)
              if os.path.exists(os.path.join(args.out, name))]
  if existing and not args.force:
    parser.error(f"{args.out} already holds {', '.join(existing)}; pass --force to overwrite them, or another --out.")
  try:
    records = pair_records(results, args.method, args.source, args.reg_weight, args.reg_decay)
  except ValueError as error:
    parser.error(str(error))
  # a sweep keeps each run under its λ and decay (grid.run_dir); a grid of one combination does not
  first = records[0]
  combination = grid.combination_label(first["reg_weight"], first["reg_decay"])
  sweep = os.path.isdir(os.path.dirname(grid.run_dir(args.workdir, first["source"], first["method"],
                                                     int(first["seed"]), combination)))
  dataset = records[0].get("dataset") or "offline-digits"
  reason = (f"chosen by the command: {selection.plain_method(first['method']) or first['method']} and DTNH from "
            f"{args.source} at λ {args.reg_weight:g}"
            + (f", decay {args.reg_decay:g}" if args.reg_decay is not None else ""))
  summary = grid.draw_figures(args.workdir, records, dataset, sweep, out_dir=args.out, reason=reason)
  if summary is None:
    parser.error(f"the runs' metrics.jsonl are missing under {args.workdir}: is it the grid's workdir?")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
