"""Device communicators: how one group's collectives are lowered, chosen from the platform.

* :class:`XlaCommunicator` (vLLM's ``DeviceCommunicatorBase``): every collective through XLA. Used
  on CPU (XLA:CPU, gloo across processes), ROCm and unknown platforms.
* :class:`PallasCommunicator` (``GpuCommunicator``, ``TpuCommunicator``): XLA plus the Pallas
  custom all-reduce for small tensors on NVIDIA GPUs and TPUs.

Every class takes ``(axis_name, world_size, *, platform, unique_name="", disable_custom_all_reduce=False)``
and has ``create(mesh, axis_name, ...)``, which reads the size and platform from the mesh and, for
:class:`PallasCommunicator` on GPUs, allocates the group's peer buffers.
:func:`make_device_communicator` builds the right one, :func:`communicator_class_for` says which,
:func:`make_group_communicators` creates one per group of a mesh (what ``spmd.initialize_model_parallel``
uses). Whether the custom all-reduce takes an input is :mod:`spmd.communicators.allreduce_plan`'s plan;
the tuning table it reads is :mod:`spmd.communicators.tuning`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kernels import symmetric_memory
from spmd import compat
from spmd.axes import AxisName
from spmd.communicators.allreduce_plan import (
    ALGORITHMS,
    AllReducePlan,
    FusedPlan,
    auto_algorithms,
    custom_all_reduce,
    plan_all_reduce,
    plan_all_reduce_add_rms_norm,
)
from spmd.communicators.pallas import PallasCommunicator
from spmd.communicators.tuning import (
    TUNING_PATH,
    TuningEntry,
    ineligibility,
    select_algorithm,
    should_use_custom_all_reduce,
    tuning_table,
)
from spmd.communicators.xla import XlaCommunicator

# vLLM's names. The CPU, GPU and TPU classes were subclasses that added nothing of their own.
DeviceCommunicatorBase = XlaCommunicator
CpuCommunicator = XlaCommunicator
GpuCommunicator = PallasCommunicator
TpuCommunicator = PallasCommunicator

__all__ = [
    "ALGORITHMS",
    "TUNING_PATH",
    "AllReducePlan",
    "CpuCommunicator",
    "DeviceCommunicatorBase",
    "FusedPlan",
    "GpuCommunicator",
    "PallasCommunicator",
    "TpuCommunicator",
    "TuningEntry",
    "XlaCommunicator",
    "auto_algorithms",
    "communicator_class_for",
    "custom_all_reduce",
    "ineligibility",
    "make_device_communicator",
    "make_group_communicators",
    "plan_all_reduce",
    "plan_all_reduce_add_rms_norm",
    "select_algorithm",
    "should_use_custom_all_reduce",
    "tuning_table",
]

_BY_PLATFORM: dict[str, type[XlaCommunicator]] = {
    "gpu": PallasCommunicator,
    "cuda": PallasCommunicator,
    "tpu": PallasCommunicator,
}


def communicator_class_for(platform: str) -> type[XlaCommunicator]:
    """The communicator class for a JAX platform name.

    Args:
      platform: ``jax.Device.platform`` of the mesh's devices, any case.

    Returns:
      :class:`PallasCommunicator` for ``gpu``/``cuda``/``tpu`` (the Pallas kernels exist there);
      :class:`XlaCommunicator` otherwise (``cpu``, ``rocm``, unknown platforms).
    """
    return _BY_PLATFORM.get(platform.lower(), XlaCommunicator)


def make_device_communicator(
    axis_name: AxisName,
    world_size: int,
    *,
    platform: str,
    unique_name: str = "",
    disable_custom_all_reduce: bool = False,
) -> XlaCommunicator:
    """Build the communicator for ``platform`` over ``axis_name``.

    Args:
      axis_name: the mesh axis (or tuple of axes) of the group.
      world_size: the number of devices along it.
      platform: the platform of the mesh's devices.
      unique_name: the group's label (``"tp"``, ``"world"``, ...).
      disable_custom_all_reduce: keep every all-reduce on XLA (recorded on the communicator).

    Returns:
      An instance of :func:`communicator_class_for(platform) <communicator_class_for>`.

    Raises:
      ValueError: ``world_size`` is not a positive int.
    """
    cls = communicator_class_for(platform)
    return cls(
        axis_name,
        world_size,
        platform=platform,
        unique_name=unique_name,
        disable_custom_all_reduce=disable_custom_all_reduce,
    )


def make_group_communicators(
    mesh: Any, groups: Mapping[str, AxisName], *, disable_custom_all_reduce: bool = False
) -> dict[str, XlaCommunicator]:
    """One communicator per group of ``mesh``, created in order (each with its own peer buffers on GPUs).

    Across processes the buffers are allocated collectively, so every process must pass the same
    groups in the same order. When the processes turn out to span machines (CUDA IPC cannot reach
    across), every process learns it from the first group that allocates, together, and every group
    then stays on XLA's all-reduce.

    Args:
      mesh: the device mesh.
      groups: ``{label: axis name or tuple of axis names}``, in creation order.
      disable_custom_all_reduce: keep every all-reduce on XLA (no buffers are allocated).

    Returns:
      ``{label: communicator}``, of :func:`communicator_class_for` the mesh's platform.
    """
    cls = communicator_class_for(compat.mesh_platform(mesh))
    allocate = True
    out = {}
    for name, axis_name in groups.items():
        kw = {"unique_name": name, "disable_custom_all_reduce": disable_custom_all_reduce}
        try:
            out[name] = cls.create(mesh, axis_name, allocate_peer_buffers=allocate, **kw)
        except symmetric_memory.NotOneHost:
            allocate = False  # several machines: every process learns it at once; all groups use psum
            out[name] = cls.create(mesh, axis_name, allocate_peer_buffers=False, **kw)
    return out
