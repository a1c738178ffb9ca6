"""IpcKVPipe's receiver: one jitted program per receiver device turns a staged KV cache into every layer's shard.

Two ways to read the staging (``receive`` of :class:`~spmd.kv_transfer.IpcKVPipe`):

* ``"kernel"`` (CUDA): the program reads the sender's staging BY ADDRESS (:func:`kernels.peer_copy.copy_from_address`,
  the mapped addresses as an ``int32[buffers, 2]`` operand), cuts every layer's shard out of it and
  returns them: one dispatch per receiver device, no per-array host work, no destination fill.
  The address operand is a device array the pipe builds ONCE per set of addresses
  (:class:`AddressWords`: the staging slots are reused, so their addresses repeat) and passes to
  every message's call: no host-to-device copy per message;
* ``"copy"``: the pieces are first copied into arrays by the backend (``cuMemcpyDtoDAsync``, or
  ``pread`` from ``/dev/shm``), then one jitted program cuts the layers out of them.

Either way, with ``out=`` (a cache of the same layers, as a previous ``recv_kv_cache`` returned it)
the program DONATES ``out``'s buffers: the layers are written into them (XLA aliases each output to
the donated input of its shape) and ``out`` may not be used afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels import peer_copy
from spmd.kv_transfer import _route

__all__ = ["RECEIVE", "AddressWords", "address_words", "check_out", "kernel_array", "kernel_shards", "out_shards"]
__all__ += ["unpack_shards"]

RECEIVE = ("auto", "kernel", "copy")
COPY = peer_copy.copy_from_address  # (tests put a host reference here)


def buffers(route: _route.KVRoute, g: int) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """``(dtype, shape)`` of every staged buffer receiver ``g`` reads, in layout order (its pairs, then carriers)."""
    return [spec for s, gg in route.pairs if gg == g for spec in route.buffer_specs(s, gg, True)]


def _as_carrier(raw: Any, dtype: np.dtype, count: int) -> Any:
    """The first ``count`` elements of ``dtype`` (an unsigned carrier) in the ``uint32`` words ``raw``."""
    import jax

    size = dtype.itemsize
    if size == 4:
        x = raw
    elif size < 4:
        x = jax.lax.bitcast_convert_type(raw, dtype).reshape(-1)
    else:
        x = jax.lax.bitcast_convert_type(raw.reshape(-1, size // 4), dtype)
    return x[:count]


def _jit(fn: Any, route: _route.KVRoute, donate: int, sharding: Any) -> Any:
    """``jax.jit(fn)``, donating arguments ``donate..`` (kept, though unused) and placing every output by ``sharding``.

    With ``sharding`` (a receiver of ONE device) the program's outputs are already the layers as
    ``recv_kv_cache`` returns them: no per-layer assembly afterwards.
    """
    import jax

    kw: dict[str, Any] = {}
    if donate:
        kw.update(donate_argnums=tuple(range(donate, donate + len(route.live))), keep_unused=True)
    if sharding is not None:
        kw.update(out_shardings=(sharding,) * len(route.live))
    return jax.jit(fn, **kw)


@functools.lru_cache(maxsize=256)
def _kernel_fn(route: _route.KVRoute, g: int, donate: bool, sharding: Any) -> Any:
    specs = buffers(route, g)
    unpack = _route.unpack_fn(route, g, True)

    def fn(words: Any, *outs: Any) -> tuple[Any, ...]:
        flats = []
        for j, (dtype, shape) in enumerate(specs):
            count = int(np.prod(shape))
            flats.append(_as_carrier(COPY(words[j], count * dtype.itemsize), dtype, count))
        return unpack(*flats)

    return _jit(fn, route, 1 if donate else 0, sharding)


def address_words(addresses: Sequence[int]) -> np.ndarray:
    """``int32[len(addresses), 2]``: each address as its low and high 32-bit words (the kernel's operand)."""
    return np.array([[a & 0xFFFFFFFF, a >> 32] for a in addresses], np.uint32).view(np.int32)


class AddressWords:
    """The receive programs' address operands on their devices, made once per (device, addresses) and kept.

    A pipe's staging slots are reused message after message, so the same addresses come back: the
    operand is copied to the device the first time (one ``jax.device_put``) and the same device
    array is passed to every later call, with no host-to-device copy on the data path. Holds at
    most ``limit`` operands (all are dropped when a new one would pass it: slots that grew).
    """

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._held: dict[tuple[Any, tuple[int, ...]], Any] = {}
        self.built = 0  # operands copied to a device so far (tests: not one per message)

    def __call__(self, device: Any, addresses: Sequence[int]) -> Any:
        """The device array of ``addresses`` (:func:`address_words`) on ``device``."""
        key = (device, tuple(addresses))
        words = self._held.get(key)
        if words is None:
            import jax

            if len(self._held) >= self.limit:
                self._held.clear()
            words = self._held[key] = jax.device_put(address_words(key[1]), device)
            self.built += 1
        return words


def kernel_shards(route: _route.KVRoute, g: int, words: Any, outs: list[Any] | None, sharding: Any = None) -> list[Any]:
    """Receiver ``g``'s shard of every live layer, read from the staged buffers whose addresses are ``words``.

    ``words``: the buffers' addresses as an ``int32[buffers, 2]`` device array on receiver ``g``'s
    device (:class:`AddressWords`). ``outs``: receiver ``g``'s shards of the ``out`` cache (donated),
    or ``None``. ``sharding``: place the outputs so (a receiver of one device: the layers themselves).
    """
    return list(_kernel_fn(route, g, outs is not None, sharding)(words, *(outs or ())))


@functools.lru_cache(maxsize=256)
def _unpack_fn(route: _route.KVRoute, g: int, donate: bool, sharding: Any) -> Any:
    unpack = _route.unpack_fn(route, g, True)
    if donate:
        return _jit(lambda flats, *outs: unpack(*flats), route, 1, sharding)
    return _jit(lambda flats: unpack(*flats), route, 0, sharding)


def unpack_shards(
    route: _route.KVRoute, g: int, flats: list[Any], outs: list[Any] | None, sharding: Any = None
) -> list[Any]:
    """Receiver ``g``'s shard of every live layer from the buffers copied to it (``flats``), into ``outs`` if given."""
    return list(_unpack_fn(route, g, outs is not None, sharding)(flats, *(outs or ())))


def _placed(have: Any, want: Any, ndim: int) -> bool:
    """Whether sharding ``have`` places an array as ``want`` does (the cheap checks first: a cache as returned)."""
    return have is want or have == want or have.is_equivalent_to(want, ndim)


def check_out(out: Any, route: _route.KVRoute, sharding: Any, fn: str) -> list[Any]:
    """``out`` as a list, checked against the cache being received (dtypes, shapes, KV-head sharding).

    Raises:
      ValueError: another number of layers, a layer of another dtype, shape or placement.
    """
    import jax

    out = list(out)
    if len(out) != len(route.layers):
        raise ValueError(f"{fn}: out has {len(out)} layers, the cache sent has {len(route.layers)}.")
    for i, (x, dtype, (name, shape)) in enumerate(zip(out, route.dtypes, route.layers, strict=True)):
        if (
            isinstance(x, jax.Array)
            and x.dtype == dtype
            and x.shape == shape
            and _placed(x.sharding, sharding, len(shape))
        ):
            continue
        got = f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
        raise ValueError(
            f"{fn}: out[{i}] is {got}; expected {name}{list(shape)} sharded by KV heads over this pipe's devices "
            "(a cache as recv_kv_cache returns it)."
        )
    return out


def out_shards(
    out: list[Any] | None, route: _route.KVRoute, devices: Sequence[Any], ranks: Sequence[int]
) -> dict[int, list[Any]] | None:
    """Receiver rank ``g``'s shards of ``out``'s live layers (what its program donates) for each ``g`` in ``ranks``.

    ``None`` without ``out``. On one device the layers are their own shards (no per-layer lookup).
    """
    if out is None:
        return None
    if len(devices) == 1:
        return {g: [out[i] for i in route.live] for g in ranks}
    by_device = [{s.device: s.data for s in out[i].addressable_shards} for i in route.live]
    return {g: [shards[devices[g]] for shards in by_device] for g in ranks}


@functools.lru_cache(maxsize=256)
def _array_fn(dtype: str, shape: tuple[int, ...]) -> Any:
    import jax

    count, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    carrier = np.dtype(f"uint{8 * size}")

    def fn(words: Any) -> Any:
        bits = _as_carrier(COPY(words[0], count * size), carrier, count)
        return _route.from_bits(bits, dtype).reshape(shape)

    return jax.jit(fn)


def kernel_array(dtype: np.dtype, shape: tuple[int, ...], words: Any) -> Any:
    """One array of ``dtype[shape]`` read from the staged buffer whose address is ``words`` (``int32[1, 2]``).

    ``words`` is a device array (:class:`AddressWords`); the program runs on its device.
    """
    return _array_fn(str(dtype), tuple(shape))(words)
