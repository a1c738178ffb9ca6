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

from spmd.communicators.dispatch import _CHECK_VMA, _varying_axes, auto_algorithms, custom_all_reduce, tuning_table
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

    def fused_ineligibility(self, input_: Any, residual: Any, weight: Any) -> str | None:
        """Why :meth:`all_reduce_add_rms_norm` would not use the fused GPU kernel (``None``: it would)."""
        from kernels.custom_all_reduce.fused import fused_ineligibility

        if self.disable_custom_all_reduce:
            return "the custom all-reduce is disabled"
        if _varying_axes(input_):
            return _CHECK_VMA
        if self.platform not in ("gpu", "cuda") or self.peer_buffers is None:
            return "no peer buffers (GPU only; spmd.initialize_model_parallel allocates them)"
        if not 1 < self.world_size <= self.peer_buffers.layout.max_ranks:
            return f"world size {self.world_size} (the fused kernel takes 2 to {self.peer_buffers.layout.max_ranks})"
        if getattr(input_, "shape", None) != getattr(residual, "shape", ()) or input_.dtype != residual.dtype:
            return "the input and the residual differ in shape or dtype"
        if weight.shape != input_.shape[-1:]:
            return f"the weight's shape {weight.shape} is not the hidden size {input_.shape[-1:]}"
        why = fused_ineligibility(input_.shape, input_.dtype, weight.dtype, self.peer_buffers.layout)
        if why is not None:
            return why
        # Only where the plain path would run the ll kernel itself (the tuning table's choice).
        bufs = self.peer_buffers
        picks = auto_algorithms(input_, self.world_size, self.platform, axis_name=self.axis_name, buffers=bufs)
        entry = tuning_table().get(("gpu", self.world_size))
        nbytes = int(input_.size) * input_.dtype.itemsize
        if picks != ["one_shot"] or entry is None or nbytes > entry.ll_max_bytes:
            return f"the tuning table does not send {nbytes} bytes at world size {self.world_size} to the ll kernel"
        return None

    def all_reduce_add_rms_norm(self, input_: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """As :meth:`XlaCommunicator.all_reduce_add_rms_norm`, in ONE kernel launch when it can.

        The fused kernel (:mod:`kernels.custom_all_reduce.fused`) takes decode-sized inputs (rows of
        whole 2 KiB tiles up to 4 KiB, up to 128 rows) on GPUs with peer buffers; anything else
        runs the three steps (the all-reduce still through :meth:`all_reduce`).
        """
        if self.fused_ineligibility(input_, residual, weight) is not None:
            return super().all_reduce_add_rms_norm(input_, residual, weight, eps)
        from kernels.custom_all_reduce.fused import fused_add_rms_norm_peer

        bufs = self.peer_buffers
        return fused_add_rms_norm_peer(
            input_,
            residual,
            weight,
            bufs.peer_table(self.axis_name),
            world_size=self.world_size,
            layout=bufs.layout,
            eps=eps,
        )

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group: the custom kernel when eligible and enabled, else XLA."""
        if not self.disable_custom_all_reduce:
            out = self.custom_all_reduce(input_)
            if out is not None:
                return out
        return super().all_reduce(input_)
