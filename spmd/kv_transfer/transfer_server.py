"""``TransferServerKVPipe``: device to device between INDEPENDENT processes (no shared job).

Each side runs ``jax.experimental.transfer`` servers (bound to ``host``, loopback by default) and a
small :class:`TCPKVPipe` control channel joins them (HMAC with a ``secret``). At construction the
two sides swap their TP sizes over the control pipe; the pipe works both ways.

``send_tensor(x)``: the sender registers ``x`` (on one of its devices) under a fresh random 63-bit
id with ``await_pull`` and sends ``{"id", "server", "dtype", "shape"}`` as JSON over the control
pipe; the receiver ``pull``\\ s it with the shape and the single-device sharding it wants, and waits
for it (:mod:`spmd.kv_transfer._transfer`). ``send_kv_cache`` registers one piece per head group of
the RECEIVER's TP size (:mod:`spmd.kv_transfer._device`), so the TP sizes may differ. Empty arrays
never touch the transfer server (the runtime hangs on them); the receiver makes them.

No stranded buffers: an array registered but never pulled is released at most ``2 x timeout_s + 2``
seconds after it was sent (its holding server is dropped), and at the latest when the pipe closes. A
receive waits at most ``timeout_s`` for the arrays (``TimeoutError``; the pipe stays usable); an id
pulled before is refused at once (``ValueError``); a transfer that breaks is a ``ConnectionError``,
never JAX's raw ``JaxRuntimeError``. Failures on the control channel are :class:`TCPKVPipe`'s
(timeouts, peer gone, garbage). Works on JAX 0.10.2 and 0.12 (CPU).

JAX's transfer socket accepts connections from anyone who can reach it, and a malformed packet
aborts the whole process (a ``CHECK`` in its socket server): see docs/kv_transfer.md, "Threat model".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from spmd.kv_transfer import _arrays, _device, _transfer
from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.tcp import TCPKVPipe
from spmd.net import route_address

__all__ = ["TransferServerKVPipe"]


class TransferServerKVPipe(KVPipeBase):
    """A two-way KV pipe between independent processes on ``jax.experimental.transfer``.

    Args:
      host, port, role, timeout_s, secret: the control channel's (see :class:`TCPKVPipe`); the
        server's transfer server binds ``host`` too, the client's its own address on the route to ``host``.
      devices: this side's devices in TP rank order (default: all local devices).

    Raises:
      As :class:`TCPKVPipe` for the control channel; ``RuntimeError`` when this JAX has no
      ``jax.experimental.transfer``.
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
    ) -> None:
        import jax

        deadline = time.monotonic() + timeout_s if isinstance(timeout_s, (int, float)) else None  # one for all
        try:
            from jax.experimental import transfer
        except ImportError as e:  # pragma: no cover - every supported JAX has it
            raise RuntimeError(
                f"TransferServerKVPipe: this JAX ({jax.__version__}) has no jax.experimental.transfer."
            ) from e
        self.devices = list(jax.local_devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("TransferServerKVPipe: expected at least one device.")
        self.timeout_s = float(timeout_s)
        self._control = TCPKVPipe(host, port, role=role, timeout_s=timeout_s, secret=secret, deadline=deadline)
        self._servers: _transfer.Servers | None = None
        try:
            local = host if role == "server" else (route_address(host, port) or host)  # the client's own address
            bind = f"[{local}]:0" if ":" in local else f"{local}:0"
            client = self.devices[0].client
            self._servers = _transfer.Servers(
                lambda: transfer.start_transfer_server(client, bind, [bind]), self.timeout_s, "TransferServerKVPipe"
            )
            self._control.send_tensor(_device.meta_bytes({"tp": len(self.devices)}))
            hello = _device.meta_from(self._control.recv_tensor(deadline=deadline), "TransferServerKVPipe")
            self.peer_tp = hello.get("tp")
            if not isinstance(self.peer_tp, int) or isinstance(self.peer_tp, bool) or self.peer_tp < 1:
                raise ValueError(f"TransferServerKVPipe: malformed hello from the peer: {hello!r:.200}")
        except BaseException:
            self.close()
            raise

    # State -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._control.closed

    def close(self) -> None:
        """Close the control pipe and drop the transfer servers (and every array they still hold); idempotent."""
        self._control.close()
        if self._servers is not None:
            self._servers.close()

    def _live(self, op: str) -> None:
        if self._control.closed:
            raise ValueError(f"TransferServerKVPipe.{op}: the pipe is closed.")

    # Sending ---------------------------------------------------------------------------------

    def send_tensor(self, tensor: Any | None) -> None:
        """Register an array (or send ``None``) for the peer to pull.

        Raises:
          TypeError: not an array, or a 64-bit dtype with ``jax_enable_x64`` off.
          ValueError: the pipe is closed. ConnectionError / TimeoutError: the control pipe failed
            (ConnectionError also: JAX's transfer server failed).
        """
        import jax

        self._live("send_tensor")
        if tensor is None:
            self._control.send_tensor(None)
            return
        x = _arrays.as_device_array(tensor, "TransferServerKVPipe.send_tensor")
        meta = {"dtype": str(np.dtype(x.dtype)), "shape": list(np.shape(x)), "id": None}
        if np.size(x):
            meta.update(self._servers.register([jax.device_put(x, self.devices[0])]))
        self._control.send_tensor(_device.meta_bytes(meta))

    def _send_kv_layer(self, layer: Any, head_axis: int) -> None:
        x = _arrays.as_device_array(layer, "TransferServerKVPipe.send_kv_cache")
        meta = {"dtype": str(np.dtype(x.dtype)), "shape": list(np.shape(x)), "id": None}
        if np.size(x):
            meta.update(self._servers.register(_device.sender_pieces(x, head_axis, self.devices, self.peer_tp)))
        self._control.send_tensor(_device.meta_bytes(meta))

    # Receiving -------------------------------------------------------------------------------

    def _recv_meta(self, fn: str) -> dict[str, Any] | None:
        self._live(fn)
        raw = self._control.recv_tensor()
        if raw is None:
            return None
        return _device.meta_from(raw, f"TransferServerKVPipe.{fn}")

    def recv_tensor(self) -> Any | None:
        """Pull the next array (a ``jax.Array`` on this side's first device), or ``None``.

        Raises:
          TimeoutError: nothing on the control pipe within ``timeout_s``, or the arrays did not arrive
            within ``timeout_s`` (the message is lost; the pipe stays usable).
          ConnectionError: the peer is gone, or the transfer broke.
          ValueError: closed, malformed metadata, or an id this pipe pulled before (a replay).
        """
        import jax
        import jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding

        meta = self._recv_meta("recv_tensor")
        if meta is None:
            return None
        dtype, shape = _arrays.array_spec(meta, "TransferServerKVPipe.recv_tensor")
        if meta["id"] is None:
            return jax.device_put(jnp.zeros(shape, dtype), self.devices[0])
        spec = jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(self.devices[0]))
        (out,) = self._servers.pull(meta, [spec], "TransferServerKVPipe.recv_tensor")
        return out

    def _recv_kv_layer(self, sharding: Any, devices: list[Any], num_heads: int, head_axis: int) -> Any:
        import jax
        import jax.numpy as jnp
        from jax.sharding import SingleDeviceSharding

        if devices != self.devices:
            raise ValueError(
                f"TransferServerKVPipe.recv_kv_cache: the sender cut the cache for {len(self.devices)} devices "
                f"(this pipe's devices); receive with devices=None."
            )
        meta = self._recv_meta("recv_kv_cache")
        if meta is None:
            raise ValueError("TransferServerKVPipe.recv_kv_cache: expected a KV layer, got None.")
        dtype, shape = _arrays.array_spec(meta, "TransferServerKVPipe.recv_kv_cache")
        if len(shape) <= head_axis or shape[head_axis] != num_heads:
            raise ValueError(
                f"TransferServerKVPipe.recv_kv_cache: a layer of shape {list(shape)}, not {num_heads} heads."
            )
        if meta["id"] is None:
            return jax.device_put(jnp.zeros(shape, dtype), sharding)
        groups = _device.groups(num_heads, len(devices))
        specs = [
            jax.ShapeDtypeStruct(
                _device.piece_shape(shape, head_axis, a, b), dtype, sharding=SingleDeviceSharding(devices[ranks[0]])
            )
            for a, b, ranks in groups
        ]
        pieces = self._servers.pull(meta, specs, "TransferServerKVPipe.recv_kv_cache")
        return _device.assemble(pieces, sharding, devices, shape, head_axis)

    def recv_kv_cache(self, *, devices: Sequence[Any] | None = None, tp: int | None = None) -> list[Any]:
        """As :meth:`KVPipeBase.recv_kv_cache`, on this pipe's ``devices`` (the sender cut the cache for them)."""
        if devices is None and tp is None:
            devices = self.devices
        return super().recv_kv_cache(devices=devices, tp=tp)
