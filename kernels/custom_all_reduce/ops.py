"""The kernels on any array: flatten, pad to the plan, run one lowering, unpad; and the reference.

:func:`all_reduce_kernel` runs the one-shot or two-shot kernel, in the lowering it is told to use
(``"gpu"``: Mosaic GPU; ``"tpu"``: the TPU form, natively or in Pallas's interpret mode), on any
array it can take. It does not decide *whether* the kernel should run: that (eligibility, the
tuning table, the psum fallback) lives with the communicators. :func:`reference_all_reduce`
computes the same bits in plain JAX.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels.custom_all_reduce import planning
from kernels.symmetric_memory import SymmetricBuffers

__all__ = ["LOWERINGS", "all_reduce_kernel", "reference_all_reduce"]

LOWERINGS = ("gpu", "tpu")


def _axis_size(axis_name: Any) -> int:
    return int(lax.axis_size(axis_name))


def reference_all_reduce(x: jax.Array, axis_name: Any) -> jax.Array:
    """The kernels' arithmetic in plain JAX: a float32 sum in rank order, cast back.

    Args:
      x: ``T[...]``, this rank's value; traced inside ``shard_map`` over ``axis_name``.
      axis_name: the mesh axis (or tuple of axes) to reduce over.

    Returns:
      ``T[...]``: the sum over the ranks, added in rank order in float32 (the kernels' bits).

    Raises:
      NameError: ``axis_name`` is not bound.
    """
    n = _axis_size(axis_name)
    if n == 1:
        return x
    g = lax.all_gather(x, axis_name, axis=0, tiled=False)
    acc = g[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + g[j].astype(jnp.float32)
    return acc.astype(x.dtype)


def all_reduce_kernel(
    x: jax.Array,
    axis_name: Any,
    *,
    algorithm: str,
    lowering: str,
    interpret: Any = None,
    buffers: SymmetricBuffers | None = None,
    protocol: str = "auto",
) -> jax.Array:
    """Sum ``x`` over ``axis_name`` with one Pallas kernel launch.

    Args:
      x: ``T[...]`` with ``T`` in :data:`~.planning.SUPPORTED_DTYPES`; traced inside
        ``shard_map(..., check_vma=False)`` over ``axis_name``.
      axis_name: the mesh axis (or tuple of axes) to reduce over; its size is the world size.
      algorithm: ``"one_shot"`` or ``"two_shot"``.
      lowering: ``"gpu"`` (Mosaic GPU on persistent peer buffers, NVIDIA only; :mod:`.peer` and
        :mod:`.two_shot`) or
        ``"tpu"`` (the TPU form).
      interpret: for the TPU form, Pallas interpret parameters (e.g.
        ``pltpu.InterpretParams(detect_races=True)``) to run it on CPU; ``None`` compiles it.
      buffers: for the GPU lowering, the peer buffers of the mesh for this group
        (:func:`kernels.symmetric_memory.allocate`).
      protocol: for the GPU one-shot, ``"ll"``, ``"pull"`` or ``"auto"`` (see
        :func:`~kernels.custom_all_reduce.peer.one_shot_peer`); the two-shot has one protocol.

    Returns:
      ``T[...]``: the sum, bitwise equal to :func:`reference_all_reduce` on every rank.

    Raises:
      ValueError: an unknown algorithm or lowering, ``interpret`` with the GPU lowering, the
        GPU lowering without ``buffers`` or with more bytes than they stage.
    """
    if algorithm not in planning.KERNEL_ALGORITHMS:
        raise ValueError(f"all_reduce_kernel: expected algorithm in {planning.KERNEL_ALGORITHMS}, got {algorithm!r}.")
    if lowering not in LOWERINGS:
        raise ValueError(f"all_reduce_kernel: expected lowering in {LOWERINGS}, got {lowering!r}.")
    if lowering == "gpu" and interpret is not None:
        raise ValueError(
            "all_reduce_kernel: the Mosaic GPU lowering has no interpret mode, got interpret="
            f"{interpret!r}; use lowering='tpu' to interpret the algorithm on CPU."
        )
    n = _axis_size(axis_name)
    flat = x.reshape(-1)
    if lowering == "gpu":
        return _gpu(flat, axis_name, n, algorithm, buffers, protocol).reshape(x.shape)
    plan = planning.make_plan(flat.size, flat.dtype, n)
    padded = jnp.pad(flat, (0, plan.padded_numel - flat.size)).reshape(plan.rows, planning.LANES)
    from kernels.custom_all_reduce import tpu

    fn = tpu.one_shot_tpu if algorithm == "one_shot" else tpu.two_shot_tpu
    out = fn(padded, axis_name, plan, interpret=interpret)
    return out.reshape(-1)[: flat.size].reshape(x.shape)


def _gpu(
    flat: jax.Array, axis_name: Any, n: int, algorithm: str, buffers: SymmetricBuffers | None, protocol: str
) -> jax.Array:
    if buffers is None:
        raise ValueError(
            "all_reduce_kernel: the GPU lowering needs the mesh's peer buffers; pass "
            "buffers=kernels.symmetric_memory.allocate(mesh, axis_name)."
        )
    from kernels.custom_all_reduce import peer

    itemsize = flat.dtype.itemsize
    planned = peer.padded_plan(flat.size * itemsize, buffers.layout, "pull" if algorithm == "two_shot" else protocol)
    if planned is None:
        raise ValueError(
            f"all_reduce_kernel: {flat.size * itemsize} bytes per device is more than the peer buffers stage "
            f"({buffers.layout.max_message_bytes} bytes); use psum for it."
        )
    nbytes, plan, protocol = planned
    padded_numel = nbytes // itemsize
    padded = flat if padded_numel == flat.size else jnp.pad(flat, (0, padded_numel - flat.size))
    table = buffers.peer_table(axis_name)
    if algorithm == "two_shot":
        from kernels.custom_all_reduce.two_shot import two_shot_peer

        out = two_shot_peer(padded, table, world_size=n, layout=buffers.layout, plan=plan)
    else:
        out = peer.one_shot_peer(padded, table, world_size=n, layout=buffers.layout, plan=plan, protocol=protocol)
    return out if padded_numel == flat.size else out[: flat.size]
