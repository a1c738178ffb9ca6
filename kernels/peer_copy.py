"""Copy bytes from a raw device address into a new array: one Mosaic GPU kernel, the address as data.

:class:`spmd.kv_transfer.IpcKVPipe`'s receiver reads the sender's staging (another process's
memory, mapped here by CUDA IPC) inside its own jitted program: the address travels as an
``int32[2]`` operand (low, high word), so one compiled program serves every staging buffer and
message. Thread block ``b`` (one warpgroup, 128 threads x 16 bytes) copies ``tiles_per_block``
tiles of 2 KiB, from ``address + b * tiles_per_block * 2 KiB``, into the same place of the output::

    for i in range(tiles_per_block):          (unrolled)
        out[tile b * tpb + i] = *(address + (b * tpb + i) * 2 KiB)     (16-byte loads and stores)

The output is ``uint32[padded_bytes(nbytes) / 4]``: the copy reads whole tiles, so the sender must
reserve :func:`padded_bytes` for every buffer (the caller slices the ``nbytes`` it wants). To XLA
the kernel is an ordinary local custom call. The caller orders it after the sender's writes (the
pipe's host saw the epoch, written after the data was complete) and waits for it before letting
the sender reuse the memory (the ack). :func:`copy_from_address_reference` does the same on the
host (numpy, from a host address) for tests.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import compat

__all__ = ["MAX_BLOCKS", "TILE_BYTES", "copy_from_address", "copy_from_address_reference", "padded_bytes", "plan"]

TILE_BYTES = 2048
MAX_BLOCKS = 8192


def plan(nbytes: int) -> tuple[int, int]:
    """``(blocks, tiles_per_block)`` for a copy of ``nbytes`` (> 0): the fewest tiles per block within ``MAX_BLOCKS``.

    Raises:
      ValueError: ``nbytes`` is not positive.
    """
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"peer_copy.plan: expected a positive byte count, got {nbytes!r}.")
    tiles = -(-nbytes // TILE_BYTES)
    tpb = -(-tiles // MAX_BLOCKS)
    return -(-tiles // tpb), tpb


def padded_bytes(nbytes: int) -> int:
    """The bytes a copy of ``nbytes`` reads and writes (whole tiles of every block): what the sender must reserve."""
    blocks, tpb = plan(nbytes)
    return blocks * tpb * TILE_BYTES


def _body(tpb: int):
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(addr_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
        def _(ctx, addr, o):
            ir, arith, gpu, llvm, memref, _ = compat.mlir_dialects()
            i32, i64, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()
            tile_ty = ir.MemRefType.get((TILE_BYTES // 4,), i32)

            def c64(v: int):
                return arith.constant(i64, v)

            def word(k: int):
                return arith.extui(i64, memref.load(addr, [arith.constant(index, k)]))

            src = arith.ori(word(0), arith.shli(word(1), c64(32)))
            dst = llvm.ptrtoint(i64, mu.memref_ptr(o))
            first = arith.muli(arith.index_cast(i64, gpu.block_id(gpu.Dimension.x)), c64(tpb * TILE_BYTES))

            def tile(base, i):
                at = arith.addi(base, arith.addi(first, c64(i * TILE_BYTES)))
                return mu.ptr_as_memref(llvm.inttoptr(llvm.PointerType.get(), at), tile_ty)

            for i in range(tpb):
                v = mgpu.FragmentedArray.load_strided(tile(src, i), is_signed=False, vec_size=4)
                v.store_untiled(tile(dst, i))

        _(addr_ref, o_ref)

    return body


def copy_from_address(address: jax.Array, nbytes: int) -> jax.Array:
    """The ``padded_bytes(nbytes)`` bytes at a raw device address, as ``uint32[padded_bytes(nbytes) // 4]``.

    Args:
      address: ``int32[2]``, the address's low and high 32 bits (on the device that reads it).
      nbytes: the bytes wanted (the copy reads :func:`padded_bytes` of them: the memory must hold that many).

    Returns:
      A new array on ``address``'s device; its first ``nbytes`` bytes are the ones at the address.

    Raises:
      ValueError: ``address`` is not ``int32[2]``, or ``nbytes`` is not positive.
    """
    if tuple(address.shape) != (2,) or address.dtype != jnp.int32:
        raise ValueError(f"copy_from_address: expected an int32[2] address, got {address.dtype}{list(address.shape)}.")
    blocks, tpb = plan(nbytes)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = inspect.signature(plgpu.kernel).parameters
    out = jax.ShapeDtypeStruct((blocks * tpb * TILE_BYTES // 4,), jnp.uint32)
    kwargs = {("out_type" if "out_type" in params else "out_shape"): out, "grid": (blocks,), "grid_names": ("blocks",)}
    return plgpu.kernel(_body(tpb), **kwargs)(address)


@functools.cache
def _memmove() -> Any:
    return ctypes.memmove


def copy_from_address_reference(address: Any, nbytes: int) -> np.ndarray:
    """:func:`copy_from_address` on the host: the ``padded_bytes(nbytes)`` bytes at a HOST address (numpy)."""
    words = np.asarray(address, np.int64)
    at = int(words[0] & 0xFFFFFFFF) | int(words[1] & 0xFFFFFFFF) << 32
    out = np.empty(padded_bytes(nbytes) // 4, np.uint32)
    _memmove()(out.ctypes.data, at, out.nbytes)
    return out
