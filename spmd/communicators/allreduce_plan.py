"""The custom all-reduce's plan: whether the Pallas kernels take an input, which one, and the psum fallback.

vLLM's ``CustomAllreduce`` sends small tensors to its own one-shot / two-shot CUDA kernels and
everything else to NCCL (``should_custom_ar``). Here the decision is made once, at trace time:
:func:`plan_all_reduce` returns an :class:`AllReducePlan` (call it to run the kernels) or the
reason in words, :func:`plan_all_reduce_add_rms_norm` a :class:`FusedPlan` for the fused
all-reduce + residual add + RMSNorm kernel or the reason. The communicators read ``if plan: run
it, else psum``; :func:`custom_all_reduce` is the axis-level function on the same plan. What the
shape, dtype, world size and platform decide alone (what the kernels take, the tuning table's
choice) is :mod:`spmd.communicators.tuning`; this module adds the devices, the process count, the
group's peer buffers and ``shard_map``'s ``check_vma`` typing. The kernels (``kernels.custom_all_reduce``)
only compute.

The devices the program runs on choose the lowering, not the platform planned for: Mosaic GPU on
NVIDIA GPUs (one process, or one GPU per process with peer buffers shared by CUDA IPC), the TPU
form on TPUs, and the TPU form in Pallas's interpret mode elsewhere (CPU tests; every device in
one process), so a communicator planned for ``"gpu"`` can be exercised on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kernels import symmetric_memory
from kernels.custom_all_reduce import all_reduce_kernel
from spmd import collectives, compat
from spmd.axes import AxisName
from spmd.communicators.tuning import PathLike, auto_choice, ineligibility, message_bytes, tuning_table

__all__ = [
    "ALGORITHMS",
    "AllReducePlan",
    "FusedPlan",
    "GroupPlan",
    "auto_algorithms",
    "custom_all_reduce",
    "plan_all_reduce",
    "plan_all_reduce_add_rms_norm",
]

ALGORITHMS = ("auto", "one_shot", "two_shot", "xla")
_CHECK_VMA = (
    "the enclosing shard_map has check_vma=True, and Pallas kernels cannot yet carry its "
    "varying-axes types; pass check_vma=False to shard_map"
)


def _process_count() -> int:
    return jax.process_count()


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
) -> tuple[str | None, Any]:
    """``(what stops the GPU lowering, the group's peer buffers)`` for a dtype group whose first leaf is ``v``.

    The GPU lowering runs when the devices are GPUs and nothing forces interpretation; on every other
    device this says what stops interpretation in a job of several processes. The buffers are found
    only where the GPU lowering takes the group (``None`` otherwise).
    """
    device_platform = _device_platform(v)
    if interpret is not None or device_platform not in ("gpu", "cuda"):
        procs = _process_count()
        if procs > 1 and (interpret is not None or device_platform != "tpu"):
            return _INTERPRETED.format(platform=device_platform, n=procs), None
        return None, None
    if axis_name is None and buffers is None:
        return None, None  # auto_algorithms asked without a group: the buffers are not checked
    try:
        found = _peer_buffers(v, axis_name, buffers)
    except ValueError as e:
        return str(e), None
    if found is None:
        procs = _process_count()
        return (_NO_SHARED_BUFFERS.format(n=procs) if procs > 1 else _NO_BUFFERS), None
    limit = found.layout.max_message_bytes
    if nbytes > limit:
        return f"{nbytes} bytes per device is more than the peer buffers stage ({limit} bytes)", None
    return None, found


def _protocol(flat: Any, n: int, tuning: PathLike | None) -> str:
    """The GPU one-shot's protocol for ``flat`` (an array or ``ShapeDtypeStruct``): ``"ll"`` up to ``ll_max_bytes``."""
    entry = tuning_table(tuning).get(("gpu", n))
    nbytes = message_bytes(tuple(flat.shape), flat.dtype)
    if entry is None:
        return "auto"
    return "ll" if nbytes <= entry.ll_max_bytes else "pull"


@dataclasses.dataclass(frozen=True, eq=False)
class GroupPlan:
    """How the leaves of one dtype are reduced: packed into one kernel launch, or each by psum.

    Attributes:
      leaves: the indices of the leaves (in ``jax.tree.leaves`` order), packed in this order.
      algorithm: ``"one_shot"``, ``"two_shot"`` or ``"xla"`` (psum).
      platform: the platform planned for (eligibility and tuning row).
      reason: for ``"xla"``, why no kernel takes the group (``None`` when a kernel does).
      lowering: ``"gpu"`` (Mosaic GPU) or ``"tpu"`` (the TPU form, maybe interpreted); the devices decide.
      interpret: the Pallas interpret parameters of the TPU form (``None``: compiled).
      kernel_args: the GPU lowering's ``buffers`` and ``protocol``.
    """

    leaves: tuple[int, ...]
    algorithm: str
    platform: str
    reason: str | None = None
    lowering: str | None = None
    interpret: Any = None
    kernel_args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class AllReducePlan:
    """A custom all-reduce decided for one input: per dtype group, the kernel (or psum) that reduces it.

    Made by :func:`plan_all_reduce` at trace time; calling it on the input it was made for runs it.

    Attributes:
      axis_name: the mesh axis (or tuple of axes) reduced over.
      world_size: the number of ranks along it.
      groups: one :class:`GroupPlan` per dtype, in the order the dtypes first occur.
    """

    axis_name: AxisName
    world_size: int
    groups: tuple[GroupPlan, ...]

    @property
    def algorithms(self) -> list[str]:
        """The algorithm of each dtype group, in order."""
        return [g.algorithm for g in self.groups]

    def __call__(self, x: Any) -> Any:
        """Sum ``x`` (the pytree this plan was made for) over ``axis_name``: the kernels, and psum where planned."""
        leaves, treedef = jax.tree.flatten(x)
        leaves = [jnp.asarray(v) for v in leaves]
        out: list[jax.Array | None] = [None] * len(leaves)
        for g in self.groups:
            if g.algorithm == "xla":
                for i in g.leaves:
                    out[i] = collectives.all_reduce(leaves[i], self.axis_name)
                continue
            parts = [leaves[i].reshape(-1) for i in g.leaves]
            flat = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            with jax.named_scope(f"custom_all_reduce_{g.algorithm}"):
                reduced = all_reduce_kernel(
                    flat,
                    self.axis_name,
                    algorithm=g.algorithm,
                    lowering=g.lowering,
                    interpret=g.interpret,
                    **g.kernel_args,
                )
            offset = 0
            for i in g.leaves:
                size = leaves[i].size
                out[i] = reduced[offset : offset + size].reshape(leaves[i].shape)
                offset += size
        return jax.tree.unflatten(treedef, out)


def _plan_groups(
    leaves: list[jax.Array],
    n: int,
    algorithm: str,
    platform: str | None,
    tuning: PathLike | None,
    interpret: Any = None,
    axis_name: AxisName = None,
    buffers: Any = None,
) -> list[GroupPlan]:
    """One :class:`GroupPlan` per dtype: the leaves of one dtype travel packed.

    Raises ``ValueError`` when a forced algorithm cannot take a group.
    """
    by_dtype: dict[Any, list[int]] = {}
    for i, v in enumerate(leaves):
        by_dtype.setdefault(v.dtype, []).append(i)
    groups = []
    for dtype, idx in by_dtype.items():
        numel = sum(leaves[i].size for i in idx)
        nbytes = message_bytes((numel,), dtype)
        plat = platform or _device_platform(leaves[idx[0]])
        typed = any(collectives.varying_axes(leaves[i]) for i in idx)
        if algorithm == "auto":
            algo, why = ("xla", _CHECK_VMA) if typed else auto_choice((numel,), dtype, n, plat, tuning=tuning)
            why_not, found = _gpu_why_not(leaves[idx[0]], nbytes, algo, interpret, axis_name, buffers)
            if algo != "xla" and why_not is not None:
                algo, why = "xla", why_not
        else:
            why = ineligibility((numel,), dtype, n, plat)
            if why is None and typed:
                why = _CHECK_VMA
            found = None
            if why is None:
                why, found = _gpu_why_not(leaves[idx[0]], nbytes, algorithm, interpret, axis_name, buffers)
            if why is not None:
                raise ValueError(
                    f"custom_all_reduce: algorithm={algorithm!r} cannot take {numel} elements of {jnp.dtype(dtype)} "
                    f"over {n} ranks on {plat}: {why}. Use algorithm='auto' to fall back to psum."
                )
            algo = algorithm
        if algo == "xla":
            groups.append(GroupPlan(tuple(idx), "xla", plat, reason=why))
            continue
        lowering, interp = _lowering(_device_platform(leaves[idx[0]]), interpret)
        kernel_args = {}
        if lowering == "gpu" and algo == "two_shot":
            kernel_args = {"buffers": found}
        elif lowering == "gpu":
            kernel_args = {"buffers": found, "protocol": _protocol(jax.ShapeDtypeStruct((numel,), dtype), n, tuning)}
        groups.append(GroupPlan(tuple(idx), algo, plat, lowering=lowering, interpret=interp, kernel_args=kernel_args))
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
    return [g.algorithm for g in _plan_groups(leaves, world_size, "auto", platform, tuning, None, axis_name, buffers)]


def plan_all_reduce(
    x: Any,
    axis_name: AxisName,
    *,
    world_size: int | None = None,
    algorithm: str = "auto",
    platform: str | None = None,
    interpret: Any = None,
    tuning: PathLike | None = None,
    buffers: Any = None,
) -> AllReducePlan | str:
    """Decide, at trace time, how :func:`custom_all_reduce` reduces ``x``: the plan, or why psum.

    Args:
      x: an array or a pytree of arrays (traced inside ``shard_map``).
      axis_name: the mesh axis (or tuple of axes) to reduce over.
      world_size: the number of ranks along it (default: the bound axis's size).
      algorithm, platform, interpret, tuning, buffers: as for :func:`custom_all_reduce`.

    Returns:
      An :class:`AllReducePlan` when a kernel takes at least one dtype group of ``x`` (call it on
      ``x``); otherwise the reason in words, and every leaf goes to psum.

    Raises:
      ValueError: an unknown algorithm, or a forced kernel for input it cannot take.
      UnboundAxisError: ``world_size`` is not given and ``axis_name`` is not bound.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"custom_all_reduce: unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}.")
    n = collectives.axis_size(axis_name, op="custom_all_reduce") if world_size is None else world_size
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(x)]
    if n == 1:
        return "the group has one rank"
    if algorithm == "xla":
        return "algorithm='xla' asks for psum"
    if not leaves:
        return "the input has no arrays"
    groups = _plan_groups(leaves, n, algorithm, platform, tuning, interpret, axis_name, buffers)
    if all(g.algorithm == "xla" for g in groups):
        return "; ".join(dict.fromkeys(str(g.reason) for g in groups))
    return AllReducePlan(axis_name, n, tuple(groups))


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
    plan = plan_all_reduce(
        x, axis_name, algorithm=algorithm, platform=platform, interpret=interpret, tuning=tuning, buffers=buffers
    )
    if isinstance(plan, AllReducePlan):
        return plan(x)
    return collectives.all_reduce(x, axis_name)


@dataclasses.dataclass(frozen=True, eq=False)
class FusedPlan:
    """The fused all-reduce + residual add + RMSNorm kernel, decided for one input (GPUs, peer buffers).

    Made by :func:`plan_all_reduce_add_rms_norm`; calling it runs
    :func:`kernels.custom_all_reduce.fused.fused_add_rms_norm_peer` on the group's buffers.
    """

    axis_name: AxisName
    world_size: int
    buffers: Any

    def __call__(self, x: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """``(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual)`` in one kernel launch."""
        from kernels.custom_all_reduce.fused import fused_add_rms_norm_peer

        table = self.buffers.peer_table(self.axis_name)
        return fused_add_rms_norm_peer(
            x, residual, weight, table, world_size=self.world_size, layout=self.buffers.layout, eps=eps
        )


def plan_all_reduce_add_rms_norm(
    x: Any,
    residual: Any,
    weight: Any,
    *,
    axis_name: AxisName,
    world_size: int,
    platform: str,
    buffers: Any,
) -> FusedPlan | str:
    """Decide whether the fused GPU kernel takes ``all_reduce(x) + residual`` and its RMSNorm: the plan, or why not.

    It does where the plain all-reduce would run the one-shot kernel's low-latency protocol (the
    tuning table's choice) and the kernel takes the shape: rows of whole 2 KiB tiles up to 4 KiB,
    up to 128 rows (:func:`kernels.custom_all_reduce.fused.fused_ineligibility`), one dtype.

    Args:
      x: this rank's partial sums ``T[..., hidden]``.
      residual: ``T[..., hidden]``.
      weight: the norm's ``T[hidden]``.
      axis_name, world_size: the group.
      platform: the platform planned for (the kernel exists for ``"gpu"`` / ``"cuda"``).
      buffers: the group's peer buffers (``None``: none were allocated).

    Returns:
      A :class:`FusedPlan` (call it with ``(x, residual, weight, eps)``), or the reason in words.
    """
    from kernels.custom_all_reduce.fused import fused_ineligibility

    if collectives.varying_axes(x):
        return _CHECK_VMA
    if platform not in ("gpu", "cuda") or buffers is None:
        return "no peer buffers (GPU only; the GPU communicators allocate them)"
    if not 1 < world_size <= buffers.layout.max_ranks:
        return f"world size {world_size} (the fused kernel takes 2 to {buffers.layout.max_ranks})"
    if getattr(x, "shape", None) != getattr(residual, "shape", ()) or x.dtype != residual.dtype:
        return "the input and the residual differ in shape or dtype"
    if weight.shape != x.shape[-1:]:
        return f"the weight's shape {weight.shape} is not the hidden size {x.shape[-1:]}"
    why = fused_ineligibility(x.shape, x.dtype, weight.dtype, buffers.layout)
    if why is not None:
        return why
    groups = _plan_groups([jnp.asarray(x)], world_size, "auto", platform, None, None, axis_name, buffers)
    if [g.algorithm for g in groups] != ["one_shot"] or _protocol(x, world_size, None) != "ll":
        nbytes = message_bytes(tuple(x.shape), x.dtype)
        return f"the tuning table does not send {nbytes} bytes at world size {world_size} to the ll kernel"
    return FusedPlan(axis_name, world_size, buffers)
