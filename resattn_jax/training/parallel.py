"""Data parallelism in a dozen lines: one 1-D mesh over all devices, batch sharded, state replicated.

* ``'jit'``: the step is traced once for the global batch; XLA partitions it. BatchNorm statistics
  are global over the sharded batch without any manual synchronisation.
* ``'pmap'``: the per-device form, ``jax.jit(jax.shard_map(step, ...))`` (what ``jax.pmap`` is
  implemented as today): the step sees its device's shard; BatchNorm syncs through
  ``bn_axis_name`` and gradients/metrics are averaged with ``lax.pmean``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resattn_jax.ops.backend import compiler_options

__all__ = ["AXIS", "PARALLEL_MODES", "initialize_distributed", "make_mesh", "replicated", "batch_sharded",
           "shard_batch", "compile_step", "compile_eval_step"]

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


def compile_step(step: Callable[..., tuple[Any, Any]], mode: str, mesh: Mesh, donate: bool = True):
    """Wrap ``step(state, batch) -> (state, metrics)`` for ``mode`` (``'jit'`` or ``'pmap'``).

    In ``'pmap'`` mode ``step`` must itself average gradients and metrics over :data:`AXIS`
    (``lax.pmean``); in ``'jit'`` mode it computes on the global batch. The state (argument 0) is
    replicated and donated; metrics come back replicated. Compiled with the backend's options
    (:func:`resattn_jax.ops.backend.compiler_options`).
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
