"""Benchmark: MoE dispatch + combine for every all-to-all manager, all local devices as EP ranks.

    python -m spmd.bench.expert_parallel --json ep.json           # every local accelerator as EP ranks
    python -m spmd.bench.expert_parallel --platform cpu           # 8 simulated CPU devices, small shapes

Managers: naive, capacity, ragged (and ragged-dense), low_latency (on GPUs its Pallas kernel on peer
buffers allocated for each row's shape; elsewhere its all_to_all form), low_latency-fp8 (fp8 dispatch)
and low_latency-pull (the combine read from the owners' buffers instead of written into the sources').
Per configuration (tokens per rank, hidden, top-k, experts) each manager routes bf16 tokens to
identity experts and back (dispatch + combine, no expert math), checked once against a numpy
reference (identity experts give back the input, times the kept routing weights), then timed as
``--iters`` chained round trips in one jitted ``lax.fori_loop``, best of ``--repeats``
(:mod:`spmd.bench.harness`). Before a row runs, its compiled memory estimate is checked against
the budget (``--max-memory-gb``): a row that would not fit is skipped with a message. "wire MB" is
what one rank sends per round trip; GB/s is that over the time.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from spmd.bench import harness

__all__ = ["DEFAULTS", "build_parser", "main"]

PROG = "python -m spmd.bench.expert_parallel"
MANAGERS = ("naive", "capacity", "ragged", "ragged-dense", "low_latency", "low_latency-fp8", "low_latency-pull")
# Shapes per platform: accelerators get serving shapes; a CPU laptop gets shapes that run in seconds.
DEFAULTS = {
    "accelerator": {"tokens": "1,128,4096", "hidden": "4096,7168", "configs": "2x8,8x64", "iters": 20, "repeats": 3},
    "cpu": {"tokens": "1,16", "hidden": "256", "configs": "2x8", "iters": 5, "repeats": 2},
}


def _config(text: str) -> tuple[int, int]:
    k, sep, e = text.partition("x")
    if not sep:
        raise ValueError(f"expected TOPKxEXPERTS like 2x8, got {text!r}")
    k, e = harness.positive_int(k), harness.positive_int(e)
    if k > e:
        raise ValueError(f"top-k {k} is larger than the {e} experts in {text!r}")
    return k, e


def _manager(name: str) -> str:
    if name not in MANAGERS:
        raise ValueError(f"unknown manager {name!r}; choose from {list(MANAGERS)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    acc, cpu = DEFAULTS["accelerator"], DEFAULTS["cpu"]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=8)
    ints = lambda what: lambda s: harness.parse_list(s, harness.positive_int, what=what)
    p.add_argument(
        "--tokens",
        type=ints("tokens"),
        default=None,
        help=f"tokens per EP rank (default: {acc['tokens']}; CPU {cpu['tokens']})",
    )
    p.add_argument(
        "--hidden",
        type=ints("hidden sizes"),
        default=None,
        help=f"hidden sizes (default: {acc['hidden']}; CPU {cpu['hidden']})",
    )
    p.add_argument(
        "--configs",
        type=lambda s: harness.parse_list(s, _config, what="configs"),
        default=None,
        help=f"top-k x experts pairs (default: {acc['configs']}; CPU {cpu['configs']})",
    )
    p.add_argument(
        "--managers",
        type=lambda s: harness.parse_list(s, _manager, what="managers"),
        default="naive,capacity,ragged,low_latency",
        help="all-to-all managers; ragged-dense is the ragged manager over the padded all_to_all; low_latency "
        "runs its Pallas kernel on GPUs (buffers allocated for the row's shape) and its all_to_all form elsewhere; "
        "low_latency-fp8 dispatches float8 e4m3; low_latency-pull combines by reading the owners' buffers",
    )
    p.add_argument("--capacity-factor", type=float, default=1.25, help="the capacity manager's slack per expert")
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip a row whose compiled memory estimate is larger (default: 80%% of available host memory "
        "on CPU, 90%% of device memory on accelerators)",
    )
    harness.add_timing_args(p, json_path="bench_expert_parallel.json", iters=None, repeats=None)
    p.epilog = (
        f"Per-platform --iters/--repeats defaults: accelerators {acc['iters']}/{acc['repeats']}, "
        f"CPU {cpu['iters']}/{cpu['repeats']}."
    )
    return p


def _wire_bytes(name: str, ep: int, t: int, h: int, k: int, e: int, cap: int) -> int:
    """Bytes one rank sends per dispatch + combine (bf16 tokens)."""
    frac = (ep - 1) / ep
    if name == "naive":
        return int((ep - 1) * t * h * 2 + frac * ep * t * h * 4)  # all-gather bf16 + reduce-scatter f32
    if name == "capacity":
        return int(2 * frac * e * cap * h * 2)
    if name == "ragged-dense":
        return int(2 * frac * ep * t * k * h * 2)  # padded to every slot per destination
    if name.startswith("low_latency"):  # once per remote rank holding one of its experts; f32 partials back
        el = e // ep
        hit = 1 - math.comb(e - el, k) / math.comb(e, k)  # a given rank holds one of the token's experts
        return int(t * (ep - 1) * hit * (h * (1 if name.endswith("fp8") else 2) + h * 4))
    return int(2 * frac * t * k * h * 2)  # ragged: the routed rows, both ways (uniform routing)


def _case(name: str, ep: int, t: int, h: int, k: int, e: int, args: argparse.Namespace, rng) -> harness.Case:
    """One row: manager ``name`` round-tripping ``t`` tokens of ``h`` per rank, top-``k`` of ``e`` experts."""

    def build() -> harness.Trial:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import spmd
        from spmd.expert_parallel import get_all2all_manager

        spec = P("ep")
        mesh = spmd.get_mesh()
        x = rng.standard_normal((ep * t, h)).astype(np.float32).astype(jnp.bfloat16)
        ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(ep * t)]).astype(np.int32)
        w = rng.random((ep * t, k)).astype(np.float32) + 0.1
        w /= w.sum(1, keepdims=True)
        xs, ws, idss = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, w, ids))
        kwargs: dict[str, Any] = {"capacity_factor": args.capacity_factor} if name == "capacity" else {}
        if name == "ragged-dense":
            kwargs = {"use_ragged_collective": False}
        fp8 = name == "low_latency-fp8"
        if name.startswith("low_latency"):
            kwargs = {"max_tokens": t, "use_fp8": fp8, "wire": "all_to_all"}
            kwargs["combine_form"] = "pull" if name == "low_latency-pull" else "push"
            if devices_are_gpus(mesh):  # the kernel, or a loud failure: a silent fallback would time the wrong thing
                from spmd.expert_parallel import allocate_low_latency_buffers

                bufs = allocate_low_latency_buffers(mesh, max_tokens=t, hidden=h, top_k=k, use_fp8=fp8)
                kwargs.update(buffers=bufs, wire="peer")
        manager = get_all2all_manager(name.split("-")[0], e, tp_axis=None, **kwargs)

        def round_trip(x, w, ids):
            inputs, state = manager.dispatch(x, w, ids)
            return manager.combine(inputs, state), state.num_dropped

        once = jax.jit(
            spmd.shard_map(
                lambda x, w, ids: (lambda y, d: (y, d[None]))(*round_trip(x, w, ids)),
                in_specs=(spec,) * 3,
                out_specs=(spec, spec),
                check_vma=False,
            )
        )

        def check(outputs):
            y, dropped = outputs
            y = np.asarray(y).astype(np.float32)
            dropped = int(np.asarray(dropped).sum())
            if dropped:  # dropped slots change the sum; report, and check nothing else
                return {"ok": True, "dropped": dropped}
            want = (fp8_roundtrip(x) if fp8 else x).astype(np.float32)  # identity experts: sum_k w_k x = x
            return {"ok": bool(np.allclose(y, want, rtol=2e-2, atol=2e-2)), "dropped": 0}

        def loop(x, w, ids):
            chained, _ = harness.chain(lambda c: round_trip(c, w, ids)[0], args.iters)
            return chained(x)

        timed = jax.jit(spmd.shard_map(loop, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
        cap = manager.capacity(t, k) if name == "capacity" else 0
        wire = _wire_bytes(name, ep, t, h, k, e, cap)
        return harness.Trial(
            once=lambda: once(xs, ws, idss),
            check=check,
            loop=timed,
            args=(xs, ws, idss),
            calls=args.iters,
            extra={"wire_MB": wire / 1e6, "bytes_moved": wire},
        )

    return harness.Case(key={"tokens": t, "hidden": h, "k": k, "experts": e, "manager": name}, build=build)


def devices_are_gpus(mesh) -> bool:
    return all(d.platform == "gpu" for d in mesh.devices.flat)


def fp8_roundtrip(x):
    """What the low-latency manager's fp8 dispatch delivers, in numpy: per-token power-of-two scales, e4m3."""
    import ml_dtypes
    import numpy as np

    x32 = np.asarray(x, np.float32)
    m, e = np.frexp(np.abs(x32).max(axis=-1))
    p = np.clip(np.where(m <= 0.875, e - 9, e - 8), -126, 127)
    q = np.ldexp(x32, -p[:, None]).astype(ml_dtypes.float8_e4m3fn)
    return np.ldexp(q.astype(np.float32), p[:, None])


COLUMNS = [
    harness.Column("tokens", "tokens", 6),
    harness.Column("hidden", "hidden", 6),
    harness.Column("k", "k", 2),
    harness.Column("experts", "E", 3),
    harness.Column("manager", "manager", 15),
    harness.Column("us", "us", 9, ".1f"),
    harness.Column("wire_MB", "wire MB", 8, ".2f"),
    harness.Column("GBps", "GB/s", 7, ".1f"),
    harness.Column("dropped", "dropped", 7),
    harness.Column("ok", "check", 6),
]


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; non-zero when nothing was measured or a row was wrong or failed."""
    p = build_parser()
    args, devices = harness.parse_and_start(p, argv)
    ep = len(devices)
    if ep < 2:
        print(
            f"{PROG}: needs at least 2 devices as EP ranks, found {ep} x {devices[0].platform}; "
            f"use --platform cpu --cpu-devices 8 for simulated devices.",
            file=sys.stderr,
        )
        return 2
    defaults = DEFAULTS["cpu" if devices[0].platform == "cpu" else "accelerator"]
    harness.fill_defaults(p, args, defaults)
    import jax
    import numpy as np

    import spmd

    spmd.destroy_model_parallel()
    spmd.initialize_model_parallel(1, 1, 1, ep, devices=devices)
    print(
        f"{PROG}: {ep} x {devices[0].device_kind}, jax {jax.__version__}, EP={ep}, bf16, identity experts, "
        f"{args.iters} chained round trips, best of {args.repeats}",
        flush=True,
    )
    rng = np.random.default_rng()
    cases = [
        _case(name, ep, t, h, k, e, args, rng)
        for t in args.tokens
        for h in args.hidden
        for k, e in args.configs
        for name in args.managers
    ]
    max_bytes = None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9)
    rows = harness.run_cases(cases, COLUMNS, devices=devices, repeats=args.repeats, max_memory_bytes=max_bytes)
    spmd.destroy_model_parallel()
    meta = harness.metadata(PROG, argv, devices, ep=ep, iters=args.iters, repeats=args.repeats)
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
