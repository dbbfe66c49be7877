"""The real-source study's per-run records, and every table of its RESULTS.md section derived from them alone.

``collect`` gathers the runs of a study's workdirs (each grid's ``results.json``, with each run's settings from
its ``config.json``) into one JSON Lines file, one run per line with every field of ``results.json`` (less the
derived ``selected``), plus ``grid`` (the workdir it ran in) and ``settings``; ``tables`` re-derives the tables
from that file, nothing else: picks on validation (``dtnh_jax.train.selection``), paired differences over
seeds with t intervals (``dtnh_jax.train.stats``), Holm-adjusted over each table's family.

    python benchmarks/study_records.py collect runs/study-imagenet --out benchmarks/records/study_imagenet.jsonl
    python benchmarks/study_records.py tables benchmarks/records/study_imagenet.jsonl \
        --out benchmarks/records/study_imagenet.md [--figures benchmarks/figures/study_imagenet]

``tests/test_study_records.py`` re-derives the committed tables from the committed records, byte for byte.

λ 0 of every regularized method is fine-tuning: where a method has no run at λ 0, the fine-tuning runs (same
seeds, same source) stand there, marked ``lambda0_from`` ``fine-tune`` in the tables' input (never in the records
file), so that the picks are made over a grid whose smallest λ is 0 and a pick at the smallest positive λ lies
inside it. The worst gap over λ is taken over the positive λ (at 0 the gap is 0 by construction).

A source pre-trained several times (toy sources, ``--pretrain-seed``), or run at several learning rates, is a
source per condition, ``SOURCE (pre-training K, lr L)`` (naming what varies), picked and paired on its own; a
table then gives each tuned difference per pre-training and across them (at each learning rate), with an
interval over the pre-trainings, and another each method at the learning rate validation picks (fine-tuning, X
and DTNH(X) tuned alike over λ and the learning rate).

A run of a ``dtnh-`` method whose correction is not DTNH's (``projection`` other than conflict/always, e.g. the
never-hurt candidate ``ema``) is its own arm, named ``PROJECTION(X)`` (``ema(l2-sp)``), compared with fine-tuning,
with tuned X and with tuned DTNH(X).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from dtnh_jax.train import selection, stats

#: The regularizers of the study, each with its DTNH variant.
REGULARIZERS = ("l2-sp", "knowdist", "l2", "delta")
#: Corrections that are DTNH itself (the paper's ``conflict``, the released code's ``always``).
_DTNH_PROJECTIONS = (None, "conflict", "always")
_LABELS = {"scratch": "From scratch", "fine-tune": "Fine-tuning", "l2-sp": "L2-SP", "knowdist": "KnowDist",
           "l2": "L2", "delta": "DELTA"}


# --- collect ---------------------------------------------------------------------------------------------------------

def collect(workdir: str) -> list[dict[str, Any]]:
  """The records of every grid under ``workdir`` (``WORKDIR/GRID/results.json``), sorted, with ``grid`` and the
  run's ``settings``."""
  records = []
  for grid in sorted(os.listdir(workdir)):
    summary = os.path.join(workdir, grid, "results.json")
    if not os.path.isfile(summary):
      continue
    with open(summary, encoding="utf-8") as f:
      for record in json.load(f):
        record = {k: v for k, v in record.items() if k != "selected"}
        config = os.path.join(workdir, grid, *record["run"].split("/"), "config.json")
        with open(config, encoding="utf-8") as f_config:
          settings = json.load(f_config)
        settings.pop("data_dir", None)  # a path of the machine, never read by the tables
        records.append({**record, "grid": grid, "settings": settings})
  return sorted(records, key=_order)


def _order(record: dict[str, Any]) -> tuple:
  return (record["dataset"], record["grid"], record["source"], record["method"], str(record.get("projection")),
          float(record["reg_weight"]), float(record["reg_decay"]), int(record["seed"]))


def write_records(records: Sequence[dict[str, Any]], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")


def read_records(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# --- tables ----------------------------------------------------------------------------------------------------------

def arm(record: dict[str, Any]) -> str:
  """The method as the tables name it: ``dtnh-X`` for DTNH's correction, ``PROJECTION(X)`` for another one."""
  plain = selection.plain_method(record["method"])
  if plain is not None and record.get("projection") not in _DTNH_PROJECTIONS:
    return f"{_correction(record)}({plain})"
  return record["method"]


def _correction(record: dict[str, Any]) -> str:
  """A candidate correction's name, with the settings that tell its variants apart (share-bound's reference, κ
  and, for the average, β if not 0.9: ``share-bound average κ0.5``, ``share-bound average κ0.25 β0.99``; no
  brackets, which Markdown would read as a link before the ``(X)``)."""
  if record["projection"] != "share-bound":
    return record["projection"]
  settings = record.get("settings", {})
  reference = settings.get("share_bound_reference", "current")
  # the moving average's decay only where it is not the default 0.9 (the arms named before β varied keep their name)
  decay = settings.get("ema_decay", 0.9) if reference == "average" else 0.9
  beta = f" β{decay:g}" if decay != 0.9 else ""
  return f"share-bound {reference} κ{settings.get('share_bound_kappa', 1.0):g}{beta}"


def _arm_label(name: str) -> str:
  plain = selection.plain_method(name)
  if plain is not None:
    return f"DTNH({_LABELS.get(plain, plain)})"
  if "(" in name:
    correction, plain = name[:-1].split("(", 1)
    return f"{correction}({_LABELS.get(plain, plain)})"
  return _LABELS.get(name, name)


def _candidate_base(name: str) -> str | None:
  """X for the arm ``PROJECTION(X)``; None for the others."""
  return name[:-1].split("(", 1)[1] if "(" in name else None


def _with_lambda0(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """``records`` (one dataset, ``method`` their arm) and, for each regularized arm and source without a run at
  λ 0, the fine-tuning runs of that source as its λ 0 (at the arm's decay), marked ``lambda0_from``."""
  added = []
  arms = dict.fromkeys((r["method"], r["source"]) for r in records if _regularized(r["method"]))
  for name, source in arms:
    own = [r for r in records if (r["method"], r["source"]) == (name, source)]
    if any(float(r["reg_weight"]) == 0 for r in own):
      continue
    decay = float(own[0]["reg_decay"])
    added += [{**r, "method": name, "reg_weight": 0.0, "reg_decay": decay, "lambda0_from": selection.FINE_TUNE}
              for r in records if (r["method"], r["source"]) == (selection.FINE_TUNE, source)]
  return records + added


def _pretraining(record: dict[str, Any]) -> int:
  return int(record.get("pretrain_seed") or 0)


def _learning_rate(record: dict[str, Any]) -> float | None:
  return record.get("settings", {}).get("learning_rate")


def _condition(record: dict[str, Any]) -> tuple[int, float | None]:
  return _pretraining(record), _learning_rate(record)


def _sources(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, tuple[int, float | None]], str]:
  """``(dataset, source, (pre-training seed, learning rate)) -> the source as the tables name it``: the source
  itself, or, where a dataset has runs from several pre-trainings of it (``--pretrain-seed``) or at several
  learning rates, ``SOURCE (pre-training K, lr L)`` naming what varies; each such condition is a source of its
  own, picked and paired on its own."""
  found: dict[tuple[str, str], set[tuple[int, float | None]]] = {}
  for r in records:
    found.setdefault((r["dataset"], r["source"]), set()).add(_condition(r))
  names = {}
  for (dataset, source), conditions in found.items():
    several_seeds = len({seed for seed, _ in conditions}) > 1
    several_rates = len({rate for _, rate in conditions}) > 1
    for seed, rate in conditions:
      parts = ([f"pre-training {seed}"] if several_seeds else []) + ([f"lr {rate:g}"] if several_rates else [])
      names[dataset, source, (seed, rate)] = f"{source} ({', '.join(parts)})" if parts else source
  return names


def _marked(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each dataset's records with ``method`` its :func:`arm`, ``source`` the condition's (:func:`_sources`;
  the source itself in ``base_source``), fine-tuning as λ 0 (:func:`_with_lambda0`), and ``selected`` (the pick
  on validation)."""
  records = list(records)
  names = _sources(records)
  by_dataset: dict[str, list[dict[str, Any]]] = {}
  for record in records:
    source = names[record["dataset"], record["source"], _condition(record)]
    by_dataset.setdefault(record["dataset"], []).append(
        {**record, "method": arm(record), "source": source, "base_source": record["source"]})
  by_dataset = {dataset: _with_lambda0(runs) for dataset, runs in by_dataset.items()}
  marked = []
  for dataset in sorted(by_dataset):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # an incomplete combination is left out, as the grid does
      marked += selection.select(by_dataset[dataset])
  return marked


def _values(records: Iterable[dict[str, Any]], field: str = "test_accuracy") -> dict[tuple, float]:
  return {stats.pair_key(r): float(r[field]) for r in records}


def _pick(marked, dataset, source, name):
  """The selected runs of arm ``name`` (scratch: from any source) on ``dataset``; [] if none."""
  return [r for r in marked if r["selected"] and r["dataset"] == dataset and r["method"] == name
          and (r["source"] == source or name == selection.SCRATCH)]


def _difference(a_runs, b_runs) -> dict[str, Any] | None:
  a, b = _values(a_runs), _values(b_runs)
  keys = set(a) & set(b)
  if not keys:
    return None
  return stats.paired_difference({k: a[k] for k in keys}, {k: b[k] for k in keys})


def _delta(row: dict[str, Any]) -> str:
  if row["n"] < 2:
    return f"{100 * row['mean']:+.2f} (n={row['n']})"
  return f"{100 * row['mean']:+.2f} [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"


def _verdicts(row: dict[str, Any]) -> tuple[str, str]:
  raw = "*" if row["excludes_zero"] else ""
  holm = "–" if math.isnan(row["p_holm"]) else f"{row['p_holm']:.3f}" + (" †" if row["holm_excludes_zero"] else "")
  return raw, holm


def _mean_sd(values: Sequence[float]) -> str:
  n = len(values)
  mean = math.fsum(values) / n
  sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def _comparisons(marked, dataset, source, arms, pick=None):
  """``(name, a_runs, b_runs)`` of the tuned table for one (dataset, source), in table order; ``pick(name)`` gives
  an arm's selected runs (default: :func:`_pick`'s)."""
  pick = pick or (lambda name: _pick(marked, dataset, source, name))
  rows = [("fine-tuning − from scratch", pick(selection.FINE_TUNE), pick(selection.SCRATCH))]
  for x in REGULARIZERS:
    if x not in arms:
      continue
    label, dtnh = _LABELS[x], selection.DTNH_PREFIX + x
    rows.append((f"tuned {label} − fine-tuning", pick(x), pick(selection.FINE_TUNE)))
    if dtnh in arms:
      rows.append((f"tuned DTNH({label}) − tuned {label}", pick(dtnh), pick(x)))
      rows.append((f"tuned DTNH({label}) − fine-tuning", pick(dtnh), pick(selection.FINE_TUNE)))
  for name in arms:
    x = _candidate_base(name)
    if x is None:
      continue
    label = _arm_label(name)
    rows.append((f"tuned {label} − fine-tuning", pick(name), pick(selection.FINE_TUNE)))
    rows.append((f"tuned {label} − tuned {_LABELS.get(x, x)}", pick(name), pick(x)))
    rows.append((f"tuned {label} − tuned DTNH({_LABELS.get(x, x)})", pick(name), pick(selection.DTNH_PREFIX + x)))
  return rows


def _arms(marked, dataset) -> list[str]:
  """The arms run on ``dataset``: the references, then each X beside DTNH(X), then the candidates."""
  ran = {r["method"] for r in marked if r["dataset"] == dataset}
  order = [selection.SCRATCH, selection.FINE_TUNE]
  for x in REGULARIZERS:
    order += [x, selection.DTNH_PREFIX + x]
  order += sorted(name for name in ran if name not in order)
  return [name for name in order if name in ran]


def _regularized(name: str) -> bool:
  return name not in (selection.SCRATCH, selection.FINE_TUNE)


def _across_pretrainings(marked, datasets) -> list[str]:
  """The tuned differences of each source pre-trained several times: per pre-training the mean over seeds (its
  own picks), and their mean over the pre-trainings with a t interval over them (the pre-training a random
  factor: n = the pre-trainings); Holm over the table. No lines where every source was pre-trained once."""
  rows = []
  for dataset in datasets:
    arms = _arms(marked, dataset)
    trained, rates = {}, {}
    for r in marked:
      if r["dataset"] == dataset and r["method"] != selection.SCRATCH:
        trained.setdefault((r["base_source"], _learning_rate(r)), set()).add((_pretraining(r), r["source"]))
        rates.setdefault(r["base_source"], set()).add(_learning_rate(r))
    for (base, rate), pretrainings in sorted(trained.items(), key=lambda item: (item[0][0], item[0][1] or 0.0)):
      if len(pretrainings) < 2:
        continue
      shown = f"{base} (lr {rate:g})" if len(rates[base]) > 1 else base
      means: dict[str, dict[int, float]] = {}
      for seed, source in sorted(pretrainings):
        for name, a_runs, b_runs in _comparisons(marked, dataset, source, arms):
          difference = _difference(a_runs, b_runs)
          if difference is not None:
            means.setdefault(name, {})[seed] = difference["mean"]
      for name, by_seed in means.items():
        if len(by_seed) < 2:
          continue
        across = stats.paired_difference(by_seed, dict.fromkeys(by_seed, 0.0))
        rows.append({"dataset": dataset, "source": shown, "comparison": name, "per": by_seed, **across})
  if not rows:
    return []
  rows = stats.with_holm(rows)
  out = ["", "### Across pre-trainings of the source (test accuracy, points)", "",
         "| target | source | comparison | per pre-training: mean over seeds | across pre-trainings [95% CI] | raw "
         "| Holm p |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    raw, holm = _verdicts(row)
    per = ", ".join(f"{seed}: {100 * mean:+.2f}" for seed, mean in sorted(row["per"].items()))
    out.append(f"| {row['dataset']} | {row['source']} | {row['comparison']} | {per} | {_delta(row)} | {raw} "
               f"| {holm} |")
  out += ["", "Each pre-training of a source (`--pretrain-seed`) is picked on validation and paired over seeds on its "
          "own (the tables above); here each tuned difference is its mean over seeds per pre-training, and the mean "
          "of those over the pre-trainings with a Student-t interval over them (n = the pre-trainings): how much "
          "of a verdict belongs to one pre-trained network."]
  return out


def _over_learning_rates(marked, datasets) -> list[str]:
  """Where a source (at one pre-training) ran at several learning rates: each arm at the learning rate whose pick
  has the best mean validation accuracy (ties to the smaller learning rate), so that fine-tuning, X and DTNH(X)
  have their learning rate tuned alike; the picks and the tuned differences (Holm over the table). No lines
  where every source ran at one learning rate."""
  picks, rows = [], []
  for dataset in datasets:
    arms = _arms(marked, dataset)
    groups: dict[tuple[str, int], dict[float, str]] = {}
    for r in marked:
      if r["dataset"] == dataset and r["method"] != selection.SCRATCH:
        groups.setdefault((r["base_source"], _pretraining(r)), {})[_learning_rate(r)] = r["source"]
    for (base, seed), by_rate in sorted(groups.items()):
      if len(by_rate) < 2:
        continue
      shown = f"{base} (pre-training {seed})" if len({s for b, s in groups if b == base}) > 1 else base
      chosen: dict[str, tuple[float, list[dict[str, Any]]]] = {}
      for name in arms:
        for rate, source in sorted(by_rate.items()):
          # at this learning rate only: from scratch is picked from any source, not from any learning rate
          runs = [r for r in _pick(marked, dataset, source, name) if _learning_rate(r) == rate]
          if runs and (name not in chosen or _mean_of(runs, "val_accuracy") > _mean_of(chosen[name][1],
                                                                                    "val_accuracy")):
            chosen[name] = (rate, runs)
      for name in arms:
        if name in chosen:
          rate, runs = chosen[name]
          weight = f"λ {float(runs[0]['reg_weight']):g}, " if _regularized(name) else ""
          picks.append(f"| {dataset} | {shown} | {_arm_label(name)} | {weight}lr {rate:g} | "
                       f"{_mean_sd([float(r['val_accuracy']) for r in runs])} | "
                       f"{_mean_sd([float(r['test_accuracy']) for r in runs])} | {len(runs)} |")
      pick = lambda name, chosen=chosen: chosen[name][1] if name in chosen else []
      for name, a_runs, b_runs in _comparisons(marked, dataset, None, arms, pick):
        difference = _difference(a_runs, b_runs)
        if difference is not None:
          rows.append({"dataset": dataset, "source": shown, "comparison": name, **difference})
  if not picks:
    return []
  out = ["", "### Learning rate picked on validation too", "",
         "| target | source | method | picked | validation % | test % (mean ± sd, ddof=1) | seeds |",
         "|---|---|---|---|---|---|---|", *picks, "",
         "| target | source | comparison | Δ [95% CI] | raw | Holm p |", "|---|---|---|---|---|---|"]
  for row in stats.with_holm(rows):
    raw, holm = _verdicts(row)
    out.append(f"| {row['dataset']} | {row['source']} | {row['comparison']} | {_delta(row)} | {raw} | {holm} |")
  out += ["", "Each method at the learning rate whose λ pick has the best mean validation accuracy (ties to the "
          "smaller learning rate): fine-tuning, X and DTNH(X) tuned alike over λ and the learning rate; Δ paired "
          "over seeds as above, Holm over this table."]
  return out


def _mean_of(runs, field: str) -> float:
  return math.fsum(float(r[field]) for r in runs) / len(runs)


def tables(records: Sequence[dict[str, Any]]) -> str:
  """The study's tables, Markdown, from its records alone (deterministic: the same records, the same text)."""
  marked = _marked(records)
  datasets = sorted({r["dataset"] for r in marked})
  out = []

  # 1. the accuracy of each arm at its pick
  out += ["### Each method at its pick (λ chosen on validation)", "",
          "| target | source | method | λ picked | validation % | test % (mean ± sd, ddof=1) | seeds |",
          "|---|---|---|---|---|---|---|"]
  for dataset in datasets:
    sources = sorted({r["source"] for r in marked if r["dataset"] == dataset and r["method"] != selection.SCRATCH})
    for source in sources:
      for name in _arms(marked, dataset):
        runs = sorted(_pick(marked, dataset, source, name), key=lambda r: int(r["seed"]))
        if not runs:
          continue
        chosen = f"λ {float(runs[0]['reg_weight']):g}" if _regularized(name) else "–"
        out.append(f"| {dataset} | {source} | {_arm_label(name)} | {chosen} | "
                   f"{_mean_sd([float(r['val_accuracy']) for r in runs])} | "
                   f"{_mean_sd([float(r['test_accuracy']) for r in runs])} | {len(runs)} |")

  # 2. the tuned differences, Holm over the whole table
  rows = []
  for dataset in datasets:
    arms = _arms(marked, dataset)
    sources = sorted({r["source"] for r in marked if r["dataset"] == dataset and r["method"] != selection.SCRATCH})
    for source in sources:
      for name, a_runs, b_runs in _comparisons(marked, dataset, source, arms):
        difference = _difference(a_runs, b_runs)
        if difference is not None:
          rows.append({"dataset": dataset, "source": source, "comparison": name, **difference})
  rows = stats.with_holm(rows)
  out += ["", "### Tuned differences (test accuracy, points; paired by seed)", "",
          "| target | source | comparison | Δ [95% CI] | raw | Holm p |", "|---|---|---|---|---|---|"]
  for row in rows:
    raw, holm = _verdicts(row)
    out.append(f"| {row['dataset']} | {row['source']} | {row['comparison']} | {_delta(row)} | {raw} | {holm} |")

  # 2b. where a source was pre-trained several times: each tuned difference across the pre-trainings; 2c. where
  # it ran at several learning rates: the learning rate picked too
  out += _across_pretrainings(marked, datasets)
  out += _over_learning_rates(marked, datasets)

  # 3. the λ curve: each regularized arm against fine-tuning at every λ; 4. its worst gap
  curve, worst = [], []
  for dataset in datasets:
    arms = [name for name in _arms(marked, dataset) if _regularized(name)]
    sources = sorted({r["source"] for r in marked if r["dataset"] == dataset and r["method"] != selection.SCRATCH})
    for source in sources:
      fine_tune = _pick(marked, dataset, source, selection.FINE_TUNE)
      for name in arms:
        runs = [r for r in marked if r["dataset"] == dataset and r["source"] == source and r["method"] == name]
        by_weight: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
          by_weight.setdefault(float(r["reg_weight"]), []).append(r)
        cells = []
        for weight in sorted(by_weight):
          difference = _difference(by_weight[weight], fine_tune)
          if difference is None:
            continue
          cells.append({"dataset": dataset, "source": source, "arm": name, "reg_weight": weight,
                        "test": [float(r["test_accuracy"]) for r in by_weight[weight]], **difference})
        curve += cells
        positive = [c for c in cells if c["reg_weight"] > 0]
        if positive:
          worst.append(min(positive, key=lambda c: (c["mean"], c["reg_weight"])))
  weights = sorted({c["reg_weight"] for c in curve})
  out += ["", "### λ curves: test % (mean over seeds) and the paired gap to fine-tuning, points [95% CI]", "",
          "| target | source | method | " + " | ".join(f"λ {w:g}" for w in weights) + " |",
          "|---|---|---|" + "---|" * len(weights)]
  for key in dict.fromkeys((c["dataset"], c["source"], c["arm"]) for c in curve):
    at = {c["reg_weight"]: c for c in curve if (c["dataset"], c["source"], c["arm"]) == key}
    shown = [f"{100 * math.fsum(at[w]['test']) / len(at[w]['test']):.2f}, {_delta(at[w])}" if w in at else "–"
             for w in weights]
    out.append(f"| {key[0]} | {key[1]} | {_arm_label(key[2])} | " + " | ".join(shown) + " |")
  worst = stats.with_holm(worst)
  out += ["", "### Worst gap to fine-tuning over λ > 0 (the λ curve's lowest mean; Holm over these rows)", "",
          "| target | source | method | at λ | gap [95% CI] | raw | Holm p |", "|---|---|---|---|---|---|---|"]
  for row in worst:
    raw, holm = _verdicts(row)
    out.append(f"| {row['dataset']} | {row['source']} | {_arm_label(row['arm'])} | {row['reg_weight']:g} | "
               f"{_delta(row)} | {raw} | {holm} |")
  out += ["", "Test accuracy of each method at its pick on validation (best mean validation accuracy over seeds; "
          "ties to the weaker λ). Δ: paired over seeds (the same seed: the same training pool, validation carve "
          "and test set), mean with its 95% Student-t interval; raw: * where that interval excludes 0; Holm p: the "
          "paired t-test's p-value adjusted (Holm) over the table's rows, † where it stays below 0.05. "
          "sd: the sample sd over seeds (ddof=1). λ 0 is fine-tuning: a method without runs at λ 0 has the "
          "fine-tuning runs there (its λ-0 gap is 0 by construction)."]
  return "\n".join(out) + "\n"


# --- figures ---------------------------------------------------------------------------------------------------------

def figures(records: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
  """The λ curves (``report.plot_lambda_curve``) per target, of X and DTNH(X), from the records alone (a panel
  per pre-training of a source pre-trained several times)."""
  from dtnh_jax.train import report  # pylint: disable=g-import-not-at-top  (matplotlib)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  names = _sources(records)
  for dataset in sorted({r["dataset"] for r in records}):
    runs = [{**r, "method": arm(r), "source": names[dataset, r["source"], _condition(r)]}
            for r in records if r["dataset"] == dataset]
    # the panels' columns in the order of the sources' names (a source's conditions side by side)
    runs.sort(key=lambda r: r["source"])
    runs = [r for r in runs if "(" not in r["method"]]  # the curve's panels are X and DTNH(X)
    path = os.path.join(out_dir, f"lambda_curve_{dataset}.png")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      report.plot_lambda_curve(runs, path, f"{dataset}: accuracy against λ")
    written.append(path)
  return written


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  gather = commands.add_parser("collect", help="a study's workdir -> one records file (JSON Lines)")
  gather.add_argument("workdir")
  gather.add_argument("--out", required=True)
  derive = commands.add_parser("tables", help="a records file -> the study's tables (Markdown)")
  derive.add_argument("records")
  derive.add_argument("--out", help="write the tables there (else: print them)")
  derive.add_argument("--figures", help="also draw the λ curves into this folder")
  args = parser.parse_args(argv)
  if args.command == "collect":
    records = collect(args.workdir)
    if not records:
      parser.exit(2, f"study_records.py: error: no WORKDIR/GRID/results.json under {args.workdir}.\n")
    write_records(records, args.out)
    print(f"{len(records)} runs -> {args.out}")
    return 0
  if not os.path.isfile(args.records):
    parser.exit(2, f"study_records.py: error: no records file {args.records}; write one with "
                "`study_records.py collect WORKDIR --out FILE`.\n")
  records = read_records(args.records)
  text = tables(records)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  if args.figures:
    for path in figures(records, args.figures):
      print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
