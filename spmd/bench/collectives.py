"""Collectives sweep: time and check every TP collective over group sizes and message sizes.

Runs on the accelerators JAX finds, else on simulated CPU devices (``--cpu-devices 8``). Each op
is checked once against a numpy reference, then timed as ``--iters`` chained calls inside one
jitted ``lax.fori_loop`` (no host dispatch between calls), best of ``--repeats``
(:mod:`spmd.bench.harness`). Prints a table per TP size as it goes (``max rel err``: the largest
``|out - ref| / (1 + |ref|)`` over the outputs, checked against 2e-2 in bf16 and 1e-5 in f32) and
a progress line over the whole run on long sweeps, writes JSON, and exits non-zero when nothing
was measured or any op was wrong or failed.

Times on simulated CPU devices show the code path works, not how fast a GPU is: quote GPU
numbers only from ``--platform gpu`` runs, with the card and date.

    spmd-bench                          # accelerators if any, else 8 simulated CPU devices
    spmd-bench --platform gpu --sizes 2KiB,128KiB,2MiB --json out.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from spmd.bench import harness
from spmd.bench.harness import format_size, parse_size

__all__ = ["OPS", "build_parser", "default_tp_sizes", "format_size", "main", "parse_size"]

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
PROG = "spmd-bench"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``spmd-bench``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=8)
    p.add_argument(
        "--ops",
        type=lambda s: harness.parse_list(s, _op, what="ops"),
        default=",".join(OPS),
        help="comma-separated subset of these ops",
    )
    p.add_argument(
        "--tp",
        type=lambda s: harness.parse_list(s, harness.positive_int, what="TP sizes"),
        default=None,
        help="TP group sizes, e.g. 2,4,8; each must divide the device count (default: every power of two from 2 up "
        "to the device count that divides it; one table per size)",
    )
    p.add_argument(
        "--sizes",
        type=lambda s: harness.parse_list(s, parse_size, what="sizes"),
        default="2KiB,32KiB,512KiB,2MiB",
        help="bytes per device, e.g. 2KiB,1MiB; rounded up to whole elements divisible by tp*tp (a note says so)",
    )
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="element type")
    harness.add_timing_args(p, json_path="bench_collectives.json", iters=20, repeats=3)
    return p


def default_tp_sizes(num_devices: int) -> list[int]:
    """The TP sizes a sweep runs without ``--tp``: every power of two from 2 up to ``num_devices`` that divides it."""
    return [1 << k for k in range(1, num_devices.bit_length()) if num_devices % (1 << k) == 0]


def _op(name: str) -> str:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; choose from {list(OPS)}")
    return name


def _steps(n: int) -> dict[str, Callable[[Any], Any]]:
    """One call of each op, shaped so that the output can feed the next call (chaining)."""
    import jax.numpy as jnp

    import spmd

    scale = 1.0 / n
    return {
        "all_reduce": lambda a: (spmd.tensor_model_parallel_all_reduce(a) * scale).astype(a.dtype),
        "all_gather": lambda a: spmd.tensor_model_parallel_all_gather(a, dim=0)[: a.shape[0]],
        "reduce_scatter": lambda a: jnp.tile(
            (spmd.tensor_model_parallel_reduce_scatter(a, dim=0) * scale).astype(a.dtype), n
        ),
        "all_to_all": lambda a: spmd.get_tp_group().all_to_all(a, 0, 0),
        "broadcast": lambda a: spmd.get_tp_group().broadcast(a, src=n - 1),
    }


def _reference(op: str, x, n: int):
    """numpy reference for one call on every rank of one group: x is ``[n, elems]``."""
    import numpy as np

    xf = x.astype(np.float64)
    if op == "all_reduce":
        return np.broadcast_to(xf.sum(0) / n, xf.shape)
    if op == "all_gather":
        return np.broadcast_to(xf[0], xf.shape)
    if op == "reduce_scatter":
        s = xf.sum(0) / n
        k = s.shape[0] // n
        return np.stack([np.tile(s[r * k : (r + 1) * k], n) for r in range(n)])
    if op == "all_to_all":
        blocks = xf.reshape(n, n, -1)  # [src, dst, block]
        return blocks.transpose(1, 0, 2).reshape(n, -1)
    return np.broadcast_to(xf[n - 1], xf.shape)


def _elements(size: int, itemsize: int, tp: int) -> int:
    """Elements per device for ``size`` bytes: a multiple of ``tp * tp`` (reduce-scatter, all-to-all)."""
    quantum = tp * tp
    return max(-(-size // itemsize // quantum), 1) * quantum


def _case(op: str, tp: int, size: int, elems: int, dtype, iters: int, rng) -> harness.Case:
    """One row: ``op`` over TP groups of ``tp`` on ``elems`` elements per device (``size`` bytes asked for)."""
    nbytes = elems * dtype.itemsize

    def build() -> harness.Trial:
        import jax
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import spmd

        step = _steps(tp)[op]
        spec = P(spmd.MESH_AXES)
        n_dev = spmd.get_mesh().devices.size
        x = rng.standard_normal((n_dev, elems)).astype(np.float32).astype(dtype)
        xd = jax.device_put(x, NamedSharding(spmd.get_mesh(), spec))
        once = jax.jit(spmd.shard_map(lambda a: step(a[0])[None], in_specs=spec, out_specs=spec, check_vma=False))
        looped, calls = harness.chain(step, iters)
        loop = jax.jit(spmd.shard_map(lambda a: looped(a[0])[None], in_specs=spec, out_specs=spec, check_vma=False))

        def check(out):
            out = np.asarray(out).astype(np.float64)
            err = 0.0
            for g in range(n_dev // tp):
                sl = slice(g * tp, (g + 1) * tp)
                ref = _reference(op, x[sl], tp)
                err = max(err, float(np.max(np.abs(out[sl] - ref) / (1.0 + np.abs(ref)))))
            return {"ok": err <= (2e-2 if np.dtype(dtype).itemsize == 2 else 1e-5), "max_rel_err": err}

        return harness.Trial(
            once=lambda: once(xd), check=check, loop=loop, args=(xd,), calls=calls, extra={"bytes_moved": nbytes}
        )

    key = {"op": op, "tp": tp, "size": format_size(nbytes), "bytes_per_device": nbytes, "bytes_requested": size}
    return harness.Case(key=key, build=build)


COLUMNS = [
    harness.Column("op", "op", 15),
    harness.Column("tp", "tp", 3),
    harness.Column("size", "bytes/device", 13),
    harness.Column("us", "us/call", 10, ".1f"),
    harness.Column("GBps", "GB/s", 8, ".2f"),
    harness.Column("max_rel_err", "max rel err", 11, ".1e"),
    harness.Column("ok", "check", 6),
]


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; the exit status says whether every op was measured and right (see module docstring)."""
    p = build_parser()
    args, devices = harness.parse_and_start(p, argv)
    import jax
    import numpy as np

    import spmd

    n_dev = len(devices)
    if args.tp is None:
        tps = default_tp_sizes(n_dev)
        if not tps:
            print(f"{PROG}: needs at least 2 devices for a TP group, found {n_dev}.", file=sys.stderr)
            return 2
    else:
        bad = [t for t in args.tp if n_dev % t]
        if bad:
            p.error(f"--tp {','.join(map(str, bad))}: a TP size must divide the {n_dev} devices")
        tps = args.tp
    dtype = np.dtype(jax.numpy.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
    rng = np.random.default_rng()
    print(
        f"{PROG}: {n_dev} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}, "
        f"{args.dtype}, {args.iters} chained calls per loop, best of {args.repeats}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    progress = harness.Progress(len(tps) * len(args.sizes) * len(args.ops))  # the whole run, every table
    for tp in tps:
        for size in args.sizes:
            elems = _elements(size, dtype.itemsize, tp)
            if elems * dtype.itemsize != size:
                print(
                    f"note: {size} B rounded to {elems * dtype.itemsize} B at tp={tp} "
                    f"(whole {args.dtype} elements, a multiple of tp*tp = {tp * tp})",
                    flush=True,
                )
    for tp in tps:
        spmd.destroy_model_parallel()
        spmd.initialize_model_parallel(tp, devices=devices)
        cases = [
            _case(op, tp, size, _elements(size, dtype.itemsize, tp), dtype, args.iters, rng)
            for size in args.sizes
            for op in args.ops
        ]
        rows += harness.run_cases(cases, COLUMNS, devices=devices, repeats=args.repeats, progress=progress)
    spmd.destroy_model_parallel()
    meta = harness.metadata(PROG, argv, devices, dtype=args.dtype, iters=args.iters, repeats=args.repeats)
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
