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
any reset. A peer is at most one epoch ahead of a waiting block, so the flag test accepts
``epoch`` and ``epoch + 1`` only (unsigned ``flag - epoch <= 1``): a flag left by a pull call
billions of ll calls ago can never pass for the current one. (The two-shot, :mod:`.two_shot`,
shares the counters, flags and staging slots and counts two epochs per call.) Kernels are assumed to run in the
same order on every GPU, one after another (XLA's default: one compute stream per device).

**ll** (low latency, :func:`_ll_body`): data pushed into every peer's inbox with the epoch
beside every word, so a reader needs no fence and no flag round.

A spin that waits longer than ``timeout_ns`` traps (the program fails with a CUDA error) instead
of hanging. Every rank adds the same terms in the same order in float32, so every rank gets the
same bits. NVLink multicast (multimem) is never used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.custom_all_reduce import peer_ir as pir
from kernels.custom_all_reduce.peer_ir import DEFAULT_TIMEOUT_NS
from kernels.custom_all_reduce.planning import SUPPORTED_DTYPES, out_struct
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = [
    "DEFAULT_TIMEOUT_NS",
    "MODES",
    "PROTOCOLS",
    "PeerPlan",
    "ll_sums",
    "one_shot_peer",
    "padded_plan",
    "plan_peer",
]

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


def _one_shot_body(n: int, plan: PeerPlan, dtype: Any, layout: Layout, timeout_ns: int, mode: str):
    ir, arith, _, llvm, _, _, mgpu, mu = pir.mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tpb = plan.tiles_per_block
    vec = 16 // np.dtype(dtype).itemsize
    tile_elems = TILE_BYTES // np.dtype(dtype).itemsize

    def body(x_ref, table_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
        def _(ctx, x, table, o):
            elem = mu.dtype_to_ir_type(dtype)
            f32 = ir.F32Type.get()
            tile_ty = ir.MemRefType.get((tile_elems,), elem)
            c64 = pir.c64

            def as_tile(addr):
                return mu.ptr_as_memref(llvm.inttoptr(llvm.PointerType.get(), addr), tile_ty)

            b = pir.block_start(x, table, o, n, layout, tpb)
            bases, own, blk = b.bases, b.own, b.blk
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
            pir.flag_round(b, n, layout, b.epoch, timeout_ns)

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
            pir.block_finish(b)

        _(x_ref, table_ref, o_ref)

    return body


def ll_sums(b: pir.Block, n: int, layout: Layout, tpb: int, name: str, timeout_ns: int) -> list[list]:
    """The ll exchange of this block's ``tpb`` tiles of the input: per tile, this thread's f32 sums.

    Pushes this thread's 16 bytes of every tile, with the epoch beside every word, into every
    rank's inbox; then waits for every rank's line and adds them in rank order (float32).
    """
    ir, arith, *_ = pir.mlir()
    i64 = ir.IntegerType.get_signless(64)
    c64 = pir.c64
    lane32 = arith.muli(arith.extui(i64, b.tid), c64(32))
    row = arith.addi(arith.muli(b.parity, c64(layout.max_blocks)), b.blk)  # (parity, block)

    def inbox(base, sender, i):  # this thread's line of tile i from ``sender`` (i64 or int)
        s = sender if isinstance(sender, ir.Value) else c64(sender)
        slot = arith.addi(arith.muli(row, c64(layout.max_ranks)), s)
        off = arith.addi(arith.muli(slot, c64(layout.inbox_slot_bytes)), c64(i * 2 * TILE_BYTES + layout.inbox_offset))
        return arith.addi(base, arith.addi(off, lane32))

    me = arith.extui(i64, b.rank)
    for i in range(tpb):
        words = pir.quad_asm(pir.LOAD16_PTX, [pir.lane_addr(b, b.x_addr, i)])
        for j in range(n):
            pir.asm(pir.LL_PUSH_PTX, [inbox(b.bases[j], me, i), *words, b.epoch])
    sums = []
    for i in range(tpb):
        acc = None
        for j in range(n):
            words = pir.quad_asm(pir.LL_WAIT_PTX, [inbox(b.own, j, i), b.epoch, c64(int(timeout_ns))])
            vals = [v for w in words for v in pir.word_to_f32(name, w)]
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
    _, _, _, _, _, _, _, mu = pir.mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tpb = plan.tiles_per_block
    name = np.dtype(dtype).name

    def body(x_ref, table_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
        def _(ctx, x, table, o):
            b = pir.block_start(x, table, o, n, layout, tpb)
            for i, acc in enumerate(ll_sums(b, n, layout, tpb, name, timeout_ns)):
                per = len(acc) // 4
                out = [pir.f32_to_word(name, acc[k * per : (k + 1) * per]) for k in range(4)]
                pir.asm(pir.STORE16_PTX, [pir.lane_addr(b, b.o_addr, i), *out])
            mu.warpgroup_barrier()  # every thread has read the counter before it moves
            pir.block_finish(b)

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
    return pir.kernel(body, out_struct(x.shape, x.dtype, x), plan.blocks)(x, table)
