"""Low-latency row exchange on persistent peer buffers: the wire of the expert-parallel dispatch and combine.

Rank ``r`` holds ``send: uint32[ep, max_rows, words]`` (the rows it sends to each destination,
packed at the front of each destination's block) and ``counts: int32[ep]`` (how many rows each
destination gets). The exchange delivers ``recv[s] = send_s[r][:counts_s[r]]`` and
``recv_counts[s] = counts_s[r]`` for every source ``s``; rows of ``recv`` past a source's count are
undefined (the caller masks them). Dispatch and combine are both this exchange, each in its own
region of the buffer (its own epochs): dispatch sends tokens to the ranks owning their experts,
combine sends the owners' partial sums back.

GPU form (Mosaic GPU, raw device addresses, as ``kernels/custom_all_reduce/peer.py`` does): the
grid has ``ep * chunks`` thread blocks; block ``b = c * ep + j`` owns rows
``[c * R, (c + 1) * R)`` (``R = ceil(max_rows / chunks)``) of one destination and one source::

    epoch = counters[b] + 1;  p = epoch % 2                      (this device's region, per block)
    d = (me + j) % ep:        data[p][me][rows of c] @ d = send[d][rows of c, < counts[d]]   (plain stores)
                              rowcount[p][b][me] @ d = rows sent
    bar.sync; thread 0:       fence.acq_rel.sys; flags[b][me] @ d = epoch  (relaxed.sys store)
    s = (me - j) % ep:        thread 0 spins until flags[b][s] (mine) in {epoch, epoch + 1} (ld.acquire.sys)
    bar.sync;                 m = rowcount[p][b][s];  recv[s][rows of c][:m] = data[p][s][rows of c][:m]
    bar.sync; thread 0:       counters[b] = epoch

Source ``s``'s block ``b`` sends to ``(s + j) % ep``: exactly the destination whose block ``b``
waits for ``s``. Double buffering by epoch parity replaces a closing barrier: ``s`` writes parity
``p`` at call ``k + 2`` only after passing call ``k + 1``'s flags, which ``d`` writes only after
finishing call ``k``; so ``s`` is at most one call ahead, hence the wait accepts ``epoch`` and
``epoch + 1``. A wait longer than ``timeout_ns`` traps. :mod:`kernels.expert_parallel.emulation`
runs this protocol step by step on CPU.

The pull form (``form="pull"``) moves the same rows the other way round: source ``s``'s block stages
its rows for ``d`` in its OWN ``data[p][d]`` and ``rowcount[p][b][d]`` (local stores), fences and sets
``d``'s flag as above; ``d``'s block waits on that flag and then reads ``rowcount[p][b][d]`` and the
rows from ``s``'s buffer (peer loads). Only the flag crosses the link as a store. Reuse is safe for the
same reason: ``s`` restages parity ``p`` at call ``k + 2`` only after call ``k + 1``'s flags from ``d``,
which ``d`` sets after finishing call ``k``'s reads. :mod:`kernels.expert_parallel.emulation` runs
both forms (the pull one for the combine).

CPU and everywhere else: :func:`exchange_rows_reference`, the same exchange as one ``all_to_all``
of the padded blocks (rows past a count hold a fill value the caller picks).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels import compat
from kernels.custom_all_reduce import peer_ir
from kernels.symmetric_memory import TILE_BYTES, Layout

__all__ = [
    "DEFAULT_TIMEOUT_NS",
    "FORMS",
    "ExchangeLayout",
    "exchange_rows_peer",
    "exchange_rows_reference",
    "row_words",
    "spin_timeout_ns",
    "symmetric_layout",
]

DEFAULT_TIMEOUT_NS = 20_000_000_000  # 20 s: far beyond any call, short of a silent hang
FORMS = ("push", "pull")  # where the rows wait between the source's copy and the destination's
TIMEOUT_ENV = "SPMD_EP_SPIN_TIMEOUT_NS"  # a GPU check sets a short bound (2 s) so a lost flag traps fast


def spin_timeout_ns() -> int:
    """The spin bound: ``$SPMD_EP_SPIN_TIMEOUT_NS`` when set (a positive int), else :data:`DEFAULT_TIMEOUT_NS`.

    Raises:
      ValueError: the variable is set but not a positive integer.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_NS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of nanoseconds (2000000000 = 2 s), got {raw!r}.")
    return value


THREADS = 128  # one warpgroup per block; each thread moves 16 bytes at a time


@dataclasses.dataclass(frozen=True)
class ExchangeLayout:
    """One exchange's region of a device's peer buffer (bytes from the buffer's start).

    Attributes:
      ranks: the group size ``ep``.
      max_rows: rows per (source, destination) block.
      row_words: 32-bit words per row (a multiple of 4: rows move in 16-byte pieces).
      chunks: thread blocks per destination (the grid is ``ranks * chunks``).
      base: where the region starts (a multiple of 4096).
    """

    ranks: int
    max_rows: int
    row_words: int
    chunks: int = 1
    base: int = 0

    def __post_init__(self):
        for name in ("ranks", "max_rows", "row_words", "chunks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ExchangeLayout: expected {name} to be a positive int, got {v!r}.")
        if self.row_words % 4:
            raise ValueError(f"ExchangeLayout: expected row_words to be a multiple of 4, got {self.row_words}.")
        if isinstance(self.base, bool) or not isinstance(self.base, int) or self.base < 0 or self.base % 4096:
            raise ValueError(f"ExchangeLayout: expected base to be a non-negative multiple of 4096, got {self.base!r}.")

    @property
    def blocks(self) -> int:
        return self.ranks * self.chunks

    @property
    def rows_per_chunk(self) -> int:
        return -(-self.max_rows // self.chunks)

    @property
    def row_bytes(self) -> int:
        return 4 * self.row_words

    @property
    def counters_offset(self) -> int:
        return self.base

    @property
    def flags_offset(self) -> int:
        return self.base + 4 * self.blocks

    @property
    def rowcount_offset(self) -> int:
        """``rowcount[2][blocks][ranks]``: rows each source's block sent, by parity."""
        return self.flags_offset + 4 * self.blocks * self.ranks

    @property
    def data_offset(self) -> int:
        """``data[2][ranks][max_rows][row_bytes]``: each source's rows, by parity (4096-aligned)."""
        return -(-(self.rowcount_offset + 8 * self.blocks * self.ranks) // 4096) * 4096

    @property
    def end(self) -> int:
        """First byte past this region, rounded up to 4096."""
        return -(-(self.data_offset + 2 * self.ranks * self.max_rows * self.row_bytes) // 4096) * 4096


def symmetric_layout(nbytes: int, ranks: int) -> Layout:
    """A :class:`kernels.symmetric_memory.Layout` whose buffer holds at least ``nbytes`` (for ``allocate``).

    The exchange uses the buffer as raw bytes (its own :class:`ExchangeLayout` regions); the
    layout only sizes it, and (being unlike the all-reduce's) keeps it a separate buffer.
    """
    tiles = -(-nbytes // (2 * TILE_BYTES))
    return Layout(max_blocks=1, tiles_per_block_max=max(1, tiles), max_ranks=ranks, ll_tiles_per_block_max=1)


def exchange_rows_reference(
    send: jax.Array, counts: jax.Array, *, axis_name: Any, fill: Any = 0
) -> tuple[jax.Array, jax.Array]:
    """The exchange as one ``all_to_all`` (inside ``shard_map``): the same rows as the kernel delivers.

    Args:
      send: ``T[ep, max_rows, ...]``: rows for each destination, packed at the front.
      counts: ``int32[ep]``: rows for each destination.
      axis_name: the EP axis.
      fill: what rows past a source's count hold (the kernel leaves them undefined; a caller that
        must not read them passes a poison value, all-ones words say, so a test sees if it does).

    Returns:
      ``(recv T[ep, max_rows, ...], recv_counts int32[ep])``, indexed by source rank.
    """
    recv = lax.all_to_all(send, axis_name, 0, 0, tiled=True)
    recv_counts = lax.all_to_all(counts.astype(jnp.int32), axis_name, 0, 0, tiled=True)
    rows = jnp.arange(send.shape[1], dtype=jnp.int32)
    keep = (rows[None, :] < recv_counts[:, None]).reshape(*counts.shape, send.shape[1], *(1,) * (send.ndim - 2))
    return jnp.where(keep, recv, jnp.asarray(fill, send.dtype)), recv_counts


# GPU form --------------------------------------------------------------------------------------------


@functools.cache
def _mlir():
    from jax.experimental.mosaic.gpu import utils as mu

    return (*compat.mlir_dialects(), mu)


def _asm(ptx: str, args: list, results: int = 0):
    """Inline PTX with side effects; ``results`` 32-bit outputs (``$0..``) before the operands."""
    ir, _, _, llvm, *_ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    cons = ["=r"] * results + ["l" if ir.IntegerType(a.type).width == 64 else "r" for a in args]
    if results == 0:
        res = ir.Type.parse("!llvm.void")
    elif results == 1:
        res = i32
    else:
        res = llvm.StructType.get_literal([i32] * results)
    out = llvm.inline_asm(res, args, ptx, ",".join(cons), has_side_effects=True)
    if results <= 1:
        return out
    return [llvm.extractvalue(i32, out, [k]) for k in range(results)]


_WAIT_PTX = """{
.reg .pred spmd_done, spmd_late;
.reg .b32 spmd_v;
.reg .b64 spmd_t0, spmd_t1;
mov.u64 spmd_t0, %globaltimer;
SPMD_EP_WAIT:
ld.acquire.sys.global.b32 spmd_v, [$0];
sub.u32 spmd_v, spmd_v, $1;
setp.le.u32 spmd_done, spmd_v, 1;
@spmd_done bra SPMD_EP_DONE;
mov.u64 spmd_t1, %globaltimer;
sub.u64 spmd_t1, spmd_t1, spmd_t0;
setp.gt.u64 spmd_late, spmd_t1, $2;
@spmd_late trap;
bra SPMD_EP_WAIT;
SPMD_EP_DONE:
}"""
# The all-reduce kernels' release store and 16-byte moves (the same instructions).
_SIGNAL_PTX = peer_ir.SIGNAL_PTX
_LOAD16_PTX = peer_ir.LOAD16_PTX
_LOAD16_VOLATILE_PTX = peer_ir.LOAD16_VOLATILE_PTX
_STORE16_PTX = peer_ir.STORE16_PTX
_COUNTER_LOAD_PTX = "ld.relaxed.gpu.global.b32 $0, [$1];"
_COUNTER_STORE_PTX = "st.relaxed.gpu.global.b32 [$0], $1;"
_ROWCOUNT_STORE_PTX = "st.relaxed.sys.global.b32 [$0], $1;"
_ROWCOUNT_LOAD_PTX = "ld.relaxed.sys.global.b32 $0, [$1];"
_PLAIN_STORE_PTX = "st.global.b32 [$0], $1;"


def _exchange_body(lay: ExchangeLayout, timeout_ns: int, form: str = "push"):
    """The kernel body (see the module docstring) for one layout, in the push or the pull form."""
    pull = form == "pull"
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ep, rpc, quads = lay.ranks, lay.rows_per_chunk, lay.row_words // 4
    per_thread = -(-quads // THREADS)

    def body(send_ref, counts_ref, table_ref, recv_ref, rcounts_ref):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 5)
        def _(ctx, send, counts, table, recv, rcounts):
            ir, arith, gpu, llvm, memref, scf, mu = _mlir()
            i32, i64, index = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.IndexType.get()

            def c32(v):
                return arith.constant(i32, v)

            def c64(v):
                return arith.constant(i64, v)

            def word(k):
                return memref.load(table, [arith.constant(index, k)])

            bases = [
                arith.ori(arith.extui(i64, word(1 + 2 * q)), arith.shli(arith.extui(i64, word(2 + 2 * q)), c64(32)))
                for q in range(ep)
            ]

            def pick(idx, values):
                out = values[0]
                for q in range(1, len(values)):
                    out = arith.select(arith.cmpi(arith.CmpIPredicate.eq, idx, c32(q)), values[q], out)
                return out

            rank = word(0)
            own = pick(rank, bases)
            blk = arith.index_cast(i32, gpu.block_id(gpu.Dimension.x))
            tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
            j, c = arith.remui(blk, c32(ep)), arith.divui(blk, c32(ep))
            dest = arith.remui(arith.addi(rank, j), c32(ep))
            src = arith.remui(arith.subi(arith.addi(rank, c32(ep)), j), c32(ep))
            is_t0 = arith.cmpi(arith.CmpIPredicate.eq, tid, c32(0))
            blk64 = arith.extui(i64, blk)
            counter = arith.addi(own, arith.addi(c64(lay.counters_offset), arith.muli(blk64, c64(4))))
            epoch = arith.addi(_asm(_COUNTER_LOAD_PTX, [counter], results=1), c32(1))
            parity = arith.extui(i64, arith.andi(epoch, c32(1)))
            first = arith.muli(c, c32(rpc))  # this chunk's first row

            def rows_left(total):  # rows of this chunk below ``total``: clamp(total - first, 0, rpc)
                n = arith.subi(total, first)
                n = arith.select(arith.cmpi(arith.CmpIPredicate.slt, n, c32(0)), c32(0), n)
                return arith.select(arith.cmpi(arith.CmpIPredicate.sgt, n, c32(rpc)), c32(rpc), n)

            def data_row(base, sender, row):  # data[parity][sender][row] in the buffer at ``base``
                slot = arith.addi(arith.muli(parity, c64(ep)), arith.extui(i64, sender))
                r = arith.addi(arith.muli(slot, c64(lay.max_rows)), arith.extui(i64, row))
                return arith.addi(base, arith.addi(c64(lay.data_offset), arith.muli(r, c64(lay.row_bytes))))

            def ref_addr(ref):
                return llvm.ptrtoint(i64, mu.memref_ptr(ref))

            def array_row(base, who, row):  # row ``row`` of block ``who`` of a [ep, max_rows, words] operand
                r = arith.addi(arith.muli(arith.extui(i64, who), c64(lay.max_rows)), arith.extui(i64, row))
                return arith.addi(base, arith.muli(r, c64(lay.row_bytes)))

            def copy_rows(n, src_row, dst_row, load_ptx):  # rows [0, n) of this chunk, 16 bytes per thread per step
                loop = scf.ForOp(arith.constant(index, 0), arith.index_cast(index, n), arith.constant(index, 1))
                with ir.InsertionPoint(loop.body):
                    row = arith.addi(first, arith.index_cast(i32, loop.induction_variable))
                    s_row, d_row = src_row(row), dst_row(row)
                    for q in range(per_thread):
                        quad = arith.addi(tid, c32(q * THREADS))
                        off = arith.muli(arith.extui(i64, quad), c64(16))

                        def move(off=off):
                            w = _asm(load_ptx, [arith.addi(s_row, off)], results=4)
                            _asm(_STORE16_PTX, [arith.addi(d_row, off), *w])

                        if (q + 1) * THREADS <= quads:
                            move()
                        else:
                            with mu.when(arith.cmpi(arith.CmpIPredicate.ult, quad, c32(quads))):
                                move()
                    scf.yield_([])

            send_base, recv_base = ref_addr(send), ref_addr(recv)
            peer = pick(dest, bases)
            # Send: my rows for ``dest`` in this chunk: push, into ``dest``'s data[parity][me]; pull, staged
            # in my own data[parity][dest] for ``dest`` to read.
            n_send = rows_left(memref.load(counts, [arith.index_cast(index, dest)]))
            at, who = (own, dest) if pull else (peer, rank)
            copy_rows(n_send, lambda r: array_row(send_base, dest, r), lambda r: data_row(at, who, r), _LOAD16_PTX)
            cell = arith.addi(arith.muli(blk64, c64(ep)), arith.extui(i64, who))  # [blk][me] (pull: [blk][dest])
            with mu.when(is_t0):
                where = arith.addi(c64(lay.rowcount_offset), arith.muli(arith.addi(
                    arith.muli(parity, c64(lay.blocks * ep)), cell), c64(4)))  # fmt: skip
                _asm(_ROWCOUNT_STORE_PTX, [arith.addi(at, where), n_send])
            mu.warpgroup_barrier()
            with mu.when(is_t0):
                me_cell = arith.addi(arith.muli(blk64, c64(ep)), arith.extui(i64, rank))
                flag = arith.addi(peer, arith.addi(c64(lay.flags_offset), arith.muli(me_cell, c64(4))))
                _asm(_SIGNAL_PTX, [flag, epoch])
            # Receive: ``src``'s rows for me in this chunk (push: from my buffer; pull: from ``src``'s).
            mine = arith.addi(arith.muli(blk64, c64(ep)), arith.extui(i64, src))
            with mu.when(is_t0):
                flag = arith.addi(own, arith.addi(c64(lay.flags_offset), arith.muli(mine, c64(4))))
                _asm(_WAIT_PTX, [flag, epoch, c64(int(timeout_ns))])
            mu.warpgroup_barrier()
            at, who = (pick(src, bases), rank) if pull else (own, src)
            cell = arith.addi(arith.muli(blk64, c64(ep)), arith.extui(i64, who))
            where = arith.addi(c64(lay.rowcount_offset), arith.muli(arith.addi(
                arith.muli(parity, c64(lay.blocks * ep)), cell), c64(4)))  # fmt: skip
            n_recv = _asm(_ROWCOUNT_LOAD_PTX, [arith.addi(at, where)], results=1)
            copy_rows(
                n_recv, lambda r: data_row(at, who, r), lambda r: array_row(recv_base, src, r), _LOAD16_VOLATILE_PTX
            )
            with mu.when(is_t0):
                slot = arith.addi(arith.muli(arith.extui(i64, src), c64(lay.chunks)), arith.extui(i64, c))
                _asm(_PLAIN_STORE_PTX, [arith.addi(ref_addr(rcounts), arith.muli(slot, c64(4))), n_recv])
            mu.warpgroup_barrier()  # every thread has read the counter before it moves
            with mu.when(is_t0):
                _asm(_COUNTER_STORE_PTX, [counter, epoch])

        _(send_ref, counts_ref, table_ref, recv_ref, rcounts_ref)

    return body


def exchange_rows_peer(
    send: jax.Array,
    counts: jax.Array,
    table: jax.Array,
    *,
    layout: ExchangeLayout,
    timeout_ns: int | None = None,
    form: str = "push",
) -> tuple[jax.Array, jax.Array]:
    """The exchange on the peer buffers (Mosaic GPU; inside ``shard_map`` on NVIDIA GPUs).

    Args:
      send: ``uint32[ep, max_rows, row_words]``: rows for each destination, packed at the front.
      counts: ``int32[ep]``: rows for each destination (clamped to ``max_rows``).
      table: ``int32[1 + 2 ep]``: :meth:`kernels.symmetric_memory.SymmetricBuffers.peer_table`.
      layout: this exchange's region of the buffers.
      timeout_ns: how long a block waits for a peer before the kernel traps (default
        :func:`spin_timeout_ns`: ``$SPMD_EP_SPIN_TIMEOUT_NS`` or 20 s).
      form: ``"push"`` (each source writes its rows into the destination's buffer) or ``"pull"`` (each
        source stages them in its own buffer, and the destination reads them from there after the flag).

    Returns:
      ``(recv uint32[ep, max_rows, row_words], recv_counts int32[ep])``: rows past a source's count
      are undefined.

    Raises:
      ValueError: operands that do not match ``layout``; ``form`` not one of :data:`FORMS`.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if form not in FORMS:
        raise ValueError(f"exchange_rows_peer: expected form in {FORMS}, got {form!r}.")
    ep = layout.ranks
    want = (ep, layout.max_rows, layout.row_words)
    if tuple(send.shape) != want or send.dtype != jnp.uint32:
        raise ValueError(f"exchange_rows_peer: expected send uint32{list(want)}, got {send.dtype}{list(send.shape)}.")
    if tuple(counts.shape) != (ep,) or counts.dtype != jnp.int32:
        raise ValueError(f"exchange_rows_peer: expected counts int32[{ep}], got {counts.dtype}{list(counts.shape)}.")
    if tuple(table.shape) != (1 + 2 * ep,) or table.dtype != jnp.int32:
        raise ValueError(
            f"exchange_rows_peer: expected table int32[{1 + 2 * ep}], got {table.dtype}{list(table.shape)}."
        )
    if timeout_ns is None:
        timeout_ns = spin_timeout_ns()
    counts = jnp.clip(counts, 0, layout.max_rows)
    out_type = (jax.ShapeDtypeStruct(want, jnp.uint32), jax.ShapeDtypeStruct((ep, layout.chunks), jnp.int32))
    params = inspect.signature(plgpu.kernel).parameters
    kwargs = {("out_type" if "out_type" in params else "out_shape"): out_type}
    kernel = plgpu.kernel(
        _exchange_body(layout, int(timeout_ns), form), grid=(layout.blocks,), grid_names=("blocks",), **kwargs
    )
    recv, chunk_counts = kernel(send, counts, table)
    return recv, chunk_counts.sum(axis=1).astype(jnp.int32)


def row_words(payload_bytes: int) -> int:
    """32-bit words of a row carrying ``payload_bytes``, rounded up to 16 bytes."""
    return int(-(-payload_bytes // 16) * 4)
