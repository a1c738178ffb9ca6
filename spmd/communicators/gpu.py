"""GPU communicator: XLA/NCCL collectives, with a custom all-reduce for small tensors.

``all_reduce`` first offers the input to :meth:`GpuCommunicator.custom_all_reduce`, the seam
where the Pallas one-shot / two-shot kernels plug in (vLLM's ``CustomAllreduce``); when that
declines (returns ``None``: ineligible dtype, size, world size, or the feature is off) the
XLA/NCCL all-reduce of the base class runs.
"""

from __future__ import annotations

from typing import Any

from spmd.axes import AxisName
from spmd.communicators.base import DeviceCommunicatorBase


class GpuCommunicator(DeviceCommunicatorBase):
    """Collectives on NVIDIA GPUs.

    Args:
      disable_custom_all_reduce: never use the custom all-reduce (vLLM's flag of the same name).
    """

    def __init__(
        self,
        axis_name: AxisName,
        world_size: int,
        *,
        platform: str = "gpu",
        unique_name: str = "",
        disable_custom_all_reduce: bool = False,
    ):
        super().__init__(axis_name, world_size, platform=platform, unique_name=unique_name)
        self.disable_custom_all_reduce = bool(disable_custom_all_reduce)

    def custom_all_reduce(self, input_: Any) -> Any | None:
        """The small-tensor all-reduce, or ``None`` when it does not apply.

        No kernel is registered yet, so this always declines and ``all_reduce`` uses XLA.
        """
        return None

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group: the custom kernel when eligible, else XLA/NCCL."""
        if not self.disable_custom_all_reduce:
            out = self.custom_all_reduce(input_)
            if out is not None:
                return out
        return super().all_reduce(input_)
