"""IpcKVPipe's receiver: one jitted program per receiver device turns a staged KV cache into every layer's shard.

Two ways to read the staging (``receive`` of :class:`~spmd.kv_transfer.IpcKVPipe`):

* ``"kernel"`` (CUDA): the program reads the sender's staging BY ADDRESS (:func:`kernels.peer_copy.copy_from_address`,
  the mapped addresses as an ``int32[buffers, 2]`` operand), cuts every layer's shard out of it and
  returns them: one dispatch per receiver device, no per-array host work, no destination fill;
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

__all__ = ["RECEIVE", "check_out", "kernel_array", "kernel_shards", "out_shards", "unpack_shards"]

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


def kernel_shards(
    route: _route.KVRoute, g: int, addresses: Sequence[int], device: Any, outs: list[Any] | None, sharding: Any = None
) -> list[Any]:
    """Receiver ``g``'s shard of every live layer, read from the staged buffers at ``addresses`` (on ``device``).

    ``outs``: receiver ``g``'s shards of the ``out`` cache (donated), or ``None``. ``sharding``: place
    the outputs so (a receiver of one device: the layers themselves).
    """
    import jax

    words = np.array([[a & 0xFFFFFFFF, a >> 32] for a in addresses], np.uint32).view(np.int32)
    fn = _kernel_fn(route, g, outs is not None, sharding)
    return list(fn(jax.device_put(words, device), *(outs or ())))


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


def check_out(out: Any, route: _route.KVRoute, sharding: Any, fn: str) -> list[Any]:
    """``out`` as a list, checked against the cache being received (dtypes, shapes, KV-head sharding).

    Raises:
      ValueError: another number of layers, a layer of another dtype, shape or placement.
    """
    import jax

    out = list(out)
    if len(out) != len(route.layers):
        raise ValueError(f"{fn}: out has {len(out)} layers, the cache sent has {len(route.layers)}.")
    for i, (x, (dtype, shape)) in enumerate(zip(out, route.layers, strict=True)):
        if not (
            isinstance(x, jax.Array)
            and str(x.dtype) == dtype
            and tuple(x.shape) == shape
            and x.sharding.is_equivalent_to(sharding, len(shape))
        ):
            got = f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', []))}"
            raise ValueError(
                f"{fn}: out[{i}] is {got}; expected {dtype}{list(shape)} sharded by KV heads over this pipe's devices "
                "(a cache as recv_kv_cache returns it)."
            )
    return out


def out_shards(out: list[Any] | None, route: _route.KVRoute, device: Any) -> list[Any] | None:
    """The live layers' shards of ``out`` on ``device`` (what the program donates), or ``None``."""
    if out is None:
        return None
    return [next(s.data for s in out[i].addressable_shards if s.device == device) for i in route.live]


@functools.lru_cache(maxsize=256)
def _array_fn(dtype: str, shape: tuple[int, ...]) -> Any:
    import jax

    count, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    carrier = np.dtype(f"uint{8 * size}")

    def fn(words: Any) -> Any:
        bits = _as_carrier(COPY(words[0], count * size), carrier, count)
        return _route.from_bits(bits, dtype).reshape(shape)

    return jax.jit(fn)


def kernel_array(dtype: np.dtype, shape: tuple[int, ...], address: int, device: Any) -> Any:
    """One array of ``dtype[shape]`` read from the staged buffer at ``address`` by one program on ``device``."""
    import jax

    words = np.array([[address & 0xFFFFFFFF, address >> 32]], np.uint32).view(np.int32)
    return _array_fn(str(dtype), tuple(shape))(jax.device_put(words, device))
