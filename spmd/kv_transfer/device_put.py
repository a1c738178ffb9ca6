"""``DevicePutKVPipe``: device to device between the prefill and decode process meshes of ONE job.

Both sides run in one ``jax.distributed`` job, on disjoint sets of processes (here: one process
each, with any number of devices). An array moves with a cross-process ``jax.device_put``: the
sender and the receiver both call it on the same global array, and the runtime copies the bytes
device to device. JAX requires the source and target shardings to be the same (same HLO
sharding, different devices), so every transfer here is single device to single device:

* ``send_tensor(x)``: ``x`` is gathered onto the sender's first device and lands on the
  receiver's first device;
* ``send_kv_cache(layers)``: each layer is cut by KV heads into one piece per head group of the
  RECEIVER's TP size (see :mod:`spmd.kv_transfer._device`), so the TP sizes may differ, and
  ``recv_kv_cache`` reassembles the pieces into a head-sharded array (replicated heads included).

Dtype and shape go first, as JSON, through the coordination service's key-value store, with a
timeout; the receiver starts its half of the transfer only when they have arrived. On CPU the
runtime needs its socket transfer switched on BEFORE JAX starts:
:meth:`DevicePutKVPipe.enable_transfers` (``jax_cross_host_transfer_socket_address``, transport
addresses and the transfer timeout). Works on JAX 0.10.2 and 0.12 (CPU).

A process that dies mid-transfer takes the whole ``jax.distributed`` job down (its coordination
service ends every task): that is JAX's failure model for one job, not something a pipe can mend.
Use :class:`TransferServerKVPipe` between independent processes when the two sides must fail apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from spmd import compat
from spmd.kv_transfer import _device
from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.tcp import as_host_array

__all__ = ["DevicePutKVPipe"]


class DevicePutKVPipe(KVPipeBase):
    """A KV pipe from ``src_devices`` (prefill) to ``dst_devices`` (decode) of one multi-process job.

    Every process of the two sides constructs it with the same arguments; the process owning
    ``src_devices`` sends, the one owning ``dst_devices`` receives.

    Args:
      src_devices: the prefill worker's devices, in TP rank order (all of one process).
      dst_devices: the decode worker's devices, in TP rank order (all of one other process).
      timeout_s: how long a receiver waits for the next message's metadata.
      name: tells pipes apart in the key-value store (two pipes at once need two names).

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
        self.timeout_s, self.name = float(timeout_s), name
        self._seq = 0
        self._closed = False

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
            raise ValueError(f"DevicePutKVPipe.{op}: the pipe is closed.")
        if self.role != role:
            raise RuntimeError(
                f"DevicePutKVPipe.{op}: this process is the {self.role} (process "
                f"{self.src_process} -> {self.dst_process}); only the {role} may call it."
            )

    # Metadata ------------------------------------------------------------------------------

    def _key(self) -> str:
        self._seq += 1
        return f"spmd/kv_transfer/{self.name}/{self._seq}"

    def _put_meta(self, meta: dict[str, Any]) -> None:
        compat.distributed_client().key_value_set(self._key(), json.dumps(meta))

    def _get_meta(self, op: str) -> dict[str, Any]:
        key = self._key()
        client = compat.distributed_client()
        try:
            raw = client.blocking_key_value_get(key, int(self.timeout_s * 1000))
        except Exception as e:  # the runtime raises its own type on deadline
            raise TimeoutError(
                f"DevicePutKVPipe.{op}: no message from process {self.src_process} within {self.timeout_s:g} s "
                f"({type(e).__name__}: {str(e)[:200]})."
            ) from e
        try:
            client.key_value_delete(key)
        except Exception:  # deleting is housekeeping; the message arrived
            pass
        return _device.meta_from(np.frombuffer(raw.encode(), np.uint8), f"DevicePutKVPipe.{op}")

    # Transfer --------------------------------------------------------------------------------

    def _move(self, pieces: list[Any] | None, specs: list[tuple[Any, tuple[int, ...], Any]], dst: list[Any]) -> list:
        """The collective ``device_put`` of single-device pieces (sender: ``pieces``; receiver: ``None``)."""
        import jax
        from jax.sharding import SingleDeviceSharding

        if pieces is None:
            pieces = [
                jax.make_array_from_single_device_arrays(shape, SingleDeviceSharding(dev), [], dtype=dtype)
                for dtype, shape, dev in specs
            ]
        out = []
        for piece, d in zip(pieces, dst, strict=True):
            # One transfer at a time, each finished before the next starts: a batched device_put
            # of several cross-process pieces can pair them up wrongly (seen on JAX 0.10.2, CPU).
            moved = jax.device_put(piece, SingleDeviceSharding(d))
            if moved.is_fully_addressable:
                moved.block_until_ready()
            out.append(moved)
        return out

    def send_tensor(self, tensor: Any | None) -> None:
        """Send an array (numpy or JAX) or ``None`` to the decode process.

        Raises:
          TypeError: not an array, or a 64-bit dtype with ``jax_enable_x64`` off.
          ValueError: the pipe is closed.
        """
        import jax

        self._check("send_tensor", "sender")
        if tensor is None:
            self._put_meta({"none": True})
            return
        if not isinstance(tensor, jax.Array):
            tensor = as_host_array(tensor, fn="DevicePutKVPipe.send_tensor")
        _device.check_dtype(tensor, "DevicePutKVPipe.send_tensor")
        meta = {"none": False, "dtype": str(np.dtype(tensor.dtype)), "shape": list(np.shape(tensor))}
        self._put_meta(meta)
        if np.size(tensor):
            self._move([jax.device_put(tensor, self.src_devices[0])], [], [self.dst_devices[0]])

    def recv_tensor(self) -> Any | None:
        """The next array (a ``jax.Array`` on the first decode device) or ``None``.

        Raises:
          TimeoutError: no message within ``timeout_s``.
          ValueError: the pipe is closed, or malformed metadata.
        """
        import jax.numpy as jnp

        self._check("recv_tensor", "receiver")
        meta = self._get_meta("recv_tensor")
        if meta.get("none") is True:
            return None
        dtype, shape = _device.array_spec(meta, "DevicePutKVPipe.recv_tensor")
        if not int(np.prod(shape)):
            import jax

            return jax.device_put(jnp.zeros(shape, dtype), self.dst_devices[0])
        (out,) = self._move(None, [(dtype, shape, self.src_devices[0])], [self.dst_devices[0]])
        return out

    # KV caches: one piece per receiver head group -------------------------------------------

    def _send_kv_layer(self, layer: Any, head_axis: int) -> None:
        import jax

        if not isinstance(layer, jax.Array):
            layer = as_host_array(layer, fn="DevicePutKVPipe.send_kv_cache")
        _device.check_dtype(layer, "DevicePutKVPipe.send_kv_cache")
        self._put_meta({"none": False, "dtype": str(np.dtype(layer.dtype)), "shape": list(np.shape(layer))})
        if not np.size(layer):
            return
        heads = int(np.shape(layer)[head_axis])
        pieces = _device.sender_pieces(layer, head_axis, self.src_devices, len(self.dst_devices))
        dst = [self.dst_devices[ranks[0]] for _, _, ranks in _device.groups(heads, len(self.dst_devices))]
        self._move(pieces, [], dst)

    def _recv_kv_layer(self, sharding: Any, devices: list[Any], num_heads: int, head_axis: int) -> Any:
        import jax
        import jax.numpy as jnp

        if devices != self.dst_devices:
            raise ValueError("DevicePutKVPipe.recv_kv_cache: receive on the pipe's dst_devices (pass devices=None).")
        meta = self._get_meta("recv_kv_cache")
        dtype, shape = _device.array_spec(meta, "DevicePutKVPipe.recv_kv_cache")
        if len(shape) <= head_axis or shape[head_axis] != num_heads:
            raise ValueError(f"DevicePutKVPipe.recv_kv_cache: a layer of shape {list(shape)}, not {num_heads} heads.")
        if not int(np.prod(shape)):
            return jax.device_put(jnp.zeros(shape, dtype), sharding)
        tp, src_tp = len(devices), len(self.src_devices)
        specs = [
            (
                dtype,
                _device.piece_shape(shape, head_axis, a, b),
                self.src_devices[_device.source_rank(num_heads, src_tp, tp, ranks[0])],
            )
            for a, b, ranks in _device.groups(num_heads, tp)
        ]
        dst = [devices[ranks[0]] for _, _, ranks in _device.groups(num_heads, tp)]
        pieces = self._move(None, specs, dst)
        return _device.assemble(pieces, sharding, devices, shape, head_axis)

    def recv_kv_cache(self, *, devices: Sequence[Any] | None = None, tp: int | None = None) -> list[Any]:
        """As :meth:`KVPipeBase.recv_kv_cache`, on this pipe's ``dst_devices``."""
        if devices is None and tp is None:
            devices = self.dst_devices
        return super().recv_kv_cache(devices=devices, tp=tp)
