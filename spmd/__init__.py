"""spmd: vLLM's distributed layer (``vllm/distributed``) as functional SPMD on JAX.

Groups are mesh axes, ranks are ``lax.axis_index``, collectives are pure functions traced inside
``jax.shard_map``. Start with :func:`initialize_model_parallel`, then run per-device code with
:func:`shard_map` and call the collectives inside it.
"""

from spmd.axes import DP, EP, MESH_AXES, PP, TP
from spmd.collectives import (
    UnboundAxisError,
    all_gather,
    all_reduce,
    all_to_all,
    axis_index,
    axis_size,
    broadcast,
    gather,
    reduce_scatter,
    shift,
)
from spmd.communication_op import (
    broadcast_tensor_dict,
    custom_all_reduce,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_all_reduce_add_rms_norm,
    tensor_model_parallel_reduce_scatter,
)
from spmd.communicators import (
    CpuCommunicator,
    DeviceCommunicatorBase,
    GpuCommunicator,
    PallasCommunicator,
    TpuCommunicator,
    XlaCommunicator,
    make_device_communicator,
)
from spmd.config import ParallelConfig, make_mesh
from spmd.distributed import init_distributed_environment
from spmd.group import GroupCoordinator
from spmd.parallel_state import (
    destroy_model_parallel,
    ensure_model_parallel_initialized,
    get_dp_group,
    get_ep_group,
    get_mesh,
    get_parallel_config,
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    get_world_group,
    initialize_model_parallel,
    model_parallel_is_initialized,
    shard_map,
)

__all__ = [
    "DP",
    "EP",
    "MESH_AXES",
    "PP",
    "TP",
    "CpuCommunicator",
    "DeviceCommunicatorBase",
    "DevicePutKVPipe",
    "GpuCommunicator",
    "GroupCoordinator",
    "KVPiece",
    "KVPipeBase",
    "PallasCommunicator",
    "ParallelConfig",
    "TCPKVPipe",
    "TpuCommunicator",
    "IpcKVPipe",
    "TransferServerKVPipe",
    "UnboundAxisError",
    "XlaCommunicator",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "axis_index",
    "axis_size",
    "broadcast",
    "broadcast_tensor_dict",
    "custom_all_reduce",
    "destroy_model_parallel",
    "ensure_model_parallel_initialized",
    "gather",
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
    "kv_head_ranges",
    "kv_head_sharding",
    "kv_transfer_plan",
    "make_device_communicator",
    "make_mesh",
    "merge_kv_heads",
    "model_parallel_is_initialized",
    "reduce_scatter",
    "reshard_kv_heads",
    "shard_map",
    "shift",
    "split_kv_heads",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_all_reduce_add_rms_norm",
    "tensor_model_parallel_reduce_scatter",
]

__version__ = "0.1.0"

# The KV pipes (sockets, shared memory, CUDA IPC) load on first use: `import spmd` stays light.
_LAZY = {
    name: "spmd.kv_transfer"
    for name in (
        "DevicePutKVPipe",
        "IpcKVPipe",
        "KVPiece",
        "KVPipeBase",
        "TCPKVPipe",
        "TransferServerKVPipe",
        "kv_head_ranges",
        "kv_head_sharding",
        "kv_transfer_plan",
        "merge_kv_heads",
        "reshard_kv_heads",
        "split_kv_heads",
    )
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
