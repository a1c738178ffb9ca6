"""Parallel state: the one object that holds the mesh and its groups, and the getters.

vLLM's ``parallel_state.py`` keeps one ``torch.distributed`` process group per parallel
dimension in module globals. Here the groups are the named axes of one device mesh (laid out by
:mod:`spmd.config`), kept in a single state object that :func:`initialize_model_parallel` fills
and :func:`destroy_model_parallel` clears. A :class:`~spmd.group.GroupCoordinator` stands for all
groups of one axis at once: inside ``shard_map`` each device sees its own group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from spmd.axes import DP, EP, MESH_AXES, PP, TP, AxisName
from spmd.communicators import make_group_communicators
from spmd.config import ParallelConfig, device_groups, make_mesh
from spmd.distributed import init_distributed_environment
from spmd.group import GroupCoordinator

__all__ = [
    "destroy_model_parallel",
    "ensure_model_parallel_initialized",
    "get_dp_group",
    "get_ep_group",
    "get_mesh",
    "get_parallel_config",
    "get_pp_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_tp_group",
    "get_world_group",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "shard_map",
]


@dataclasses.dataclass
class _ParallelState:
    config: ParallelConfig | None = None
    mesh: Mesh | None = None
    groups: dict[str, GroupCoordinator] = dataclasses.field(default_factory=dict)

    def require(self, getter: str) -> Mesh:
        if self.mesh is None:
            raise RuntimeError(
                f"{getter}: model parallel is not initialized. Call "
                f"spmd.initialize_model_parallel(tensor_model_parallel_size=...) first."
            )
        return self.mesh


_STATE = _ParallelState()

_GROUP_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("world", MESH_AXES),
    ("dp", (DP,)),
    ("pp", (PP,)),
    ("ep", (EP,)),
    ("tp", (TP,)),
)


def _build_groups(mesh: Mesh, *, disable_custom_all_reduce: bool) -> dict[str, GroupCoordinator]:
    axis_names: dict[str, AxisName] = {name: axes if len(axes) > 1 else axes[0] for name, axes in _GROUP_AXES}
    communicators = make_group_communicators(mesh, axis_names, disable_custom_all_reduce=disable_custom_all_reduce)
    mesh_shape = tuple((a, int(mesh.shape[a])) for a in mesh.axis_names)
    return {
        name: GroupCoordinator(
            axis_name=axis_names[name],
            world_size=communicators[name].world_size,
            device_groups=device_groups(mesh, axes),
            device_communicator=communicators[name],
            unique_name=name,
            mesh_shape=mesh_shape,
        )
        for name, axes in _GROUP_AXES
    }


def _cpu_hint(devices: Sequence[jax.Device]) -> str:
    if len(devices) == 1 and devices[0].platform == "cpu":
        return (
            " This machine shows one CPU device: for simulated devices set JAX_NUM_CPU_DEVICES=8 (or "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8) before JAX starts, or call "
            "jax.config.update('jax_num_cpu_devices', 8) first."
        )
    return ""


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    data_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
    disable_custom_all_reduce: bool = False,
) -> Mesh:
    """Build the global mesh and its groups.

    Args:
      tensor_model_parallel_size: devices per TP group.
      pipeline_model_parallel_size: pipeline stages.
      data_parallel_size: replicas; ``None`` uses all remaining devices.
      expert_model_parallel_size: devices per EP group.
      devices: the devices to lay out (default ``jax.devices()``, every process's devices).
      disable_custom_all_reduce: keep every all-reduce on XLA (vLLM's flag of the same name).

    Returns:
      The mesh, axes ``("dp", "pp", "ep", "tp")``.

    Raises:
      ValueError: sizes that are not positive ints or do not fit the devices.
      RuntimeError: already initialized with a different configuration.
    """
    config = ParallelConfig(
        tensor_parallel_size=tensor_model_parallel_size,
        pipeline_parallel_size=pipeline_model_parallel_size,
        data_parallel_size=data_parallel_size,
        expert_parallel_size=expert_model_parallel_size,
    )
    init_distributed_environment()
    devices = list(jax.devices() if devices is None else devices)
    try:
        config = config.resolve(len(devices))
    except ValueError as e:
        raise ValueError(f"initialize_model_parallel: {e}{_cpu_hint(devices)}") from None
    if _STATE.mesh is not None:
        same_devices = [d.id for d in _STATE.mesh.devices.flat] == [d.id for d in devices]
        if config == _STATE.config and same_devices:
            return _STATE.mesh
        raise RuntimeError(
            f"initialize_model_parallel: already initialized with {_STATE.config} on "
            f"{_STATE.mesh.devices.size} devices; asked for {config} on {len(devices)} devices. "
            f"Call spmd.destroy_model_parallel() first to change the layout."
        )
    mesh = make_mesh(config, devices)
    _STATE.config = config
    _STATE.mesh = mesh
    _STATE.groups = _build_groups(mesh, disable_custom_all_reduce=disable_custom_all_reduce)
    return mesh


def ensure_model_parallel_initialized(
    tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1, **kwargs: Any
) -> Mesh:
    """Initialize if needed; otherwise check that the sizes match (vLLM's helper of this name).

    Raises:
      RuntimeError: already initialized with different sizes.
    """
    if _STATE.mesh is None or _STATE.config is None:
        return initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, **kwargs)
    cfg = _STATE.config
    if (cfg.tensor_parallel_size, cfg.pipeline_parallel_size) != (
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
    ):
        raise RuntimeError(
            f"ensure_model_parallel_initialized: initialized with tensor_parallel_size="
            f"{cfg.tensor_parallel_size}, pipeline_parallel_size={cfg.pipeline_parallel_size}; asked for "
            f"{tensor_model_parallel_size}, {pipeline_model_parallel_size}."
        )
    return _STATE.mesh


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _STATE.mesh is not None


def destroy_model_parallel() -> None:
    """Forget the mesh and groups; :func:`initialize_model_parallel` may then run again."""
    _STATE.config = None
    _STATE.mesh = None
    _STATE.groups = {}


def _group(name: str, getter: str) -> GroupCoordinator:
    _STATE.require(getter)
    return _STATE.groups[name]


def get_world_group() -> GroupCoordinator:
    """The group of all devices (axes ``("dp", "pp", "ep", "tp")``)."""
    return _group("world", "get_world_group")


def get_tp_group() -> GroupCoordinator:
    """The tensor-parallel group (axis "tp")."""
    return _group("tp", "get_tp_group")


def get_pp_group() -> GroupCoordinator:
    """The pipeline-parallel group (axis "pp")."""
    return _group("pp", "get_pp_group")


def get_dp_group() -> GroupCoordinator:
    """The data-parallel group (axis "dp")."""
    return _group("dp", "get_dp_group")


def get_ep_group() -> GroupCoordinator:
    """The expert-parallel group (axis "ep")."""
    return _group("ep", "get_ep_group")


def get_mesh() -> Mesh:
    """The global mesh."""
    return _STATE.require("get_mesh")


def get_parallel_config() -> ParallelConfig:
    """The resolved :class:`~spmd.config.ParallelConfig` in force."""
    _STATE.require("get_parallel_config")
    config = _STATE.config
    if config is None:  # pragma: no cover - set together with the mesh
        raise RuntimeError("get_parallel_config: the parallel state lost its config.")
    return config


def get_tensor_model_parallel_world_size() -> int:
    """Devices per TP group."""
    return get_tp_group().world_size


def get_tensor_model_parallel_rank() -> jax.Array:
    """This device's TP rank (traced; inside ``shard_map`` only)."""
    return get_tp_group().rank_in_group


def shard_map(
    f: Callable[..., Any],
    *,
    in_specs: Any,
    out_specs: Any,
    mesh: Mesh | None = None,
    check_vma: bool = True,
) -> Callable[..., Any]:
    """``jax.shard_map`` over the current global mesh.

    Args:
      f: the per-device function; collectives inside it name the mesh axes ("tp", "ep", ...).
      in_specs, out_specs: ``PartitionSpec`` pytrees, as for ``jax.shard_map``.
      mesh: another mesh to use instead of the global one.
      check_vma: as for ``jax.shard_map``.

    Raises:
      RuntimeError: no ``mesh`` given and model parallel is not initialized.
    """
    if mesh is None:
        mesh = get_mesh()
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
