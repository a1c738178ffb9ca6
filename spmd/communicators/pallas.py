"""GPU and TPU communicator: XLA collectives, with the Pallas custom all-reduce for small tensors.

``all_reduce`` plans first (:func:`~spmd.communicators.allreduce_plan.plan_all_reduce`, vLLM's
``should_custom_ar``): when the plan takes the input (supported dtype, packed size within the
tuning table's entry for this platform and world size, ``check_vma=False``, and on GPUs the
group's peer buffers, in one process or shared by CUDA IPC across processes) the Pallas kernel
runs (on GPUs one-shot / two-shot on persistent peer buffers, on TPUs one-shot / two-shot); when it
declines, or ``disable_custom_all_reduce`` is set, the XLA all-reduce of
:class:`~spmd.communicators.xla.XlaCommunicator` runs. ``all_reduce_add_rms_norm`` does the same
with the fused kernel's plan.

The same class serves NVIDIA GPUs (Mosaic GPU kernel over NVLink) and TPUs (the TPU-form kernels
over ICI): the platform picks the tuning row, the devices pick the lowering. Constructed with
``platform="gpu"`` or ``"tpu"`` on CPU devices it runs the TPU form in Pallas's interpret mode,
which is how the CPU tests drive this path.
"""

from __future__ import annotations

from typing import Any

from kernels import symmetric_memory
from spmd import compat
from spmd.axes import AxisName
from spmd.communicators.allreduce_plan import (
    AllReducePlan,
    FusedPlan,
    plan_all_reduce,
    plan_all_reduce_add_rms_norm,
)
from spmd.communicators.xla import XlaCommunicator
from spmd.envs import host_env

__all__ = ["PallasCommunicator"]

_DISABLED = "the custom all-reduce is disabled"


class PallasCommunicator(XlaCommunicator):
    """Collectives on NVIDIA GPUs and TPUs: XLA, plus the Pallas custom all-reduce.

    Takes :class:`XlaCommunicator`'s constructor arguments, and ``peer_buffers``: the group's
    ``kernels.symmetric_memory`` buffers, passed to every GPU kernel call (default ``None``: none;
    :meth:`create` allocates them). ``disable_custom_all_reduce=True`` keeps every all-reduce on XLA.
    """

    def __init__(
        self,
        axis_name: AxisName,
        world_size: int,
        *,
        platform: str,
        unique_name: str = "",
        disable_custom_all_reduce: bool = False,
        peer_buffers: Any = None,
    ):
        super().__init__(
            axis_name,
            world_size,
            platform=platform,
            unique_name=unique_name,
            disable_custom_all_reduce=disable_custom_all_reduce,
        )
        self.peer_buffers = peer_buffers

    @classmethod
    def create(
        cls,
        mesh: Any,
        axis_name: AxisName,
        *,
        unique_name: str = "",
        disable_custom_all_reduce: bool = False,
        allocate_peer_buffers: bool = True,
    ) -> PallasCommunicator:
        """The communicator of group ``axis_name`` of ``mesh``, with its own peer buffers where they can exist.

        The buffers (a few MiB per GPU, kept for the life of the process) are allocated when the
        mesh's devices are GPUs, the custom all-reduce is enabled, the group has 2 to
        ``symmetric_memory.Layout.max_ranks`` ranks and ``kernels.symmetric_memory.unsupported(mesh)``
        is ``None`` (one process driving every GPU, or one GPU per process sharing by CUDA IPC).
        Across processes this is a collective: every process creates the same groups in the same
        order, within ``SPMD_COLLECTIVE_TIMEOUT_S``.

        Args:
          mesh: the device mesh.
          axis_name: the group's mesh axis (or tuple of axes).
          unique_name: the group's label.
          disable_custom_all_reduce: keep every all-reduce on XLA (no buffers are allocated).
          allocate_peer_buffers: ``False`` never allocates (a job already known to span machines).

        Raises:
          kernels.symmetric_memory.NotOneHost: across processes, one of them runs on another
            machine (every process raises it together; see :func:`~spmd.communicators.make_group_communicators`).
        """
        kw = {"unique_name": unique_name, "disable_custom_all_reduce": disable_custom_all_reduce}
        comm = super().create(mesh, axis_name, **kw)
        if (
            allocate_peer_buffers
            and comm.platform in ("gpu", "cuda")
            and not disable_custom_all_reduce
            and 1 < comm.world_size <= symmetric_memory.Layout.max_ranks
            and symmetric_memory.unsupported(mesh) is None
        ):
            comm.peer_buffers = symmetric_memory.allocate(
                mesh, axis_name, client=compat.distributed_client(), timeout_s=host_env().collective_timeout_s
            )
        return comm

    def plan_all_reduce(self, input_: Any) -> AllReducePlan | str:
        """How :meth:`all_reduce` reduces ``input_``: the custom kernel's plan, or why XLA's all-reduce."""
        if self.disable_custom_all_reduce:
            return _DISABLED
        return plan_all_reduce(
            input_, self.axis_name, world_size=self.world_size, platform=self.platform, buffers=self.peer_buffers
        )

    def plan_all_reduce_add_rms_norm(self, input_: Any, residual: Any, weight: Any) -> FusedPlan | str:
        """How :meth:`all_reduce_add_rms_norm` runs: the fused kernel's plan, or why the three steps."""
        if self.disable_custom_all_reduce:
            return _DISABLED
        return plan_all_reduce_add_rms_norm(
            input_,
            residual,
            weight,
            axis_name=self.axis_name,
            world_size=self.world_size,
            platform=self.platform,
            buffers=self.peer_buffers,
        )

    def custom_all_reduce(self, input_: Any) -> Any | None:
        """vLLM's seam: the Pallas one-shot / two-shot all-reduce, or ``None`` when the plan declines.

        Plans once (:meth:`plan_all_reduce`) and runs the plan; dtype groups it declines inside a
        pytree it takes go to psum there. ``None`` too when the custom all-reduce is disabled.
        """
        plan = self.plan_all_reduce(input_)
        if isinstance(plan, AllReducePlan):
            return plan(input_)
        return None

    def fused_ineligibility(self, input_: Any, residual: Any, weight: Any) -> str | None:
        """Why :meth:`all_reduce_add_rms_norm` would not use the fused GPU kernel (``None``: it would)."""
        plan = self.plan_all_reduce_add_rms_norm(input_, residual, weight)
        return None if isinstance(plan, FusedPlan) else plan

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group: :meth:`custom_all_reduce` when enabled and it takes the input, else XLA."""
        if not self.disable_custom_all_reduce:
            out = self.custom_all_reduce(input_)
            if out is not None:
                return out
        return super().all_reduce(input_)

    def all_reduce_add_rms_norm(self, input_: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """As :meth:`XlaCommunicator.all_reduce_add_rms_norm`, in ONE kernel launch when it can.

        The fused kernel (:mod:`kernels.custom_all_reduce.fused`) takes decode-sized inputs (rows of
        whole 2 KiB tiles up to 4 KiB, up to 128 rows) on GPUs with peer buffers; anything else
        runs the three steps (the all-reduce still through :meth:`all_reduce`).
        """
        plan = self.plan_all_reduce_add_rms_norm(input_, residual, weight)
        if isinstance(plan, FusedPlan):
            return plan(input_, residual, weight, eps)
        return super().all_reduce_add_rms_norm(input_, residual, weight, eps)
