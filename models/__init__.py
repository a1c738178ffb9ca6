"""Tensor- and expert-parallel layers and Llama / Mixtral decoders built on ``spmd``.

Layers are per-device math whose sharding is parameter metadata; :func:`shard_module` runs a
module of them on global arrays as one ``jit(shard_map(...))``. :func:`from_pretrained` loads a
local Hugging Face checkpoint onto the mesh; :func:`score` and :func:`generate` run it.
"""

from models.config import ModelConfig
from models.generation import generate, generate_stream, generate_with_stats, score
from models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from models.llama import KVCache, LlamaForCausalLM
from models.loading import from_pretrained, load_state_dict, random_checkpoint, write_checkpoint
from models.mixtral import MixtralForCausalLM
from models.moe import MoEBlock, apply_experts, dense_moe_reference, moe_forward, moe_token_spec, route, shard_moe_block
from models.runner import CausalLM, shard_causal_lm
from models.sharding import ShardedModule, partitioned, shard_module, shard_state, state_partition_specs
from models.vocab import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "CausalLM",
    "ColumnParallelLinear",
    "KVCache",
    "LlamaForCausalLM",
    "MergedColumnParallelLinear",
    "MixtralForCausalLM",
    "ModelConfig",
    "MoEBlock",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RowParallelLinear",
    "ShardedModule",
    "VocabParallelEmbedding",
    "apply_experts",
    "dense_moe_reference",
    "from_pretrained",
    "generate",
    "generate_stream",
    "generate_with_stats",
    "load_state_dict",
    "moe_forward",
    "moe_token_spec",
    "partitioned",
    "random_checkpoint",
    "route",
    "score",
    "shard_causal_lm",
    "shard_module",
    "shard_moe_block",
    "shard_state",
    "state_partition_specs",
    "write_checkpoint",
]
