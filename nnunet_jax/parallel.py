"""Mesh and multi-host set-up: one 1-D ``data`` mesh over every device of every process.

Data parallelism is expressed with ``jax.jit`` and ``NamedSharding`` only (params replicated, batch split on
``data``); XLA inserts the gradient all-reduce, so there is no ``pmean`` anywhere (DESIGN.md, traps). The
mesh is built with ``jax.sharding.Mesh`` (Auto axes) because ``jax.make_mesh`` defaults to Explicit axes on
jax >= 0.11 and some ops then raise ``ShardingTypeError``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> bool:
    """Start ``jax.distributed`` from explicit settings, or from a detected cluster environment.

    Returns True when running multi-process. Must be called before any other JAX call touches devices.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    multi = any(int(os.environ.get(k, "1")) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if multi or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()  # auto-detects SLURM / Open MPI / env-configured clusters
        return True
    return False


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
    devs = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devs), (DATA_AXIS,))


def local_mesh(gpus: int = 0) -> Mesh:
    """A mesh over this process's devices only (validation: each process evaluates its own cases)."""
    devs = jax.local_devices()
    return make_mesh(devs[:gpus] if gpus else devs)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Build global arrays from each process's part of the batch (process-major order)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
