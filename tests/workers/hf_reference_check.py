"""Check the numpy reference (tests/np_reference.py) against Hugging Face transformers, by hand.

Not collected by pytest and not run in CI (transformers and torch are not project dependencies).
Run it in a virtualenv that has ``torch transformers safetensors numpy``::

    python tests/workers/hf_reference_check.py

It writes tiny random checkpoints (Llama: default RoPE in the hub's config style, llama3 RoPE in
transformers 5's style with tied embeddings, attention / MLP biases with an explicit head_dim;
Mixtral in the hub's expert layout), loads each with ``AutoModelForCausalLM.from_pretrained`` in
float32, and prints the largest logit difference from the float64 numpy reference and whether 16
greedy tokens agree. Exits non-zero when a difference exceeds 1e-4 or tokens differ. The results
are recorded in docs/models.md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import np_reference

BASE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "torch_dtype": "float32",
}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 2048,
}
CASES = {
    "llama, default RoPE, hub config": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "llama, llama3 RoPE, transformers 5 config, tied": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_parameters": {**LLAMA3, "rope_theta": 10000.0},
        "tie_word_embeddings": True,
    },
    "llama, biases, head_dim 16, llama3 hub config": {
        **BASE,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": 16,
        "attention_bias": True,
        "mlp_bias": True,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3,
        "tie_word_embeddings": False,
    },
    "mixtral, 4 experts top-2, hub layout": {
        **BASE,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // nh
    ab, mb = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, rows in (("q", nh * d), ("k", nkv * d), ("v", nkv * d)):
            out[f"{p}self_attn.{name}_proj.weight"] = (rows, h)
            if ab:
                out[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        out[f"{p}self_attn.o_proj.weight"] = (h, nh * d)
        if ab:
            out[f"{p}self_attn.o_proj.bias"] = (h,)
        out[f"{p}input_layernorm.weight"] = out[f"{p}post_attention_layernorm.weight"] = (h,)
        if "num_local_experts" in cfg:
            out[f"{p}block_sparse_moe.gate.weight"] = (cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                x = f"{p}block_sparse_moe.experts.{e}."
                out[x + "w1.weight"], out[x + "w3.weight"], out[x + "w2.weight"] = (i, h), (i, h), (h, i)
        else:
            out[f"{p}mlp.gate_proj.weight"] = out[f"{p}mlp.up_proj.weight"] = (i, h)
            out[f"{p}mlp.down_proj.weight"] = (h, i)
            if mb:
                out[f"{p}mlp.gate_proj.bias"] = out[f"{p}mlp.up_proj.bias"] = (i,)
                out[f"{p}mlp.down_proj.bias"] = (h,)
    return out


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            a = rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        w[name] = a.astype(np.float32)
    return w


def main() -> int:
    import torch
    import transformers
    from safetensors.numpy import save_file

    torch.manual_seed(0)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    worst, ok = 0.0, True
    for seed, (name, cfg) in enumerate(CASES.items()):
        weights = random_weights(cfg, seed)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(cfg, f)
            save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
            model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        model.eval()
        ids = rng.integers(0, cfg["vocab_size"], (2, 24))
        with torch.no_grad():
            hf = model(torch.tensor(ids)).logits.double().numpy()
            hf_tokens = model.generate(
                torch.tensor(ids[:1, :7]), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
            )[0, 7:].tolist()
        ref = np.stack([np_reference.forward(cfg, weights, row) for row in ids])
        diff = float(np.abs(hf - ref).max())
        ref_tokens, _ = np_reference.greedy(cfg, weights, ids[0, :7], 16)
        same = hf_tokens == ref_tokens
        worst = max(worst, diff)
        ok &= diff < 1e-4 and same
        print(f"{name}: max |logits(HF) - logits(numpy)| = {diff:.2e}; 16 greedy tokens equal: {same}")
    print(f"worst difference {worst:.2e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
