"""The benchmark scripts run end to end and end with their JSON line (tiny sizes; no timing checks).

Each script runs as ``python benchmarks/NAME.py ...`` runs it: its file executed as ``__main__`` with that command
line (``runpy``), its top-level code and entry point included, here in this interpreter: a fresh Python would
import jax, flax (and torch) again and trace and compile what this process's persistent compilation cache
(tests/conftest.py) already holds. Two run in a process of their own, because a fresh process is what they
measure: ``step_memory`` (``DTNH_JAX_KEEP_FREED_MEMORY`` acts before JAX starts) and ``lambda_vmap`` (its own XLA
optimization level). Compiling a ResNet train step dominates their cost on a CPU (seconds per step), so each smoke
run compiles few steps: DELTA's five variants (it uses all that the others use: the source network's features, the
attention, a traced regularizer), which the GPU check's DELTA steps then load from the compilation cache, and the
L2-SP pair of the PyTorch comparison's check.
"""

import argparse
import collections
import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
TIMEOUT_S = 300
# ResNet-10 (one block per stage): the layers of the ResNet-18 the scripts measure, a third less to compile
TINY = ["--size", "16", "--batch", "2", "--arch", "resnet10", "--width", "0.125"]
# The suite's compile settings (tests/conftest.py) reach the scripts through the environment: XLA's optimization
# level 0 without its expensive passes, what JAX_DISABLE_MOST_OPTIMIZATIONS=1 would set (and, being set apart from
# XLA_FLAGS, key the persistent compilation cache apart from every other program of the suite).
SMOKE_ENV = {"JAX_PLATFORMS": "cpu"}


def run_benchmark(name, *args, env=None):
  """The printed lines of the script run in a process of its own (``env``: variables set on top of
  :data:`SMOKE_ENV`); fails the test with its stderr if it exits non-zero."""
  process = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
                           env={**os.environ, **SMOKE_ENV, **(env or {})}, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
  assert process.returncode == 0, f"{name} failed:\n{process.stderr[-4000:]}"
  return process.stdout.strip().splitlines()


@pytest.fixture
def run_script(monkeypatch, capsys):
  """``run_script(name, *args)``: the printed lines of ``python benchmarks/NAME.py ARGS`` run in this process:
  the file executed as ``__main__`` with that ``sys.argv`` (a non-zero exit raises ``SystemExit``); the
  ``sys.path`` entry and the environment variables it sets are removed after it."""
  monkeypatch.setattr(sys, "path", list(sys.path))

  def run(name, *args):
    script = BENCHMARKS / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    capsys.readouterr()
    environment = dict(os.environ)
    try:
      runpy.run_path(str(script), run_name="__main__")
    finally:
      for key in set(os.environ) - set(environment):
        del os.environ[key]
      os.environ.update(environment)
    return capsys.readouterr().out.strip().splitlines()

  return run


def import_benchmark(name):
  sys.path.insert(0, str(BENCHMARKS))
  try:
    return __import__(name)
  finally:
    sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_train_step_overhead_prints_a_table_and_ends_with_the_ratios_as_json(run_script):
  lines = run_script("train_step_overhead", *TINY, "--repeats", "1", "--block", "1", "--regularizers", "delta")
  result = json.loads(lines[-1])
  variants = {"plain", "angles", "dtnh", "naive", "separate", "summed"}
  for key in ("delta", "delta_naive_vs_summed", "delta_separate_vs_dtnh", "delta_plain_vs_summed",
              "delta_dtnh_vs_angles"):
    assert result[key] > 0
  for key in ("delta_ms", "delta_compile_s", "delta_peak_mib", "delta_convolutions", "delta_instructions"):
    assert set(result[key]) == variants
  assert all(count > 0 for count in result["delta_instructions"].values())
  assert any("median ms" in line for line in lines) and any("dtnh/summed" in line for line in lines)
  assert result["config"]["arch"] == "resnet10" and any(line.startswith("resnet10 width") for line in lines)


def test_program_counts_are_unknown_not_negative_where_the_backend_gives_no_text():
  class NoText:
    def as_text(self):
      raise NotImplementedError("this backend prints no program")

  assert import_benchmark("train_step_overhead").count_ops(NoText()) == (None, None)


def test_step_profile_puts_a_compiled_programs_operations_in_their_classes():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  profile = import_benchmark("step_profile")

  def loss(x, kernel, weights):
    y = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                                              "NHWC")))
    return jnp.sum(y.reshape(2, -1) @ weights)

  x, kernel, weights = jnp.ones((2, 10, 10, 3)), jnp.ones((3, 3, 3, 4)), jnp.ones((400, 5))
  program = profile.operations(jax.jit(jax.grad(loss, argnums=(1, 2))).lower(x, kernel, weights).compile().as_text())
  by_class = collections.defaultdict(list)
  for name, operation in program.items():
    by_class[profile.classify(operation)].append(name)
  # the forward convolution's window is the kernel's; the kernel's gradient's covers the 10x10 map
  assert by_class["convolution, forward"] and by_class["convolution, kernel gradient"], dict(by_class)
  assert by_class["matmul, forward"] or by_class["matmul, backward"], dict(by_class)
  forward = by_class["convolution, forward"][0]
  assert profile.totals({forward: 3000.0, "not-in-the-program": 7.0}, program, steps=2) == {
      "convolution, forward": 1.5}


@pytest.mark.slow
def test_step_memory_runs_tiny_and_records_whether_freed_memory_was_kept():
  import platform  # pylint: disable=g-import-not-at-top
  result = json.loads(run_benchmark("step_memory", *TINY, "--steps", "2", "--warmup", "1",
                                    env={"DTNH_JAX_KEEP_FREED_MEMORY": "1"})[-1])
  assert result["minor_faults_per_step"] >= 0 and result["wall_ms_per_step"] > 0
  assert result["resident_mib"] > 0 and result["peak_resident_mib"] > 0
  assert result["config"]["keeps_freed_memory"] is (platform.libc_ver()[0] == "glibc")


def test_step_profile_runs_tiny_and_ends_with_the_classes_as_json(run_script):
  result = json.loads(run_script("step_profile", *TINY, "--steps", "1", "--top", "3")[-1])
  assert result["step_ms"] > 0 and len(result["top"]) == 3
  assert any(name.startswith("convolution") for name in result["classes_ms"]), result["classes_ms"]
  assert all(row["class"] in result["classes_ms"] for row in result["top"])


def test_train_step_overhead_measures_every_regularizer_by_default():
  assert set(import_benchmark("train_step_overhead").REGULARIZERS) == {"l2", "l2sp", "knowdist", "delta"}


@pytest.mark.parametrize("variants", ["plain,summed", "dtnh,summed,fast"])
def test_train_step_overhead_refuses_variants_without_the_headline_pair(variants, capsys):
  with pytest.raises(SystemExit) as exit_info:
    import_benchmark("train_step_overhead").main(["--variants", variants])
  assert exit_info.value.code == 2 and "--variants must name" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_runs_small_on_a_cpu_and_ends_with_json(run_script):
  # DELTA: the plain, DTNH and summed steps that train_step_overhead's smoke run compiled, the same programs
  lines = run_script("gpu_check", "--small", *TINY, "--steps", "1", "--rounds", "1", "--methods", "delta")
  result = json.loads(lines[-1])
  assert result["delta"] > 0 and result["delta_vs_plain"] > 0
  assert set(result["images_per_s"]) == {"delta", "dtnh-delta", "delta (summed)"}
  assert result["platform"] == "cpu" and result["config"]["size"] == 16 and result["config"]["arch"] == "resnet10"


@pytest.mark.slow
def test_peer_torch_check_finds_both_frameworks_compute_the_same_step(run_script):
  torch = pytest.importorskip("torch")
  # one method, the check only: both frameworks' updates from the same weights, w0 moved so that L2-SP's term is
  # as large as the loss's gradient and DTNH projects (32x32, batch 8: float32 BatchNorm is still reliable; a quarter
  # of the channels: the same layers, a third less time)
  threads = torch.get_num_threads()
  try:
    lines = run_script("peer_torch", "--size", "32", "--batch", "8", "--width", "0.25", "--regularizers", "l2sp",
                       "--jax-variants", "summed,dtnh", "--check-only")
  finally:
    torch.set_num_threads(threads)  # the script sets PyTorch's threads for its process: here, this one's
  result = json.loads(lines[-1])
  assert result["check_ok"]
  checked = result["check"]["l2sp"]
  assert checked["jax dtnh vs torch dtnh"]["update"] < 1e-3
  # the check can see a wrong term: DTNH and the regularizer each move the update far more than the tolerance
  assert checked["dtnh_conflict"] == 1.0 and checked["dtnh_share"] > 0.1 and checked["regularizer_share"] > 0.1


def test_peer_torch_refuses_an_unknown_regularizer(capsys):
  pytest.importorskip("torch")
  with pytest.raises(SystemExit) as exit_info:
    import_benchmark("peer_torch").main(["--regularizers", "delta"])
  assert exit_info.value.code == 2 and "unknown regularizer" in capsys.readouterr().err


def test_gpu_check_suite_runs_every_part_and_keeps_going_past_a_failure(monkeypatch, capsys):
  gpu_check = import_benchmark("gpu_check")
  calls = []

  def fake(name, outcome):
    def main(argv):
      calls.append((name, argv))
      if isinstance(outcome, BaseException):
        raise outcome
      return outcome
    return main

  sys.path.insert(0, str(BENCHMARKS))
  try:
    modules = {name: __import__(name) for name in ("train_step_overhead", "transform_overhead",
                                                    "aggregator_overhead")}
  finally:
    sys.path.remove(str(BENCHMARKS))
  monkeypatch.setattr(modules["train_step_overhead"], "main", fake("train_step_overhead", {"l2sp": 1.0}))
  monkeypatch.setattr(modules["transform_overhead"], "main", fake("transform_overhead", RuntimeError("no memory")))
  monkeypatch.setattr(modules["aggregator_overhead"], "main", fake("aggregator_overhead", {"tree": {}}))
  monkeypatch.setitem(sys.modules, "peer_torch", None)  # as where torch is not installed: the import fails
  monkeypatch.setattr(sys, "path", [str(BENCHMARKS)] + sys.path)
  parts = gpu_check.run_suite(gpu_check.SUITE, argparse.Namespace(size=32, batch=4, arch="resnet18", width=0.125,
                                                                            rounds=2))
  assert [name for name, _ in calls] == ["train_step_overhead", "transform_overhead", "aggregator_overhead"]
  assert calls[0][1][:4] == ["--size", "32", "--batch", "4"]
  assert parts["train_step"] == {"l2sp": 1.0} and parts["aggregators"] == {"tree": {}}
  assert "no memory" in parts["transform"]["error"]
  assert "skipped" in parts["peer_torch"]


def test_gpu_check_refuses_an_unknown_suite_part(capsys):
  with pytest.raises(SystemExit) as exit_info:
    import_benchmark("gpu_check").main(["--suite", "train_step,nonsense"])
  assert exit_info.value.code == 2 and "unknown --suite part" in capsys.readouterr().err


@pytest.mark.slow
def test_correction_overhead_runs_tiny_and_ends_with_each_variants_time_and_memory(run_script):
  lines = run_script("correction_overhead", "--tiny", "--repeats", "2", "--block", "1", "--memory", "3")
  result = json.loads(lines[-1])
  assert set(result) == {"dtnh", "bound", "dtnh+bound", "dtnh+bound(avg)", "ema", "ema+guard", "subspace(3)",
                         "g + λr"}
  assert result["dtnh"]["vs_dtnh"] == 1.0 and all(entry["ms"] > 0 for entry in result.values())
  # memory: the moving average is one copy of the parameters; a memory of K directions, a ring of K slots
  assert result["ema"]["state_vs_params"] == pytest.approx(1.0, abs=0.05)
  assert result["dtnh+bound(avg)"]["state_vs_params"] == pytest.approx(1.0, abs=0.05)
  assert result["subspace(3)"]["state_vs_params"] == pytest.approx(3.0, abs=0.05)


def test_lambda_vmap_compares_steps_that_compute_the_same_update():
  """The vmapped step over K λ gives, slice by slice, the K single steps' parameters: the timing compares like
  with like. Compiled at XLA's backend optimization level 1 in a process of its own: at the suite's level 0
  (tests/conftest.py), XLA:CPU 0.10.2 computed the vmapped step's early-layer updates 3% away from the single
  steps' on an Intel Xeon (AVX-512) host, and within 1.2e-7 at levels 1-3."""
  level = "--xla_backend_optimization_level"
  flags = " ".join([flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(level)]
                   + [f"{level}=1"])
  lines = run_benchmark("lambda_vmap", "--preset", "tiny", "--reg-weights", "0.1,10", "--check",
                        env={"XLA_FLAGS": flags, "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"})  # that flag means level 0
  result = json.loads(lines[-1])
  assert result["max_relative_difference"] < 1e-5
  assert result["lambdas_differ"]


def test_conv_formulations_maxpool_times_both_formulations_and_ends_with_json(capsys):
  result = import_benchmark("conv_formulations").main(["maxpool", "--size", "16", "--batch", "2", "--channels", "4",
                                                       "--repeats", "2"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert set(result["ms"]) == {"xla", "shifted"} and result["input"] == [2, 8, 8, 4]
  assert result["shifted_over_xla"][0] > 0 and result["chosen_here"] == "shifted"
