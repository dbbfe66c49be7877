"""Console entry points (declared under ``[project.scripts]`` in pyproject)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def convert_main(argv: Sequence[str] | None = None) -> int:
  """``dtnh-convert SRC DST [--arch resnet18]``: torchvision -> orbax.

  Reads a torchvision ResNet checkpoint (``.pth``/``.pt``/``.pth.tar`` or
  ``.safetensors``, including the Places365 format), converts it strictly, and
  writes an orbax checkpoint at ``DST`` whose metadata rebuilds the model
  (see ``dtnh_jax.models.load_variables``). Bad input exits with status 2 and
  a one-paragraph message, no traceback.

  Args:
    argv: arguments without the program name; default ``sys.argv[1:]``.

  Returns:
    0 on success.
  """
  # Imported here so that other commands of this module start fast.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dtnh_jax.models import convert  # pylint: disable=g-import-not-at-top
  from dtnh_jax.models import resnet  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="dtnh-convert",
      description="Convert a torchvision ResNet checkpoint (.pth, .pt, "
      ".pth.tar or .safetensors) to an orbax checkpoint of Flax variables.")
  parser.add_argument("src", metavar="SRC", help="torchvision checkpoint file")
  parser.add_argument("dst", metavar="DST",
                      help="directory of the orbax checkpoint to write")
  parser.add_argument("--arch", default="resnet18",
                      choices=sorted(resnet.ARCHITECTURES),
                      help="architecture of SRC (default: %(default)s)")
  parser.add_argument("--force", action="store_true",
                      help="overwrite DST if it exists")
  args = parser.parse_args(argv)

  if os.path.exists(args.dst) and not args.force:
    parser.error(f"{args.dst!r} exists; pass --force to overwrite it.")
  try:
    variables = convert.load_torchvision_checkpoint(args.src, arch=args.arch)
  except (OSError, ValueError, ImportError) as e:
    parser.error(str(e))
  num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
  metadata = {"arch": args.arch, "num_classes": num_classes, "width": 1.0,
              "small_stem": False, "source": os.path.basename(args.src)}
  try:
    convert.save_variables(args.dst, variables, metadata, force=args.force)
  except (OSError, ValueError) as e:
    parser.error(f"could not write {args.dst!r}: {e}")
  num_params = sum(int(np.size(leaf))
                   for leaf in jax.tree.leaves(variables["params"]))
  print(f"{args.src} -> {args.dst}: {args.arch}, {num_classes} classes, "
        f"{num_params:,} parameters")
  return 0
