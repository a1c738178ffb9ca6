"""``spmd-bench collectives``: every TP collective as nccl-tests measures it, with NCCL beside it in the same run.

For each TP size, each op and each size (nccl-tests' ``-b 8 -e 1G -f 2``, or ``--sizes``), both
modes of nccl-tests are run: out-of-place (the input stays, the output goes to a second buffer)
and in-place (one buffer per rank is input and output: each call's output is the next call's
input). Each is checked once (``#wrong``: elements that differ from :mod:`spmd.bench.expected`,
computed per device from each rank's pattern, no collective involved), then timed as ``--iters``
chained calls in one jitted ``lax.fori_loop`` (no host dispatch between calls; the buffers
donated), best of ``--repeats``. ``algbw`` and ``busbw`` follow nccl-tests
(:mod:`spmd.bench.nccl_format`). With torch installed, the same sizes first run through
``torch.distributed`` in one process per device (NCCL on GPUs, gloo on CPU:
:mod:`spmd.bench.torch_collectives`), and each JAX row shows NCCL's busbw and the ratio.

Ops: ``all_reduce`` (psum), ``all_gather``, ``reduce_scatter`` (psum_scatter), ``all_to_all``,
``broadcast`` (spmd's, a masked psum of the bits), ``broadcast_ppermute`` (a binomial tree of
ppermutes, log2(n) rounds) and ``custom_all_reduce`` (the TP communicator's custom all-reduce:
the Pallas kernel where the tuning table takes the size, psum elsewhere and on CPU).

Times on simulated CPU devices show the code path works, not how fast a GPU is.

    spmd-bench collectives --platform gpu -b 8 -e 1G -f 2 --plot busbw.png
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Any

from spmd.bench import harness, nccl_format
from spmd.bench.cli_args import format_size, parse_size
from spmd.bench.expected import expected, input_length, output_length, pattern_length
from spmd.bench.table import print_jax_table, print_torch_tables, summarize

__all__ = ["KIND_OF", "OPS", "build_parser", "default_tp_sizes", "format_size", "main", "parse_size", "tree_broadcast"]

PROG = "spmd-bench collectives"
OPS = (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "broadcast_ppermute",
    "custom_all_reduce",
)
KIND_OF = {op: op for op in OPS} | {"broadcast_ppermute": "broadcast", "custom_all_reduce": "all_reduce"}
IMPL = {
    "all_reduce": "psum",
    "all_gather": "all_gather",
    "reduce_scatter": "psum_scatter",
    "all_to_all": "all_to_all",
    "broadcast": "spmd.broadcast (masked psum)",
    "broadcast_ppermute": "binomial tree of ppermutes",
    "custom_all_reduce": "custom all-reduce (Pallas where the tuning table takes it, else psum)",
}
ROOT = 0
MODES = ("out_of_place", "in_place")
DEFAULTS = {
    "gpu": {"begin": "8", "end": "1G", "factor": 2, "iters": 20, "repeats": 3},
    "tpu": {"begin": "8", "end": "1G", "factor": 2, "iters": 20, "repeats": 3},
    "cpu": {"begin": "8", "end": "32K", "factor": 16, "iters": 5, "repeats": 2},
}
KNOWN_PEAK_GBPS = {"H100": 450.0, "H200": 450.0, "H800": 200.0, "A100": 300.0, "B200": 900.0, "GB200": 900.0}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``spmd-bench collectives``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=8)
    p.add_argument("--ops", type=lambda s: harness.parse_list(s, _op, what="ops"), default=",".join(OPS),
                   help="comma-separated subset of these ops")  # fmt: skip
    p.add_argument(
        "--tp",
        type=lambda s: harness.parse_list(s, harness.positive_int, what="TP sizes"),
        default=None,
        help="ranks per group, e.g. 2,4,8; each must divide the device count (default: every power of two from 2 up "
        "to the device count that divides it; one set of tables per size)",
    )
    units = "bytes, with B, K, M, G (binary: 1K = 1024) as nccl-tests reads them"
    p.add_argument("-b", "--minbytes", dest="begin", type=parse_size, default=None,
                   help=f"smallest size S, {units} (default: 8 on every platform)")  # fmt: skip
    p.add_argument("-e", "--maxbytes", dest="end", type=parse_size, default=None,
                   help=f"largest size S, {units} (default: 1G on GPU/TPU, 32K on CPU)")  # fmt: skip
    p.add_argument("-f", "--stepfactor", dest="factor", type=harness.positive_int, default=None,
                   help="multiply the size by this between rows (default: 2 on GPU/TPU, 16 on CPU)")  # fmt: skip
    p.add_argument(
        "--sizes",
        type=lambda s: harness.parse_list(s, parse_size, what="sizes"),
        default=None,
        help="exact sizes S instead of -b/-e/-f, e.g. 2K,1M (default: none, the sweep)",
    )
    p.add_argument("--dtype", "-d", default="float32", choices=("float32", "bfloat16"),
                   help="element type (nccl-tests' -d float / bfloat16)")  # fmt: skip
    harness.add_timing_args(p, json_path="bench_collectives.json", iters=None, repeats=None)
    p.add_argument("--unroll", type=harness.positive_int, default=1, help="calls written out per loop iteration")
    p.add_argument("--large-size", type=parse_size, default="64M", help="sizes above this (bytes) use --large-iters")
    p.add_argument("--large-iters", type=harness.positive_int, default=None,
                   help="chained calls per timed loop above --large-size (default: --iters)")  # fmt: skip
    p.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                   help="NCCL (GPU) / gloo (CPU) beside, via torch.distributed: auto = when torch imports")  # fmt: skip
    p.add_argument("--torch-timeout-s", type=float, default=900.0,
                   help="deadline for all torch worker processes of one TP size, seconds")  # fmt: skip
    p.add_argument("--plot", default=None,
                   help="draw latency and busbw vs size to this PNG (needs '.[plot]'; default: none)")  # fmt: skip
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="the per-rank link peak (GB/s) drawn dashed on the plot (default: known per device kind, "
                   f"{KNOWN_PEAK_GBPS}, else none)")  # fmt: skip
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="skip rows whose compiled program needs more (default: 80%% of free host memory on CPU, "
                   "90%% of the device's on accelerators)")  # fmt: skip
    p.epilog = "Per-platform defaults: " + "; ".join(f"{k}: {v}" for k, v in DEFAULTS.items())
    return p


def default_tp_sizes(num_devices: int) -> list[int]:
    """The TP sizes a sweep runs without ``--tp``: every power of two from 2 up to ``num_devices`` that divides it."""
    return [1 << k for k in range(1, num_devices.bit_length()) if num_devices % (1 << k) == 0]


def _op(name: str) -> str:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; choose from {list(OPS)}")
    return name


def tree_broadcast(x: Any, axis_name: str, n: int, src: int) -> Any:
    """Rank ``src``'s ``x`` on every rank by a binomial tree of ``ppermute``: ``ceil(log2 n)`` rounds.

    In round ``i`` the ranks that already hold the data (``src``-relative ``r < 2^i``) send it to
    ``r + 2^i``; the others keep what they have.
    """
    import jax.numpy as jnp
    from jax import lax

    rel = (lax.axis_index(axis_name) - src) % n
    step = 1
    while step < n:
        perm = [((src + r) % n, (src + r + step) % n) for r in range(step) if r + step < n]
        got = lax.ppermute(x, axis_name, perm)
        x = jnp.where((rel >= step) & (rel < 2 * step), got, x)
        step *= 2
    return x


def _step(op: str, mode: str, axis: str, n: int, count: int):
    """One call of ``op`` on one rank's buffer (1-D), in ``mode``."""
    from jax import lax

    import spmd

    if op == "all_reduce":
        return lambda a: spmd.all_reduce(a, axis)
    if op == "custom_all_reduce":
        return lambda a: spmd.custom_all_reduce(a)
    if op == "broadcast":
        return lambda a: spmd.broadcast(a, axis, src=ROOT)
    if op == "broadcast_ppermute":
        return lambda a: tree_broadcast(a, axis, n, ROOT)
    if op == "all_to_all":
        return lambda a: spmd.all_to_all(a, axis, split_axis=0, concat_axis=0)
    slot = lambda: lax.axis_index(axis) * count
    if op == "all_gather":
        if mode == "out_of_place":
            return lambda a: spmd.all_gather(a, axis, axis=0)
        return lambda a: spmd.all_gather(lax.dynamic_slice(a, (slot(),), (count,)), axis, axis=0)
    if mode == "out_of_place":
        return lambda a: spmd.reduce_scatter(a, axis, axis=0)
    return lambda a: lax.dynamic_update_slice(a, spmd.reduce_scatter(a, axis, axis=0), (slot(),))


@functools.cache
def _tiler(length: int, plen: int, sharding):
    """A jitted ``[D, P] -> [D, length]``: each device repeats its pattern (``x[i] = p[i % P]``)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda p: p[:, jnp.arange(length) % plen], out_shardings=sharding)


def _measure(op: str, mode: str, tp: int, sizes, dtype, iters: int, unroll: int, repeats: int, rng, budget, devices):
    """Check and time one op in one mode: ``{time_us, algbw, busbw, wrong}`` or ``{skipped: why}``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import spmd

    mesh, kind = spmd.get_mesh(), KIND_OF[op]
    spec, n_dev, axis = P(spmd.MESH_AXES), spmd.get_mesh().devices.size, spmd.get_tp_group().axis_name
    sharding = NamedSharding(mesh, spec)
    lin, lout = input_length(kind, mode, sizes.count, tp), output_length(kind, mode, sizes.count, tp)
    plen = pattern_length(kind, mode, sizes.count, tp)
    step = _step(op, mode, axis, tp, sizes.count)
    smap = functools.partial(spmd.shard_map, check_vma=False)
    x_shape = jax.ShapeDtypeStruct((n_dev, lin), dtype, sharding=sharding)
    if mode == "in_place":
        looped, calls = harness.chain(step, iters, unroll=unroll)
        body = lambda a: looped(a[0])[None]
        loop = jax.jit(smap(body, in_specs=spec, out_specs=spec), donate_argnums=0)
        shapes = (x_shape,)
    else:
        looped, calls = harness.chain(lambda c: lax.optimization_barrier((c[0], step(c[0]))), iters, unroll=unroll)
        body = lambda a, b: tuple(v[None] for v in looped((a[0], b[0])))
        loop = jax.jit(smap(body, in_specs=(spec, spec), out_specs=(spec, spec)), donate_argnums=(0, 1))
        shapes = (x_shape, jax.ShapeDtypeStruct((n_dev, lout), dtype, sharding=sharding))
    compiled = loop.lower(*shapes).compile()
    need = harness.estimate_bytes(compiled, devices)
    if budget is not None and need is not None and need > budget:
        return {"skipped": f"needs ~{need / 1e9:.2f} GB, over the {budget / 1e9:.2f} GB budget (--max-memory-gb)"}

    pats = rng.integers(-8, 8, (n_dev, plen)).astype(np.float32)
    group_pats = np.repeat(pats.reshape(n_dev // tp, tp, plen), tp, axis=0)  # [D, tp, P]: each device's group
    x = _tiler(lin, plen, sharding)(jax.device_put(pats.astype(dtype), sharding))

    def count_wrong(a, g):
        out = step(a[0])
        ref = expected(kind, mode, g[0], lax.axis_index(axis), sizes.count, jnp.arange(out.shape[0]), root=ROOT)
        return jnp.sum(out != ref.astype(out.dtype)).astype(jnp.int32)[None]

    check = jax.jit(smap(count_wrong, in_specs=(spec, spec), out_specs=spec))
    wrong = int(np.asarray(check(x, jax.device_put(group_pats.astype(dtype), sharding))).sum())
    if mode == "in_place":
        args = (x,)
    else:
        args = (x, jax.jit(lambda: jnp.zeros((n_dev, lout), dtype), out_shardings=sharding)())
    feed = lambda out, _: out if isinstance(out, tuple) else (out,)
    seconds = harness.best_seconds(compiled, *args, repeats=repeats, feed=feed) / calls
    return {
        "time_us": seconds * 1e6,
        "algbw": nccl_format.algbw(sizes.size, seconds),
        "busbw": nccl_format.busbw(kind, sizes.size, seconds, tp),
        "wrong": wrong,
        "calls": calls,
        "memory_estimate_bytes": need,
    }


def _row(op: str, tp: int, size: int, dtype, args, rng, budget, devices) -> dict[str, Any]:
    kind = KIND_OF[op]
    sizes = nccl_format.sizes_for(kind, size, tp, dtype.itemsize)
    row: dict[str, Any] = {
        "impl": "jax",
        "op": op,
        "kind": kind,
        "tp": tp,
        "size": sizes.size,
        "size_requested": size,
        "count": sizes.count,
        "type": nccl_format.TYPE_NAMES[dtype.name],
        "redop": nccl_format.KINDS[kind].redop,
        "root": ROOT if nccl_format.KINDS[kind].rooted else -1,
    }
    iters = args.large_iters if size > args.large_size and args.large_iters else args.iters
    for mode in MODES:
        try:
            m = _measure(op, mode, tp, sizes, dtype, iters, args.unroll, args.repeats, rng, budget, devices)
        except Exception as e:  # one failing row must not hide the others; reported in the row and the exit status
            row["error"] = f"{mode}: {type(e).__name__}: {str(e)[:400]}"
            return row
        if "skipped" in m:
            row["skipped"] = m["skipped"]
            return row
        row[mode] = m
    row["ok"] = all(row[m]["wrong"] == 0 for m in MODES)
    row["us"] = row["out_of_place"]["time_us"]
    return row


def _sizes(args) -> list[int]:
    if args.sizes is not None:
        return list(args.sizes)
    return nccl_format.sweep(args.begin, args.end, args.factor)


def peak_gbps(device_kind: str, given: float | None) -> float | None:
    """The link peak for the plot: ``given``, else the known value whose name is in ``device_kind``."""
    if given is not None:
        return given
    for name in sorted(KNOWN_PEAK_GBPS, key=len, reverse=True):
        if name in device_kind:
            return KNOWN_PEAK_GBPS[name]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; non-zero when nothing was measured or any row was wrong or failed."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.plot:  # before minutes of measuring, not after
        from spmd.bench import plot

        try:
            plot.require_matplotlib()
        except harness.BenchError as e:
            p.exit(2, f"{PROG}: {e}\n")
    if args.torch != "off" and args.platform != "cpu":  # torch's workers need GPU memory beside this process's
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    args, devices = harness.parse_and_start(p, argv)
    import jax
    import numpy as np

    import spmd
    from spmd.bench import torch_collectives

    platform = devices[0].platform
    harness.fill_defaults(p, args, DEFAULTS.get(platform, DEFAULTS["gpu"]))
    try:
        sizes = _sizes(args)
    except ValueError as e:
        p.error(str(e))
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
    backend = torch_collectives.backend_for(platform, args.torch)
    if isinstance(backend, str) and backend.startswith("error:"):
        p.exit(2, f"{PROG}: {backend[len('error: ') :]}\n")
    dtype = np.dtype(jax.numpy.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
    print(
        f"# {PROG}: {n_dev} x {devices[0].device_kind} ({platform}), jax {jax.__version__}, {args.dtype}, "
        f"{args.iters} chained calls per loop (x{args.unroll} unrolled), best of {args.repeats}; "
        f"beside: {backend or 'nothing (torch ' + ('off' if args.torch == 'off' else 'not installed') + ')'}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    torch_rows: dict[tuple, dict] = {}
    kinds = sorted({KIND_OF[op] for op in args.ops}, key=list(nccl_format.KINDS).index)
    progress = harness.Progress(len(tps) * len(sizes) * (len(args.ops) + (len(kinds) if backend else 0)))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` / a scheduler: keep what was measured
    try:
        for tp in tps if backend else ():
            try:
                got = torch_collectives.run(
                    kinds, sizes, tp, dtype=args.dtype, iters=args.iters, large_size=args.large_size,
                    large_iters=args.large_iters, repeats=args.repeats, backend=backend,
                    timeout_s=args.torch_timeout_s,
                )  # fmt: skip
            except harness.BenchError as e:  # JAX's rows still run; the exit status says it failed
                print(f"{PROG}: {backend} beside failed at tp={tp}: {e}", file=sys.stderr, flush=True)
                got = [{"impl": backend, "kind": "-", "tp": tp, "error": str(e)[:2000]}]
            else:
                print_torch_tables(got, backend)
                torch_rows |= {(r["kind"], r["tp"], r["size"]): r for r in got}
            rows += got
            progress.done += len(kinds) * len(sizes)
        budget = harness.memory_budget(devices, None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9))
        rng = np.random.default_rng()
        for tp in tps:
            spmd.destroy_model_parallel()
            spmd.initialize_model_parallel(tp, devices=devices)
            for op in args.ops:
                cases = (functools.partial(_row, op, tp, size, dtype, args, rng, budget, devices) for size in sizes)
                print_jax_table(op, tp, n_dev, IMPL[op], cases, torch_rows, backend, progress, rows)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; writing the {len(rows)} rows measured so far.", file=sys.stderr, flush=True)
        interrupted = True
    else:
        interrupted = False
    finally:
        signal.signal(signal.SIGTERM, previous)
    spmd.destroy_model_parallel()
    summarize(rows)
    meta = harness.metadata(
        PROG, argv, devices, dtype=args.dtype, iters=args.iters, repeats=args.repeats, unroll=args.unroll,
        torch_backend=backend, sizes=sizes, tps=tps, peak_gbps=peak_gbps(devices[0].device_kind, args.peak_gbps),
    )  # fmt: skip
    status = harness.finish(rows, meta | {"interrupted": interrupted}, args.json, prog=PROG)
    if args.plot and any("us" in r for r in rows):
        plot.write_png({"meta": meta, "results": rows}, args.plot)
        print(f"wrote {args.plot}", flush=True)
    return 130 if interrupted else status


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
