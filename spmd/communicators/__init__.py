"""Device communicators: one class per platform, chosen from the mesh's devices."""

from __future__ import annotations

from spmd.axes import AxisName
from spmd.communicators.base import DeviceCommunicatorBase
from spmd.communicators.cpu import CpuCommunicator
from spmd.communicators.gpu import GpuCommunicator
from spmd.communicators.tpu import TpuCommunicator

__all__ = [
    "CpuCommunicator",
    "DeviceCommunicatorBase",
    "GpuCommunicator",
    "TpuCommunicator",
    "communicator_class_for",
    "make_device_communicator",
]

_BY_PLATFORM: dict[str, type[DeviceCommunicatorBase]] = {
    "cpu": CpuCommunicator,
    "gpu": GpuCommunicator,
    "cuda": GpuCommunicator,
    "rocm": GpuCommunicator,
    "tpu": TpuCommunicator,
}


def communicator_class_for(platform: str) -> type[DeviceCommunicatorBase]:
    """The communicator class for a JAX platform name; the XLA base class for unknown platforms."""
    return _BY_PLATFORM.get(platform.lower(), DeviceCommunicatorBase)


def make_device_communicator(
    axis_name: AxisName,
    world_size: int,
    *,
    platform: str,
    unique_name: str = "",
    disable_custom_all_reduce: bool = False,
) -> DeviceCommunicatorBase:
    """Build the communicator for ``platform`` over ``axis_name``."""
    cls = communicator_class_for(platform)
    if issubclass(cls, GpuCommunicator):
        return cls(
            axis_name,
            world_size,
            platform=platform,
            unique_name=unique_name,
            disable_custom_all_reduce=disable_custom_all_reduce,
        )
    return cls(axis_name, world_size, platform=platform, unique_name=unique_name)
