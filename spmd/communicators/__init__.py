"""Device communicators: how one group's collectives are lowered, chosen from the platform.

* :class:`XlaCommunicator` (vLLM's ``DeviceCommunicatorBase``): every collective through XLA. Used
  on CPU (XLA:CPU, gloo across processes), ROCm and unknown platforms.
* :class:`PallasCommunicator` (``GpuCommunicator``, ``TpuCommunicator``): XLA plus the Pallas
  custom all-reduce for small tensors on NVIDIA GPUs and TPUs.

Every class takes ``(axis_name, world_size, *, platform, unique_name="", disable_custom_all_reduce=False)``;
:func:`make_device_communicator` builds the right one, :func:`communicator_class_for` says which.
"""

from __future__ import annotations

from spmd.axes import AxisName
from spmd.communicators.dispatch import (
    ALGORITHMS,
    TUNING_PATH,
    TuningEntry,
    auto_algorithms,
    custom_all_reduce,
    ineligibility,
    select_algorithm,
    should_use_custom_all_reduce,
    tuning_table,
)
from spmd.communicators.pallas import PallasCommunicator
from spmd.communicators.xla import XlaCommunicator

# vLLM's names. The CPU, GPU and TPU classes were subclasses that added nothing of their own.
DeviceCommunicatorBase = XlaCommunicator
CpuCommunicator = XlaCommunicator
GpuCommunicator = PallasCommunicator
TpuCommunicator = PallasCommunicator

__all__ = [
    "ALGORITHMS",
    "TUNING_PATH",
    "CpuCommunicator",
    "DeviceCommunicatorBase",
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
