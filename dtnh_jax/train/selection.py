"""Choosing λ and its decay per method on validation accuracy, blind to the test split.

The paper picks "the best configuration" of every method by cross validation
and then reports it over five repetitions (V.A); ``DESIGN.md`` makes that the
rule here: per (method, source), the ``(reg_weight, reg_decay)`` combination
whose runs have the best **mean validation accuracy over seeds** is the pick,
and test accuracy is read only for the pick.

**Blind by construction.** :func:`choose` is given :func:`validation_view`
of each record: a new dict of the few fields a choice may depend on
(:data:`VIEW_FIELDS`), built by reading exactly those keys, so no test field
(``test_accuracy``, ``test_loss``) ever reaches it. :func:`select` reads the
records' other fields only to copy them once the choice is made.

**Eligible combinations.** A combination is eligible when it has exactly one
run for every seed of the study (by default the seeds found in all the
records, so that X and DTNH(X) are compared over the same seeds) and all its
validation accuracies are finite. An incomplete one (an interrupted sweep, a
failed run) is left out with a warning rather than averaged over fewer seeds:
its mean would be noisier than the others', and taking the largest of means of
unequal noise favours the noisy one. Two runs of the same combination and seed
are an error (which one counts would be arbitrary).

**Ties.** Means are compared exactly (``math.fsum`` over the seeds, so the
order of the records does not change a mean by a rounding). Equal means go to
the weaker regularizer: the smaller ``reg_weight``, then the smaller
``reg_decay`` (λ = reg_weight · reg_decay^epoch, so a smaller factor shrinks
λ sooner). The weaker one is the nearer to plain fine-tuning: on a tie the
data gave no reason to regularize more.

Records are plain dicts (``results.json``'s runs plus ``reg_weight``,
``reg_decay`` and ``val_accuracy``); nothing here needs jax.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DTNH_PREFIX",
    "FINE_TUNE",
    "SCRATCH",
    "VIEW_FIELDS",
    "choose",
    "group_key",
    "is_scratch",
    "plain_method",
    "select",
    "summary",
    "validation_view",
]

#: What the DTNH variant of method X is called: ``"dtnh-" + X``.
DTNH_PREFIX = "dtnh-"
#: The method without a regularizer: a reference in the tables and plots.
FINE_TUNE = "fine-tune"
#: Training from random weights: ``--source scratch`` (or a method of this name), the other reference.
SCRATCH = "scratch"
#: The only fields :func:`choose` sees (``dataset`` only when a record has it).
VIEW_FIELDS = ("method", "source", "dataset", "seed", "reg_weight", "reg_decay", "val_accuracy")
_REQUIRED = ("method", "source", "seed", "reg_weight", "reg_decay", "val_accuracy")


def plain_method(method: str) -> str | None:
  """X for ``"dtnh-X"``, ``None`` for a method without DTNH."""
  return method[len(DTNH_PREFIX):] if method.startswith(DTNH_PREFIX) else None


def is_scratch(method: str, source: str) -> bool:
  """Whether a run trained from random weights: the from-scratch reference of every source."""
  return method == SCRATCH or (source == SCRATCH and method == FINE_TUNE)


def group_key(record: Mapping[str, Any]) -> tuple[str, str]:
  """``(method, source)``: what one choice of λ is made for."""
  return record["method"], record["source"]


def validation_view(record: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of ``record`` a choice may depend on (:data:`VIEW_FIELDS`), read one key at a time.

  Only these keys are looked up, so a record's test fields are never read.
  """
  missing = [key for key in _REQUIRED if key not in record]
  if missing:
    raise ValueError(f"a run record needs {', '.join(_REQUIRED)} to be selected on; this one lacks "
                     f"{', '.join(missing)}")
  return {key: record[key] for key in VIEW_FIELDS if key in record}


def _combination(view: Mapping[str, Any]) -> tuple[float, float]:
  return float(view["reg_weight"]), float(view["reg_decay"])


def _by_group(views: Iterable[Mapping[str, Any]]):
  """``{group: {combination: {seed: val_accuracy}}}`` in the order first seen; duplicates and mixed datasets refused."""
  groups: dict[tuple[str, str], dict[tuple[float, float], dict[int, float]]] = {}
  datasets: dict[tuple[str, str], set[Any]] = {}
  for view in views:
    group = group_key(view)
    runs = groups.setdefault(group, {}).setdefault(_combination(view), {})
    seed = int(view["seed"])
    if seed in runs:
      raise ValueError(f"two runs of {group[0]} from {group[1]} at reg_weight={view['reg_weight']}, "
                       f"reg_decay={view['reg_decay']}, seed {seed}: keep one record per run")
    runs[seed] = float(view["val_accuracy"])
    datasets.setdefault(group, set()).add(view.get("dataset"))
  mixed = {group: found for group, found in datasets.items() if len(found) > 1}
  if mixed:
    group, found = next(iter(mixed.items()))
    raise ValueError(f"the runs of {group[0]} from {group[1]} are on several datasets {sorted(map(str, found))}: "
                     "select on each dataset's records apart")
  return groups


def _mean(values: Iterable[float]) -> float:
  values = list(values)
  return math.fsum(values) / len(values)


def _seeds(views: Iterable[Mapping[str, Any]], seeds: Collection[int] | None) -> set[int]:
  return {int(view["seed"]) for view in views} if seeds is None else {int(seed) for seed in seeds}


def choose(views: Iterable[Mapping[str, Any]],
           seeds: Collection[int] | None = None) -> dict[tuple[str, str], tuple[float, float]]:
  """``{(method, source): (reg_weight, reg_decay)}``: the eligible combination of best mean validation accuracy.

  Args:
    views: the runs' records or their :func:`validation_view`; only the view's fields are read.
    seeds: the seeds of the study: every eligible combination must have them, and runs of other seeds are
      not looked at; ``None``: every seed in ``views``.

  Groups without an eligible combination are missing from the result (with
  a warning, as are the incomplete combinations left out). See the module
  docstring for eligibility and ties.
  """
  views = [validation_view(view) for view in views]  # a full record passed here is read no further either
  wanted = _seeds(views, seeds)
  groups = _by_group(view for view in views if int(view["seed"]) in wanted)
  chosen: dict[tuple[str, str], tuple[float, float]] = {}
  left_out = []
  for group, combinations in groups.items():
    eligible = {}
    for combination, runs in combinations.items():
      if set(runs) == wanted and all(math.isfinite(v) for v in runs.values()):
        eligible[combination] = _mean(runs[seed] for seed in sorted(runs))
      else:
        left_out.append(f"{group[0]} from {group[1]} at reg_weight={combination[0]:g}, "
                        f"reg_decay={combination[1]:g} (seeds {sorted(runs)})")
    if eligible:
      # best mean first; on a tie the weaker regularizer: smaller reg_weight, then smaller reg_decay
      chosen[group] = min(eligible, key=lambda c: (-eligible[c], c[0], c[1]))
  if left_out:
    shown = "; ".join(left_out[:5]) + (f"; and {len(left_out) - 5} more" if len(left_out) > 5 else "")
    missing = [f"{method} from {source}" for method, source in groups if (method, source) not in chosen]
    none = f" No combination is complete for {', '.join(missing)}: nothing is selected there." if missing else ""
    warnings.warn(f"left out of the selection, not run with every seed {sorted(wanted)} or with a non-finite "
                  f"validation accuracy: {shown}.{none}", RuntimeWarning, stacklevel=2)
  return chosen


def select(records: Iterable[Mapping[str, Any]], seeds: Collection[int] | None = None) -> list[dict[str, Any]]:
  """Copies of ``records``, in order, each with ``selected``: whether it is a run (of a seed of ``seeds``)
  of its group's pick.

  The pick is made by :func:`choose` on :func:`validation_view` of the
  records before any other field of them is read (see the module docstring).
  """
  records = list(records)
  views = [validation_view(record) for record in records]
  chosen, wanted = choose(views, seeds), _seeds(views, seeds)
  # the choice is made: only now are the records read in full, to be copied
  return [{**record, "selected": chosen.get(group_key(view)) == _combination(view) and int(view["seed"]) in wanted}
          for record, view in zip(records, views)]


def _spread(values: Sequence[float]) -> tuple[float, float]:
  """(mean, std) over seeds; the std with ``ddof=0``, as the results tables (``report.results_table``)."""
  values = np.asarray(values, dtype=float)
  return float(values.mean()), float(values.std())


def summary(records: Iterable[Mapping[str, Any]], seeds: Collection[int] | None = None) -> list[dict[str, Any]]:
  """Per (method, source), the pick and its accuracies over seeds, in the order the groups are first seen.

  ``records``: runs as for :func:`select`, or its output (when every record
  has ``selected``, that marking is used as it is).

  Returns:
    One dict per group with a pick: ``method``, ``source``, ``dataset`` (or
    ``None``), ``label`` (the record's, else the method), ``reg_weight``,
    ``reg_decay`` (the pick), ``n_seeds``, ``seeds``, ``val_mean``,
    ``val_std``, ``test_mean``, ``test_std`` (fractions, std with
    ``ddof=0``), ``combinations`` (how many combinations the group ran).
  """
  records = list(records)
  marked = records if records and all("selected" in r for r in records) else select(records, seeds)
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  combinations: dict[tuple[str, str], set[tuple[float, float]]] = {}
  for record in marked:
    combinations.setdefault(group_key(record), set()).add(_combination(record))
    if record["selected"]:
      groups.setdefault(group_key(record), []).append(record)
  rows = []
  for (method, source), picked in groups.items():
    picked = sorted(picked, key=lambda r: int(r["seed"]))
    val_mean, val_std = _spread([r["val_accuracy"] for r in picked])
    test_mean, test_std = _spread([r["test_accuracy"] for r in picked])
    rows.append({"method": method, "source": source, "dataset": picked[0].get("dataset"),
                 "label": picked[0].get("label", method), "reg_weight": float(picked[0]["reg_weight"]),
                 "reg_decay": float(picked[0]["reg_decay"]), "n_seeds": len(picked),
                 "seeds": [int(r["seed"]) for r in picked], "val_mean": val_mean, "val_std": val_std,
                 "test_mean": test_mean, "test_std": test_std,
                 "combinations": len(combinations[(method, source)])})
  return rows
