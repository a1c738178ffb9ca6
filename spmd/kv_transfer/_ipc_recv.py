"""The receiving half of :class:`~spmd.kv_transfer.IpcKVPipe`: a staged message, once its epoch is seen, into arrays.

Where a piece lies is checked first (its staging buffer announced by a ``map`` message, the piece
inside it, and inside the real mapping on CUDA); then either the backend copies the pieces into
arrays (``receive="copy"``) or one program per receiver device reads them by address
(``receive="kernel"``, :mod:`spmd.kv_transfer._receive`). Everything here runs inside the pipe's
``_receive``, which acks the message afterwards (or drops it, acked, when this raises).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np

from kernels import peer_copy
from spmd.kv_transfer import _arrays, _receive, _route
from spmd.kv_transfer.heads import kv_head_sharding

__all__ = ["IpcReceiving"]


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class IpcReceiving:
    """Mixed into :class:`~spmd.kv_transfer.IpcKVPipe`, whose state it uses (``_maps``, ``_mem``, ``receive``...)."""

    def _init_receiving(self) -> None:
        """The receiver's state kept across messages (dropped by :meth:`_drop_receiving`)."""
        self._plans: dict[str, _Plan] = {}  # a cache's metadata (JSON) -> its checked route and plan here
        self._address_words = _receive.AddressWords()  # the kernel's address operands, per (device, addresses)
        self._room: dict[tuple[int, str], int] = {}  # (device index, handle) -> bytes its mapping is known to hold

    def _drop_receiving(self) -> None:
        self._plans, self._address_words, self._room = {}, _receive.AddressWords(), {}

    def _locate(self, desc: Any, device: Any, nbytes: int, fn: str, deadline: float) -> tuple[Any, int]:
        """``(mapping, offset)`` of a piece of ``nbytes`` named by ``desc``, after checking where it lies."""
        slot_id, off, n = (desc.get(k) if isinstance(desc, dict) else None for k in ("id", "off", "n"))
        if not all(_count(v) for v in (slot_id, off, n)) or n != nbytes:
            raise ValueError(f"{fn}: malformed piece {desc!r:.200} (expected {nbytes} bytes).")
        while slot_id not in self._maps:  # its map message was sent before the epoch: it is on its way
            self._control_message(fn, deadline)
        m = self._maps[slot_id]
        reach = peer_copy.padded_bytes(n) if self.receive == "kernel" and n else n  # (whole tiles)
        if off + reach > m["cap"]:
            raise ValueError(f"{fn}: malformed piece {desc!r:.200}: past the end of its {m['cap']}-byte staging.")
        i = self.devices.index(device)
        mapped = self._mapped.get((i, m["h"]))
        if mapped is None and self._same_process:
            mapped = m["addr"]
            if mapped <= 0:
                raise ValueError(f"{fn}: malformed staging map {m!r:.200} (no staging address).")
        elif mapped is None:
            try:
                mapped = self._mapped[(i, m["h"])] = self._mem.open(device, m["h"])
            except FileNotFoundError:
                raise ConnectionError(
                    f"{fn}: the peer closed before this message was taken (its staging {m['h']!r} is gone)."
                ) from None
        if self.receive == "kernel":
            if self._room.get((i, m["h"]), -1) < off + reach:  # (the driver asked once per mapping and extent)
                self._mem.check_room(device, mapped, off + reach)
                self._room[(i, m["h"])] = off + reach
        return mapped, off

    def _pieces(self, layout: dict, count: int, fn: str) -> list[Any]:
        pieces = layout.get("pieces")
        if not isinstance(pieces, list) or len(pieces) != count:
            raise ValueError(f"{fn}: expected {count} pieces in message {layout.get('seq')}, got {pieces!r:.200}")
        return pieces

    def _fetch(self, layout: dict, specs: list[tuple[Any, Any, tuple[int, ...]]], fn: str, deadline: float) -> list:
        """Copy the pieces ``layout`` names into new arrays (``specs``: device, dtype, shape each)."""
        out: list[Any] = []
        used: list[Any] = []
        try:
            for desc, (device, dtype, shape) in zip(self._pieces(layout, len(specs), fn), specs, strict=True):
                _arrays.check_dtype(np.empty(0, dtype), fn)  # a 64-bit array would not fit: refuse, never truncate
                nbytes = math.prod(shape) * np.dtype(dtype).itemsize
                mapped, off = self._locate(desc, device, nbytes, fn, deadline)
                out.append(self._mem.fetch(device, mapped, off, nbytes, dtype, shape))
                used.append(device)
        finally:
            self._mem.flush(list(dict.fromkeys(used)))  # no copy may still write into (dropped) arrays
        self.phases.mark("recv: copy (and wait for it)")
        return out

    def _addresses(self, layout: dict, specs: list[tuple[Any, int]], fn: str, deadline) -> list[int]:
        """The device address of every piece ``layout`` names, checked (the kernel path; ``specs``: device, bytes)."""
        out = []
        for desc, (device, nbytes) in zip(self._pieces(layout, len(specs), fn), specs, strict=True):
            mapped, off = self._locate(desc, device, nbytes, fn, deadline)
            out.append(int(mapped) + off)
        return out

    def _words(self, device: Any, addresses: list[int]) -> Any:
        """The address operand of a receive program on ``device``: made once per set of addresses, then reused."""
        return self._address_words(device, addresses)

    def _kernel_failed(self, e: Exception) -> bool:
        """Whether to fall back to ``receive="copy"`` after the kernel path raised ``e`` (once, with a warning)."""
        if not self._fallback:
            return False
        warnings.warn(
            f"IpcKVPipe: the receive kernel failed ({type(e).__name__}: {str(e)[:300]}); copying instead "
            "(IpcKVPipe(receive='copy') skips the kernel).",
            RuntimeWarning,
            stacklevel=4,
        )
        self.receive, self._fallback = "copy", False
        return True

    def _take_tensor(self, layout: dict, inline: bytes, deadline: float) -> Any:
        import jax

        fn = "IpcKVPipe.recv_tensor"
        kind = layout.get("kind")
        if kind == "none":
            return None
        if kind == "kv":
            raise ValueError(
                f"{fn}: the peer sent a KV cache (send_kv_cache); receive it with recv_kv_cache. It was dropped."
            )
        if kind != "array":
            raise ValueError(f"{fn}: malformed layout from the peer: {layout!r:.200}")
        dtype, shape = _arrays.array_spec(layout, fn)
        _arrays.check_dtype(np.empty(0, dtype), fn)
        if layout.get("inline"):
            if len(inline) != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{fn}: the inline array holds {len(inline)} bytes, not {dtype}{list(shape)}.")
            return jax.device_put(np.frombuffer(inline, dtype).reshape(shape), self.devices[0])
        spec = [(self.devices[0], dtype, shape)]
        if self.receive == "kernel" and math.prod(shape):
            addresses = self._addresses(layout, [(self.devices[0], math.prod(shape) * dtype.itemsize)], fn, deadline)
            try:
                words = self._words(self.devices[0], addresses)
                out = jax.block_until_ready(_receive.kernel_array(dtype, shape, words))
                self._fallback = False  # it compiled and ran: a later failure is a real one
                self.phases.mark("recv: read by address (one program, waited for)")
                return out
            except Exception as e:
                if not self._kernel_failed(e):
                    raise
        (out,) = self._fetch(layout, spec, fn, deadline)
        return out

    def _take_kv(self, layout: dict, deadline: float, out: Any) -> list[Any]:
        import jax

        fn = "IpcKVPipe.recv_kv_cache"
        if layout.get("kind") != "kv":
            kind = layout.get("kind")
            got = "None" if kind == "none" else f"a tensor {layout.get('dtype')}{layout.get('shape')}"
            raise ValueError(
                f"recv_kv_cache: expected the KV cache sent by send_kv_cache, got {got}; both sides must call "
                "send_kv_cache / recv_kv_cache in the same order."
            )
        plan = self._route_of(layout.get("kv"), fn)
        route = plan.route
        for dtype in plan.dtypes:
            _arrays.check_dtype(np.empty(0, dtype), fn)  # a 64-bit array would not fit: refuse, never truncate
        out = None if out is None else _receive.check_out(out, route, plan.sharding, fn)
        outs = _receive.out_shards(out, route, self.devices, plan.firsts)  # all, before any is donated
        self.phases.mark("recv: layout and route")
        if self.receive == "kernel" and route.pairs:
            flat = iter(self._addresses(layout, plan.pieces, fn, deadline))
            words = {g: self._words(self.devices[g], [next(flat) for _ in range(n)]) for g, n in plan.buffers}
            try:
                layers = self._layers(
                    plan,
                    lambda g: _receive.kernel_shards(route, g, words[g], None if outs is None else outs[g], plan.one),
                )
                self.phases.mark("recv: read by address (one program per device, dispatch)")
                jax.block_until_ready(layers)  # the staging was read: it may be acked (and reused)
                self._fallback = False
                self.phases.mark("recv: wait for the program")
                return layers
            except Exception as e:
                if not self._kernel_failed(e):
                    raise
        flat = iter(self._fetch(layout, plan.wanted, fn, deadline))
        arrived = {(s_, g): [next(flat) for _ in route.buffer_specs(s_, g, True)] for s_, g in route.pairs}

        def shards_of(g: int) -> list[Any]:
            flats = [x for s_, gg in route.pairs if gg == g for x in arrived[(s_, gg)]]
            return _receive.unpack_shards(route, g, flats, None if outs is None else outs[g], plan.one)

        layers = self._layers(plan, shards_of)
        self.phases.mark("recv: unpack (dispatch)")
        return layers

    def _route_of(self, kv: Any, fn: str) -> _Plan:
        """The checked route of a cache's metadata and its plan here, remembered by its JSON (once per shape)."""
        plans = self._plans
        key = json.dumps(kv, separators=(",", ":"))
        plan = plans.get(key)
        if plan is None:
            plan = _Plan(_route.KVRoute.from_metadata(kv, self.peer_tp, len(self.devices), fn), self.devices)
            if len(plans) >= 64:
                plans.clear()
            plans[key] = plan
        return plan

    def _layers(self, plan: _Plan, shards_of: Any) -> list[Any]:
        """Every layer, from ``shards_of(receiver rank)``; with one device, its outputs are the live layers already."""
        import jax
        import jax.numpy as jnp

        route = plan.route
        if plan.one is None:
            return _route.receiver_layers(route, None, self.devices, True, plan.sharding, shards_of)
        if not route.empty:
            return shards_of(0)
        layers = dict(zip(route.live, shards_of(0) if route.live else [], strict=True))
        for i in route.empty:
            dtype, shape = route.layers[i]
            layers[i] = jax.device_put(jnp.zeros(shape, dtype), plan.sharding)
        return [layers[i] for i in range(len(route.layers))]


class _Plan:
    """What receiving the caches of one route takes on this pipe's devices, worked out once per route.

    Attributes:
      route: the :class:`~spmd.kv_transfer._route.KVRoute`.
      sharding: the layers' KV-head sharding over the devices; ``one``: the same with ONE device (the
        programs then give the layers themselves), else ``None``.
      firsts: the first receiver rank of each distinct head group (the ranks that receive).
      wanted: ``(device, dtype, shape)`` of every staged buffer, in layout order; ``pieces``: ``(device, bytes)``.
      buffers: ``(rank, number of buffers)`` per receiving rank, in layout order.
      dtypes: the buffers' distinct dtypes.
    """

    def __init__(self, route: _route.KVRoute, devices: list[Any]) -> None:
        self.route = route
        self.sharding = kv_head_sharding(devices, route.num_heads, head_axis=route.head_axis)
        self.one = self.sharding if len(devices) == 1 else None
        self.firsts = [ranks[0] for _, _, ranks in route.groups]
        self.wanted = [
            (devices[g], dtype, shape) for s_, g in route.pairs for dtype, shape in route.buffer_specs(s_, g, True)
        ]
        self.pieces = [(device, math.prod(shape) * np.dtype(dtype).itemsize) for device, dtype, shape in self.wanted]
        self.buffers = [(g, len(_receive.buffers(route, g))) for g in self.firsts]
        self.dtypes = list(dict.fromkeys(dtype for _, dtype, _ in self.wanted))
