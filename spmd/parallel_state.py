"""Parallel state: the device mesh, its groups and their coordinators.

vLLM's ``parallel_state.py`` keeps one ``torch.distributed`` process group per parallel
dimension in module globals. Here the groups are the named axes of one device mesh, kept in a
single state object that :func:`initialize_model_parallel` fills and
:func:`destroy_model_parallel` clears.

Rank layout. With 8 devices, ``tensor_model_parallel_size=2``, ``expert_model_parallel_size=2``
and ``data_parallel_size=2``, the mesh ``("dp", "pp", "ep", "tp")`` has shape ``(2, 1, 2, 2)``
and device ids are laid out row-major, "tp" innermost::

    dp=0: ep=0: tp=[d0 d1]   ep=1: tp=[d2 d3]
    dp=1: ep=0: tp=[d4 d5]   ep=1: tp=[d6 d7]

so the TP groups are [d0 d1], [d2 d3], [d4 d5], [d6 d7]; the EP groups [d0 d2], [d1 d3],
[d4 d6], [d5 d7]; the DP groups [d0 d4], [d1 d5], [d2 d6], [d3 d7]. A :class:`GroupCoordinator`
stands for all groups of one axis at once: inside ``shard_map`` each device sees its own group.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from spmd import collectives
from spmd.axes import DP, EP, MESH_AXES, PP, TP, AxisName
from spmd.communicators import DeviceCommunicatorBase, make_device_communicator
from spmd.envs import SpmdEnv

__all__ = [
    "GroupCoordinator",
    "ParallelConfig",
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
    "init_distributed_environment",
    "initialize_model_parallel",
    "make_mesh",
    "model_parallel_is_initialized",
    "shard_map",
]


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


def _device_groups(mesh: Mesh, axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Device ids of every group along ``axes`` (each group ordered by rank)."""
    names = list(mesh.axis_names)
    ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
    order = [names.index(a) for a in names if a not in axes] + [names.index(a) for a in axes]
    moved = np.transpose(ids, order)
    group_size = math.prod(mesh.shape[a] for a in axes)
    return tuple(tuple(int(i) for i in row) for row in moved.reshape(-1, group_size))


@dataclasses.dataclass(frozen=True, eq=False)
class GroupCoordinator:
    """One parallel group (a mesh axis or tuple of axes) and its collectives.

    The attributes ``world_size``, ``ranks``, ``first_rank`` and ``last_rank`` are static. The
    rank-dependent properties (``rank_in_group``, ``next_rank``, ``prev_rank``,
    ``is_first_rank``, ``is_last_rank``) are traced values and exist only inside ``shard_map``.
    The ops are pure functions of their inputs, traced on every rank at once.

    Attributes:
      axis_name: the mesh axis name, or a tuple of names for a group spanning several axes.
      world_size: the number of ranks in each group.
      device_groups: the device ids of every group along this axis, each ordered by rank.
      device_communicator: how this group's collectives are lowered on the mesh's platform.
      unique_name: a label ("tp", "world", ...).
    """

    axis_name: AxisName
    world_size: int
    device_groups: tuple[tuple[int, ...], ...]
    device_communicator: DeviceCommunicatorBase
    unique_name: str

    # Static rank bookkeeping --------------------------------------------------------------------
    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks within a group: ``(0, ..., world_size - 1)``."""
        return tuple(range(self.world_size))

    @property
    def first_rank(self) -> int:
        return 0

    @property
    def last_rank(self) -> int:
        return self.world_size - 1

    # Traced rank bookkeeping --------------------------------------------------------------------
    @property
    def rank_in_group(self) -> jax.Array:
        """This device's rank in its group (traced int32; inside ``shard_map`` only)."""
        return collectives.axis_index(self.axis_name, op=f"{self.unique_name}.rank_in_group")

    @property
    def next_rank(self) -> jax.Array:
        """The next rank, cyclically."""
        return (self.rank_in_group + 1) % self.world_size

    @property
    def prev_rank(self) -> jax.Array:
        """The previous rank, cyclically."""
        return (self.rank_in_group - 1) % self.world_size

    @property
    def is_first_rank(self) -> jax.Array:
        return self.rank_in_group == self.first_rank

    @property
    def is_last_rank(self) -> jax.Array:
        return self.rank_in_group == self.last_rank

    # Collectives ---------------------------------------------------------------------------------
    def all_reduce(self, input_: Any) -> Any:
        """Sum over the group; the same result on every rank."""
        return self.device_communicator.all_reduce(input_)

    def all_gather(self, input_: Any, dim: int = -1) -> Any:
        """Concatenate every rank's shard along ``dim``."""
        return self.device_communicator.all_gather(input_, dim)

    def reduce_scatter(self, input_: Any, dim: int = -1) -> Any:
        """Sum over the group and keep this rank's slice of ``dim``."""
        return self.device_communicator.reduce_scatter(input_, dim)

    def all_to_all(self, input_: Any, split_dim: int = 0, concat_dim: int = -1) -> Any:
        """Send block ``j`` of ``split_dim`` to rank ``j``; concatenate arrivals along ``concat_dim``."""
        return self.device_communicator.all_to_all(input_, split_dim, concat_dim)

    def broadcast(self, input_: Any, src: int = 0) -> Any:
        """Rank ``src``'s value on every rank, bit for bit."""
        return collectives.broadcast(input_, self.axis_name, src=src)

    def gather(self, input_: Any, dst: int = 0, dim: int = -1) -> Any:
        """The concatenation along ``dim`` on rank ``dst``; zeros on the other ranks."""
        return collectives.gather(input_, self.axis_name, dst=dst, axis=dim)

    def send(self, input_: Any, *, offset: int = 1, wrap: bool = True) -> Any:
        """Every rank sends ``input_`` to ``rank + offset``; returns what this rank received.

        SPMD has no one-sided send: all ranks send and receive at once (a ``ppermute``). The
        default sends to ``next_rank``. With ``wrap=False`` the first ``offset`` ranks receive zeros.
        """
        return collectives.shift(input_, self.axis_name, offset=offset, wrap=wrap)

    def recv(self, input_: Any, *, offset: int = 1, wrap: bool = True) -> Any:
        """Receive ``prev_rank``'s (``rank - offset``'s) ``input_``; the same exchange as :meth:`send`."""
        return collectives.shift(input_, self.axis_name, offset=offset, wrap=wrap)

    def broadcast_tensor_dict(self, tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any] | None:
        """Broadcast a dict from ``src``: in-graph along this group, or across processes on the host.

        Inside ``shard_map`` (this group's axis bound): every rank traces the same program, so
        every rank passes a dict of the same structure; the array leaves of rank ``src`` are
        what every rank gets back, bit for bit, and non-array leaves (ints, strings, None, ...)
        pass through. ``src`` is a rank in this group.

        On the host of a multi-process job: process ``src`` passes the dict, the others ``None``,
        and every process returns equal dicts (:func:`spmd.host.broadcast_tensor_dict_across_processes`).
        In a single-process job the one process already holds the dict and gets it back.

        Raises:
          ValueError: ``tensor_dict`` is ``None`` inside ``shard_map``, or ``src`` out of range.
          TypeError: a value that cannot cross processes (host level).
        """
        if collectives.axis_is_bound(self.axis_name):
            if tensor_dict is None:
                raise ValueError(
                    f"{self.unique_name}.broadcast_tensor_dict: got tensor_dict=None inside shard_map. Every "
                    f"rank of an SPMD program runs the same code, so pass the same-structured dict on every "
                    f"rank; rank src={src}'s array values are the ones every rank gets back."
                )
            return broadcast_pytree_arrays(tensor_dict, self.axis_name, src=src)
        from spmd import host

        return host.broadcast_tensor_dict_across_processes(tensor_dict, src)

    def send_tensor_dict(self, tensor_dict: dict[Any, Any], *, offset: int = 1) -> dict[Any, Any]:
        """Pipeline hand-off: rank ``r``'s arrays go to rank ``r + offset``, in-graph.

        Returns what this rank received from rank ``r - offset``: arrays of the same structure,
        zeros on the first ``offset`` ranks (no sender); non-array leaves pass through. The
        sending and the receiving stage run the same exchange, so :meth:`recv_tensor_dict` is
        the same call under vLLM's other name.
        """
        return _map_array_leaves(
            tensor_dict, lambda arrays: collectives.shift(arrays, self.axis_name, offset=offset, wrap=False)
        )

    def recv_tensor_dict(self, tensor_dict: dict[Any, Any], *, offset: int = 1) -> dict[Any, Any]:
        """What rank ``r - offset`` sent with :meth:`send_tensor_dict` (the same exchange)."""
        return self.send_tensor_dict(tensor_dict, offset=offset)

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Host level: every process gets process ``src``'s ``obj`` (JSON-safe values and arrays)."""
        from spmd import host

        return host.broadcast_object(obj, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Host level: the list of every process's ``obj``, in process order."""
        from spmd import host

        return host.all_gather_object(obj)

    def barrier(self) -> None:
        """Host level: wait for this process's queued device work, then for every process."""
        from spmd import host

        host.barrier()

    def __repr__(self) -> str:
        return (
            f"GroupCoordinator({self.unique_name!r}, axis_name={self.axis_name!r}, "
            f"world_size={self.world_size}, communicator={type(self.device_communicator).__name__})"
        )


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _map_array_leaves(tree: Any, fn: Callable[[list], list]) -> Any:
    """Apply ``fn`` to the list of ``tree``'s array leaves at once; other leaves pass through."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda v: v is None)
    positions = [i for i, v in enumerate(leaves) if _is_array(v)]
    for i, v in zip(positions, fn([leaves[i] for i in positions]), strict=True):
        leaves[i] = v
    return jax.tree.unflatten(treedef, leaves)


def broadcast_pytree_arrays(tree: Any, axis_name: AxisName, *, src: int = 0) -> Any:
    """Broadcast the array leaves of ``tree`` from rank ``src``; other leaves pass through."""
    n = collectives.axis_size(axis_name, op="broadcast_tensor_dict")
    collectives._check_rank("broadcast_tensor_dict", "src", src, n, axis_name)
    return _map_array_leaves(tree, lambda arrays: collectives.broadcast(arrays, axis_name, src=src) if arrays else [])


# The one parallel-state object ----------------------------------------------------------------


@dataclasses.dataclass
class _ParallelState:
    distributed_initialized: bool = False
    config: ParallelConfig | None = None
    mesh: Mesh | None = None
    groups: dict[str, GroupCoordinator] = dataclasses.field(default_factory=dict)
    # Host-level calls made so far; matches calls across processes (each makes the same sequence).
    host_ops: int = 0

    def require(self, getter: str) -> None:
        if self.mesh is None:
            raise RuntimeError(
                f"{getter}: model parallel is not initialized. Call "
                f"spmd.initialize_model_parallel(tensor_model_parallel_size=...) first."
            )


_STATE = _ParallelState()


def next_host_op_id() -> int:
    """A number for the next host-level call; every process counts its calls the same way."""
    _STATE.host_ops += 1
    return _STATE.host_ops


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())


def _exit_fast_on_uncaught_errors() -> None:
    """Make an uncaught exception end this process at once, with exit code 1.

    Otherwise JAX's exit handler waits at the job's shutdown barrier for processes that may be
    blocked waiting for this one, and the failure only surfaces after minutes of timeouts. A
    launcher (``spmd-launch``, SLURM) sees the exit code and stops the rest of the job.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def init_distributed_environment(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    cpu_devices_per_process: int | None = None,
    timeout_s: int | None = None,
) -> None:
    """Join JAX's multi-process runtime (``jax.distributed``); harmless when repeated.

    Arguments left ``None`` are read from the ``SPMD_*`` variables ``spmd-launch`` sets (see
    :mod:`spmd.envs`); with none of those either, ``jax.distributed.initialize`` detects SLURM or
    Open MPI when one of them started several processes, and otherwise the job is a single
    process and there is nothing to start.

    The coordination service binds to the coordinator's own address when that is a loopback
    address (one host), and to every interface only when a non-loopback address was given.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: processes in the job.
      process_id: this process's index.
      local_device_ids: the local accelerators this process drives (e.g. ``[0]``).
      cpu_devices_per_process: run on CPU with this many devices per process, gloo between processes.
      timeout_s: seconds to wait for every process to join.

    Raises:
      RuntimeError: JAX already started its backend in this process (an array was made or a
        computation ran), so devices can no longer be configured or a job joined; or joining failed.
    """
    if _STATE.distributed_initialized:
        return
    env = SpmdEnv.from_environ()
    coordinator_address = coordinator_address or env.coordinator_address
    num_processes = env.num_processes if num_processes is None else num_processes
    process_id = env.process_id if process_id is None else process_id
    if local_device_ids is None:
        local_device_ids = env.local_device_ids
    cpu = env.cpu_devices_per_process if cpu_devices_per_process is None else cpu_devices_per_process
    timeout = env.init_timeout_s if timeout_s is None else timeout_s
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    multi = explicit or env.cluster_launched
    if (multi or cpu) and _backend_started():
        raise RuntimeError(
            "init_distributed_environment: JAX has already started its backend in this process (an array "
            "was created or a computation ran), so it can no longer "
            + ("join a multi-process job" if multi else f"set {cpu} CPU devices")
            + ". Call spmd.init_distributed_environment() first, before any JAX computation."
        )
    if cpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if multi:
        kwargs: dict[str, Any] = {"initialization_timeout": int(timeout)}
        if explicit:
            kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
            if coordinator_address is not None and _is_loopback(coordinator_address):
                kwargs["coordinator_bind_address"] = coordinator_address
        if local_device_ids is not None and not cpu:
            kwargs["local_device_ids"] = list(local_device_ids)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:
            raise RuntimeError(
                f"init_distributed_environment: could not join the job (coordinator {coordinator_address}, "
                f"process {process_id} of {num_processes}, timeout {timeout} s): {type(e).__name__}: {e}"
            ) from e
        _exit_fast_on_uncaught_errors()
    _STATE.distributed_initialized = True


def _platform_of(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def _build_groups(mesh: Mesh, *, disable_custom_all_reduce: bool) -> dict[str, GroupCoordinator]:
    platform = _platform_of(mesh)
    groups = {}
    for name, axes in (("world", MESH_AXES), ("dp", (DP,)), ("pp", (PP,)), ("ep", (EP,)), ("tp", (TP,))):
        axis_name: AxisName = axes if len(axes) > 1 else axes[0]
        size = math.prod(mesh.shape[a] for a in axes)
        groups[name] = GroupCoordinator(
            axis_name=axis_name,
            world_size=size,
            device_groups=_device_groups(mesh, axes),
            device_communicator=make_device_communicator(
                axis_name,
                size,
                platform=platform,
                unique_name=name,
                disable_custom_all_reduce=disable_custom_all_reduce,
            ),
            unique_name=name,
        )
    return groups


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
      disable_custom_all_reduce: keep the GPU communicator on XLA/NCCL for every all-reduce.

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
    devices = list(jax.devices() if devices is None else devices)
    config = config.resolve(len(devices))
    if _STATE.mesh is not None:
        same_devices = [d.id for d in _STATE.mesh.devices.flat] == [d.id for d in devices]
        if config == _STATE.config and same_devices:
            return _STATE.mesh
        raise RuntimeError(
            f"initialize_model_parallel: already initialized with {_STATE.config} on "
            f"{_STATE.mesh.devices.size} devices; asked for {config} on {len(devices)} devices. "
            f"Call spmd.destroy_model_parallel() first to change the layout."
        )
    init_distributed_environment()
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
    if _STATE.mesh is None:
        return initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size, **kwargs)
    cfg = _STATE.config
    assert cfg is not None
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
    _STATE.require("get_mesh")
    assert _STATE.mesh is not None
    return _STATE.mesh


def get_parallel_config() -> ParallelConfig:
    """The resolved :class:`ParallelConfig` in force."""
    _STATE.require("get_parallel_config")
    assert _STATE.config is not None
    return _STATE.config


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


def all_devices_spec() -> PartitionSpec:
    """A spec that shards a leading dimension over every mesh axis (one block per device)."""
    return PartitionSpec(MESH_AXES)
