"""``custom_all_reduce``: the dispatch between the Pallas kernels and XLA's psum.

vLLM's ``custom_all_reduce`` sends small tensors to its own one-shot / two-shot CUDA kernels
and everything else to NCCL. Here the same decision is made at trace time from the input's
shape and dtype, the world size and the platform (see :mod:`.planning`), and the kernels are
Pallas: Mosaic GPU on NVIDIA GPUs, the TPU form on TPUs (and, in interpret mode, on CPU for
tests). The pure-JAX :func:`reference_all_reduce` computes the same bits as the kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels.custom_all_reduce import planning
from spmd import collectives

__all__ = ["auto_algorithms", "custom_all_reduce", "reference_all_reduce"]


def reference_all_reduce(x: jax.Array, axis_name) -> jax.Array:
    """The kernels' arithmetic in plain JAX: a float32 sum in rank order, cast back."""
    n = collectives.axis_size(axis_name, op="reference_all_reduce")
    if n == 1:
        return x
    g = lax.all_gather(x, axis_name, axis=0, tiled=False)
    acc = g[0].astype(jnp.float32)
    for j in range(1, n):
        acc = acc + g[j].astype(jnp.float32)
    return acc.astype(x.dtype)


def _platform_of(x: jax.Array) -> str:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    platform = getattr(mesh, "_platform", None) or getattr(mesh, "platform", None)
    return str(platform) if platform else jax.default_backend()


def _run_kernel(flat: jax.Array, axis_name, n: int, algorithm: str, platform: str, interpret: Any) -> jax.Array:
    plan = planning.make_plan(flat.size, flat.dtype, n)
    padded = jnp.pad(flat, (0, plan.padded_numel - flat.size)).reshape(plan.rows, planning.LANES)
    if platform in ("gpu", "cuda") and interpret is None:
        from kernels.custom_all_reduce import gpu

        fn = gpu.one_shot_gpu if algorithm == "one_shot" else gpu.two_shot_gpu
        out = fn(padded, axis_name, plan)
    else:
        from jax.experimental.pallas import tpu as pltpu

        from kernels.custom_all_reduce import tpu

        if interpret is None and platform != "tpu":
            interpret = pltpu.InterpretParams()
        fn = tpu.one_shot_tpu if algorithm == "one_shot" else tpu.two_shot_tpu
        out = fn(padded, axis_name, plan, interpret=interpret)
    return out.reshape(-1)[: flat.size]


def _plan_groups(leaves: list[jax.Array], n: int, algorithm: str, platform: str | None):
    """``(leaf indices, algorithm, platform)`` per dtype: the leaves of one dtype travel packed.

    Raises ``ValueError`` when a forced algorithm cannot take a group.
    """
    by_dtype: dict[Any, list[int]] = {}
    for i, v in enumerate(leaves):
        by_dtype.setdefault(v.dtype, []).append(i)
    groups = []
    for dtype, idx in by_dtype.items():
        numel = sum(leaves[i].size for i in idx)
        plat = platform or _platform_of(leaves[idx[0]])
        typed = any(collectives._varying_axes(leaves[i]) for i in idx)
        if algorithm == "auto":
            algo = "xla" if typed else planning.select_algorithm((numel,), dtype, n, plat)
        else:
            why = planning.ineligibility((numel,), dtype, n, plat)
            if why is None and typed:
                why = (
                    "the enclosing shard_map has check_vma=True, and Pallas kernels cannot yet carry its "
                    "varying-axes types; pass check_vma=False to shard_map"
                )
            if why is not None:
                raise ValueError(
                    f"custom_all_reduce: algorithm={algorithm!r} cannot take {numel} elements of {jnp.dtype(dtype)} "
                    f"over {n} ranks on {plat}: {why}. Use algorithm='auto' to fall back to psum."
                )
            algo = algorithm
        groups.append((idx, algo, plat))
    return groups


def auto_algorithms(x: Any, world_size: int, platform: str | None = None) -> list[str]:
    """What ``algorithm="auto"`` picks for each dtype group of ``x`` (traced leaves or arrays)."""
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(x)]
    return [algo for _, algo, _ in _plan_groups(leaves, world_size, "auto", platform)]


def custom_all_reduce(
    x: Any,
    axis_name,
    *,
    algorithm: str = "auto",
    platform: str | None = None,
    interpret: Any = None,
) -> Any:
    """Sum ``x`` over ``axis_name``, with the Pallas kernels for small tensors.

    Args:
      x: an array or a pytree of arrays. Leaves of one dtype are packed into one buffer and
        reduced by one kernel launch.
      axis_name: the mesh axis (or tuple of axes) to reduce over; traced inside ``shard_map``.
      algorithm: ``"auto"`` (the tuning table decides; ineligible input goes to psum),
        ``"one_shot"``, ``"two_shot"`` (forced; ineligible input raises), or ``"xla"`` (psum).
      platform: the platform to plan for; default: the platform of the devices ``x`` lives on.
      interpret: Pallas interpret parameters (e.g. ``pltpu.InterpretParams(detect_races=True)``);
        defaults to interpret mode on platforms without a native kernel (CPU).

    The kernels run under ``shard_map(..., check_vma=False)`` (as JAX's own Pallas collectives
    do); under ``check_vma=True`` ``"auto"`` uses psum and a forced kernel raises.

    Returns:
      The sum, on every rank. The kernels sum in rank order in float32, so every rank gets the
      same bits; psum (``"xla"``) sums in XLA's order.

    Raises:
      ValueError: an unknown algorithm, or a forced kernel for input it cannot take (the
        message says why: dtype, size, alignment, world size or platform).
      UnboundAxisError: ``axis_name`` is not bound.
    """
    if algorithm not in planning.ALGORITHMS:
        raise ValueError(f"custom_all_reduce: unknown algorithm {algorithm!r}; expected one of {planning.ALGORITHMS}.")
    n = collectives.axis_size(axis_name, op="custom_all_reduce")
    leaves, treedef = jax.tree.flatten(x)
    leaves = [jnp.asarray(v) for v in leaves]
    if n == 1 or algorithm == "xla" or not leaves:
        return collectives.all_reduce(x, axis_name)
    out: list[jax.Array | None] = [None] * len(leaves)
    for idx, algo, plat in _plan_groups(leaves, n, algorithm, platform):
        if algo == "xla":
            for i in idx:
                out[i] = collectives.all_reduce(leaves[i], axis_name)
            continue
        flat = jnp.concatenate([leaves[i].reshape(-1) for i in idx]) if len(idx) > 1 else leaves[idx[0]].reshape(-1)
        reduced = _run_kernel(flat, axis_name, n, algo, plat, interpret)
        offset = 0
        for i in idx:
            size = leaves[i].size
            out[i] = reduced[offset : offset + size].reshape(leaves[i].shape)
            offset += size
    return jax.tree.unflatten(treedef, out)
