"""Benchmark: the fused all-reduce + residual + RMSNorm kernel against the plain kernel + XLA's add and norm (GPU).

    python -m spmd.bench.fused_norm --rows 1,8,64,128 --hidden 2048 --json bench_fused_norm.json

World size 1 on the first GPU (the kernel's exchange with itself): what the fusion saves is one
launch, which does not depend on the peers. Rows per call, each chained ``--iters`` times in one
program (20 calls written out per loop iteration, so the loop's own cost is spread), best of
``--repeats``: ``fused`` (one kernel), ``plain+xla`` (the ll one-shot, then XLA's fused add and
RMSNorm), ``xla`` (the add and RMSNorm alone: no all-reduce). Prints a table, writes ``--json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from spmd.bench import harness

PROG = "python -m spmd.bench.fused_norm"
VARIANTS = ("fused", "plain+xla", "xla")
UNROLL = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=harness.HelpFormatter)
    rows = lambda t: harness.parse_list(t, harness.positive_int, what="rows")
    p.add_argument("--rows", type=rows, default="1,8,64,128", help="rows (tokens) per call")
    p.add_argument("--hidden", type=harness.positive_int, default=2048, help="hidden size (bf16)")
    p.add_argument("--iters", type=harness.positive_int, default=400, help="chained calls per timed run")
    p.add_argument("--repeats", type=harness.positive_int, default=5, help="timed runs (best reported)")
    p.add_argument("--json", default="bench_fused_norm.json", help="where to write the results")
    return p


def _time(rows: int, hidden: int, variant: str, iters: int, repeats: int, bufs: Any) -> float:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import spmd
    from kernels.custom_all_reduce import fused, peer
    from spmd.communicators.xla import rms_norm

    eps = 1e-5

    def step(c, w):
        x, r = c
        t = bufs.peer_table("x")
        if variant == "fused":
            return fused.fused_add_rms_norm_peer(x, r, w, t, world_size=1, layout=bufs.layout, eps=eps)
        if variant == "plain+xla":
            x = peer.one_shot_peer(x.reshape(-1), t, world_size=1, layout=bufs.layout, protocol="ll").reshape(x.shape)
        h = x + r
        return rms_norm(h, w, eps), h

    def loop(x, r, w):
        def body(i, c):
            for _ in range(UNROLL):
                c = step(c, w)
            return c

        return jax.lax.fori_loop(0, max(1, iters // UNROLL), body, (x, r))

    f = jax.jit(spmd.shard_map(loop, mesh=bufs.mesh, in_specs=(P(),) * 3, out_specs=(P(), P()), check_vma=False))
    x = jnp.full((rows, hidden), 0.01, jnp.bfloat16)
    w = jnp.ones((hidden,), jnp.bfloat16)
    jax.block_until_ready(f(x, x, w))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, x, w))
        best = min(best, time.perf_counter() - t0)
    return best / (max(1, iters // UNROLL) * UNROLL)


def main(argv: list[str] | None = None) -> int:
    """Time the three variants for each row count; see the module docstring."""
    p = build_parser()
    args = p.parse_args(argv)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from kernels.symmetric_memory import allocate

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        p.exit(2, f"{PROG}: needs a GPU (the kernel is Mosaic GPU).\n")
    bufs = allocate(Mesh(np.array(gpus[:1]), ("x",)), "x")
    print(f"{'rows':>5} {'hidden':>7} " + " ".join(f"{v:>12}" for v in VARIANTS) + "   (us per call, world size 1)")
    rows = []
    for n in args.rows:
        row = {"rows": n, "hidden": args.hidden, "ok": True}
        for v in VARIANTS:
            row[f"{v}_us"] = _time(n, args.hidden, v, args.iters, args.repeats, bufs) * 1e6
        row["us"] = row["fused_us"]
        rows.append(row)
        print(f"{n:>5} {args.hidden:>7} " + " ".join(f"{row[f'{v}_us']:>12.2f}" for v in VARIANTS), flush=True)
    meta = harness.metadata(PROG, argv, gpus[:1], iters=args.iters, repeats=args.repeats, unroll=UNROLL)
    return harness.finish(rows, meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
