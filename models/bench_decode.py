"""Benchmark: Llama decode on the path ``models.generate`` runs, and prefill, over TP sizes and kernels.

    python -m models.bench_decode --json decode.json        # accelerators: a ~1B Llama (3.2 1B's shape), bf16
    python -m models.bench_decode --platform cpu            # 8 simulated CPU devices, a tiny model

Random bf16 weights (the model code of ``models.llama``, placed by ``models.runner``). Per TP size,
all-reduce (``psum``: the custom all-reduce disabled; ``custom``: the TP communicator's default),
decode kernels (``xla``: XLA's products; ``auto``: the measured GEMV kernels where the table picks
them) and batch, it times, through :mod:`spmd.bench.harness`:

* ``allreduce``: one TP all-reduce of ``bf16[batch, hidden]`` (what each row-parallel layer does);
* ``decode``: ``--chunk`` decode steps in one call of the model's decode loop (the ``lax.fori_loop``
  ``generate`` runs: all layers, LM head, greedy pick, EOS test), per token = call time / chunk;
  each timed call continues from the last one's tokens and donated cache; no weights are returned;
* ``generate``: what ``models.generate`` does after its prefill, ``--generate-tokens`` tokens
  (chunks dispatched, tokens read back to the host, the EOS logic), per token: the user's number;
* ``prefill``: one prompt of ``--prefill-tokens`` tokens; ``tok/s`` and ``MFU`` (2 x parameters x
  tokens over the time and ``--peak-tflops``).

Beside each decode row: the roofline (the weight bytes one device reads per step over
``--hbm-tbps``, plus ``2 x layers`` TP all-reduces measured at that batch), ``% roof`` (roofline
over the time) and ``kernels``: the launches of one step, counted in the compiled loop's HLO.
It lives in ``models`` (not ``spmd.bench``) because ``spmd`` must not import ``models``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from typing import Any

from models import bench_trace
from spmd.bench import harness

__all__ = ["DEFAULTS", "build_parser", "main"]

PROG = "python -m models.bench_decode"
DEFAULTS = {
    # Llama 3.2 1B's shape: 16 layers, hidden 2048, 32 heads / 8 KV heads, ffn 8192, vocab 128256 tied
    "accelerator": dict(
        layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batches="1,32",
        tp="1,2,4", max_len=256, prefill_tokens=2048, kernels="xla,auto", generate_tokens=129, iters=20, repeats=5,
    ),
    "cpu": dict(
        layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, batches="1,4",
        tp="1,2", max_len=64, prefill_tokens=32, kernels="xla", generate_tokens=9, iters=3, repeats=2,
    ),
}  # fmt: skip
COLUMNS = [
    harness.Column("tp", "tp", 3),
    harness.Column("allreduce", "all-reduce", 10),
    harness.Column("kernels", "kernels", 7),
    harness.Column("phase", "phase", 9),
    harness.Column("batch", "batch", 5),
    harness.Column("tokens", "tokens", 6),
    harness.Column("us", "us", 10, ".1f"),
    harness.Column("tok_per_s", "tok/s", 10, ".0f"),
    harness.Column("weight_mb", "weights MB/dev", 14, ".1f"),
    harness.Column("roofline_us", "roofline us", 11, ".1f"),
    harness.Column("pct_roofline", "% roof", 7, ".0f"),
    harness.Column("kernels_per_step", "launches", 8),
    harness.Column("trace_kernels_per_step", "traced", 6),
    harness.Column("mfu_pct", "MFU %", 6, ".1f"),
]


def build_parser() -> argparse.ArgumentParser:
    acc, cpu = DEFAULTS["accelerator"], DEFAULTS["cpu"]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=8)
    ints = lambda what: lambda s: harness.parse_list(s, harness.positive_int, what=what)
    names = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_len", "prefill_tokens",
             "generate_tokens")  # fmt: skip
    for name in names:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=harness.positive_int, default=None,
            help=f"(default: {acc[name]}; CPU {cpu[name]})",
        )  # fmt: skip
    p.add_argument(
        "--batches",
        type=ints("batch sizes"),
        default=None,
        help=f"decode batches (default: {acc['batches']}; CPU {cpu['batches']})",
    )
    p.add_argument(
        "--tp", type=ints("TP sizes"), default=None, help=f"TP sizes (default: {acc['tp']}; CPU {cpu['tp']})"
    )
    p.add_argument(
        "--all-reduce", type=lambda s: harness.parse_list(s, _mode, what="all-reduce modes"), default="psum,custom",
        help="psum (custom all-reduce off) and/or custom (the communicator's choice)",
    )  # fmt: skip
    p.add_argument(
        "--kernels", type=lambda s: harness.parse_list(s, _kernels, what="kernel modes"), default=None,
        help=f"decode products: xla and/or auto (the GEMV table's choice) (default: {acc['kernels']}; "
             f"CPU {cpu['kernels']})",
    )  # fmt: skip
    p.add_argument("--chunk", type=harness.positive_int, default=16, help="decode steps per device call")
    p.add_argument("--profile", default=None, help="trace each decode row's loop into this folder; top kernels")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth for the roofline, TB/s (H200: 4.8)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU, TFLOP/s (H200: 989)")
    harness.add_timing_args(p, json_path="decode.json", iters=None, repeats=None)
    return p


def _mode(text: str) -> str:
    if text not in ("psum", "custom"):
        raise ValueError(f"expected psum or custom, got {text!r}")
    return text


def _kernels(text: str) -> str:
    if text not in ("xla", "auto", "interpret"):
        raise ValueError(f"expected xla, auto or interpret, got {text!r}")
    return text


@dataclasses.dataclass
class _Setup:
    """One model per TP size (weights shared by every all-reduce and kernel mode), built when first needed."""

    args: Any
    devices: list
    models: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)

    def config(self):
        from models.config import ModelConfig

        a = self.args
        return ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            head_dim=a.hidden // a.heads, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
        )  # fmt: skip

    def model(self, tp: int, mode: str, kernels: str = "auto"):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding

        import spmd
        from models.llama import LlamaForCausalLM
        from models.runner import shard_causal_lm

        spmd.destroy_model_parallel()
        spmd.initialize_model_parallel(
            tensor_model_parallel_size=tp, devices=self.devices[:tp], disable_custom_all_reduce=(mode == "psum")
        )
        if tp not in self.models:
            self.models.clear()  # one model in memory at a time
            self.variants.clear()
            config = self.config()
            module = nnx.eval_shape(
                lambda: LlamaForCausalLM(config, params_dtype=jnp.bfloat16, tp_size=tp, rngs=nnx.Rngs(0))
            )
            mesh, key = spmd.get_mesh(), jax.random.key(0)
            fills: dict = {}
            for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.Param))):
                aval = var.get_value()
                spec = nnx.get_partition_spec(var).get_value()
                sig = (aval.shape, aval.dtype, spec)
                if sig not in fills:
                    scale = aval.shape[0] ** -0.5 if len(aval.shape) > 1 else 0.0
                    fills[sig] = jax.jit(
                        functools.partial(_random_param, shape=aval.shape, dtype=aval.dtype, scale=scale),
                        out_shardings=NamedSharding(mesh, spec),
                    )
                var.set_value(fills[sig](jax.random.fold_in(key, i)))
            self.models[tp] = shard_causal_lm(module, mesh=mesh)
        if (mode, kernels) not in self.variants:  # traced anew under this all-reduce and kernel mode
            self.variants[(mode, kernels)] = self.models[tp].with_kernels(kernels)
        return self.variants[(mode, kernels)]


def _random_param(key, *, shape, dtype, scale):
    """``N(0, scale^2)`` for matrices; ones for vectors (norm weights), where ``scale`` is 0."""
    import jax
    import jax.numpy as jnp

    return (jax.random.normal(key, shape, jnp.float32) * scale + (scale == 0)).astype(dtype)


def _weight_bytes_per_device(model) -> int:
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model.module, nnx.Param))
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves)


def _allreduce_trial(setup: _Setup, tp: int, mode: str, batch: int, iters: int) -> harness.Trial:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import spmd

    setup.model(tp, mode)  # (re)initializes the state for this TP size and mode
    x = jnp.ones((batch, setup.args.hidden), jnp.bfloat16) * 0.01
    body = lambda v: spmd.tensor_model_parallel_all_reduce(v) * (1.0 / tp)
    one = jax.jit(spmd.shard_map(body, in_specs=P(), out_specs=P(), check_vma=False))
    fn, calls = harness.chain(body, iters)
    loop = jax.jit(spmd.shard_map(fn, in_specs=P(), out_specs=P(), check_vma=False))
    return harness.Trial(
        once=lambda: jax.device_get(one(x)),
        check=lambda y: {"ok": bool(abs(float(y[0, 0]) - 0.01) < 1e-3)},
        loop=loop,
        args=(x,),
        calls=calls,
    )


def _first(model, batch: int, max_len: int):
    """A prefill of ``batch`` 8-token prompts: ``(first tokens, positions, cache)`` on the model's mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    ids = (np.arange(batch * 8, dtype=np.int32).reshape(batch, 8) * 7919) % model.config.vocab_size
    lengths = np.full(batch, 8, np.int32)
    return model.prefill_step()(model.state, ids, lengths, jax.random.key(0), jnp.float32(0), jnp.float32(1),
                                max_len=max_len, greedy=True)  # fmt: skip


def _decode_trial(setup: _Setup, tp: int, mode: str, kernels: str, batch: int, chunk: int) -> harness.Trial:
    """``chunk`` decode steps in one call of the model's decode loop (what ``generate`` runs), per token."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    model = setup.model(tp, mode, kernels)
    a = setup.args
    loop = model.decode_loop(chunk, greedy=True)
    rest = (jnp.int32(1), jax.random.key(0), jnp.float32(0), jnp.float32(1))

    def args_from(tokens, positions, cache):
        return (model.state, cache, tokens, positions, *rest)

    def once():
        *_, new = loop(*args_from(*_first(model, batch, a.max_len)))
        return np.asarray(new)

    def check(out):
        return {"ok": bool(out.shape[1] == chunk and ((out >= 0) & (out < a.vocab)).all())}

    tokens, positions, cache = _first(model, batch, a.max_len)
    compiled = loop.lower(*args_from(tokens, positions, cache)).compile()
    extra = {"weight_mb": _weight_bytes_per_device(model) / 1e6, "kernels_per_step": _kernels_per_step(compiled)}
    if a.profile:
        label = f"tp{tp}_{mode}_{kernels}_b{batch}"
        extra["trace"] = bench_trace.profile(
            loop, lambda: args_from(*_first(model, batch, a.max_len)), chunk, a.profile, label
        )
        extra["trace_kernels_per_step"] = extra["trace"].get("kernels_per_step")
    return harness.Trial(
        once=once,
        check=check,
        loop=loop,
        args=args_from(tokens, positions, cache),
        calls=chunk,
        # each run continues from the last one's tokens and (donated) cache, at the same positions
        feed=lambda out, args: args_from(out[0], positions, out[2]),
        extra=extra,
    )


def _generate_trial(setup: _Setup, tp: int, mode: str, kernels: str, batch: int, chunk: int) -> harness.Trial:
    """What ``models.generate`` does after its prefill: chunks dispatched, tokens read back, EOS checked."""
    import jax
    import jax.numpy as jnp

    from models.generation import Prefill, _collect, _decode_chunks, _Options

    model = setup.model(tp, mode, kernels)
    a = setup.args
    steps = a.generate_tokens - 1
    opts = _Options(jax.random.key(0), jnp.float32(0), jnp.float32(1), {a.vocab + 1}, chunk, True)  # greedy, no EOS

    def fresh(*_):
        pre = Prefill(*_first(model, batch, a.max_len), batch, a.generate_tokens)
        jax.block_until_ready((pre.tokens, pre.lengths, pre.cache))  # the prefill stays out of the timed window
        return (pre,)

    def run(pre):
        return _collect(_decode_chunks(model, pre, opts))

    return harness.Trial(
        once=lambda: run(*fresh()),
        check=lambda out: {"ok": all(len(s) == a.generate_tokens and 0 <= min(s) and max(s) < a.vocab for s in out)},
        loop=run,
        args=fresh(),
        calls=steps,
        feed=fresh,  # a new prefill (outside the timed window) for every run: the decode donates its cache
    )


def _kernels_per_step(compiled) -> int | None:
    """Kernels one decode step launches: the instructions of the compiled while loop's body that run work.

    Counted in the optimized HLO (each fusion, custom call, copy or collective is one launch on GPUs);
    ``None`` if the loop cannot be found.
    """
    text = compiled.as_text()
    bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", text)
    if not bodies:
        return None
    free = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id")
    total = 0
    for body in set(bodies):
        block = re.search(r"^%?" + re.escape(body) + r" .*?\{\n(.*?)\n\}", text, re.S | re.M)
        if block is None:
            return None
        for line in block.group(1).splitlines():
            op = re.search(r"=\s.*?\s([a-z][a-z0-9\-]*)\(", line)
            if op and op.group(1) not in free and op.group(1) != "while":
                total += 1
    return total


def _prefill_trial(setup: _Setup, tp: int, mode: str, kernels: str, tokens: int, iters: int) -> harness.Trial:
    import jax
    import jax.numpy as jnp
    import numpy as np

    model = setup.model(tp, mode, kernels)
    prefill = model.prefill_step()
    key, temp, top = jax.random.key(0), jnp.float32(0), jnp.float32(1)
    lengths = jnp.full((1,), tokens, jnp.int32)

    def step(state, ids):  # the weights are an argument, never a result (XLA would copy them every call)
        first, _, _ = prefill(state, ids, lengths, key, temp, top, max_len=tokens)
        return ids.at[:, 0].set(first)

    def loop(state, ids):
        return jax.lax.fori_loop(0, iters, lambda i, ids: step(state, ids), ids)

    args = (model.state, jnp.ones((1, tokens), jnp.int32))
    params = sum(leaf.size for leaf in jax.tree.leaves(model.state))  # global sizes: every rank's shard
    return harness.Trial(
        once=lambda: np.asarray(jax.jit(step)(*args)),
        check=lambda out: {"ok": bool(((out >= 0) & (out < setup.args.vocab)).all())},
        loop=jax.jit(loop),
        args=args,
        calls=iters,
        extra={"flops": 2.0 * params * tokens},
    )


def _derive(hbm_bytes_per_s: float, layers: int, peak_flops: float):
    def derive(row: dict, earlier: list[dict]) -> None:
        if row["phase"] == "prefill":
            row["tok_per_s"] = row["tokens"] / (row["us"] * 1e-6)
            row["mfu_pct"] = 100 * row.pop("flops") / (row["us"] * 1e-6) / (peak_flops * row["tp"])
        if row["phase"] not in ("decode", "generate"):
            return
        row["tok_per_s"] = row["batch"] / (row["us"] * 1e-6)
        same = (row["tp"], row["allreduce"], row["kernels"], row["batch"])
        for r in earlier:
            if r["phase"] == "decode" and (r["tp"], r["allreduce"], r["kernels"], r["batch"]) == same:
                row.setdefault("weight_mb", r.get("weight_mb"))
                row.setdefault("kernels_per_step", r.get("kernels_per_step"))
        ar = [r for r in earlier if r["phase"] == "allreduce" and "us" in r and
              (r["tp"], r["allreduce"], r["batch"]) == (row["tp"], row["allreduce"], row["batch"])]  # fmt: skip
        ar_us = ar[-1]["us"] if ar and row["tp"] > 1 else 0.0
        if row.get("weight_mb"):
            row["roofline_us"] = row["weight_mb"] * 1e6 / hbm_bytes_per_s * 1e6 + 2 * layers * ar_us
            row["pct_roofline"] = 100 * row["roofline_us"] / row["us"]

    return derive


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args, devices = harness.parse_and_start(p, argv)
    kind = "cpu" if devices[0].platform == "cpu" else "accelerator"
    harness.fill_defaults(p, args, DEFAULTS[kind])
    tps = [t for t in args.tp if t <= len(devices)]
    if not tps:
        print(f"{PROG}: no TP size in {args.tp} fits the {len(devices)} devices.", file=sys.stderr)
        return 2
    setup = _Setup(args, devices)
    cases = []
    for tp in tps:
        for mode in args.all_reduce:
            for b in args.batches:
                key = dict(tp=tp, allreduce=mode, batch=b, tokens=1)
                cases.append(harness.Case(
                    {**key, "phase": "allreduce"},
                    lambda tp=tp, m=mode, b=b: _allreduce_trial(setup, tp, m, b, args.iters),
                ))  # fmt: skip
                for k in args.kernels:
                    for phase, trial in (("decode", _decode_trial), ("generate", _generate_trial)):
                        cases.append(harness.Case(
                            {**key, "kernels": k, "phase": phase},
                            lambda tp=tp, m=mode, k=k, b=b, t=trial: t(setup, tp, m, k, b, args.chunk),
                        ))  # fmt: skip
            k = args.kernels[0]  # prompts are longer than the GEMV's 64 rows: every kernel mode runs XLA's
            prefill = dict(tp=tp, allreduce=mode, kernels=k, phase="prefill", batch=1, tokens=args.prefill_tokens)
            iters = max(1, args.iters // 4)
            build = lambda tp=tp, m=mode, k=k, n=iters: _prefill_trial(setup, tp, m, k, args.prefill_tokens, n)
            cases.append(harness.Case(prefill, build))
    print(f"{PROG}: Llama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, ffn "
          f"{args.intermediate}, vocab {args.vocab} (tied), bf16, KV cache {args.max_len}; {len(devices)} x "
          f"{devices[0].device_kind}; roofline at {args.hbm_tbps} TB/s; {args.chunk} steps per call")  # fmt: skip
    rows = harness.run_cases(
        cases, COLUMNS, devices=devices, repeats=args.repeats,
        derive=_derive(args.hbm_tbps * 1e12, args.layers, args.peak_tflops * 1e12),
    )  # fmt: skip
    meta = harness.metadata(
        PROG, argv, devices, model=dataclasses.asdict(setup.config()), hbm_tbps=args.hbm_tbps,
        peak_tflops=args.peak_tflops, chunk=args.chunk,
    )  # fmt: skip
    import spmd

    spmd.destroy_model_parallel()
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
