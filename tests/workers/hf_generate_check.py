"""Greedy tokens of ``models.generate`` against transformers' on a real-format checkpoint, by hand (GPU or CPU).

Not collected by pytest and not run in CI (torch and transformers are not project dependencies).
Run it where ``torch transformers safetensors`` and the project are importable (the lent GPU image)::

    python tests/workers/hf_generate_check.py --write-random-1b /tmp/ckpt1b  # a Llama-3.2-1B-shaped random checkpoint
    python tests/workers/hf_generate_check.py /tmp/ckpt1b  # 32 greedy tokens, float32, both libraries

The checkpoint holds random bf16 weights (N(0, 1/fan_in), made on the GPU if there is one) in the
Hugging Face layout, the 1B model's ``config.json`` (llama3 RoPE, tied embeddings). The check loads
it in float32 with ``AutoModelForCausalLM`` and with ``models.from_pretrained`` (TP 1), generates 32
greedy tokens from the same prompt with each, prints both and exits non-zero unless they are equal
(on a difference: our top-2 logit margin at that step, to tell a near-tie from a bug).
Recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

PROMPT = [128000, 791, 6864, 315, 9822, 374]
L, H, NH, KV, D, F, V = 16, 2048, 32, 8, 64, 8192, 128256


def write_random_1b(out: str) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": KV,
        "head_dim": D, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    }  # fmt: skip
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)

    def w(rows, cols):
        return (torch.randn(rows, cols, generator=g, device=device) * cols**-0.5).to(torch.bfloat16).cpu()

    ones = torch.ones(H, dtype=torch.bfloat16)
    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": ones}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (NH * D, H)), ("self_attn.k_proj", (KV * D, H)),
                            ("self_attn.v_proj", (KV * D, H)), ("self_attn.o_proj", (H, NH * D)),
                            ("mlp.gate_proj", (F, H)), ("mlp.up_proj", (F, H)), ("mlp.down_proj", (H, F))):  # fmt: skip
            t[f"{p}{name}.weight"] = w(*shape)
        t[p + "input_layernorm.weight"] = ones.clone()
        t[p + "post_attention_layernorm.weight"] = ones.clone()
    save_file(t, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {out}: {sum(v.numel() for v in t.values()) / 1e9:.3f} B parameters")


def check(path: str, n: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        ids = torch.tensor([PROMPT], device=device)
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(PROMPT) :].tolist()
    del hf

    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
    import models
    import spmd

    spmd.initialize_model_parallel(1, devices=None)
    model = models.from_pretrained(path, dtype=jnp.float32)
    ours = models.generate(model, [PROMPT], n)[0]
    same = sum(a == b for a, b in zip(ours, ref, strict=True))
    print(f"transformers: {ref}\nours:         {ours}\nfirst {n} greedy tokens equal: {ours == ref} ({same}/{n})")
    if ours == ref:
        return 0
    logits = np.asarray(models.score(model, [PROMPT + ref]))[0, len(PROMPT) - 1 :]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    i = next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    print(f"first difference at step {i}: our top-2 logit margin there {top2[i, 1] - top2[i, 0]:.2e}")
    return 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--write-random-1b", metavar="DIR")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    if a.write_random_1b:
        write_random_1b(a.write_random_1b)
    return check(a.checkpoint, a.tokens) if a.checkpoint else 0


if __name__ == "__main__":
    sys.exit(main())
