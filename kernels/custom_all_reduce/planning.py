"""Planning shared by the GPU and TPU kernels: eligibility, algorithm choice, tiling, chunking.

The tuning table (``tuning.json`` beside this file) is data: per platform and world size, the
largest message (bytes per device) the custom kernel takes and where one-shot gives way to
two-shot. It is written from benchmark runs (``python -m kernels.custom_all_reduce.bench``) and
a world size or platform missing from it means "always XLA" under ``algorithm="auto"``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

import numpy as np

__all__ = [
    "ALGORITHMS",
    "SUPPORTED_DTYPES",
    "Plan",
    "TuningEntry",
    "ineligibility",
    "make_plan",
    "out_struct",
    "peer_coords",
    "select_algorithm",
    "should_use_custom_all_reduce",
    "tuning_table",
]

ALGORITHMS = ("auto", "one_shot", "two_shot", "xla")
SUPPORTED_DTYPES = frozenset(["float32", "bfloat16", "float16"])
SUPPORTED_WORLD_SIZES = (2, 4, 8)
LANES = 128  # the minor dimension of the 2-D view every kernel works on
ALIGN_BYTES = 16  # one 16-byte vector per access (vLLM requires the same)
_TUNING_PATH = pathlib.Path(__file__).with_name("tuning.json")


@dataclasses.dataclass(frozen=True)
class TuningEntry:
    """When the custom kernel runs on one platform at one world size.

    Attributes:
      max_bytes: largest bytes per device handed to the custom kernel (0: never).
      one_shot_max_bytes: up to this size one-shot, above it (up to ``max_bytes``) two-shot.
      source: where the numbers came from (card, date, command).
    """

    max_bytes: int
    one_shot_max_bytes: int
    source: str = ""


@functools.cache
def tuning_table(path: str | None = None) -> dict[tuple[str, int], TuningEntry]:
    """The tuning table, ``{(platform, world_size): TuningEntry}``."""
    raw = json.loads(pathlib.Path(path or _TUNING_PATH).read_text())
    table = {}
    for platform, rows in raw["platforms"].items():
        for ws, entry in rows.items():
            table[(platform, int(ws))] = TuningEntry(
                max_bytes=int(entry["max_bytes"]),
                one_shot_max_bytes=int(entry["one_shot_max_bytes"]),
                source=str(entry.get("source", "")),
            )
    return table


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _dtype_name(dtype: Any) -> str:
    return str(np.dtype(dtype))


def ineligibility(shape: tuple[int, ...], dtype: Any, world_size: int, platform: str) -> str | None:
    """Why the custom kernel cannot take this input (``None`` when it can, tuning aside)."""
    name = _dtype_name(dtype)
    if name not in SUPPORTED_DTYPES:
        return f"dtype {name} is not one of {sorted(SUPPORTED_DTYPES)}"
    if world_size not in SUPPORTED_WORLD_SIZES:
        return f"world size {world_size} is not one of {SUPPORTED_WORLD_SIZES}"
    nbytes = _nbytes(shape, dtype)
    if nbytes == 0:
        return "the input is empty"
    if nbytes % ALIGN_BYTES:
        return f"{nbytes} bytes is not a multiple of {ALIGN_BYTES}"
    if platform not in ("gpu", "cuda", "tpu", "cpu"):
        return f"platform {platform!r} has no custom all-reduce kernel"
    if platform in ("gpu", "cuda") and _process_count() > 1:
        # Across processes XLA maps peer buffers through NCCL windows, which failed on the lent
        # H200 machines (ncclGetPeerDevicePointer: unhandled system error, 2026-11-28).
        return "the Mosaic GPU kernels need one process driving every GPU of the group"
    return None


def _process_count() -> int:
    import jax

    return jax.process_count()


def select_algorithm(shape: tuple[int, ...], dtype: Any, world_size: int, platform: str) -> str:
    """The algorithm ``"auto"`` picks: ``"one_shot"``, ``"two_shot"`` or ``"xla"``."""
    if ineligibility(shape, dtype, world_size, platform) is not None:
        return "xla"
    entry = tuning_table().get((_platform_key(platform), world_size))
    nbytes = _nbytes(shape, dtype)
    if entry is None or nbytes > entry.max_bytes:
        return "xla"
    return "one_shot" if nbytes <= entry.one_shot_max_bytes else "two_shot"


def should_use_custom_all_reduce(x: Any, world_size: int, platform: str) -> bool:
    """Whether ``algorithm="auto"`` sends ``x`` (an array or ``ShapeDtypeStruct``) to the custom kernel.

    vLLM's ``CUSTOM_ALLREDUCE_THRESHOLD`` logic: supported dtype, 16-byte multiple, a world size
    of 2, 4 or 8, and at most the tuning table's ``max_bytes`` for this platform and world size.
    """
    return select_algorithm(tuple(x.shape), x.dtype, world_size, platform) != "xla"


def _platform_key(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda") else platform


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
    import jax

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
    from jax import lax

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
