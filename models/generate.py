"""The main job: generate tokens with a Llama or Mixtral sharded over a TP (x EP) mesh.

    python -m models.generate                      # random tiny Llama, 8 simulated CPU devices, TP 4 x DP 2
    python -m models.generate --model mixtral      # random tiny Mixtral, TP 2 x EP 4
    python -m models.generate --check              # ... and the same on one device: exit 1 unless the tokens match
    python -m models.generate --checkpoint DIR --tp 2 --prompt 1,15043,29892
    python -m models.generate --checkpoint DIR --text "The capital of France is"     # DIR has tokenizer.json
    python -m models.generate --checkpoint DIR --chat --text "What is the capital of France?"
    python -m models.generate --no-custom-all-reduce

Without ``--checkpoint`` it writes a small random-weight model in the Hugging Face layout
(``config.json`` + ``model.safetensors``) to a temporary directory and loads it with
``models.from_pretrained``, the path a real checkpoint takes. On a machine without accelerators it
simulates ``--cpu-devices`` CPU devices (set before JAX starts its backend). It prints the mesh,
the tokens, and the time per phase: prefill (including the first token), per-token decode and
tokens/s, measured on a second run after a warm-up run that compiles. With ``--text`` (the checkpoint's
``tokenizer.json``, read with the ``tokenizers`` package: ``pip install -e '.[text]'``) it encodes the
prompts and prints the new tokens as text too; ``--chat`` renders each ``--text`` as a user message
with the checkpoint's chat template (jinja2) first.

``--check`` runs the same prompts again on another layout and exits 1 unless the tokens are
identical: on one device when the run used several; when the run used ONE device, on TP (x EP)
over this machine's CPU devices (``jax.devices("cpu")``, ``--cpu-devices`` of them, beside an
accelerator); when no such layout exists (one CPU device), it says that no TP check was possible
and exits 1. Exit codes: 0 ok, 1 the check failed or was impossible, 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types

from models.cli import positive_int, token_ids

__all__ = ["build_parser", "main", "mesh_problem", "positive_int", "tiny_config", "token_ids"]

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
        "--check",
        action="store_true",
        help="also run on one device (or, after a one-device run, on TP over CPU devices); exit 1 unless the "
        "tokens are identical",
    )
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt", type=token_ids, action="append", help="token ids, comma-separated (repeat for a batch)"
    )
    prompts.add_argument(
        "--text", action="append", help="a prompt as text (repeat for a batch; needs tokenizer.json in --checkpoint)"
    )
    p.add_argument(
        "--chat", action="store_true", help="render each --text as a user message with the checkpoint's chat template"
    )
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


class _UsageError(Exception):
    """Bad arguments or a bad checkpoint: one line on stderr, exit 2."""


def _fits(tp: int, ep: int, dp: int | None, n: int) -> bool:
    """Whether a TP x EP (x DP) mesh fits ``n`` devices (without ``dp``: tp x ep must divide them)."""
    return tp * ep * (dp or 1) <= n and (dp is not None or n % (tp * ep) == 0)


def mesh_problem(config, tp: int, ep: int, dp: int | None, n: int) -> str | None:
    """Why ``--tp`` / ``--ep`` / ``--dp`` do not fit ``config`` on ``n`` devices (and the TP sizes that do), or None."""
    problems = config.parallel_problems(tp, ep)
    if not _fits(tp, ep, dp, n):
        if dp is None:
            problems.append(f"tp x ep = {tp * ep} does not divide the {n} devices (pass --dp to use fewer of them)")
        else:
            problems.append(f"tp x ep x dp = {tp * ep * dp} is more than the {n} devices")
    if not problems:
        return None
    fit = [t for t in config.working_tp_sizes() if _fits(t, ep, dp, n) and not config.parallel_problems(t, ep)]
    flags = f"--tp {tp}" + (f" --ep {ep}" if config.is_moe else "") + (f" --dp {dp}" if dp else "")
    where = f"{n} devices" + (f" with --ep {ep}" if config.is_moe else "") + (f" --dp {dp}" if dp else "")
    return f"{flags}: {'; '.join(problems)}. TP sizes that fit {config.architecture} on {where}: {fit}"


def _read_config(path: str):
    from models.loading import read_config

    try:
        return read_config(path, op="--checkpoint")
    except (OSError, ValueError) as e:
        raise _UsageError(str(e)) from None


def _text_prompts(args, path: str, vocab_size: int):
    """The tokenizer of ``path`` and the ``--text`` prompts as token ids (``--chat``: through the chat template)."""
    from models.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(path)
        prompts = [
            tokenizer.encode_chat([{"role": "user", "content": t}]) if args.chat else tokenizer.encode(t)
            for t in args.text
        ]
    except FileNotFoundError:
        raise _UsageError(f"--text: no tokenizer.json in {path}; pass token ids with --prompt instead") from None
    except (ImportError, ValueError) as e:
        raise _UsageError(f"--text: {e}") from None
    for text, ids in zip(args.text, prompts, strict=True):
        if not ids:
            raise _UsageError(f"--text {text!r} encodes to no tokens")
        if max(ids) >= vocab_size:
            raise _UsageError(
                f"--text {text!r} encodes to id {max(ids)}, outside the model's vocabulary of {vocab_size} "
                "(tokenizer.json does not belong to this checkpoint)"
            )
    return tokenizer, prompts


def _run(path: str, args, dtype, prompts, eos) -> tuple[list[list[int]], object]:
    import models

    try:
        model = models.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise _UsageError(f"--checkpoint: {e}") from None
    kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_token_id=list(eos) or None)
    models.generate(model, prompts, args.max_new_tokens, **kw)  # warm-up: compiles prefill and decode
    return models.generate_with_stats(model, prompts, args.max_new_tokens, **kw)


def _check_layout(config, mesh, devices) -> tuple[list, int, int] | None:
    """Devices, TP and EP of the layout ``--check`` compares with; ``None`` when there is none.

    After a run on several devices: one device. After a run on ONE device (comparing it with itself
    would check nothing): the largest TP (x EP) the model splits over on this machine's CPU devices.
    """
    import jax

    if mesh.devices.size > 1:
        return devices[:1], 1, 1
    try:
        cpus = jax.devices("cpu")
    except RuntimeError:  # JAX_PLATFORMS without cpu
        cpus = []
    eps = [e for e in range(1, config.num_local_experts + 1) if config.num_local_experts % e == 0] or [1]
    layouts = [
        (t * e, t, e)
        for t in config.working_tp_sizes()
        for e in eps
        if 1 < t * e <= len(cpus) and not config.parallel_problems(t, e)
    ]
    if not layouts:
        return None
    _, t, e = max(layouts)
    return cpus[: t * e], t, e


def _check(path, args, dtype, prompts, eos, tokens, mesh, devices, config) -> int:
    import spmd

    shape = " x ".join(f"{a}={k}" for a, k in mesh.shape.items() if k > 1) or "one device"
    layout = _check_layout(config, mesh, devices)
    if layout is None:
        print(
            f"check IMPOSSIBLE: this run used one {mesh.devices.flat[0].platform} device and there is no second "
            "device (nor CPU devices enough for a TP run of this model): no TP check was possible. Run on more "
            "devices (on a CPU-only machine: --cpu-devices 2 or more).",
            file=sys.stderr,
        )
        return 1
    on, tp, ep = layout
    spmd.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        devices=on,
        disable_custom_all_reduce=args.no_custom_all_reduce,
    )
    other, _ = _run(path, args, dtype, prompts, eos)
    if mesh.devices.size > 1:
        there, here = "one device", shape
    else:
        there = " x ".join(f"{a}={k}" for a, k in (("tp", tp), ("ep", ep)) if k > 1) + f" over {len(on)} CPU devices"
        here = f"one {mesh.devices.flat[0].platform} device"
    if other != tokens:
        platform = mesh.devices.flat[0].platform
        note = "" if platform == on[0].platform else f" (the run was on {platform}: its numerics can flip a near-tie)"
        print(f"check FAILED: {there} gave {other}{note}", file=sys.stderr)
        return 1
    print(f"check: the tokens on {there} are identical to those on {here}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chat and not args.text:
        parser.error("--chat renders --text prompts with the checkpoint's chat template: pass --text too")
    if args.text and not args.checkpoint:
        parser.error(
            "--text needs a checkpoint with tokenizer.json: pass --checkpoint DIR (or token ids with --prompt)"
        )
    try:
        return _main(parser, args)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    devices = _start_devices(args.cpu_devices)  # before anything else touches JAX's backend

    import jax.numpy as jnp
    import numpy as np

    import models
    import spmd
    from models.tokenizer import generation_eos_token_ids

    n = len(devices)
    tmp = tokenizer = None
    if args.checkpoint:
        path = args.checkpoint
        config = _read_config(path)
        try:
            eos = tuple(dict.fromkeys((*config.eos_token_ids, *generation_eos_token_ids(path))))
        except ValueError as e:
            raise _UsageError(f"--checkpoint: {e}") from None
    else:
        config, eos = tiny_config(args.model), ()
    is_moe = config.is_moe
    cap = min(2 if is_moe else 4, n)
    tp = args.tp or max([t for t in config.working_tp_sizes() if t <= cap and _fits(t, 1, args.dp, n)] or [1])
    ep = args.ep or (max(1, min(n // tp, config.num_local_experts)) if is_moe else 1)
    problem = mesh_problem(config, tp, ep, args.dp, n)
    if problem:
        parser.error(problem)  # exit 2, before any checkpoint is written or loaded
    if args.text:
        tokenizer, prompts = _text_prompts(args, path, config.vocab_size)
    else:
        rng = np.random.default_rng(args.seed)
        prompts = args.prompt or [rng.integers(0, config.vocab_size, k).tolist() for k in (12, 5)]
    if not args.checkpoint:
        tmp = tempfile.TemporaryDirectory(prefix="models-generate-")
        path = tmp.name
        models.write_checkpoint(path, config, models.random_checkpoint(config, seed=args.seed))
        print(
            f"random {config.architecture} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads / {config.num_key_value_heads} KV heads"
            + (f", {config.num_local_experts} experts top-{config.num_experts_per_tok}" if is_moe else "")
            + f") written in the Hugging Face layout to {path}"
        )
    dtype = jnp.dtype(args.dtype)

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
        tokens, stats = _run(path, args, dtype, prompts, eos)
        print(f"loaded, compiled and ran twice in {time.perf_counter() - t0:.1f} s")
        for i, (prompt, out) in enumerate(zip(prompts, tokens, strict=True)):
            print(f"prompt {i} ({len(prompt)} tokens): {prompt}\n  -> {out}")
            if tokenizer is not None:
                text = tokenizer.decode(prompt, skip_special_tokens=False)
                print(f"  prompt text: {json.dumps(text, ensure_ascii=False)}")
                print(f"  output text: {json.dumps(tokenizer.decode(out), ensure_ascii=False)}")
        print(
            f"prefill: {stats.prefill_s * 1e3:.2f} ms (batch {len(prompts)}, with the first token) | "
            f"decode: {stats.per_token_decode_s * 1e3:.2f} ms/token over {stats.decode_steps} steps | "
            f"{stats.tokens_per_s:.1f} tokens/s ({stats.new_tokens} new tokens)"
        )
        if not args.check:
            return 0
        spmd.destroy_model_parallel()
        return _check(path, args, dtype, prompts, eos, tokens, mesh, devices, config)
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
