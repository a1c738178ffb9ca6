"""Collectives sweep: time and check every TP collective over group sizes and message sizes.

Runs on simulated CPU devices by default (``--cpu-devices 8``), or on the real accelerators
(``--platform gpu``). Each op is checked once against a numpy reference, then timed as
``--iters`` chained calls inside one jitted ``lax.fori_loop`` (no host dispatch between calls),
best of ``--repeats``. Prints a table as it goes and writes JSON.

Times on simulated CPU devices show the code path works, not how fast a GPU is: quote GPU
numbers only from ``--platform gpu`` runs, with the card and date.

    spmd-bench                          # 8 simulated CPU devices
    spmd-bench --platform gpu --sizes 2KiB,128KiB,2MiB --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform as _platform
import sys
from collections.abc import Callable
from typing import Any

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "K": 1 << 10, "M": 1 << 20}
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def parse_size(text: str) -> int:
    """``"2KiB"`` -> 2048. Accepts B, KiB, MiB, GiB (case-insensitive)."""
    t = text.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if unit and t.endswith(unit):
            number, scale = t[: -len(unit)], _UNITS[unit]
            break
    else:
        number, scale = t, 1
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 2KiB or 1MiB, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of bytes, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="spmd-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", default="cpu", help="cpu (simulated devices, default) or gpu / tpu")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices (default 8)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--tp", default="", help="TP group sizes, e.g. 2,4,8 (default: every power of two that fits)")
    p.add_argument("--sizes", default="2KiB,32KiB,512KiB,2MiB", help="bytes per device, e.g. 2KiB,1MiB")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--iters", type=int, default=20, help="chained calls per timed loop")
    p.add_argument("--repeats", type=int, default=3, help="timed loops; the best is reported")
    p.add_argument("--json", default="bench_collectives.json", help="where to write the results")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {list(OPS)}")
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.cpu_devices < 1 or args.iters < 1 or args.repeats < 1:
        p.error("--cpu-devices, --iters and --repeats must be positive")
    return args


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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import spmd
    from spmd.bench.timing import best_seconds

    if args.platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    devices = jax.devices()
    n_dev = len(devices)
    tps = [int(t) for t in args.tp.split(",") if t.strip()] or [t for t in (2, 4, 8, 16) if t <= n_dev]
    dtype = np.dtype(jax.numpy.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
    rng = np.random.default_rng()
    print(
        f"spmd-bench: {n_dev} x {devices[0].device_kind} ({devices[0].platform}), jax {jax.__version__}, "
        f"{args.dtype}, {args.iters} chained calls per loop, best of {args.repeats}",
        flush=True,
    )
    header = f"{'op':<15} {'tp':>3} {'bytes/device':>13} {'us/call':>10} {'GB/s':>8} {'max err':>9}  check"
    print(header, flush=True)
    print("-" * len(header), flush=True)
    rows: list[dict[str, Any]] = []
    for tp in tps:
        if n_dev % tp:
            print(f"skipping tp={tp}: does not divide {n_dev} devices", flush=True)
            continue
        spmd.destroy_model_parallel()
        spmd.initialize_model_parallel(tp, devices=devices)
        steps = _steps(tp)
        for size in args.sizes:
            elems = max(size // dtype.itemsize // (tp * tp), 1) * tp * tp  # divisible for scatter/a2a
            for op in args.ops:
                step = steps[op]
                x = rng.standard_normal((n_dev, elems)).astype(np.float32).astype(dtype)
                spec = P(spmd.MESH_AXES)

                def one_call(a, step=step):
                    return step(a[0])[None]

                once = jax.jit(spmd.shard_map(one_call, in_specs=spec, out_specs=spec, check_vma=False))
                out = np.asarray(once(x)).astype(np.float64)
                err = 0.0
                for g in range(n_dev // tp):
                    sl = slice(g * tp, (g + 1) * tp)
                    ref = _reference(op, x[sl], tp)
                    err = max(err, float(np.max(np.abs(out[sl] - ref) / (1.0 + np.abs(ref)))))
                ok = err <= (2e-2 if dtype.itemsize == 2 else 1e-5)

                def loop(a, step=step):
                    return jax.lax.fori_loop(0, args.iters, lambda i, c: step(c), a[0])[None]

                looped = jax.jit(spmd.shard_map(loop, in_specs=spec, out_specs=spec, check_vma=False))
                xd = jax.device_put(x, jax.sharding.NamedSharding(spmd.get_mesh(), spec))
                best = best_seconds(looped, xd, repeats=args.repeats)
                us = best / args.iters * 1e6
                nbytes = elems * dtype.itemsize
                row = {
                    "op": op,
                    "tp": tp,
                    "bytes_per_device": nbytes,
                    "us_per_call": us,
                    "algbw_GBps": nbytes / us / 1e3,
                    "max_rel_err": err,
                    "ok": ok,
                }
                rows.append(row)
                print(
                    f"{op:<15} {tp:>3} {format_size(nbytes):>13} {us:>10.1f} {row['algbw_GBps']:>8.2f} "
                    f"{err:>9.1e}  {'ok' if ok else 'WRONG'}",
                    flush=True,
                )
    spmd.destroy_model_parallel()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    rows = run(args)
    import jax

    meta = {
        "command": "spmd-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "host": _platform.node(),
        "dtype": args.dtype,
        "iters": args.iters,
        "repeats": args.repeats,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} wrong; wrote {args.json}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
