"""``KVPipeBase``: the seed's KV-cache pipe interface, and the KV-cache helpers every pipe shares.

A pipe is an ordered, point-to-point channel of arrays between a prefill worker and a decode
worker: ``send_tensor(x)`` on one side, ``recv_tensor()`` on the other, in the same order.
``None`` travels as a flag of the message, never as a sentinel value, so every array (zeros,
``-1``, empty) comes back as itself. ``close()`` may be called any number of times.

On top of single arrays, :meth:`KVPipeBase.send_kv_cache` / :meth:`KVPipeBase.recv_kv_cache`
move a KV cache laid out per layer as ``[kv_heads, tokens, head_dim]`` (the head axis is a
parameter) and hand it to the receiver split by KV heads for ITS tensor-parallel size, which need
not be the sender's (see :mod:`spmd.kv_transfer.heads`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from spmd.kv_transfer._arrays import num_heads
from spmd.wire import ALLOWED_DTYPES

__all__ = ["ALLOWED_DTYPES", "KVPipeBase"]


# The KV-cache preamble: int32[_KV_MAGIC, version, num_layers, num_kv_heads, head_axis]
# (int32, not int64: device pipes cannot hold int64 without jax_enable_x64).
_KV_MAGIC = 0x4B5643  # "KVC"
_KV_VERSION = 1


class KVPipeBase(abc.ABC):
    """An ordered point-to-point channel of arrays (or ``None``) between two workers.

    Subclasses implement :meth:`send_tensor`, :meth:`recv_tensor` and :meth:`close`. Pipes are
    context managers (``with TCPKVPipe(...) as pipe:``), closed on exit.
    """

    @abc.abstractmethod
    def send_tensor(self, tensor: Any | None) -> None:
        """Send one array, or ``None``; arrives after everything sent before it.

        Raises:
          TypeError: not an array (or of a dtype that cannot travel).
          ConnectionError / TimeoutError: the send failed; it is never swallowed.
        """

    @abc.abstractmethod
    def recv_tensor(self) -> Any | None:
        """The next array (or ``None``) the peer sent.

        Raises:
          TimeoutError: nothing arrived within the pipe's timeout.
          ConnectionError: the peer went away.
          ValueError: the pipe is closed, or what arrived is not a valid message.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the pipe's resources; idempotent."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether :meth:`close` has run (or a fault closed the pipe)."""

    def __enter__(self) -> KVPipeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # KV caches -------------------------------------------------------------------------------

    def send_kv_cache(self, layers: Sequence[Any], *, head_axis: int = 0) -> None:
        """Send a KV cache, one array per layer, each with its KV heads on ``head_axis``.

        A layer may be a numpy array or a (possibly head-sharded) ``jax.Array`` holding every KV
        head, e.g. ``bf16[kv_heads, tokens, head_dim]``; the receiver splits it for its own TP size.

        Raises:
          ValueError: no layers, layers that disagree on the number of KV heads, or a bad ``head_axis``.
        """
        layers = list(layers)
        if not layers:
            raise ValueError("send_kv_cache: expected at least one layer, got none.")
        heads = num_heads(layers, head_axis)
        self.send_tensor(np.array([_KV_MAGIC, _KV_VERSION, len(layers), heads, head_axis], np.int32))
        for layer in layers:
            self._send_kv_layer(layer, head_axis)

    def recv_kv_cache(self, *, devices: Sequence[Any] | None = None, tp: int | None = None) -> list[Any]:
        """Receive a KV cache sent with :meth:`send_kv_cache`, split by KV heads over ``devices``.

        Args:
          devices: this worker's TP devices, in rank order (default: the first ``tp`` local devices).
          tp: how many of the local devices to use when ``devices`` is not given (default: all).

        Returns:
          One ``jax.Array`` per layer, sharded by :func:`kv_head_sharding`: TP rank ``r`` holds the
          KV heads :func:`kv_head_ranges` gives it (heads are replicated when ``tp > kv_heads``).

        Raises:
          ValueError: the first message is not a KV-cache preamble, or the TP size does not fit the heads.
        """
        import jax

        from spmd.kv_transfer import heads as _heads

        meta = self.recv_tensor()
        meta = None if meta is None else np.asarray(meta)
        if meta is None or meta.dtype != np.int32 or meta.shape != (5,) or int(meta[0]) != _KV_MAGIC:
            raise ValueError(
                f"recv_kv_cache: expected the KV-cache preamble sent by send_kv_cache, got "
                f"{'None' if meta is None else f'{meta.dtype}{list(meta.shape)}'}; both sides must call "
                f"send_kv_cache / recv_kv_cache in the same order."
            )
        _, version, num_layers, num_heads, head_axis = (int(v) for v in meta)
        if version != _KV_VERSION or num_layers < 1 or num_heads < 1 or head_axis < 0:
            raise ValueError(f"recv_kv_cache: unsupported KV-cache preamble {meta.tolist()}.")
        if devices is None:
            local = jax.local_devices()
            n = len(local) if tp is None else tp
            if not 1 <= n <= len(local):
                raise ValueError(f"recv_kv_cache: tp={tp} but this process has {len(local)} local devices.")
            devices = local[:n]
        devices = list(devices)
        sharding = _heads.kv_head_sharding(devices, num_heads, head_axis=head_axis)
        return [self._recv_kv_layer(sharding, devices, num_heads, head_axis) for _ in range(num_layers)]

    def _send_kv_layer(self, layer: Any, head_axis: int) -> None:
        """Send one layer (subclasses that move device buffers directly override this)."""
        self.send_tensor(layer)

    def _recv_kv_layer(self, sharding: Any, devices: list[Any], num_heads: int, head_axis: int) -> Any:
        """Receive one layer and place it split by heads (subclasses may override)."""
        import jax

        layer = self.recv_tensor()
        if layer is None or np.ndim(layer) <= head_axis or np.shape(layer)[head_axis] != num_heads:
            raise ValueError(
                f"recv_kv_cache: expected a layer with {num_heads} KV heads on axis {head_axis}, got "
                f"{'None' if layer is None else list(np.shape(layer))}."
            )
        return jax.device_put(layer, sharding)
