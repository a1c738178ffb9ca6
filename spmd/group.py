"""``GroupCoordinator``: one parallel group (a mesh axis) and its collectives.

vLLM keeps one ``GroupCoordinator`` per process and parallel dimension, wrapping a
``torch.distributed`` process group. Here one coordinator stands for every group along a mesh
axis at once: inside ``shard_map`` each device sees its own group, and the collectives are pure
functions traced on every rank together (see :mod:`spmd.config` for the rank layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from spmd import collectives, host
from spmd import tensor_dict as td
from spmd.axes import AxisName
from spmd.communicators import DeviceCommunicatorBase

__all__ = ["GroupCoordinator"]


def _names(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupCoordinator:
    """One parallel group (a mesh axis or tuple of axes) and its collectives.

    Ranks follow vLLM. ``rank_in_group`` is this device's rank in its group (``0 .. world_size - 1``);
    ``ranks`` are the global ranks of the group's members (a device's global rank is its position
    in the mesh, row-major: its rank in the world group), and ``first_rank`` / ``last_rank`` the
    first and last of them. All of these depend on the device, so they are traced values that
    exist only inside ``shard_map``. The static view of every group is ``device_groups``
    (vLLM's ``group_ranks``, here as device ids).

    Attributes:
      axis_name: the mesh axis name, or a tuple of names for a group spanning several axes.
      world_size: the number of ranks in each group.
      device_groups: the device ids of every group along this axis, each ordered by rank.
      device_communicator: how this group's collectives are lowered on the mesh's platform.
      unique_name: a label ("tp", "world", ...).
      mesh_shape: ``((axis, size), ...)`` of the whole mesh, in mesh order (for global ranks).
    """

    axis_name: AxisName
    world_size: int
    device_groups: tuple[tuple[int, ...], ...]
    device_communicator: DeviceCommunicatorBase
    unique_name: str
    mesh_shape: tuple[tuple[str, int], ...] = ()

    # Ranks (traced) -----------------------------------------------------------------------------
    @property
    def rank_in_group(self) -> jax.Array:
        """This device's rank in its group (traced int32; inside ``shard_map`` only)."""
        return collectives.axis_index(self.axis_name, op=f"{self.unique_name}.rank_in_group")

    def _strides(self) -> dict[str, int]:
        names = [a for a, _ in self.mesh_shape]
        sizes = [s for _, s in self.mesh_shape]
        return {a: math.prod(sizes[i + 1 :]) for i, a in enumerate(names)}

    def _rank_offsets(self) -> np.ndarray:
        """Global-rank offsets of group ranks ``0 .. world_size - 1`` from the group's first rank."""
        strides, sizes = self._strides(), dict(self.mesh_shape)
        offsets = np.zeros(self.world_size, np.int32)
        for r in range(self.world_size):
            rest = r
            for a in reversed(_names(self.axis_name)):
                offsets[r] += (rest % sizes[a]) * strides[a]
                rest //= sizes[a]
        return offsets

    @property
    def ranks(self) -> jax.Array:
        """The global ranks of this device's group, in group-rank order (traced int32[world_size])."""
        if not self.mesh_shape:
            raise ValueError(f"{self.unique_name}.ranks: this coordinator was built without the mesh shape.")
        op = f"{self.unique_name}.ranks"
        strides = self._strides()
        world = collectives.axis_index(tuple(a for a, _ in self.mesh_shape), op=op)
        mine = sum(collectives.axis_index(a, op=op) * strides[a] for a in _names(self.axis_name))
        return (world - mine) + self._rank_offsets()

    @property
    def first_rank(self) -> jax.Array:
        """The global rank of this group's rank 0 (traced)."""
        return self.ranks[0]

    @property
    def last_rank(self) -> jax.Array:
        """The global rank of this group's last rank (traced)."""
        return self.ranks[-1]

    @property
    def is_first_rank(self) -> jax.Array:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> jax.Array:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> jax.Array:
        """The next rank in the group, cyclically (a rank in the group, traced)."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> jax.Array:
        """The previous rank in the group, cyclically (a rank in the group, traced)."""
        return (self.rank_in_group - 1) % self.world_size

    # Collectives ---------------------------------------------------------------------------------
    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group; the same result on every rank."""
        return self.device_communicator.all_reduce(input_)

    def all_reduce_add_rms_norm(self, input_: Any, residual: Any, weight: Any, eps: float) -> tuple[Any, Any]:
        """``(rms_norm(all_reduce(input_) + residual), all_reduce(input_) + residual)`` (fused on GPUs when it can)."""
        return self.device_communicator.all_reduce_add_rms_norm(input_, residual, weight, eps)

    def all_gather(self, input_: Any, dim: int = -1) -> Any:
        """Concatenate every rank's shard along ``dim``."""
        return self.device_communicator.all_gather(input_, dim)

    def reduce_scatter(self, input_: Any, dim: int = -1) -> Any:
        """Sum over the group and keep this rank's slice of ``dim``."""
        return self.device_communicator.reduce_scatter(input_, dim)

    def all_to_all(self, input_: Any, scatter_dim: int = 0, gather_dim: int = -1) -> Any:
        """Send block ``j`` of ``scatter_dim`` to rank ``j``; concatenate arrivals along ``gather_dim``."""
        return self.device_communicator.all_to_all(input_, scatter_dim, gather_dim)

    def broadcast(self, input_: Any, src: int = 0) -> Any:
        """Rank ``src``'s value on every rank, bit for bit."""
        return collectives.broadcast(input_, self.axis_name, src=src)

    def gather(self, input_: Any, dst: int = 0, dim: int = -1) -> Any:
        """The concatenation along ``dim`` on rank ``dst``; zeros on the other ranks."""
        return collectives.gather(input_, self.axis_name, dst=dst, axis=dim)

    def send_recv(self, input_: Any, *, offset: int = 1, wrap: bool = True) -> Any:
        """Every rank sends ``input_`` to ``rank + offset`` and returns what ``rank - offset`` sent.

        SPMD has no one-sided send: all ranks send and receive in one exchange (a ``ppermute``).
        vLLM's ``send`` and ``recv`` are this same exchange under two names. With ``wrap=False``
        the first ``offset`` ranks receive zeros.
        """
        return collectives.shift(input_, self.axis_name, offset=offset, wrap=wrap)

    send = send_recv
    recv = send_recv

    def send_recv_tensor_dict(self, tensor_dict: dict[Any, Any], *, offset: int = 1) -> dict[Any, Any]:
        """Pipeline hand-off: rank ``r``'s arrays go to rank ``r + offset``, in-graph.

        Returns what this rank received from rank ``r - offset``: arrays of the same structure,
        zeros on the first ``offset`` ranks (no sender); non-array leaves pass through. vLLM's
        ``send_tensor_dict`` and ``recv_tensor_dict`` are this one exchange under two names.
        """
        return td.shift_pytree_arrays(tensor_dict, self.axis_name, offset=offset)

    send_tensor_dict = send_recv_tensor_dict
    recv_tensor_dict = send_recv_tensor_dict

    # Tensor dicts and objects (in-graph or host level) ----------------------------------------------
    def _host(self, op: str, value: Any, src: int, *, require_dict: bool = False) -> Any:
        return td.host_broadcast_in_group(
            value,
            src,
            device_groups=self.device_groups,
            world_size=self.world_size,
            group_name=self.unique_name,
            op=op,
            require_dict=require_dict,
        )

    def broadcast_tensor_dict(self, tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any] | None:
        """Rank ``src``'s dict on every rank of the group; ``src`` is a rank in this group.

        Inside ``shard_map`` (this group's axis bound) every rank passes a same-structured dict and
        gets rank ``src``'s arrays back, bit for bit; non-array leaves pass through. On the host,
        the process owning rank ``src``'s device sends and the other processes of the group pass
        ``None`` and receive (see :mod:`spmd.tensor_dict`); in a one-process job that process
        already holds every rank and gets its dict back.

        Raises:
          ValueError: ``src`` out of range for the group, or ``tensor_dict`` is ``None`` inside ``shard_map``.
          TypeError: host level, on the sender: not a dict, or a value that cannot cross processes.
          RuntimeError: host level, on the receivers: the sender could not send.
        """
        op = f"{self.unique_name}.broadcast_tensor_dict"
        if collectives.axis_is_bound(self.axis_name):
            return td.broadcast_pytree_arrays(tensor_dict, self.axis_name, src=src, op=op)
        return self._host(op, tensor_dict, src, require_dict=True)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Host level: every process of the group gets the object of the process owning rank ``src``."""
        return self._host(f"{self.unique_name}.broadcast_object", obj, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Host level: one entry per rank of this process's group: the object of the process owning it."""
        return td.host_all_gather_object_in_group(obj, device_groups=self.device_groups, group_name=self.unique_name)

    def barrier(self) -> None:
        """Host level: wait for this process's queued device work, then for every process of the job."""
        host.barrier()

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator({self.unique_name!r}, axis_name={self.axis_name!r}, "
            f"world_size={self.world_size}, communicator={type(self.device_communicator).__name__})"
        )
