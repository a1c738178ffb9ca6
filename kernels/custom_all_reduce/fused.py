"""All-reduce + residual add + RMSNorm in ONE kernel (Mosaic GPU, on the persistent peer buffers).

What vLLM and TensorRT-LLM fuse in decode after a row-parallel layer: the partial sums ``x_r``
of every rank are all-reduced, the residual is added, and the sum is normalised, in one launch
instead of three::

    ar  = cast(sum_r x_r)                                   (float32, rank order; the plain kernel's bits)
    h   = cast(ar + residual)                               (the new residual)
    out = cast(weight * cast(h * rsqrt(mean(h^2) + eps)))   (models.blocks.RMSNorm's formula)

with ``cast`` a rounding to the input dtype and the arithmetic in float32. Thread block ``b``
owns row ``b`` (one token): it runs the low-latency exchange of :mod:`.peer` for the row's
tiles, adds the residual, reduces the row's sum of squares (a butterfly in each warp, then the
four warps' partials through this block's staging slot of its own buffer, which the ll protocol
leaves unused), and writes both outputs. Every rank computes the same bits. Only what the ll
protocol takes: rows of whole 2 KiB tiles, at most ``layout.ll_tiles_per_block_max`` tiles (4 KiB:
hidden 2048 in bf16) and at most ``layout.max_blocks`` rows; :func:`fused_ineligibility` says why
not otherwise, and the caller falls back to the unfused path.

The mean's summation order and ``rsqrt.approx`` differ from XLA's, so against the unfused path
the normalised output may differ by a unit or two in the last place of a 16-bit dtype (two
roundings follow the norm; ``rsqrt.approx.f32`` is coarser than a float32 ulp); the new
residual is bit-identical. docs/custom_all_reduce.md has the measured errors and times.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from kernels.custom_all_reduce import peer, peer_ir
from kernels.custom_all_reduce.planning import SUPPORTED_DTYPES, out_struct
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = ["fused_add_rms_norm_peer", "fused_ineligibility"]

# Sum a float32 over the 32 lanes of a warp (butterfly: every lane gets the same bits).
_WARP_SUM_PTX = """{
.reg .f32 spmd_a, spmd_t;
mov.f32 spmd_a, $1;
shfl.sync.bfly.b32 spmd_t, spmd_a, 16, 31, -1;
add.f32 spmd_a, spmd_a, spmd_t;
shfl.sync.bfly.b32 spmd_t, spmd_a, 8, 31, -1;
add.f32 spmd_a, spmd_a, spmd_t;
shfl.sync.bfly.b32 spmd_t, spmd_a, 4, 31, -1;
add.f32 spmd_a, spmd_a, spmd_t;
shfl.sync.bfly.b32 spmd_t, spmd_a, 2, 31, -1;
add.f32 spmd_a, spmd_a, spmd_t;
shfl.sync.bfly.b32 spmd_t, spmd_a, 1, 31, -1;
add.f32 spmd_a, spmd_a, spmd_t;
mov.f32 $0, spmd_a;
}"""


def fused_ineligibility(shape: tuple[int, ...], dtype: Any, weight_dtype: Any, layout: Layout) -> str | None:
    """Why the fused kernel cannot take an input of ``shape`` (``None`` when it can).

    ``shape`` is ``[..., hidden]``: every leading index is one row (token).
    """
    name = np.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        return f"dtype {name} is not one of {sorted(SUPPORTED_DTYPES)}"
    if np.dtype(weight_dtype) != np.dtype(dtype):
        return f"the norm weight is {np.dtype(weight_dtype).name}, the input {name} (the unfused path promotes)"
    if len(shape) < 1:
        return "the input has no hidden axis"
    row = shape[-1] * np.dtype(dtype).itemsize
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if row % TILE_BYTES or not 0 < row <= layout.ll_tiles_per_block_max * TILE_BYTES:
        return f"a row of {row} bytes is not 1 to {layout.ll_tiles_per_block_max} whole tiles of {TILE_BYTES} bytes"
    if not 0 < rows <= layout.max_blocks:
        return f"{rows} rows is not 1 to {layout.max_blocks} (one thread block per row)"
    return None


def _fused_body(n: int, tpb: int, hidden: int, dtype: Any, layout: Layout, timeout_ns: int, eps: float):
    ir, arith, _, llvm, _, _, _, mu = peer_ir.mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    name = np.dtype(dtype).name
    c64 = peer_ir.c64

    def body(x_ref, res_ref, w_ref, table_ref, o_ref, h_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 6)
        def _(ctx, x, res, w, table, o, h):
            i32, i64, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.F32Type.get()

            def addr(ref):
                return llvm.ptrtoint(i64, mu.memref_ptr(ref))

            def f32c(v: float):
                return arith.constant(f32, float(np.float32(v)))

            def f32_asm(ptx, args):
                cons = ["=f"] + ["f" if a.type == f32 else "l" for a in args]  # f32 or 64-bit addresses
                return llvm.inline_asm(f32, args, ptx, ",".join(cons), has_side_effects=True)

            def to_f32(words):  # 32-bit words -> their elements as f32, in order
                return [v for wd in words for v in peer_ir.word_to_f32(name, wd)]

            def rounded_word(vals):  # f32 values -> one word of them rounded to the dtype
                return peer_ir.f32_to_word(name, vals)

            b = peer_ir.block_start(x, table, o, n, layout, tpb)
            res_addr, h_addr = addr(res), addr(h)
            w_addr = addr(w)
            lane16 = arith.muli(arith.extui(i64, b.tid), c64(16))
            h_vals, sumsq = [], None
            for i, acc in enumerate(peer.ll_sums(b, n, layout, tpb, name, timeout_ns)):
                per = len(acc) // 4
                ar = to_f32([rounded_word(acc[k * per : (k + 1) * per]) for k in range(4)])
                rv = to_f32(peer_ir.quad_asm(peer_ir.LOAD16_PTX, [peer_ir.lane_addr(b, res_addr, i)]))
                hs = [arith.addf(a, r) for a, r in zip(ar, rv, strict=True)]
                words = [peer_ir.f32_to_word(name, hs[k * per : (k + 1) * per]) for k in range(4)]
                peer_ir.asm(peer_ir.STORE16_PTX, [peer_ir.lane_addr(b, h_addr, i), *words])
                rounded = to_f32(words)
                h_vals.append(rounded)
                for v in rounded:
                    sq = arith.mulf(v, v)
                    sumsq = sq if sumsq is None else arith.addf(sumsq, sq)
            total = f32_asm(_WARP_SUM_PTX, [sumsq])
            warp = arith.shrui(b.tid, arith.constant(i32, 5))
            lane = arith.andi(b.tid, arith.constant(i32, 31))
            # This block's staging slot (current parity) of its own buffer: the ll protocol leaves it unused.
            slot = arith.muli(arith.addi(arith.muli(b.parity, c64(layout.max_blocks)), b.blk), c64(layout.slot_bytes))
            scratch = arith.addi(b.own, slot)
            with mu.when(arith.cmpi(arith.CmpIPredicate.eq, lane, arith.constant(i32, 0))):
                mine = arith.addi(scratch, arith.muli(arith.extui(i64, warp), c64(4)))
                peer_ir.asm("st.volatile.global.b32 [$0], $1;", [mine, arith.bitcast(i32, total)])
            mu.warpgroup_barrier()
            parts = [f32_asm("ld.volatile.global.f32 $0, [$1];", [arith.addi(scratch, c64(4 * k))]) for k in range(4)]
            ss = arith.addf(arith.addf(arith.addf(parts[0], parts[1]), parts[2]), parts[3])
            ms = arith.divf(ss, f32c(hidden))
            inv = f32_asm("rsqrt.approx.f32 $0, $1;", [arith.addf(ms, f32c(eps))])
            for i, hv in enumerate(h_vals):
                per = len(hv) // 4
                w_line = arith.addi(w_addr, arith.addi(c64(i * TILE_BYTES), lane16))
                wv = to_f32(peer_ir.quad_asm(peer_ir.LOAD16_PTX, [w_line]))
                ys = to_f32([rounded_word([arith.mulf(v, inv) for v in hv[k * per : (k + 1) * per]]) for k in range(4)])
                outs = [arith.mulf(wt, y) for wt, y in zip(wv, ys, strict=True)]
                words = [peer_ir.f32_to_word(name, outs[k * per : (k + 1) * per]) for k in range(4)]
                peer_ir.asm(peer_ir.STORE16_PTX, [peer_ir.lane_addr(b, b.o_addr, i), *words])
            mu.warpgroup_barrier()  # every thread has read the counter and the scratch before they move
            peer_ir.block_finish(b)

        _(x_ref, res_ref, w_ref, table_ref, o_ref, h_ref)

    return body


def fused_add_rms_norm_peer(
    x: jax.Array,
    residual: jax.Array,
    weight: jax.Array,
    table: jax.Array,
    *,
    world_size: int,
    layout: Layout,
    eps: float,
    timeout_ns: int = peer_ir.DEFAULT_TIMEOUT_NS,
) -> tuple[jax.Array, jax.Array]:
    """``(RMSNorm(all_reduce(x) + residual), all_reduce(x) + residual)`` in one kernel launch.

    Args:
      x: this rank's partial sums ``T[..., hidden]`` (a row-parallel layer's output before its reduction).
      residual: ``T[..., hidden]``, the same on every rank.
      weight: the norm's ``T[hidden]``.
      table: :meth:`SymmetricBuffers.peer_table` for the group.
      world_size: the group size (``table`` holds ``1 + 2 n`` words).
      layout: the buffers' layout.
      eps: the norm's epsilon.
      timeout_ns: how long a block waits for its peers before the kernel traps.

    Returns:
      ``(normalised, new residual)``, each ``T[..., hidden]``, the same bits on every rank.

    Raises:
      ValueError: shapes or dtypes that disagree, an input :func:`fused_ineligibility` refuses, or
        a table of the wrong size.
    """
    if residual.shape != x.shape or residual.dtype != x.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(
            f"fused_add_rms_norm_peer: expected residual {x.dtype}{list(x.shape)} and weight [{x.shape[-1:]}], got "
            f"{residual.dtype}{list(residual.shape)} and {weight.dtype}{list(weight.shape)}."
        )
    why = fused_ineligibility(x.shape, x.dtype, weight.dtype, layout)
    if why:
        raise ValueError(f"fused_add_rms_norm_peer: {why}.")
    if not 1 <= world_size <= layout.max_ranks or table.shape != (1 + 2 * world_size,) or table.dtype != np.int32:
        raise ValueError(
            f"fused_add_rms_norm_peer: expected 1 <= world_size <= {layout.max_ranks} and table int32[1 + 2 n], got "
            f"world_size={world_size}, table {table.dtype}{list(table.shape)}."
        )
    hidden = x.shape[-1]
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    tpb = hidden * np.dtype(x.dtype).itemsize // TILE_BYTES
    body = _fused_body(world_size, tpb, hidden, x.dtype, layout, int(timeout_ns), float(eps))
    flat = (rows * hidden,)
    outs = (out_struct(flat, x.dtype, x), out_struct(flat, x.dtype, x))
    out, h = peer_ir.kernel(body, outs, rows)(x.reshape(-1), residual.reshape(-1), weight, table)
    return out.reshape(x.shape), h.reshape(x.shape)
