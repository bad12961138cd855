"""Data parallelism in a dozen lines: one 1-D mesh over all devices, batch sharded, state replicated.

* ``'jit'``: the step is traced once for the global batch; XLA partitions it. BatchNorm statistics
  are global over the sharded batch without any manual synchronisation.
* ``'pmap'``: the per-device form, ``jax.jit(jax.shard_map(step, ...))`` (what ``jax.pmap`` is
  implemented as today): the step sees its device's shard; BatchNorm syncs through
  ``bn_axis_name`` and gradients/metrics are averaged with ``lax.pmean``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["AXIS", "PARALLEL_MODES", "initialize_distributed", "make_mesh", "replicated", "batch_sharded",
           "shard_batch", "BACKEND_COMPILER_OPTIONS", "STEP_COMPILER_OPTIONS", "compiler_options",
           "retain_host_memory", "compile_step", "compile_eval_step"]

AXIS = "data"
PARALLEL_MODES = ("jit", "pmap")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto: bool = False) -> None:
    """Join a multi-process (multi-host) JAX job: one process per host, all devices in one mesh.

    Either give all three of ``coordinator_address`` (``host:port`` of process 0),
    ``num_processes`` and ``process_id``, or ``auto=True`` for the argument-free form that JAX
    resolves itself on Cloud TPU, SLURM and other detected clusters. CPU devices use gloo
    collectives (multi-process jobs on CPU, e.g. tests over loopback).
    """
    if not auto and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError("a multi-process job needs --coordinator_address, --num_processes and --process_id "
                         "(or --distributed_auto on Cloud TPU / SLURM)")
    if not auto and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(devices=None) -> Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over the mesh's batch axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


#: XLA options per backend platform, applied to every step this library compiles. On XLA:CPU the
#: default YNNPACK path runs convolutions (forward and both gradients) at about half the speed of
#: XLA's Eigen path on 3x3 windows and on the 56x56 maps; routing only reduce fusions to YNNPACK
#: sends convolutions and matrix products back to Eigen (docs/benchmarks.md). Other backends get
#: nothing. Set ``RESATTN_JAX_XLA_DEFAULTS=1`` to compile with XLA's defaults instead.
BACKEND_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
}

#: Per step kind, options that replace those of :data:`BACKEND_COMPILER_OPTIONS`. A CPU training
#: step also gives its matrix products to YNNPACK: its backward pass's products (transposed
#: operands, Winograd-sized batches) run faster there, 3-6 % of the step measured side by side,
#: while the forward-only evaluation step runs 3-5 % faster on Eigen's (docs/benchmarks.md).
STEP_COMPILER_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "train": {"cpu": {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}},
    "eval": {},
}


def _xla_defaults_requested() -> bool:
    """``RESATTN_JAX_XLA_DEFAULTS=1``: none of this module's backend-specific tuning."""
    return os.environ.get("RESATTN_JAX_XLA_DEFAULTS") == "1"


@functools.cache
def _supported_options(platform: str, kind: str = "eval") -> tuple[tuple[str, Any], ...]:
    """The options for steps of ``kind`` on ``platform`` that this jaxlib accepts."""
    if _xla_defaults_requested():
        return ()
    wanted = {**BACKEND_COMPILER_OPTIONS.get(platform, {}), **STEP_COMPILER_OPTIONS.get(kind, {}).get(platform, {})}
    supported = []
    for key, value in wanted.items():
        try:  # A jaxlib that does not know the option rejects it at compile time: probe once.
            probe = jax.device_put(jnp.zeros((), jnp.float32), jax.devices(platform)[0])
            jax.jit(jnp.negative, compiler_options={key: value}).lower(probe).compile()
        except Exception:  # noqa: BLE001 - any rejection means "not supported here"
            continue
        supported.append((key, value))
    return tuple(supported)


def retain_host_memory() -> bool:
    """Have glibc keep freed host memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's temporaries afresh; glibc serves large blocks with ``mmap`` and
    unmaps them on free, so every step re-faults its whole working set (470,000 page faults per
    Attention-56 train step at batch 8, about 12 % of its time). With one malloc arena, no
    ``mmap`` for large blocks and no trimming, the second step onwards reuses the same pages.
    The price: the process keeps its peak host memory. Only effective before JAX starts its
    backend (the CLIs call it first thing); a no-op off glibc or with ``RESATTN_JAX_XLA_DEFAULTS=1``.
    Returns whether the settings were applied.
    """
    if _xla_defaults_requested():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    return all(mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


def compiler_options(mesh_or_devices=None, kind: str = "eval") -> dict[str, Any]:
    """XLA options for steps of ``kind`` (``'train'``: forward and backward; ``'eval'``: forward
    only) that run on ``mesh_or_devices`` (a mesh, devices, or all devices)."""
    if kind not in STEP_COMPILER_OPTIONS:
        raise ValueError(f"unknown step kind {kind!r}; choose one of {tuple(STEP_COMPILER_OPTIONS)}")
    if isinstance(mesh_or_devices, Mesh):
        devices = mesh_or_devices.devices.flat
    else:
        devices = mesh_or_devices if mesh_or_devices is not None else jax.devices()
    return dict(_supported_options(next(iter(devices)).platform, kind))


def compile_step(step: Callable[..., tuple[Any, Any]], mode: str, mesh: Mesh, donate: bool = True):
    """Wrap ``step(state, batch) -> (state, metrics)`` for ``mode`` (``'jit'`` or ``'pmap'``).

    In ``'pmap'`` mode ``step`` must itself average gradients and metrics over :data:`AXIS`
    (``lax.pmean``); in ``'jit'`` mode it computes on the global batch. The state (argument 0) is
    replicated and donated; metrics come back replicated. Compiled with :func:`compiler_options`.
    """
    donate_argnums = (0,) if donate else ()
    options = compiler_options(mesh, "train")
    if mode == "jit":
        return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                       out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=donate_argnums,
                       compiler_options=options)
    if mode == "pmap":
        per_device = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
        return jax.jit(per_device, donate_argnums=donate_argnums, compiler_options=options)
    raise ValueError(f"unknown parallel mode {mode!r}; choose one of {PARALLEL_MODES}")


def compile_eval_step(step: Callable[..., Any], mode: str, mesh: Mesh):
    """Wrap ``step(state, batch) -> metrics`` (no new state) for ``mode`` (``'jit'`` or ``'pmap'``).

    Nothing is donated and only the metrics come back (replicated), so an evaluation step never
    copies the state to its outputs. In ``'pmap'`` mode ``step`` sees its device's shard and must
    itself reduce its metrics over :data:`AXIS` (``lax.psum`` / ``lax.pmean``).
    """
    options = compiler_options(mesh)
    if mode == "jit":
        return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                       compiler_options=options)
    if mode == "pmap":
        per_device = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
        return jax.jit(per_device, compiler_options=options)
    raise ValueError(f"unknown parallel mode {mode!r}; choose one of {PARALLEL_MODES}")
