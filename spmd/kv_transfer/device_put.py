"""``DevicePutKVPipe``: device to device between the prefill and decode process meshes of ONE job.

Both sides run in one ``jax.distributed`` job, on disjoint sets of processes (here: one process
each, with any number of devices). Arrays move with cross-process ``jax.device_put``: the sender
and the receiver both call it on the same global array, and the runtime copies the bytes device
to device. JAX requires the source and target shardings to be the same (same HLO sharding,
different devices), so every transfer here is single device to single device.

Each message is ONE metadata record (JSON, through the coordination service's key-value store,
with a timeout) and then its transfers; the sender publishes and starts its half without waiting,
the receiver starts its half as soon as the record arrives and never waits between transfers:

* ``send_tensor(x)``: up to 16 KiB travels inside the record (no device transfer); a larger ``x``
  is gathered onto the sender's first device and lands on the receiver's first device;
* ``send_kv_cache(layers)``: ONE record for the whole cache (every layer's dtype and shape), then
  ONE transfer per (sender device, receiver device) pair, whatever the number of layers: each
  layer is cut by KV heads into the pieces each receiver head group needs (see
  :mod:`spmd.kv_transfer._route`; the TP sizes may differ, replicated heads included), and a
  pair's pieces travel packed into one buffer (``pack=True``; by default for many small pieces)
  or as one batched ``device_put`` (``pack=False``). ``recv_kv_cache`` reassembles a
  head-sharded array per layer.

Never one batched ``device_put`` across several device pairs: JAX issues such a batch's pairs in
a hash map's order, which differs between processes, and swaps their contents (``_route``).

On CPU the runtime needs its socket transfer switched on BEFORE JAX starts:
:meth:`DevicePutKVPipe.enable_transfers` (``jax_cross_host_transfer_socket_address``, transport
addresses and the transfer timeout). Works on JAX 0.10.2 and 0.12 (CPU).

A process that dies mid-transfer takes the whole ``jax.distributed`` job down (its coordination
service ends every task): that is JAX's failure model for one job, not something a pipe can mend.
Use :class:`TransferServerKVPipe` between independent processes when the two sides must fail apart.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from spmd import compat
from spmd.kv_transfer import _arrays, _device, _route
from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.heads import kv_head_ranges, kv_head_sharding

__all__ = ["DevicePutKVPipe"]

INLINE_BYTES = 16 << 10  # arrays up to this many bytes travel inside their metadata record
_ROUTES_KEPT = 16  # a receiver keeps the checked routes of this many distinct KV records
# pack=None packs a KV cache when its device pairs carry at least PACK_MIN_PIECES pieces each, of
# fewer than PACK_BELOW_BYTES on average: there one transfer per pair beats one per piece, and the
# jitted (un)packing, compiled once per shape and device, pays for itself.
PACK_BELOW_BYTES = 1 << 20
PACK_MIN_PIECES = 16


class DevicePutKVPipe(KVPipeBase):
    """A KV pipe from ``src_devices`` (prefill) to ``dst_devices`` (decode) of one multi-process job.

    Every process of the two sides constructs it with the same arguments; the process owning
    ``src_devices`` sends, the one owning ``dst_devices`` receives.

    Args:
      src_devices: the prefill worker's devices, in TP rank order (all of one process).
      dst_devices: the decode worker's devices, in TP rank order (all of one other process).
      timeout_s: how long a receiver waits for the next message's metadata.
      name: tells pipes apart in the key-value store (two pipes at once need two names).
      pack: (sender) how a KV cache's pieces travel between each pair of devices: ``True``, as one
        packed buffer (one transfer per pair; a copy on each side); ``False``, as themselves, in
        one batched ``device_put`` per pair; ``None`` (default): packed when each pair carries at
        least :data:`PACK_MIN_PIECES` (16) pieces averaging under :data:`PACK_BELOW_BYTES` (1 MiB),
        where the pieces' own costs dominate. The receiver follows what the sender's metadata says.

    Raises:
      RuntimeError: not in a multi-process job (call ``spmd.init_distributed_environment`` first).
      ValueError: the device sets overlap, span several processes, or this process owns neither.
    """

    def __init__(
        self,
        src_devices: Sequence[Any],
        dst_devices: Sequence[Any],
        *,
        timeout_s: float = 60.0,
        name: str = "kv",
        pack: bool | None = None,
    ) -> None:
        import jax

        self.src_devices, self.dst_devices = list(src_devices), list(dst_devices)
        if not self.src_devices or not self.dst_devices:
            raise ValueError("DevicePutKVPipe: src_devices and dst_devices must both be non-empty.")
        if set(self.src_devices) & set(self.dst_devices):
            raise ValueError("DevicePutKVPipe: src_devices and dst_devices overlap; expected disjoint meshes.")
        procs = [{d.process_index for d in ds} for ds in (self.src_devices, self.dst_devices)]
        if any(len(p) != 1 for p in procs) or procs[0] == procs[1]:
            raise ValueError(
                f"DevicePutKVPipe: each side must be the devices of one process, and the two processes must "
                f"differ; got processes {sorted(procs[0])} -> {sorted(procs[1])}."
            )
        if pack is not None and not isinstance(pack, bool):
            raise TypeError(f"DevicePutKVPipe: pack must be True, False or None, got {pack!r}.")
        if jax.process_count() < 2 or compat.distributed_client() is None:
            raise RuntimeError(
                "DevicePutKVPipe needs a multi-process jax.distributed job; call "
                "DevicePutKVPipe.enable_transfers() and then spmd.init_distributed_environment() first."
            )
        me = jax.process_index()
        self.src_process, self.dst_process = procs[0].pop(), procs[1].pop()
        if me not in (self.src_process, self.dst_process):
            raise ValueError(f"DevicePutKVPipe: process {me} owns neither side's devices.")
        self.role = "sender" if me == self.src_process else "receiver"
        self.timeout_s, self.name, self.pack = float(timeout_s), name, pack
        self._seq = 0
        self._closed = False
        self._fault: str | None = None
        self._routes: dict[str, tuple[_route.KVRoute, bool]] = {}  # raw KV record -> its checked route

    @staticmethod
    def enable_transfers(host: str = "127.0.0.1", port: int | None = None, *, timeout_s: int = 60) -> str:
        """Switch on JAX's socket transfers for cross-process ``device_put`` (needed on CPU).

        Call in every process BEFORE JAX starts (before ``spmd.init_distributed_environment``).

        Args:
          host: the address this process's transfer socket binds (loopback by default).
          port: its port (default: a free one).
          timeout_s: the runtime's own timeout for a transfer's metadata exchange.

        Returns:
          The ``host:port`` set.

        Raises:
          RuntimeError: JAX has already started its backend.
        """
        import socket

        import jax

        if compat.backends_started():
            raise RuntimeError(
                "DevicePutKVPipe.enable_transfers: JAX has already started its backend; call it first thing, "
                "before spmd.init_distributed_environment() or any computation."
            )
        if port is None:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        jax.config.update("jax_cross_host_transfer_socket_address", address)
        jax.config.update("jax_cross_host_transport_addresses", f"[{host}]:0" if ":" in host else f"{host}:0")
        jax.config.update("jax_cross_host_transfer_timeout_seconds", int(timeout_s))
        return address

    # State -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Mark the pipe closed (idempotent); no resource outlives the arrays already moved."""
        self._closed = True

    def _check(self, op: str, role: str) -> None:
        if self._closed:
            why = f" ({self._fault})" if self._fault else ""
            raise ValueError(f"DevicePutKVPipe.{op}: the pipe is closed{why}.")
        if self.role != role:
            raise RuntimeError(
                f"DevicePutKVPipe.{op}: this process is the {self.role} (process "
                f"{self.src_process} -> {self.dst_process}); only the {role} may call it."
            )

    def _break(self, message: str) -> ValueError:
        """Close the pipe after metadata it cannot follow (the two sides' transfers would no longer pair up)."""
        self._fault, self._closed = message, True
        return ValueError(message + " The pipe is closed: the two sides can no longer pair their transfers.")

    # Metadata ------------------------------------------------------------------------------

    def _key(self) -> str:
        self._seq += 1
        return f"spmd/kv_transfer/{self.name}/{self._seq}"

    def _put_meta(self, meta: dict[str, Any] | str) -> None:
        """Publish the next message's metadata record (a dict, or a record already encoded).

        Raises:
          ValueError: the key is already in the store (two pipes of one name, or someone else's record).
          ConnectionError: the coordination service failed.
        """
        key = self._key()
        record = meta if isinstance(meta, str) else json.dumps(meta, separators=(",", ":"))
        try:
            compat.distributed_client().key_value_set(key, record)
        except Exception as e:  # the runtime's own error type: never handed on raw
            if "ALREADY_EXISTS" in str(e):
                raise ValueError(
                    f"DevicePutKVPipe: the key {key!r} is already in the key-value store (another pipe named "
                    f"{self.name!r}, or a record someone else wrote); give every pipe of a job its own name."
                ) from None
            raise ConnectionError(
                f"DevicePutKVPipe: the coordination service failed ({type(e).__name__}: {str(e)[:200]})."
            ) from None

    def _get_raw(self, op: str) -> str:
        """The next message's metadata record, as sent."""
        key = self._key()
        client = compat.distributed_client()
        try:
            raw = client.blocking_key_value_get(key, int(self.timeout_s * 1000))
        except Exception as e:  # the runtime raises its own type on deadline
            self._seq -= 1  # nothing consumed: the next call waits for the same message
            raise TimeoutError(
                f"DevicePutKVPipe.{op}: no message from process {self.src_process} within {self.timeout_s:g} s "
                f"({type(e).__name__}: {str(e)[:200]})."
            ) from e
        try:
            client.key_value_delete(key)
        except Exception:  # deleting is housekeeping; the message arrived
            pass
        return raw

    def _meta(self, raw: str, op: str) -> dict[str, Any]:
        return _device.meta_from(np.frombuffer(raw.encode(), np.uint8), f"DevicePutKVPipe.{op}")

    # Transfer --------------------------------------------------------------------------------

    def _move(self, src: Any, dst: Any, arrays: list[Any]) -> list[Any]:
        """ONE collective ``device_put`` of single-device arrays from device ``src`` to device ``dst``.

        The sender passes its arrays (all on ``src``), the receiver their ``(dtype, shape)``. All
        arrays of a call share one device pair: JAX pairs them up by position only within a pair.
        """
        import jax
        from jax.sharding import SingleDeviceSharding

        if self.role == "receiver":
            arrays = [
                jax.make_array_from_single_device_arrays(shape, SingleDeviceSharding(src), [], dtype=dtype)
                for dtype, shape in arrays
            ]
        elif any(x.sharding.device_set != {src} for x in arrays):  # pragma: no cover - an internal invariant
            raise RuntimeError("DevicePutKVPipe: a batched transfer mixes device pairs.")
        try:
            return jax.device_put(arrays, [SingleDeviceSharding(dst)] * len(arrays))
        except jax.errors.JaxRuntimeError as e:
            raise ConnectionError(
                f"DevicePutKVPipe: the transfer {src} -> {dst} failed ({str(e)[:300]}); the other process is "
                f"probably gone (which ends a jax.distributed job)."
            ) from None

    def send_tensor(self, tensor: Any | None) -> None:
        """Send an array (numpy or JAX) or ``None`` to the decode process; returns without waiting for it.

        Raises:
          TypeError: not an array, or a 64-bit dtype with ``jax_enable_x64`` off.
          ValueError: the pipe is closed.
        """
        import jax

        self._check("send_tensor", "sender")
        if tensor is None:
            self._put_meta({"none": True})
            return
        tensor = _arrays.as_device_array(tensor, "DevicePutKVPipe.send_tensor")
        meta: dict[str, Any] = {"none": False, "dtype": str(np.dtype(tensor.dtype)), "shape": list(np.shape(tensor))}
        if np.size(tensor) * np.dtype(tensor.dtype).itemsize <= INLINE_BYTES:
            host = _arrays.as_host_array(tensor, fn="DevicePutKVPipe.send_tensor")
            meta["data"] = base64.b64encode(host.tobytes()).decode("ascii")
            self._put_meta(meta)
            return
        self._put_meta(meta)
        self._move(self.src_devices[0], self.dst_devices[0], [jax.device_put(tensor, self.src_devices[0])])

    def recv_tensor(self) -> Any | None:
        """The next array (a ``jax.Array`` on the first decode device, maybe still arriving) or ``None``.

        Raises:
          TimeoutError: no message within ``timeout_s``.
          ValueError: the pipe is closed, malformed metadata, or the message is a KV cache (it is
            received and dropped, so the pipe stays usable).
        """
        self._check("recv_tensor", "receiver")
        raw = self._get_raw("recv_tensor")
        if raw in self._routes:  # a KV cache of a shape seen before
            self._recv_kv(raw, "recv_tensor")  # drained: both sides' transfers stay paired
            raise ValueError(
                "DevicePutKVPipe.recv_tensor: the sender sent a KV cache (send_kv_cache); receive it with "
                "recv_kv_cache. It was dropped."
            )
        meta = self._meta(raw, "recv_tensor")
        if meta.get("none") is True:
            return None
        if "kv" in meta:
            self._recv_kv(raw, "recv_tensor", meta)  # drained: both sides' transfers stay paired
            raise ValueError(
                "DevicePutKVPipe.recv_tensor: the sender sent a KV cache (send_kv_cache); receive it with "
                "recv_kv_cache. It was dropped."
            )
        return self._recv_array(meta, "recv_tensor")

    def _recv_array(self, meta: dict[str, Any], op: str) -> Any:
        import jax

        fn = f"DevicePutKVPipe.{op}"
        try:
            dtype, shape = _arrays.array_spec(meta, fn)
        except ValueError as e:
            raise self._break(str(e)) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if "data" not in meta and nbytes:
            (out,) = self._move(self.src_devices[0], self.dst_devices[0], [(dtype, shape)])
            return out
        try:
            raw = base64.b64decode(meta.get("data", ""), validate=True)
        except (TypeError, ValueError, binascii.Error) as e:
            raise ValueError(f"{fn}: malformed inline data from the peer: {e}") from None
        if len(raw) != nbytes:
            raise ValueError(f"{fn}: {len(raw)} inline bytes for {dtype}{list(shape)}; expected {nbytes}.")
        return jax.device_put(np.frombuffer(raw, dtype).reshape(shape), self.dst_devices[0])

    # KV caches: one metadata record, one transfer per device pair ------------------------------

    def send_kv_cache(self, layers: Sequence[Any], *, head_axis: int = 0) -> None:
        """Send a KV cache (see :meth:`KVPipeBase.send_kv_cache`): one record, one transfer per device pair.

        Returns once every transfer is issued (the runtime keeps the buffers it sends alive).

        Raises:
          ValueError: no layers, layers that disagree on the KV heads, a bad ``head_axis``, or a TP
            size (either side's) that does not fit the heads.
          TypeError: a layer that is not an array, or a 64-bit dtype with ``jax_enable_x64`` off.
        """
        import jax

        self._check("send_kv_cache", "sender")
        layers = list(layers)
        if not layers:
            raise ValueError("send_kv_cache: expected at least one layer, got none.")
        heads = _arrays.num_heads(layers, head_axis)
        fn = "DevicePutKVPipe.send_kv_cache"
        layers = [x if isinstance(x, jax.Array) else _arrays.as_host_array(x, fn=fn) for x in layers]
        for x in {x.dtype: x for x in layers}.values():  # one layer of each dtype
            _arrays.check_dtype(x, fn)
        src_tp, dst_tp = len(self.src_devices), len(self.dst_devices)
        kv_head_ranges(heads, src_tp)
        kv_head_ranges(heads, dst_tp)
        specs = tuple((_arrays.dtype_name(x.dtype), tuple(x.shape)) for x in layers)
        route = _route.kv_route(heads, src_tp, dst_tp, head_axis, specs)
        sharding, src = _sharding(tuple(self.src_devices), heads, head_axis), self.src_devices
        live = set(route.live)
        shards = [_route.local_shards(x, sharding, src) if i in live else None for i, x in enumerate(layers)]
        pack = self.pack
        if pack is None:
            pack = route.pieces_per_pair() >= PACK_MIN_PIECES and route.mean_piece_bytes() < PACK_BELOW_BYTES
        self._put_meta(_kv_record(route, pack))
        for s, g in route.pairs:
            arrays = _route.sender_arrays(route, shards, s, g, pack)
            self._move(self.src_devices[s], self.dst_devices[g], arrays)

    def recv_kv_cache(self, *, devices: Sequence[Any] | None = None, tp: int | None = None) -> list[Any]:
        """As :meth:`KVPipeBase.recv_kv_cache`, on this pipe's ``dst_devices``.

        Raises:
          ValueError: ``devices`` / ``tp`` other than the pipe's ``dst_devices``; the message is not
            a KV cache (a tensor is received and dropped, so the pipe stays usable); malformed metadata.
          TimeoutError: no message within ``timeout_s``.
        """
        import jax

        self._check("recv_kv_cache", "receiver")
        if devices is None and tp is not None:
            devices = jax.local_devices()[: max(int(tp), 0)]
        if devices is not None and list(devices) != self.dst_devices:
            raise ValueError("DevicePutKVPipe.recv_kv_cache: receive on the pipe's dst_devices (pass devices=None).")
        raw = self._get_raw("recv_kv_cache")
        if raw in self._routes:  # the same shapes as a KV cache before: checked then
            return self._recv_kv(raw, "recv_kv_cache")
        meta = self._meta(raw, "recv_kv_cache")
        if "kv" not in meta:
            got = "None"
            if meta.get("none") is not True:
                x = self._recv_array(meta, "recv_kv_cache")  # drained: both sides' transfers stay paired
                got = f"a tensor {x.dtype}{list(x.shape)}"
            raise ValueError(
                f"recv_kv_cache: expected the KV cache sent by send_kv_cache, got {got}; both sides must call "
                f"send_kv_cache / recv_kv_cache in the same order."
            )
        return self._recv_kv(raw, "recv_kv_cache", meta)

    def _kv_route(self, kv: Any, fn: str) -> tuple[_route.KVRoute, bool]:
        """The route (and ``pack``) a KV record names; metadata it cannot follow closes the pipe."""
        pack = kv.get("pack") if isinstance(kv, dict) else None
        try:
            if not isinstance(pack, bool):
                raise ValueError(f"{fn}: malformed KV-cache metadata (pack={pack!r}).")
            return _route.KVRoute.from_metadata(kv, len(self.src_devices), len(self.dst_devices), fn), pack
        except ValueError as e:
            raise self._break(str(e)) from None

    def _recv_kv(self, raw: str, op: str, meta: dict[str, Any] | None = None) -> list[Any]:
        """Receive the KV cache of record ``raw`` (``meta``: the record parsed, unless its route is known)."""
        if raw not in self._routes:
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()
            self._routes[raw] = self._kv_route(meta["kv"], f"DevicePutKVPipe.{op}")
        route, pack = self._routes[raw]
        devices = self.dst_devices
        arrived = {
            (s, g): self._move(self.src_devices[s], devices[g], route.buffer_specs(s, g, pack)) for s, g in route.pairs
        }
        return _route.receiver_layers(
            route, arrived, devices, pack, _sharding(tuple(devices), route.num_heads, route.head_axis)
        )


@functools.lru_cache(maxsize=64)
def _sharding(devices: tuple[Any, ...], num_heads: int, head_axis: int) -> Any:
    return kv_head_sharding(devices, num_heads, head_axis=head_axis)


@functools.lru_cache(maxsize=64)
def _kv_record(route: _route.KVRoute, pack: bool) -> str:
    """The metadata record of a KV cache: the same bytes for the same shapes (the receiver keeps its route by them)."""
    kv = {"heads": route.num_heads, "head_axis": route.head_axis, "src_tp": route.src_tp, "dst_tp": route.dst_tp}
    kv.update(pack=pack, layers=[[d, list(s)] for d, s in route.layers])
    return json.dumps({"none": False, "kv": kv}, separators=(",", ":"))
