"""The pieces a decoder is built from: the KV cache's type, checkpoint weight sources, RMSNorm and RoPE.

Used by :mod:`models.llama` (which re-exports the public names, as it always had them) and :mod:`models.mixtral`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.sharding import partitioned
from spmd.communicators.xla import rms_norm

__all__ = ["KVCache", "RMSNorm", "WeightSource", "apply_rotary", "rope_inv_freq"]


class KVCache(NamedTuple):
    """Per layer, keys and values ``T[batch, kv_heads, max_len, head_dim]`` (per device: this rank's heads)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


class WeightSource(NamedTuple):
    """Where one parameter comes from in a Hugging Face checkpoint.

    Attributes:
      owner: the module holding the parameter.
      name: its attribute name there.
      tensors: the checkpoint tensors it is built from, in order (e.g. q, k, v).
      shard: ``(loaded tensors, index) -> np.ndarray``: one device's shard (``index`` as
        ``jax.make_array_from_callback`` gives it).
    """

    owner: Any
    name: str
    tensors: tuple[str, ...]
    shard: Any


def _layer_source(owner: Any, name: str, tensors: tuple[str, ...]) -> WeightSource:
    return WeightSource(owner, name, tensors, lambda loaded, index: owner.weight_loader(name, loaded, index))


def _replicated_source(owner: Any, name: str, tensor: str) -> WeightSource:
    return WeightSource(owner, name, (tensor,), lambda loaded, index: np.asarray(loaded[0][index]))


# ---------------------------------------------------------------------------------------------------
# RMSNorm and RoPE


class RMSNorm(nnx.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the normalisation in float32, then cast back (as HF)."""

    def __init__(self, hidden_size: int, eps: float, *, params_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.eps = float(eps)
        init = nnx.initializers.ones
        self.weight = nnx.Param(partitioned(init, (None,))(rngs.params(), (hidden_size,), params_dtype))

    def weight_loader(self, param: str, loaded, index) -> np.ndarray:
        return np.asarray(loaded[0][index])

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies ``f32[head_dim // 2]``, with llama3 scaling when the config asks.

    llama3 (Llama 3.1+): wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` are divided by ``factor``; shorter than ``... / high_freq_factor`` are kept;
    in between, a smooth interpolation of the two.
    """
    d = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(
        np.float32
    )
    if config.rope_type == "default":
        return inv_freq
    s = dict(config.rope_scaling)
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x: T[..., tokens, heads, head_dim]`` by ``positions: int[..., tokens]`` (HF's rotate-half).

    ``cos``/``sin`` are computed in float32 and cast to ``x``'s dtype, as transformers does.
    """
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., tokens, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., tokens, 1, d]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
