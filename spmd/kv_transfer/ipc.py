"""``IpcKVPipe``: device to device between independent processes on ONE host, through shared memory.

The sender copies each message (one array, or a whole KV cache packed per (sender device,
receiver head group) pair as :class:`DevicePutKVPipe` packs it) into a staging buffer that the
receiver can map, and sends where it lies; the receiver copies it straight into arrays on its own
devices and cuts the layers back out. Two kinds of shared memory (``backend``):

* ``"cuda"`` (NVIDIA GPUs): staging allocated with ``cuMemAlloc`` and shared by CUDA IPC handles
  (:mod:`kernels.symmetric_memory.cuda`); the receiver's copy reads the sender's GPU memory over
  NVLink / PCIe peer access, never through the host. JAX's own buffers cannot be exported this
  way (they sit in XLA's virtual-memory pool), hence the one local staging copy on the sender.
* ``"shm"`` (CPU devices): staging files in ``/dev/shm`` mapped by both processes.

Closing waits (up to ``timeout_s``) until the peer has taken every staged message, so nothing
sent is lost by closing right after a send.

Control: a :class:`TCPKVPipe` (HMAC with a ``secret``) carries the hello (backend, TP size, host
identity: both ends must share the machine), each message's metadata as JSON (the handle, offset
and size of every piece: never pickle), small arrays (<= 16 KiB) inline, and the receiver's ack
for every staged message. Each sender device has two staging slots used alternately: message
``k`` waits only until message ``k - 2`` has been taken, so the sender runs a message ahead of
the receiver. A slot that is too small is replaced by a larger one (the old one stays allocated
until the pipe closes: the peer may still hold a mapping of it). A side sends at most two staged
messages ahead of what the other has taken, in each direction.

Not thread-safe: one thread per pipe end. Both directions work (each side stages its own sends).
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spmd.kv_transfer import _arrays, _device, _route, _shared_memory
from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.heads import kv_head_ranges, kv_head_sharding
from spmd.kv_transfer.tcp import TCPKVPipe

__all__ = ["BACKENDS", "INLINE_BYTES", "IpcKVPipe"]

BACKENDS = ("auto", "cuda", "shm")
INLINE_BYTES = 16 << 10  # arrays up to this size travel inside the control channel
_ALIGN = 256
_PROCESS_TOKEN = os.urandom(16).hex()  # this process (pids repeat across PID namespaces)
_MIN_SLOT = 1 << 20


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class IpcKVPipe(KVPipeBase):
    """A two-way KV pipe between independent processes on one host, through shared device memory.

    Args:
      host, port, role, timeout_s, secret: the control channel's (see :class:`TCPKVPipe`).
      devices: this side's devices in TP rank order (default: all local devices).
      backend: ``"cuda"``, ``"shm"`` or ``"auto"`` (``"cuda"`` on GPUs, ``"shm"`` on CPU).

    Raises:
      As :class:`TCPKVPipe` for the control channel; ``ValueError``: a bad backend, the two sides
      on different machines or backends; ``RuntimeError``: no CUDA driver for ``"cuda"``.
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
        self._mem = _shared_memory.Cuda() if backend == "cuda" else _shared_memory.Shm()
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self._slots: dict[tuple[int, int], _shared_memory.Slot] = {}  # (device index, parity) -> current slot
        self._retired: list[tuple[Any, _shared_memory.Slot]] = []  # replaced slots, freed on close
        self._mapped: dict[tuple[int, str], Any] = {}  # (device index, handle) -> the peer's mapping
        self._pending: collections.deque = collections.deque()  # data read while waiting for acks
        self._sent = 0  # staged messages sent
        self._acked = 0  # of those, taken by the peer
        self._received = 0  # staged messages received
        self._same_process = False
        self._control = TCPKVPipe(host, port, role=role, timeout_s=timeout_s, secret=secret, deadline=deadline)
        try:
            host_id = _shared_memory.host_identity()
            me = {"backend": backend, "tp": len(self.devices), "host": host_id, "process": _PROCESS_TOKEN}
            self._control.send_tensor(_device.meta_bytes(me))
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
        a reader that may still copy it; shared-memory files are unlinked (a mapping the peer
        already holds stays valid; a peer that had not opened it gets an error, never wrong data).
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
        if self._acked >= self._sent or self._mem.name == "shm":
            slots = [(self.devices[i], s) for (i, _), s in self._slots.items()] + self._retired
            for device, slot in slots:
                try:
                    self._mem.free(device, slot)
                except Exception:
                    pass
        self._slots.clear()
        self._retired.clear()

    def _live(self, op: str) -> None:
        if self._control.closed:
            raise ValueError(f"IpcKVPipe.{op}: the pipe is closed.")

    # Control messages ------------------------------------------------------------------------

    def _read(self, fn: str) -> tuple[dict[str, Any] | None, Any]:
        """The next message from the peer: ``(meta, inline array)``; ``(None, None)`` for ``None``."""
        raw = self._control.recv_tensor()
        if raw is None:
            return None, None
        meta = _device.meta_from(raw, f"IpcKVPipe.{fn}")
        kind = meta.get("kind")
        if kind not in ("ack", "data"):
            raise ValueError(f"IpcKVPipe.{fn}: malformed message from the peer: {meta!r:.200}")
        if not meta.get("inline"):
            return meta, None
        try:
            return meta, self._control.recv_tensor()
        except BaseException:
            self._control.close()  # half a message read: the stream is out of step, nothing after it can be trusted
            raise

    def _next_data(self, fn: str) -> tuple[dict[str, Any] | None, Any]:
        self._live(fn)
        while True:
            if self._pending:
                return self._pending.popleft()
            meta, inline = self._read(fn)
            if meta is not None and meta["kind"] == "ack":
                self._take_ack(meta, fn)
                continue
            return meta, inline

    def _take_ack(self, meta: dict[str, Any], fn: str) -> None:
        if meta.get("seq") != self._acked:
            raise ValueError(f"IpcKVPipe.{fn}: expected the ack of message {self._acked}, got {meta!r:.100}")
        self._acked += 1

    def _wait_acked(self, upto: int, fn: str) -> None:
        """Read the peer's messages until the first ``upto`` staged messages were taken."""
        while self._acked < upto:
            try:
                meta, inline = self._read(fn)
            except TimeoutError as e:
                raise TimeoutError(
                    f"IpcKVPipe.{fn}: the peer has not taken message {self._acked} within {self.timeout_s} s "
                    f"(its staging slot is needed again): {e}"
                ) from None
            if meta is not None and meta["kind"] == "ack":
                self._take_ack(meta, fn)
            else:
                self._pending.append((meta, inline))

    # Sending ---------------------------------------------------------------------------------

    def _slot(self, index: int, parity: int, nbytes: int) -> _shared_memory.Slot:
        slot = self._slots.get((index, parity))
        if slot is None or slot.capacity < nbytes:
            if slot is not None:
                self._retired.append((self.devices[index], slot))
            size = max(_MIN_SLOT, 1 << (nbytes - 1).bit_length())
            slot = self._slots[(index, parity)] = self._mem.alloc(self.devices[index], size)
        return slot

    def _send_pieces(self, pieces: list[Any], meta: dict[str, Any], fn: str) -> None:
        """Stage single-device ``pieces`` and send where they lie (after the message two back was taken)."""
        import jax

        seq = self._sent
        self._wait_acked(seq - 1, fn)
        jax.block_until_ready(pieces)
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
            offsets[i] = offsets.get(i, 0) + _aligned(nbytes)
        slots = {i: self._slot(i, seq % 2, total) for i, total in offsets.items()}
        descs = []
        for p, (i, off, nbytes) in zip(pieces, placed, strict=True):
            self._mem.stage(self.devices[i], slots[i], off, p, nbytes)
            slot = slots[i]
            descs.append({"h": slot.handle, "off": off, "n": nbytes, "cap": slot.capacity, "addr": slot.addr})
        self._mem.flush([self.devices[i] for i in slots])
        self._control.send_tensor(_device.meta_bytes({**meta, "kind": "data", "seq": seq, "pieces": descs}))
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
        if tensor is None:
            self._control.send_tensor(None)
            return
        x = _arrays.as_device_array(tensor, fn)
        meta = {"dtype": _arrays.dtype_name(x.dtype), "shape": list(np.shape(x))}
        nbytes = int(np.size(x)) * np.dtype(x.dtype).itemsize
        if nbytes <= INLINE_BYTES:
            host = np.asarray(x)  # first: a slow or failing computation must not split the message
            self._control.send_tensor(_device.meta_bytes({**meta, "kind": "data", "inline": True}))
            self._control.send_tensor(host)
            return
        self._send_pieces([jax.device_put(x, self.devices[0])], meta, fn)

    def send_kv_cache(self, layers: Sequence[Any], *, head_axis: int = 0) -> None:
        """As :meth:`KVPipeBase.send_kv_cache`, as ONE staged message and one ack for the whole cache.

        The pieces every (sender device, receiver head group) pair carries are packed on the sender
        device by one jitted concatenation per pair (:mod:`spmd.kv_transfer._route`), staged, and cut
        back into every layer's shard by one jitted function per receiver device: a handful of
        dispatches per cache, whatever the number of layers.
        """
        import jax

        fn = "IpcKVPipe.send_kv_cache"
        self._live("send_kv_cache")
        layers = list(layers)
        if not layers:
            raise ValueError("send_kv_cache: expected at least one layer, got none.")
        heads = _arrays.num_heads(layers, head_axis)
        layers = [x if isinstance(x, jax.Array) else _arrays.as_host_array(x, fn=fn) for x in layers]
        for x in {x.dtype: x for x in layers}.values():
            _arrays.check_dtype(x, fn)
        src_tp = len(self.devices)
        kv_head_ranges(heads, src_tp)
        kv_head_ranges(heads, self.peer_tp)
        specs = tuple((_arrays.dtype_name(x.dtype), tuple(x.shape)) for x in layers)
        route = _route.kv_route(heads, src_tp, self.peer_tp, head_axis, specs)
        sharding = kv_head_sharding(self.devices, heads, head_axis=head_axis)
        live = set(route.live)
        shards = [_route.local_shards(x, sharding, self.devices) if i in live else None for i, x in enumerate(layers)]
        pieces = [a for s_, g in route.pairs for a in _route.sender_arrays(route, shards, s_, g, True)]
        kv = {"heads": heads, "head_axis": head_axis, "src_tp": src_tp, "dst_tp": self.peer_tp}
        kv["layers"] = [[d, list(shape)] for d, shape in specs]
        self._send_pieces(pieces, {"kv": kv}, fn)

    # Receiving -------------------------------------------------------------------------------

    def _fetch(self, meta: dict[str, Any], specs: list[tuple[Any, Any, tuple[int, ...]]], fn: str) -> list[Any]:
        """Copy the pieces ``meta`` names into new arrays (``specs``: device, dtype, shape each); ack."""
        pieces = meta.get("pieces")
        if meta.get("seq") != self._received or not isinstance(pieces, list) or len(pieces) != len(specs):
            raise ValueError(
                f"{fn}: expected message {self._received} with {len(specs)} pieces, got {meta!r:.200}; both sides "
                "must call send / recv in the same order."
            )
        out: list[Any] = []
        used: list[Any] = []
        try:
            for desc, (device, dtype, shape) in zip(pieces, specs, strict=True):
                _arrays.check_dtype(np.empty(0, dtype), fn)  # a 64-bit array would not fit: refuse, never truncate
                out.append(self._fetch_piece(desc, device, dtype, shape, fn))
                used.append(device)
        except BaseException:
            try:
                self._mem.flush(list(dict.fromkeys(used)))  # no copy may still write into dropped arrays
            finally:
                self._drop(meta)  # the message is lost, the pipe stays in step
            raise
        self._mem.flush(list(dict.fromkeys(used)))
        self._control.send_tensor(_device.meta_bytes({"kind": "ack", "seq": self._received}))
        self._received += 1
        return out

    def _fetch_piece(self, desc: Any, device: Any, dtype: Any, shape: tuple[int, ...], fn: str) -> Any:
        want = math.prod(shape) * np.dtype(dtype).itemsize
        h, off, n, cap = (desc.get(k) if isinstance(desc, dict) else None for k in ("h", "off", "n", "cap"))
        if (
            not isinstance(h, str)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in (off, n, cap))
            or n != want
            or off < 0
            or off + n > cap
        ):
            raise ValueError(f"{fn}: malformed piece {desc!r:.200} for {np.dtype(dtype).name}{list(shape)}.")
        i = self.devices.index(device)
        mapped = self._mapped.get((i, h))
        if mapped is None and self._same_process:
            mapped = desc.get("addr")
            if not isinstance(mapped, int) or isinstance(mapped, bool) or mapped <= 0:
                raise ValueError(f"{fn}: malformed piece {desc!r:.200} (no staging address).")
        elif mapped is None:
            try:
                mapped = self._mapped[(i, h)] = self._mem.open(device, h)
            except FileNotFoundError:
                raise ConnectionError(
                    f"{fn}: the peer closed before this message was taken (its staging {h!r} is gone)."
                ) from None
        return self._mem.fetch(device, mapped, off, n, dtype, shape)

    def recv_tensor(self) -> Any | None:
        """The next array (a ``jax.Array`` on this side's first device), or ``None``.

        Raises:
          TimeoutError / ConnectionError: the control pipe's; ValueError: closed or malformed metadata.
        """
        import jax

        fn = "IpcKVPipe.recv_tensor"
        meta, inline = self._next_data("recv_tensor")
        if meta is None:
            return None
        if "kv" in meta:
            self._drop(meta)
            raise ValueError(
                f"{fn}: the peer sent a KV cache (send_kv_cache); receive it with recv_kv_cache. It was dropped."
            )
        try:
            dtype, shape = _arrays.array_spec(meta, fn)
        except ValueError:
            if not meta.get("inline"):
                self._drop(meta)  # staged: acked unread, so the pipe stays in step
            raise
        if meta.get("inline"):
            _arrays.check_dtype(np.empty(0, dtype), fn)
            host = np.asarray(inline)
            if host.dtype != dtype or host.shape != shape:
                raise ValueError(f"{fn}: the inline array is {host.dtype}{list(host.shape)}, not {dtype}{list(shape)}.")
            return jax.device_put(host, self.devices[0])
        (out,) = self._fetch(meta, [(self.devices[0], dtype, shape)], fn)
        return out

    def _drop(self, meta: dict[str, Any]) -> None:
        """Take a staged message without copying it (the caller asked for something else): free its slot."""
        if meta.get("seq") == self._received and not self._control.closed:
            self._control.send_tensor(_device.meta_bytes({"kind": "ack", "seq": self._received}))
            self._received += 1

    def recv_kv_cache(self, *, devices: Sequence[Any] | None = None, tp: int | None = None) -> list[Any]:
        """As :meth:`KVPipeBase.recv_kv_cache`, on this pipe's ``devices`` (the sender cut the cache for them).

        Raises:
          ValueError: other ``devices`` / ``tp``; the next message is not a KV cache (it is dropped, so
            the pipe stays usable) or its metadata is malformed. TimeoutError / ConnectionError: the
            control pipe's.
        """
        import jax

        fn = "IpcKVPipe.recv_kv_cache"
        if devices is None and tp is not None:
            devices = jax.local_devices()[: max(int(tp), 0)]
        if devices is not None and list(devices) != self.devices:
            raise ValueError(
                f"{fn}: the sender cut the cache for this pipe's {len(self.devices)} devices; pass devices=None."
            )
        meta, _ = self._next_data("recv_kv_cache")
        if meta is None or "kv" not in meta:
            got = "None" if meta is None else f"a tensor {meta.get('dtype')}{meta.get('shape')}"
            if meta is not None:
                self._drop(meta)
            raise ValueError(
                f"recv_kv_cache: expected the KV cache sent by send_kv_cache, got {got}; both sides must call "
                "send_kv_cache / recv_kv_cache in the same order."
            )
        route = _route.KVRoute.from_metadata(meta["kv"], self.peer_tp, len(self.devices), fn)
        devices = self.devices
        wanted = [
            (devices[g], dtype, shape) for s_, g in route.pairs for dtype, shape in route.buffer_specs(s_, g, True)
        ]
        flat = iter(self._fetch(meta, wanted, fn))
        arrived = {(s_, g): [next(flat) for _ in route.buffer_specs(s_, g, True)] for s_, g in route.pairs}
        sharding = kv_head_sharding(devices, route.num_heads, head_axis=route.head_axis)
        return _route.receiver_layers(route, arrived, devices, True, sharding)
