"""Peer buffers shared between processes by CUDA IPC: one device of the mesh per process, one machine.

JAX's own buffers cannot be exported (they live in XLA's virtual-memory pool), so each process
allocates its device's buffer with ``cuMemAlloc`` (:mod:`.cuda`), publishes its CUDA IPC handle in
the coordination service's key-value store (JSON, the handle in hex, under
``spmd/symmetric_memory/<n>/handle/<process>``, ``n`` counting this process's cross-process
allocations: every process counts the same sequence), opens every other process's handle on its
device, and says so under ``.../opened/<process>``. Each process's table then holds its own
buffer's address and its mappings of the others' (addresses valid in that process only), so each
process compiles its own program with its own constants: XLA's sharded autotuning, which expects
one program in every process and otherwise hangs the compilation, must be off
(``XLA_FLAGS=--xla_gpu_shard_autotuning=false``). Every wait has one deadline
(:class:`kernels.rendezvous.Rendezvous`); a process that fails publishes why, so the others raise
at once instead of waiting. The buffers and mappings are never freed (a kernel may be using them
until the process ends).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any

import jax

from kernels import machine
from kernels.rendezvous import KeyTaken, Rendezvous
from kernels.symmetric_memory import cuda
from kernels.symmetric_memory._layout import Layout

__all__ = ["NotOneHost", "Share", "process_index", "unsupported"]

_KEY = "spmd/symmetric_memory"
_VERSION = 1


class NotOneHost(ValueError):
    """The processes of a mesh are not all on one machine: their buffers cannot be shared (use psum)."""


def process_index() -> int:
    """This process's index in the ``jax.distributed`` job (0 outside one)."""
    return jax.process_index()


def unsupported(mesh: jax.sharding.Mesh) -> str | None:
    """Why :func:`allocate` cannot serve ``mesh``'s devices from this process (``None`` when it can).

    Every device in this process: always possible. Across processes: NVIDIA GPUs, each process of
    the mesh holding exactly one of its devices (vLLM's layout), this process among them, the
    CUDA driver loading here, and XLA's sharded autotuning off (``XLA_FLAGS`` read here, as
    the processes were started with it: XLA reads it once, when its backend starts).
    """
    devices = list(mesh.devices.flat)
    me = process_index()
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
            "compiling hangs; start every process with XLA_FLAGS=--xla_gpu_shard_autotuning=false"
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


class Share:
    """One cross-process allocation (the ``n``-th of this process): publish, open, confirm."""

    def __init__(
        self, devices: Sequence[Any], group: tuple[str, ...], layout: Layout, n: int, client: Any, timeout_s: float
    ) -> None:
        self.devices, self.client, self.timeout_s = devices, client, timeout_s
        self.me = process_index()
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
        host = machine.machine_id()
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
