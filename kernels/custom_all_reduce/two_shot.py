"""Two-shot all-reduce on persistent peer buffers (Mosaic GPU, raw device addresses).

The one-shot (:mod:`.peer`) has every rank read all ``n`` copies of the message: ``n - 1`` copies
cross NVLink into each GPU. The two-shot moves ``2 (n - 1) / n`` of it: each rank reduces ``1/n``
of the message (reduce-scatter by peer reads) and writes its sums into every rank's buffer
(all-gather by peer writes). Thread block ``b`` (one warpgroup) owns ``tpb`` tiles of 2 KiB, the
same split as the one-shot's pull protocol (:func:`.peer.padded_plan`); within them rank ``r``
owns the bytes ``[r C, (r + 1) C)``, ``C = tpb * 2 KiB / n`` (``n`` divides 128, so ``C`` is
whole 16-byte units for every message size)::

    e1 = counters[b] + 1;  e2 = e1 + 1;  p = e1 % 2     (two epochs per call)
    staging[p][b] (mine)  = x[tiles of b]                                  (local stores)
    flag round e1: bar.sync; thread r < n: fence.acq_rel.sys; flags[b][me] @ r = e1;
                   spin until flags[b][r] (mine) in {e1, e1 + 1} (ld.acquire.sys); bar.sync
    s = sum_{j = 0..n-1} staging[p][b][my chunk] @ j     (volatile loads, float32, rank order)
    staging[p][b][my chunk] @ j = s  for every rank j                      (stores to peers)
    flag round e2   (the fence publishes the sums written to the peers)
    out[tiles of b] = staging[p][b] (mine)                                 (volatile loads)
    thread 0: counters[b] = e2

Why it is safe without zeroing anything: the flags only grow (each slot is written by one rank's
block ``b``, with every call's epochs larger than the last), so an old value never passes a wait
(unsigned ``flag - epoch <= 1``), and a peer is at most one epoch ahead of a waiting block: it
cannot pass round ``e2`` before this block's own ``e2`` signal, nor the next call's round before
this block finishes. Every access of a peer to this device's ``staging[p][b]`` during a call
(its reads in the reduce-scatter, its writes of the sums) happens before its ``e2`` signal, and
this block leaves the call only after every ``e2``: the next call may reuse the slot at once.
The staging parity is the first epoch's, so a two-shot after a pull one-shot (whose peers may
still read this device's previous parity) stages into the other half, as a pull after a pull does.
Counting two epochs per call keeps ``e2`` of one call apart from ``e1`` of the next, whatever
protocol follows (ll, pull, fused or two-shot: all read the same per-block counter).

A spin that waits longer than ``timeout_ns`` traps. Every rank adds the same terms in the same
order in float32 (the one-shot's and ``reference_all_reduce``'s bits). NVLink multicast is never used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels.custom_all_reduce import peer_ir as pir
from kernels.custom_all_reduce.peer import PeerPlan, padded_plan
from kernels.custom_all_reduce.planning import SUPPORTED_DTYPES, out_struct
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = ["THREADS", "UNIT_BYTES", "chunk_bytes", "thread_rounds", "two_shot_peer"]

THREADS = 128  # one warpgroup per block
UNIT_BYTES = 16  # what one thread moves per access


def chunk_bytes(tiles_per_block: int, world_size: int) -> int:
    """Bytes of one block's tiles that one rank reduces (``tpb * 2 KiB / n``)."""
    return tiles_per_block * TILE_BYTES // world_size


def thread_rounds(tiles_per_block: int, world_size: int) -> list[int]:
    """How many of the block's threads are busy in each round of the reduce-scatter.

    A rank's chunk holds ``W = chunk_bytes / 16`` units; in round ``k`` thread ``t`` takes unit
    ``t + 128 k`` when ``t`` is below the round's count (128, or what is left in the last round).
    """
    units = chunk_bytes(tiles_per_block, world_size) // UNIT_BYTES
    return [min(THREADS, units - k) for k in range(0, units, THREADS)]


def _two_shot_body(n: int, plan: PeerPlan, dtype: Any, layout: Layout, timeout_ns: int):
    ir, arith, _, _, _, _, _, mu = pir.mlir()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tpb = plan.tiles_per_block
    name = np.dtype(dtype).name
    chunk = chunk_bytes(tpb, n)
    rounds = thread_rounds(tpb, n)
    c64 = pir.c64

    def body(x_ref, table_ref, o_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()))
        def _(ctx, x, table, o):
            i64 = ir.IntegerType.get_signless(64)
            b = pir.block_start(x, table, o, n, layout, tpb)
            e2 = arith.addi(b.epoch, pir.c32(1))
            row = arith.addi(arith.muli(b.parity, c64(layout.max_blocks)), b.blk)
            slot = arith.muli(row, c64(layout.slot_bytes))  # staging[p][b], from a buffer's base
            lane16 = arith.muli(arith.extui(i64, b.tid), c64(UNIT_BYTES))

            def staged(base, i):  # this thread's 16 bytes of tile i in staging[p][b] of the buffer at ``base``
                return arith.addi(base, arith.addi(slot, arith.addi(c64(i * TILE_BYTES), lane16)))

            # 1. Stage this block's tiles of the input in this device's buffer.
            words = [pir.quad_asm(pir.LOAD16_PTX, [pir.lane_addr(b, b.x_addr, i)]) for i in range(tpb)]
            for i in range(tpb):
                pir.asm(pir.STORE16_PTX, [staged(b.own, i), *words[i]])
            pir.flag_round(b, n, layout, b.epoch, timeout_ns)

            # 2. Reduce-scatter (peer reads) and all-gather (peer writes) of this rank's chunk.
            mine = arith.addi(slot, arith.muli(arith.extui(i64, b.rank), c64(chunk)))

            def reduce_units(rounds_here: list[int]) -> None:
                # Every load of these rounds first (they overlap in flight), then the sums and the stores.
                units = [arith.addi(mine, arith.addi(c64(k * THREADS * UNIT_BYTES), lane16)) for k in rounds_here]
                got = [
                    [pir.quad_asm(pir.LOAD16_VOLATILE_PTX, [arith.addi(b.bases[j], unit)]) for j in range(n)]
                    for unit in units
                ]
                for unit, quads in zip(units, got, strict=True):
                    acc = None
                    for quad in quads:  # rank order, float32
                        vals = [v for w in quad for v in pir.word_to_f32(name, w)]
                        acc = vals if acc is None else [arith.addf(a, v) for a, v in zip(acc, vals, strict=True)]
                    per = len(acc) // 4
                    out = [pir.f32_to_word(name, acc[q * per : (q + 1) * per]) for q in range(4)]
                    for j in range(n):
                        pir.asm(pir.STORE16_PTX, [arith.addi(b.bases[j], unit), *out])

            full = [k for k, busy in enumerate(rounds) if busy == THREADS]
            if full:
                reduce_units(full)
            if rounds[-1] < THREADS:  # the last round: only the threads below what is left
                with mu.when(arith.cmpi(arith.CmpIPredicate.ult, b.tid, pir.c32(rounds[-1]))):
                    reduce_units([len(rounds) - 1])
            pir.flag_round(b, n, layout, e2, timeout_ns)

            # 3. Every rank's sums are in this device's staging slot: copy them out.
            words = [pir.quad_asm(pir.LOAD16_VOLATILE_PTX, [staged(b.own, i)]) for i in range(tpb)]
            for i in range(tpb):
                pir.asm(pir.STORE16_PTX, [pir.lane_addr(b, b.o_addr, i), *words[i]])
            pir.block_finish(b, e2)  # after flag_round's barriers: every thread has read the counter

        _(x_ref, table_ref, o_ref)

    return body


def two_shot_peer(
    x: jax.Array,
    table: jax.Array,
    *,
    world_size: int,
    layout: Layout,
    plan: PeerPlan | None = None,
    timeout_ns: int = pir.DEFAULT_TIMEOUT_NS,
) -> jax.Array:
    """Two-shot all-reduce of the flat ``x: T[numel]`` over the group ``table`` describes.

    Args:
      x: this device's input, 1-D, its bytes a multiple of 2 KiB (``ops.all_reduce_kernel`` pads).
      table: :meth:`SymmetricBuffers.peer_table` for the group.
      world_size: the group size ``n``, dividing 128 (1, 2, 4 or 8; ``table`` holds ``1 + 2 n`` words).
      layout: the buffers' layout.
      plan: blocks and tiles per block (default: :func:`.peer.padded_plan`'s split for the pull
        protocol; it must cover ``x`` exactly).
      timeout_ns: how long a block waits for its peers before the kernel traps.

    Returns:
      The sum over the group, the same bits on every rank (and as the one-shot's).

    Raises:
      ValueError: ``x`` is not 1-D or not a supported dtype, ``world_size`` does not divide 128
        or exceeds ``layout.max_ranks``, ``table`` has the wrong size, or ``x`` does not fit the
        staging area in whole blocks.
    """
    if x.ndim != 1:
        raise ValueError(f"two_shot_peer: expected a 1-D input, got shape {x.shape}.")
    if str(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"two_shot_peer: expected a dtype in {sorted(SUPPORTED_DTYPES)}, got {x.dtype}.")
    if not (1 <= world_size <= layout.max_ranks and THREADS % world_size == 0):
        raise ValueError(
            f"two_shot_peer: expected a world_size dividing {THREADS} and at most layout.max_ranks="
            f"{layout.max_ranks}, got {world_size}."
        )
    if table.shape != (1 + 2 * world_size,) or table.dtype != jnp.int32:
        raise ValueError(
            f"two_shot_peer: expected table int32[{1 + 2 * world_size}], got {table.dtype}{list(table.shape)}."
        )
    nbytes = x.size * x.dtype.itemsize
    if plan is None:
        planned = padded_plan(nbytes, layout, "pull")
        plan = planned[1] if planned is not None and planned[0] == nbytes else None
    if (
        plan is None
        or plan.blocks * plan.tiles_per_block * TILE_BYTES != nbytes
        or not 1 <= plan.tiles_per_block <= layout.tiles_per_block_max
        or not 1 <= plan.blocks <= layout.max_blocks
    ):
        raise ValueError(
            f"two_shot_peer: {nbytes} bytes cannot be staged in whole blocks (a multiple of {TILE_BYTES} bytes "
            f"up to {layout.max_message_bytes} that splits into at most {layout.max_blocks} blocks of at most "
            f"{layout.tiles_per_block_max} tiles; got plan {plan}); pad it with kernels.custom_all_reduce.peer."
            "padded_plan, as all_reduce_kernel does."
        )
    body = _two_shot_body(world_size, plan, x.dtype, layout, int(timeout_ns))
    return pir.kernel(body, out_struct(x.shape, x.dtype, x), plan.blocks)(x, table)
