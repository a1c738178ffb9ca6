"""The XLA communicator: every collective lowered through XLA (vLLM's ``DeviceCommunicatorBase``).

A communicator is how one group's collectives are lowered on one platform. vLLM's
``DeviceCommunicatorBase`` wraps ``torch.distributed`` calls on a process group; here
:class:`XlaCommunicator` wraps the XLA collectives (``psum``, ``all_gather``, ``psum_scatter``,
``all_to_all``) on a mesh axis. That is already the right lowering on CPU (XLA:CPU in one process,
gloo across processes) and for everything but small all-reduces on GPU and TPU, where
:class:`~spmd.communicators.pallas.PallasCommunicator` adds the custom kernel.
"""

from __future__ import annotations

import math
from typing import Any

from spmd import collectives, compat
from spmd.axes import AxisName

__all__ = ["XlaCommunicator", "rms_norm"]


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    """``weight * cast(x / sqrt(mean(x^2) + eps))``, in float32 then cast back (Hugging Face's RMSNorm)."""
    import jax.numpy as jnp
    from jax import lax

    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


class XlaCommunicator:
    """Collectives of one group (a mesh axis), lowered through XLA.

    Every communicator class takes this constructor signature.

    Args:
      axis_name: the mesh axis (or tuple of axes) this communicator reduces over.
      world_size: the number of devices along ``axis_name``.
      platform: the platform of the mesh's devices (``"cpu"``, ``"gpu"``, ``"tpu"``, ...).
      unique_name: a label for logs and errors, e.g. ``"tp"`` (default: the axis name).
      disable_custom_all_reduce: never use a custom all-reduce kernel (vLLM's flag). Recorded on
        every communicator so a group's configuration can be read back; this class has no
        custom kernel to disable.

    Raises:
      ValueError: ``world_size`` is not a positive int.

    Every method is traced inside ``shard_map`` over a mesh that binds ``axis_name``.
    """

    def __init__(
        self,
        axis_name: AxisName,
        world_size: int,
        *,
        platform: str,
        unique_name: str = "",
        disable_custom_all_reduce: bool = False,
    ):
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"{type(self).__name__}: expected a positive int world_size, got {world_size!r}.")
        self.axis_name = axis_name
        self.world_size = world_size
        self.platform = platform
        self.unique_name = unique_name or (axis_name if isinstance(axis_name, str) else "_".join(axis_name))
        self.disable_custom_all_reduce = bool(disable_custom_all_reduce)

    @classmethod
    def create(
        cls,
        mesh: Any,
        axis_name: AxisName,
        *,
        unique_name: str = "",
        disable_custom_all_reduce: bool = False,
        allocate_peer_buffers: bool = True,
    ) -> XlaCommunicator:
        """The communicator of group ``axis_name`` of ``mesh`` (its size and platform read from the mesh).

        Args:
          mesh: the device mesh.
          axis_name: the group's mesh axis (or tuple of axes).
          unique_name: the group's label.
          disable_custom_all_reduce: recorded (this class has no custom kernel).
          allocate_peer_buffers: for subclasses that own peer buffers; unused here.
        """
        del allocate_peer_buffers
        axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
        return cls(
            axis_name,
            math.prod(int(mesh.shape[a]) for a in axes),
            platform=compat.mesh_platform(mesh),
            unique_name=unique_name,
            disable_custom_all_reduce=disable_custom_all_reduce,
        )

    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group; the same result on every rank."""
        return collectives.all_reduce(input_, self.axis_name)

    def custom_all_reduce(self, input_: Any) -> Any | None:
        """vLLM's custom all-reduce seam: ``None`` here (no custom kernel), so callers use :meth:`all_reduce`."""
        del input_
        return None

    def all_reduce_add_rms_norm(self, input_: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """``(rms_norm(all_reduce(input_) + residual), all_reduce(input_) + residual)``.

        What follows a row-parallel layer in a pre-norm decoder: the reduction, the residual add
        and the next norm. Here three steps; communicators with a fused kernel do it in one launch.
        """
        h = self.all_reduce(input_) + residual
        return rms_norm(h, weight, eps), h

    def all_gather(self, input_: Any, dim: int = -1) -> Any:
        """Concatenate every rank's shard along ``dim`` in rank order."""
        return collectives.all_gather(input_, self.axis_name, axis=dim)

    def reduce_scatter(self, input_: Any, dim: int = -1) -> Any:
        """Sum over the group and keep this rank's slice of ``dim``."""
        return collectives.reduce_scatter(input_, self.axis_name, axis=dim)

    def all_to_all(self, input_: Any, scatter_dim: int = 0, gather_dim: int = -1) -> Any:
        """Send block ``j`` of ``scatter_dim`` to rank ``j``; concatenate arrivals along ``gather_dim``."""
        return collectives.all_to_all(input_, self.axis_name, split_axis=scatter_dim, concat_axis=gather_dim)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(axis_name={self.axis_name!r}, world_size={self.world_size}, "
            f"platform={self.platform!r}, disable_custom_all_reduce={self.disable_custom_all_reduce})"
        )
