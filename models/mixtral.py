"""A Mixtral decoder (``MixtralForCausalLM``): Llama's attention with an MoE block on "ep" x "tp".

The feed-forward of each layer is :class:`models.moe.MoEBlock`: the router (softmax in float32,
top-k, renormalised, as transformers' ``MixtralTopKRouter``), experts stacked and split over "ep",
each expert's ``ffn`` over "tp", tokens exchanged by the all-to-all manager measured fastest on the
platform (:func:`default_moe_manager`). Tokens are split over ("dp", "ep") outside the block, the
layout the block expects.

Checkpoints in either expert layout load: the hub's (``block_sparse_moe.experts.{e}.w1/w2/w3``) and
transformers 5's fused one (``mlp.experts.gate_up_proj`` / ``down_proj``, ``mlp.gate``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, WeightSource
from models.moe import MoEBlock

__all__ = ["MixtralDecoderLayer", "MixtralForCausalLM", "MixtralModel", "default_moe_manager"]


def default_moe_manager(platform: str | None = None) -> str:
    """The all-to-all manager to use on ``platform``.

    ``naive`` (all-gather + reduce-scatter): measured fastest of the XLA-collective managers on
    GPUs (docs/expert_parallel.md: 4 and 2 x H200, every shape measured) and on CPU, where the
    others are emulated with the same collectives. On GPUs the blocks get ``low_latency`` with
    ``naive`` as its fallback: the naive path until they get peer buffers, then the Pallas kernel for
    calls of up to ``max_tokens`` tokens per rank. ``shard_causal_lm`` gives them buffers where
    :func:`spmd.expert_parallel.plan_low_latency` allows it, which needs the opt-in
    ``SPMD_EP_LOW_LATENCY=1`` until the kernel passes its GPU check (docs/expert_parallel.md).
    """
    platform = jax.default_backend() if platform is None else platform
    return "low_latency" if platform == "gpu" else "naive"


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's block with :class:`~models.moe.MoEBlock` as the feed-forward (attribute ``block_sparse_moe``)."""

    def _make_mlp(self, config: ModelConfig, *, params_dtype: Any, tp_size: int, rngs: nnx.Rngs) -> nnx.Module:
        manager = default_moe_manager()
        on_gpu = jax.default_backend() == "gpu"  # there: naive until auto_low_latency gives it buffers (opt-in)
        return MoEBlock(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            manager=manager,
            dtype=params_dtype,
            rngs=rngs,
            **({"fallback": "naive"} if manager == "low_latency" and on_gpu else {}),
        )

    def feed_forward(self, h: jax.Array) -> jax.Array:
        b, t, d = h.shape
        y, _ = self.mlp(h.reshape(b * t, d))  # naive and low_latency never drop a token
        return y.reshape(b, t, d)


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    """``MixtralForCausalLM``: as :class:`~models.llama.LlamaForCausalLM`, MoE feed-forward blocks.

    The experts' ``ffn`` splits over "tp"; the experts over "ep" (checked when the model is placed).
    """

    model_class = MixtralModel

    def __init__(self, config: ModelConfig, **kwargs: Any):
        if not config.is_moe:
            raise ValueError(f"MixtralForCausalLM: expected a MixtralForCausalLM config, got {config.architecture}.")
        super().__init__(config, **kwargs)

    def weight_sources(self, *, fused_experts: bool = False) -> Iterator[WeightSource]:
        """Every parameter and the Hugging Face tensors it is made of.

        Args:
          fused_experts: the checkpoint stores the experts fused, as transformers 5 writes them.
        """
        return self._weight_sources(fused_experts=fused_experts)

    def _mlp_sources(
        self, layer: MixtralDecoderLayer, p: str, *, fused_experts: bool = False
    ) -> Iterator[WeightSource]:
        moe, e, f = layer.mlp, self.config.num_local_experts, self.config.intermediate_size
        if fused_experts:  # transformers 5: gate_up [E, 2F, H], down [E, H, F]
            gate_up, down = (f"{p}mlp.experts.gate_up_proj",), (f"{p}mlp.experts.down_proj",)
            yield WeightSource(moe, "w_gate", gate_up, lambda loaded, i: _fused(loaded[0], i[0], i[2], i[1], 0, f))
            yield WeightSource(moe, "w_up", gate_up, lambda loaded, i: _fused(loaded[0], i[0], i[2], i[1], f, f))
            yield WeightSource(moe, "w_down", down, lambda loaded, i: _fused(loaded[0], i[0], i[2], i[1], 0, 0))
            router = f"{p}mlp.gate.weight"
        else:  # the hub's: one [out, in] matrix per expert
            x = f"{p}block_sparse_moe.experts."
            for name, src in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
                yield WeightSource(moe, name, tuple(f"{x}{j}.{src}.weight" for j in range(e)), _per_expert)
            router = f"{p}block_sparse_moe.gate.weight"
        # the router: [E, hidden] in the file, [hidden, E] float32 here, replicated
        yield WeightSource(moe, "w_router", (router,), lambda loaded, i: np.asarray(loaded[0][:]).T[i])

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig, *, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
        """Every tensor of a Hugging Face checkpoint of this config, with its shape (PyTorch layout).

        Args:
          config: the model's config.
          fused_experts: the experts fused, as transformers 5 writes them (default: the hub's layout).
        """
        return cls._checkpoint_shapes(config, fused_experts=fused_experts)

    @staticmethod
    def _mlp_shapes(config: ModelConfig, p: str, *, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        if fused_experts:
            return {
                f"{p}mlp.gate.weight": (e, h),
                f"{p}mlp.experts.gate_up_proj": (e, 2 * i, h),
                f"{p}mlp.experts.down_proj": (e, h, i),
            }
        shapes = {f"{p}block_sparse_moe.gate.weight": (e, h)}
        for j in range(e):
            x = f"{p}block_sparse_moe.experts.{j}."
            shapes[x + "w1.weight"], shapes[x + "w3.weight"], shapes[x + "w2.weight"] = (i, h), (i, h), (h, i)
        return shapes


def _per_expert(loaded, index) -> np.ndarray:
    """Per-expert ``[out, in]`` tensors -> this device's ``[experts, in, out]`` block (index ``(e, in, out)``)."""
    experts = range(*index[0].indices(len(loaded)))
    return np.stack([np.asarray(loaded[j][index[2], index[1]]).T for j in experts])


def _fused(t, experts: slice, rows: slice, cols: slice, offset: int, n: int) -> np.ndarray:
    """A fused ``[E, out, in]`` tensor -> ``[experts, in, out]``; output rows ``rows`` of the block at ``offset``."""
    if n:
        rows = slice((rows.start or 0) + offset, (rows.stop if rows.stop is not None else n) + offset)
    return np.asarray(t[experts, rows, cols]).transpose(0, 2, 1)
