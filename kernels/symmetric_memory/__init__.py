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
multi-GPU barrier before it (docs/custom_all_reduce.md measures what those cost).

What XLA no longer does, the kernels do: the buffers are written outside XLA's knowledge, so
every kernel orders its own accesses (per-block epoch flags written to peers with release
semantics at system scope, read with acquire), and keeps its epoch counters in the buffer.

Layout of one device's buffer (bytes), :class:`Layout`::

    staging[2][max_blocks][tiles_per_block_max * TILE_BYTES]    pull protocol, by epoch parity
    flags[max_blocks][max_ranks]   uint32                       epoch written by rank r for block b
    counters[max_blocks]           uint32                       this device's epoch per block
    inbox[2][max_blocks][max_ranks][ll_tiles_per_block_max * 2 * TILE_BYTES]
                                   low-latency protocol: rank r's (word, epoch) pairs for block b

One process driving every device of the mesh: the buffers are JAX arrays and the table holds
their addresses; CUDA peer access between the local GPUs is enabled by JAX's runtime (checked on
H200, JAX 0.11.2).

Several processes (a ``jax.distributed`` job, NVIDIA GPUs, one device of the mesh per process,
vLLM's layout): JAX's own buffers cannot be exported (they live in XLA's virtual-memory pool),
so each process allocates its device's buffer with ``cuMemAlloc`` (:mod:`.cuda`), publishes its
CUDA IPC handle in the coordination service's key-value store (JSON, the handle in hex, under
``spmd/symmetric_memory/<n>/handle/<process>``, ``n`` counting this process's cross-process
allocations: every process counts the same sequence), opens every other process's handle on
its device, and says so under ``.../opened/<process>``. Each process's table then holds its own
buffer's address and its mappings of the others' (addresses valid in that process only): each
process compiles its own program with its own constants (so XLA's sharded autotuning, which
expects one program in every process and otherwise hangs the compilation, must be off:
``XLA_FLAGS=--xla_gpu_shard_autotuning=false``). Every wait has a deadline; a process
that fails publishes why, so the others raise at once instead of waiting. The buffers and
mappings are never freed (a kernel may be using them until the process ends).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import compat
from kernels.rendezvous import KeyTaken, Rendezvous
from kernels.symmetric_memory import cuda

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

TILE_BYTES = 2048  # one warpgroup (128 threads) x 16 bytes: the unit every kernel moves
DEFAULT_TIMEOUT_S = 300.0  # how long a cross-process allocation waits for the other processes
_KEY = "spmd/symmetric_memory"
_VERSION = 1


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
      addresses: device address of each buffer, in ``mesh.devices.flat`` order, as this process
        sees it: its own buffers' addresses, and (across processes) its mappings of the others'.
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


class _Registry:
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


_REGISTRY = _Registry()


def _group(axis_name: Any) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _process_index() -> int:
    return jax.process_index()


def _distributed_client() -> Any:
    """JAX's coordination-service client (:func:`kernels.compat.distributed_client`)."""
    return compat.distributed_client()


def unsupported(mesh: jax.sharding.Mesh) -> str | None:
    """Why :func:`allocate` cannot serve ``mesh``'s devices from this process (``None`` when it can).

    Every device in this process: always possible. Across processes: NVIDIA GPUs, each process of
    the mesh holding exactly one of its devices (vLLM's layout), this process among them, the
    CUDA driver loading here, and XLA's sharded autotuning off (``XLA_FLAGS`` read here, as
    the processes were started with it: XLA reads it once, when its backend starts).
    """
    devices = list(mesh.devices.flat)
    me = _process_index()
    owners = collections.Counter(int(d.process_index) for d in devices)
    if set(owners) == {me}:
        return None
    procs = sorted(owners)
    platforms = sorted({str(d.platform) for d in devices})
    if platforms != ["gpu"]:
        return (
            f"the mesh spans processes {procs} and its devices are {'/'.join(platforms)}; across processes the "
            "buffers are shared by CUDA IPC, which needs NVIDIA GPUs"
        )
    crowded = sorted((p, k) for p, k in owners.items() if k > 1)
    if crowded:
        p, k = crowded[0]
        return (
            f"process {p} holds {k} devices of the mesh; across processes one device of the mesh per process is "
            "supported (one GPU per process, vLLM's layout)"
        )
    if me not in owners:
        return f"this process ({me}) holds no device of the mesh (its devices belong to processes {procs})"
    if not cuda.available():
        return "the CUDA driver (libcuda.so.1) does not load here, and across processes the buffers need CUDA IPC"
    if not _shard_autotuning_off():
        return (
            "XLA's sharded autotuning is on (XLA_FLAGS lacks --xla_gpu_shard_autotuning=false): it expects every "
            "process to compile the same program, but each process's program holds its own peer addresses, and "
            "compiling hangs (seen on H200, JAX 0.11.2, 2026-12-03); start every process with "
            "XLA_FLAGS=--xla_gpu_shard_autotuning=false"
        )
    return None


def _shard_autotuning_off() -> bool:
    """Whether ``XLA_FLAGS`` turns XLA's sharded autotuning off (its last setting counts, as in XLA)."""
    value = None
    for token in os.environ.get("XLA_FLAGS", "").split():
        name, _, v = token.partition("=")
        if name.lstrip("-") == "xla_gpu_shard_autotuning":
            value = v.lower() or "true"
    return value in ("false", "0")


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
    CUDA IPC (see the module docstring). Then this is a collective: every process of the mesh must
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
        this cannot serve (:func:`unsupported` says why: CPU devices, several devices of one process).
      NotOneHost: across processes, one of them runs on another machine (a ``ValueError``; every
        process raises it, so the group can stay on psum everywhere).
      TimeoutError: another process did not reach the same allocation within ``timeout_s``.
      RuntimeError: another process made a different allocation, or failed in its own (its error
        is quoted); no ``jax.distributed`` client.
      kernels.symmetric_memory.cuda.CudaError: this process's allocation, export or opening failed.
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
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"symmetric_memory.allocate: expected timeout_s > 0 seconds, got {timeout_s!r}.")
    problem = unsupported(mesh)
    if problem is not None:
        raise ValueError(
            f"symmetric_memory.allocate: {problem}. Leave this group on psum (the communicators fall back to "
            "it by themselves when they have no buffers)."
        )
    devices: Sequence[jax.Device] = list(mesh.devices.flat)
    key = (tuple(d.id for d in devices), names, tuple(mesh.devices.shape), group, layout)
    reg = _REGISTRY
    with reg.lock:
        found = reg.buffers.get(key)
        if found is not None:
            return found
        if all(d.process_index == _process_index() for d in devices):
            words = layout.nbytes // 4
            arrays = tuple(jax.device_put(np.zeros(words, np.uint32), d) for d in devices)
            jax.block_until_ready(arrays)
            addresses = tuple(int(a.unsafe_buffer_pointer()) for a in arrays)
        else:
            client = _distributed_client() if client is None else client
            if client is None:
                raise RuntimeError(
                    "symmetric_memory.allocate: the mesh spans processes but jax.distributed is not initialized "
                    "here; call jax.distributed.initialize (spmd.init_distributed_environment) first."
                )
            reg.shared += 1
            addresses, arrays = _Share(devices, group, layout, reg.shared, client, float(timeout_s)).run(), ()
        bufs = SymmetricBuffers(mesh, group, layout, addresses, arrays)
        reg.buffers[key] = bufs
        return bufs


class NotOneHost(ValueError):
    """The processes of a mesh are not all on one machine: their buffers cannot be shared (use psum)."""


def machine_id() -> str:
    """This machine: host name and boot id (what two processes must share for CUDA IPC or /dev/shm)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class _Share:
    """One cross-process allocation (the ``n``-th of this process): publish, open, confirm."""

    def __init__(
        self, devices: Sequence[Any], group: tuple[str, ...], layout: Layout, n: int, client: Any, timeout_s: float
    ) -> None:
        self.devices, self.client, self.timeout_s = devices, client, timeout_s
        self.me = _process_index()
        self.local = next(d for d in devices if d.process_index == self.me)
        self.ordinal = int(self.local.local_hardware_id)
        self.n, self.prefix = n, f"{_KEY}/{n}"
        self.what = {"group": list(group), "devices": [int(d.id) for d in devices], "nbytes": layout.nbytes}
        self.store = Rendezvous(client, timeout_s, f"symmetric_memory.allocate (cross-process allocation #{n})")

    def run(self) -> tuple[int, ...]:
        """This process's addresses of every buffer, in ``devices`` order.

        Raises:
          NotOneHost: a process of the mesh runs on another machine (every process finds it from
            the same records and raises, having freed its allocation; nothing was opened).
        """
        try:
            ptr = cuda.mem_alloc(self.ordinal, self.what["nbytes"])
            handle = cuda.ipc_handle(self.ordinal, ptr)
        except Exception as e:
            self._publish("handle", error=e)
            raise
        host = machine_id()
        try:
            self._publish("handle", handle=handle.hex(), host=host)
        except KeyTaken as e:  # someone wrote this process's key first: the others may read theirs, so
            cuda.mem_free(self.ordinal, ptr)  # say so where they look next
            try:
                self._publish("opened", error=e)
            except Exception:
                pass
            raise
        try:
            procs = sorted({int(d.process_index) for d in self.devices} - {self.me})
            others = {p: self._read("handle", p) for p in procs}
            away = {p: r.get("host") for p, r in others.items() if r.get("host") != host}
            if away:
                cuda.mem_free(self.ordinal, ptr)
                p, where = next(iter(away.items()))
                raise NotOneHost(
                    f"{self._where(p)}: process {p} runs on another machine ({where!r:.80}; this process on "
                    f"{host!r:.80}); CUDA IPC shares memory between the processes of one machine only"
                )
            addresses = [ptr if d.process_index == self.me else self._open(d, others) for d in self.devices]
        except NotOneHost:
            raise
        except Exception as e:
            self._publish("opened", error=e)
            raise
        self._publish("opened")
        for d in self.devices:
            if d.process_index != self.me:
                self._read("opened", int(d.process_index))
        return tuple(addresses)

    def _open(self, device: Any, records: dict[int, dict[str, Any]]) -> int:
        p = int(device.process_index)
        record = records[p]
        handle = record.get("handle")
        if not isinstance(handle, str) or len(handle) != 2 * cuda.IPC_HANDLE_BYTES:
            raise RuntimeError(f"{self._where(p)}: a malformed handle record {record!r:.200}.")
        try:
            raw = bytes.fromhex(handle)
        except ValueError:
            raise RuntimeError(f"{self._where(p)}: a malformed handle record {record!r:.200}.") from None
        mapped = cuda.ipc_open(self.ordinal, raw)
        try:  # what the handle really maps, before any kernel writes to it
            room = cuda.allocation_size(self.ordinal, mapped)
        except cuda.CudaError:  # a driver that does not report IPC mappings: the record's size stands
            room = None
        if room is not None and room < self.what["nbytes"]:
            cuda.ipc_close(self.ordinal, mapped)
            raise RuntimeError(
                f"{self._where(p)}: process {p}'s handle maps {room} bytes, fewer than the {self.what['nbytes']} "
                f"of this allocation; refused before any kernel could write past it."
            )
        return mapped

    def _where(self, p: int) -> str:
        return f"symmetric_memory.allocate (cross-process allocation #{self.n}, process {p})"

    def _publish(self, stage: str, *, error: BaseException | None = None, **extra: Any) -> None:
        key = f"{self.prefix}/{stage}/{self.me}"
        if error is not None:
            self.store.publish_error(key, error, note=f"failed ({stage})")
            return
        record = {"v": _VERSION, "call": self.n, **self.what, **extra}
        self.store.publish(key, json.dumps(record, separators=(",", ":")).encode())

    def _read(self, stage: str, p: int) -> dict[str, Any]:
        """Process ``p``'s record of this allocation's ``stage``, checked to be the same allocation.

        Raises:
          TimeoutError: nothing within what is left of the timeout.
          RuntimeError: ``p`` failed (its error quoted), made another allocation, or wrote garbage.
        """
        key = f"{self.prefix}/{stage}/{p}"
        raw = self.store.read(
            key,
            who=f"process {p}",
            what=f"its {stage} record",
            hint="Every process of the mesh must call allocate (spmd.initialize_model_parallel does) for the same "
            f"meshes and groups in the same order; check that process {p} is alive and reached this call.",
        )
        try:
            record = json.loads(raw)
        except (TypeError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("v") != _VERSION:
            raise RuntimeError(f"{self._where(p)}: a record this module did not write under {key!r}: {raw!r:.200}.")
        theirs = {k: record.get(k) for k in ("call", *self.what)}
        mine = {"call": self.n, **self.what}
        if theirs != mine:
            raise RuntimeError(
                f"{self._where(p)}: the processes made different allocations: this process ({self.me}) {mine}, "
                f"process {p} {theirs}. Every process of the mesh must call allocate for the same meshes, groups "
                f"and layouts in the same order."
            )
        return record


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
    with _REGISTRY.lock:
        found = [
            b
            for b in _REGISTRY.buffers.values()
            if (tuple(b.mesh.axis_names), tuple(b.mesh.devices.shape), b.group) == key
        ]
    device_sets = {tuple(d.id for d in b.mesh.devices.flat) for b in found}
    if len(device_sets) > 1:
        raise ValueError(
            f"symmetric_memory.lookup: {len(device_sets)} meshes of axes {key[0]} and shape {key[1]} have peer "
            f"buffers for the group {key[2]} (devices {sorted(device_sets)}); pass the buffers explicitly."
        )
    return found[-1] if found else None
