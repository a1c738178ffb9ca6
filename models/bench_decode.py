"""Benchmark: Llama decode-step latency and prefill throughput over TP sizes, psum vs the custom all-reduce.

    python -m models.bench_decode --json decode.json        # accelerators: a ~1B Llama (3.2 1B's shape), bf16
    python -m models.bench_decode --platform cpu            # 8 simulated CPU devices, a tiny model

Random bf16 weights (the model code of ``models.llama``, placed by ``models.runner``). Per TP size
and all-reduce (``psum``: the custom all-reduce disabled; ``custom``: the TP communicator's
default, Pallas kernels where eligible), it times, through :mod:`spmd.bench.harness`:

* ``allreduce``: one TP all-reduce of ``bf16[batch, hidden]`` (what each row-parallel layer does);
* ``decode``: one jitted decode step (all layers, LM head, greedy pick) at ``batch``, the KV cache
  ``--max-len`` long;
* ``prefill``: one prompt of ``--prefill-tokens`` tokens; ``tok/s`` its throughput.

Beside each decode row, the roofline: the weight bytes one device reads per step over the HBM
bandwidth (``--hbm-tbps``, 4.8 TB/s for an H200) plus ``2 x layers`` times the measured all-reduce
latency at that batch; ``x roof`` is the measured time over it (goal: within 1.5x). It lives in
``models`` (not ``spmd.bench``) because ``spmd`` must not import ``models``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any

from spmd.bench import harness

__all__ = ["DEFAULTS", "build_parser", "main"]

PROG = "python -m models.bench_decode"
DEFAULTS = {
    # Llama 3.2 1B's shape: 16 layers, hidden 2048, 32 heads / 8 KV heads, ffn 8192, vocab 128256 tied
    "accelerator": dict(
        layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batches="1,32",
        tp="1,2,4", max_len=256, prefill_tokens=2048, iters=20, repeats=5,
    ),
    "cpu": dict(
        layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512, batches="1,4",
        tp="1,2", max_len=64, prefill_tokens=32, iters=3, repeats=2,
    ),
}  # fmt: skip
COLUMNS = [
    harness.Column("tp", "tp", 3),
    harness.Column("allreduce", "all-reduce", 10),
    harness.Column("phase", "phase", 9),
    harness.Column("batch", "batch", 5),
    harness.Column("tokens", "tokens", 6),
    harness.Column("us", "us", 10, ".1f"),
    harness.Column("tok_per_s", "tok/s", 10, ".0f"),
    harness.Column("weight_mb", "weights MB/dev", 14, ".1f"),
    harness.Column("roofline_us", "roofline us", 11, ".1f"),
    harness.Column("x_roofline", "x roof", 7, ".2f"),
]


def build_parser() -> argparse.ArgumentParser:
    acc, cpu = DEFAULTS["accelerator"], DEFAULTS["cpu"]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=8)
    ints = lambda what: lambda s: harness.parse_list(s, harness.positive_int, what=what)
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_len", "prefill_tokens"):
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
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth for the roofline, TB/s (H200: 4.8)")
    harness.add_timing_args(p, json_path="decode.json", iters=None, repeats=None)
    return p


def _mode(text: str) -> str:
    if text not in ("psum", "custom"):
        raise ValueError(f"expected psum or custom, got {text!r}")
    return text


@dataclasses.dataclass
class _Setup:
    """One model per TP size (weights shared by both all-reduce modes), built when first needed."""

    args: Any
    devices: list
    models: dict = dataclasses.field(default_factory=dict)

    def config(self):
        from models.config import ModelConfig

        a = self.args
        return ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            head_dim=a.hidden // a.heads, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
        )  # fmt: skip

    def model(self, tp: int, mode: str):
        import collections

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
        base = self.models[tp]
        return dataclasses.replace(base, trace_counts=collections.Counter(), _steps={})  # retrace under this mode


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


def _decode_trial(setup: _Setup, tp: int, mode: str, batch: int, iters: int) -> harness.Trial:
    import jax
    import jax.numpy as jnp
    import numpy as np

    model = setup.model(tp, mode)
    a = setup.args
    max_len = a.max_len
    ids = np.ones((batch, 8), np.int32)
    lengths = np.full(batch, 8, np.int32)
    key, temp, top = jax.random.key(0), jnp.float32(0), jnp.float32(1)
    tokens, positions, cache = model.prefill_step()(model.state, ids, lengths, key, temp, top, max_len=max_len)
    decode = model.decode_step()

    def step(carry):  # the weights ride in the carry: closed over, jit would bake them in as constants
        state, tokens, positions, cache = carry
        nxt, pos, cache = decode(state, cache, tokens, positions, key, jnp.int32(1), temp, top)
        return state, nxt, jnp.minimum(pos, max_len - 1), cache

    fn, calls = harness.chain(step, iters)
    loop = jax.jit(fn)
    carry = (model.state, tokens, positions, cache)
    return harness.Trial(
        once=lambda: np.asarray(jax.jit(step)(carry)[1]),
        check=lambda t: {"ok": bool(((t >= 0) & (t < a.vocab)).all())},
        loop=loop,
        args=(carry,),
        calls=calls,
        extra={"weight_mb": _weight_bytes_per_device(model) / 1e6},
    )


def _prefill_trial(setup: _Setup, tp: int, mode: str, tokens: int, iters: int) -> harness.Trial:
    import jax
    import jax.numpy as jnp
    import numpy as np

    model = setup.model(tp, mode)
    prefill = model.prefill_step()
    key, temp, top = jax.random.key(0), jnp.float32(0), jnp.float32(1)
    lengths = jnp.full((1,), tokens, jnp.int32)

    def step(carry):  # the weights ride in the carry, as in the decode trial
        state, ids = carry
        first, _, _ = prefill(state, ids, lengths, key, temp, top, max_len=tokens)
        return state, ids.at[:, 0].set(first)

    fn, calls = harness.chain(step, iters)
    carry = (model.state, jnp.ones((1, tokens), jnp.int32))
    return harness.Trial(
        once=lambda: np.asarray(jax.jit(step)(carry)[1]),
        check=lambda out: {"ok": bool(((out >= 0) & (out < setup.args.vocab)).all())},
        loop=jax.jit(fn),
        args=(carry,),
        calls=calls,
    )


def _derive(hbm_bytes_per_s: float, layers: int):
    def derive(row: dict, earlier: list[dict]) -> None:
        if row["phase"] == "prefill":
            row["tok_per_s"] = row["tokens"] / (row["us"] * 1e-6)
        if row["phase"] != "decode":
            return
        ar = [r for r in earlier if r["phase"] == "allreduce" and "us" in r and
              (r["tp"], r["allreduce"], r["batch"]) == (row["tp"], row["allreduce"], row["batch"])]  # fmt: skip
        ar_us = ar[-1]["us"] if ar and row["tp"] > 1 else 0.0
        row["roofline_us"] = row["weight_mb"] * 1e6 / hbm_bytes_per_s * 1e6 + 2 * layers * ar_us
        row["x_roofline"] = row["us"] / row["roofline_us"]
        row["tok_per_s"] = row["batch"] / (row["us"] * 1e-6)

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
                cases.append(
                    harness.Case(
                        {**key, "phase": "allreduce"},
                        lambda tp=tp, m=mode, b=b: _allreduce_trial(setup, tp, m, b, args.iters),
                    )
                )
                cases.append(
                    harness.Case(
                        {**key, "phase": "decode"},
                        lambda tp=tp, m=mode, b=b: _decode_trial(setup, tp, m, b, args.iters),
                    )
                )
            prefill = dict(tp=tp, allreduce=mode, phase="prefill", batch=1, tokens=args.prefill_tokens)
            iters = max(1, args.iters // 4)
            cases.append(
                harness.Case(
                    prefill, lambda tp=tp, m=mode, n=iters: _prefill_trial(setup, tp, m, args.prefill_tokens, n)
                )
            )
    print(f"{PROG}: Llama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, ffn "
          f"{args.intermediate}, vocab {args.vocab} (tied), bf16, KV cache {args.max_len}; {len(devices)} x "
          f"{devices[0].device_kind}; roofline at {args.hbm_tbps} TB/s")  # fmt: skip
    rows = harness.run_cases(
        cases, COLUMNS, devices=devices, repeats=args.repeats, derive=_derive(args.hbm_tbps * 1e12, args.layers)
    )
    meta = harness.metadata(PROG, argv, devices, model=dataclasses.asdict(setup.config()), hbm_tbps=args.hbm_tbps)
    import spmd

    spmd.destroy_model_parallel()
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
