"""What DTNH did at each step of some runs, and a table per run: where a run collapses, does DTNH's step blow up?

DTNH's direction on a conflicting step is ``d = (1 − λ⟨g, r⟩/|g|²)·g + λr``: the component along g is scaled by
``1 − λ⟨g, r⟩/|g|²``, which grows without bound as |g| shrinks against a pull that still conflicts. Every DTNH run
logs ``⟨g, r⟩``, ``|g|``, ``|r|`` and λ per step (``metrics.jsonl``); this script keeps those steps (and each
run's result) and derives, per run, the largest scale on g, the largest regularizer-to-empirical ratio λ|r|/|g|,
and the empirical loss's lowest point and its largest rise after it.

    python benchmarks/step_trace.py collect WORKDIR --out benchmarks/records/trace/NAME.jsonl
    python benchmarks/step_trace.py table benchmarks/records/trace/NAME.jsonl --out benchmarks/records/trace/NAME.md

``collect`` writes one JSON line per train step logged (the run's method, λ, seed, final test accuracy and the
step's fields); ``table`` reads that file alone, so the committed table is re-derived from the committed trace
(``tests/test_step_trace.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

#: The per-step fields kept (those a plain run does not log are absent from its rows).
FIELDS = ("loss_empirical", "loss_regularizer", "empirical_norm", "regularizer_norm", "inner_product", "reg_weight",
          "conflict", "accuracy", "removed_fraction")
#: The run-level fields kept from ``results.json``.
RUN_FIELDS = ("method", "dataset", "source", "reg_weight", "reg_decay", "seed", "test_accuracy", "diverged_at_step")


def collect(workdir: str) -> list[dict[str, Any]]:
  """Every logged train step of every run under ``workdir`` (a run: a folder holding ``results.json`` and
  ``metrics.jsonl``), with ``grid`` the first folder under ``workdir`` it lies in (the grid's workdir, one
  setting each), in the order (grid, method, λ, seed, step). Runs set aside by ``--restart`` are skipped; two
  runs of one grid, method, λ, decay and seed are refused (a ``ValueError`` naming both)."""
  rows, seen = [], {}
  for folder, _, files in os.walk(workdir, followlinks=True):
    if "results.json" not in files or "metrics.jsonl" not in files or "set-aside" in folder.split(os.sep):
      continue
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
      result = json.load(f)
    run = {"grid": os.path.relpath(folder, workdir).split(os.sep)[0],
           **{key: result.get(key) for key in RUN_FIELDS}}
    run["lambda"] = run.pop("reg_weight")
    key = _run_key(run)
    if key in seen:
      raise ValueError(f"two runs of {key} under {workdir}: {seen[key]} and {folder}; collect one of them")
    seen[key] = folder
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        entry = json.loads(line)
        if entry.get("kind") != "train":
          continue
        rows.append({**run, "step": entry["step"], **{k: _float32(entry[k]) for k in FIELDS if k in entry}})
  return sorted(rows, key=lambda r: (*_run_key(r), r["step"]))


def _run_key(row: dict[str, Any]) -> tuple:
  """``(grid, method, λ, decay, seed)``: one run (a decay of None, from an older results.json, sorts as 1)."""
  decay = row.get("reg_decay")
  return row["grid"], row["method"], row["lambda"], 1.0 if decay is None else decay, row["seed"]


def _float32(value: Any) -> Any:
  """A logged float32 value, written with the 7 significant digits it has (``0.01`` for 0.009999999776482582);
  anything else as it is."""
  return float(f"{value:.7g}") if isinstance(value, float) else value


def read(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def scale_on_g(row: dict[str, Any]) -> float | None:
  """DTNH's factor on g at this step, ``1 − λ·min(0, ⟨g, r⟩)/|g|²`` (1 without a conflict); None for a step
  without DTNH's diagnostics (a plain run) or with |g| = 0."""
  if "inner_product" not in row or not row.get("empirical_norm"):
    return None
  return 1.0 - row["reg_weight"] * min(0.0, row["inner_product"]) / row["empirical_norm"] ** 2


def _pull_ratio(row: dict[str, Any]) -> float | None:
  if "regularizer_norm" not in row or not row.get("empirical_norm"):
    return None
  return row["reg_weight"] * row["regularizer_norm"] / row["empirical_norm"]


def summary(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One run's figures from its steps (sorted by step): its empirical loss's lowest and last values and, over the
  steps that logged DTNH's inner products, the median and largest scale on g, with the pull ratio λ|r|/|g|, the
  cosine of g and r, and the empirical loss at that step and at the next one logged."""
  losses = [(r["step"], r["loss_empirical"]) for r in steps
            if isinstance(r.get("loss_empirical"), float) and math.isfinite(r["loss_empirical"])]
  # a diverged run's non-finite losses are left out; a run without a finite one has none to show
  low_step, low = min(losses, key=lambda s: s[1]) if losses else (None, math.nan)
  out = {"low": low, "low_step": low_step, "last": losses[-1][1] if losses else math.nan}
  logged = [r for r in steps if scale_on_g(r) is not None]
  if logged:
    top = max(logged, key=scale_on_g)
    later = [loss for step, loss in losses if step > top["step"]]
    out.update(logged=len(logged), conflicts=sum(1 for r in logged if r["inner_product"] < 0),
               scale_median=statistics.median(scale_on_g(r) for r in logged), scale_max=scale_on_g(top),
               scale_max_step=top["step"], pull=_pull_ratio(top),
               cosine=top["inner_product"] / (top["empirical_norm"] * top["regularizer_norm"]),
               loss_there=top["loss_empirical"], loss_next=later[0] if later else None)
  return out


def table(rows: Sequence[dict[str, Any]]) -> str:
  """The Markdown table: one row per run, ordered by grid, method, λ, seed."""
  runs: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    runs.setdefault(_run_key(row), []).append(row)
  lines = ["| grid | method | λ | seed | test % | empirical loss: lowest (step), last | conflicting steps | "
           "scale on g: median | largest (step) | there: λ\\|r\\|/\\|g\\|, cos(g, r) | "
           "empirical loss there → next step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (grid, method, lam, decay, seed), steps in sorted(runs.items(), key=lambda kv: kv[0]):
    steps = sorted(steps, key=lambda r: r["step"])
    s, first = summary(steps), steps[0]
    diverged = first.get("diverged_at_step")
    test = f"{100 * first['test_accuracy']:.2f}" + (f" (diverged at step {diverged})" if diverged is not None else "")
    if "scale_max" in s:
      following = "–" if s["loss_next"] is None else f"{s['loss_next']:.2f}"
      dtnh = (f"{s['conflicts']}/{s['logged']} | {s['scale_median']:.3g} | {s['scale_max']:.3g} "
              f"({s['scale_max_step']}) | {s['pull']:.3g}, {s['cosine']:+.2f} | {s['loss_there']:.2f} → {following}")
    else:
      dtnh = "– | – | – | – | –"
    losses = f"{s['low']:.3f} ({s['low_step']}), {s['last']:.3f}"
    lines.append(f"| {grid} | {method} | {lam:g} (×{decay:g}) | {seed} | {test} | {losses} | {dtnh} |")
  lines += ["", "Per run, from the train steps it logged: the minibatch's empirical (cross-entropy) loss, lowest and "
            "last; over the steps that logged ⟨g, r⟩ (every step of a DTNH run; a plain run logs them every "
            "log_every steps), how many conflicted (⟨g, r⟩ < 0) and the factor on g of DTNH's direction written as "
            "(1 − λ·min(0, ⟨g, r⟩)/|g|²)·g + λr (1 without a conflict; for a plain run, what DTNH would have used), "
            "its median and its largest value, and at that step the pull ratio λ|r|/|g|, the cosine of g and r, and "
            "the empirical loss there and at the next logged step. λ: the run's initial λ (× its decay per "
            "epoch). That direction equals g + λ·r⊥, r⊥ the part of r "
            "orthogonal to g: a large factor means a large pull λr against g, of which DTNH keeps the part "
            "orthogonal to g; its component along g stays g. A candidate correction (another --projection) logs "
            "the same inner products of g and r, not its own direction."]
  return "\n".join(lines) + "\n"


def _write(text: str, out: str | None) -> None:
  if out:
    with open(out, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  gather = commands.add_parser("collect", help="a workdir -> one JSON line per logged train step")
  gather.add_argument("workdir")
  gather.add_argument("--out", help="write there (else: print)")
  derive = commands.add_parser("table", help="a trace file -> the per-run table (Markdown)")
  derive.add_argument("trace")
  derive.add_argument("--out", help="write there (else: print)")
  args = parser.parse_args(argv)
  if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
    parser.exit(2, f"step_trace.py: error: no folder for --out {args.out}; create it first\n")
  if args.command == "collect":
    if not os.path.isdir(args.workdir):
      parser.exit(2, f"step_trace.py: error: no folder {args.workdir}\n")
    try:
      rows = collect(args.workdir)
    except ValueError as error:
      parser.exit(2, f"step_trace.py: error: {error}\n")
    if not rows:
      parser.exit(2, f"step_trace.py: error: no run (results.json + metrics.jsonl) under {args.workdir}\n")
    _write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), args.out)
    return 0
  if not os.path.exists(args.trace):
    parser.exit(2, f"step_trace.py: error: no trace file {args.trace}; write one with `step_trace.py collect`\n")
  _write(table(read(args.trace)), args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
