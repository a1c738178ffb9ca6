"""The custom all-reduce's tuning table, and what it decides from static facts alone.

The table is data (``custom_all_reduce_tuning.json`` beside this file, or any file of the same
form given by path): per platform and world size, the largest message (bytes per device) the
kernel takes, where one-shot gives way to two-shot, on GPUs where the one-shot's low-latency
protocol gives way to the pull protocol, and which kernels the measurement timed (``algorithms``).
It is written by ``python -m spmd.bench.custom_all_reduce --write-tuning PATH``; a world size or
platform missing from it means psum under ``algorithm="auto"``, and so does a size the row would
send to a kernel its measurement did not time (``auto`` never runs an unmeasured kernel).

:func:`ineligibility` and :func:`select_algorithm` answer from the shape, dtype, world size and
platform only; what the traced input adds (the devices, the process count, the peer buffers,
``check_vma``) is :mod:`spmd.communicators.allreduce_plan`'s business.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import numpy as np

from kernels import symmetric_memory
from kernels.custom_all_reduce import ALIGN_BYTES, KERNEL_ALGORITHMS, SUPPORTED_DTYPES, SUPPORTED_WORLD_SIZES

__all__ = [
    "TUNING_PATH",
    "TuningEntry",
    "auto_choice",
    "default_algorithms",
    "ineligibility",
    "message_bytes",
    "select_algorithm",
    "should_use_custom_all_reduce",
    "tuning_table",
]

TUNING_PATH = pathlib.Path(__file__).with_name("custom_all_reduce_tuning.json")
_KERNEL_PLATFORMS = ("gpu", "cuda", "tpu", "cpu")

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class TuningEntry:
    """When the custom kernel runs on one platform at one world size.

    Attributes:
      max_bytes: largest bytes per device handed to the custom kernel (0: never).
      one_shot_max_bytes: up to this size one-shot, above it (up to ``max_bytes``) two-shot.
      source: where the numbers came from (card, date, command).
      ll_max_bytes: GPU one-shot: up to this size the low-latency protocol (data pushed with an
        epoch beside every word), above it the pull protocol (staged, one flag round).
      algorithms: the kernels the row's measurement timed; ``auto`` sends a size to psum rather
        than to a kernel not listed. A row without the field: ``("one_shot",)`` on GPUs (rows
        written before the GPU two-shot existed), both kernels elsewhere (:func:`default_algorithms`).
    """

    max_bytes: int
    one_shot_max_bytes: int
    source: str = ""
    ll_max_bytes: int = 0
    algorithms: tuple[str, ...] = KERNEL_ALGORITHMS

    def __post_init__(self):
        if not 0 <= self.one_shot_max_bytes <= self.max_bytes:
            raise ValueError(
                f"TuningEntry: expected 0 <= one_shot_max_bytes <= max_bytes, got "
                f"one_shot_max_bytes={self.one_shot_max_bytes}, max_bytes={self.max_bytes}."
            )
        if self.ll_max_bytes < 0:
            raise ValueError(f"TuningEntry: expected ll_max_bytes >= 0, got {self.ll_max_bytes}.")
        algorithms = self.algorithms
        if isinstance(algorithms, str) or not all(a in KERNEL_ALGORITHMS for a in algorithms):
            raise ValueError(
                f"TuningEntry: expected algorithms to be a list of names from {list(KERNEL_ALGORITHMS)} (the kernels "
                f"the row's measurement timed), got {algorithms!r}."
            )
        object.__setattr__(self, "algorithms", tuple(algorithms))


def default_algorithms(platform: str) -> tuple[str, ...]:
    """The kernels a table row without ``algorithms`` was measured with.

    GPU rows written before the GPU two-shot existed timed the one-shot only; the TPU form always
    had both kernels.
    """
    return ("one_shot",) if _platform_key(platform) == "gpu" else KERNEL_ALGORITHMS


def tuning_table(path: PathLike | None = None) -> dict[tuple[str, int], TuningEntry]:
    """The tuning table, ``{(platform, world_size): TuningEntry}``.

    Args:
      path: a JSON file ``{"platforms": {platform: {world_size: {"max_bytes", "one_shot_max_bytes",
        "source", optional "ll_max_bytes" and "algorithms"}}}}``; default :data:`TUNING_PATH`, the
        table shipped with the package.

    Returns:
      The entries, keyed by platform name and world size (read once per path).

    Raises:
      OSError: the file cannot be read.
      ValueError: the file is not a table of that form.
    """
    return dict(_load_table(str(pathlib.Path(TUNING_PATH if path is None else path).resolve())))


@functools.cache
def _load_table(path: str) -> tuple[tuple[tuple[str, int], TuningEntry], ...]:
    try:
        raw = json.loads(pathlib.Path(path).read_text())
        rows = []
        for platform, per_world in raw["platforms"].items():
            for ws, entry in per_world.items():
                key = (str(platform), int(ws))
                value = TuningEntry(
                    max_bytes=int(entry["max_bytes"]),
                    one_shot_max_bytes=int(entry["one_shot_max_bytes"]),
                    source=str(entry.get("source", "")),
                    ll_max_bytes=int(entry.get("ll_max_bytes", 0)),
                    algorithms=tuple(entry.get("algorithms", default_algorithms(key[0]))),
                )
                rows.append((key, value))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"tuning_table: expected {path} to hold {{'platforms': {{platform: {{world_size: "
            f"{{'max_bytes': int, 'one_shot_max_bytes': int}}}}}}}}, got an error reading it: {e!r}."
        ) from e
    return tuple(rows)


def message_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (a message per device)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _platform_key(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda") else platform


def ineligibility(shape: tuple[int, ...], dtype: Any, world_size: int, platform: str) -> str | None:
    """Why the custom kernel cannot take this input (``None`` when it can, tuning aside).

    Args:
      shape: the (packed) input's shape on one device.
      dtype: its dtype.
      world_size: the number of ranks reduced over.
      platform: the platform planned for (``"gpu"``, ``"cuda"``, ``"tpu"``, ``"cpu"``, ...).

    Returns:
      ``None``, or the reason in words (dtype, world size, size, alignment, platform). Whether the
      group has peer buffers (GPUs; across processes too) is checked where the kernel is traced.
    """
    name = str(np.dtype(dtype))
    if name not in SUPPORTED_DTYPES:
        return f"dtype {name} is not one of {sorted(SUPPORTED_DTYPES)}"
    if world_size not in SUPPORTED_WORLD_SIZES:
        return f"world size {world_size} is not one of {SUPPORTED_WORLD_SIZES}"
    nbytes = message_bytes(shape, dtype)
    if nbytes == 0:
        return "the input is empty"
    if nbytes % ALIGN_BYTES:
        return f"{nbytes} bytes is not a multiple of {ALIGN_BYTES}"
    if platform not in _KERNEL_PLATFORMS:
        return f"platform {platform!r} has no custom all-reduce kernel"
    if platform in ("gpu", "cuda"):
        # Several processes: the group's peer buffers decide (shared by CUDA IPC; see _gpu_why_not).
        limit = symmetric_memory.Layout().max_message_bytes
        if nbytes > limit:
            return f"{nbytes} bytes per device is more than the peer buffers stage ({limit} bytes)"
    return None


def select_algorithm(
    shape: tuple[int, ...], dtype: Any, world_size: int, platform: str, *, tuning: PathLike | None = None
) -> str:
    """The algorithm ``"auto"`` picks: ``"one_shot"``, ``"two_shot"`` or ``"xla"``.

    Args:
      shape, dtype, world_size, platform: as for :func:`ineligibility`.
      tuning: the tuning table's path (default: the shipped table).

    Returns:
      ``"xla"`` when the input is ineligible, the table has no entry or a smaller ``max_bytes``,
      or the entry's kernel for the size is not among its measured ``algorithms``; else
      ``"one_shot"`` up to the entry's ``one_shot_max_bytes``, ``"two_shot"`` above.
    """
    return auto_choice(shape, dtype, world_size, platform, tuning=tuning)[0]


def auto_choice(
    shape: tuple[int, ...], dtype: Any, n: int, platform: str, *, tuning: PathLike | None = None
) -> tuple[str, str | None]:
    """:func:`select_algorithm` with its reason: ``(algorithm, None)`` for a kernel, or ``("xla", why)``.

    Args:
      shape, dtype, platform: as for :func:`ineligibility`; ``n`` the world size.
      tuning: the tuning table's path (default: the shipped table).
    """
    why = ineligibility(shape, dtype, n, platform)
    if why is not None:
        return "xla", why
    entry = tuning_table(tuning).get((_platform_key(platform), n))
    nbytes = message_bytes(shape, dtype)
    if entry is None:
        return "xla", f"the tuning table has no row for {platform} at world size {n}"
    if nbytes > entry.max_bytes:
        return (
            "xla",
            f"{nbytes} bytes per device is over the tuning table's {entry.max_bytes} for {platform} at world size {n}",
        )
    algo = "one_shot" if nbytes <= entry.one_shot_max_bytes else "two_shot"
    if algo not in entry.algorithms:
        return (
            "xla",
            f"the tuning table's row for {platform} at world size {n} sends {nbytes} bytes to the {algo} kernel, "
            f"which its measurement did not time (algorithms {list(entry.algorithms)}); psum until it is measured",
        )
    return algo, None


def should_use_custom_all_reduce(x: Any, world_size: int, platform: str, *, tuning: PathLike | None = None) -> bool:
    """Whether ``algorithm="auto"`` sends ``x`` (an array or ``ShapeDtypeStruct``) to the custom kernel.

    vLLM's ``CUSTOM_ALLREDUCE_THRESHOLD`` logic: supported dtype, 16-byte multiple, a world size
    of 2, 4 or 8, and at most the tuning table's ``max_bytes`` for this platform and world size.
    """
    return select_algorithm(tuple(x.shape), x.dtype, world_size, platform, tuning=tuning) != "xla"
