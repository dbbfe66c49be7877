"""``python -m dtnh_jax.data {list,prepare}``: list or prepare datasets.

``prepare NAME`` writes the dataset in the array_record format that the
loaders read, without TensorFlow for ``caltech256`` and ``mit_indoor67``
(TFDS's own builders, e.g. ``cifar10``, need TensorFlow to prepare). Errors
(missing manual download, missing TensorFlow) exit with status 2 and say
what to do.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dtnh_jax.data",
      description="List or prepare the DTNH paper's datasets (TFDS).")
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="the paper's datasets")
  prepare = commands.add_parser(
      "prepare", help="prepare a dataset in the array_record format")
  prepare.add_argument("name", help="TFDS name, e.g. caltech256/30")
  prepare.add_argument("--data_dir", default=None,
                       help="TFDS data directory (default: TFDS's)")
  prepare.add_argument("--manual_dir", default=None,
                       help="folder with the manual download "
                       "(default: DATA_DIR/downloads/manual)")
  args = parser.parse_args(argv)

  from dtnh_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from dtnh_jax.data import errors  # pylint: disable=g-import-not-at-top

  if args.command == "list":
    for spec in datasets.DATASETS.values():
      manual = "  (manual download)" if spec.manual else ""
      print(f"{spec.name:20s} {spec.role:6s} {spec.domain:14s} "
            f"{spec.num_classes:4d} classes  {spec.num_train:6d} train / "
            f"{spec.num_test:5d} test{manual}")
    return 0
  try:
    path = datasets.prepare(args.name, data_dir=args.data_dir,
                            manual_dir=args.manual_dir)
  except (errors.DatasetNotPreparedError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
