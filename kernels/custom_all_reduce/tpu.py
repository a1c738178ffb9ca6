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

from kernels.custom_all_reduce.planning import LANES, Plan, out_struct, peer_coords

__all__ = ["one_shot_tpu", "two_shot_tpu"]


def _barrier(axis_name, me, n: int) -> None:
    """Every rank has entered the kernel (its VMEM scratch exists) before anyone writes to it."""
    sem = pltpu.get_barrier_semaphore()
    for k in range(1, n):
        pl.semaphore_signal(sem, 1, device_id=peer_coords(axis_name, lax.rem(me + k, n)))
    pl.semaphore_wait(sem, n - 1)


def _push_to_peers(src_for, dst_ref, send_sems, recv_sems, *, axis_name, me, n) -> None:
    """DMA ``src_for(peer)`` into ``dst_ref`` on every peer, then wait for all sends and receives."""
    copies = []
    for k in range(1, n):
        peer = lax.rem(me + k, n)
        c = pltpu.make_async_remote_copy(
            src_ref=src_for(peer),
            dst_ref=dst_ref,
            send_sem=send_sems.at[k - 1],
            recv_sem=recv_sems.at[k - 1],
            device_id=peer_coords(axis_name, peer),
        )
        c.start()
        copies.append(c)
    for c in copies:
        c.wait_send()
        c.wait_recv()


def _ordered_sum(stage_ref, n: int, dtype):
    """sum_j stage[j] in float32, rank order: every rank adds the same terms in the same order."""
    acc = stage_ref[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + stage_ref[j].astype(jnp.float32)
    return acc.astype(dtype)


def _one_shot_kernel(x_ref, o_ref, stage_ref, send_sems, recv_sems, *, axis_name, n):
    me = lax.axis_index(axis_name)
    _barrier(axis_name, me, n)
    stage_ref[me] = x_ref[...]  # own slot, locally (peers write the other slots)
    _push_to_peers(lambda peer: x_ref, stage_ref.at[me], send_sems, recv_sems, axis_name=axis_name, me=me, n=n)
    o_ref[...] = _ordered_sum(stage_ref, n, o_ref.dtype)


def _two_shot_kernel(x_ref, o_ref, stage_ref, send_sems, recv_sems, gsend_sems, grecv_sems, *, axis_name, n, piece):
    me = lax.axis_index(axis_name)
    _barrier(axis_name, me, n)
    stage_ref[me] = x_ref[pl.ds(me * piece, piece)]
    _push_to_peers(
        lambda peer: x_ref.at[pl.ds(peer * piece, piece)],  # piece p goes to rank p
        stage_ref.at[me],
        send_sems,
        recv_sems,
        axis_name=axis_name,
        me=me,
        n=n,
    )
    mine = pl.ds(me * piece, piece)
    o_ref[mine] = _ordered_sum(stage_ref, n, o_ref.dtype)
    _push_to_peers(lambda peer: o_ref.at[mine], o_ref.at[mine], gsend_sems, grecv_sems, axis_name=axis_name, me=me, n=n)


def _call(kernel, x2d: jax.Array, axis_name, plan: Plan, scratch: list, interpret) -> jax.Array:
    """``pallas_call`` of an all-reduce kernel: whole arrays in VMEM, output typed invariant over the axis."""
    vmem = pl.BlockSpec(memory_space=pltpu.VMEM)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((plan.rows, LANES), x2d.dtype, x2d, invariant_over=axis_name),
        in_specs=[vmem],
        out_specs=vmem,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(collective_id=0, has_side_effects=True),
        interpret=interpret,
    )(x2d)


@functools.partial(jax.named_call, name="custom_all_reduce_one_shot")
def one_shot_tpu(x2d: jax.Array, axis_name, plan: Plan, *, interpret=None) -> jax.Array:
    """One-shot all-reduce of ``x2d: T[plan.rows, 128]`` along ``axis_name``."""
    n = plan.world_size
    kernel = functools.partial(_one_shot_kernel, axis_name=axis_name, n=n)
    scratch = [pltpu.VMEM((n, plan.rows, LANES), x2d.dtype)] + [pltpu.SemaphoreType.DMA((n - 1,))] * 2
    return _call(kernel, x2d, axis_name, plan, scratch, interpret)


@functools.partial(jax.named_call, name="custom_all_reduce_two_shot")
def two_shot_tpu(x2d: jax.Array, axis_name, plan: Plan, *, interpret=None) -> jax.Array:
    """Two-shot all-reduce (reduce-scatter, then all-gather) of ``x2d: T[plan.rows, 128]``."""
    n = plan.world_size
    piece = plan.rows_per_rank
    kernel = functools.partial(_two_shot_kernel, axis_name=axis_name, n=n, piece=piece)
    scratch = [pltpu.VMEM((n, piece, LANES), x2d.dtype)] + [pltpu.SemaphoreType.DMA((n - 1,))] * 4
    return _call(kernel, x2d, axis_name, plan, scratch, interpret)
