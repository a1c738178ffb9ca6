"""The main job: generate tokens with a Llama or Mixtral sharded over a TP (x EP) mesh.

    python -m models.generate                      # random tiny Llama, 8 simulated CPU devices, TP 4 x DP 2
    python -m models.generate --model mixtral      # random tiny Mixtral, TP 2 x EP 4
    python -m models.generate --check              # ... and the same on one device: exit 1 unless the tokens match
    python -m models.generate --checkpoint DIR --tp 2 --prompt 1,15043,29892
    python -m models.generate --no-custom-all-reduce

Without ``--checkpoint`` it writes a small random-weight model in the Hugging Face layout
(``config.json`` + ``model.safetensors``) to a temporary directory and loads it with
``models.from_pretrained``, the path a real checkpoint takes. On a machine without accelerators it
simulates ``--cpu-devices`` CPU devices (set before JAX starts its backend). It prints the mesh,
the tokens, and the time per phase: prefill (including the first token), per-token decode and
tokens/s, measured on a second run after a warm-up run that compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types

__all__ = ["build_parser", "main", "positive_int", "tiny_config", "token_ids"]

PROG = "python -m models.generate"


def tiny_config(model: str):
    """The random demo model: Llama 3-style (llama3 RoPE, GQA 8 heads / 2 KV heads) or a Mixtral with 8 experts."""
    from models.config import ModelConfig

    rope = (
        ("factor", 8.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 1024),
        ("rope_type", "llama3"),
    )
    common = dict(
        vocab_size=1000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=500000.0,
        rope_scaling=rope,
        max_position_embeddings=8192,
        eos_token_id=None,
    )
    if model == "mixtral":
        return ModelConfig(
            architecture="MixtralForCausalLM",
            intermediate_size=256,
            num_local_experts=8,
            num_experts_per_tok=2,
            **common,
        )
    return ModelConfig(architecture="LlamaForCausalLM", intermediate_size=512, **common)


def positive_int(text: str) -> int:
    """argparse type: a positive int (shared with ``python -m models.disagg``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def token_ids(text: str) -> list[int]:
    """argparse type: comma-separated token ids, at least one."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"expected at least one token id, got {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", choices=("llama", "mixtral"), default="llama", help="the random demo model (default llama)"
    )
    p.add_argument("--checkpoint", help="a local Hugging Face directory (LlamaForCausalLM or MixtralForCausalLM)")
    p.add_argument(
        "--tp",
        type=positive_int,
        help="tensor-parallel size (default: 4 for llama, 2 for mixtral, at most the devices)",
    )
    p.add_argument(
        "--ep", type=positive_int, help="expert-parallel size (default: mixtral: the devices left by TP; else 1)"
    )
    p.add_argument("--dp", type=positive_int, help="data-parallel size (default: the devices left)")
    p.add_argument("--no-custom-all-reduce", action="store_true", help="all-reduce with XLA's psum only")
    p.add_argument(
        "--check", action="store_true", help="also run on one device; exit 1 unless the tokens are identical"
    )
    p.add_argument("--prompt", type=token_ids, action="append", help="token ids, comma-separated (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="new tokens per prompt (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling and random-weight seed (default 0)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype (default float32)"
    )
    p.add_argument(
        "--cpu-devices", type=positive_int, default=8, help="CPU devices to simulate without accelerators (default 8)"
    )
    return p


def _start_devices(cpu_devices: int):
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", cpu_devices)  # read only by the CPU backend, when it starts
    except RuntimeError:  # the backend already started (an in-process caller): keep its devices
        pass
    return jax.devices()


def _print_mesh(mesh) -> None:
    import numpy as np

    sizes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    print(f"mesh: {sizes} on {mesh.devices.size} x {mesh.devices.flat[0].device_kind}")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    tp_groups = ids.reshape(-1, mesh.shape["tp"]).tolist()
    print(f"  TP groups (device ids): {tp_groups}")


def _run(path: str, args, dtype, prompts) -> tuple[list[list[int]], object]:
    import models

    model = models.from_pretrained(path, dtype=dtype)
    kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_token_id=model.config.eos_token_id)
    models.generate(model, prompts, args.max_new_tokens, **kw)  # warm-up: compiles prefill and decode
    return models.generate_with_stats(model, prompts, args.max_new_tokens, **kw)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    devices = _start_devices(args.cpu_devices)  # before anything else touches JAX's backend

    import jax.numpy as jnp
    import numpy as np

    import models
    import spmd

    n = len(devices)
    is_moe = args.model == "mixtral"
    tmp = None
    if args.checkpoint:
        path = args.checkpoint
        with open(os.path.join(path, "config.json")) as f:
            config = models.ModelConfig.from_hf(json.load(f))
        is_moe = config.is_moe
    else:
        config = tiny_config(args.model)
        tmp = tempfile.TemporaryDirectory(prefix="models-generate-")
        path = tmp.name
        models.write_checkpoint(path, config, models.random_checkpoint(config, seed=args.seed))
        print(
            f"random {config.architecture} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads"
            + (f", {config.num_local_experts} experts top-{config.num_experts_per_tok}" if is_moe else "")
            + f") written in the Hugging Face layout to {path}"
        )
    tp = args.tp or min(2 if is_moe else 4, n)
    ep = args.ep or (max(1, min(n // tp, config.num_local_experts)) if is_moe else 1)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    prompts = args.prompt or [rng.integers(0, config.vocab_size, k).tolist() for k in (12, 5)]

    try:
        spmd.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            data_parallel_size=args.dp,
            devices=devices[: tp * ep * args.dp] if args.dp else None,
            disable_custom_all_reduce=args.no_custom_all_reduce,
        )
        mesh = spmd.get_mesh()
        _print_mesh(mesh)
        t0 = time.perf_counter()
        tokens, stats = _run(path, args, dtype, prompts)
        print(f"loaded, compiled and ran twice in {time.perf_counter() - t0:.1f} s")
        for i, (prompt, out) in enumerate(zip(prompts, tokens, strict=True)):
            print(f"prompt {i} ({len(prompt)} tokens): {prompt}\n  -> {out}")
        print(
            f"prefill: {stats.prefill_s * 1e3:.2f} ms (batch {len(prompts)}, with the first token) | "
            f"decode: {stats.per_token_decode_s * 1e3:.2f} ms/token over {stats.decode_steps} steps | "
            f"{stats.tokens_per_s:.1f} tokens/s ({stats.new_tokens} new tokens)"
        )
        if not args.check:
            return 0
        spmd.destroy_model_parallel()
        spmd.initialize_model_parallel(devices=devices[:1], disable_custom_all_reduce=args.no_custom_all_reduce)
        single, _ = _run(path, args, dtype, prompts)
        if single != tokens:
            print(f"check FAILED: one device gave {single}", file=sys.stderr)
            return 1
        shape = " x ".join(f"{a}={k}" for a, k in mesh.shape.items() if k > 1) or "one device"
        print(f"check: the tokens on one device are identical to those on {shape}")
        return 0
    finally:
        spmd.destroy_model_parallel()
        if tmp is not None:
            tmp.cleanup()


class _GenerateModule(types.ModuleType):
    """This module, callable as :func:`models.generation.generate`.

    ``python -m models.generate`` is the main job, and ``models.generate(model, prompts, ...)`` the
    function. Importing this submodule makes Python set the attribute ``models.generate`` to it,
    hiding the function; so the module itself forwards calls to the function.
    """

    def __call__(self, *args, **kwargs):
        from models.generation import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _GenerateModule

if __name__ == "__main__":
    sys.exit(main())
