"""Console entry points (declared under ``[project.scripts]`` in pyproject)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
from collections.abc import Sequence


def convert_main(argv: Sequence[str] | None = None) -> int:
  """``dtnh-convert SRC DST [--arch resnet18] [--force]``: torchvision -> orbax.

  Reads a torchvision ResNet checkpoint (``.pth``/``.pt``/``.pth.tar`` or
  ``.safetensors``, including the Places365 format), converts it strictly, and
  writes an orbax checkpoint at ``DST`` whose metadata rebuilds the model
  (see ``dtnh_jax.models.load_variables``). Bad input exits with status 2 and
  a one-paragraph message, no traceback.

  ``DST`` must be new or empty; ``--force`` lets it replace only a checkpoint
  that dtnh_jax wrote, never a folder holding anything else (SRC included).
  ``DST`` is checked before SRC is read, so a bad target fails at once.

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
                      help="folder of the orbax checkpoint to write: new or "
                      "empty (a folder holding other files is refused)")
  parser.add_argument("--arch", default="resnet18",
                      choices=sorted(resnet.ARCHITECTURES),
                      help="architecture of SRC (default: %(default)s)")
  parser.add_argument("--force", action="store_true",
                      help="replace DST if it holds a checkpoint that "
                      "dtnh-convert or dtnh-train wrote (nothing else is "
                      "ever replaced or deleted)")
  args = parser.parse_args(argv)

  def fail(message: str):
    # One line, no usage: the arguments parsed, the files are the problem.
    parser.exit(2, f"{parser.prog}: error: {message}\n")

  try:  # before the (slow) conversion
    convert.check_save_target(args.dst, force=args.force)
  except convert.UnsafeTargetError as e:
    fail(str(e))
  try:
    variables = convert.load_torchvision_checkpoint(args.src, arch=args.arch)
    convert.check_finite(variables, args.src)
  except (OSError, ValueError, ImportError) as e:
    fail(str(e))
  num_classes = int(variables["params"]["fc"]["kernel"].shape[-1])
  metadata = {"arch": args.arch, "num_classes": num_classes, "width": 1.0,
              "small_stem": False, "source": os.path.basename(args.src)}
  try:
    convert.save_variables(args.dst, variables, metadata, force=args.force)
  except convert.UnsafeTargetError as e:
    fail(str(e))
  except (OSError, ValueError) as e:
    fail(f"could not write {args.dst}: {e} (what was there is unchanged)")
  num_params = sum(int(np.size(leaf))
                   for leaf in jax.tree.leaves(variables["params"]))
  print(f"{args.src} -> {args.dst}: {args.arch}, {num_classes} classes, "
        f"{num_params:,} parameters")
  return 0


def _comma_separated(kind, text: str) -> tuple:
  """``"1,2"`` -> ``(1, 2)`` for a tuple-valued setting; argparse reports the error."""
  try:
    return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated {'integers' if kind is int else 'names'}, got {text!r}") from None


def _train_parser():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train.config import METHODS, TrainConfig  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="dtnh-train",
      description="Fine-tune a pre-trained ResNet on a target task with a transfer regularizer, "
      "with or without DTNH. With no arguments: the offline default (every method on scikit-learn's "
      "digits from two sources pre-trained here, a few seeds) and a table laid out like the paper's.",
      epilog="Defaults are the paper's recipe (Section V.A). Running the same command again with the "
      "same --workdir resumes from the newest checkpoint.")
  parser.add_argument("--workdir", help="where checkpoints, metrics, plots and results go "
                      "(default: runs/offline-default, or runs/DATASET/SOURCE)")
  parser.add_argument("--method", default=None,
                      help=f"comma-separated methods among {', '.join(METHODS)}, each optionally prefixed "
                      "'dtnh-' (e.g. l2-sp,dtnh-l2-sp), or 'all' (default: l2-sp)")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
  parser.add_argument("--offline", action="store_true",
                      help="the offline default (also chosen when no --dataset is given); other flags "
                      "override its settings")
  parser.add_argument("--export", help="also write the final variables of a single run here (orbax): a new or "
                      "empty folder, or one holding a checkpoint dtnh_jax wrote, with --force")
  parser.add_argument("--force", action="store_true",
                      help="let --export replace a checkpoint that dtnh_jax wrote there (nothing else is replaced)")
  parser.add_argument("--restart", action="store_true",
                      help="set the run(s) already in --workdir aside (moved to set-aside/N beside their files; "
                      "nothing is deleted) and start anew, e.g. with other settings")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  multihost = parser.add_argument_group(
      "multi-host", "Run one dtnh-train per process, all with the same arguments and a --workdir they all see. "
      "Without these flags jax.distributed starts by itself when the environment announces several processes "
      "(SLURM_NTASKS or OMPI_COMM_WORLD_SIZE > 1, a multi-host Cloud TPU slice).")
  multihost.add_argument("--coordinator", help="host:port of process 0's coordination service")
  multihost.add_argument("--num-processes", type=int, help="number of processes of the job")
  multihost.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
  defaults = TrainConfig()
  for field in dataclasses.fields(TrainConfig):
    if field.name == "method":
      continue
    flag = "--" + field.name.replace("_", "-")
    default = getattr(defaults, field.name)
    if isinstance(default, bool):
      parser.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction)
    elif isinstance(default, tuple):
      kind = int if field.name == "lr_drop_steps" else str
      parser.add_argument(flag, dest=field.name, default=None, type=functools.partial(_comma_separated, kind),
                          help=f"comma-separated (default: {','.join(map(str, default))})")
    else:
      kind = type(default) if default is not None else str
      parser.add_argument(flag, dest=field.name, default=None, type=kind, help=f"(default: {default})")
  return parser


def train_main(argv: Sequence[str] | None = None) -> int:
  """``dtnh-train``: one or several fine-tuning runs, or the offline default without ``--dataset``."""
  import sys  # pylint: disable=g-import-not-at-top

  parser = _train_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)

  from dtnh_jax.train import config as config_lib, interrupts, loop as loop_lib  # pylint: disable=g-import-not-at-top

  settings = {k: v for k, v in vars(args).items()
              if v is not None and k not in ("workdir", "method", "seeds", "offline", "export", "force", "restart",
                                             "no_progress", "coordinator", "num_processes", "process_id")}
  offline_default = args.offline or "dataset" not in settings
  try:
    # SIGTERM, like Ctrl-C, runs the clean-up; the loop defers both to a checkpoint
    with interrupts.raising(), _one_line_warnings("dtnh-train"):
      return _train(args, settings, offline_default)
  except config_lib.ConfigError as error:
    parser.exit(2, f"dtnh-train: error: {error}\n")
  except loop_lib.NonFiniteLossError as error:  # not bad input: the run itself diverged
    parser.exit(1, f"dtnh-train: error: {error}\n")
  except KeyboardInterrupt as interrupt:  # also interrupts.Interrupted (SIGTERM, or either during training)
    signum = getattr(interrupt, "signum", signal.SIGINT)
    step = getattr(interrupt, "step", None)
    where = (f"at step {step} (checkpoint written)" if step is not None
             else "before a checkpoint of this command was written")
    parser.exit(128 + signum, f"dtnh-train: interrupted {where}; run the same command to resume.\n")


@contextlib.contextmanager
def _one_line_warnings(program: str):
  """Warnings as ``program: warning: message`` lines, without the source line Python adds."""
  import warnings  # pylint: disable=g-import-not-at-top
  previous = warnings.formatwarning
  warnings.formatwarning = lambda message, category, *_: f"{program}: warning: {message}\n"
  try:
    yield
  finally:
    warnings.formatwarning = previous


def _train(args, settings: dict, offline_default: bool) -> int:
  """The runs ``dtnh-train`` was asked for: one with --export, else a grid (methods x seeds x sources)."""
  from dtnh_jax.train import config as config_lib, loop, offline  # pylint: disable=g-import-not-at-top
  _start_distributed(args)  # before any JAX computation
  methods = _parse_methods(args.method or ("all" if offline_default else "l2-sp"))
  seeds = _parse_seeds(args.seeds) if args.seeds is not None else None
  if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise config_lib.ConfigError(f"--workdir {args.workdir} is a file; it must be a directory (or not exist yet).")
  if args.force and not args.export:
    raise config_lib.ConfigError("--force only lets --export replace a checkpoint dtnh_jax wrote; pass --export "
                                 "DIR, or --restart to start a run anew.")
  if offline_default:
    base = config_lib.TrainConfig(**{**config_lib.OFFLINE_PRESET, **settings})
    seeds = seeds or [0, 1, 2]
    sources = [base.source] if "source" in settings else list(offline.data_lib.offline.SOURCES)
    workdir = args.workdir or os.path.join("runs", "offline-default")
  else:
    dataset = settings.get("dataset", config_lib.TrainConfig.dataset)
    base = config_lib.TrainConfig(**{**config_lib.paper_preset(dataset), **settings})
    seeds = seeds or [base.seed]
    sources = [base.source]
    workdir = args.workdir or os.path.join("runs", base.dataset, os.path.basename(os.path.normpath(base.source)))
  if args.export and (len(methods) > 1 or len(seeds) > 1):
    raise config_lib.ConfigError("--export needs a single --method and seed.")
  print(f"dtnh-train: {len(sources) * len(methods) * len(seeds)} run(s) -> {workdir}", flush=True)
  if args.export:
    config = base.replace(method=methods[0].name, seed=seeds[0])
    result = loop.train(config, offline.run_dir(workdir, config.source, config.method, config.seed),
                        offline_sources=offline.OFFLINE_SOURCES, export_to=args.export, force_export=args.force,
                        restart=args.restart)
    print(result)
  else:
    offline.run_grid(base, workdir, sources=sources, methods=methods, seeds=seeds,
                     show_progress=not args.no_progress, restart=args.restart)
  return 0


def _parse_methods(text: str):
  from dtnh_jax.train.config import ALL_METHODS, ConfigError, Method  # pylint: disable=g-import-not-at-top
  if text.strip().lower() == "all":
    return list(ALL_METHODS)
  methods = [Method.parse(name) for name in text.split(",") if name.strip()]
  if not methods:
    raise ConfigError(f"--method {text!r} names no method; e.g. --method l2-sp,dtnh-l2-sp, or all.")
  return methods


def _parse_seeds(text: str) -> list[int]:
  from dtnh_jax.train.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}.") from None
  if not seeds:
    raise ConfigError(f"--seeds {text!r} names no seed; e.g. --seeds 0,1,2.")
  return seeds


def _start_distributed(args) -> None:
  """``jax.distributed`` from --coordinator/--num-processes/--process-id or the cluster's environment."""
  from dtnh_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train.config import ConfigError  # pylint: disable=g-import-not-at-top
  if args.num_processes is not None and args.num_processes < 1:
    raise ConfigError(f"--num-processes must be positive, got {args.num_processes}.")
  if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    raise ConfigError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}.")
  if (args.num_processes or 1) > 1 and args.coordinator is None and not sharding.cluster_detected():
    raise ConfigError("--num-processes > 1 needs --coordinator host:port (process 0's address) outside a "
                      "cluster jax detects (SLURM, Open MPI, Cloud TPU).")
  try:
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  except (ValueError, TypeError, RuntimeError) as error:  # e.g. no --process-id outside a detected cluster
    raise ConfigError(f"multi-host start-up (--coordinator, --num-processes, --process-id): {error}") from None
