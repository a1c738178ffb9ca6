"""Handles on IpcKVPipe's programs for measuring its host work (``spmd.bench.kv_host``, ``spmd.bench.kv_dispatch``).

Not for pipes in use: :func:`stand_in_kernel` swaps the receive kernel for an XLA op that reads
NOTHING (so the kernel path's host work can be timed on CPU, where the Mosaic GPU kernel cannot
run), until the function it returns is called.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Any

from kernels import peer_copy
from spmd.kv_transfer import _receive, _route, _shared_memory

__all__ = ["address_operand", "array_program", "pack_program", "receive_program", "stand_in_kernel"]


def _stand_in_copy(words: Any, nbytes: int) -> Any:
    import jax.numpy as jnp

    return jnp.zeros(peer_copy.padded_bytes(nbytes) // 4, jnp.uint32) + words[0].astype(jnp.uint32)


def stand_in_kernel(*, map_staging: bool = True) -> Callable[[], None]:
    """Make the receive kernel an XLA op of its shape that reads nothing; returns the function that undoes it.

    Args:
      map_staging: also open ``/dev/shm`` staging by address (mapped here), as the kernel path opens
        CUDA staging, so ``IpcKVPipe(receive="kernel")`` runs on CPU devices.
    """
    shm = _shared_memory.Shm
    saved = (_receive.COPY, shm.open, shm.close_mapping, getattr(shm, "check_room", None))
    held: list[Any] = []

    def open_by_address(self: Any, device: Any, handle: str) -> int:
        if not _shared_memory.shm_name(handle):
            raise ValueError(f"stand_in_kernel: malformed shared-memory name {handle!r:.80}")
        fd = os.open(os.path.join(self.dir, handle), os.O_RDWR | os.O_NOFOLLOW)
        try:
            m = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(m)
        held.append((m, anchor))
        return ctypes.addressof(anchor)

    _receive.COPY = _stand_in_copy
    if map_staging:
        shm.open, shm.close_mapping = open_by_address, lambda self, device, mapped: None
        shm.check_room = lambda self, device, mapped, end: None

    def undo() -> None:
        _receive.COPY, shm.open, shm.close_mapping, check_room = saved
        if check_room is not None:
            shm.check_room = check_room
        elif "check_room" in vars(shm):
            delattr(shm, "check_room")

    return undo


def receive_program(layers: tuple[tuple[str, tuple[int, ...]], ...], heads: int, device: Any) -> Any:
    """The jitted program a one-device receiver runs for a cache of ``layers`` (``(dtype name, shape)`` each)."""
    import jax

    route = _route.kv_route(heads, 1, 1, 0, tuple(layers))
    return _receive._kernel_fn(route, 0, False, jax.sharding.SingleDeviceSharding(device))


def pack_program(layers: tuple[tuple[str, tuple[int, ...]], ...], heads: int) -> Any:
    """The jitted program a one-device sender runs to pack a cache of ``layers`` into one buffer."""
    return _route._pack_fn(_route.kv_route(heads, 1, 1, 0, tuple(layers)), 0, 0, True)


def array_program(dtype: str, shape: tuple[int, ...]) -> Any:
    """The jitted program ``recv_tensor`` runs for one array read by address."""
    return _receive._array_fn(dtype, tuple(shape))


def address_operand(addresses: Sequence[int], device: Any) -> Any:
    """The programs' address operand (``int32[n, 2]``) on ``device``, made now (the pipe keeps one per slot)."""
    import jax

    return jax.device_put(_receive.address_words(addresses), device)
