"""``custom_all_reduce`` (module ``spmd.communicators.dispatch``): when the Pallas kernels run, and the psum fallback.

vLLM's ``CustomAllreduce`` sends small tensors to its own one-shot / two-shot CUDA kernels and
everything else to NCCL. Here the same decision is made at trace time from the input's shape and
dtype, the world size, the platform, the process count and ``shard_map``'s ``check_vma`` typing;
the kernels themselves (``kernels.custom_all_reduce``) only compute.

The tuning table is data (``custom_all_reduce_tuning.json`` beside this file, or any file of the
same form given by path): per platform and world size, the largest message (bytes per device)
the kernel takes and where one-shot gives way to two-shot. It is written by
``python -m spmd.bench.custom_all_reduce --write-tuning PATH``; a world size or platform missing
from it means psum under ``algorithm="auto"``.

Which lowering runs is decided by the devices the program runs on, not by the platform planned
for: Mosaic GPU on NVIDIA GPUs, the TPU form on TPUs, and the TPU form in Pallas's interpret mode
anywhere else (CPU tests), so a communicator planned for ``"gpu"`` can be exercised on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kernels import symmetric_memory
from kernels.custom_all_reduce import ALIGN_BYTES, SUPPORTED_DTYPES, SUPPORTED_WORLD_SIZES, all_reduce_kernel
from spmd import collectives, compat
from spmd.axes import AxisName

__all__ = [
    "ALGORITHMS",
    "TUNING_PATH",
    "TuningEntry",
    "auto_algorithms",
    "custom_all_reduce",
    "ineligibility",
    "select_algorithm",
    "should_use_custom_all_reduce",
    "tuning_table",
]

ALGORITHMS = ("auto", "one_shot", "two_shot", "xla")
TUNING_PATH = pathlib.Path(__file__).with_name("custom_all_reduce_tuning.json")
_KERNEL_PLATFORMS = ("gpu", "cuda", "tpu", "cpu")
_CHECK_VMA = (
    "the enclosing shard_map has check_vma=True, and Pallas kernels cannot yet carry its "
    "varying-axes types; pass check_vma=False to shard_map"
)

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
    """

    max_bytes: int
    one_shot_max_bytes: int
    source: str = ""
    ll_max_bytes: int = 0

    def __post_init__(self):
        if not 0 <= self.one_shot_max_bytes <= self.max_bytes:
            raise ValueError(
                f"TuningEntry: expected 0 <= one_shot_max_bytes <= max_bytes, got "
                f"one_shot_max_bytes={self.one_shot_max_bytes}, max_bytes={self.max_bytes}."
            )
        if self.ll_max_bytes < 0:
            raise ValueError(f"TuningEntry: expected ll_max_bytes >= 0, got {self.ll_max_bytes}.")


def tuning_table(path: PathLike | None = None) -> dict[tuple[str, int], TuningEntry]:
    """The tuning table, ``{(platform, world_size): TuningEntry}``.

    Args:
      path: a JSON file ``{"platforms": {platform: {world_size: {"max_bytes", "one_shot_max_bytes",
        "source"}}}}``; default :data:`TUNING_PATH`, the table shipped with the package.

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
                )
                rows.append((key, value))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"tuning_table: expected {path} to hold {{'platforms': {{platform: {{world_size: "
            f"{{'max_bytes': int, 'one_shot_max_bytes': int}}}}}}}}, got an error reading it: {e!r}."
        ) from e
    return tuple(rows)


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _process_count() -> int:
    return jax.process_count()


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
    nbytes = _nbytes(shape, dtype)
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
      ``"xla"`` when the input is ineligible or the table has no entry or a smaller ``max_bytes``;
      else ``"one_shot"`` up to the entry's ``one_shot_max_bytes``, ``"two_shot"`` above.
    """
    if ineligibility(shape, dtype, world_size, platform) is not None:
        return "xla"
    entry = tuning_table(tuning).get((_platform_key(platform), world_size))
    nbytes = _nbytes(shape, dtype)
    if entry is None or nbytes > entry.max_bytes:
        return "xla"
    return "one_shot" if nbytes <= entry.one_shot_max_bytes else "two_shot"


def should_use_custom_all_reduce(x: Any, world_size: int, platform: str, *, tuning: PathLike | None = None) -> bool:
    """Whether ``algorithm="auto"`` sends ``x`` (an array or ``ShapeDtypeStruct``) to the custom kernel.

    vLLM's ``CUSTOM_ALLREDUCE_THRESHOLD`` logic: supported dtype, 16-byte multiple, a world size
    of 2, 4 or 8, and at most the tuning table's ``max_bytes`` for this platform and world size.
    """
    return select_algorithm(tuple(x.shape), x.dtype, world_size, platform, tuning=tuning) != "xla"


def _varying_axes(v: Any) -> frozenset:
    """The mesh axes ``v`` is typed as varying over (``shard_map``'s ``check_vma`` types)."""
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _device_platform(x: jax.Array) -> str:
    """The platform of the devices ``x`` lives on (the default backend while tracing abstractly)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return jax.default_backend() if mesh is None else compat.mesh_platform(mesh)


def _lowering(device_platform: str, interpret: Any) -> tuple[str, Any]:
    """``(lowering, interpret)`` for the devices the kernel runs on."""
    if interpret is not None:
        return "tpu", interpret
    if device_platform in ("gpu", "cuda"):
        return "gpu", None
    if device_platform == "tpu":
        return "tpu", None
    from jax.experimental.pallas import tpu as pltpu

    return "tpu", pltpu.InterpretParams()


_NO_BUFFERS = (
    "no peer buffers were allocated for this group of this mesh (spmd.initialize_model_parallel "
    "allocates them on GPU; or call kernels.symmetric_memory.allocate(mesh, axis_name))"
)
_NO_SHARED_BUFFERS = (
    "no peer buffers were allocated for this group of this mesh, and in a job of {n} processes they are "
    "shared by CUDA IPC: spmd.initialize_model_parallel allocates them when the CUDA driver loads, each "
    "process holds one GPU of the mesh and XLA_FLAGS has --xla_gpu_shard_autotuning=false "
    "(kernels.symmetric_memory.unsupported(mesh) says why not), or call "
    "kernels.symmetric_memory.allocate(mesh, axis_name) in every process"
)
_INTERPRETED = (
    "the kernels run in Pallas interpret mode on {platform} devices, which needs every device in one "
    "process (this job has {n})"
)


def _peer_buffers(x: jax.Array, axis_name: AxisName, buffers: Any = None) -> symmetric_memory.SymmetricBuffers | None:
    """Group ``axis_name``'s peer buffers: ``buffers`` if given, else looked up by the mesh ``x`` is traced over.

    Raises ``ValueError`` when the lookup is ambiguous (several device sets have buffers for it).
    """
    if buffers is not None:
        return buffers
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", None):
        return None
    return symmetric_memory.lookup(mesh.axis_names, tuple(mesh.axis_sizes), axis_name)


def _gpu_why_not(
    v: jax.Array, nbytes: int, algorithm: str, interpret: Any, axis_name: AxisName, buffers: Any = None
) -> str | None:
    """What stops the GPU lowering (the devices are GPUs and nothing forces interpretation).

    Also what stops interpretation (every other device) in a job of several processes.
    """
    device_platform = _device_platform(v)
    if interpret is not None or device_platform not in ("gpu", "cuda"):
        procs = _process_count()
        if procs > 1 and (interpret is not None or device_platform != "tpu"):
            return _INTERPRETED.format(platform=device_platform, n=procs)
        return None
    if algorithm == "two_shot":
        return "the GPU lowering has the one-shot kernel only"
    if axis_name is None and buffers is None:
        return None  # auto_algorithms asked without a group: the buffers are not checked
    try:
        found = _peer_buffers(v, axis_name, buffers)
    except ValueError as e:
        return str(e)
    if found is None:
        procs = _process_count()
        return _NO_SHARED_BUFFERS.format(n=procs) if procs > 1 else _NO_BUFFERS
    limit = found.layout.max_message_bytes
    if nbytes > limit:
        return f"{nbytes} bytes per device is more than the peer buffers stage ({limit} bytes)"
    return None


def _protocol(flat: jax.Array, n: int, tuning: PathLike | None) -> str:
    """The GPU one-shot's protocol for this message: ``"ll"`` up to the tuning row's ``ll_max_bytes``."""
    entry = tuning_table(tuning).get(("gpu", n))
    nbytes = _nbytes(tuple(flat.shape), flat.dtype)
    if entry is None:
        return "auto"
    return "ll" if nbytes <= entry.ll_max_bytes else "pull"


def _plan_groups(
    leaves: list[jax.Array],
    n: int,
    algorithm: str,
    platform: str | None,
    tuning: PathLike | None,
    interpret: Any = None,
    axis_name: AxisName = None,
    buffers: Any = None,
):
    """``(leaf indices, algorithm, platform)`` per dtype: the leaves of one dtype travel packed.

    Raises ``ValueError`` when a forced algorithm cannot take a group.
    """
    by_dtype: dict[Any, list[int]] = {}
    for i, v in enumerate(leaves):
        by_dtype.setdefault(v.dtype, []).append(i)
    groups = []
    for dtype, idx in by_dtype.items():
        numel = sum(leaves[i].size for i in idx)
        plat = platform or _device_platform(leaves[idx[0]])
        typed = any(_varying_axes(leaves[i]) for i in idx)
        if algorithm == "auto":
            algo = "xla" if typed else select_algorithm((numel,), dtype, n, plat, tuning=tuning)
            nbytes = _nbytes((numel,), dtype)
            why_not = _gpu_why_not(leaves[idx[0]], nbytes, algo, interpret, axis_name, buffers)
            if algo != "xla" and why_not is not None:
                algo = "xla"
        else:
            why = ineligibility((numel,), dtype, n, plat)
            if why is None and typed:
                why = _CHECK_VMA
            if why is None:
                why = _gpu_why_not(leaves[idx[0]], _nbytes((numel,), dtype), algorithm, interpret, axis_name, buffers)
            if why is not None:
                raise ValueError(
                    f"custom_all_reduce: algorithm={algorithm!r} cannot take {numel} elements of {jnp.dtype(dtype)} "
                    f"over {n} ranks on {plat}: {why}. Use algorithm='auto' to fall back to psum."
                )
            algo = algorithm
        groups.append((idx, algo, plat))
    return groups


def auto_algorithms(
    x: Any,
    world_size: int,
    platform: str | None = None,
    *,
    tuning: PathLike | None = None,
    axis_name: AxisName | None = None,
    buffers: Any = None,
) -> list[str]:
    """What ``algorithm="auto"`` picks for each dtype group of ``x`` (traced leaves or arrays), in order.

    With ``axis_name`` or ``buffers`` (traced inside ``shard_map``) it also checks, on GPU
    devices, that the group's peer buffers exist and take the size, as :func:`custom_all_reduce`
    does.
    """
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(x)]
    groups = _plan_groups(leaves, world_size, "auto", platform, tuning, None, axis_name, buffers)
    return [algo for _, algo, _ in groups]


def custom_all_reduce(
    x: Any,
    axis_name: AxisName,
    *,
    algorithm: str = "auto",
    platform: str | None = None,
    interpret: Any = None,
    tuning: PathLike | None = None,
    buffers: Any = None,
) -> Any:
    """Sum ``x`` over ``axis_name``, with the Pallas kernels for small tensors.

    Args:
      x: an array or a pytree of arrays. Leaves of one dtype are packed into one buffer and
        reduced by one kernel launch.
      axis_name: the mesh axis (or tuple of axes) to reduce over; traced inside ``shard_map``.
      algorithm: ``"auto"`` (the tuning table decides; ineligible input goes to psum),
        ``"one_shot"``, ``"two_shot"`` (forced; ineligible input raises), or ``"xla"`` (psum).
      platform: the platform to plan for (eligibility, tuning row); default: the platform of the
        devices ``x`` lives on. The lowering always follows the devices (see the module docstring).
      interpret: Pallas interpret parameters (e.g. ``pltpu.InterpretParams(detect_races=True)``)
        to run the TPU form interpreted; default: interpreted only on devices without a native
        kernel (CPU).
      tuning: the tuning table's path for ``"auto"`` (default: the shipped table).
      buffers: on GPUs, the group's peer buffers (``kernels.symmetric_memory.allocate(mesh,
        axis_name)``); default: looked up by the traced mesh's axes and shape, which works while
        one set of devices has buffers for them (the communicators pass their own).

    The kernels run under ``shard_map(..., check_vma=False)`` (as JAX's own Pallas collectives
    do); under ``check_vma=True`` ``"auto"`` uses psum and a forced kernel raises.

    Returns:
      The sum, on every rank. The kernels sum in rank order in float32, so every rank gets the
      same bits; psum (``"xla"``) sums in XLA's order.

    Raises:
      ValueError: an unknown algorithm, or a forced kernel for input it cannot take (the
        message says why: dtype, size, alignment, world size, platform or ``check_vma``).
      UnboundAxisError: ``axis_name`` is not bound.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"custom_all_reduce: unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}.")
    n = collectives.axis_size(axis_name, op="custom_all_reduce")
    leaves, treedef = jax.tree.flatten(x)
    leaves = [jnp.asarray(v) for v in leaves]
    if n == 1 or algorithm == "xla" or not leaves:
        return collectives.all_reduce(x, axis_name)
    out: list[jax.Array | None] = [None] * len(leaves)
    for idx, algo, _ in _plan_groups(leaves, n, algorithm, platform, tuning, interpret, axis_name, buffers):
        if algo == "xla":
            for i in idx:
                out[i] = collectives.all_reduce(leaves[i], axis_name)
            continue
        flat = jnp.concatenate([leaves[i].reshape(-1) for i in idx]) if len(idx) > 1 else leaves[idx[0]].reshape(-1)
        lowering, interp = _lowering(_device_platform(flat), interpret)
        with jax.named_scope(f"custom_all_reduce_{algo}"):
            kw = {}
            if lowering == "gpu":
                kw = {"buffers": _peer_buffers(flat, axis_name, buffers), "protocol": _protocol(flat, n, tuning)}
            reduced = all_reduce_kernel(flat, axis_name, algorithm=algo, lowering=lowering, interpret=interp, **kw)
        offset = 0
        for i in idx:
            size = leaves[i].size
            out[i] = reduced[offset : offset + size].reshape(leaves[i].shape)
            offset += size
    return jax.tree.unflatten(treedef, out)
