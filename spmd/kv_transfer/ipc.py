"""``IpcKVPipe``: device to device between independent processes on ONE host, through shared memory.

The sender copies each message (one array, or a whole KV cache packed per (sender device,
receiver head group) pair as :class:`DevicePutKVPipe` packs it) into a staging slot the receiver
can map, and marks it ready IN THE SHARED MEMORY (:mod:`spmd.kv_transfer._slots`: the layout, then
an epoch written last); the receiver waits for the epoch, copies the data straight into arrays on
its own devices and cuts the layers back out. No message crosses TCP on the data path. Two kinds
of data buffers (``backend``):

* ``"cuda"`` (NVIDIA GPUs): staging allocated with ``cuMemAlloc`` and shared by CUDA IPC handles
  (:mod:`kernels.symmetric_memory.cuda`); the receiver's copy reads the sender's GPU memory over
  NVLink / PCIe peer access, never through the host. JAX's own buffers cannot be exported this
  way (they sit in XLA's virtual-memory pool), hence the one local staging copy on the sender.
* ``"shm"`` (CPU devices): staging files in ``/dev/shm``.

Slot headers (epoch, layout, small arrays inline) are ``/dev/shm`` files on both backends.

Control: a :class:`TCPKVPipe` (HMAC with a ``secret``) carries the hello (backend, TP size, host
identity: both ends must share the machine; the header files), one ``map`` message per new
staging buffer (its handle and capacity: off the data path once the slots have grown), the acks
("taken up to n": the sender reads them only when it needs a slot again) and the close (EOF: a
receiver waiting for a message from a closed or dead peer raises ``ConnectionError`` at once).
Each sender device has ``SLOTS`` (2) staging slots used in turn: message ``k`` waits only until
message ``k - 2`` has been taken, so the sender runs a message ahead of the receiver.

Closing waits (up to ``timeout_s``) until the peer has taken every staged message, so nothing sent
is lost by closing right after a send. Not thread-safe: one thread per pipe end. Both directions
work (each side stages its own sends).
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels import peer_copy
from spmd.kv_transfer import _arrays, _device, _receive, _route, _shared_memory, _slots
from spmd.kv_transfer._ipc_recv import IpcReceiving
from spmd.kv_transfer._profile import Phases
from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.tcp import TCPKVPipe

__all__ = ["BACKENDS", "INLINE_BYTES", "IpcKVPipe"]

BACKENDS = ("auto", "cuda", "shm")
INLINE_BYTES = _slots.INLINE_BYTES  # arrays up to this size travel inside the slot header
_ALIGN = peer_copy.TILE_BYTES
_PROCESS_TOKEN = os.urandom(16).hex()  # this process (pids repeat across PID namespaces)
_MIN_SLOT = 1 << 20
# How long the receiver polls a slot's epoch without sleeping: on CPU devices the sender's copies need the cores.
_SPIN_S = {"cuda": 2e-3, "shm": 2e-4}


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _open_json(meta: dict[str, Any]) -> str:
    """``meta``'s compact JSON without its closing brace (the layout's ``seq`` and ``pieces`` follow)."""
    return json.dumps(meta, separators=(",", ":"))[:-1]


class IpcKVPipe(IpcReceiving, KVPipeBase):
    """A two-way KV pipe between independent processes on one host, through shared device memory.

    Args:
      host, port, role, timeout_s, secret: the control channel's (see :class:`TCPKVPipe`).
      devices: this side's devices in TP rank order (default: all local devices).
      backend: ``"cuda"``, ``"shm"`` or ``"auto"`` (``"cuda"`` on GPUs, ``"shm"`` on CPU).
      receive: how the receiver reads a peer's staging (:mod:`spmd.kv_transfer._receive`): ``"kernel"`` (CUDA:
        one program per receiver device reads it by address), ``"copy"`` (the backend copies the pieces
        first), ``"auto"`` (``"kernel"`` on CUDA, falling back to ``"copy"`` if the kernel fails to compile).
      profile: time each phase of every message (``pipe.phases``; see ``spmd.bench.kv_ipc --profile``).

    Raises:
      As :class:`TCPKVPipe` for the control channel; ``ValueError``: a bad backend, the two sides
      on different machines or backends, a malformed hello; ``RuntimeError``: no CUDA driver for ``"cuda"``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        role: str = "server",
        timeout_s: float = 30.0,
        secret: bytes | None = None,
        devices: Sequence[Any] | None = None,
        backend: str = "auto",
        receive: str = "auto",
        profile: bool = False,
    ) -> None:
        import jax

        deadline = time.monotonic() + timeout_s if isinstance(timeout_s, (int, float)) else None  # one for all
        if backend not in BACKENDS:
            raise ValueError(f"IpcKVPipe: expected backend in {BACKENDS}, got {backend!r}.")
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("IpcKVPipe: expected at least one device.")
        platform = self.devices[0].platform
        if backend == "auto":
            backend = {"gpu": "cuda", "cuda": "cuda", "cpu": "shm"}.get(platform, "")
            if not backend:
                raise ValueError(f"IpcKVPipe: no shared-memory backend for {platform} devices (GPU or CPU).")
        if backend == "shm" and platform != "cpu":
            raise ValueError(f"IpcKVPipe: backend 'shm' moves CPU arrays, got {platform} devices.")
        if receive not in _receive.RECEIVE or (receive == "kernel" and backend != "cuda"):
            raise ValueError(
                f"IpcKVPipe: expected receive in {_receive.RECEIVE} ('kernel' needs CUDA), got {receive!r}."
            )
        self.receive = ("kernel" if backend == "cuda" else "copy") if receive == "auto" else receive
        self._fallback = receive == "auto"  # a kernel that fails to compile: say so once, then copy
        self._files = _shared_memory.Shm()  # the headers (and the sweep of dead processes' files)
        self._mem = _shared_memory.Cuda() if backend == "cuda" else self._files
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.phases = Phases(enabled=profile)
        self._slots: dict[tuple[int, int], _shared_memory.Slot] = {}  # (device index, parity) -> current slot
        self._retired: list[tuple[Any, _shared_memory.Slot]] = []  # replaced slots, freed on close
        self._ids = 0  # staging buffers made (their ids in map messages)
        self._maps: dict[int, dict[str, Any]] = {}  # the peer's staging buffers by id: handle, capacity, address
        self._mapped: dict[tuple[int, str], Any] = {}  # (device index, handle) -> the peer's mapping
        self._dirty: list[Any] = []  # devices with staging copies in flight (synchronised by the release)
        self._sent = self._acked = self._received = 0  # messages sent, of those taken by the peer, received
        self._sending: dict[tuple, tuple[_route.KVRoute, Any, str]] = {}  # a cache's shape -> its route, sharding
        self._init_receiving()
        self._same_process = False
        self._headers = self._peer = None
        self._control = TCPKVPipe(host, port, role=role, timeout_s=timeout_s, secret=secret, deadline=deadline)
        try:
            prefix = f"spmd-kv-{self._files.namespace}-{os.getpid()}_"
            self._headers = _slots.HeaderFile(self._files.dir, prefix, flush=lambda slot: self._mem.flush(self._dirty))
            host_id = _shared_memory.host_identity()
            me = {"backend": backend, "tp": len(self.devices), "host": host_id, "process": _PROCESS_TOKEN}
            self._control.send_tensor(_device.meta_bytes({**me, "headers": self._headers.names}))
            hello = _device.meta_from(self._control.recv_tensor(deadline=deadline), "IpcKVPipe")
            self.peer_tp = hello.get("tp")
            if not isinstance(self.peer_tp, int) or isinstance(self.peer_tp, bool) or self.peer_tp < 1:
                raise ValueError(f"IpcKVPipe: malformed hello from the peer: {hello!r:.200}")
            if hello.get("backend") != backend:
                raise ValueError(f"IpcKVPipe: this side uses backend {backend!r}, the peer {hello.get('backend')!r}.")
            if hello.get("host") != me["host"]:
                raise ValueError(
                    f"IpcKVPipe: the peer runs on another machine ({hello.get('host')!r:.80}, here {me['host']!r}); "
                    "shared memory needs both processes on one host: use TransferServerKVPipe or TCPKVPipe."
                )
            self._peer = _slots.HeaderView(self._files.dir, hello.get("headers"), _shared_memory.shm_name, "IpcKVPipe")
            # CUDA cannot open a handle in the process that exported it: both ends here use the address.
            self._same_process = hello.get("process") == _PROCESS_TOKEN and backend == "cuda"
        except BaseException:
            self.close()
            raise

    # State -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._control.closed

    def close(self) -> None:
        """Wait (up to ``timeout_s``) until the peer took every staged message, then close; idempotent.

        Nothing sent is lost by closing right after a send: the staging stays until the peer has
        copied it. Then this side's staging is freed and the peer's unmapped. If the peer does not
        take a message in time (or is gone), CUDA staging is left allocated rather than freed under
        a reader that may still copy it; shared-memory files are unlinked (a file the peer already
        opened stays readable and unchanged; a peer that had not opened it gets an error, never wrong data).
        """
        if not self._control.closed and self._acked < self._sent:
            try:
                self._wait_acked(self._sent, "close")
            except Exception:
                pass
        self._control.close()
        for (i, _), mapped in list(self._mapped.items()):
            try:
                self._mem.close_mapping(self.devices[i], mapped)
            except Exception:
                pass
        self._mapped.clear()
        self._drop_receiving()
        if self._acked >= self._sent or self._mem.name == "shm":
            for device, slot in [(self.devices[i], s) for (i, _), s in self._slots.items()] + self._retired:
                try:
                    self._mem.free(device, slot)
                except Exception:
                    pass
        self._slots.clear()
        self._retired.clear()
        for part in (self._peer, self._headers):
            if part is not None:
                part.close()

    def _live(self, op: str) -> None:
        if self._control.closed:
            raise ValueError(f"IpcKVPipe.{op}: the pipe is closed.")

    # The control channel -------------------------------------------------------------------------

    def _control_message(self, fn: str, deadline: float) -> None:
        """Read and apply one control message (an ack or a map); the peer's EOF is a ``ConnectionError``."""
        meta = _device.meta_from(self._control.recv_tensor(deadline=deadline), fn)
        if meta.get("kind") == "ack":
            upto = meta.get("upto")
            if not _count(upto) or not self._acked < upto <= self._sent:
                raise ValueError(f"{fn}: expected the ack of message {self._acked} (of {self._sent}), got {meta!r:.80}")
            self._acked = upto
        elif meta.get("kind") == "map":
            slot_id, handle, cap, addr = (meta.get(k) for k in ("id", "h", "cap", "addr"))
            if not (_count(slot_id) and isinstance(handle, str) and _count(cap) and _count(addr)):
                raise ValueError(f"{fn}: malformed staging map from the peer: {meta!r:.200}")
            self._maps[slot_id] = {"h": handle, "cap": cap, "addr": addr}
        else:
            raise ValueError(f"{fn}: malformed message from the peer: {meta!r:.200}")

    def _poll(self, fn: str, deadline: float, spins: list[float]) -> None:
        """Between two polls of a slot's epoch: apply control messages, sleep a little, keep the deadline."""
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"{fn}: no message from the peer within {self.timeout_s} s (the pipe stays usable).")
        waited = now - spins[1]  # (spins: [polls, when the wait began])
        spins[0] += 1
        # Sleep a quarter of what the wait has lasted beyond the spinning: at most 25% late, 1 ms at most.
        spin = _SPIN_S[self.backend]
        wait = 0.0 if waited < spin else min(1e-3, 2e-5 + (waited - spin) / 4, deadline - now)
        sock = self._control._sock
        if sock is not None and select.select([sock], [], [], wait)[0]:
            self._control_message(fn, deadline)

    def _wait_acked(self, upto: int, fn: str) -> None:
        """Read the peer's control messages until the first ``upto`` of this side's messages were taken."""
        deadline = time.monotonic() + self.timeout_s
        while self._acked < upto:
            try:
                self._control_message(fn, deadline)
            except TimeoutError as e:
                raise TimeoutError(
                    f"IpcKVPipe.{fn}: the peer has not taken message {self._acked} within {self.timeout_s} s "
                    f"(its staging slot is needed again): {e}"
                ) from None

    # Sending ---------------------------------------------------------------------------------

    def _slot(self, index: int, parity: int, nbytes: int) -> _shared_memory.Slot:
        slot = self._slots.get((index, parity))
        if slot is None or slot.capacity < nbytes:
            if slot is not None:
                self._retired.append((self.devices[index], slot))
            size = max(_MIN_SLOT, 1 << (nbytes - 1).bit_length())
            slot = self._slots[(index, parity)] = self._mem.alloc(self.devices[index], size)
            slot.id, self._ids = self._ids, self._ids + 1
            meta = {"kind": "map", "id": slot.id, "h": slot.handle, "cap": slot.capacity, "addr": slot.addr}
            self._control.send_tensor(_device.meta_bytes(meta))
        return slot

    def _send(self, meta: dict[str, Any] | str, pieces: list[Any], fn: str, inline: bytes = b"") -> None:
        """Stage single-device ``pieces`` (after the message ``SLOTS`` back was taken), then publish the epoch.

        ``meta``: the message's layout (``seq`` and ``pieces`` are added), or its JSON already
        encoded without the closing brace (:func:`_open_json`: a KV cache's, made once per shape).
        """
        import jax

        seq, parity, ph = self._sent, self._sent % _slots.SLOTS, self.phases
        self._wait_acked(seq - _slots.SLOTS + 1, fn)
        ph.mark("send: wait for the slot's ack")
        jax.block_until_ready(pieces)  # the staging copies run on a stream of their own
        ph.mark("send: wait for the packing")
        index = {d: i for i, d in enumerate(self.devices)}
        offsets: dict[int, int] = {}
        placed = []
        for p in pieces:
            (dev,) = p.devices()
            i = index.get(dev)
            if i is None:
                raise ValueError(f"{fn}: a piece on {dev}, not one of this pipe's devices {self.devices}.")
            nbytes = int(p.size) * p.dtype.itemsize
            placed.append((i, offsets.get(i, 0), nbytes))
            room = peer_copy.padded_bytes(nbytes) if self.backend == "cuda" and nbytes else nbytes  # (whole tiles)
            offsets[i] = offsets.get(i, 0) + _aligned(room)
        slots = {i: self._slot(i, parity, total) for i, total in offsets.items()}
        descs = [{"id": slots[i].id, "off": off, "n": n} for i, off, n in placed]
        head = meta if isinstance(meta, str) else _open_json(meta)
        layout = f'{head},"seq":{seq},"pieces":{json.dumps(descs, separators=(",", ":"))}}}'.encode()
        ph.mark("send: layout and maps")
        self._dirty = [self.devices[i] for i in slots]

        def write_data(_):
            for p, (i, off, n) in zip(pieces, placed, strict=True):
                self._mem.stage(self.devices[i], slots[i], off, p, n)
            ph.mark("send: stage (queue the copies)")
            yield from ()

        _slots.run(_slots.publish(self._headers, seq, layout, write_data, lambda: self._acked, inline), lambda: None)
        ph.mark("send: release (copies done) and epoch", message=True)
        self._sent += 1

    def send_tensor(self, tensor: Any | None) -> None:
        """Send an array (or ``None``); returns once it is staged (the receiver copies it later).

        Raises:
          TypeError: not an array, or a 64-bit dtype with ``jax_enable_x64`` off.
          ValueError: the pipe is closed. ConnectionError / TimeoutError: the control pipe failed, or
          the peer has not taken the message before the previous one.
        """
        import jax

        fn = "IpcKVPipe.send_tensor"
        self._live("send_tensor")
        self.phases.start()
        if tensor is None:
            return self._send({"kind": "none"}, [], fn)
        x = _arrays.as_device_array(tensor, fn)
        meta = {"kind": "array", "dtype": _arrays.dtype_name(x.dtype), "shape": list(np.shape(x))}
        nbytes = int(np.size(x)) * np.dtype(x.dtype).itemsize
        if nbytes <= INLINE_BYTES:
            host = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
            return self._send({**meta, "inline": True}, [], fn, inline=host.tobytes())
        if not (isinstance(x, jax.Array) and x.sharding.device_set == {self.devices[0]}):
            x = jax.device_put(x, self.devices[0])  # (an array already there is staged as it is)
        self._send(meta, [x], fn)

    def send_kv_cache(self, layers: Sequence[Any], *, head_axis: int = 0) -> None:
        """As :meth:`KVPipeBase.send_kv_cache`, as ONE staged message for the whole cache.

        The pieces every (sender device, receiver head group) pair carries are packed on the sender
        device by one jitted concatenation per pair (:mod:`spmd.kv_transfer._route`), staged, and cut
        back into every layer's shard by one jitted function per receiver device: a handful of
        dispatches per cache, whatever the number of layers.
        """
        import jax

        fn = "IpcKVPipe.send_kv_cache"
        self._live("send_kv_cache")
        self.phases.start()
        layers = list(layers)
        if not layers:
            raise ValueError("send_kv_cache: expected at least one layer, got none.")
        _arrays.check_head_axis(head_axis)  # (before the cache: True == 1 as a key)
        layers = [x if isinstance(x, jax.Array) else _arrays.as_host_array(x, fn=fn) for x in layers]
        for x in {x.dtype: x for x in layers}.values():
            _arrays.check_dtype(x, fn)
        key = (head_axis, tuple((x.dtype, x.shape) for x in layers))
        plan = self._sending.get(key)
        if plan is None:  # a new shape: checked and planned once
            route, sharding, kv = _route.sender_plan(layers, head_axis, self.devices, self.peer_tp)
            plan = (route, sharding, _open_json({"kind": "kv", "kv": kv}))
            if len(self._sending) >= 64:
                self._sending.clear()
            self._sending[key] = plan
        route, sharding, head = plan
        live = set(route.live)
        shards = [_route.local_shards(x, sharding, self.devices) if i in live else None for i, x in enumerate(layers)]
        pieces = [a for s_, g in route.pairs for a in _route.sender_arrays(route, shards, s_, g, True)]
        self.phases.mark("send: pack (dispatch)")
        self._send(head, pieces, fn)

    # Receiving -------------------------------------------------------------------------------

    def _receive(self, fn: str, take: Any) -> Any:
        """Wait for the next message; ``take(layout, inline)`` turns it into arrays. A refused message is dropped."""
        self._live(fn.rsplit(".", 1)[-1])
        self.phases.start()
        now = time.monotonic()
        deadline, spins, seq = now + self.timeout_s, [0, now], self._received
        state = {"taken": False, "done": False}

        def read(layout: dict[str, Any], inline: bytes):
            self.phases.mark("recv: wait for the epoch")
            state["taken"] = True
            yield _slots.STEP
            out = take(layout, inline, deadline)
            state["done"] = True
            return out

        try:
            out = _slots.run(_slots.receive(self._peer, seq, read, fn), lambda: self._poll(fn, deadline, spins))
        except TimeoutError:
            raise  # nothing was consumed: the pipe stays usable
        except BaseException:
            if state["taken"] and not state["done"] and not self._control.closed:
                try:  # a message it refused: acked unread, so the pipe stays in step
                    self._ack(seq + 1)
                except Exception:
                    pass
            else:  # the peer broke the protocol (or is gone): nothing after this can be trusted
                self._control.close()
            raise
        self._ack(seq + 1)
        self.phases.mark("recv: ack", message=True)
        return out

    def _ack(self, upto: int) -> None:
        self._received = upto
        self._control.send_tensor(np.frombuffer(b'{"kind":"ack","upto":%d}' % upto, np.uint8))  # (meta_bytes')

    def recv_tensor(self) -> Any | None:
        """The next array (a ``jax.Array`` on this side's first device), or ``None``.

        Raises:
          TimeoutError: nothing within ``timeout_s`` (the pipe stays usable). ConnectionError: the peer
          closed or died. ValueError: closed, malformed layout, or a KV cache (dropped).
        """
        return self._receive("IpcKVPipe.recv_tensor", self._take_tensor)

    def recv_kv_cache(
        self, *, devices: Sequence[Any] | None = None, tp: int | None = None, out: Sequence[Any] | None = None
    ) -> list[Any]:
        """As :meth:`KVPipeBase.recv_kv_cache`, on this pipe's ``devices`` (the sender cut the cache for them).

        Args:
          devices, tp: as :meth:`KVPipeBase.recv_kv_cache` (only this pipe's devices).
          out: a cache of the same layers to write into (as a previous ``recv_kv_cache`` returned it):
            its buffers are DONATED (the result takes their place; ``out`` must not be used after).

        Raises:
          ValueError: other ``devices`` / ``tp``; the next message is not a KV cache, or ``out`` does
            not match it (the message is dropped, so the pipe stays usable), or its layout is
            malformed. TimeoutError / ConnectionError: as :meth:`recv_tensor`.
        """
        import jax

        fn = "IpcKVPipe.recv_kv_cache"
        if devices is None and tp is not None:
            devices = jax.local_devices()[: max(int(tp), 0)]
        if devices is not None and list(devices) != self.devices:
            raise ValueError(
                f"{fn}: the sender cut the cache for this pipe's {len(self.devices)} devices; pass devices=None."
            )
        return self._receive(fn, lambda layout, inline, deadline: self._take_kv(layout, deadline, out))
