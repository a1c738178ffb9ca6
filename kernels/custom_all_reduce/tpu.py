"""One-shot and two-shot all-reduce in Pallas's TPU form (remote DMA + semaphores).

On CPU this runs in Pallas's TPU interpret mode, which simulates every device's memory, the
remote DMAs between them and their semaphores, and with ``detect_races=True`` reports
unsynchronised accesses: that is how the CI checks the algorithm on 2, 4 and 8 simulated devices.

Both kernels work on the ``[rows, 128]`` view planned by :mod:`.planning` and sum in a fixed
rank order (rank 0 first) in float32, so every rank gets the same bits.

One-shot (latency-bound sizes)::

    barrier: every rank signals every peer, waits for n-1 signals (all peers are in the kernel)
    push:    rank r DMAs its whole buffer into slot r of every peer's staging buffer
    wait:    n-1 incoming DMAs
    reduce:  out = sum_{j=0..n-1} stage[j]   (own slot filled locally)

Two-shot (bandwidth-bound sizes), with the rows cut into n pieces::

    barrier
    scatter: rank r DMAs piece p of its buffer into slot r of rank p's staging buffer
    reduce:  rank r sums slot 0..n-1 of its piece r (in rank order) -> out[piece r]
    gather:  rank r DMAs out[piece r] into out[piece r] of every peer
    wait:    n-1 incoming pieces
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.custom_all_reduce.planning import LANES, Plan, out_struct

__all__ = ["one_shot_tpu", "two_shot_tpu"]


def _peer(axis_name, rank) -> dict:
    """Mesh coordinates of ``rank`` along ``axis_name`` (other mesh axes: this device's own).

    ``rank`` is linear over a tuple of axes, row-major, as ``lax.axis_index`` counts it.
    """
    if isinstance(axis_name, str):
        return {"device_id": {axis_name: rank}}  # a dict of mesh axes: mesh coordinates
    coords = {}
    for a in reversed(axis_name):
        size = lax.axis_size(a)
        coords[a] = lax.rem(rank, size)
        rank = rank // size
    return {"device_id": coords}


def _barrier(axis_name, me, n: int) -> None:
    """Every rank has entered the kernel (its VMEM scratch exists) before anyone writes to it."""
    sem = pltpu.get_barrier_semaphore()
    for k in range(1, n):
        pl.semaphore_signal(sem, 1, **_peer(axis_name, lax.rem(me + k, n)))
    pl.semaphore_wait(sem, n - 1)


def _one_shot_kernel(x_ref, o_ref, stage_ref, send_sems, recv_sems, *, axis_name, n):
    me = lax.axis_index(axis_name)
    _barrier(axis_name, me, n)
    copies = []
    for k in range(1, n):
        peer = lax.rem(me + k, n)
        c = pltpu.make_async_remote_copy(
            src_ref=x_ref,
            dst_ref=stage_ref.at[me],
            send_sem=send_sems.at[k - 1],
            recv_sem=recv_sems.at[k - 1],
            **_peer(axis_name, peer),
        )
        c.start()
        copies.append(c)
    stage_ref[me] = x_ref[...]
    for c in copies:
        c.wait_send()
        c.wait_recv()
    acc = stage_ref[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + stage_ref[j].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _two_shot_kernel(x_ref, o_ref, stage_ref, send_sems, recv_sems, gsend_sems, grecv_sems, *, axis_name, n, piece):
    me = lax.axis_index(axis_name)
    _barrier(axis_name, me, n)
    scatter = []
    for k in range(1, n):
        peer = lax.rem(me + k, n)
        c = pltpu.make_async_remote_copy(
            src_ref=x_ref.at[pl.ds(peer * piece, piece)],
            dst_ref=stage_ref.at[me],
            send_sem=send_sems.at[k - 1],
            recv_sem=recv_sems.at[k - 1],
            **_peer(axis_name, peer),
        )
        c.start()
        scatter.append(c)
    stage_ref[me] = x_ref[pl.ds(me * piece, piece)]
    for c in scatter:
        c.wait_send()
        c.wait_recv()
    acc = stage_ref[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + stage_ref[j].astype(jnp.float32)
    mine = pl.ds(me * piece, piece)
    o_ref[mine] = acc.astype(o_ref.dtype)
    gather = []
    for k in range(1, n):
        peer = lax.rem(me + k, n)
        c = pltpu.make_async_remote_copy(
            src_ref=o_ref.at[mine],
            dst_ref=o_ref.at[mine],
            send_sem=gsend_sems.at[k - 1],
            recv_sem=grecv_sems.at[k - 1],
            **_peer(axis_name, peer),
        )
        c.start()
        gather.append(c)
    for c in gather:
        c.wait_send()
        c.wait_recv()


def _vmem_spec():
    return pl.BlockSpec(memory_space=pltpu.VMEM)


@functools.partial(jax.named_call, name="custom_all_reduce_one_shot")
def one_shot_tpu(x2d: jax.Array, axis_name, plan: Plan, *, interpret=None) -> jax.Array:
    """One-shot all-reduce of ``x2d: T[plan.rows, 128]`` along ``axis_name``."""
    n = plan.world_size
    kernel = functools.partial(_one_shot_kernel, axis_name=axis_name, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((plan.rows, LANES), x2d.dtype, x2d, invariant_over=axis_name),
        in_specs=[_vmem_spec()],
        out_specs=_vmem_spec(),
        scratch_shapes=[
            pltpu.VMEM((n, plan.rows, LANES), x2d.dtype),
            pltpu.SemaphoreType.DMA((n - 1,)),
            pltpu.SemaphoreType.DMA((n - 1,)),
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
    )(x2d)


@functools.partial(jax.named_call, name="custom_all_reduce_two_shot")
def two_shot_tpu(x2d: jax.Array, axis_name, plan: Plan, *, interpret=None) -> jax.Array:
    """Two-shot all-reduce (reduce-scatter, then all-gather) of ``x2d: T[plan.rows, 128]``."""
    n = plan.world_size
    piece = plan.rows_per_rank
    kernel = functools.partial(_two_shot_kernel, axis_name=axis_name, n=n, piece=piece)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((plan.rows, LANES), x2d.dtype, x2d, invariant_over=axis_name),
        in_specs=[_vmem_spec()],
        out_specs=_vmem_spec(),
        scratch_shapes=[
            pltpu.VMEM((n, piece, LANES), x2d.dtype),
            pltpu.SemaphoreType.DMA((n - 1,)),
            pltpu.SemaphoreType.DMA((n - 1,)),
            pltpu.SemaphoreType.DMA((n - 1,)),
            pltpu.SemaphoreType.DMA((n - 1,)),
        ],
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
    )(x2d)
