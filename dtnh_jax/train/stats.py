"""Paired differences DTNH(X) − X over seeds, with t intervals: is the gain more than seed noise?

Runs of X and DTNH(X) with the same seed share what the seed decides (the
examples drawn and their validation split, the new head's initialization,
the order of the batches), so their difference cancels what the seed moves
in both; the evidence protocol (``DESIGN.md``)
therefore compares them **paired** by ``(seed, split)`` and reports the mean
difference with a Student-t confidence interval over the pairs:

    d_i = a_i − b_i,   mean ± t_{(1+c)/2, n−1} · s / √n,   s = std(d, ddof=1)

which is the interval of ``scipy.stats.ttest_rel(a, b)``: it excludes 0
exactly when that test's two-sided p-value is below ``1 − c``. With one pair
there is no spread to judge by: ``std``, the interval and ``p_value`` are
``nan`` and ``excludes_zero`` is ``False``. With several equal differences
(``s = 0``) the interval is the point ``[mean, mean]``, and ``p_value`` is 0
(1 when the differences are all 0): the t-test's limit, to be read with care.

:func:`dtnh_pairs` forms the pairs of the tuned comparison (each method at
its own pick, :mod:`~dtnh_jax.train.selection`, or DTNH(X) at X's pick),
:func:`lambda_pairs` those of the λ curve (both at the same λ and decay),
:func:`reference_pairs` each tuned method against fine-tuning from the same
source (does regularizing, or DTNH, beat not regularizing at all?).

A table holds many such intervals, and some exclude 0 by chance alone (about
1 in 20 at 95%): :func:`holm` adjusts their p-values for the family
(Holm's step-down method, which controls the probability of any false
verdict without assuming independence), and :func:`with_holm` marks the rows
whose adjusted p-value stays below ``1 − c``; the tables print both, the raw
interval and the Holm verdict.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dtnh_jax.train import selection

__all__ = ["dtnh_pairs", "holm", "lambda_pairs", "pair_key", "paired_difference", "reference_pairs", "with_holm"]


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = 0.95) -> dict[str, Any]:
  """``a − b`` paired by key: mean, spread and a t interval (see the module docstring).

  Args:
    a, b: key (e.g. ``(seed, split)``) -> value; the same keys in both (DTNH(X)'s in ``a``, X's in ``b``).
    confidence: of the interval, in ``(0, 1)``.

  Returns:
    ``{"n", "mean", "std" (ddof=1), "low", "high", "confidence", "p_value" (two-sided, of the paired
    t-test), "excludes_zero"}``; plain floats, ``nan`` where undefined (one pair).

  Raises:
    ValueError: the keys of ``a`` and ``b`` differ, there is no pair, or ``confidence`` is outside (0, 1).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  if set(a) != set(b):
    only_a, only_b = sorted(map(repr, set(a) - set(b))), sorted(map(repr, set(b) - set(a)))
    raise ValueError(f"a paired difference needs the same keys on both sides: only in a {only_a}, only in b {only_b}")
  if not a:
    raise ValueError("a paired difference needs at least one pair")
  keys = sorted(a, key=repr)  # a fixed order, whatever the mappings' own
  differences = np.array([float(a[k]) - float(b[k]) for k in keys])
  n = len(differences)
  mean = float(differences.mean())
  if n == 1:
    return {"n": 1, "mean": mean, "std": math.nan, "low": math.nan, "high": math.nan, "confidence": confidence,
            "p_value": math.nan, "excludes_zero": False}
  std = float(differences.std(ddof=1))
  # imported here: scipy.stats is slow to import, and a run that reports no interval needs none of it
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
  if std > 0:
    p_value = float(2 * scipy_stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))
  else:
    p_value = 0.0 if mean != 0 else 1.0
  low, high = mean - half, mean + half
  return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "confidence": confidence,
          "p_value": p_value, "excludes_zero": bool(low > 0 or high < 0)}


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the order given.

  With the ``m`` finite p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted ``p~_(i) = max_{j <= i}
  min(1, (m − j + 1) p_(j))``; rejecting where ``p~ < α`` keeps the family-wise error rate at ``α``. A ``nan``
  (one pair: no test) stays ``nan`` and does not count in ``m``. Ties keep the order given.
  """
  values = [float(p) for p in p_values]
  finite = sorted((p, index) for index, p in enumerate(values) if not math.isnan(p))
  adjusted = [math.nan] * len(values)
  running = 0.0
  for rank, (p, index) in enumerate(finite):
    running = max(running, min(1.0, (len(finite) - rank) * p))
    adjusted[index] = running
  return adjusted


def with_holm(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Copies of ``rows`` (of :func:`paired_difference`'s keys, one family) with ``p_holm`` (:func:`holm` over
  their ``p_value``) and ``holm_excludes_zero``: ``p_holm < 1 − confidence`` (the row's own confidence)."""
  adjusted = holm([row["p_value"] for row in rows])
  return [{**row, "p_holm": p, "holm_excludes_zero": bool(p < 1 - row["confidence"])}
          for row, p in zip(rows, adjusted)]


def pair_key(record: Mapping[str, Any]) -> tuple[int, Any]:
  """``(seed, split)``: runs with the same key saw the same data, so their difference is a pair.

  ``split`` is the record's ``"split"``: a :func:`dtnh_jax.data.splits.split_record` (its ``val_sha256``
  is used), any hashable value, or absent (``None``, a split fixed for every seed).
  """
  split = record.get("split")
  if isinstance(split, Mapping):
    split = split.get("val_sha256")
  return int(record["seed"]), split


def _marked(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  records = list(records)
  return records if records and all("selected" in r for r in records) else selection.select(records)


def _counterparts(records: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
  """``(source, X)`` for every X run from a source where ``dtnh-X`` ran too, in the order first seen."""
  methods = {(r["source"], r["method"]) for r in records}
  found = []
  for r in records:
    pair = (r["source"], r["method"])
    if (selection.plain_method(r["method"]) is None and (r["source"], selection.DTNH_PREFIX + r["method"]) in methods
        and pair not in found):
      found.append(pair)
  return found


def dtnh_pairs(records: Iterable[Mapping[str, Any]], field: str = "test_accuracy", confidence: float = 0.95,
               at: str = "own") -> list[dict[str, Any]]:
  """DTNH(X) − X at the picks, for every X with a ``dtnh-X`` counterpart, per source.

  Args:
    records: the runs of a study as for :func:`selection.select`, or its output (used as marked).
    field: the value compared (test accuracy: read only for the picks, which validation made).
    confidence: of the intervals.
    at: ``"own"``: each method at its own pick (the tuned comparison: what a user of either would get);
      ``"plain"``: DTNH(X) at X's pick (what the projection alone changes at the λ that suits X).

  Returns:
    Per (source, X) where the picks needed exist: ``{"source", "dataset", "method": X, "dtnh_method":
    "dtnh-X", "field", "at", "reg_weight", "reg_decay" (X's pick), "dtnh_reg_weight", "dtnh_reg_decay"}``
    and the keys of :func:`paired_difference` (paired by :func:`pair_key`).
  """
  if at not in ("own", "plain"):
    raise ValueError(f"at must be 'own' or 'plain', got {at!r}")
  marked = _marked(records)
  combination = lambda r: (float(r["reg_weight"]), float(r["reg_decay"]))
  rows = []
  for source, method in _counterparts(marked):
    dtnh_method = selection.DTNH_PREFIX + method
    plain = [r for r in marked if r["selected"] and r["source"] == source and r["method"] == method]
    if not plain:
      continue
    if at == "own":
      dtnh = [r for r in marked if r["selected"] and r["source"] == source and r["method"] == dtnh_method]
    else:
      keys = {pair_key(r) for r in plain}
      dtnh = [r for r in marked if r["source"] == source and r["method"] == dtnh_method
              and combination(r) == combination(plain[0]) and pair_key(r) in keys]
    if not dtnh:
      continue
    difference = paired_difference({pair_key(r): r[field] for r in dtnh}, {pair_key(r): r[field] for r in plain},
                                   confidence)
    rows.append({"source": source, "dataset": plain[0].get("dataset"), "method": method, "dtnh_method": dtnh_method,
                 "field": field, "at": at, "reg_weight": combination(plain[0])[0],
                 "reg_decay": combination(plain[0])[1], "dtnh_reg_weight": combination(dtnh[0])[0],
                 "dtnh_reg_decay": combination(dtnh[0])[1], **difference})
  return rows


def reference_pairs(records: Iterable[Mapping[str, Any]], field: str = "test_accuracy",
                    confidence: float = 0.95) -> list[dict[str, Any]]:
  """Each method at its pick − fine-tuning from the same source, paired over seeds.

  Training from scratch (which runs under one source) is compared with fine-tuning from every source: the
  row says what that source's pre-training is worth. Seeds that only one side ran are left out of the pair.

  Returns:
    Per (source, method) other than fine-tuning, where fine-tuning from that source ran: ``{"source",
    "dataset", "method", "reference": "fine-tune", "field", "reg_weight", "reg_decay" (the method's pick)}``
    and the keys of :func:`paired_difference`; sources in the order first seen, methods too.
  """
  marked = [r for r in _marked(records) if r["selected"]]
  sources = list(dict.fromkeys(r["source"] for r in marked if not selection.is_scratch(r["method"], r["source"])))
  rows = []
  for source in sources:
    tuned = {pair_key(r): r[field] for r in marked if r["source"] == source and r["method"] == selection.FINE_TUNE}
    if not tuned:
      continue
    others = [r for r in marked if r["method"] != selection.FINE_TUNE
              and (r["source"] == source or selection.is_scratch(r["method"], r["source"]))]
    for method in dict.fromkeys(r["method"] for r in others):
      runs = [r for r in others if r["method"] == method]
      keys = {pair_key(r) for r in runs} & set(tuned)
      if not keys:
        continue
      difference = paired_difference({pair_key(r): r[field] for r in runs if pair_key(r) in keys},
                                     {key: tuned[key] for key in keys}, confidence)
      rows.append({"source": source, "dataset": runs[0].get("dataset"), "method": method,
                   "reference": selection.FINE_TUNE, "field": field, "reg_weight": float(runs[0]["reg_weight"]),
                   "reg_decay": float(runs[0]["reg_decay"]), **difference})
  return rows


def lambda_pairs(records: Iterable[Mapping[str, Any]], field: str = "test_accuracy",
                 confidence: float = 0.95) -> list[dict[str, Any]]:
  """DTNH(X) − X at the same ``(reg_weight, reg_decay)``, for every combination both ran: the λ curve's Δ.

  Every combination, not only the picks (the test values are labelled as such
  wherever they are shown). A combination is paired over the keys both ran;
  one where their keys differ is left out with a warning.

  Returns:
    Per (source, X, reg_weight, reg_decay): ``{"source", "method", "dtnh_method", "field", "reg_weight",
    "reg_decay"}`` and the keys of :func:`paired_difference`; (source, X) in the order first seen, then
    by λ and decay.
  """
  records = list(records)
  values: dict[tuple[str, str, float, float], dict[Hashable, float]] = {}
  for r in records:
    values.setdefault((r["source"], r["method"], float(r["reg_weight"]), float(r["reg_decay"])), {})[pair_key(r)] = (
        r[field])
  rows, unmatched = [], []
  for source, method in _counterparts(records):
    dtnh_method = selection.DTNH_PREFIX + method
    combinations = sorted({(w, d) for s, m, w, d in values if s == source and m == method}
                          & {(w, d) for s, m, w, d in values if s == source and m == dtnh_method})
    for weight, decay in combinations:
      a, b = values[(source, dtnh_method, weight, decay)], values[(source, method, weight, decay)]
      if set(a) != set(b):
        unmatched.append(f"{method} from {source} at reg_weight={weight:g}, reg_decay={decay:g}")
        continue
      rows.append({"source": source, "method": method, "dtnh_method": dtnh_method, "field": field,
                   "reg_weight": weight, "reg_decay": decay, **paired_difference(a, b, confidence)})
  if unmatched:
    warnings.warn(f"not paired, X and DTNH(X) ran other seeds or splits: {'; '.join(unmatched)}", RuntimeWarning,
                  stacklevel=2)
  return rows
