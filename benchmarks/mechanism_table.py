"""The mechanism test's table (benchmarks/RESULTS.md, "Does full-batch DTNH close the gap?"), from its records alone.

The runs of ``benchmarks/mechanism.sh`` (fine-tuning, L2-SP and DTNH(L2-SP) at a constant λ 1, minibatch vs full
batch, momentum 0.9 vs 0, several seeds, one grid per condition) gathered by ``study_records.py collect`` into one
JSON Lines file; this script derives, per (source, batch size, momentum), each method's test accuracy and the
paired differences over seeds (``dtnh_jax.train.stats``, 95% t intervals), and the share of L2-SP's gap to
fine-tuning that DTNH closes, ``mean(DTNH − L2-SP) / mean(fine-tuning − L2-SP)``.

    python benchmarks/study_records.py collect runs/mechanism --out benchmarks/records/mechanism/mechanism.jsonl
    python benchmarks/mechanism_table.py benchmarks/records/mechanism/mechanism.jsonl \
        --out benchmarks/records/mechanism/mechanism.md

The prediction it tests (#24): averaged over minibatches DTNH's step is ḡ + λ(I − P)r with trace P ≤ 1, so
minibatch DTNH keeps most of L2-SP's pull; a full-batch DTNH, whose g is ḡ, should close most of the gap.
``tests/test_mechanism_table.py`` re-derives the committed table from the committed records, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from dtnh_jax.train import stats

METHODS = ("fine-tune", "l2-sp", "dtnh-l2-sp")


def read_records(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def condition(record: dict[str, Any]) -> tuple[str, str, int, float]:
  """``(dataset, source, batch size, momentum)`` of a run: one grid of the mechanism test."""
  settings = record["settings"]
  return record["dataset"], record["source"], int(settings["batch_size"]), float(settings["momentum"])


def _values(records: list[dict[str, Any]], method: str) -> dict[Any, float]:
  return {stats.pair_key(r): float(r["test_accuracy"]) for r in records if r["method"] == method}


def _interval(a: dict[Any, float], b: dict[Any, float]) -> str:
  keys = sorted(set(a) & set(b), key=repr)
  if len(keys) < 2:
    return "–"
  d = stats.paired_difference({k: a[k] for k in keys}, {k: b[k] for k in keys})
  mark = " *" if d["excludes_zero"] else ""
  return f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]{mark}"


def _cell(values: dict[Any, float]) -> str:
  if not values:
    return "–"
  points = [100 * v for v in values.values()]
  sd = statistics.stdev(points) if len(points) > 1 else 0.0
  return f"{statistics.fmean(points):.2f} ± {sd:.2f} ({len(points)})"


def share_closed(fine_tune: dict[Any, float], l2_sp: dict[Any, float], dtnh: dict[Any, float]) -> float | None:
  """``mean(DTNH − L2-SP) / mean(fine-tuning − L2-SP)`` over the seeds all three ran; None without a gap."""
  keys = set(fine_tune) & set(l2_sp) & set(dtnh)
  if not keys:
    return None
  gap = statistics.fmean(fine_tune[k] - l2_sp[k] for k in keys)
  if gap <= 0:
    return None
  return statistics.fmean(dtnh[k] - l2_sp[k] for k in keys) / gap


def table(records: Sequence[dict[str, Any]]) -> str:
  """The Markdown table, one row per condition (sources in the order first seen, then batch, then momentum)."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for record in records:
    if record["method"] in METHODS:
      groups.setdefault(condition(record), []).append(record)
  order = {source: i for i, source in enumerate(dict.fromkeys(r["source"] for r in records))}
  lines = ["| target | source | batch | momentum | fine-tuning | L2-SP | DTNH(L2-SP) | L2-SP − FT [95% CI] | "
           "DTNH − FT [95% CI] | DTNH − L2-SP [95% CI] | gap closed |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for key in sorted(groups, key=lambda k: (k[0], order[k[1]], k[2], -k[3])):
    runs = groups[key]
    fine_tune, l2_sp, dtnh = (_values(runs, m) for m in METHODS)
    share = share_closed(fine_tune, l2_sp, dtnh)
    diverged = sum(1 for r in runs if r.get("diverged_at_step") is not None)
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {_cell(fine_tune)} | {_cell(l2_sp)} | "
                 f"{_cell(dtnh)} | {_interval(l2_sp, fine_tune)} | {_interval(dtnh, fine_tune)} | "
                 f"{_interval(dtnh, l2_sp)} | {'–' if share is None else f'{100 * share:.0f}%'}"
                 f"{f' ({diverged} diverged)' if diverged else ''} |")
  lines += ["", "Test accuracy (%), mean ± sample sd (ddof=1) over seeds (their number in brackets), λ 1 constant "
            "(--reg-decay 1); differences in points paired by seed (the same seed: the same pool, carve, head and "
            "batches), mean [95% Student-t interval], * where it excludes 0. Gap closed: mean(DTNH − L2-SP) / "
            "mean(fine-tuning − L2-SP) over the seeds all three ran. A batch of 300 is the whole training split "
            "(full batch)."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("records", help="the JSON Lines file of study_records.py collect")
  parser.add_argument("--out", help="write the table there (else: print it)")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.records):
    parser.exit(2, f"mechanism_table.py: error: no records file {args.records}; write one with "
                "`study_records.py collect WORKDIR --out FILE`.\n")
  text = table(read_records(args.records))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
