"""Data parallelism over a mesh of devices, and multi-host start-up.

The train step is the same function on one CPU, one GPU or a pod: only the
shardings of its arguments change. :class:`Placement` holds them:

- the **mesh** has one axis, ``data``, over all devices (``jax.devices()``,
  every process's);
- a **batch** is sharded over ``data`` on its batch axis; each process
  contributes its own rows (``jax.make_array_from_process_local_data``), so
  the model sees one global batch;
- the **train state** and the **reference** are replicated by default; with
  ``fsdp=True`` each parameter, each optimizer-state leaf and each reference
  parameter is sharded over ``data`` along its largest axis divisible by the
  number of devices (leaves smaller than ``min_shard_size`` elements, or with
  no such axis, stay replicated).

The step is jitted with explicit ``in_shardings`` and ``out_shardings``
rather than left to sharding propagation: the state leaves the step with the
layout it came in with, so it is donated in place and the step never
recompiles; a batch or state placed otherwise is an error, not a silent
reshard. Everything global follows from jit: gradients are global arrays, so
DTNH's inner products ``<g, g>``, ``<g, r>``, ``<r, r>`` reduce over the whole
mesh, and BatchNorm's batch statistics are means over the global batch
(``tests/test_sharding.py`` checks both against one device).

Multi-host: :func:`initialize_distributed` starts ``jax.distributed`` from
``--coordinator``/``--num-processes``/``--process-id`` or, without them,
from what SLURM, Open MPI or a Cloud TPU pod set in the environment. Each
process then reads its own shard of the data
(``load_data(config, jax.process_index(), jax.process_count())``) and only
process 0 writes metrics, reports and plots; orbax checkpoints are written by
all processes together (each its own shards, process 0 the metadata) and
need a directory that every process sees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dtnh_jax.train.config import ConfigError

__all__ = [
    "cluster_detected",
    "DATA_AXIS",
    "fsdp_shardings",
    "fsdp_spec",
    "initialize_distributed",
    "is_chief",
    "local_data_state",
    "make_mesh",
    "MIN_SHARD_SIZE",
    "Placement",
    "process_shard",
    "put",
    "sync",
    "to_host",
]

PyTree = Any

#: The mesh axis the batch (and, with FSDP, the parameters) is split over.
DATA_AXIS = "data"

#: Leaves with fewer elements stay replicated under FSDP: sharding them saves
#: little memory and costs one all-gather each.
MIN_SHARD_SIZE = 1024

# Environment variables that announce a multi-process job jax.distributed can
# configure itself from (jax's cluster auto-detection reads the rest).
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def cluster_detected() -> bool:
  """Whether the environment announces a job of several processes (see :func:`initialize_distributed`)."""
  for name in _CLUSTER_SIZE_VARIABLES:
    value = os.environ.get(name, "")
    if value.isdigit() and int(value) > 1:
      return True
  # multi-host Cloud TPU slices list their hosts, comma-separated
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "," in os.environ.get("TPU_PROCESS_ADDRESSES", "")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts ``jax.distributed`` when this is one process of several; call it before any JAX computation.

  With any argument given, the missing ones are left to jax's cluster
  detection. Without arguments it initializes only when the environment says
  the job has several processes (``SLURM_NTASKS`` or ``OMPI_COMM_WORLD_SIZE``
  > 1, a multi-host Cloud TPU slice: ``TPU_WORKER_HOSTNAMES`` or
  ``TPU_PROCESS_ADDRESSES`` lists several hosts), and then lets
  ``jax.distributed.initialize()`` read everything from there. Elsewhere
  (e.g. Kubernetes) pass the arguments. On CPU, cross-process collectives use
  gloo (jax's default).

  Args:
    coordinator: ``host:port`` of process 0's coordination service.
    num_processes: number of processes in the job.
    process_id: this process's index, in ``[0, num_processes)``.

  Returns:
    Whether ``jax.distributed`` is initialized (also when it already was: then nothing is done).
  """
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit and num_processes == 1:
    return False
  if not explicit and not cluster_detected():
    return False
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def is_chief() -> bool:
  """Whether this process writes the run's files (metrics, reports, plots): process 0."""
  return jax.process_index() == 0


def process_shard() -> tuple[int, int]:
  """``(shard_index, shard_count)`` of this process's data: ``load_data(config, *process_shard())``."""
  return jax.process_index(), jax.process_count()


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = MIN_SHARD_SIZE) -> PartitionSpec:
  """``data`` on the largest axis of ``shape`` divisible by ``num_shards`` (the last one on ties), else replicated."""
  if num_shards <= 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  divisible = [(size, axis) for axis, size in enumerate(shape) if size % num_shards == 0]
  if not divisible:
    return PartitionSpec()
  _, axis = max(divisible)
  return PartitionSpec(*[DATA_AXIS if i == axis else None for i in range(len(shape))])


def fsdp_shardings(tree: PyTree, mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> PyTree:
  """The FSDP sharding of every leaf of ``tree`` (see :func:`fsdp_spec`)."""
  count = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), count, min_size)), tree)


def _replicated_tree(tree: PyTree, mesh: Mesh) -> PyTree:
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda _: replicated, tree)


def _host_value(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def to_host(tree: PyTree) -> PyTree:
  """NumPy copies of the global values of ``tree`` on every process (a collective with several processes)."""
  return jax.tree.map(_host_value, tree)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
  """Global arrays of ``tree`` laid out as ``shardings``; with several processes, process 0's values.

  ``tree`` holds host or single-device values; every process calls this with
  the same structure and shapes. Taking process 0's values guarantees that
  replicas agree even where processes computed them differently (e.g. from
  their own data shard).
  """
  if jax.process_count() > 1:
    tree = multihost_utils.broadcast_one_to_all(tree)

  def place(leaf, sharding):
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(place, tree, shardings)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live on the mesh, and its steps jitted accordingly (see the module docstring)."""

  mesh: Mesh
  state_shardings: PyTree
  reference_shardings: PyTree
  fsdp: bool = False

  @classmethod
  def create(cls, state: PyTree, reference: PyTree, *, fsdp: bool = False, batch_size: int | None = None,
             mesh: Mesh | None = None, min_shard_size: int = MIN_SHARD_SIZE) -> "Placement":
    """The placement of ``state`` (a ``TrainState``) and ``reference`` (a ``Reference``) on ``mesh``.

    Raises:
      ConfigError: the global ``batch_size`` does not split evenly over the devices.
    """
    mesh = make_mesh() if mesh is None else mesh
    devices = mesh.shape[DATA_AXIS]
    if batch_size is not None and batch_size % devices:
      raise ConfigError(f"--batch-size {batch_size} must be divisible by the number of devices ({devices}): "
                        "the batch is split evenly over them.")
    state_shardings = _replicated_tree(state, mesh)
    reference_shardings = _replicated_tree(reference, mesh)
    if fsdp:
      state_shardings = state_shardings.replace(params=fsdp_shardings(state.params, mesh, min_shard_size),
                                                opt_state=fsdp_shardings(state.opt_state, mesh, min_shard_size))
      # the reference's parameters (L2-SP's w0, the frozen source network) as the parameters
      reference_shardings = reference_shardings._replace(variables=jax.tree_util.tree_map_with_path(
          lambda path, leaf: NamedSharding(mesh, fsdp_spec(np.shape(leaf), devices, min_shard_size))
          if getattr(path[0], "key", None) == "params" else NamedSharding(mesh, PartitionSpec()),
          reference.variables))
    return cls(mesh, state_shardings, reference_shardings, fsdp)

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def put_state(self, state: PyTree) -> PyTree:
    return put(state, self.state_shardings)

  def put_reference(self, reference: PyTree) -> PyTree:
    return put(reference, self.reference_shardings)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> the global batch, sharded over ``data``.

    An evaluation batch (one with ``mask``) is padded with masked-out rows to
    a multiple of this process's devices; a training batch must divide.
    """
    local_devices = len(self.mesh.local_devices)
    rows = len(batch["label"])
    if rows % local_devices:
      if "mask" not in batch:
        raise ConfigError(f"a batch of {rows} rows per process does not split over {local_devices} local devices.")
      pad = local_devices - rows % local_devices
      batch = {key: np.concatenate([value, np.zeros((pad,) + value.shape[1:], value.dtype)])
               for key, value in batch.items()}  # mask pads with False
    sharding = self.batch_sharding
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}

  def jit_train_step(self, train_step):
    """``train_step(state, batch, reference) -> (state, metrics)`` on the mesh; the state is donated."""
    return jax.jit(train_step, in_shardings=(self.state_shardings, self.batch_sharding, self.reference_shardings),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

  def jit_eval_step(self, eval_step):
    """``eval_step(state, batch) -> sums`` on the mesh, the sums replicated (readable on every process).

    Compiled on the state's ``params`` and ``batch_stats`` alone (``eval_step`` reads nothing else of it): the
    runs of one model share the program whatever their optimizer state, that is whatever their method."""
    on_variables = jax.jit(_on_variables(eval_step), out_shardings=self.replicated, in_shardings=(
        self.state_shardings.params, self.state_shardings.batch_stats, self.batch_sharding))
    return lambda state, batch: on_variables(state.params, state.batch_stats, batch)


class _Variables(NamedTuple):
  """What an eval step reads of a train state."""
  params: Any
  batch_stats: Any


@functools.lru_cache(maxsize=16)
def _on_variables(eval_step):
  # one function object per eval step, so that jax's trace cache serves every run that evaluates with it
  return lambda params, batch_stats, batch: eval_step(_Variables(params, batch_stats), batch)


def local_data_state(data_state: dict[str, Any]) -> dict[str, Any]:
  """A checkpointed data-loader state made this process's.

  Orbax writes JSON from process 0 only, so the checkpoint holds process 0's
  loader state; processes step in lockstep, so the others differ only in
  their shard index.
  """
  if jax.process_count() == 1 or "config" not in data_state:
    return data_state
  return {**data_state, "config": {**data_state["config"], "shard_index": jax.process_index()}}
