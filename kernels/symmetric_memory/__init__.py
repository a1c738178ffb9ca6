"""Persistent peer buffers: one staging + flag area per GPU and group, addressed by raw device pointers.

vLLM's custom all-reduce registers one buffer per GPU at start-up and hands every kernel the
table of its peers' addresses; the kernels read and write peers through plain loads and stores
over NVLink. This package does the same for JAX: :func:`allocate` makes one zero-filled array per
device of a mesh for one group (a mesh axis or tuple of axes), kept alive for the life of the
process (never donated, never passed to a program), and records its device address.

One buffer serves ONE group: the kernels' epochs count the calls of that group, and a device's
inbox slot ``r`` is written by rank ``r`` of its group. Two groups sharing a device's buffer
(TP and DP all-reduces, say) would let a DP peer that is a call ahead write a slot a TP peer's
data still occupies, so each group has its own. A kernel gets, as a small ``int32`` operand built in
the program (:meth:`SymmetricBuffers.peer_table`), its own rank in the group and the addresses of
every group member's buffer. To XLA such a kernel is an ordinary local custom call: no remote
references, so no per-call zeroing of semaphores, no collective-metadata copy and no XLA
multi-GPU barrier before it (docs/custom_all_reduce.md measures what those cost).

What XLA no longer does, the kernels do: the buffers are written outside XLA's knowledge, so
every kernel orders its own accesses (per-block epoch flags written to peers with release
semantics at system scope, read with acquire), and keeps its epoch counters in the buffer.

One process driving every device of the mesh: the buffers are JAX arrays and the table holds
their addresses; JAX's runtime enables CUDA peer access between the local GPUs. Several processes
(a ``jax.distributed`` job, NVIDIA GPUs, one device of the mesh per process, vLLM's layout): the
buffers are ``cuMemAlloc`` allocations shared by CUDA IPC (:mod:`._ipc`).

Modules: ``_layout`` (:class:`Layout`: where things live in one buffer), ``_buffers``
(:class:`SymmetricBuffers` and its peer table), ``_registry`` (:func:`allocate`, :func:`lookup`:
this process's buffers), ``_ipc`` (the cross-process allocation), :mod:`.cuda` (the CUDA driver
calls). Which machine a process runs on is :func:`kernels.machine.machine_id`. Imports only JAX.
"""

from kernels.machine import machine_id
from kernels.symmetric_memory._buffers import SymmetricBuffers
from kernels.symmetric_memory._ipc import NotOneHost, unsupported
from kernels.symmetric_memory._layout import TILE_BYTES, Layout
from kernels.symmetric_memory._registry import DEFAULT_TIMEOUT_S, allocate, lookup

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TILE_BYTES",
    "Layout",
    "NotOneHost",
    "SymmetricBuffers",
    "allocate",
    "lookup",
    "machine_id",
    "unsupported",
]
