"""A Llama decoder (``LlamaForCausalLM``) as per-device math over the "tp" axis, with a KV cache.

Matches Hugging Face transformers' ``modeling_llama.py``: RMSNorm in float32 then cast (the weight
applied after the cast), RoPE in the rotate-half convention (``rope_type`` ``default`` and
``llama3``), GQA attention with the heads split over "tp" (:class:`~models.layers.QKVParallelLinear`),
SwiGLU MLP (:class:`~models.layers.MergedColumnParallelLinear` + :class:`~models.layers.RowParallelLinear`).

Three entry points, all per-device (run them inside ``shard_map``; :mod:`models.runner` does):

* ``model(input_ids, positions)``: logits for every position (scoring);
* ``model.prefill(input_ids, lengths, max_len)``: the last prompt position's logits and a new KV cache;
* ``model.decode(tokens, positions, cache)``: one token per sequence against the cache.

The KV cache (:class:`KVCache`) is one ``[batch, kv_heads, max_len, head_dim]`` array per layer for
keys and one for values: heads outermost after the batch, so a KV transfer can split it by heads;
sharded over "tp" on the KV-head axis (when tp exceeds the KV heads, each rank holds its copy of
its head, and the global axis has ``tp`` entries).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import spmd
from models import decode_kernels
from models.blocks import KVCache, RMSNorm, WeightSource, _layer_source, apply_rotary, rope_inv_freq
from models.config import ModelConfig
from models.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, resolve_tp_size
from models.vocab import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "KVCache",
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "WeightSource",
    "apply_rotary",
    "rope_inv_freq",
]


# ---------------------------------------------------------------------------------------------------
# Attention and MLP


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention: ``q [B, T, H, d]``, ``k, v [B, KV, S, d]``, ``mask bool[B, T, S]`` -> ``[B, T, H * d]``."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # as transformers: probabilities in the model dtype
    # output in v's dtype (accumulated in float32 by the backends); XLA:CPU has no bf16 x bf16 -> f32 batched dot
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v).astype(q.dtype)
    return out.reshape(b, t, h * d)


class LlamaAttention(nnx.Module):
    """Self-attention with the heads split over "tp": fused QKV, RoPE, GQA, row-parallel output."""

    def __init__(self, config: ModelConfig, *, params_dtype: Any, tp_size: int, rngs: nnx.Rngs):
        c = config
        kw = dict(params_dtype=params_dtype, tp_size=tp_size, rngs=rngs, return_bias=False)
        self.qkv_proj = QKVParallelLinear(
            c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, bias=c.attention_bias, **kw
        )
        self.o_proj = RowParallelLinear(
            c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias, input_is_parallel=True, **kw
        )
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(c))

    def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = self.qkv_proj.split_output(self.qkv_proj(x))  # [B, T, heads, d]
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        return apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq), v

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Causal attention over ``x: T[B, T, hidden]``; returns the output and this rank's ``k, v [B, KV, T, d]``."""
        q, k, v = self._qkv(x, positions)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        t = x.shape[1]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (x.shape[0], t, t))
        return self.o_proj(_attend(q, k, v, mask)), k, v

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        *,
        reduce: bool = True,
        split_k: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One token per sequence: ``x: T[B, 1, hidden]`` at ``positions: int[B]``; writes it into the cache.

        ``reduce=False`` returns the output projection's partial sums (no all-reduce, no bias), for
        a caller that fuses the reduction with what follows; with ``split_k=True`` as float32
        ``[P, B, hidden]`` split-K partials (:meth:`RowParallelLinear.partial`).
        """

        def project(out):  # out: [B, 1, heads * d]
            if reduce:
                return self.o_proj(out)
            return self.o_proj.partial(out[:, 0], split_k=True) if split_k else self.o_proj.partial(out)

        qkv = self.qkv_proj
        kernel = qkv.bias is None and decode_kernels.decode_attention_mode(
            qkv.num_heads, qkv.num_kv_heads, qkv.head_size, k_cache.shape[2], k_cache.dtype
        )
        if kernel:  # RoPE, the cache write and the attention in one kernel that reads the projection's partials
            partials = qkv.partials(x[:, 0])  # f32[P, B, (heads + 2 kv) * d]
            p, b, _ = partials.shape
            partials = partials.reshape(p, b, qkv.num_heads + 2 * qkv.num_kv_heads, qkv.head_size)
            inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
            out, k_cache, v_cache = decode_kernels.decode_attention(
                partials, k_cache, v_cache, positions, inv_freq, heads=qkv.num_heads
            )
            return project(out.reshape(b, 1, -1).astype(x.dtype)), k_cache, v_cache
        q, k, v = self._qkv(x, positions[:, None])

        def write(cache, new, pos):  # cache [KV, S, d], new [1, KV, d]
            return lax.dynamic_update_slice(cache, new.transpose(1, 0, 2).astype(cache.dtype), (0, pos, 0))

        k_cache = jax.vmap(write)(k_cache, k, positions)
        v_cache = jax.vmap(write)(v_cache, v, positions)
        mask = (jnp.arange(k_cache.shape[2])[None, :] <= positions[:, None])[:, None, :]  # [B, 1, S]
        return project(_attend(q, k_cache, v_cache, mask)), k_cache, v_cache


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate/up column-parallel (merged), down row-parallel."""

    def __init__(self, config: ModelConfig, *, params_dtype: Any, tp_size: int, rngs: nnx.Rngs):
        c = config
        kw = dict(params_dtype=params_dtype, tp_size=tp_size, rngs=rngs, return_bias=False)
        self.gate_up_proj = MergedColumnParallelLinear(c.hidden_size, [c.intermediate_size] * 2, bias=c.mlp_bias, **kw)
        self.down_proj = RowParallelLinear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gate_up_proj.split_output(self.gate_up_proj(x))
        return self.down_proj(jax.nn.silu(gate) * up)

    def partials(self, x: jax.Array) -> jax.Array:
        """``T[B, hidden] -> f32[P, B, hidden]``: the down projection's split-K partials, unreduced (TP 1).

        Where the decode kernels' table chooses it, the activation is built inside the down projection's
        GEMV from the gate/up projection's own partials (:func:`decode_kernels.swiglu_matmul_partials`)."""
        w = self.down_proj.weight[...]
        fusable = self.gate_up_proj.bias is None and self.down_proj.bias is None and self.down_proj.tp_size == 1
        if fusable and decode_kernels.choose_gemv(x.shape[0], *w.shape, w.dtype, prologue="swiglu") is not None:
            return decode_kernels.swiglu_matmul_partials(self.gate_up_proj.partials(x), w)
        gate, up = self.gate_up_proj.split_output(self.gate_up_proj(x))
        return self.down_proj.partial(jax.nn.silu(gate) * up, split_k=True)


# ---------------------------------------------------------------------------------------------------
# The decoder


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, *, params_dtype: Any, tp_size: int, rngs: nnx.Rngs):
        kw = dict(params_dtype=params_dtype, tp_size=tp_size, rngs=rngs)
        self.self_attn = LlamaAttention(config, **kw)
        self.mlp = self._make_mlp(config, **kw)
        norm = dict(params_dtype=params_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)

    def _make_mlp(self, config: ModelConfig, **kw: Any) -> nnx.Module:
        return LlamaMLP(config, **kw)

    def feed_forward(self, h: jax.Array) -> jax.Array:
        """The MLP on ``T[B, T, hidden]``."""
        return self.mlp(h)

    def __call__(self, x, positions):
        h, k, v = self.self_attn(self.input_layernorm(x), positions)
        h = x + h
        return h + self.feed_forward(self.post_attention_layernorm(h)), k, v

    def decode(self, x, positions, k_cache, v_cache):
        """One decode step. Without an attention bias, the output projection's all-reduce, the residual
        add and the post-attention norm are one call (:func:`spmd.tensor_model_parallel_all_reduce_add_rms_norm`:
        one kernel on GPUs with the custom all-reduce, the same three steps and bits elsewhere)."""
        a = self.input_layernorm(x)
        if self.self_attn.o_proj.bias is not None:
            h, k_cache, v_cache = self.self_attn.decode(a, positions, k_cache, v_cache)
            h = x + h
            return h + self.feed_forward(self.post_attention_layernorm(h)), k_cache, v_cache
        partial, k_cache, v_cache = self.self_attn.decode(a, positions, k_cache, v_cache, reduce=False)
        norm = self.post_attention_layernorm
        normed, h = spmd.tensor_model_parallel_all_reduce_add_rms_norm(partial, x, norm.weight[...], norm.eps)
        return h + self.feed_forward(normed), k_cache, v_cache

    def keeps_residual_unreduced(self) -> bool:
        """Whether :meth:`decode_unreduced` applies: TP 1 and no bias on the projections into the residual."""
        attn, mlp = self.self_attn, self.mlp
        if attn.o_proj.tp_size != 1 or attn.o_proj.bias is not None:
            return False
        return not isinstance(mlp, LlamaMLP) or mlp.down_proj.bias is None

    def decode_unreduced(self, x, delta, positions, k_cache, v_cache):
        """One decode step on a residual stream kept as ``x + sum_p delta[p]`` (:meth:`keeps_residual_unreduced`).

        The residual add and each norm are one call (:func:`models.decode_kernels.add_rms_norm`: one
        kernel on GPUs) that reads the projections' split-K partials, so nothing runs between a
        projection and the norm after it.

        Args:
          x: ``T[B, 1, hidden]``: the residual stream.
          delta: ``[P, B, hidden]`` partials still to add to it, or ``None``.

        Returns:
          ``(h T[B, 1, hidden], delta' [P', B, hidden], k_cache, v_cache)``: the block's output is ``h + sum(delta')``.
        """
        if delta is None:
            a, h = self.input_layernorm(x), x[:, 0]
        else:
            a, h = self._add_norm(self.input_layernorm, delta, x[:, 0])
            a = a[:, None]
        partials, k_cache, v_cache = self.self_attn.decode(
            a, positions, k_cache, v_cache, reduce=False, split_k=True
        )  # fmt: skip
        normed, h = self._add_norm(self.post_attention_layernorm, partials, h)
        if type(self).feed_forward is LlamaDecoderLayer.feed_forward and isinstance(self.mlp, LlamaMLP):
            delta = self.mlp.partials(normed)
        else:
            delta = self.feed_forward(normed[:, None])[:, 0][None]
        return h[:, None], delta, k_cache, v_cache

    @staticmethod
    def _add_norm(norm: RMSNorm, delta: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        return decode_kernels.add_rms_norm(delta, residual, norm.weight[...], norm.eps)


class LlamaModel(nnx.Module):
    """Embedding, decoder layers, final norm."""

    layer_class = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, *, params_dtype: Any, tp_size: int, rngs: nnx.Rngs):
        kw = dict(params_dtype=params_dtype, tp_size=tp_size, rngs=rngs)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List([self.layer_class(config, **kw) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, params_dtype=params_dtype, rngs=rngs)


class LlamaForCausalLM(nnx.Module):
    """``LlamaForCausalLM``: the decoder and the LM head (tied to the embedding when the config says so).

    Args:
      config: the model's :class:`~models.config.ModelConfig`.
      params_dtype: the parameters' (and activations') dtype.
      tp_size: the TP size the layout is for (default: the initialized TP group's, else 1).
      rngs: ``nnx.Rngs`` (random weights; :func:`models.from_pretrained` loads real ones).

    Raises:
      ValueError: the config does not split over ``tp_size`` (naming the sizes that would).
    """

    model_class = LlamaModel

    def __init__(
        self, config: ModelConfig, *, params_dtype: Any = jnp.float32, tp_size: int | None = None, rngs: nnx.Rngs
    ):
        tp_size = resolve_tp_size(tp_size)
        config.check_parallel(tp_size)
        self.config = config
        self.dtype = jnp.dtype(params_dtype)
        self.model = self.model_class(config, params_dtype=params_dtype, tp_size=tp_size, rngs=rngs)
        lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, params_dtype=params_dtype, tp_size=tp_size, rngs=rngs
        )
        self.lm_head = lm_head.tie_weights(self.model.embed_tokens) if config.tie_word_embeddings else lm_head

    # forward ---------------------------------------------------------------------------------------

    def _layers(self, x, positions):
        keys, values = [], []
        for layer in self.model.layers:
            x, k, v = layer(x, positions)
            keys.append(k)
            values.append(v)
        return self.model.norm(x), keys, values

    def __call__(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """``int32[B, T]`` token ids at ``positions int32[B, T]`` -> ``f32[B, T, vocab]`` (causal)."""
        h, _, _ = self._layers(self.model.embed_tokens(input_ids), positions)
        return self.lm_head.compute_logits(h)

    def prefill(self, input_ids: jax.Array, lengths: jax.Array, max_len: int) -> tuple[jax.Array, KVCache]:
        """Run right-padded prompts ``int32[B, T]`` (``lengths int32[B]``) and build a cache of ``max_len``.

        Returns:
          ``(f32[B, vocab] logits at each prompt's last token, the KV cache)``.
        """
        b, t = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h, keys, values = self._layers(self.model.embed_tokens(input_ids), positions)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        logits = self.lm_head.compute_logits(last)

        def cache(x):
            full = jnp.zeros((*x.shape[:2], max_len, x.shape[3]), self.dtype)
            return lax.dynamic_update_slice(full, x.astype(self.dtype), (0, 0, 0, 0))

        return logits, KVCache(tuple(map(cache, keys)), tuple(map(cache, values)))

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per sequence, ``int32[B]`` at ``positions int32[B]`` -> ``(f32[B, vocab], new cache)``."""
        x = self.model.embed_tokens(tokens[:, None])
        keys, values = [], []
        layers = self.model.layers
        if all(layer.keeps_residual_unreduced() for layer in layers):  # TP 1: adds + norms fused
            delta = None
            for layer, k, v in zip(layers, cache.keys, cache.values, strict=True):
                x, delta, k, v = layer.decode_unreduced(x, delta, positions, k, v)
                keys.append(k)
                values.append(v)
            norm = self.model.norm
            h = decode_kernels.add_rms_norm(delta, x[:, 0], norm.weight[...], norm.eps)[0]
        else:
            for layer, k, v in zip(layers, cache.keys, cache.values, strict=True):
                x, k, v = layer.decode(x, positions, k, v)
                keys.append(k)
                values.append(v)
            h = self.model.norm(x)[:, 0]
        return self.lm_head.compute_logits(h), KVCache(tuple(keys), tuple(values))

    def cache_shape(self, batch: int, max_len: int) -> tuple[int, int, int, int]:
        """The global shape of one layer's key (or value) cache: ``[batch, kv_heads, max_len, head_dim]``."""
        qkv = self.model.layers[0].self_attn.qkv_proj
        return (batch, qkv.num_kv_heads * qkv.tp_size, max_len, self.config.head_dim)

    # checkpoint ------------------------------------------------------------------------------------

    def weight_sources(self) -> Iterator[WeightSource]:
        """Every parameter and the Hugging Face tensors it is made of."""
        return self._weight_sources()

    def _weight_sources(self, **mlp_options: Any) -> Iterator[WeightSource]:
        """:meth:`weight_sources`, the feed-forward's from :meth:`_mlp_sources` (``mlp_options`` passed on)."""
        c = self.config
        yield _layer_source(self.model.embed_tokens, "weight", ("model.embed_tokens.weight",))
        for i, layer in enumerate(self.model.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            yield _layer_source(attn.qkv_proj, "weight", tuple(f"{p}self_attn.{n}_proj.weight" for n in "qkv"))
            yield _layer_source(attn.o_proj, "weight", (f"{p}self_attn.o_proj.weight",))
            if c.attention_bias:
                yield _layer_source(attn.qkv_proj, "bias", tuple(f"{p}self_attn.{n}_proj.bias" for n in "qkv"))
                yield _layer_source(attn.o_proj, "bias", (f"{p}self_attn.o_proj.bias",))
            yield _layer_source(layer.input_layernorm, "weight", (f"{p}input_layernorm.weight",))
            yield _layer_source(layer.post_attention_layernorm, "weight", (f"{p}post_attention_layernorm.weight",))
            yield from self._mlp_sources(layer, p, **mlp_options)
        yield _layer_source(self.model.norm, "weight", ("model.norm.weight",))
        if not c.tie_word_embeddings:
            yield _layer_source(self.lm_head, "weight", ("lm_head.weight",))

    def _mlp_sources(self, layer: LlamaDecoderLayer, p: str) -> Iterator[WeightSource]:
        """The feed-forward's parameters of the layer whose tensors start with ``p`` (subclasses override)."""
        mlp = layer.mlp
        names = ("gate", "up")
        yield _layer_source(mlp.gate_up_proj, "weight", tuple(f"{p}mlp.{n}_proj.weight" for n in names))
        yield _layer_source(mlp.down_proj, "weight", (f"{p}mlp.down_proj.weight",))
        if self.config.mlp_bias:
            yield _layer_source(mlp.gate_up_proj, "bias", tuple(f"{p}mlp.{n}_proj.bias" for n in names))
            yield _layer_source(mlp.down_proj, "bias", (f"{p}mlp.down_proj.bias",))

    @classmethod
    def checkpoint_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor of a Hugging Face checkpoint of this config, with its shape (PyTorch layout)."""
        return cls._checkpoint_shapes(config)

    @classmethod
    def _checkpoint_shapes(cls, config: ModelConfig, **mlp_options: Any) -> dict[str, tuple[int, ...]]:
        """:meth:`checkpoint_shapes`, the feed-forward's from :meth:`_mlp_shapes` (``mlp_options`` passed on)."""
        c = config
        h, d = c.hidden_size, c.head_dim
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, h)
                if c.attention_bias:
                    shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
            shapes[f"{p}self_attn.o_proj.weight"] = (h, q)
            if c.attention_bias:
                shapes[f"{p}self_attn.o_proj.bias"] = (h,)
            shapes[f"{p}input_layernorm.weight"] = (h,)
            shapes[f"{p}post_attention_layernorm.weight"] = (h,)
            shapes.update(cls._mlp_shapes(config, p, **mlp_options))
        shapes["model.norm.weight"] = (h,)
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        return shapes

    @staticmethod
    def _mlp_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        """The feed-forward's tensors of the layer whose names start with ``p`` (subclasses override)."""
        h, i = config.hidden_size, config.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {}
        for name in ("gate", "up"):
            shapes[f"{p}mlp.{name}_proj.weight"] = (i, h)
            if config.mlp_bias:
                shapes[f"{p}mlp.{name}_proj.bias"] = (i,)
        shapes[f"{p}mlp.down_proj.weight"] = (h, i)
        if config.mlp_bias:
            shapes[f"{p}mlp.down_proj.bias"] = (h,)
        return shapes
