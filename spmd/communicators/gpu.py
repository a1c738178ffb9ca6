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
        """The Pallas one-shot / two-shot all-reduce, or ``None`` when no leaf is eligible.

        The decision is ``custom_all_reduce``'s own for ``algorithm="auto"`` (dtype, packed size,
        alignment, world size, processes, the measured tuning table, ``check_vma=False``); dtype
        groups it declines inside a pytree it takes go to psum there.
        """
        from kernels.custom_all_reduce import auto_algorithms, custom_all_reduce

        if all(algo == "xla" for algo in auto_algorithms(input_, self.world_size, self.platform)):
            return None
        return custom_all_reduce(input_, self.axis_name, algorithm="auto", platform=self.platform)

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group: the custom kernel when eligible, else XLA/NCCL."""
        if not self.disable_custom_all_reduce:
            out = self.custom_all_reduce(input_)
            if out is not None:
                return out
        return super().all_reduce(input_)
