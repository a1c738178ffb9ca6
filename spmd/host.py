"""Host-level communication between the processes of a multi-controller job.

vLLM's ``broadcast_tensor_dict`` / ``broadcast_object`` / ``all_gather_object`` / ``barrier``
run on CPU process groups. Here every process numbers its host-level calls the same way
(:class:`_CallCounter`) and each call travels on one of two transports:

* **direct TCP connections** between the processes (:mod:`spmd.host_net`), set up on the first
  call through the ``jax.distributed`` coordination service and authenticated with a per-job
  secret: used when every process runs on one machine (over loopback) or every process was given
  ``SPMD_HOST_ADDRESS``;
* otherwise the **key-value store** of the coordination service, with large array payloads in
  device collectives (the protocol below).

``SPMD_HOST_TRANSPORT`` (``auto``, the default; ``tcp``; ``store``) chooses; it must be the same on
every process (:mod:`spmd.envs` reads it, and ``SPMD_HOST_ADDRESS``). No pickle either way: the
wire format is JSON with tagged containers, validated on receipt (docs/host_messages.md has both
protocols and the measurements). A process makes its host-level calls from one thread at a time:
they are numbered in the order it makes them (over TCP, a second thread's call raises
``RuntimeError``).

**Values.** What may travel, and how it is encoded (tagged JSON plus packed array bytes, no
pickle), is :mod:`spmd.wire`: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
containers of them, numpy/JAX arrays and numpy scalars. Anything else raises on the sender before
anything is sent, and the receivers get a ``RuntimeError`` that says what failed.

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

On either transport, sizes announced by a peer are checked against ``SPMD_HOST_MAX_BYTES`` (and
against the bytes that arrive) before anything is allocated; every malformed message raises
:class:`MalformedMessageError` (a ``ValueError``); every wait shares the call's one deadline
(``SPMD_COLLECTIVE_TIMEOUT_S``); a mismatch between the processes' calls raises ``RuntimeError``
on both sides. Over TCP, a peer that closes its connection mid-call (it exited or crashed)
raises ``ConnectionError`` at once.

``src`` here is a process index. The group-level forms (``GroupCoordinator.broadcast_tensor_dict``
and ``spmd.broadcast_tensor_dict``) take a rank in the group and map it to its process
(:mod:`spmd.tensor_dict`).
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from kernels.rendezvous import Rendezvous
from spmd import compat
from spmd.distributed import job_host_address
from spmd.envs import SpmdEnv, host_env
from spmd.wire import (
    ALLOWED_DTYPES,
    MAX_DEPTH,
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

if TYPE_CHECKING:  # loaded on first use (connections, threads), so `import spmd` stays light
    from spmd import host_net

__all__ = [
    "ALLOWED_DTYPES",
    "CHUNK_BYTES",
    "INLINE_MAX_BYTES",
    "MAX_DEPTH",
    "MalformedMessageError",
    "all_gather_object",
    "barrier",
    "broadcast_from",
    "broadcast_object",
    "broadcast_tensor_dict_across_processes",
    "decode",
    "encode",
]

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


# Transport --------------------------------------------------------------------------------------


class _CallCounter:
    """Numbers this process's host-level calls; every process counts the same sequence."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> int:
        self._n += 1
        return self._n


_CALLS = _CallCounter()


def _client():
    return compat.distributed_client()


_env = host_env  # (every call reads the settings)


def _timeout_s(timeout_s: float | None, env: SpmdEnv | None = None) -> float:
    if timeout_s is None:
        return (env or _env()).collective_timeout_s
    t = float(timeout_s)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds.")
    return t


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
    from spmd.host_net import describe

    return describe(op, sources)


class _Meshes:
    """This process's direct connections (:class:`spmd.host_net.Mesh`), one per coordination-service client."""

    def __init__(self) -> None:
        self.mesh: host_net.Mesh | None = None

    def get(self, client: Any, me: int, n_proc: int, env: SpmdEnv) -> host_net.Mesh | None:
        """The mesh to use (set up, or finishing set-up, within the caller's call), or ``None``: use the store."""
        if env.host_transport == "store":
            return None
        from spmd import host_net

        m = self.mesh
        if m is None or m.client is not client or (m.me, m.n_proc) != (me, n_proc):
            if m is not None:
                m.close()
            address = job_host_address(env.host_address)  # None: one host, loopback
            config = host_net.NetConfig(env.host_transport, address and address.advertise, address and address.bind)
            m = self.mesh = host_net.Mesh(client, me, n_proc, config)
        return m


_MESHES = _Meshes()


class _Call:
    """One host-level call: its keys, its deadline, its reads and its clean-up."""

    def __init__(self, op: str, sources: tuple[int, ...], timeout_s: float | None) -> None:
        self.env = _env()
        self.op, self.sources = op, list(sources)
        self.timeout = _timeout_s(timeout_s, self.env)
        self.deadline = time.monotonic() + self.timeout
        self.me, self.n_proc = jax.process_index(), jax.process_count()
        self.n = _CALLS.next()
        self.prefix = f"spmd/host/{self.n}"
        self.client = _client()
        self.store = Rendezvous(self.client, self.timeout, self.where(), deadline=self.deadline)
        self.finished = False
        self.sent_error = False  # this process's record already says what failed

    def where(self) -> str:
        return f"{self.op}: host-level call #{self.n}"

    def direct(self) -> tuple[host_net.Mesh, host_net.Call] | None:
        """The direct connections and this call's frame identity, or ``None`` to use the key-value store.

        Sets the connections up on the first call (within this call's deadline).
        """
        mesh = _MESHES.get(self.client, self.me, self.n_proc, self.env)
        if mesh is None:
            return None
        from spmd import host_net

        net_call = host_net.Call(
            self.n, self.op, tuple(self.sources), self.timeout, self.deadline, self.env.host_max_bytes
        )
        return (mesh, net_call) if mesh.ready(net_call) else None

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


def _sender_record(call: _Call, value: Any, check: Callable[[Any], None] | None) -> tuple[bytes, list[np.ndarray]]:
    """The record a sender publishes, and its arrays (sent in the device phase if not inline)."""
    if check is not None:
        check(value)
    tree, arrays = encode(value)
    specs = specs_of(arrays)
    try:
        offsets, total = layout(specs, call.env.host_max_bytes, what=f"{call.op}: this value")
    except MalformedMessageError as e:
        raise ValueError(str(e)) from None
    header = call.header("send", tree=tree, nbytes=total)
    if total > INLINE_MAX_BYTES:
        return _record(header), arrays
    payload = np.zeros(total, np.uint8)
    pack_into(payload, 0, arrays, offsets)
    return _record(header, payload.data), arrays


def _message(call: _Call, header: dict[str, Any], payload: memoryview, who: str) -> tuple[Any, list, list, int]:
    """``(tree, specs, offsets, nbytes)`` of a sender's message, checked against the cap and the payload."""
    if header["role"] != "send" or "tree" not in header:
        fail(f"{who}: expected a sender's message, got role {header['role']!r:.40}")
    nbytes = header.get("nbytes")
    specs = array_specs(header["tree"])
    offsets, total = layout(specs, call.env.host_max_bytes, what=who)
    if nbytes != total or len(payload) not in ((total,) if total <= INLINE_MAX_BYTES else (0,)):
        fail(f"{who}: announces {nbytes!r:.40} bytes of arrays; its arrays need {total}, {len(payload)} arrived")
    return header["tree"], specs, offsets, total


def broadcast_from(
    value: Any,
    source: int,
    *,
    sources: tuple[int, ...] | None = None,
    op: str,
    timeout_s: float | None = None,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """Every process gets process ``source``'s ``value``; ``sources`` are every sender of this call.

    The building block of the host-level broadcasts: each process names its own source, and
    ``sources`` (the same on every process; default ``(source,)``) lists every process that sends
    in this call, for groups whose senders differ. Senders return their own ``value``.

    Raises:
      TypeError: on a sender, a value that cannot travel (or that ``check`` refuses).
      ValueError: on a sender, containers nested deeper than :data:`MAX_DEPTH` or more array bytes
        than ``SPMD_HOST_MAX_BYTES``; ``source`` not among ``sources``.
      RuntimeError: on every other process, when a sender could not send (the message says why);
        on every process, when the processes made different calls (op, ``src``, or a skipped call).
      TimeoutError: a process did not reach the call within the timeout (on every side).
      ConnectionError: (direct connections) a process this call needs closed its connection: it
        exited or crashed (raised at once, saying how much of its message was missing).
      MalformedMessageError: (a ``ValueError``) a message (a frame, or a record read from the
        store) is malformed, or announces more than ``SPMD_HOST_MAX_BYTES``.
    """
    sources = (source,) if sources is None else tuple(sorted(set(sources)))
    n_proc = jax.process_count()
    if not all(isinstance(s, (int, np.integer)) and 0 <= s < n_proc for s in sources) or source not in sources:
        raise ValueError(
            f"{op}: source={source!r} and sources={sources!r}: expected process indices in [0, {n_proc}) "
            f"with source among sources."
        )
    sources = tuple(int(s) for s in sources)
    if n_proc == 1:
        env = _env()
        _timeout_s(timeout_s, env)
        if check is not None:
            check(value)
        _, arrays = encode(value)  # the same validation as in a multi-process job
        layout(specs_of(arrays), env.host_max_bytes, what=f"{op}: this value")
        return value

    call = _Call(op, sources, timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].broadcast(direct[1], value, source, check)
    me = call.me
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


def _check_src(op: str, src: Any) -> int:
    n = jax.process_count()
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < n:
        raise ValueError(f"{op}: src={src!r} is out of range for {n} processes; expected 0 <= src < {n}.")
    return int(src)


def broadcast_tensor_dict_across_processes(
    tensor_dict: dict[Any, Any] | None, src: int = 0, *, timeout_s: float | None = None
) -> dict[Any, Any]:
    """Every process gets process ``src``'s dict (the others pass ``None``).

    Over the direct connections, or through the coordination service's key-value store (array
    payloads over :data:`INLINE_MAX_BYTES` then in device collectives): see the module docstring.
    Arrays come back as the kind they were sent as (numpy or JAX).

    Raises:
      TypeError: on ``src``, a value that cannot travel (named by its key), or no dict at all,
        before anything is sent.
      RuntimeError: on the other processes, when ``src`` could not send; anywhere, when the
        processes made different calls.
      TimeoutError: a process did not reach the call within the timeout.
      ConnectionError: a process this call needs exited or crashed (direct connections).
      ValueError: ``src`` out of range.
    """

    def must_be_dict(v: Any) -> None:
        if not isinstance(v, dict) and not (v is None and jax.process_count() == 1):  # vLLM: no-op alone
            raise TypeError(f"broadcast_tensor_dict: process src={src} must pass a dict, got {type(v).__name__}.")

    return broadcast_from(
        tensor_dict,
        _check_src("broadcast_tensor_dict", src),
        op="broadcast_tensor_dict",
        timeout_s=timeout_s,
        check=must_be_dict,
    )


def broadcast_object(obj: Any, src: int = 0, *, timeout_s: float | None = None) -> Any:
    """Every process gets process ``src``'s ``obj`` (the same safe values as ``broadcast_tensor_dict``)."""
    return broadcast_from(obj, _check_src("broadcast_object", src), op="broadcast_object", timeout_s=timeout_s)


def all_gather_object(obj: Any, *, timeout_s: float | None = None) -> list[Any]:
    """Every process gets the list of every process's ``obj``, in process order.

    Every process sends its value straight to every other one (direct connections), or inside
    its key-value record (the store: meant for small objects).

    Raises:
      TypeError: ``obj`` holds a value that cannot travel (the others get a ``RuntimeError``).
      RuntimeError: another process could not send, or made a different call.
      TimeoutError: a process did not contribute within the timeout.
      ConnectionError: another process exited or crashed (direct connections).
    """
    op = "all_gather_object"
    n_proc = jax.process_count()
    if n_proc == 1:
        _timeout_s(timeout_s)
        encode(obj)
        return [obj]
    call = _Call(op, tuple(range(n_proc)), timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].all_gather(direct[1], obj)
    try:
        try:
            tree, arrays = encode(obj)
            specs = specs_of(arrays)
            offsets, total = layout(specs, call.env.host_max_bytes, what=f"{op}: this value")
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
            p_offsets, p_total = layout(p_specs, call.env.host_max_bytes, what=who)
            if header.get("nbytes") != p_total or len(raw) != p_total:
                fail(f"{who}: announces {header.get('nbytes')!r:.40} bytes; needs {p_total}, {len(raw)} arrived")
            out.append(decode(header["tree"], views(bytearray(raw), p_specs, p_offsets)))
        call.finish()
        return out
    except BaseException as e:
        call.abort(e)
        raise


def barrier(*, timeout_s: float | None = None) -> None:
    """Wait for this process's queued device work, then for every process to arrive.

    Raises:
      TimeoutError: some process did not arrive within the timeout.
      RuntimeError: some process made another host-level call at this point.
      ConnectionError: some process exited or crashed (direct connections).
    """
    jax.effects_barrier()
    jax.block_until_ready(jax.live_arrays())
    n_proc = jax.process_count()
    if n_proc == 1:
        _timeout_s(timeout_s)
        return
    call = _Call("barrier", tuple(range(n_proc)), timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].barrier(direct[1])
    try:
        call.publish(_record(call.header("barrier")))
        for p in range(n_proc):
            if p != call.me:
                call.read(p)
        call.finish()
    except BaseException as e:
        call.abort(e)
        raise
