"""spmd: vLLM's distributed layer (``vllm/distributed``) as functional SPMD on JAX.

Groups are mesh axes, ranks are ``lax.axis_index``, collectives are pure functions traced inside
``jax.shard_map``. Start with :func:`initialize_model_parallel`, then run per-device code with
:func:`shard_map` and call the collectives inside it.
"""

__version__ = "0.1.0"

# Every public name loads on first use, so `import spmd` (and `spmd-launch`, which needs none of JAX) stays light.
_LAZY = {
    **dict.fromkeys(("DP", "EP", "MESH_AXES", "PP", "TP"), "spmd.axes"),
    **dict.fromkeys(
        (
            "UnboundAxisError",
            "all_gather",
            "all_reduce",
            "all_to_all",
            "axis_index",
            "axis_size",
            "broadcast",
            "gather",
            "reduce_scatter",
            "shift",
        ),
        "spmd.collectives",
    ),
    **dict.fromkeys(
        (
            "broadcast_tensor_dict",
            "custom_all_reduce",
            "tensor_model_parallel_all_gather",
            "tensor_model_parallel_all_reduce",
            "tensor_model_parallel_all_reduce_add_rms_norm",
            "tensor_model_parallel_reduce_scatter",
        ),
        "spmd.communication_op",
    ),
    **dict.fromkeys(
        (
            "CpuCommunicator",
            "DeviceCommunicatorBase",
            "GpuCommunicator",
            "PallasCommunicator",
            "TpuCommunicator",
            "XlaCommunicator",
            "make_device_communicator",
        ),
        "spmd.communicators",
    ),
    **dict.fromkeys(("ParallelConfig", "make_mesh"), "spmd.config"),
    **dict.fromkeys(("init_distributed_environment",), "spmd.distributed"),
    **dict.fromkeys(("GroupCoordinator",), "spmd.group"),
    **dict.fromkeys(
        (
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
        ),
        "spmd.parallel_state",
    ),
    **dict.fromkeys(
        (
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
        ),
        "spmd.kv_transfer",
    ),
}
__all__ = sorted(_LAZY)  # every public name, each loaded by the module named above


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
