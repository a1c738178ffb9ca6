"""This process's peer buffers: :func:`allocate` makes a group's (once, then reuses them), :func:`lookup` finds them."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kernels import compat
from kernels.symmetric_memory import _ipc
from kernels.symmetric_memory._buffers import SymmetricBuffers, group_of
from kernels.symmetric_memory._layout import Layout

__all__ = ["DEFAULT_TIMEOUT_S", "REGISTRY", "Registry", "allocate", "lookup"]

DEFAULT_TIMEOUT_S = 300.0  # how long a cross-process allocation waits for the other processes


class Registry:
    """This process's buffers, and how many cross-process allocations it has made.

    Process-wide on purpose: a compiled program holds the addresses for as long as JAX caches it,
    so the buffers must outlive every communicator and program that used them (entries are never
    replaced or dropped). The count numbers the keys of cross-process allocations; every process
    makes the same allocations in the same order, so every process counts the same sequence.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: dict[tuple[Any, ...], SymmetricBuffers] = {}
        self.shared = 0


REGISTRY = Registry()


def allocate(
    mesh: jax.sharding.Mesh,
    axis_name: Any,
    layout: Layout | None = None,
    *,
    client: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> SymmetricBuffers:
    """The persistent buffers of ``mesh``'s devices for the group ``axis_name`` (made once, then reused).

    A mesh whose devices span processes (NVIDIA GPUs, one device per process) is served through
    CUDA IPC (:mod:`._ipc`). Then this is a collective: every process of the mesh must
    call it for the same meshes, groups and layouts in the same order (``spmd.initialize_model_parallel``
    does, in every process), or the calls wait for each other until ``timeout_s`` and raise.

    Args:
      mesh: the devices: all of this process, or one per process of a ``jax.distributed`` job.
      axis_name: the mesh axis (or tuple of axes) whose all-reduces will use the buffers.
      layout: the buffer layout (default: :class:`Layout` with ``max_ranks`` the group's size).
      client: across processes, the coordination-service client whose key-value store carries
        the handles (default: ``jax.distributed``'s).
      timeout_s: across processes, how long to wait for the other processes.

    Returns:
      The buffers, kept alive for the life of the process (a kernel may be using them).

    Raises:
      ValueError: ``axis_name`` is not the mesh's, the group has more than 8 ranks or more than
        ``layout.max_ranks``, ``timeout_s`` is not positive, or the mesh spans processes in a way
        this cannot serve (``unsupported(mesh)`` says why: CPU devices, several devices of one process).
      NotOneHost: across processes, one of them runs on another machine (a ``ValueError``; every
        process raises it, so the group can stay on psum everywhere).
      TimeoutError: another process did not reach the same allocation within ``timeout_s``.
      RuntimeError: another process made a different allocation, or failed in its own (its error
        is quoted); no ``jax.distributed`` client.
      kernels.symmetric_memory.cuda.CudaError: this process's allocation, export or opening failed.
    """
    names = tuple(mesh.axis_names)
    group = group_of(axis_name)
    missing = [a for a in group if a not in names]
    if missing or not group:
        raise ValueError(
            f"symmetric_memory.allocate: expected axis_name to name axes of the mesh {names}, got {axis_name!r}."
        )
    n = math.prod(int(mesh.shape[a]) for a in group)
    if layout is None:
        if n > Layout.max_ranks:
            raise ValueError(f"symmetric_memory.allocate: a group of {n} ranks is more than {Layout.max_ranks}.")
        layout = Layout(max_ranks=n)
    if n > layout.max_ranks:
        raise ValueError(
            f"symmetric_memory.allocate: a group of {n} ranks is larger than layout.max_ranks={layout.max_ranks}."
        )
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"symmetric_memory.allocate: expected timeout_s > 0 seconds, got {timeout_s!r}.")
    problem = _ipc.unsupported(mesh)
    if problem is not None:
        raise ValueError(
            f"symmetric_memory.allocate: {problem}. Leave this group on psum (the communicators fall back to "
            "it by themselves when they have no buffers)."
        )
    devices: Sequence[jax.Device] = list(mesh.devices.flat)
    key = (tuple(d.id for d in devices), names, tuple(mesh.devices.shape), group, layout)
    reg = REGISTRY
    with reg.lock:
        found = reg.buffers.get(key)
        if found is not None:
            return found
        if all(d.process_index == _ipc.process_index() for d in devices):
            words = layout.nbytes // 4
            arrays = tuple(jax.device_put(np.zeros(words, np.uint32), d) for d in devices)
            jax.block_until_ready(arrays)
            addresses = tuple(int(a.unsafe_buffer_pointer()) for a in arrays)
        else:
            client = compat.distributed_client() if client is None else client
            if client is None:
                raise RuntimeError(
                    "symmetric_memory.allocate: the mesh spans processes but jax.distributed is not initialized "
                    "here; call jax.distributed.initialize (spmd.init_distributed_environment) first."
                )
            reg.shared += 1
            addresses, arrays = _ipc.Share(devices, group, layout, reg.shared, client, float(timeout_s)).run(), ()
        bufs = SymmetricBuffers(mesh, group, layout, addresses, arrays)
        reg.buffers[key] = bufs
        return bufs


def lookup(axis_names: Sequence[str], shape: Sequence[int], axis_name: Any) -> SymmetricBuffers | None:
    """The buffers allocated for group ``axis_name`` of a mesh of these axes and sizes.

    Inside ``shard_map`` only the abstract mesh is known (no devices), so this is only right
    while one set of devices has buffers for it; with several it raises rather than guess (a
    kernel on the wrong device set would share another mesh's epochs): pass the buffers
    explicitly then (``custom_all_reduce(..., buffers=...)``; the communicators do).

    Returns:
      The buffers, or ``None`` when none were allocated for that group of such a mesh.

    Raises:
      ValueError: several device sets have buffers for it.
    """
    key = (tuple(axis_names), tuple(int(s) for s in shape), group_of(axis_name))
    with REGISTRY.lock:
        found = [
            b
            for b in REGISTRY.buffers.values()
            if (tuple(b.mesh.axis_names), tuple(b.mesh.devices.shape), b.group) == key
        ]
    device_sets = {tuple(d.id for d in b.mesh.devices.flat) for b in found}
    if len(device_sets) > 1:
        raise ValueError(
            f"symmetric_memory.lookup: {len(device_sets)} meshes of axes {key[0]} and shape {key[1]} have peer "
            f"buffers for the group {key[2]} (devices {sorted(device_sets)}); pass the buffers explicitly."
        )
    return found[-1] if found else None
