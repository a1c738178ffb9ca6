"""GPU and TPU communicator: XLA collectives, with the Pallas custom all-reduce for small tensors.

``all_reduce`` first offers the input to :meth:`PallasCommunicator.custom_all_reduce` (vLLM's
``CustomAllreduce``): when the planner takes it (supported dtype, packed size within the tuning
table's entry for this platform and world size, one process, ``check_vma=False``) the Pallas
kernel runs (on GPUs the one-shot on persistent peer buffers, on TPUs one-shot / two-shot); when
it declines (returns ``None``), or ``disable_custom_all_reduce`` is set, the XLA all-reduce of
:class:`~spmd.communicators.xla.XlaCommunicator` runs.

The same class serves NVIDIA GPUs (Mosaic GPU kernel over NVLink) and TPUs (the TPU-form kernels
over ICI): the platform picks the tuning row, the devices pick the lowering. Constructed with
``platform="gpu"`` or ``"tpu"`` on CPU devices it runs the TPU form in Pallas's interpret mode,
which is how the CPU tests drive this path.
"""

from __future__ import annotations

from typing import Any

from spmd.communicators.dispatch import auto_algorithms, custom_all_reduce
from spmd.communicators.xla import XlaCommunicator

__all__ = ["PallasCommunicator"]


class PallasCommunicator(XlaCommunicator):
    """Collectives on NVIDIA GPUs and TPUs: XLA, plus the Pallas custom all-reduce.

    Takes :class:`XlaCommunicator`'s constructor arguments; ``disable_custom_all_reduce=True``
    keeps every all-reduce on XLA. ``peer_buffers`` (set by ``spmd.initialize_model_parallel`` on
    GPU) are the group's ``kernels.symmetric_memory`` buffers, passed to every kernel call.
    """

    peer_buffers: Any = None

    def custom_all_reduce(self, input_: Any) -> Any | None:
        """The Pallas one-shot / two-shot all-reduce, or ``None`` when no leaf is eligible.

        The decision is :func:`~spmd.communicators.dispatch.custom_all_reduce`'s own for
        ``algorithm="auto"``; dtype groups it declines inside a pytree it takes go to psum there.
        """
        picks = auto_algorithms(
            input_, self.world_size, self.platform, axis_name=self.axis_name, buffers=self.peer_buffers
        )
        if all(algo == "xla" for algo in picks):
            return None
        return custom_all_reduce(
            input_, self.axis_name, algorithm="auto", platform=self.platform, buffers=self.peer_buffers
        )

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group: the custom kernel when eligible and enabled, else XLA."""
        if not self.disable_custom_all_reduce:
            out = self.custom_all_reduce(input_)
            if out is not None:
                return out
        return super().all_reduce(input_)
