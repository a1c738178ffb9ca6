"""The key-value store transport of the host-level calls (:mod:`spmd.host` chooses it).

Where the processes cannot all reach each other directly (:mod:`spmd.host_net`), a host-level
call travels through the ``jax.distributed`` coordination service's key-value store, with large
array payloads in device collectives.

**The store's protocol.** Call ``n`` lives under the key directory ``spmd/host/<n>``:

1. each process writes one record ``spmd/host/<n>/<process>``: a sender its message (the op,
   the senders of the call, the JSON tree of the value and, for payloads up to
   :data:`INLINE_MAX_BYTES`, the array bytes); any other process a small record naming the op
   and the senders it expects (``barrier`` and ``all_gather_object``: every process writes its
   own record);
2. each process reads the records it needs, each wait bounded by ``SPMD_COLLECTIVE_TIMEOUT_S``
   (one deadline per call): receivers read the senders' records, senders read every other
   process's record (so a sender knows every receiver reached the call). Every record names its
   op and senders, so a process that skipped a call, called another op (``barrier`` against a
   broadcast) or named another ``src`` is detected by both sides and raises ``RuntimeError``;
3. payloads over :data:`INLINE_MAX_BYTES` travel in device collectives (``psum`` over a mesh of
   one device per process, in chunks of at most :data:`CHUNK_BYTES`). A device collective cannot
   time out, so before it every process reads every other process's record (all are present and
   agree), and only then enters it;
4. each process increments ``spmd/host/<n>/done`` when it has read what it needs; the process
   that brings it to the process count deletes ``spmd/host/<n>``, so the store holds only the
   calls in flight. A process that gives up (timeout, mismatch) overwrites its record with an
   abort notice, so a process arriving late gets a clear ``RuntimeError`` instead of old data.

Records are a 4-byte header length, a JSON header and the payload bytes (:mod:`spmd.wire`'s
packing); every record read is validated (:class:`~spmd.wire.MalformedMessageError`) and sizes
announced by a peer are checked against ``SPMD_HOST_MAX_BYTES`` before anything is allocated.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kernels.rendezvous import Rendezvous
from spmd.wire import (
    MalformedMessageError,
    array_specs,
    decode,
    encode,
    fail,
    layout,
    pack_into,
    specs_of,
    views,
)

__all__ = ["CHUNK_BYTES", "INLINE_MAX_BYTES", "StoreCall", "all_gather", "barrier", "broadcast"]

INLINE_MAX_BYTES = 256 << 10
"""Array payloads up to this size travel inside the key-value record; larger ones in device collectives."""
CHUNK_BYTES = 64 << 20
"""Largest single device collective; bigger payloads go in several (bounded extra memory)."""
_MIN_BUCKET = 1024
_LEN = struct.Struct("<I")


def _bucket(nbytes: int) -> int:
    """Padded size of one device collective: at most 25% over ``nbytes``, four sizes per octave.

    Few distinct sizes, so repeated calls reuse compiled programs; never the next power of two
    for big payloads (that could double the memory).
    """
    if nbytes <= _MIN_BUCKET:
        return _MIN_BUCKET
    step = (1 << (nbytes - 1).bit_length()) // 8
    return -(-nbytes // step) * step


# Device collective ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _psum_program(device_ids: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """``(sharding, jitted psum, this process's device)`` over a mesh of one device per process."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    by_id = {d.id: d for d in jax.devices()}
    mesh = Mesh(np.array([by_id[i] for i in device_ids]), ("processes",))
    fn = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x, "processes"), mesh=mesh, in_specs=P("processes"), out_specs=P())
    )
    mine = next(by_id[i] for i in device_ids if by_id[i].process_index == jax.process_index())
    return NamedSharding(mesh, P("processes")), fn, mine


def _process_devices() -> tuple[int, ...]:
    first: dict[int, int] = {}
    for d in jax.devices():
        if d.process_index not in first or d.id < first[d.process_index]:
            first[d.process_index] = d.id
    return tuple(first[p] for p in sorted(first))


def _device_broadcast(total: int, fill: Callable[[np.ndarray, int], None] | None, out: np.ndarray | None) -> None:
    """Every process gets the sender's ``total`` bytes, in chunks of at most :data:`CHUNK_BYTES`.

    The sender passes ``fill(chunk, start)``, which writes payload bytes ``[start, start + len)``;
    the others pass zeros, and a ``psum`` over one device per process adds them up. ``out`` (a
    ``uint8[total]`` buffer) receives the bytes; ``None`` on a process that does not keep them.
    """
    sharding, fn, device = _psum_program(_process_devices())
    n_proc = jax.process_count()
    zeros: dict[int, Any] = {}
    with jax.named_scope("spmd_host_broadcast"):
        for start in range(0, total, CHUNK_BYTES):
            n = min(CHUNK_BYTES, total - start)
            size = _bucket(n)
            if fill is not None:
                chunk = np.zeros(size, np.uint8)
                fill(chunk[:n], start)
                local = jax.device_put(chunk, device)
            else:
                if size not in zeros:
                    zeros[size] = jax.device_put(np.zeros(size, np.uint8), device)
                local = zeros[size]
            summed = fn(jax.make_array_from_single_device_arrays((n_proc * size,), sharding, [local]))
            if out is not None:
                out[start : start + n] = np.asarray(summed.addressable_data(0))[:n]
            else:
                summed.block_until_ready()
            del summed, local


# Records and calls ------------------------------------------------------------------------------


def _record(header: dict[str, Any], payload: bytes | bytearray = b"") -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_LEN.pack(len(h)), h, payload))


def _parse_record(raw: bytes, *, who: str) -> tuple[dict[str, Any], memoryview]:
    """``(header, payload)`` of a record read from the store, validated.

    Raises:
      MalformedMessageError: not a record this module writes.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < _LEN.size:
        fail(f"{who}: a record of {len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__} bytes")
    (n,) = _LEN.unpack_from(raw)
    if n > len(raw) - _LEN.size:
        fail(f"{who}: header length {n} past the end of a {len(raw)}-byte record")
    try:
        header = json.loads(bytes(raw[_LEN.size : _LEN.size + n]))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        fail(f"{who}: the header is not JSON ({type(e).__name__}: {str(e)[:100]})")
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("op"), str)
        or not isinstance(header.get("role"), str)
        or not isinstance(header.get("sources"), list)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in header["sources"])
    ):
        fail(f"{who}: bad header {header!r:.120}")
    return header, memoryview(raw)[_LEN.size + n :]


def _describe(op: str, sources: Any) -> str:
    from spmd.host_net import describe  # (only on an error: the store transport loads no connection code)

    return describe(op, sources)


class StoreCall:
    """One host-level call on the key-value store: its keys, its deadline, its reads and its clean-up.

    Args:
      n: the call's number (every process numbers its calls the same way).
      op: the operation's name (``barrier``, ``broadcast_object``, ...).
      sources: every sender of the call, sorted.
      timeout_s: the call's timeout; ``deadline`` the one absolute deadline (``time.monotonic()``).
      client: the coordination-service client whose key-value store carries the records.
      max_bytes: the largest payload a peer may announce (``SPMD_HOST_MAX_BYTES``).
    """

    def __init__(
        self, n: int, op: str, sources: tuple[int, ...], timeout_s: float, deadline: float, client: Any, max_bytes: int
    ) -> None:
        self.n, self.op, self.sources = n, op, list(sources)
        self.timeout, self.deadline, self.max_bytes = timeout_s, deadline, max_bytes
        self.me, self.n_proc = jax.process_index(), jax.process_count()
        self.prefix = f"spmd/host/{self.n}"
        self.client = client
        self.store = Rendezvous(self.client, self.timeout, self.where(), deadline=self.deadline)
        self.finished = False
        self.sent_error = False  # this process's record already says what failed

    def where(self) -> str:
        return f"{self.op}: host-level call #{self.n}"

    def publish(self, record: bytes, *, overwrite: bool = False) -> None:
        self.store.publish(f"{self.prefix}/{self.me}", record, overwrite=overwrite)

    def publish_error(self, e: BaseException) -> None:
        self.store.publish_error(f"{self.prefix}/{self.me}", e, note="could not send its value")
        self.sent_error = True

    def header(self, role: str, **extra: Any) -> dict[str, Any]:
        return {"op": self.op, "call": self.n, "sources": self.sources, "role": role, **extra}

    def read(self, p: int) -> tuple[dict[str, Any], memoryview]:
        """Process ``p``'s record of this call, validated and checked to be the same call.

        Raises:
          TimeoutError: nothing within what is left of the call's timeout.
          RuntimeError: ``p`` made another call, gave up on this one, or could not send its value.
          MalformedMessageError: ``p``'s record does not follow the wire format.
        """
        raw = self.store.read(
            f"{self.prefix}/{p}",
            who=f"process {p}",
            hint=f"Every process must make the same host-level calls in the same order; check that process {p} "
            f"is alive and reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S.",
        )
        header, payload = _parse_record(raw, who=f"{self.where()}, process {p}")
        if header.get("call") != self.n or header["op"] != self.op or header["sources"] != self.sources:
            raise RuntimeError(
                f"{self.where()}: the processes made different calls: this process ({self.me}) called "
                f"{_describe(self.op, self.sources)}, process {p} called {_describe(header['op'], header['sources'])}. "
                f"Every process must make the same host-level calls, with the same src, in the same order "
                f"(a process that skipped a call or passed another src shows up here)."
            )
        return header, payload

    def finish(self) -> None:
        """This process has read all it needs: count it; the last process deletes the call's keys."""
        if self.finished:
            return
        self.finished = True
        if self.client.key_value_increment(f"{self.prefix}/done", 1) >= self.n_proc:
            self.client.key_value_delete(self.prefix)

    def abort(self, e: BaseException) -> None:
        """Leave a notice for processes that arrive late, then count this process out."""
        if self.finished:
            return
        if self.sent_error:
            self.finish()
            return
        try:
            self.store.publish_error(f"{self.prefix}/{self.me}", e, note="gave up on this call", overwrite=True)
        finally:
            self.finish()


def _sender_record(call: StoreCall, value: Any, check: Callable[[Any], None] | None) -> tuple[bytes, list[np.ndarray]]:
    """The record a sender publishes, and its arrays (sent in the device phase if not inline)."""
    if check is not None:
        check(value)
    tree, arrays = encode(value)
    specs = specs_of(arrays)
    try:
        offsets, total = layout(specs, call.max_bytes, what=f"{call.op}: this value")
    except MalformedMessageError as e:
        raise ValueError(str(e)) from None
    header = call.header("send", tree=tree, nbytes=total)
    if total > INLINE_MAX_BYTES:
        return _record(header), arrays
    payload = np.zeros(total, np.uint8)
    pack_into(payload, 0, arrays, offsets)
    return _record(header, payload.data), arrays


def _message(call: StoreCall, header: dict[str, Any], payload: memoryview, who: str) -> tuple[Any, list, list, int]:
    """``(tree, specs, offsets, nbytes)`` of a sender's message, checked against the cap and the payload."""
    if header["role"] != "send" or "tree" not in header:
        fail(f"{who}: expected a sender's message, got role {header['role']!r:.40}")
    nbytes = header.get("nbytes")
    specs = array_specs(header["tree"])
    offsets, total = layout(specs, call.max_bytes, what=who)
    if nbytes != total or len(payload) not in ((total,) if total <= INLINE_MAX_BYTES else (0,)):
        fail(f"{who}: announces {nbytes!r:.40} bytes of arrays; its arrays need {total}, {len(payload)} arrived")
    return header["tree"], specs, offsets, total


def broadcast(call: StoreCall, value: Any, source: int, check: Callable[[Any], None] | None = None) -> Any:
    """:func:`spmd.host.broadcast_from` on the store: every process gets process ``source``'s ``value``."""
    me, n_proc, sources = call.me, call.n_proc, tuple(call.sources)
    try:
        arrays: list[np.ndarray] = []
        if me in sources:
            try:
                record, arrays = _sender_record(call, value, check)
            except Exception as e:  # every failure reaches the receivers, named
                call.publish_error(e)
                raise
            call.publish(record)
        else:
            call.publish(_record(call.header("recv")))
        # Every process reads every sender's message (they decide together whether a device phase runs).
        messages = {}
        for s in sources:
            if s == me:
                header, payload = _parse_record(record, who=f"{call.where()}, this process")
            else:
                header, payload = call.read(s)
            messages[s] = (*_message(call, header, payload, f"{call.where()}, process {s}"), payload)
        device = any(m[3] > INLINE_MAX_BYTES for m in messages.values())
        if me in sources or device:  # senders (and everyone before a device phase) check every process is here
            for p in range(n_proc):
                if p != me and p not in sources:
                    call.read(p)
        call.finish()
        tree, specs, offsets, total, payload = messages[source]
        if device:
            received = None
            for s in sources:
                s_specs, s_offsets, s_total = messages[s][1], messages[s][2], messages[s][3]
                if s_total <= INLINE_MAX_BYTES:
                    continue
                keep = s == source and me != source
                out = np.empty(s_total, np.uint8) if keep else None
                fill = (lambda chunk, start, o=s_offsets: pack_into(chunk, start, arrays, o)) if s == me else None
                _device_broadcast(s_total, fill, out)
                if keep:
                    received = views(out, s_specs, s_offsets)
        if me == source:
            return value
        if total <= INLINE_MAX_BYTES:
            received = views(bytearray(payload), specs, offsets)  # one small copy: writable arrays
        return decode(tree, received)
    except BaseException as e:
        call.abort(e)
        raise


def all_gather(call: StoreCall, obj: Any) -> list[Any]:
    """:func:`spmd.host.all_gather_object` on the store: every process's ``obj``, in process order."""
    op = call.op
    n_proc = call.n_proc
    try:
        try:
            tree, arrays = encode(obj)
            specs = specs_of(arrays)
            offsets, total = layout(specs, call.max_bytes, what=f"{op}: this value")
            payload = np.zeros(total, np.uint8)
            pack_into(payload, 0, arrays, offsets)
        except Exception as e:
            call.publish_error(e)
            raise
        call.publish(_record(call.header("send", tree=tree, nbytes=total), payload.data))
        out = []
        for p in range(n_proc):
            if p == call.me:
                out.append(obj)
                continue
            header, raw = call.read(p)
            who = f"{call.where()}, process {p}"
            if header["role"] != "send" or "tree" not in header:
                fail(f"{who}: expected a value, got role {header['role']!r:.40}")
            p_specs = array_specs(header["tree"])
            p_offsets, p_total = layout(p_specs, call.max_bytes, what=who)
            if header.get("nbytes") != p_total or len(raw) != p_total:
                fail(f"{who}: announces {header.get('nbytes')!r:.40} bytes; needs {p_total}, {len(raw)} arrived")
            out.append(decode(header["tree"], views(bytearray(raw), p_specs, p_offsets)))
        call.finish()
        return out
    except BaseException as e:
        call.abort(e)
        raise


def barrier(call: StoreCall) -> None:
    """:func:`spmd.host.barrier` on the store: every process writes its record and reads every other's."""
    n_proc = call.n_proc
    try:
        call.publish(_record(call.header("barrier")))
        for p in range(n_proc):
            if p != call.me:
                call.read(p)
        call.finish()
    except BaseException as e:
        call.abort(e)
        raise
