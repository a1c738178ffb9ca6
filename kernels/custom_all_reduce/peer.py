"""One-shot all-reduce on persistent peer buffers (Mosaic GPU, raw device addresses).

The kernel XLA sees is local: its operands are the input and a small ``int32`` table (this
device's rank and every rank's buffer address, :meth:`SymmetricBuffers.peer_table`); it reaches
the peers' buffers (:mod:`kernels.symmetric_memory`) through those addresses. Two protocols:

**pull** (vLLM's one-shot, with the input copy inside the kernel and double-buffered staging
instead of an end-of-call barrier). Thread block ``b`` (one warpgroup) owns ``tiles`` tiles of
2 KiB::

    epoch = counters[b] + 1;  p = epoch % 2            (counters live in this device's buffer)
    staging[p][b] (mine)  = x[tiles of b]              (local stores)
    bar.sync;  thread r < n: fence.acq_rel.sys; flags[b][me] @ rank r = epoch
               thread r < n: spin until flags[b][r] (mine) in {epoch, epoch + 1}  (ld.acquire.sys)
    bar.sync
    out[tiles of b] = sum_{j = 0..n-1} staging[p][b] @ rank j         (float32, rank order)
    thread 0: counters[b] = epoch

Why one barrier per call is enough: rank ``r`` overwrites ``staging[p][b]`` at call ``k + 2``
only after passing call ``k + 1``'s flags for block ``b``, which every peer's block ``b`` writes
only after finishing call ``k`` (its reads of ``staging[p][b]`` included), kernels on one GPU
running in stream order. Every rank counts the same calls per block, so epochs agree without
any reset. A peer is at most one call ahead of a waiting block, so the flag test accepts
``epoch`` and ``epoch + 1`` only (unsigned ``flag - epoch <= 1``): a flag left by a pull call
billions of ll calls ago can never pass for the current one. Kernels are assumed to run in the
same order on every GPU, one after another (XLA's default: one compute stream per device).

**ll** (low latency, :func:`_ll_body`): data pushed into every peer's inbox with the epoch
beside every word, so a reader needs no fence and no flag round.

A spin that waits longer than ``timeout_ns`` traps (the program fails with a CUDA error) instead
of hanging. Every rank adds the same terms in the same order in float32, so every rank gets the
same bits. NVLink multicast (multimem) is never used.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import compat
from kernels.custom_all_reduce.planning import SUPPORTED_DTYPES, out_struct
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = ["DEFAULT_TIMEOUT_NS", "MODES", "PROTOCOLS", "PeerPlan", "one_shot_peer", "padded_plan", "plan_peer"]

DEFAULT_TIMEOUT_NS = 20_000_000_000  # 20 s: far beyond any call, short of a silent hang
MODES = ("full", "flags", "copy")
PROTOCOLS = ("auto", "ll", "pull")


class PeerPlan(tuple):
    """``(blocks, tiles_per_block)`` for one message."""

    @property
    def blocks(self) -> int:
        return self[0]

    @property
    def tiles_per_block(self) -> int:
        return self[1]


def plan_peer(
    nbytes: int, layout: Layout, *, tiles_per_block: int | None = None, protocol: str = "pull"
) -> PeerPlan | None:
    """How a message of ``nbytes`` splits over thread blocks, or ``None`` if it cannot.

    Args:
      nbytes: bytes per device.
      layout: the peer buffers' layout (staging slot size, block count).
      tiles_per_block: force this many 2 KiB tiles per block (default: the fewest that fit in
        ``layout.max_blocks`` blocks, so the work spreads over as many SMs as allowed).
      protocol: ``"pull"`` (up to ``layout.tiles_per_block_max`` tiles a block) or ``"ll"`` (up
        to ``layout.ll_tiles_per_block_max``).

    Returns:
      The plan, or ``None``: not a multiple of 2 KiB, or larger than the staging area.
    """
    if nbytes <= 0 or nbytes % TILE_BYTES:
        return None
    tiles = nbytes // TILE_BYTES
    most = layout.ll_tiles_per_block_max if protocol == "ll" else layout.tiles_per_block_max
    choices = [tiles_per_block] if tiles_per_block is not None else range(1, most + 1)
    for tpb in choices:
        if 1 <= tpb <= most and tiles % tpb == 0 and tiles // tpb <= layout.max_blocks:
            return PeerPlan((tiles // tpb, tpb))
    return None


def padded_plan(nbytes: int, layout: Layout, protocol: str) -> tuple[int, PeerPlan, str] | None:
    """``(padded bytes, plan, protocol)`` for a message of ``nbytes``: pad to a tile count that splits.

    A tile count with no divisor that fits ``layout.max_blocks`` blocks (262 tiles, say) is padded
    up to one that does, with ``ceil(tiles / max_blocks)`` tiles per block. ``protocol`` ``"auto"``
    (or ``"ll"`` for a message the inboxes cannot take) resolves to ``"ll"`` or ``"pull"``.

    Returns:
      The padding, plan and protocol, or ``None`` when the message is empty or larger than the
      staging area.
    """
    if nbytes <= 0:
        return None
    tiles = -(-nbytes // TILE_BYTES)
    ll_limit = layout.max_blocks * layout.ll_tiles_per_block_max
    if protocol == "auto" or (protocol == "ll" and tiles > ll_limit):
        protocol = "ll" if protocol == "auto" and tiles <= ll_limit else "pull"
    tpb = -(-tiles // layout.max_blocks)
    if tpb > layout.tiles_per_block_max:
        return None
    blocks = -(-tiles // tpb)
    return blocks * tpb * TILE_BYTES, PeerPlan((blocks, tpb)), protocol


def _kernel(body, out_type, grid: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = inspect.signature(plgpu.kernel).parameters
    kwargs = {
        ("out_type" if "out_type" in params else "out_shape"): out_type,
        "grid": (grid,),
        "grid_names": ("blocks",),
    }
    return plgpu.kernel(body, **kwargs)


@functools.cache
def _mlir():
    """The MLIR builders (imported on first use: CPU-only programs never need Mosaic GPU)."""
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mu

    return (*compat.mlir_dialects(), mgpu, mu)


def _asm(ptx: str, args: list, result=None):
    """Inline PTX with side effects (``llvm.inline_asm``; ``l`` = 64-bit, ``r`` = 32-bit operands)."""
    ir, _, _, llvm, *_ = _mlir()
    cons = []
    if result is not None:
        cons.append("=r")
    for a in args:
        cons.append("l" if ir.IntegerType(a.type).width == 64 else "r")
    res = result if result is not None else ir.Type.parse("!llvm.void")
    return llvm.inline_asm(res, args, ptx, ",".join(cons), has_side_effects=True)


# Spin until the 32-bit flag at $0 holds epoch $1 or $1 + 1 (a peer is at most one call ahead: it
# cannot finish this call before our own flag), acquire at system scope; an older epoch, however
# old (ll calls advance epochs without writing flags), never passes. After $2 ns of %globaltimer,
# trap.
_WAIT_PTX = """{
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
_SIGNAL_PTX = "fence.acq_rel.sys;\nst.relaxed.sys.global.b32 [$0], $1;"


@dataclasses.dataclass(frozen=True)
class _Block:
    """What both kernel bodies derive first, per thread block (MLIR values)."""

    rank: Any  # i32: this device's rank in the group
    bases: list  # i64 per rank: its buffer's address
    own: Any  # i64: this device's buffer
    blk: Any  # i64: the block index
    tid: Any  # i32: the thread index
    counter: Any  # i64: address of this block's epoch counter
    epoch: Any  # i32: this call's epoch (counter + 1)
    parity: Any  # i64: epoch % 2
    x_addr: Any  # i64: the input
    o_addr: Any  # i64: the output
    first: Any  # i64: byte offset of this block's first tile


def _c64(v: int):
    ir, arith, *_ = _mlir()
    return arith.constant(ir.IntegerType.get_signless(64), v)


def _pick(idx, values):
    """``values[idx]`` for a traced i32 ``idx`` (a select chain)."""
    ir, arith, *_ = _mlir()
    out = values[0]
    for j in range(1, len(values)):
        hit = arith.cmpi(arith.CmpIPredicate.eq, idx, arith.constant(ir.IntegerType.get_signless(32), j))
        out = arith.select(hit, values[j], out)
    return out


def _block_start(x, table, o, n: int, layout: Layout, tpb: int) -> _Block:
    """Read the table (rank, every rank's buffer address) and this block's epoch counter."""
    ir, arith, gpu, llvm, memref, _, _, mu = _mlir()
    i32, i64, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()

    def word(k: int):
        return memref.load(table, [arith.constant(index, k)])

    rank = word(0)
    bases = []
    for j in range(n):
        lo = arith.extui(i64, word(1 + 2 * j))
        hi = arith.extui(i64, word(2 + 2 * j))
        bases.append(arith.ori(lo, arith.shli(hi, _c64(32))))
    own = _pick(rank, bases)
    blk = arith.index_cast(i64, gpu.block_id(gpu.Dimension.x))
    counter = arith.addi(own, arith.addi(_c64(layout.counters_offset), arith.muli(blk, _c64(4))))
    epoch = arith.addi(_asm("ld.relaxed.gpu.global.b32 $0, [$1];", [counter], result=i32), arith.constant(i32, 1))
    return _Block(
        rank=rank,
        bases=bases,
        own=own,
        blk=blk,
        tid=arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)),
        counter=counter,
        epoch=epoch,
        parity=arith.extui(i64, arith.andi(epoch, arith.constant(i32, 1))),
        x_addr=llvm.ptrtoint(i64, mu.memref_ptr(x)),
        o_addr=llvm.ptrtoint(i64, mu.memref_ptr(o)),
        first=arith.muli(blk, _c64(tpb * TILE_BYTES)),
    )


def _block_finish(b: _Block) -> None:
    """Thread 0 moves this block's epoch counter on (after every thread has read it)."""
    ir, arith, *_, mu = _mlir()
    with mu.when(arith.cmpi(arith.CmpIPredicate.eq, b.tid, arith.constant(ir.IntegerType.get_signless(32), 0))):
        _asm("st.relaxed.gpu.global.b32 [$0], $1;", [b.counter, b.epoch])


def _one_shot_body(n: int, plan: PeerPlan, dtype: Any, layout: Layout, timeout_ns: int, mode: str):
    ir, arith, _, llvm, _, _, mgpu, mu = _mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tpb = plan.tiles_per_block
    vec = 16 // np.dtype(dtype).itemsize
    tile_elems = TILE_BYTES // np.dtype(dtype).itemsize

    def body(x_ref, table_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
        def _(ctx, x, table, o):
            i32 = ir.IntegerType.get_signless(32)
            i64 = ir.IntegerType.get_signless(64)
            elem = mu.dtype_to_ir_type(dtype)
            f32 = ir.F32Type.get()
            tile_ty = ir.MemRefType.get((tile_elems,), elem)
            c64 = _c64

            def as_tile(addr):
                return mu.ptr_as_memref(llvm.inttoptr(llvm.PointerType.get(), addr), tile_ty)

            b = _block_start(x, table, o, n, layout, tpb)
            rank, bases, own, blk, tid, epoch = b.rank, b.bases, b.own, b.blk, b.tid, b.epoch
            x_addr, o_addr, first = b.x_addr, b.o_addr, b.first
            slot = arith.muli(arith.addi(arith.muli(b.parity, c64(layout.max_blocks)), blk), c64(layout.slot_bytes))

            def x_tile(i):
                return as_tile(arith.addi(x_addr, arith.addi(first, c64(i * TILE_BYTES))))

            def o_tile(i):
                return as_tile(arith.addi(o_addr, arith.addi(first, c64(i * TILE_BYTES))))

            if mode == "copy":  # the launch floor: no staging, no flags, no peers
                for i in range(tpb):
                    mgpu.FragmentedArray.load_strided(x_tile(i), vec_size=vec).store_untiled(o_tile(i))
                return
            if mode == "full":
                for i in range(tpb):
                    v = mgpu.FragmentedArray.load_strided(x_tile(i), vec_size=vec)
                    v.store_untiled(as_tile(arith.addi(own, arith.addi(slot, c64(i * TILE_BYTES)))))
            mu.warpgroup_barrier()

            is_signaller = arith.cmpi(arith.CmpIPredicate.ult, tid, arith.constant(i32, n))
            with mu.when(is_signaller):
                peer = _pick(tid, bases)
                flag_row = arith.addi(c64(layout.flags_offset), arith.muli(blk, c64(4 * layout.max_ranks)))
                theirs = arith.addi(peer, arith.addi(flag_row, arith.muli(arith.extui(i64, rank), c64(4))))
                _asm(_SIGNAL_PTX, [theirs, epoch])
                mine = arith.addi(own, arith.addi(flag_row, arith.muli(arith.extui(i64, tid), c64(4))))
                _asm(_WAIT_PTX, [mine, epoch, c64(int(timeout_ns))])
            mu.warpgroup_barrier()

            for i in range(tpb):
                if mode == "flags":  # the flag-exchange floor: no staging, no peer data
                    mgpu.FragmentedArray.load_strided(x_tile(i), vec_size=vec).store_untiled(o_tile(i))
                    continue
                acc = None
                for j in range(n):
                    src = arith.addi(bases[j], arith.addi(slot, c64(i * TILE_BYTES)))
                    v = mgpu.FragmentedArray.load_strided(as_tile(src), vec_size=vec).astype(f32)
                    acc = v if acc is None else acc + v
                acc.astype(elem).store_untiled(o_tile(i))
            _block_finish(b)

        _(x_ref, table_ref, o_ref)

    return body


# Wait for one 32-byte line of (word, epoch) pairs at $4 whose four epochs equal $5; the four
# words come back in $0..$3. Volatile loads of 16 bytes, each 8-byte half carrying its own epoch
# (NCCL's LL line). After $6 nanoseconds, trap.
_LL_WAIT_PTX = """{
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
_LL_PUSH_PTX = "st.volatile.global.v4.b32 [$0], {$1, $5, $2, $5};\nst.volatile.global.v4.b32 [$0+16], {$3, $5, $4, $5};"


_LOAD16_PTX = "ld.global.v4.b32 {$0, $1, $2, $3}, [$4];"
_STORE16_PTX = "st.global.v4.b32 [$0], {$1, $2, $3, $4};"


def _quad_asm(ptx: str, args: list) -> list:
    """Inline PTX returning four 32-bit words (``$0..$3``), operands after them."""
    ir, _, _, llvm, *_ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    quad = llvm.StructType.get_literal([i32] * 4)
    cons = ["=r"] * 4 + ["l" if ir.IntegerType(a.type).width == 64 else "r" for a in args]
    res = llvm.inline_asm(quad, args, ptx, ",".join(cons), has_side_effects=True)
    return [llvm.extractvalue(i32, res, [k]) for k in range(4)]


def _word_to_f32(name: str, w: Any) -> list:
    """One 32-bit word -> its elements (``name``: float32 / bfloat16 / float16) as f32 values."""
    ir, arith, *_ = _mlir()
    i32, i16, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16), ir.F32Type.get()
    if name == "float32":
        return [arith.bitcast(f32, w)]
    if name == "bfloat16":
        lo = arith.bitcast(f32, arith.shli(w, arith.constant(i32, 16)))
        hi = arith.bitcast(f32, arith.andi(w, arith.constant(i32, -65536)))
        return [lo, hi]
    half = ir.F16Type.get()
    lo = arith.bitcast(half, arith.trunci(i16, w))
    hi = arith.bitcast(half, arith.trunci(i16, arith.shrui(w, arith.constant(i32, 16))))
    return [arith.extf(f32, lo), arith.extf(f32, hi)]


def _f32_to_word(name: str, vals: list) -> Any:
    """f32 values (one, or two for 16-bit types) rounded to ``name`` and packed into one 32-bit word."""
    ir, arith, *_ = _mlir()
    i32, i16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(16)
    if name == "float32":
        return arith.bitcast(i32, vals[0])
    narrow = ir.BF16Type.get() if name == "bfloat16" else ir.F16Type.get()
    lo, hi = (arith.extui(i32, arith.bitcast(i16, arith.truncf(narrow, v))) for v in vals)
    return arith.ori(lo, arith.shli(hi, arith.constant(i32, 16)))


def _lane_addr(b: _Block, base: Any, i: int) -> Any:
    """This thread's 16 bytes of tile ``i`` of this block in the array at ``base``."""
    ir, arith, *_ = _mlir()
    lane16 = arith.muli(arith.extui(ir.IntegerType.get_signless(64), b.tid), _c64(16))
    return arith.addi(base, arith.addi(b.first, arith.addi(_c64(i * TILE_BYTES), lane16)))


def _ll_sums(b: _Block, n: int, layout: Layout, tpb: int, name: str, timeout_ns: int) -> list[list]:
    """The ll exchange of this block's ``tpb`` tiles of the input: per tile, this thread's f32 sums.

    Pushes this thread's 16 bytes of every tile, with the epoch beside every word, into every
    rank's inbox; then waits for every rank's line and adds them in rank order (float32).
    """
    ir, arith, *_ = _mlir()
    i64 = ir.IntegerType.get_signless(64)
    c64 = _c64
    lane32 = arith.muli(arith.extui(i64, b.tid), c64(32))
    row = arith.addi(arith.muli(b.parity, c64(layout.max_blocks)), b.blk)  # (parity, block)

    def inbox(base, sender, i):  # this thread's line of tile i from ``sender`` (i64 or int)
        s = sender if isinstance(sender, ir.Value) else c64(sender)
        slot = arith.addi(arith.muli(row, c64(layout.max_ranks)), s)
        off = arith.addi(arith.muli(slot, c64(layout.inbox_slot_bytes)), c64(i * 2 * TILE_BYTES + layout.inbox_offset))
        return arith.addi(base, arith.addi(off, lane32))

    me = arith.extui(i64, b.rank)
    for i in range(tpb):
        words = _quad_asm(_LOAD16_PTX, [_lane_addr(b, b.x_addr, i)])
        for j in range(n):
            _asm(_LL_PUSH_PTX, [inbox(b.bases[j], me, i), *words, b.epoch])
    sums = []
    for i in range(tpb):
        acc = None
        for j in range(n):
            words = _quad_asm(_LL_WAIT_PTX, [inbox(b.own, j, i), b.epoch, c64(int(timeout_ns))])
            vals = [v for w in words for v in _word_to_f32(name, w)]
            acc = vals if acc is None else [arith.addf(a, v) for a, v in zip(acc, vals, strict=True)]
        sums.append(acc)
    return sums


def _ll_body(n: int, plan: PeerPlan, dtype: Any, layout: Layout, timeout_ns: int):
    """The low-latency one-shot: every rank pushes (word, epoch) pairs into each peer's inbox.

    Per block ``b`` (one warpgroup; thread ``t`` owns bytes ``[16 t, 16 t + 16)`` of each tile)::

        epoch = counters[b] + 1;  p = epoch % 2
        for each rank r:  inbox[p][b][me] @ r = (x words, epoch) pairs   (volatile stores)
        for j = 0..n-1:   wait until inbox[p][b][j] (mine) carries epoch; acc += words (f32)
        out = acc;  bar.sync;  thread 0: counters[b] = epoch

    No fence and no flag round: a reader checks the epoch beside every word. Rank ``r`` writes
    ``inbox[p]`` at call ``k + 2`` only after reading every peer's call ``k + 1`` data, which a
    peer pushes only once it has finished call ``k``; so a reader never sees its slot change
    under it, and an old epoch is never mistaken for the current one.
    """
    _, _, _, _, _, _, _, mu = _mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tpb = plan.tiles_per_block
    name = np.dtype(dtype).name

    def body(x_ref, table_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
        def _(ctx, x, table, o):
            b = _block_start(x, table, o, n, layout, tpb)
            for i, acc in enumerate(_ll_sums(b, n, layout, tpb, name, timeout_ns)):
                per = len(acc) // 4
                out = [_f32_to_word(name, acc[k * per : (k + 1) * per]) for k in range(4)]
                _asm(_STORE16_PTX, [_lane_addr(b, b.o_addr, i), *out])
            mu.warpgroup_barrier()  # every thread has read the counter before it moves
            _block_finish(b)

        _(x_ref, table_ref, o_ref)

    return body


def one_shot_peer(
    x: jax.Array,
    table: jax.Array,
    *,
    world_size: int,
    layout: Layout,
    plan: PeerPlan | None = None,
    timeout_ns: int = DEFAULT_TIMEOUT_NS,
    mode: str = "full",
    protocol: str = "auto",
) -> jax.Array:
    """One-shot all-reduce of the flat ``x: T[numel]`` over the group ``table`` describes.

    Args:
      x: this device's input, 1-D, its bytes a multiple of 2 KiB.
      table: :meth:`SymmetricBuffers.peer_table` for the group.
      world_size: the group size ``n`` (``table`` holds ``1 + 2 n`` words).
      layout: the buffers' layout.
      plan: blocks and tiles per block (default :func:`plan_peer`).
      timeout_ns: how long a block waits for its peers before the kernel traps.
      mode: ``"full"``; or, to measure what limits the pull protocol, ``"flags"`` (its flag
        exchange only: the output is the input) or ``"copy"`` (one launch copying the input, no
        peers).
      protocol: ``"ll"`` (low latency: data pushed with an epoch beside every word, up to
        ``layout.ll_max_message_bytes``), ``"pull"`` (staged locally, one flag round, peers'
        staging read), or ``"auto"`` (``"ll"`` where it fits and ``mode="full"``, else ``"pull"``).

    Returns:
      The sum over the group, the same bits on every rank.

    Raises:
      ValueError: ``x`` is not 1-D, its size does not fit the layout, ``table`` has the wrong
        size, or ``mode`` is unknown.
    """
    if mode not in MODES:
        raise ValueError(f"one_shot_peer: expected mode in {MODES}, got {mode!r}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"one_shot_peer: expected protocol in {PROTOCOLS}, got {protocol!r}.")
    if x.ndim != 1:
        raise ValueError(f"one_shot_peer: expected a 1-D input, got shape {x.shape}.")
    if str(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"one_shot_peer: expected a dtype in {sorted(SUPPORTED_DTYPES)}, got {x.dtype}.")
    if not 1 <= world_size <= layout.max_ranks:
        raise ValueError(
            f"one_shot_peer: expected 1 <= world_size <= layout.max_ranks={layout.max_ranks}, got {world_size}."
        )
    if table.shape != (1 + 2 * world_size,) or table.dtype != jnp.int32:
        raise ValueError(
            f"one_shot_peer: expected table int32[{1 + 2 * world_size}], got {table.dtype}{list(table.shape)}."
        )
    nbytes = x.size * x.dtype.itemsize
    if protocol == "auto":
        fits = plan is None and plan_peer(nbytes, layout, protocol="ll") is not None
        protocol = "ll" if mode == "full" and fits else "pull"
    if protocol == "ll" and mode != "full":
        raise ValueError(f"one_shot_peer: mode={mode!r} measures the pull protocol; got protocol='ll'.")
    plan = plan_peer(nbytes, layout, protocol=protocol) if plan is None else plan
    most = layout.ll_tiles_per_block_max if protocol == "ll" else layout.tiles_per_block_max
    if (
        plan is None
        or plan.blocks * plan.tiles_per_block * TILE_BYTES != nbytes
        or plan.tiles_per_block > most
        or plan.blocks > layout.max_blocks
    ):
        limit = layout.ll_max_message_bytes if protocol == "ll" else layout.max_message_bytes
        raise ValueError(
            f"one_shot_peer: {nbytes} bytes cannot be staged by the {protocol} protocol (a multiple of "
            f"{TILE_BYTES} up to {limit} bytes, got plan {plan})."
        )
    if protocol == "ll":
        body = _ll_body(world_size, plan, x.dtype, layout, int(timeout_ns))
    else:
        body = _one_shot_body(world_size, plan, x.dtype, layout, int(timeout_ns), mode)
    return _kernel(body, out_struct(x.shape, x.dtype, x), plan.blocks)(x, table)
