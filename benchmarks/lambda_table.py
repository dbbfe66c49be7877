"""X → DTNH(X) at every λ of a grid, as a markdown table: the numbers behind the λ curve.

    python benchmarks/lambda_table.py runs/study/results.json > benchmarks/figures/study5_lambda_table.md

Each cell: mean test accuracy (%) of X → of DTNH(X) over the seeds at that λ (and decay), then DTNH(X) − X in
points paired by seed and split with its 95% t interval (``dtnh_jax.train.stats.lambda_pairs``); * marks an
interval that excludes 0. Every λ is shown, not only the picks: these are test numbers, and nothing is chosen
on them.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from dtnh_jax.train import Method, selection, stats


def _mean_test(records: list[dict[str, Any]], method: str, source: str, weight: float, decay: float) -> float:
  values = [r["test_accuracy"] for r in records if (r["method"], r["source"]) == (method, source)
            and float(r["reg_weight"]) == weight and float(r["reg_decay"]) == decay]
  return 100 * math.fsum(values) / len(values)


def _points(value: float) -> str:
  return f"{100 * value:+.2f}".replace("-", "−")


def lambda_table(records: list[dict[str, Any]]) -> str:
  """The table of :mod:`this script <lambda_table>` for a grid's records."""
  rows: dict[tuple[str, str], dict[tuple[float, float], dict[str, Any]]] = {}
  for pair in stats.lambda_pairs(records):
    rows.setdefault((pair["source"], pair["method"]), {})[(pair["reg_weight"], pair["reg_decay"])] = pair
  columns = sorted({combination for cells in rows.values() for combination in cells})
  decays = {decay for _, decay in columns}
  name = lambda w, d: f"λ {w:g}" + (f", decay {d:g}" if len(decays) > 1 else "")
  lines = ["| source | X | " + " | ".join(name(w, d) for w, d in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for (source, method), cells in rows.items():
    shown = []
    for weight, decay in columns:
      pair = cells.get((weight, decay))
      if pair is None:
        shown.append("–")
        continue
      x = _mean_test(records, method, source, weight, decay)
      dtnh = _mean_test(records, selection.DTNH_PREFIX + method, source, weight, decay)
      interval = "" if pair["std"] == 0 else f" [{_points(pair['low'])}, {_points(pair['high'])}]"
      shown.append(f"{x:.1f} → {dtnh:.1f}, {_points(pair['mean'])}{interval}" + (" *" if pair["excludes_zero"] else ""))
    lines.append(f"| {source} | {Method.parse(method).label} | " + " | ".join(shown) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", help="a grid's results.json (dtnh-train --preset study, or any sweep of λ)")
  args = parser.parse_args(argv)
  with open(args.results) as f:
    table = lambda_table(json.load(f))
  print(table, end="")
  return table


if __name__ == "__main__":
  main()
