"""``dtnh_jax.host_memory``: XLA:CPU's freed memory kept for the next execution, so that it faults in no pages.

Each case that needs a fresh process (glibc's arenas are chosen by a thread's first allocation) runs one: a
jitted program with three 36 MB temporaries, run 24 times (kept, the heap settles within about 20 calls), then
seven times, each call's minor page faults counted (``resource.getrusage``); the median call's is compared
(while the heap settles, a call now and then faults in its pages anew: ``dtnh_jax.host_memory``). Measured on a
2-core AMD EPYC, glibc 2.36, jax 0.10.2: 26,400 faults per call as glibc and XLA leave it, 0 with
:func:`keep_freed_memory` called first.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap
import warnings

import pytest

from dtnh_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

_FAULTS = textwrap.dedent("""
    import json, resource, sys
    from dtnh_jax import host_memory
    kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
    import jax, jax.numpy as jnp
    x = jnp.ones((2, 9_000_000), jnp.float32)
    # 36 MB intermediates that XLA keeps in its temporary buffers (x's rows, each through sin and cos): each above
    # glibc's largest mmap threshold (32 MiB), so mapped afresh by every call unless the freed memory is kept
    program = jax.jit(lambda x: jnp.sum(jnp.sin(x[0]) * jnp.cos(x[1])) + jnp.sum(jnp.cos(x[0] + x[1])))
    for _ in range(24):
      program(x).block_until_ready()
    faults = []
    for _ in range(7):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      program(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(faults)[3]  # the median call: the heap may still grow once in a while (see host_memory)
    late = host_memory.keep_freed_memory() if sys.argv[1] == "default" else None  # too late: JAX has started
    print(json.dumps({"kept": kept, "late": late, "faults_per_call": faults}))
""")


def _faults(mode: str) -> dict:
  done = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]
  return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.fixture(scope="module")
def runs():
  """``{"default": ..., "keep": ...}``: one process each (the default one also calls it late, at its end)."""
  if not GLIBC:
    pytest.skip("mallopt is glibc's")
  return {mode: _faults(mode) for mode in ("default", "keep")}


def test_kept_memory_is_reused_by_the_next_execution_without_page_faults(runs):
  default, kept = runs["default"], runs["keep"]
  assert kept["kept"] is True and "RuntimeWarning" not in kept["stderr"]
  # 108 MB of temporaries are 26,000 pages of 4 KiB or more; kept, the next call maps none afresh
  assert default["faults_per_call"] > 10_000
  assert kept["faults_per_call"] < default["faults_per_call"] / 100


def test_called_after_jax_started_it_changes_nothing_and_says_why(runs):
  assert runs["default"]["late"] is False
  assert "after JAX started its backends" in runs["default"]["stderr"]
  assert "before the first JAX computation" in runs["default"]["stderr"]


def test_on_another_c_library_it_does_nothing(monkeypatch):
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
  monkeypatch.setattr(host_memory, "_kept", False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("environment, plugins, expected", [
    ({}, [], False),                                                          # not asked for
    ({"DTNH_JAX_KEEP_FREED_MEMORY": "1"}, [], True),                          # asked, no accelerator plugin
    ({"DTNH_JAX_KEEP_FREED_MEMORY": "1"}, ["jax_cuda12_plugin"], False),      # JAX's default is the GPU
    ({"DTNH_JAX_KEEP_FREED_MEMORY": "1", "JAX_PLATFORMS": "cpu"}, ["jax_cuda12_plugin"], True),
    ({"DTNH_JAX_KEEP_FREED_MEMORY": "1", "JAX_PLATFORMS": "cuda,cpu"}, [], False),
    ({"DTNH_JAX_KEEP_FREED_MEMORY": "0", "JAX_PLATFORMS": "cpu"}, [], False),
])
def test_dtnh_train_keeps_it_when_asked_and_on_the_cpu(monkeypatch, environment, plugins, expected):
  for name in ("JAX_PLATFORMS", host_memory.ENVIRONMENT_VARIABLE):
    monkeypatch.delenv(name, raising=False)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: object() if name in plugins else None)
  assert host_memory.wanted() is expected


def test_dtnh_train_keeps_freed_memory_before_its_first_computation(monkeypatch, tmp_path):
  from dtnh_jax import cli  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(host_memory, "wanted", lambda: True)
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append("kept") or True)

  def start_distributed(args):  # the first thing _train does that may compute with JAX
    calls.append("distributed")
    raise SystemExit(0)

  monkeypatch.setattr(cli, "_start_distributed", start_distributed)
  with pytest.raises(SystemExit):
    cli.train_main(["--workdir", str(tmp_path / "runs")])
  assert calls == ["kept", "distributed"]
