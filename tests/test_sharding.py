"""Scale-out: the same run on 1 device, on 8 (replicated and FSDP) and on 2 processes gives the same model.

The 8-device and 2-process runs need JAX started differently
(``--xla_force_host_platform_device_count``, ``jax.distributed``), so every
run is a subprocess executing this file as a script (``_worker``); they run
concurrently, once per session, and write the final parameters and the
per-step metrics to ``.npz`` files the tests compare. DTNH projects in every
step here (``projection="always"``), so each update depends on the global
inner products ``<g, r>`` and ``|g|²``; with 16 images over 8 devices (2 each)
BatchNorm statistics of a device's shard would be far from the global ones.
The 2-process job is started through ``dtnh-train --coordinator
--num-processes --process-id --fsdp`` and interrupted after 2 of its 4 steps
and resumed; its one-process reference reads the same global batches
(both processes' shards, concatenated).

Tolerances (float32; XLA sums in another order on another number of
devices): ``PARAMETER_TOLERANCE`` and ``METRIC_TOLERANCE``, 1e-5 relative to
max(1, |value|). Measured on a 2-core x86 CPU after 4 steps, max |difference|
of the parameters 1.2e-7 and of the BatchNorm running statistics 2.8e-7 (1 vs
8 devices, each of ``EIGHT_DEVICE_RUNS``) and of either 1.7e-7 (1 vs 2
processes); per-step losses, norms and DTNH's cosine within 3.1e-7 relative.
"""

from __future__ import annotations

import contextlib
import fcntl
import faulthandler
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dtnh_jax.train import presets

METHODS = ("dtnh-knowdist", "dtnh-l2-sp")
# the 8-device runs, (method, layout): KnowDist's regularizer is traced through the source network on the sharded
# batch, L2-SP's is a closed form of the (FSDP-sharded) parameters. L2-SP replicated is left out: the replicated
# layout's sharded parts (the batch: loss, BatchNorm, features; DTNH's inner products of replicated gradients) are
# KnowDist's replicated run's, and its closed form over sharded parameters is L2-SP's FSDP run's. KnowDist FSDP is
# left out too: the 2-process job is KnowDist FSDP (the source network's forward pass over FSDP-sharded reference
# parameters, checked against one process, parameters and per-step metrics), and FSDP over a sharded batch on 8
# devices is L2-SP's FSDP run's; each of these compiled 8-device steps costs ~8 s of CPU with an empty cache
EIGHT_DEVICE_RUNS = (("dtnh-knowdist", "replicated"), ("dtnh-l2-sp", "fsdp"))
# max |difference| of any parameter or BatchNorm statistic after the run, relative to max(1, max |value|)
PARAMETER_TOLERANCE = 1e-5
# difference of the per-step losses, DTNH's cosine and norms, relative to max(1, |value|)
METRIC_TOLERANCE = 1e-5
# per step; DTNH's inner product <g, r> as the cosine <g, r> / (|g| |r|), which has a scale
COMPARED_METRICS = ("loss_empirical", "loss_regularizer", "cosine", "empirical_norm", "regularizer_norm")
TIMEOUT_S = 480

# the offline problem at test size (as TINY in tests/test_train.py), 4 steps, DTNH projecting in every step;
# KnowDist's weight keeps λ|r| below |g|: steps dominated by the feature distance would amplify float rounding
# from step to step. From scratch (``presets.tiny``'s source): what a source is has no part in how a step is
# sharded, and pre-training one cost this module ~9 s of CPU; KnowDist's and L2-SP's |g| and |r| per step
# are those of a source pre-trained for 4 steps (measured: |g| 6.2-7.9, |r| 0.02-0.22 for both)
CONFIG = {**presets.tiny(), "steps": 4, "lr_drop_steps": [3], "knowdist_weight": 0.001, "eval_every": 4,
          "log_every": 4, "checkpoint_every": 4, "projection": "always"}


# ---------------------------------------------------------------------------------------------------------------
# The worker: one process of one run (``python tests/test_sharding.py SPEC.json``).

class _ConcatenatedLoader:
  """The training batches ``count`` processes would read, concatenated in process order, in one process."""

  def __init__(self, loaders):
    self.loaders = loaders

  def __next__(self):
    batches = [next(loader) for loader in self.loaders]
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

  def get_state(self):
    return {"shards": [loader.get_state() for loader in self.loaders]}

  def set_state(self, state):
    for loader, shard_state in zip(self.loaders, state["shards"]):
      loader.set_state(shard_state)


def _as_one_process(config, count: int):
  """``RunData`` that feeds one process the global batches of a ``count``-process run."""
  from dtnh_jax.train.data import RunData, load_data
  shards = [load_data(config, index, count) for index in range(count)]

  def eval_batches():
    for batches in zip(*[shard.eval_batches() for shard in shards]):
      yield {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}

  first = shards[0]
  return RunData(first.name, first.num_classes, first.num_train, first.batch_size,
                 lambda seed: _ConcatenatedLoader([shard.train_loader(seed) for shard in shards]), eval_batches)


def _batchnorm_check(arrays):
  """BatchNorm in train mode on a batch sharded over all devices vs. the same batch on one device."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from dtnh_jax import models
  from dtnh_jax.train import sharding

  model = models.create_model(CONFIG["arch"], num_classes=10, width=CONFIG["width"], small_stem=CONFIG["small_stem"])
  variables = models.init_variables(model, jax.random.PRNGKey(0), 8)
  # each device's two images have their own offset: statistics of one device's rows are far from the global ones
  rng = np.random.default_rng(0)
  images = (rng.normal(0.0, 1.0, (16, 8, 8, 3)) + np.arange(16)[:, None, None, None]).astype(np.float32)
  apply = jax.jit(lambda variables, images: model.apply(variables, images, train=True, mutable=["batch_stats"]))
  mesh = sharding.make_mesh()
  sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec(sharding.DATA_AXIS)))
  one = jax.tree.map(np.asarray, apply(variables, jax.device_put(images, jax.devices()[0])))
  many = jax.tree.map(np.asarray, apply(variables, sharded))
  # with the statistics of the first device's rows alone: those two rows 8 times over have their mean and (biased)
  # variance, and run through the one-device program above instead of compiling another for a batch of 2
  first_shard_logits, _ = apply(variables, jax.device_put(np.tile(images[:2], (8, 1, 1, 1)), jax.devices()[0]))
  relative = lambda a, b: float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
  arrays["bn/devices"] = np.array(len(sharded.sharding.device_set))
  arrays["bn/global_vs_one_device"] = np.array(max(relative(a, b) for a, b in
                                                   zip(jax.tree.leaves(many), jax.tree.leaves(one))))
  arrays["bn/one_shard_vs_global"] = np.array(relative(np.asarray(first_shard_logits)[:2], one[0][:2]))


def _cli_args(config: dict, workdir: str, export: str, distributed: dict) -> list[str]:
  """``dtnh-train`` flags of the offline problem with ``config``'s settings, for one process of a job."""
  from dtnh_jax import cli
  return (["--workdir", workdir, "--export", export, "--no-progress", "--coordinator", distributed["coordinator"],
           "--num-processes", str(distributed["num_processes"]), "--process-id", str(distributed["process_id"])]
          + cli.settings_to_argv({"seed": 0, **{key: value for key, value in config.items() if key != "dataset"}}))


def _worker(spec_path: str) -> None:
  faulthandler.dump_traceback_later(TIMEOUT_S - 20, exit=True)  # a hang shows where, in the log
  with open(spec_path) as f:
    spec = json.load(f)
  import jax
  from dtnh_jax import cli, models
  from dtnh_jax.train import sharding
  from dtnh_jax.train import TrainConfig, grid, loop

  placements = []  # what the loop placed, to count the FSDP-sharded leaves
  create = sharding.Placement.create.__func__
  sharding.Placement.create = classmethod(lambda cls, *a, **k: placements.append(create(cls, *a, **k)) or
                                          placements[-1])

  arrays = {}  # nothing touches the devices before dtnh-train starts jax.distributed
  for run in spec["runs"]:
    config = TrainConfig.from_dict(run["config"])
    export = os.path.join(run["workdir"], "exported")
    started = time.perf_counter()
    if "distributed" in run:  # one process of a job
      workdir = grid.run_dir(run["workdir"], config.source, config.method, config.seed)  # dtnh-train's
      if run.get("interrupt_after"):  # the job is interrupted after these steps, then resumed by dtnh-train
        sharding.initialize_distributed(**run["distributed"])
        stopped = loop.train(config, workdir, stop_after=run["interrupt_after"])
        assert stopped == {"stopped_at": run["interrupt_after"]}
      assert cli.train_main(_cli_args(run["config"], run["workdir"], export, run["distributed"])) == 0
    else:
      data = _as_one_process(config, run["as_processes"]) if run.get("as_processes") else None
      workdir = run["workdir"]
      loop.train(config, workdir, data=data, export_to=export)
    name = run["name"]
    arrays[f"{name}/seconds"] = np.array(time.perf_counter() - started)
    state_shardings = placements[-1].state_shardings
    arrays[f"{name}/sharded_leaves"] = np.array(sum(not s.is_fully_replicated for s in
                                                    jax.tree.leaves(state_shardings.params)))
    variables, _ = models.load_variables(export)  # orbax restores collectively: every process reads
    if not sharding.is_chief():
      continue
    for path, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
      arrays[f"{name}/variables/{jax.tree_util.keystr(path)}"] = np.asarray(value)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    for record in records:
      if record["kind"] == "train":
        record["cosine"] = record["inner_product"] / (record["empirical_norm"] * record["regularizer_norm"])
    for key in COMPARED_METRICS:
      arrays[f"{name}/metrics/{key}"] = np.array([r[key] for r in records if r["kind"] == "train"])
    arrays[f"{name}/logged_steps"] = np.array([r["step"] for r in records if r["kind"] == "train"])
    with open(os.path.join(workdir, "results.json")) as f:
      arrays[f"{name}/test_accuracy"] = np.array(json.load(f)["test_accuracy"])
  if spec.get("batchnorm_check"):
    _batchnorm_check(arrays)
  arrays.update(devices=np.array(jax.device_count()), processes=np.array(jax.process_count()))
  if sharding.is_chief():
    np.savez(spec["out"], **arrays)


# ---------------------------------------------------------------------------------------------------------------
# The runs: started once per session (shared by pytest-xdist workers through a lock), concurrently.

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(spec: dict, directory: str, name: str, devices: int, cache: str) -> subprocess.Popen:
  import dtnh_jax
  spec_path = os.path.join(directory, f"{name}.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "DTNH_JAX_CACHE": cache,
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
         # the dtnh_jax this test imported, whether installed or not
         "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(dtnh_jax.__file__)),
                                                     os.environ.get("PYTHONPATH")]))}
  with open(os.path.join(directory, f"{name}.log"), "w") as log:  # the child keeps its own descriptor
    return subprocess.Popen([sys.executable, __file__, spec_path], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=directory)


def _runs(directory, config: dict, methods, **changes) -> list[dict]:
  return [{"name": method, "workdir": os.path.join(directory, f"{method}-{'-'.join(changes) or 'plain'}"),
           "config": {**config, "method": method, **changes}} for method in methods]


def _run_all(directory: str) -> dict[str, dict]:
  cache = os.path.join(directory, "cache")
  parts = {  # part -> (spec, devices of each process)
      # the reference of the 2-process run is not FSDP: on one device that is the same, and the
      # run reuses the compiled step of the first one
      "one_device": ({"runs": _runs(directory, CONFIG, METHODS)
                      + [{**run, "name": "as_two_processes", "as_processes": 2,
                          "workdir": run["workdir"] + "-as-two-processes"}
                         for run in _runs(directory, CONFIG, ["dtnh-knowdist"])]}, [1]),
      "eight_devices": ({"runs": _runs(directory, CONFIG, [m for m, layout in EIGHT_DEVICE_RUNS if layout != "fsdp"])
                         + [{**run, "name": run["name"] + "/fsdp"} for run in _runs(
                             directory, CONFIG, [m for m, layout in EIGHT_DEVICE_RUNS if layout == "fsdp"], fsdp=True)],
                         "batchnorm_check": True}, [8]),
      "two_processes": ({"runs": [{**run, "name": "as_two_processes", "interrupt_after": 2}
                                  for run in _runs(directory, CONFIG, ["dtnh-knowdist"], fsdp=True)]}, [1, 1]),
  }
  processes = {}
  coordinator = f"localhost:{_free_port()}"
  started = time.monotonic()
  for part, (spec, devices) in parts.items():
    part_dir = os.path.join(directory, part)
    os.makedirs(part_dir, exist_ok=True)
    spec = {**spec, "out": os.path.join(part_dir, "result.npz"),
            "runs": [{**run, "workdir": os.path.join(part_dir, os.path.basename(run["workdir"]))}
                     for run in spec["runs"]]}
    for process_id, count in enumerate(devices):
      if len(devices) > 1:  # one process of a job, started through dtnh-train's flags
        distributed = {"coordinator": coordinator, "num_processes": len(devices), "process_id": process_id}
        spec = {**spec, "runs": [{**run, "distributed": distributed} for run in spec["runs"]]}
      processes[(part, process_id)] = _start(spec, part_dir, f"process{process_id}", count, cache)
  deadline = started + TIMEOUT_S
  outcome = {part: {"seconds": None, "error": None} for part in parts}
  for (part, process_id), process in processes.items():
    try:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      outcome[part]["error"] = outcome[part]["error"] or f"process {process_id} timed out after {TIMEOUT_S} s"
    if process.returncode != 0 and outcome[part]["error"] is None:
      outcome[part]["error"] = f"process {process_id} exited with {process.returncode}"
    outcome[part]["seconds"] = time.monotonic() - started
  for part in parts:
    if outcome[part]["error"] is not None:
      part_dir = os.path.join(directory, part)
      for name in sorted(os.listdir(part_dir)):
        if name.endswith(".log"):
          with open(os.path.join(part_dir, name)) as f:
            outcome[part]["error"] += f"\n--- {name} (end) ---\n" + f.read()[-3000:]
  with open(os.path.join(directory, "outcome.json"), "w") as f:
    json.dump(outcome, f)
  return outcome


@contextlib.contextmanager
def _locked(path: str):
  with open(path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def scale_out(tmp_path_factory, worker_id):
  """``part -> loaded .npz`` for the three parts (one device, eight devices, two processes)."""
  shared = tmp_path_factory.getbasetemp()
  if worker_id != "master":  # pytest-xdist: one directory for all workers of this session
    shared = shared.parent
  directory = os.path.join(shared, "scale-out")
  os.makedirs(directory, exist_ok=True)
  with _locked(os.path.join(directory, "lock")):
    outcome_path = os.path.join(directory, "outcome.json")
    if os.path.exists(outcome_path):
      with open(outcome_path) as f:
        outcome = json.load(f)
    else:
      outcome = _run_all(directory)

  def part(name: str) -> dict[str, np.ndarray]:
    if outcome[name]["error"] is not None:
      pytest.fail(f"the {name} run failed: {outcome[name]['error']}")
    with np.load(os.path.join(directory, name, "result.npz")) as loaded:
      return dict(loaded)

  return part


@pytest.fixture(scope="session")
def worker_id(request):
  """pytest-xdist's worker id, ``"master"`` without xdist."""
  workerinput = getattr(request.config, "workerinput", None)
  return "master" if workerinput is None else workerinput["workerid"]


def _max_relative_difference(ours: dict, theirs: dict, prefix_ours: str, prefix_theirs: str, kind: str) -> float:
  keys = sorted(k[len(prefix_ours) + 1:] for k in ours if k.startswith(f"{prefix_ours}/{kind}/"))
  assert keys, f"no {kind} under {prefix_ours}"
  worst = 0.0
  for key in keys:
    a, b = ours[f"{prefix_ours}/{key}"], theirs[f"{prefix_theirs}/{key}"]
    assert a.shape == b.shape, key
    worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / max(1.0, float(np.max(np.abs(b), initial=0.0))))
  return worst


# ---------------------------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.slow
@pytest.mark.parametrize("method,layout", EIGHT_DEVICE_RUNS)
def test_eight_devices_train_the_same_model_as_one(scale_out, method, layout, record_property):
  one, eight = scale_out("one_device"), scale_out("eight_devices")
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  name = method if layout == "replicated" else f"{method}/fsdp"
  difference = _max_relative_difference(eight, one, name, method, "variables")
  record_property("max_relative_parameter_difference", difference)
  print(f"{method} {layout}: 1 vs 8 devices, max |difference| of the variables {difference:.3g} (relative)")
  assert difference <= PARAMETER_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_dtnh_inner_products_and_losses_are_global_over_the_mesh(scale_out, method):
  one, eight = scale_out("one_device"), scale_out("eight_devices")
  layouts = [layout for m, layout in EIGHT_DEVICE_RUNS if m == method]
  for name in [method if layout == "replicated" else f"{method}/fsdp" for layout in layouts]:
    assert _max_relative_difference(eight, one, name, method, "metrics") <= METRIC_TOLERANCE, name


@pytest.mark.slow
def test_fsdp_shards_parameters_and_replicated_layout_does_not(scale_out):
  eight = scale_out("eight_devices")
  for method, layout in EIGHT_DEVICE_RUNS:
    if layout == "replicated":
      assert int(eight[f"{method}/sharded_leaves"]) == 0
    else:
      assert int(eight[f"{method}/fsdp/sharded_leaves"]) > 0


@pytest.mark.slow
def test_batchnorm_statistics_are_over_the_global_batch(scale_out):
  eight = scale_out("eight_devices")
  assert int(eight["bn/devices"]) == 8
  # logits and running statistics (measured 1.7e-6 relative: inputs up to 16 give large activations)
  assert float(eight["bn/global_vs_one_device"]) <= 1e-4
  assert float(eight["bn/one_shard_vs_global"]) > 0.1  # per-device statistics would be far off


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(scale_out, record_property):
  one, two = scale_out("one_device"), scale_out("two_processes")
  assert int(two["processes"]) == 2 and int(two["devices"]) == 2
  assert int(two["as_two_processes/sharded_leaves"]) > 0  # FSDP across the processes
  difference = _max_relative_difference(two, one, "as_two_processes", "as_two_processes", "variables")
  record_property("max_relative_parameter_difference", difference)
  print(f"1 vs 2 processes: max |difference| of the variables {difference:.3g} (relative)")
  assert difference <= PARAMETER_TOLERANCE
  assert _max_relative_difference(two, one, "as_two_processes", "as_two_processes", "metrics") <= METRIC_TOLERANCE
  assert float(two["as_two_processes/test_accuracy"]) == pytest.approx(float(one["as_two_processes/test_accuracy"]))
  assert two["as_two_processes/logged_steps"].tolist() == [1, 2, 3, 4]  # interrupted after 2, resumed


# ---------------------------------------------------------------------------------------------------------------
# Cheap checks in this process.

def test_fsdp_shards_the_largest_divisible_axis_of_large_leaves():
  from jax.sharding import PartitionSpec as P
  from dtnh_jax.train.sharding import fsdp_spec
  assert fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, "data")
  assert fsdp_spec((3, 3, 128, 64), 8) == P(None, None, "data", None)
  assert fsdp_spec((1000, 10), 8) == P("data", None)
  assert fsdp_spec((1001, 10), 8) == P()        # no divisible axis
  assert fsdp_spec((64,), 8) == P()             # too small to be worth an all-gather
  assert fsdp_spec((4096,), 8, min_size=0) == P("data")
  assert fsdp_spec((3, 3, 64, 128), 1) == P()   # one device: nothing to shard


def test_batch_size_must_split_over_the_devices():
  from dtnh_jax.train import ConfigError
  from dtnh_jax.train.sharding import Placement

  class ThreeDevices:  # only the mesh's size matters to the check
    shape = {"data": 3}

  with pytest.raises(ConfigError, match="divisible by the number of devices"):
    Placement.create({"x": np.zeros(3)}, {"y": np.zeros(2)}, batch_size=16, mesh=ThreeDevices())


def test_single_process_start_up_initializes_nothing(monkeypatch):
  from dtnh_jax.train import sharding
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(name, raising=False)
  assert not sharding.initialize_distributed()
  assert not sharding.initialize_distributed(num_processes=1)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not sharding.initialize_distributed()


def test_cluster_environments_are_detected(monkeypatch):
  from dtnh_jax.train import sharding
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding.cluster_detected()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
  assert sharding.cluster_detected()


@pytest.mark.parametrize("args,message", [
    (["--num-processes", "0"], "--num-processes must be positive"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2)"),
    (["--num-processes", "2", "--process-id", "0"], "coordinator"),  # no cluster to take it from
])
def test_bad_multi_host_flags_exit_with_code_2_and_a_message(args, message, capsys, tmp_path, monkeypatch):
  from dtnh_jax import cli
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.train_main(args + ["--workdir", str(tmp_path)])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


if __name__ == "__main__":
  sys.modules["tensorboardX"] = None  # as helpers.TRAIN_ENTRY: importing it imports torch, a second per process
  _worker(sys.argv[1])
