"""A validation split carved per class from a training pool, reproducibly, with a record of how.

The evidence protocol (``DESIGN.md``) chooses λ and its decay on validation
accuracy and never on a test split. A dataset without a validation split of
its own (the offline digits, a TFDS dataset with only ``train``/``test``:
CIFAR-10, Caltech-256, MIT Indoor-67, Stanford Dogs) gets one here: from
the indices of its training pool, each class gives a seeded random choice of
its examples to validation and keeps the rest for training. A study redraws
the split per seed, so that the spread over seeds includes the luck of the
split.

**How many per class.** ``fraction_or_count`` is either a fraction in
``(0, 1)`` or a count (an ``int`` ≥ 1). A class of ``n`` examples gives
:func:`held_out_count`, the same rule as the folder datasets'
(:mod:`dtnh_jax.data.folder`): a fraction ``f`` rounds half up,
``max(1, floor(f · n + 0.5))``, so that a small class still gives one; a
count gives that many. Either way the class keeps at least one example for
training: at most ``n - 1`` go to validation, so a class of one example
gives none (it cannot be both learned and validated on), and a count larger
than a class is cut to ``n - 1`` (:func:`split_record` shows the counts).

**Which ones.** Class ``c``'s examples (its indices, in increasing order)
are permuted by ``np.random.Generator(np.random.PCG64([seed, VAL_SPLIT_SALT, c]))``
and the first ``k`` go to validation. The salt keeps this stream apart from
every other use of the same seed (the offline data's own ``default_rng([seed,
stream])`` with small stream numbers, the loader's shuffle); one stream per
class makes a class's split depend only on its own examples, not on which
other classes exist. The same seed and labels always give the same split;
another seed another one.

Both index arrays are sorted, disjoint, and together hold every index once.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any

import numpy as np

__all__ = [
    "VAL_SPLIT_SALT",
    "carve_validation",
    "held_out_count",
    "split_record",
    "val_indices_digest",
]

#: Mixed into the seed of every validation carve: ``PCG64([seed, VAL_SPLIT_SALT, class])``.
#: Changing it changes every recorded split, so it is fixed (a date, like the folder's ``TEST_SPLIT_SEED``).
VAL_SPLIT_SALT = 20190102


def _rule(fraction_or_count: Any) -> tuple[str, float | int]:
  """``("fraction", f)`` or ``("count", k)``; anything else is refused (1.0 is neither: say 1 or a fraction)."""
  if isinstance(fraction_or_count, (bool, np.bool_)):
    raise TypeError(f"fraction_or_count must be a fraction in (0, 1) or a count >= 1, got {fraction_or_count!r}")
  if isinstance(fraction_or_count, numbers.Integral):
    if fraction_or_count < 1:
      raise ValueError(f"a count of validation examples per class must be >= 1, got {fraction_or_count}")
    return "count", int(fraction_or_count)
  if isinstance(fraction_or_count, numbers.Real):
    if not 0 < fraction_or_count < 1:
      raise ValueError(f"a fraction of each class must lie in (0, 1), got {fraction_or_count} "
                       "(an int is a count per class)")
    return "fraction", float(fraction_or_count)
  raise TypeError(f"fraction_or_count must be a fraction in (0, 1) or a count >= 1, got {fraction_or_count!r}")


def held_out_count(n: int, fraction_or_count: float) -> int:
  """How many of a class of ``n`` examples are held out, before keeping any for training.

  A fraction ``f`` in ``(0, 1)``: ``max(1, floor(f · n + 0.5))`` (round half
  up, at least one); a count ``k``: ``k``. The folder datasets' carves
  (:func:`dtnh_jax.data.folder.folder_splits`) use it too, so that both
  carve alike; the callers then cut it so that training keeps at least one
  example.
  """
  kind, value = _rule(fraction_or_count)
  if kind == "count":
    return int(value)
  return max(1, int(value * n + 0.5))


def _labels(labels: Any) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be one-dimensional (one label per example), got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integers (class indices), got dtype {labels.dtype}")
  if labels.size and labels.min() < 0:
    raise ValueError(f"labels must be >= 0 (class indices), got {labels.min()}")
  return labels.astype(np.int64)


def _class_generator(seed: int, label: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64([seed, VAL_SPLIT_SALT, label]))


def carve_validation(labels: np.ndarray, fraction_or_count: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(train_indices, val_indices)`` into ``labels``: a seeded per-class choice goes to validation.

  Args:
    labels: the integer class of each example of the training pool (``labels[i]`` of example ``i``).
    fraction_or_count: a fraction in ``(0, 1)`` of each class, or an ``int`` count per class
      (see the module docstring for the rounding and the cut to ``n - 1``).
    seed: a non-negative int; the same seed gives the same split, another seed another one.

  Returns:
    Two sorted ``int64`` arrays, disjoint, together ``arange(len(labels))``.
  """
  labels = _labels(labels)
  if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  held_out = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(held_out_count(len(members), fraction_or_count), len(members) - 1)
    order = _class_generator(int(seed), int(label)).permutation(len(members))
    held_out.append(members[order[:count]])
  val = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train.astype(np.int64), val.astype(np.int64)


def val_indices_digest(val_indices: Any) -> str:
  """SHA-256 (hex) of the sorted validation indices written ``"3,17,42"``: names a split in a few characters.

  Plain text rather than array bytes, so that anything (another language,
  a later NumPy) can recompute it from the index list.
  """
  indices = np.sort(np.asarray(val_indices, np.int64))
  return hashlib.sha256(",".join(str(int(i)) for i in indices).encode("ascii")).hexdigest()


def split_record(labels: np.ndarray, fraction_or_count: float, seed: int) -> dict[str, Any]:
  """A JSON-able account of :func:`carve_validation` ``(labels, fraction_or_count, seed)``, to store with a run.

  The split is carved again here, so the record cannot describe another
  split than the one these arguments give. Its ``val_sha256`` tells two runs
  on the same split (pair them) from runs on different ones.

  Returns:
    ``{"kind": "carved", "seed", "salt", "rng": "PCG64", "rule": "fraction" | "count",
    "fraction_or_count", "num_examples", "num_train", "num_val",
    "per_class": [{"label", "total", "train", "val"}, ...] (by label),
    "val_sha256"}`` (:func:`val_indices_digest` of the validation indices).
  """
  labels = _labels(labels)
  rule, value = _rule(fraction_or_count)
  train, val = carve_validation(labels, fraction_or_count, seed)
  totals = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
  in_val = np.bincount(labels[val], minlength=len(totals))
  per_class = [{"label": int(label), "total": int(totals[label]), "train": int(totals[label] - in_val[label]),
                "val": int(in_val[label])} for label in np.flatnonzero(totals)]
  return {"kind": "carved", "seed": int(seed), "salt": VAL_SPLIT_SALT, "rng": "PCG64", "rule": rule,
          "fraction_or_count": value, "num_examples": len(labels), "num_train": len(train),
          "num_val": len(val), "per_class": per_class, "val_sha256": val_indices_digest(val)}
