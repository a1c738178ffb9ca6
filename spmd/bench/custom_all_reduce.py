"""Benchmark: Pallas one-shot / two-shot / auto against XLA's psum, on the local devices.

    python -m spmd.bench.custom_all_reduce --world-sizes 2,4 --json car.json
    python -m spmd.bench.custom_all_reduce --write-tuning tuning.json   # then ship it as
        # spmd/communicators/custom_all_reduce_tuning.json

On GPUs the Mosaic GPU one-shot and two-shot on persistent peer buffers run
(``kernels.custom_all_reduce.peer``, ``.two_shot``); on TPUs the TPU form; on CPU (``--platform cpu``) the TPU form in
Pallas's interpret mode, which checks the algorithm and the harness but times nothing useful. Two
GPU-only floors of the same kernel can be timed beside the all-reduces, to show what limits it:
``peer_flags`` (the per-call flag exchange with the peers, no data staged or read) and
``peer_copy`` (one launch copying the input, no peers); and the GPU one-shot's two protocols
forced, ``ll`` (data pushed with an epoch beside every word) and ``pull`` (staged, one flag round,
peers read), from which ``--write-tuning`` takes the ``ll_max_bytes`` switch.

For each world size (the first N devices) and each size (bytes per device, bf16), every variant
is checked once (kernels bitwise against the rank-ordered float32 reference and identical on every
rank; psum within bf16 tolerance), then timed as ``--iters`` chained calls (each call's output
is the next call's input, nothing else in between) in one jitted ``lax.fori_loop`` whose body
holds ``--unroll`` calls written out, best of ``--repeats`` (:mod:`spmd.bench.harness`). The
table gives microseconds per call and the ratio to psum.

With ``--write-tuning PATH`` the measured crossovers become this platform's rows of the tuning
table written to ``PATH`` (starting from ``PATH`` if it exists, else the shipped table), and
``auto`` is re-timed with it. The installed package is never written to.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from spmd.bench import harness

__all__ = ["DEFAULTS", "build_parser", "crossovers", "main"]

PROG = "python -m spmd.bench.custom_all_reduce"
VARIANTS = ("xla", "one_shot", "two_shot", "auto", "ll", "pull", "peer_flags", "peer_copy")
GPU_ONLY = ("ll", "pull", "peer_flags", "peer_copy")
FLOORS = ("peer_flags", "peer_copy")
FLOOR_MAX_BYTES = 32 * 1024  # the floors are latency probes: larger sizes add nothing
LL_MAX_BYTES = 512 * 1024  # what the low-latency protocol's inbox takes (kernels.symmetric_memory.Layout)
DEFAULTS = {
    "gpu": {
        "sizes": "2KiB,8KiB,32KiB,128KiB,512KiB,1MiB,2MiB,8MiB",
        "variants": "xla,one_shot,auto,ll,pull,peer_flags,peer_copy",
        "iters": 200,
        "repeats": 5,
        "unroll": 20,
    },
    "tpu": {
        "sizes": "2KiB,8KiB,32KiB,128KiB,512KiB,2MiB",
        "variants": "xla,one_shot,two_shot,auto",
        "iters": 200,
        "repeats": 5,
        "unroll": 20,
    },
    # Interpret mode is slow, and its thread barrier needs a core per simulated device.
    "cpu": {"sizes": "2KiB,8KiB", "variants": "xla,one_shot,two_shot,auto", "iters": 2, "repeats": 1, "unroll": 1},
}


def _variant(name: str) -> str:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    gpu, cpu = DEFAULTS["gpu"], DEFAULTS["cpu"]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=2)
    p.add_argument(
        "--world-sizes",
        type=lambda s: harness.parse_list(s, harness.positive_int, what="world sizes"),
        default=None,
        help="group sizes, e.g. 2,4 (default: every power of two up to the device count)",
    )
    p.add_argument(
        "--sizes",
        type=lambda s: harness.parse_list(s, harness.parse_size, what="sizes"),
        default=None,
        help=f"bytes per device, rounded up to a multiple of 16 B (default: {gpu['sizes']}; CPU {cpu['sizes']})",
    )
    p.add_argument(
        "--variants",
        type=lambda s: harness.parse_list(s, _variant, what="variants"),
        default=None,
        help=f"what to time; {','.join(GPU_ONLY)} are GPU-only (default: {gpu['variants']}; CPU/TPU without them)",
    )
    p.add_argument(
        "--unroll",
        type=harness.positive_int,
        default=None,
        help="calls per loop iteration, written out straight (an XLA:GPU while-loop iteration costs "
        f"~15-20 us) (default: {gpu['unroll']}; CPU {cpu['unroll']})",
    )
    p.add_argument(
        "--write-tuning",
        metavar="PATH",
        default=None,
        help="write the measured crossovers to this tuning table (default: do not write one)",
    )
    harness.add_timing_args(p, json_path="bench_custom_all_reduce.json", iters=None, repeats=None)
    p.epilog = (
        f"Per-platform --iters/--repeats defaults: GPU/TPU {gpu['iters']}/{gpu['repeats']}, "
        f"CPU {cpu['iters']}/{cpu['repeats']}."
    )
    return p


def crossovers(rows: Sequence[dict[str, Any]], world: int) -> tuple[int, int, int]:
    """``(max_bytes, one_shot_max_bytes, ll_max_bytes)`` for one world size, from measured rows.

    ``max_bytes`` is the largest size below which the best correct kernel beats psum at every
    measured size (``auto`` must never be slower than psum: the sweep stops at the first size
    where no kernel wins); ``one_shot_max_bytes`` the largest such size where one-shot (either
    GPU protocol counts as one-shot) is the best kernel; ``ll_max_bytes`` the largest size up to
    which the GPU one-shot's ``ll`` protocol beat ``pull`` at every size where both were timed.

    Args:
      rows: harness rows with ``world``, ``bytes``, ``variant``, ``us`` and ``ok``.
      world: the world size to read.
    """
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.get("world") == world and "us" in r:
            by_size.setdefault(r["bytes"], {})[r["variant"]] = r
    max_bytes, one_shot_max, ll_max = 0, 0, 0
    for size in sorted(by_size):
        cells = by_size[size]
        psum = cells.get("xla", {}).get("us")
        cands = {v: cells[v]["us"] for v in ("one_shot", "two_shot", "ll", "pull") if v in cells and cells[v].get("ok")}
        if not psum or not cands or min(cands.values()) >= psum:
            break
        max_bytes = size
        if min(cands, key=cands.get) != "two_shot":
            one_shot_max = size
    for size in sorted(by_size):
        ll, pull = (by_size[size].get(v, {}) for v in ("ll", "pull"))
        if not (ll.get("ok") and pull.get("ok")):
            continue
        if ll["us"] >= pull["us"]:
            break
        ll_max = size
    return max_bytes, one_shot_max, ll_max


def _case(variant: str, n: int, size: int, args: argparse.Namespace, platform: str, rng, tuning=None) -> harness.Case:
    """One row: ``variant`` over the first ``n`` devices on ``size`` bytes of bf16 per device."""
    label = "auto (tuned)" if variant == "auto" and tuning is not None else variant

    def build() -> harness.Trial:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import spmd
        from kernels.custom_all_reduce import reference_all_reduce
        from spmd.communicators import custom_all_reduce, select_algorithm

        elems = size // 2
        spec = P(spmd.MESH_AXES)
        if variant == "xla":
            op = lambda v: spmd.all_reduce(v, "tp")
        elif variant in GPU_ONLY:
            from kernels import symmetric_memory
            from kernels.custom_all_reduce.peer import one_shot_peer

            bufs = symmetric_memory.allocate(spmd.get_mesh(), "tp")
            mode = variant.removeprefix("peer_") if variant in FLOORS else "full"
            protocol = "pull" if variant in FLOORS else variant

            def op(v):
                pad = -(-v.size // 1024) * 1024 - v.size  # whole 2 KiB tiles of bf16
                table = bufs.peer_table("tp")
                out = one_shot_peer(
                    jnp.pad(v, (0, pad)), table, world_size=n, layout=bufs.layout, mode=mode, protocol=protocol
                )
                return out[: v.size]
        else:
            op = lambda v: custom_all_reduce(v, "tp", algorithm=variant, tuning=tuning)
        x = rng.standard_normal((n, elems)).astype(np.float32).astype(jnp.bfloat16)
        xd = jax.device_put(x, NamedSharding(spmd.get_mesh(), spec))
        per_device = lambda f: jax.jit(spmd.shard_map(f, in_specs=spec, out_specs=spec, check_vma=False))
        once = per_device(lambda v: (op(v[0])[None], reference_all_reduce(v[0], "tp")[None]))
        # Nothing between calls (the values overflow; the timing does not care): an elementwise
        # rescale would add a kernel launch per call to every variant.
        chained, calls = harness.chain(op, args.iters, unroll=args.unroll)
        loop = per_device(lambda v: chained(v[0])[None])
        to_psum = variant == "auto" and select_algorithm((elems,), jnp.bfloat16, n, platform, tuning=tuning) == "xla"

        def check(outputs):
            out, want = (np.asarray(a).astype(np.float32) for a in outputs)
            same = all(np.array_equal(out[0], out[r]) for r in range(n))
            if variant in FLOORS:
                return {"ok": True, "identical_on_ranks": same}  # floors are not all-reduces
            if variant == "xla" or to_psum:
                dense = x.astype(np.float64).sum(0)
                return {"ok": bool(np.allclose(out, dense, rtol=2e-2, atol=2e-2 * n)), "identical_on_ranks": same}
            return {"ok": bool(np.array_equal(out, want)) and same, "identical_on_ranks": same}

        return harness.Trial(
            once=lambda: once(xd), check=check, loop=loop, args=(xd,), calls=calls, extra={"bytes_moved": size}
        )

    key = {"world": n, "bytes": size, "size": harness.format_size(size), "variant": label}
    return harness.Case(key=key, build=build)


def _vs_psum(row: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    for r in earlier:
        if r.get("variant") == "xla" and r["world"] == row["world"] and r["bytes"] == row["bytes"] and "us" in r:
            if row["variant"] != "xla":
                row["vs_psum"] = f"{row['us'] / r['us']:.2f}x"


COLUMNS = [
    harness.Column("world", "world", 5),
    harness.Column("size", "bytes/dev", 10),
    harness.Column("variant", "variant", 12),
    harness.Column("us", "us/call", 10, ".1f"),
    harness.Column("vs_psum", "vs psum", 8),
    harness.Column("ok", "check", 6),
]


def _write_tuning(path: pathlib.Path, rows, worlds, platform: str, meta: dict[str, Any]) -> dict[str, Any]:
    from spmd.communicators import TUNING_PATH

    table = json.loads((path if path.exists() else TUNING_PATH).read_text())
    stamp = f"{meta['device_kind']}, {meta['date'][:10]}, {meta['command']}"
    for n in worlds:
        max_bytes, one_shot_max, ll_max = crossovers(rows, n)
        timed = {r["variant"] for r in rows if r.get("world") == n and r.get("ok")}
        timed |= {"one_shot"} if timed & {"ll", "pull"} else set()  # the one-shot's two protocols
        table.setdefault("platforms", {}).setdefault(platform, {})[str(n)] = {
            "max_bytes": max_bytes,
            "one_shot_max_bytes": one_shot_max,
            "ll_max_bytes": ll_max,
            "source": stamp,
            "algorithms": [a for a in ("one_shot", "two_shot") if a in timed],  # auto never runs an untimed kernel
        }
    path.write_text(json.dumps(table, indent=2) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; non-zero when nothing was measured or a variant was wrong or failed."""
    p = build_parser()
    args, devices = harness.parse_and_start(p, argv)
    platform = devices[0].platform
    kind = "gpu" if platform in ("gpu", "cuda") else "tpu" if platform == "tpu" else "cpu"
    harness.fill_defaults(p, args, DEFAULTS[kind])
    if kind != "gpu":
        bad = [v for v in args.variants if v in GPU_ONLY]
        if bad:
            p.error(f"--variants {','.join(bad)}: GPU-only, and this machine runs on {platform}")
    if args.write_tuning and kind == "cpu":
        p.error("--write-tuning needs GPU or TPU timings; interpret-mode times on CPU measure the interpreter")
    worlds = args.world_sizes or [w for w in (2, 4, 8) if w <= len(devices)]
    too_big = [w for w in worlds if w > len(devices)]
    if too_big or not worlds:
        p.error(f"--world-sizes: expected sizes of at least 2 and at most the {len(devices)} devices, got {worlds}")
    sizes = []
    for s in args.sizes:
        rounded = -(-s // 16) * 16
        if rounded != s:
            print(f"note: {s} B rounded up to {rounded} B (whole 16-byte vectors of bf16)", flush=True)
        sizes.append(rounded)

    import jax
    import numpy as np

    import spmd

    print(
        f"{PROG}: {len(devices)} x {devices[0].device_kind} ({platform}), jax {jax.__version__}, bf16, "
        f"{args.iters} chained calls (unroll {args.unroll}), best of {args.repeats}",
        flush=True,
    )
    rng = np.random.default_rng()
    meta = harness.metadata(PROG, argv, devices, iters=args.iters, repeats=args.repeats, unroll=args.unroll)

    def sweep(variants, tuning=None):
        rows = []
        for n in worlds:
            spmd.destroy_model_parallel()
            spmd.initialize_model_parallel(n, devices=devices[:n])
            cases = [
                _case(v, n, size, args, kind, rng, tuning)
                for size in sizes
                for v in variants
                if not (v in FLOORS and size > FLOOR_MAX_BYTES) and not (v == "ll" and size > LL_MAX_BYTES)
            ]
            rows += harness.run_cases(cases, COLUMNS, devices=devices[:n], repeats=args.repeats, derive=_vs_psum)
        return rows

    rows = sweep(args.variants)
    if args.write_tuning:
        path = pathlib.Path(args.write_tuning)
        table = _write_tuning(path, rows, worlds, kind, meta)
        print(f"\nwrote {path}: {json.dumps(table['platforms'][kind])}", flush=True)
        tuned = sweep(["xla", "auto"], tuning=str(path))
        rows += [r for r in tuned if r["variant"] == "auto (tuned)"]
    spmd.destroy_model_parallel()
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
