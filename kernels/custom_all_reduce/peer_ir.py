"""Building blocks of the peer-buffer kernels (Mosaic GPU): inline PTX, the block prologue, flag rounds.

Every kernel on the persistent peer buffers (:mod:`kernels.symmetric_memory`) starts the same way:
read the address table (this device's rank, every rank's buffer), this block's epoch counter, and
the addresses of its input and output (:func:`block_start`); it ends by moving the counter on
(:func:`block_finish`). In between it moves 16 bytes per thread per 2 KiB tile with inline PTX
(:func:`quad_asm` / :func:`asm` on the ``*_PTX`` templates), converts 32-bit words to float32 and
back (:func:`word_to_f32`, :func:`f32_to_word`), and orders itself against its peers with epoch
flags (:func:`flag_round`: a system-scope release, then a bounded acquire spin).

Used by the one-shot (:mod:`.peer`), the two-shot (:mod:`.two_shot`) and the fused kernel
(:mod:`.fused`). The MLIR modules are imported on first use: CPU-only programs never need Mosaic GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from kernels import compat
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = [
    "DEFAULT_TIMEOUT_NS",
    "LL_PUSH_PTX",
    "LL_WAIT_PTX",
    "LOAD16_PTX",
    "LOAD16_VOLATILE_PTX",
    "SIGNAL_PTX",
    "STORE16_PTX",
    "WAIT_PTX",
    "Block",
    "asm",
    "block_finish",
    "block_start",
    "c32",
    "c64",
    "f32_to_word",
    "flag_round",
    "kernel",
    "lane_addr",
    "mlir",
    "pick",
    "quad_asm",
    "word_to_f32",
]

DEFAULT_TIMEOUT_NS = 20_000_000_000  # 20 s: far beyond any call, short of a silent hang

# Spin until the 32-bit flag at $0 holds epoch $1 or $1 + 1 (a peer is at most one epoch ahead: it
# cannot get further before our own next flag), acquire at system scope; an older epoch, however
# old (ll calls advance epochs without writing flags), never passes. After $2 ns of %globaltimer,
# trap.
WAIT_PTX = """{
.reg .pred spmd_done, spmd_late;
.reg .b32 spmd_v;
.reg .b64 spmd_t0, spmd_t1;
mov.u64 spmd_t0, %globaltimer;
SPMD_WAIT:
ld.acquire.sys.global.b32 spmd_v, [$0];
sub.u32 spmd_v, spmd_v, $1;
setp.le.u32 spmd_done, spmd_v, 1;
@spmd_done bra SPMD_DONE;
mov.u64 spmd_t1, %globaltimer;
sub.u64 spmd_t1, spmd_t1, spmd_t0;
setp.gt.u64 spmd_late, spmd_t1, $2;
@spmd_late trap;
bra SPMD_WAIT;
SPMD_DONE:
}"""
# Release at system scope: every store this block made before the barrier is visible to a peer
# that reads the flag with acquire.
SIGNAL_PTX = "fence.acq_rel.sys;\nst.relaxed.sys.global.b32 [$0], $1;"

# Wait for one 32-byte line of (word, epoch) pairs at $4 whose four epochs equal $5; the four
# words come back in $0..$3. Volatile loads of 16 bytes, each 8-byte half carrying its own epoch
# (NCCL's LL line). After $6 nanoseconds, trap.
LL_WAIT_PTX = """{
.reg .pred spmd_ok, spmd_late;
.reg .b32 spmd_f0, spmd_f1, spmd_f2, spmd_f3;
.reg .b64 spmd_t0, spmd_t1;
mov.u64 spmd_t0, %globaltimer;
SPMD_LL_WAIT:
ld.volatile.global.v4.b32 {$0, spmd_f0, $1, spmd_f1}, [$4];
ld.volatile.global.v4.b32 {$2, spmd_f2, $3, spmd_f3}, [$4+16];
setp.eq.b32 spmd_ok, spmd_f0, $5;
setp.eq.and.b32 spmd_ok, spmd_f1, $5, spmd_ok;
setp.eq.and.b32 spmd_ok, spmd_f2, $5, spmd_ok;
setp.eq.and.b32 spmd_ok, spmd_f3, $5, spmd_ok;
@spmd_ok bra SPMD_LL_DONE;
mov.u64 spmd_t1, %globaltimer;
sub.u64 spmd_t1, spmd_t1, spmd_t0;
setp.gt.u64 spmd_late, spmd_t1, $6;
@spmd_late trap;
bra SPMD_LL_WAIT;
SPMD_LL_DONE:
}"""
LL_PUSH_PTX = "st.volatile.global.v4.b32 [$0], {$1, $5, $2, $5};\nst.volatile.global.v4.b32 [$0+16], {$3, $5, $4, $5};"

LOAD16_PTX = "ld.global.v4.b32 {$0, $1, $2, $3}, [$4];"
# Peer buffers and what peers wrote into this device's buffer: never from a stale L1 line.
LOAD16_VOLATILE_PTX = "ld.volatile.global.v4.b32 {$0, $1, $2, $3}, [$4];"
STORE16_PTX = "st.global.v4.b32 [$0], {$1, $2, $3, $4};"


def kernel(body, out_type, grid: int):
    """``plgpu.kernel`` over ``grid`` thread blocks (one warpgroup each), across JAX versions."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = inspect.signature(plgpu.kernel).parameters
    kwargs = {
        ("out_type" if "out_type" in params else "out_shape"): out_type,
        "grid": (grid,),
        "grid_names": ("blocks",),
    }
    return plgpu.kernel(body, **kwargs)


@functools.cache
def mlir():
    """``(ir, arith, gpu, llvm, memref, scf, mgpu, mu)``: the MLIR builders (imported on first use)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu

    return (*compat.mlir_dialects(), mgpu, mu)


def asm(ptx: str, args: list, result=None):
    """Inline PTX with side effects (``llvm.inline_asm``; ``l`` = 64-bit, ``r`` = 32-bit operands)."""
    ir, _, _, llvm, *_ = mlir()
    cons = []
    if result is not None:
        cons.append("=r")
    for a in args:
        cons.append("l" if ir.IntegerType(a.type).width == 64 else "r")
    res = result if result is not None else ir.Type.parse("!llvm.void")
    return llvm.inline_asm(res, args, ptx, ",".join(cons), has_side_effects=True)


def quad_asm(ptx: str, args: list) -> list:
    """Inline PTX returning four 32-bit words (``$0..$3``), operands after them."""
    ir, _, _, llvm, *_ = mlir()
    i32 = ir.IntegerType.get_signless(32)
    quad = llvm.StructType.get_literal([i32] * 4)
    cons = ["=r"] * 4 + ["l" if ir.IntegerType(a.type).width == 64 else "r" for a in args]
    res = llvm.inline_asm(quad, args, ptx, ",".join(cons), has_side_effects=True)
    return [llvm.extractvalue(i32, res, [k]) for k in range(4)]


def c64(v: int):
    """An ``i64`` constant."""
    ir, arith, *_ = mlir()
    return arith.constant(ir.IntegerType.get_signless(64), v)


def c32(v: int):
    """An ``i32`` constant."""
    ir, arith, *_ = mlir()
    return arith.constant(ir.IntegerType.get_signless(32), v)


def pick(idx, values):
    """``values[idx]`` for a traced i32 ``idx`` (a select chain)."""
    _, arith, *_ = mlir()
    out = values[0]
    for j in range(1, len(values)):
        out = arith.select(arith.cmpi(arith.CmpIPredicate.eq, idx, c32(j)), values[j], out)
    return out


@dataclasses.dataclass(frozen=True)
class Block:
    """What every kernel body derives first, per thread block (MLIR values)."""

    rank: Any  # i32: this device's rank in the group
    bases: list  # i64 per rank: its buffer's address
    own: Any  # i64: this device's buffer
    blk: Any  # i64: the block index
    tid: Any  # i32: the thread index
    counter: Any  # i64: address of this block's epoch counter
    epoch: Any  # i32: this call's (first) epoch (counter + 1)
    parity: Any  # i64: epoch % 2
    x_addr: Any  # i64: the input
    o_addr: Any  # i64: the output
    first: Any  # i64: byte offset of this block's first tile


def block_start(x, table, o, n: int, layout: Layout, tpb: int) -> Block:
    """Read the table (rank, every rank's buffer address) and this block's epoch counter."""
    ir, arith, gpu, llvm, memref, _, _, mu = mlir()
    i32, i64, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()

    def word(k: int):
        return memref.load(table, [arith.constant(index, k)])

    rank = word(0)
    bases = []
    for j in range(n):
        lo = arith.extui(i64, word(1 + 2 * j))
        hi = arith.extui(i64, word(2 + 2 * j))
        bases.append(arith.ori(lo, arith.shli(hi, c64(32))))
    own = pick(rank, bases)
    blk = arith.index_cast(i64, gpu.block_id(gpu.Dimension.x))
    counter = arith.addi(own, arith.addi(c64(layout.counters_offset), arith.muli(blk, c64(4))))
    epoch = arith.addi(asm("ld.relaxed.gpu.global.b32 $0, [$1];", [counter], result=i32), c32(1))
    return Block(
        rank=rank,
        bases=bases,
        own=own,
        blk=blk,
        tid=arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)),
        counter=counter,
        epoch=epoch,
        parity=arith.extui(i64, arith.andi(epoch, c32(1))),
        x_addr=llvm.ptrtoint(i64, mu.memref_ptr(x)),
        o_addr=llvm.ptrtoint(i64, mu.memref_ptr(o)),
        first=arith.muli(blk, c64(tpb * TILE_BYTES)),
    )


def block_finish(b: Block, last_epoch: Any = None) -> None:
    """Thread 0 moves this block's epoch counter to ``last_epoch`` (default ``b.epoch``).

    Call it after a barrier: every thread must have read the counter before it moves.
    """
    _, arith, *_, mu = mlir()
    with mu.when(arith.cmpi(arith.CmpIPredicate.eq, b.tid, c32(0))):
        asm("st.relaxed.gpu.global.b32 [$0], $1;", [b.counter, b.epoch if last_epoch is None else last_epoch])


def flag_round(b: Block, n: int, layout: Layout, epoch: Any, timeout_ns: int) -> None:
    """One flag round of block ``b``: barrier; thread ``r < n`` releases ``epoch`` into rank ``r``'s flag
    slot ``flags[b][me]`` and waits for ``flags[b][r]`` in this device's buffer to reach it; barrier.

    The barrier before makes every thread's earlier stores part of what the release publishes; the
    one after lets every thread rely on what the acquire saw.
    """
    ir, arith, *_, mu = mlir()
    i64 = ir.IntegerType.get_signless(64)
    mu.warpgroup_barrier()
    with mu.when(arith.cmpi(arith.CmpIPredicate.ult, b.tid, c32(n))):
        peer = pick(b.tid, b.bases)
        row = arith.addi(c64(layout.flags_offset), arith.muli(b.blk, c64(4 * layout.max_ranks)))
        theirs = arith.addi(peer, arith.addi(row, arith.muli(arith.extui(i64, b.rank), c64(4))))
        asm(SIGNAL_PTX, [theirs, epoch])
        mine = arith.addi(b.own, arith.addi(row, arith.muli(arith.extui(i64, b.tid), c64(4))))
        asm(WAIT_PTX, [mine, epoch, c64(int(timeout_ns))])
    mu.warpgroup_barrier()


def word_to_f32(name: str, w: Any) -> list:
    """One 32-bit word -> its elements (``name``: float32 / bfloat16 / float16) as f32 values."""
    ir, arith, *_ = mlir()
    i16, f32 = ir.IntegerType.get_signless(16), ir.F32Type.get()
    if name == "float32":
        return [arith.bitcast(f32, w)]
    if name == "bfloat16":
        lo = arith.bitcast(f32, arith.shli(w, c32(16)))
        hi = arith.bitcast(f32, arith.andi(w, c32(-65536)))
        return [lo, hi]
    half = ir.F16Type.get()
    lo = arith.bitcast(half, arith.trunci(i16, w))
    hi = arith.bitcast(half, arith.trunci(i16, arith.shrui(w, c32(16))))
    return [arith.extf(f32, lo), arith.extf(f32, hi)]


def f32_to_word(name: str, vals: list) -> Any:
    """f32 values (one, or two for 16-bit types) rounded to ``name`` and packed into one 32-bit word."""
    ir, arith, *_ = mlir()
    i32, i16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16)
    if name == "float32":
        return arith.bitcast(i32, vals[0])
    narrow = ir.BF16Type.get() if name == "bfloat16" else ir.F16Type.get()
    lo, hi = (arith.extui(i32, arith.bitcast(i16, arith.truncf(narrow, v))) for v in vals)
    return arith.ori(lo, arith.shli(hi, c32(16)))


def lane_addr(b: Block, base: Any, i: int) -> Any:
    """This thread's 16 bytes of tile ``i`` of this block in the array at ``base``."""
    ir, arith, *_ = mlir()
    lane16 = arith.muli(arith.extui(ir.IntegerType.get_signless(64), b.tid), c64(16))
    return arith.addi(base, arith.addi(b.first, arith.addi(c64(i * TILE_BYTES), lane16)))
