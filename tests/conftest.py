"""Shared pytest fixtures and markers, and the suite's compile settings.

Every test, and every process a test starts (they inherit the environment),
compiles with the options below: the suite runs hundreds of small programs
once each, where XLA's expensive backend passes cost more time than they
save. Compiled programs go to one persistent compilation cache shared by the
pytest workers and their subprocesses (``$DTNH_JAX_TEST_CACHE``, by default
under the system's temporary folder), so a train step compiled by one test
is loaded by the next. Neither changes what a test checks: runs that are
compared with each other compile with the same flags. Two exceptions are
known. At optimization level 0, XLA:CPU 0.10.2 computed a vmapped train step
3% away from the same step unvmapped on an Intel Xeon host (levels 1-3 agree
to 1e-7), so tests/test_benchmarks.py checks that comparison in a process
without them. And XLA:CPU's older emitters (``--xla_cpu_use_fusion_emitters=
false``: compiles 2.5x faster than the default fusion emitters at level 0)
round a few values of two programs that compute the same thing differently
(1 ulp), where the default emitters give the same bits: the tests that
compare two programs bit for bit compile them through the ``exact_jit``
fixture, with the default emitters.
"""

import gc
import os
import sys
import tempfile

#: The environment of the suite, set before jax is imported.
FAST_COMPILE_ENV = {
    "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true",
                                        "--xla_cpu_use_fusion_emitters=false",
                                        # one LLVM module per program, not 32 compiled apart: less CPU where both
                                        # cores are busy anyway (tiny DTNH-KnowDist step 2.4 -> 1.8 CPU-s to
                                        # compile; test_pool + test_released_code + test_plain_step 59/65 ->
                                        # 53/48 CPU-s, 2026-12-07)
                                        "--xla_cpu_parallel_codegen_split_count=1"])),
    "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "DTNH_JAX_TEST_CACHE", os.path.join(tempfile.gettempdir(), "dtnh-jax-test-compilation-cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}
os.environ.update(FAST_COMPILE_ENV)
# Tracing a train step allocates ~10^5 short-lived objects while jax, flax, torch and TensorFlow keep millions
# alive: at Python's default thresholds (700, 10, 10) the collector kept rescanning them (5% of a compile's CPU
# samples in perf). Rarer collections, and everything imported by collection frozen out of them
# (pytest_collection_finish): tests/test_train.py + tests/test_efficientnet.py in one process 124/117 s -> 111/108 s.
gc.set_threshold(100_000, 50, 100)

import pytest  # pylint: disable=wrong-import-position

_PARITY_KEY = pytest.StashKey[dict]()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes several seconds on a CPU (still run by default)")
  config.stash[_PARITY_KEY] = {}


def pytest_collection_finish(session):
  """The modules every test imported stay for the session: the collector need not scan them again."""
  gc.collect()
  gc.freeze()


@pytest.fixture
def exact_jit():
  """``jax.jit`` with XLA:CPU's default fusion emitters, which the suite's flags turn off (see the module's
  docstring): for tests that compare two different programs bit for bit."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return functools.partial(jax.jit, compiler_options={"xla_cpu_use_fusion_emitters": True})


@pytest.fixture
def tiny_config():
  """Factory: the ``tiny`` preset (``dtnh_jax.train.presets``) as a TrainConfig, with overrides by setting name.

  ``tiny_config(method="knowdist", steps=2)``; ``presets.tiny()`` is the same as plain settings.
  """
  from dtnh_jax.train import presets  # pylint: disable=g-import-not-at-top  # the core's tests run without flax
  return lambda **overrides: presets.get("tiny", **overrides)


@pytest.fixture
def record_parity(request, record_property):
  """Records a measured difference to torchvision, shown in the summary.

  ``record_parity(name, difference, scale)`` keeps the worst relative value
  ``difference / max(1, scale)`` per name; ``pytest -rA`` or the terminal
  summary at the end lists them.
  """
  worst = request.config.stash[_PARITY_KEY]

  def record(name: str, difference: float, scale: float = 1.0) -> None:
    difference, scale = float(difference), float(scale)
    record_property(name, difference)
    if name not in worst or difference > worst[name][0]:
      worst[name] = (difference, scale)

  return record


def pytest_terminal_summary(terminalreporter, config):
  worst = config.stash.get(_PARITY_KEY, {})
  if worst:
    terminalreporter.section("worst differences to torchvision")
    for name, (difference, scale) in sorted(worst.items()):
      terminalreporter.write_line(
          f"{name}: max |diff| = {difference:.3g} (max |reference| = "
          f"{scale:.3g}, relative {difference / max(1.0, scale):.3g})")


@pytest.fixture
def random_torchvision_resnet():
  """Factory: a torchvision ResNet with random weights and BN statistics.

  Fresh torchvision models have running_mean 0, running_var 1 and BN
  scale 1, bias 0, which would hide a mix-up of those tensors; here all four
  are random. ``random_torchvision_resnet(arch, num_classes=1000, seed=0)``
  returns the model in eval mode; ``resnet10`` is torchvision's
  ``ResNet(BasicBlock, [1, 1, 1, 1])``.
  """
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")

  def make(arch: str, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    from helpers import torchvision_resnet  # pylint: disable=g-import-not-at-top
    model = torchvision_resnet(arch, num_classes)
    with torch.no_grad():
      for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
          module.weight.uniform_(0.5, 1.5)
          module.bias.normal_(0.0, 0.2)
          module.running_mean.normal_(0.0, 0.2)
          module.running_var.uniform_(0.5, 2.0)
    return model.eval()

  return make


@pytest.fixture(scope="session", autouse=True)
def _sources_out_of_the_users_cache(tmp_path_factory):
  """Offline sources a test pre-trains go to a folder of this pytest session, shared by its xdist workers (a
  source one worker pre-trained is loaded by the other; ``sources.pretraining_lock`` makes the second wait for
  the first instead of training it again), never to the user's ``~/.cache/dtnh_jax`` or ``$DTNH_JAX_CACHE``: a
  tiny source cached by a test would otherwise be found by the user's next run of the same key. Tests that need
  their own cache set it on top (monkeypatch restores this one)."""
  previous = os.environ.get("DTNH_JAX_CACHE")
  session = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base folder is in the session's
    session = session.parent
  os.environ["DTNH_JAX_CACHE"] = str(session / "dtnh-jax-sources")
  yield
  if previous is None:
    os.environ.pop("DTNH_JAX_CACHE", None)
  else:
    os.environ["DTNH_JAX_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_the_session_folder(tmp_path_factory):
  """``tempfile``'s folder is one of this pytest process's (pytest keeps the last three sessions' and removes the
  older ones): TFDS's builders leave an empty ``tmp*tfds`` folder behind for each mocked dataset they open
  (``DatasetInfo.initialize_from_bucket``), 1,254 of them in the system's folder after a few dozen runs."""
  previous = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = previous


@pytest.fixture(scope="session")
def _straight_fast_run(tmp_path_factory):
  """``(workdir, results)`` of one uninterrupted run of ``helpers.FAST``, trained once per pytest process."""
  from dtnh_jax.train import TrainConfig, loop, presets  # pylint: disable=g-import-not-at-top  # core's tests: no flax
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, loop.train(TrainConfig.create(**presets.tiny()), workdir)


@pytest.fixture
def straight_run(_straight_fast_run):
  """The workdir of an uninterrupted ``helpers.FAST`` run (shared: read it, never write there): what every resumed
  run must equal."""
  return _straight_fast_run[0]


@pytest.fixture(scope="session")
def _stopped_fast_run(tmp_path_factory):
  """The workdir of a ``helpers.FAST`` run stopped after 4 of its 6 steps (checkpoints of steps 2 and 4), trained
  once per pytest process for the tests that damage it and resume it or read it back."""
  from dtnh_jax.train import TrainConfig, loop, presets  # pylint: disable=g-import-not-at-top  # core's tests: no flax
  workdir = tmp_path_factory.mktemp("stopped")
  loop.train(TrainConfig.create(**presets.tiny()), workdir, stop_after=4)
  return workdir


@pytest.fixture
def stopped_run(_stopped_fast_run, tmp_path):
  """``tmp_path`` holding a copy of the FAST run stopped after 4 steps, to damage and resume."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(_stopped_fast_run, tmp_path, dirs_exist_ok=True)
  return tmp_path


@pytest.fixture
def straight_run_results(_straight_fast_run):
  """What ``loop.train`` returned for the ``straight_run``."""
  return _straight_fast_run[1]


@pytest.fixture(scope="module", autouse=True)
def _compiled_programs_freed_after_each_module():
  """jax keeps every program a test module compiled (and its jitted functions' caches) for the life of the
  process: over the suite a pytest worker grew to 7 GB, two of them with their subprocesses past what a 24 GB
  machine holds (a worker crashed in CI). After each module they are dropped; the persistent compilation cache
  above still serves the next module's compilations from disk."""
  yield
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  gc.collect()
