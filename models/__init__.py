"""Tensor- and expert-parallel layers and small decoders built on ``spmd``.

Layers are per-device math whose sharding is parameter metadata; :func:`shard_module` runs a
module of them on global arrays as one ``jit(shard_map(...))``.
"""

from models.moe import MoEBlock, apply_experts, dense_moe_reference, moe_forward, moe_token_spec, route, shard_moe_block
from models.sharding import ShardedModule, partitioned, shard_module, shard_state, state_partition_specs

__all__ = [
    "MoEBlock",
    "ShardedModule",
    "apply_experts",
    "dense_moe_reference",
    "moe_forward",
    "moe_token_spec",
    "partitioned",
    "route",
    "shard_module",
    "shard_moe_block",
    "shard_state",
    "state_partition_specs",
]
