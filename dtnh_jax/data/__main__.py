"""``dtnh-data {list,prepare}`` (also ``python -m dtnh_jax.data``): list or prepare datasets.

``prepare NAME`` writes the dataset in the array_record format that the
loaders read, without TensorFlow for ``caltech256`` and ``mit_indoor67``
(TFDS's own builders, e.g. ``cifar10``, need TensorFlow to prepare). Errors
(missing manual download, missing TensorFlow) exit with status 2 and say
what to do.

Flags are spelled with dashes, as ``dtnh-train``'s (``--data-dir``); the
underscore spellings of earlier versions (``--data_dir``, ``--manual_dir``)
still work, hidden from ``--help``, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "dtnh-data"


class _DeprecatedSpelling(argparse.Action):
  """A hidden old spelling of a flag: stores the value like the flag, and says what to write instead."""

  def __init__(self, option_strings, dest, *, new: str, **kwargs):
    super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
    self.new = new

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}.", file=sys.stderr)
    setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
  import dtnh_jax  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog=PROG,
      description="List or prepare the DTNH paper's datasets (TFDS) for dtnh-train --dataset. "
      "Also runs as `python -m dtnh_jax.data`.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {dtnh_jax.__version__}")
  commands = parser.add_subparsers(dest="command", required=True, metavar="{list,prepare}")
  commands.add_parser("list", help="the paper's datasets: role, domain, classes, sizes, manual download or not")
  prepare = commands.add_parser(
      "prepare", help="prepare a dataset in the array_record format (downloads what TFDS can download)")
  prepare.add_argument("name", help="TFDS name, e.g. caltech256/30 or cifar10 (see `dtnh-data list`)")
  for flag, help_text in (("--data-dir", "TFDS data directory, as dtnh-train --data-dir (default: TFDS's own, "
                                         "$TFDS_DATA_DIR or ~/tensorflow_datasets)"),
                          ("--manual-dir", "folder with the manual download (default: DATA_DIR/downloads/manual)")):
    dest = flag[2:].replace("-", "_")
    prepare.add_argument(flag, dest=dest, default=None, help=help_text)
    prepare.add_argument("--" + dest, dest=dest, action=_DeprecatedSpelling, new=flag)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``dtnh-data`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status (0, or 2 on an error).

  Warnings and the libraries' log lines come one line each, as ``dtnh-train``'s (or not at all: TFDS's absl
  lines about the folders it looks at).
  """
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top

  with cli.one_line_output(PROG, verbose=False):
    return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)

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
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
