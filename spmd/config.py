"""The parallel configuration and the device mesh it lays out.

Rank layout. With 8 devices, ``tensor_model_parallel_size=2``, ``expert_model_parallel_size=2``
and ``data_parallel_size=2``, the mesh ``("dp", "pp", "ep", "tp")`` has shape ``(2, 1, 2, 2)``
and device ids are laid out row-major, "tp" innermost::

    dp=0: ep=0: tp=[d0 d1]   ep=1: tp=[d2 d3]
    dp=1: ep=0: tp=[d4 d5]   ep=1: tp=[d6 d7]

so the TP groups are [d0 d1], [d2 d3], [d4 d5], [d6 d7]; the EP groups [d0 d2], [d1 d3],
[d4 d6], [d5 d7]; the DP groups [d0 d4], [d1 d5], [d2 d6], [d3 d7].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from spmd.axes import MESH_AXES

__all__ = ["ParallelConfig", "device_groups", "make_mesh"]


def _check_size(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"ParallelConfig: expected {name} to be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Sizes of the parallel dimensions.

    Attributes:
      tensor_parallel_size: devices per TP group (the "tp" axis).
      pipeline_parallel_size: pipeline stages (the "pp" axis).
      data_parallel_size: model replicas (the "dp" axis); ``None`` takes what the other sizes
        leave of the devices (see :meth:`resolve`).
      expert_parallel_size: devices per EP group (the "ep" axis).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int | None = None
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check_size("tensor_parallel_size", self.tensor_parallel_size)
        _check_size("pipeline_parallel_size", self.pipeline_parallel_size)
        _check_size("data_parallel_size", self.data_parallel_size, allow_none=True)
        _check_size("expert_parallel_size", self.expert_parallel_size)

    @property
    def model_parallel_size(self) -> int:
        """Devices per model replica: ``pp * ep * tp``."""
        return self.pipeline_parallel_size * self.expert_parallel_size * self.tensor_parallel_size

    def resolve(self, num_devices: int) -> ParallelConfig:
        """This config with ``data_parallel_size`` filled in for ``num_devices`` devices.

        Raises:
          ValueError: the sizes do not multiply to ``num_devices``.
        """
        sizes = (
            f"tensor_parallel_size={self.tensor_parallel_size}, "
            f"pipeline_parallel_size={self.pipeline_parallel_size}, "
            f"expert_parallel_size={self.expert_parallel_size}, "
            f"data_parallel_size={self.data_parallel_size}"
        )
        mp = self.model_parallel_size
        if self.data_parallel_size is None:
            if num_devices % mp:
                raise ValueError(
                    f"ParallelConfig: {sizes} do not fit {num_devices} devices: tp * pp * ep = {mp} "
                    f"does not divide {num_devices}. Choose sizes whose product divides the device count."
                )
            return dataclasses.replace(self, data_parallel_size=num_devices // mp)
        if mp * self.data_parallel_size != num_devices:
            raise ValueError(
                f"ParallelConfig: {sizes} need dp * pp * ep * tp = {mp * self.data_parallel_size} "
                f"devices, but {num_devices} are available. Pass data_parallel_size=None to use them all, "
                f"or sizes whose product is {num_devices}."
            )
        return self

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        """``(dp, pp, ep, tp)``; only for a resolved config."""
        if self.data_parallel_size is None:
            raise ValueError("ParallelConfig.mesh_shape: call resolve(num_devices) first.")
        return (
            self.data_parallel_size,
            self.pipeline_parallel_size,
            self.expert_parallel_size,
            self.tensor_parallel_size,
        )


def make_mesh(config: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``("dp", "pp", "ep", "tp")`` over ``devices`` (default: all devices).

    Devices are laid out row-major in the order given, so "tp" groups are runs of consecutive
    devices (``jax.devices()`` lists a host's GPUs in id order, which on NVLink systems are the
    fastest-linked peers). Axes are ``Auto`` so ``shard_map`` accepts unsharded inputs.
    """
    devices = list(jax.devices() if devices is None else devices)
    config = config.resolve(len(devices))
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    kwargs: dict[str, Any] = {}
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        kwargs["axis_types"] = (axis_type.Auto,) * len(MESH_AXES)
    return Mesh(grid.reshape(config.mesh_shape), MESH_AXES, **kwargs)


def device_groups(mesh: Mesh, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Device ids of every group along ``axes`` of ``mesh``, each group ordered by rank (vLLM's ``group_ranks``)."""
    names = list(mesh.axis_names)
    ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
    order = [names.index(a) for a in names if a not in axes] + [names.index(a) for a in axes]
    moved = np.transpose(ids, order)
    group_size = math.prod(mesh.shape[a] for a in axes)
    return tuple(tuple(int(i) for i in row) for row in moved.reshape(-1, group_size))
