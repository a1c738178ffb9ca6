"""An independent numpy (float64) forward pass of Hugging Face Llama and Mixtral checkpoints.

Shares no code with ``models``: it reads the ``config.json`` dict itself (both RoPE styles), and
writes RMSNorm, RoPE (Meta's per-frequency llama3 scaling, the rotation as pairs ``(x1, x2)``), GQA
attention with a causal mask, SwiGLU and Mixtral's router (softmax, top-k, renormalise) in plain
loops and matrix products. ``tests/workers/hf_reference_check.py`` checks it against transformers itself
(results in docs/models.md); the tests check ``models`` against it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["forward", "greedy", "inv_freq"]


def _rope_params(cfg: dict) -> tuple[float, dict]:
    params = dict(cfg.get("rope_parameters") or {})
    if params:
        return float(params.get("rope_theta", 10000.0)), params
    scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling:
        scaling["rope_type"] = scaling["type"]
    return float(cfg.get("rope_theta", 10000.0)), scaling


def inv_freq(cfg: dict) -> np.ndarray:
    """float64[head_dim // 2], llama3 scaling applied per frequency as in Meta's reference code."""
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta, params = _rope_params(cfg)
    freqs = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]
    if params.get("rope_type", "default") == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:
                scaled.append(f)
            elif wavelen > old / low:
                scaled.append(f / factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        freqs = scaled
    return np.array(freqs, np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, positions, freqs):  # x [T, heads, d]
    half = x.shape[-1] // 2
    angle = positions[:, None, None] * freqs[None, None, :]
    c, s = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _silu(x):
    return x / (1 + np.exp(-x))


def _linear(x, w, name, bias=False):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if bias else y


def forward(cfg: dict, weights: dict, ids) -> np.ndarray:
    """float64[tokens, vocab] logits of one sequence ``ids`` at positions ``0..tokens-1``."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    nh, h = cfg["num_attention_heads"], cfg["hidden_size"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or h // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    ab, mb = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    ids = np.asarray(ids)
    t = len(ids)
    positions = np.arange(t, dtype=np.float64)
    freqs = inv_freq(cfg)
    x = w["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((t, t), bool))
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        a = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _rope(_linear(a, w, p + "self_attn.q_proj", ab).reshape(t, nh, d), positions, freqs)
        k = _rope(_linear(a, w, p + "self_attn.k_proj", ab).reshape(t, nkv, d), positions, freqs)
        v = _linear(a, w, p + "self_attn.v_proj", ab).reshape(t, nkv, d)
        heads = []
        for j in range(nh):
            kv = j // (nh // nkv)
            s = q[:, j] @ k[:, kv].T / math.sqrt(d)
            s = np.where(causal, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            heads.append((e / e.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + _linear(np.concatenate(heads, axis=-1), w, p + "self_attn.o_proj", ab)
        m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if "num_local_experts" in cfg:
            x = x + _moe(cfg, w, p + "block_sparse_moe.", m)
        else:
            g = _silu(_linear(m, w, p + "mlp.gate_proj", mb)) * _linear(m, w, p + "mlp.up_proj", mb)
            x = x + _linear(g, w, p + "mlp.down_proj", mb)
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def _moe(cfg, w, p, x):
    k = cfg["num_experts_per_tok"]
    logits = x @ w[p + "gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-probs[t], kind="stable")[:k]
        weights = probs[t, top] / probs[t, top].sum()
        for e, wt in zip(top, weights, strict=True):
            ex = f"{p}experts.{e}."
            y = _silu(x[t] @ w[ex + "w1.weight"].T) * (x[t] @ w[ex + "w3.weight"].T)
            out[t] += wt * (y @ w[ex + "w2.weight"].T)
    return out


def greedy(cfg: dict, weights: dict, prompt, n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens by recomputing the whole sequence each step, and each step's top-2 logit margin."""
    ids, margins = list(prompt), []
    for _ in range(n):
        logits = forward(cfg, weights, ids)[-1]
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :], margins
