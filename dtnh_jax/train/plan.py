"""What a ``dtnh-train`` command runs, decided before jax loads: :func:`resolve` and the :class:`Plan` it returns.

A command names a preset (``--preset``; without one the offline default, or the paper's recipe with a
``--dataset``), maybe a ``--config`` file, and flags. :func:`resolve` turns them into runs and states each rule
once: the precedence (flags, then the file, then the preset and its default runs, ``presets.GRIDS``), the
axes of the grid (methods, seeds, sources, λ and its decay), the checks that fail a grid now rather than hours
in, and where the runs go (:func:`default_workdir`). The rules that the training modules apply as well live
here too, and they call them: a sweep needs a validation split (:func:`check_sweep`), a workdir is a directory
(:func:`check_workdir`), the seed of a run's data split (:func:`split_seed`) and the folder of a source
(:func:`source_folder`).

This module imports ``dtnh_jax.names``, ``dtnh_jax.train.config`` and ``dtnh_jax.train.presets`` only, none of
which imports jax: ``dtnh-train --print-config`` resolves and prints a plan without loading it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dtnh_jax import names
from dtnh_jax.train import config as config_lib
from dtnh_jax.train import presets
from dtnh_jax.train.config import ConfigError, Method, TrainConfig

__all__ = [
    "check_sweep",
    "check_workdir",
    "COMMAND_FLAGS",
    "default_runs",
    "default_workdir",
    "GRID_SETTINGS",
    "parse_methods",
    "parse_seeds",
    "Plan",
    "resolve",
    "settings_text",
    "source_folder",
    "split_seed",
    "SWEPT",
    "value_text",
]

#: λ and its decay: a flag or ``--config`` list of several values sweeps them (selection on validation).
SWEPT = ("reg_weight", "reg_decay")
#: The settings that may hold a list in a ``--config`` file: one run per value (as ``--method``, ``--seeds``).
GRID_SETTINGS = ("method", "seed", "source") + SWEPT
#: The flags :func:`resolve` reads besides the settings' own (``--steps``, ...): ``--method`` (comma-separated
#: methods, or all), ``--seeds`` (comma-separated seeds), ``--offline`` and ``--workdir``.
COMMAND_FLAGS = ("method", "seeds", "offline", "workdir")
#: The offline default's preset, whose grid (``presets.GRIDS["offline"]``) also gives a run on the offline target
#: its methods and sources when its own preset names none.
_OFFLINE = "offline"


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a ``dtnh-train`` command runs: ``base`` for every method x seed x source (x λ x decay), in ``workdir``.

  Attributes:
    base: the settings of every run but the grid's axes; those of the first run.
    methods: the methods, in the order they run.
    seeds: the seeds.
    sources: the sources (``--source``), each a folder of runs in ``workdir``.
    workdir: where the runs and the summary go.
    offline_default: whether the runs are on the offline target (``offline-digits``) from a preset whose
      dataset is that target: the offline sources are then the default ones.
    reg_weights: λ's values; several sweep it.
    reg_decays: the decay's values; several sweep it.
  """

  base: TrainConfig
  methods: tuple[Method, ...]
  seeds: tuple[int, ...]
  sources: tuple[str, ...]
  workdir: str
  offline_default: bool
  reg_weights: tuple[float | None, ...] = (None,)
  reg_decays: tuple[float | None, ...] = (None,)

  @property
  def runs(self) -> int:
    """How many runs the plan holds (``config.grid_runs``: a method without regularizer once per seed whatever
    the sweep, ``scratch`` under the first source only)."""
    combinations = [(w, d) for w in self.reg_weights for d in self.reg_decays]
    return len(config_lib.grid_runs(self.sources, self.methods, self.seeds, combinations))


def resolve(preset: str | None, config_file: str | None, flags: Mapping[str, Any]) -> Plan:
  """The runs of a ``dtnh-train`` command: the preset and its default runs, then ``config_file``, then ``flags``.

  Args:
    preset: ``--preset``: a name of ``presets.PRESETS``, or None: the offline default (``--offline``, or no
      ``--dataset`` or the offline target), else ``paper``.
    config_file: ``--config``: a ``.toml`` or ``.json`` file of settings (``config.read_settings``); the
      settings of :data:`GRID_SETTINGS` may be lists, and ``workdir`` is read too.
    flags: the parsed flags, by their ``argparse`` dest: every setting's (``steps``, ``reg_weight``, ...),
      and those of :data:`COMMAND_FLAGS`. None or absent: not given. A value that did not parse may be the
      ValueError saying so; it is reported naming its flag. ``reg_weight``, ``reg_decay`` and the tuple
      settings are tuples.

  Returns:
    The :class:`Plan`.

  Raises:
    ConfigError: a bad ``--config`` file, setting, flag or combination of them, in one line naming what to
      change; every run of the grid is checked, so that a bad seed or λ fails now and not hours in.
    TypeError: ``flags`` holds a name that is neither a setting nor one of :data:`COMMAND_FLAGS`.
  """
  setting_types = config_lib.setting_types()
  unknown = sorted(name for name in flags if name not in setting_types and name not in COMMAND_FLAGS)
  if unknown:
    raise TypeError(f"resolve: unknown flags {unknown}; the settings' and {list(COMMAND_FLAGS)} are known.")
  for name, value in flags.items():  # a flag's value that did not parse
    if isinstance(value, ValueError):
      raise ConfigError(f"--{name.replace('_', '-')}: {value}.")
  settings = config_lib.read_settings(config_file, lists=GRID_SETTINGS, extra=("workdir",)) if config_file else {}
  config_workdir = settings.pop("workdir", None)
  settings.update({name: value for name, value in flags.items()
                   if name in setting_types and name != "method" and value is not None})

  # where a grid axis came from, for the messages: its flag, else the --config file (a preset repeats nothing)
  origin = lambda name, flag: flag or f"--config {config_file}: its {name} list"
  as_list = lambda value: list(value) if isinstance(value, list) else [value]
  method_flag = flags.get("method")
  method_text = method_flag if method_flag is not None else settings.pop("method", None)
  if isinstance(method_text, list):
    method_text = ",".join(method_text)
  if flags.get("offline") and preset not in (None, _OFFLINE):
    raise ConfigError(f"--offline is --preset offline; it cannot go with --preset {preset}.")
  preset_name = preset or (_OFFLINE if flags.get("offline") else None)
  if preset_name is None:
    preset_name = _OFFLINE if settings.get("dataset", names.OFFLINE_TARGET) == names.OFFLINE_TARGET else "paper"
  preset_settings = presets.settings(preset_name, settings.get("dataset", TrainConfig.dataset))
  offline_default = preset_settings.get("dataset") == names.OFFLINE_TARGET and settings.get(
      "dataset", names.OFFLINE_TARGET) == names.OFFLINE_TARGET
  defaults = default_runs(preset_name, preset_settings, offline_default)  # each overridden by a flag or --config
  methods = parse_methods(method_text or defaults["method"])
  _given_once([m.name for m in methods], origin("method", method_flag and f"--method {method_flag}"), "method")
  seed = settings.pop("seed", None)
  if flags.get("seeds") is not None:
    seeds = parse_seeds(flags["seeds"])
  elif seed is not None:
    seeds = as_list(seed)
    _given_once(seeds, origin("seed", None), "seed")
  else:
    seeds = defaults["seed"]
  source = settings.pop("source", None)
  if source is not None:
    sources = as_list(source)
    _given_once(sources, origin("source", None), "source", key=source_folder)  # two sources, one folder
  else:
    sources = defaults["source"]
  swept = {}
  for name in SWEPT:
    value = settings.pop(name, None)
    swept[name] = as_list(list(value) if isinstance(value, tuple) else value) if value is not None else defaults[name]
    if not swept[name]:
      raise ConfigError(f"--{name.replace('_', '-')} names no value.")
    flag_value = flags.get(name)
    _given_once(swept[name], origin(name, flag_value and f"--{name.replace('_', '-')} {value_text(flag_value)}"),
                "the value")
  # a --seed that --seeds overrides is still checked, as every other setting given
  given_seed = {"seed": seed} if seed is not None and not isinstance(seed, list) else {}
  base = TrainConfig.create(**{**preset_settings, **settings, **given_seed, "method": methods[0].name,
                               "source": sources[0]})
  base = base.replace(seed=seeds[0], reg_weight=swept["reg_weight"][0], reg_decay=swept["reg_decay"][0])
  optimizer = base.recipe.optimizer
  if flags.get("momentum") is not None and optimizer != "sgd":  # its default value too: the flag would do nothing
    raise ConfigError(f"--momentum is SGD's; --optimizer {optimizer} has its own moments (b1 0.9, b2 0.999). "
                      "Leave --momentum out, or pass --optimizer sgd.")
  for seed in seeds[1:]:  # a bad seed or λ of a grid fails now, not hours in
    base.replace(seed=seed)
  for weight in swept["reg_weight"]:
    for decay in swept["reg_decay"]:
      base.replace(reg_weight=weight, reg_decay=decay)
  check_sweep(base, swept["reg_weight"], swept["reg_decay"])
  if flags.get("workdir"):
    workdir = flags["workdir"]
  elif config_workdir:  # a printed config (--print-config) runs where its header said
    workdir = config_workdir
  else:
    workdir = default_workdir(preset_name, base.dataset, sources, offline_default)
  return Plan(base, tuple(methods), tuple(seeds), tuple(sources), workdir, offline_default,
              tuple(swept["reg_weight"]), tuple(swept["reg_decay"]))


def default_runs(preset: str, preset_settings: Mapping[str, Any], offline_default: bool) -> dict[str, Any]:
  """The runs of ``preset`` where no flag or ``--config`` names them: ``method`` (text for
  :func:`parse_methods`), ``seed``, ``source``, ``reg_weight`` and ``reg_decay`` (lists).

  Each from the preset's ``presets.GRIDS`` entry, else the preset's own setting (``preset_settings``), else, for
  the methods and sources of a run on the offline target (``offline_default``), the offline default's grid
  (``GRIDS["offline"]``: every method from both offline sources), else one run: ``TrainConfig``'s. The offline
  preset on another dataset (``--offline --dataset offline-mnist``) keeps its grid's seeds only: the offline
  sources and the methods are the offline target's.
  """
  grid = presets.GRIDS.get(preset, {})
  if preset == _OFFLINE and not offline_default:
    grid = {"seed": grid["seed"]}
  offline = presets.GRIDS[_OFFLINE] if offline_default else {}
  defaults = TrainConfig().settings()
  if "source" in grid:
    sources = list(grid["source"])
  elif "source" in preset_settings:
    sources = [preset_settings["source"]]
  else:
    sources = list(offline.get("source", [defaults["source"]]))
  runs = {"method": grid.get("method") or preset_settings.get("method") or offline.get("method") or defaults["method"],
          "seed": list(grid["seed"]) if "seed" in grid else [preset_settings.get("seed", defaults["seed"])],
          "source": sources}
  for name in SWEPT:
    value = grid.get(name, preset_settings.get(name, defaults[name]))
    runs[name] = list(value) if isinstance(value, (list, tuple)) else [value]
  return runs


def default_workdir(preset: str, dataset: str, sources: Sequence[str], offline_default: bool) -> str:
  """Where a command's runs go without ``--workdir`` (or a ``--config`` file's ``workdir``).

  ``runs/offline-default`` for the offline default (``runs/offline-PRESET`` for another preset on the offline
  target), else ``runs/DATASET/SOURCE`` for one source (its :func:`source_folder`) and ``runs/DATASET`` for
  several; a ``folder:PATH`` dataset is ``folder-NAME`` there (the last component of PATH: no colon or absolute
  path in a folder name).
  """
  if offline_default:
    return os.path.join("runs", "offline-default" if preset == _OFFLINE else f"offline-{preset}")
  dataset_dir = (f"folder-{os.path.basename(os.path.normpath(dataset.split(':', 1)[1])) or 'data'}"
                 if dataset.startswith("folder:") else dataset)
  if len(sources) == 1:
    return os.path.join("runs", dataset_dir, os.path.basename(os.path.normpath(sources[0])))
  return os.path.join("runs", dataset_dir)


def source_folder(source: str) -> str:
  """The folder of ``source``'s runs in a grid's workdir: its last path component (``source`` for a root)."""
  return os.path.basename(os.path.normpath(source)) or "source"


def split_seed(config: TrainConfig) -> int:
  """The seed of ``config``'s data split: ``--split-seed``, default the run's ``--seed``.

  It draws an offline target's training pool and the validation carve (``--val-fraction``); ``load_data``
  draws with it, and a grid shares one load of the data among the runs with the same split seed.
  """
  return config.seed if config.split_seed is None else config.split_seed


def check_sweep(config: TrainConfig, reg_weights: Sequence[float | None],
                reg_decays: Sequence[float | None]) -> None:
  """Refuses a sweep (several λ x decay combinations) of runs of ``config`` that have no validation split.

  A sweep picks on validation accuracy, never on the test split. Looks at the dataset without reading it
  (``data.validation_kind``; the data modules are imported then, not with this one).

  Raises:
    ConfigError: naming ``--val-fraction``, which carves a validation split.
  """
  if len(reg_weights) * len(reg_decays) <= 1:
    return
  from dtnh_jax.train.data import validation_kind  # pylint: disable=g-import-not-at-top  (numpy, the datasets)
  if validation_kind(config) is None:
    raise ConfigError(f"a sweep of --reg-weight/--reg-decay picks on validation accuracy, and --dataset "
                      f"{config.dataset} has no validation split of its own: pass --val-fraction (e.g. 0.2) to "
                      "carve one; nothing is chosen on the test split.")


def check_workdir(workdir: str) -> None:
  """Refuses a ``workdir`` that is a file: it must be a directory or not exist yet.

  Raises:
    ConfigError: naming ``--workdir``.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file; it must be a directory (or not exist yet).")


def parse_methods(text: str) -> list[Method]:
  """``--method``'s comma-separated methods (``l2-sp,dtnh-l2-sp``), or ``all`` (``config.ALL_METHODS``).

  Raises:
    ConfigError: an unknown method, or none.
  """
  if text.strip().lower() == "all":
    return list(config_lib.ALL_METHODS)
  methods = [Method.parse(name) for name in text.split(",") if name.strip()]
  if not methods:
    raise ConfigError(f"--method {text!r} names no method; e.g. --method l2-sp,dtnh-l2-sp, or all.")
  return methods


def parse_seeds(text: str) -> list[int]:
  """``--seeds``' comma-separated seeds.

  Raises:
    ConfigError: a seed that is not an integer, none, or one named twice.
  """
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}.") from None
  if not seeds:
    raise ConfigError(f"--seeds {text!r} names no seed; e.g. --seeds 0,1,2.")
  _given_once(seeds, f"--seeds {text}", "seed")
  return seeds


def _given_once(values: Sequence[Any], flag: str, what: str, key=lambda value: value) -> None:
  """Refuses a grid axis naming a value twice: its runs would count twice in the means over them."""
  seen = {}
  for value in values:
    if key(value) in seen and seen[key(value)] == value:
      raise ConfigError(f"{flag} names {what} {value} twice; give each once (given twice, its runs would count "
                        "twice in the means).")
    if key(value) in seen:
      raise ConfigError(f"{flag} names {what}s {seen[key(value)]} and {value}, whose runs would share the folder "
                        f"{key(value)!r}; rename one.")
    seen[key(value)] = value


def value_text(value: Any) -> str:
  """A setting's value as its flag takes it: a tuple comma-separated (``0.1,1.0``)."""
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def settings_text(plan: Plan, fmt: str) -> str:
  """The settings of ``plan`` as a ``--config`` file in ``fmt`` (``toml`` or ``json``): every setting, the
  ``workdir``, and lists for the grid's axes; TOML with a header line saying how many runs go where."""
  single = lambda values: values[0] if len(values) == 1 else list(values)
  # the workdir too: --config FILE then runs where the header says, whatever preset printed it
  settings = {"workdir": plan.workdir, **plan.base.settings(), "method": single([m.name for m in plan.methods]),
              "seed": single(plan.seeds), "source": single(plan.sources),
              "reg_weight": single(plan.reg_weights), "reg_decay": single(plan.reg_decays)}
  text = config_lib.format_settings(settings, fmt)
  if fmt == "toml":
    text = (f"# dtnh-train --config FILE.toml: {plan.runs} run(s) in {plan.workdir}; a list of methods, seeds, "
            "sources, reg_weight or reg_decay values runs each.\n" + text)
  return text
