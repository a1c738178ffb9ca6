"""Persistent peer buffers: one staging + flag area per GPU and group, addressed by raw device pointers.

vLLM's custom all-reduce registers one buffer per GPU at start-up and hands every kernel the
table of its peers' addresses; the kernels read and write peers through plain loads and stores
over NVLink. This module does the same for JAX: :func:`allocate` makes one zero-filled array per
device of a mesh for one group (a mesh axis or tuple of axes), kept alive here for the life of
the process (never donated, never passed to a program), and records its device address.

One buffer serves ONE group: the kernels' epochs count the calls of that group, and a device's
inbox slot ``r`` is written by rank ``r`` of its group. Two groups sharing a device's buffer
(TP and DP all-reduces, say) would let a DP peer that is a call ahead write a slot a TP peer's
data still occupies, so each group has its own. A kernel gets, as a small ``int32`` operand built in
the program (:meth:`SymmetricBuffers.peer_table`), its own rank in the group and the addresses of
every group member's buffer. To XLA such a kernel is an ordinary local custom call: no remote
references, so no per-call zeroing of semaphores, no collective-metadata copy and no XLA
multi-GPU barrier before it (what made the first-round kernels cost 12-16 us, see
docs/custom_all_reduce.md).

What XLA no longer does, the kernels do: the buffers are written outside XLA's knowledge, so
every kernel orders its own accesses (per-block epoch flags written to peers with release
semantics at system scope, read with acquire), and keeps its epoch counters in the buffer.

Layout of one device's buffer (bytes), :class:`Layout`::

    staging[2][max_blocks][tiles_per_block_max * TILE_BYTES]    pull protocol, by epoch parity
    flags[max_blocks][max_ranks]   uint32                       epoch written by rank r for block b
    counters[max_blocks]           uint32                       this device's epoch per block
    inbox[2][max_blocks][max_ranks][ll_tiles_per_block_max * 2 * TILE_BYTES]
                                   low-latency protocol: rank r's (word, epoch) pairs for block b

The address table needs every device of the group in this process: CUDA peer access between
the local GPUs is enabled by JAX's runtime (checked on H200, JAX 0.11.2). Across processes it
would need CUDA IPC handles; see docs/custom_all_reduce.md.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["TILE_BYTES", "Layout", "SymmetricBuffers", "allocate", "lookup"]

TILE_BYTES = 2048  # one warpgroup (128 threads) x 16 bytes: the unit every kernel moves


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things live in one device's buffer.

    Attributes:
      max_blocks: thread blocks a kernel may use (each owns its staging slot and flags).
      tiles_per_block_max: tiles of :data:`TILE_BYTES` a block may stage per call.
      max_ranks: largest group size.
      ll_tiles_per_block_max: tiles a block may push per call in the low-latency protocol (every
        4-byte word travels with its epoch, so its inbox takes twice the bytes, per sender).
    """

    max_blocks: int = 128
    tiles_per_block_max: int = 8
    max_ranks: int = 8
    ll_tiles_per_block_max: int = 2

    def __post_init__(self):
        for name in ("max_blocks", "tiles_per_block_max", "max_ranks", "ll_tiles_per_block_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Layout: expected {name} to be a positive int, got {v!r}.")

    @property
    def slot_bytes(self) -> int:
        """Staging bytes of one block in one parity."""
        return self.tiles_per_block_max * TILE_BYTES

    @property
    def max_message_bytes(self) -> int:
        """The largest message (bytes per device) one call can stage."""
        return self.max_blocks * self.slot_bytes

    @property
    def flags_offset(self) -> int:
        return 2 * self.max_blocks * self.slot_bytes

    @property
    def counters_offset(self) -> int:
        return self.flags_offset + 4 * self.max_blocks * self.max_ranks

    @property
    def inbox_offset(self) -> int:
        return -(-(self.counters_offset + 4 * self.max_blocks) // 4096) * 4096

    @property
    def inbox_slot_bytes(self) -> int:
        """Inbox bytes of one (parity, block, sender)."""
        return self.ll_tiles_per_block_max * 2 * TILE_BYTES

    @property
    def ll_max_message_bytes(self) -> int:
        """The largest message (bytes per device) the low-latency protocol takes."""
        return self.max_blocks * self.ll_tiles_per_block_max * TILE_BYTES

    @property
    def nbytes(self) -> int:
        return self.inbox_offset + 2 * self.max_blocks * self.max_ranks * self.inbox_slot_bytes


@dataclasses.dataclass(frozen=True, eq=False)
class SymmetricBuffers:
    """One persistent buffer per device of ``mesh``, and their device addresses.

    Attributes:
      mesh: the mesh whose devices hold the buffers.
      group: the axes of the one group these buffers serve.
      layout: the buffer layout.
      addresses: device address of each buffer, in ``mesh.devices.flat`` order.
    """

    mesh: jax.sharding.Mesh
    group: tuple[str, ...]
    layout: Layout
    addresses: tuple[int, ...]
    _arrays: tuple[jax.Array, ...] = dataclasses.field(repr=False)

    def peer_table(self, axis_name: Any) -> jax.Array:
        """``int32[1 + 2 n]``: this device's rank along ``axis_name``, then each rank's buffer address.

        Traced inside ``shard_map`` over every axis of :attr:`mesh`; each address travels as two
        ``int32`` words (low, high), so the table needs no 64-bit types. Built from
        ``lax.axis_index`` and a constant table; XLA hoists it out of loops.

        Raises:
          ValueError: ``axis_name`` is not the group these buffers were allocated for.
        """
        names = tuple(self.mesh.axis_names)
        group = _group(axis_name)
        if group != self.group:
            raise ValueError(
                f"SymmetricBuffers.peer_table: these buffers serve the group {self.group}, got axis_name="
                f"{axis_name!r}; allocate the group's own with symmetric_memory.allocate(mesh, {axis_name!r})."
            )
        sizes = dict(zip(names, self.mesh.devices.shape, strict=True))
        n = math.prod(sizes[a] for a in group)
        strides = dict(zip(names, np.cumprod((1, *self.mesh.devices.shape[::-1]))[::-1][1:].tolist(), strict=True))
        coords = {a: lax.axis_index(a) for a in names}
        rank = jnp.int32(0)
        for a in group:
            rank = rank * sizes[a] + coords[a]
        base = sum(coords[a] * strides[a] for a in names if a not in group)
        linear = []
        for j in range(n):
            lin, rest = base, j
            for a in reversed(group):
                lin = lin + (rest % sizes[a]) * strides[a]
                rest //= sizes[a]
            linear.append(lin)
        words = np.array(self.addresses, np.uint64)
        table = np.stack([words & 0xFFFFFFFF, words >> 32], axis=1).astype(np.uint32).view(np.int32)
        pairs = jnp.asarray(table)[jnp.stack([jnp.asarray(v, jnp.int32) for v in linear])]
        return jnp.concatenate([jnp.reshape(rank, (1,)).astype(jnp.int32), pairs.reshape(-1)])


# Process-wide on purpose: a compiled program holds these addresses for as long as JAX caches it,
# so the buffers must outlive every communicator and program that used them (entries are never
# replaced or dropped).
_LOCK = threading.Lock()
_ALLOCATED: dict[tuple[Any, ...], SymmetricBuffers] = {}


def _group(axis_name: Any) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def allocate(mesh: jax.sharding.Mesh, axis_name: Any, layout: Layout | None = None) -> SymmetricBuffers:
    """The persistent buffers of ``mesh``'s devices for the group ``axis_name`` (made once, then reused).

    Args:
      mesh: a mesh whose devices are all addressable by this process.
      axis_name: the mesh axis (or tuple of axes) whose all-reduces will use the buffers.
      layout: the buffer layout (default: :class:`Layout` with ``max_ranks`` the group's size).

    Returns:
      The buffers, kept alive for the life of the process (a kernel may be using them).

    Raises:
      ValueError: ``axis_name`` is not the mesh's, the group has more than 8 ranks or more than
        ``layout.max_ranks``, or a device of ``mesh`` belongs to another process.
    """
    names = tuple(mesh.axis_names)
    group = _group(axis_name)
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
    devices: Sequence[jax.Device] = list(mesh.devices.flat)
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(
            f"symmetric_memory.allocate: device {foreign[0]} belongs to process {foreign[0].process_index}; "
            "the raw-address table needs every device of the mesh in this process."
        )
    key = (tuple(d.id for d in devices), names, tuple(mesh.devices.shape), group, layout)
    with _LOCK:
        found = _ALLOCATED.get(key)
        if found is not None:
            return found
        words = layout.nbytes // 4
        arrays = tuple(jax.device_put(np.zeros(words, np.uint32), d) for d in devices)
        jax.block_until_ready(arrays)
        addresses = tuple(int(a.unsafe_buffer_pointer()) for a in arrays)
        bufs = SymmetricBuffers(mesh, group, layout, addresses, arrays)
        _ALLOCATED[key] = bufs
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
    key = (tuple(axis_names), tuple(int(s) for s in shape), _group(axis_name))
    with _LOCK:
        found = [
            b for b in _ALLOCATED.values() if (tuple(b.mesh.axis_names), tuple(b.mesh.devices.shape), b.group) == key
        ]
    device_sets = {tuple(d.id for d in b.mesh.devices.flat) for b in found}
    if len(device_sets) > 1:
        raise ValueError(
            f"symmetric_memory.lookup: {len(device_sets)} meshes of axes {key[0]} and shape {key[1]} have peer "
            f"buffers for the group {key[2]} (devices {sorted(device_sets)}); pass the buffers explicitly."
        )
    return found[-1] if found else None
