"""Tiling shared by the GPU and TPU kernels: what the kernels take, the ``[rows, 128]`` plan, peers.

This module holds facts about the kernels (the dtypes, world sizes and alignment they are written
for) and the plan of the buffer they work on. Whether a given call *should* use them (the tuning
table, the process count, ``check_vma``) is decided by the communicators, not here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax import lax

__all__ = [
    "ALIGN_BYTES",
    "KERNEL_ALGORITHMS",
    "LANES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_WORLD_SIZES",
    "Plan",
    "make_plan",
    "out_struct",
    "peer_coords",
]

KERNEL_ALGORITHMS = ("one_shot", "two_shot")
SUPPORTED_DTYPES = frozenset(["float32", "bfloat16", "float16"])
SUPPORTED_WORLD_SIZES = (2, 4, 8)
LANES = 128  # the minor dimension of the 2-D view every kernel works on
ALIGN_BYTES = 16  # one 16-byte vector per access (vLLM requires the same)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a flat buffer of ``numel`` elements is laid out for the kernels.

    The buffer is viewed as ``[rows, LANES]``, rows padded to a multiple of
    ``world_size * row_tile`` so that two-shot can give each rank ``rows // world_size`` rows
    and every piece is a whole number of tiles. GPU kernels further split each rank's rows into
    ``blocks`` thread blocks.
    """

    numel: int
    world_size: int
    rows: int
    row_tile: int

    @property
    def padded_numel(self) -> int:
        return self.rows * LANES

    @property
    def rows_per_rank(self) -> int:
        return self.rows // self.world_size


def out_struct(shape, dtype, like: Any, *, invariant_over: Any = (), varying_over: Any = ()) -> Any:
    """A kernel output type that carries ``shard_map``'s ``check_vma`` typing.

    ``like`` is the kernel's input; the output varies over the same mesh axes, minus
    ``invariant_over`` (the all-reduced result is bitwise identical along the reduced axis, so it
    is typed invariant there, as ``psum``'s result is) plus ``varying_over`` (staging buffers).
    """

    def names(a: Any) -> set:
        return set(a) if isinstance(a, tuple) else {a} if isinstance(a, str) else set(a)

    manual = getattr(jax.typeof(like), "manual_axis_type", None)
    if manual is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    varying = (frozenset(manual.varying) - names(invariant_over)) | names(varying_over)
    if not manual.varying:  # check_vma is off: keep every output untyped, like the input
        varying = frozenset()
    fields = {k: getattr(manual, k) for k in ("unreduced", "reduced", "unreduced_kind") if hasattr(manual, k)}
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(manual)(varying=frozenset(varying), **fields))


def peer_coords(axis_name: Any, rank: Any) -> dict:
    """Mesh coordinates of ``rank`` along ``axis_name`` for a kernel's ``device_id``.

    Other mesh axes keep this device's own coordinates. ``rank`` is linear over a tuple of axes,
    row-major, as ``lax.axis_index`` counts it. Traced inside a kernel; shared by both lowerings.
    """
    if isinstance(axis_name, str):
        return {axis_name: rank}
    coords = {}
    for a in reversed(axis_name):
        size = lax.axis_size(a)
        coords[a] = lax.rem(rank, size)
        rank = rank // size
    return coords


def make_plan(numel: int, dtype: Any, world_size: int) -> Plan:
    """Tile ``numel`` elements of ``dtype`` for ``world_size`` ranks."""
    itemsize = np.dtype(dtype).itemsize
    row_tile = 8 * (4 // itemsize) if itemsize < 4 else 8  # a (8, 128) f32 / (16, 128) bf16 tile
    quantum = world_size * row_tile
    rows = math.ceil(math.ceil(numel / LANES) / quantum) * quantum
    return Plan(numel=numel, world_size=world_size, rows=rows, row_tile=row_tile)
