"""Devices, processes and the data mesh.

* :func:`initialize` starts ``jax.distributed`` for several processes (hosts) from explicit
  arguments or the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``); with one process it does nothing.
* :func:`data_mesh` is a 1-D ``Mesh`` over all (global) devices with the axis ``'data'``.
* :func:`local_rows` tells which rows of a global batch this process must provide, and
  :func:`global_batch` assembles the process-local rows into one global ``jax.Array`` sharded
  over ``'data'`` (``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo") -> bool:
    """Start ``jax.distributed`` when more than one process is asked for.

    Arguments left ``None`` are read from the environment variables above. On CPU, cross-process
    collectives need an implementation (``jax_cpu_collectives_implementation``: "gloo" or "mpi").

    Returns:
      True when ``jax.distributed.initialize`` was called, False for a single process.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if num_processes is None or num_processes <= 1:
        return False
    if coordinator_address is None or process_id is None:
        raise ValueError(
            f"{num_processes} processes need a coordinator address (host:port) and this process's id: "
            f"pass --coordinator_address and --process_id or set {ENV_COORDINATOR} and {ENV_PROCESS_ID}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def data_mesh(num_devices: int = 0) -> Mesh:
    """1-D mesh over the first ``num_devices`` global devices (0 = all), axis ``'data'``.

    Axes are of type Auto: the batch is sharded by the input shardings and XLA's partitioner
    propagates the rest (BatchNorm statistics become cross-device means of the global batch).
    """
    n = num_devices or jax.device_count()
    if n > jax.device_count():
        raise ValueError(f"asked for {n} devices, only {jax.device_count()} are visible")
    if jax.process_count() > 1 and n != jax.device_count():
        raise ValueError("with several processes the mesh must use all devices (num_devices=0)")
    devices = jax.devices()[:n]
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """[start, stop) rows of a global batch that live on this process's devices.

    Raises when the batch does not divide over the devices, or when this process's rows are not
    contiguous (they are for the 1-D meshes built here).
    """
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} devices of the mesh; "
                         f"pick a multiple of {n}")
    index_map = batch_sharded(mesh).addressable_devices_indices_map((global_batch_size,))
    starts = sorted({(idx[0].start or 0) for idx in index_map.values()})
    stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch_size) for idx in index_map.values()})
    rows = sorted(zip(starts, stops))
    for (_, a), (b, _) in zip(rows, rows[1:]):
        if a != b:
            raise ValueError(f"this process's batch rows {rows} are not contiguous")
    return rows[0][0], rows[-1][1]


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    """Process-local rows (each (b_local, ...)) -> global arrays (global_batch_size, ...) sharded on 'data'."""
    sharding = batch_sharded(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size, *v.shape[1:]))
    return out


def is_primary() -> bool:
    """True on the process that writes logs, plots and the inference model (process 0)."""
    return jax.process_index() == 0
