"""One-shot and two-shot all-reduce as Mosaic GPU kernels (Pallas ``plgpu``), NVLink peer stores.

One process drives all local GPUs; XLA's collective-metadata path gives every kernel the
addresses of its peers' copies of each output buffer, which ``plgpu.remote_ref`` turns into
peer references. A thread block per slice of rows works independently of the others, with its
own semaphores, so the whole grid moves data at once.

One-shot, per block ``b`` owning rows ``R_b``::

    for each peer p:  stage@p[me, R_b] = x[R_b]       (peer stores over NVLink)
                      signal sem_in[b]@p
    wait sem_in[b] == n - 1
    out[R_b] = sum_{j=0..n-1} (x if j == me else stage[j])[R_b]   (float32, rank order)
    for each peer p:  signal sem_done[b]@p            (this block is done reading its staging)
    wait sem_done[b] == n - 1                          (so nobody's next call can overwrite it)

Two-shot, per block ``b`` owning rows ``R_b`` of each of the n pieces::

    for each peer p:  stage@p[me, R_b] = x[piece p][R_b];  signal sem_in[b]@p
    wait sem_in[b] == n - 1
    mine = sum_j (x[piece me] if j == me else stage[j])[R_b]      (float32, rank order)
    out[piece me][R_b] = mine;  for each peer p: out@p[piece me][R_b] = mine; signal sem_out[b]@p
    wait sem_out[b] == n - 1

NVLink multicast (multimem) is never used.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.custom_all_reduce.planning import LANES, Plan, out_struct, peer_coords

__all__ = ["ROWS_PER_BLOCK", "handshake_gpu", "local_copy_gpu", "one_shot_gpu", "two_shot_gpu"]

ROWS_PER_BLOCK = 32  # rows of 128 lanes per thread block: 8 KiB of bf16, 16 KiB of f32
_BLOCKS = "blocks"


def _kernel_call(body, out_types, scratch, grid: int):
    params = inspect.signature(plgpu.kernel).parameters
    kwargs = {
        ("out_type" if "out_type" in params else "out_shape"): out_types,
        ("scratch_types" if "scratch_types" in params else "scratch_shapes"): scratch,
        "grid": (grid,),
        "grid_names": (_BLOCKS,),
    }
    return plgpu.kernel(body, **kwargs)


def _rows_per_block(rows: int) -> int:
    r = min(ROWS_PER_BLOCK, rows)
    while rows % r:
        r //= 2
    return r


def _ordered_sum(stage_ref, n: int, dtype):
    """sum_j stage[j] in float32, rank order (every rank adds the same terms in the same order)."""
    acc = stage_ref[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + stage_ref[j].astype(jnp.float32)
    return acc.astype(dtype)


def one_shot_gpu(x2d: jax.Array, axis_name, plan: Plan) -> jax.Array:
    """One-shot all-reduce of ``x2d: T[plan.rows, 128]`` along ``axis_name``."""
    n = plan.world_size
    rpb = _rows_per_block(plan.rows)
    blocks = plan.rows // rpb

    def body(x_ref, o_ref, stage_ref, sem_in, sem_done):
        b = lax.axis_index(_BLOCKS)
        me = lax.axis_index(axis_name)
        rows = pl.ds(b * rpb, rpb)
        vals = x_ref[rows, :]
        for k in range(1, n):
            peer = peer_coords(axis_name, lax.rem(me + k, n))
            plgpu.remote_ref(stage_ref, peer).at[me, rows, :][...] = vals
            pl.semaphore_signal(sem_in.at[b], device_id=peer)
        stage_ref.at[me, rows, :][...] = vals  # own slot, locally: the sum reads slots 0..n-1 in order
        pl.semaphore_wait(sem_in.at[b], n - 1)
        o_ref[rows, :] = _ordered_sum(stage_ref.at[:, rows, :], n, o_ref.dtype)
        for k in range(1, n):
            pl.semaphore_signal(sem_done.at[b], device_id=peer_coords(axis_name, lax.rem(me + k, n)))
        pl.semaphore_wait(sem_done.at[b], n - 1)

    call = _kernel_call(
        body,
        (
            out_struct(x2d.shape, x2d.dtype, x2d, invariant_over=axis_name),
            out_struct((n, *x2d.shape), x2d.dtype, x2d, varying_over=axis_name),
        ),
        [plgpu.SemaphoreType.REGULAR((blocks,)), plgpu.SemaphoreType.REGULAR((blocks,))],
        blocks,
    )
    out, _stage = call(x2d)
    return out


def two_shot_gpu(x2d: jax.Array, axis_name, plan: Plan) -> jax.Array:
    """Two-shot all-reduce (reduce-scatter, then all-gather) of ``x2d: T[plan.rows, 128]``."""
    n = plan.world_size
    piece = plan.rows_per_rank
    rpb = _rows_per_block(piece)
    blocks = piece // rpb

    def body(x_ref, o_ref, stage_ref, sem_in, sem_out):
        b = lax.axis_index(_BLOCKS)
        me = lax.axis_index(axis_name)
        for k in range(1, n):
            p = lax.rem(me + k, n)
            peer = peer_coords(axis_name, p)
            plgpu.remote_ref(stage_ref, peer).at[me, pl.ds(b * rpb, rpb), :][...] = x_ref[
                pl.ds(p * piece + b * rpb, rpb), :
            ]
            pl.semaphore_signal(sem_in.at[b], device_id=peer)
        own = pl.ds(me * piece + b * rpb, rpb)
        stage_ref.at[me, pl.ds(b * rpb, rpb), :][...] = x_ref[own, :]
        pl.semaphore_wait(sem_in.at[b], n - 1)
        mine = _ordered_sum(stage_ref.at[:, pl.ds(b * rpb, rpb), :], n, o_ref.dtype)
        o_ref[own, :] = mine
        for k in range(1, n):
            peer = peer_coords(axis_name, lax.rem(me + k, n))
            plgpu.remote_ref(o_ref, peer).at[own, :][...] = mine
            pl.semaphore_signal(sem_out.at[b], device_id=peer)
        pl.semaphore_wait(sem_out.at[b], n - 1)

    call = _kernel_call(
        body,
        (
            out_struct(x2d.shape, x2d.dtype, x2d, invariant_over=axis_name),
            out_struct((n, piece, LANES), x2d.dtype, x2d, varying_over=axis_name),
        ),
        [plgpu.SemaphoreType.REGULAR((blocks,)), plgpu.SemaphoreType.REGULAR((blocks,))],
        blocks,
    )
    out, _stage = call(x2d)
    return out


@functools.partial(jax.named_call, name="custom_all_reduce_handshake")
def handshake_gpu(x2d: jax.Array, axis_name, plan: Plan) -> jax.Array:
    """Benchmark floor: one block signals every peer and waits, then copies ``x`` to the output.

    Not an all-reduce: it measures the fixed cost of launching a peer-to-peer kernel through
    XLA's collective-metadata path plus one signal round trip.
    """
    n = plan.world_size

    def body(x_ref, o_ref, sem):
        me = lax.axis_index(axis_name)
        for k in range(1, n):
            pl.semaphore_signal(sem, device_id=peer_coords(axis_name, lax.rem(me + k, n)))
        pl.semaphore_wait(sem, n - 1)
        o_ref[...] = x_ref[...]

    return _kernel_call(body, out_struct(x2d.shape, x2d.dtype, x2d), [plgpu.SemaphoreType.REGULAR], 1)(x2d)


def local_copy_gpu(x2d: jax.Array) -> jax.Array:
    """Benchmark floor: a one-block Mosaic GPU kernel with no peer access (copies ``x``)."""

    def body(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    return _kernel_call(body, out_struct(x2d.shape, x2d.dtype, x2d), [], 1)(x2d)
