"""Benchmark and tuner: the decode GEMV kernel (kernels/gemv) against XLA's product, per layer shape.

    python -m models.bench_gemv --json gemv.json                       # a GPU: the 1B Llama's shapes, TP 1
    python -m models.bench_gemv --tp 1,2,4 --write-table kernels/gemv/gemv_tuning.json
    python -m models.bench_gemv --platform cpu                         # interpret mode, tiny shapes (smoke)

For each product a decode step makes on one device (per layer: QKV, output, gate/up, down; the tied
LM head in the ``nk`` layout), at each row count (``--rows``, the decode batch), it times XLA's
``jnp.dot`` and every tiling of a sweep, each chained ``--iters`` times in one jitted loop over
``--copies`` different weights (so the weights come from HBM, not from the 60 MB L2, as in a real
step where every layer has its own), and reports the best tiling beside XLA with the bandwidth
(weight bytes / time) and the share of ``--hbm-tbps``. Each chained product is followed by one
dependent elementwise op (the next input depends on the output), as in a decode step.
``--write-table PATH`` merges the winners into a tuning file: the kernel where it beat XLA by
more than 3% (the spread between runs), an entry saying XLA where it did not.

``down_swiglu`` is the down projection with the MLP's activation built in (``prologue="swiglu"``):
its input is the gate/up projection's float32 partials (as many as the table's gate/up tiling
makes), and its baseline ("XLA" column) is what runs without it: XLA's activation fusion, then the
down projection as the table picks it (the kernel or XLA's product).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import sys
import time
from typing import Any

from spmd.bench import harness

__all__ = ["build_parser", "layer_shapes", "main", "sweep"]

PROG = "python -m models.bench_gemv"


def layer_shapes(a: Any, tp: int) -> list[tuple[str, str, int, int]]:
    """``(name, layout, K, N)`` of the products one device makes per decode step at this TP size."""
    d = a.hidden // a.heads
    qkv = (a.heads // tp + 2 * max(a.kv_heads // tp, 1)) * d
    vocab = -(-a.vocab // (64 * tp)) * 64  # rows per rank of the padded vocabulary
    return [
        ("qkv", "kn", a.hidden, qkv),
        ("o", "kn", a.heads * d // tp, a.hidden),
        ("gate_up", "kn", a.hidden, 2 * a.intermediate // tp),
        ("down", "kn", a.intermediate // tp, a.hidden),
        ("down_swiglu", "kn", a.intermediate // tp, a.hidden),
        ("lm_head", "nk", a.hidden, vocab),
    ]


def sweep(m: int, k: int, n: int, layout: str) -> list[Any]:
    """The tilings tried for one product, most promising first.

    Enough programs to fill the GPU (about four per SM of an H100/H200's 132), tiles that fit in
    registers; ordered by distance from 528 programs of 8192-element tiles.
    """
    import math

    from kernels.gemv import GemvConfig, ineligibility

    out, score = [], {}
    for bn, bk, splits in itertools.product((32, 64, 128, 256), (16, 32, 64, 128, 256), (1, 2, 4, 8, 16, 32)):
        programs = (n // bn) * splits
        tile = bn * bk * (1 if m == 1 else max(16, 1 << (m - 1).bit_length()) // 16)
        if not 128 <= programs <= 4096 or not 2048 <= tile <= 32768 or (m > 1 and bk < 32):
            continue
        for warps in (4, 8) if tile >= 8192 else (4,):
            c = GemvConfig(bn, bk, splits, warps, 3)
            if ineligibility(m, k, n, c, layout) is None:
                out.append(c)
                contiguous = 2 * (bn if layout == "kn" else bk)  # bytes of one weight row segment
                score[c] = (abs(math.log2(programs / 528)) + abs(math.log2(tile / 8192)) + (warps == 8) * 0.25
                            + (contiguous < 128))  # fmt: skip
    return sorted(out, key=score.__getitem__)


def neighbours(c: Any, m: int, k: int, n: int, layout: str) -> list[Any]:
    """Tilings one step from ``c``: each of block_n, block_k and splits halved or doubled, the other warp
    count, and 2 or 4 pipeline stages; only those that fit the shape."""
    from kernels.gemv import ineligibility

    out = []
    for field in ("block_n", "block_k", "splits"):
        for f in (0.5, 2):
            out.append(dataclasses.replace(c, **{field: int(getattr(c, field) * f)}))
    out.append(dataclasses.replace(c, num_warps=8 if c.num_warps == 4 else 4))
    out += [dataclasses.replace(c, num_stages=st) for st in (2, 4) if st != c.num_stages]
    return [x for x in out if x.block_n >= 16 and x.block_k >= 16 and ineligibility(m, k, n, x, layout) is None]


def _try(c: Any, layout: str, x: Any, ws: list, ref: Any, args: Any, interpret: bool, prologue: str = "none") -> dict:
    """Check one tiling against the reference and time it; a failure is recorded, not raised."""
    import numpy as np

    from kernels.gemv import gemv

    try:
        f = lambda x, w: gemv(x, w, config=c, layout=layout, prologue=prologue, interpret=interpret)
        y = np.asarray(f(x, ws[0]), np.float64)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        if not err < 1e-2:
            raise ValueError(f"relative error {err:.2e}")
        return {"config": dataclasses.asdict(c), "us": _timed(f, x, ws, args.iters, args.repeats) * 1e6, "rel_err": err}
    except Exception as e:  # a tiling that fails to compile or is wrong is reported, not fatal
        return {"config": dataclasses.asdict(c), "error": f"{type(e).__name__}: {str(e)[:200]}"}


def _table_config(kind: str, layout: str, k: int, n: int, m: int, prologue: str = "none") -> Any:
    """The shipped table's tiling for this product (``None`` if it lists none, or says XLA)."""
    from kernels.gemv import load_table, lookup

    return lookup(load_table(), kind, "bfloat16", layout, m, k, n, prologue)


def _swiglu_operands(a: Any, kind: str, tp: int, m: int, key: Any, interpret: bool) -> tuple[Any, Any]:
    """``(x, apart)`` for ``down_swiglu``: the gate/up partials ``f32[S, M, 2K]`` and the product without
    the prologue (XLA's activation, then the down projection as the table picks it)."""
    import jax
    import jax.numpy as jnp

    from kernels.gemv import GemvConfig, gemv, reference_matmul

    gate_up = next(s for s in layer_shapes(a, tp) if s[0] == "gate_up")
    up_config = _table_config(kind, "kn", gate_up[2], gate_up[3], m)
    if interpret:
        up_config = GemvConfig(32, 16, 2)
    s = up_config.splits if up_config else 1
    x = jax.random.normal(jax.random.fold_in(key, 98), (s, m, gate_up[3]), jnp.float32)
    k, n = gate_up[3] // 2, a.hidden

    def apart(x, w):
        g, u = jnp.split(jnp.sum(x, axis=0).astype(w.dtype), 2, axis=-1)
        act = jax.nn.silu(g) * u
        c = GemvConfig(32, 16, 2) if interpret else _table_config(kind, "kn", k, n, m)
        return reference_matmul(act, w) if c is None else gemv(act, w, config=c, interpret=interpret)

    return x, apart


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=harness.HelpFormatter)
    harness.add_device_args(p, cpu_devices=1)
    for name, default in (("layers", 16), ("hidden", 2048), ("heads", 32), ("kv_heads", 8), ("intermediate", 8192),
                          ("vocab", 128256)):  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=harness.positive_int, default=default)
    ints = lambda what: lambda s: harness.parse_list(s, harness.positive_int, what=what)
    p.add_argument("--tp", type=ints("TP sizes"), default=[1], help="the per-device shapes of these TP sizes")
    p.add_argument("--rows", type=ints("row counts"), default=[1], help="M: the decode batch sizes (1 to 64)")
    p.add_argument(
        "--only", default=None, help="product names, comma-separated: qkv,o,gate_up,down,down_swiglu,lm_head"
    )
    p.add_argument("--copies", type=harness.positive_int, default=8, help="weights rotated in the timed loop")
    p.add_argument("--max-configs", type=harness.positive_int, default=48, help="tilings tried per product at most")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth, TB/s (H200: 4.8)")
    p.add_argument("--write-table", default=None, help="merge the winners into this tuning file")
    p.add_argument(
        "--refine", type=int, default=0,
        help="start from the table's tiling (else the sweep) and take this many rounds of one-step neighbours",
    )  # fmt: skip
    harness.add_timing_args(p, json_path="gemv.json", iters=50, repeats=5)
    return p


def _timed(fn, x, ws, iters: int, repeats: int) -> float:
    """Seconds per product: ``fn`` chained over the rotated weights in one jitted loop."""
    import jax
    import jax.numpy as jnp

    def loop(x, ws):
        def body(i, x):
            for w in ws:
                y = fn(x, w)
                x = (x.astype(jnp.float32) + y[:, :1].astype(jnp.float32) * 1e-3).astype(x.dtype)
            return x

        return jax.lax.fori_loop(0, iters, body, x)

    return harness.best_seconds(jax.jit(loop), x, ws, repeats=repeats) / (iters * len(ws))


def main(argv: list[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.gemv import GemvConfig, reference_matmul

    p = build_parser()
    args, devices = harness.parse_and_start(p, argv)
    interpret = devices[0].platform != "gpu"
    if interpret:  # a smoke run: tiny shapes, the kernel in Pallas's interpreter
        args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab = 256, 4, 2, 512, 1000
        args.iters, args.repeats, args.copies, args.max_configs = 2, 1, 2, 3
    only = set(args.only.split(",")) if args.only else None
    kind, dtype = devices[0].device_kind, jnp.bfloat16
    print(f"{PROG}: {kind}, bf16, {args.copies} weights rotated, {args.iters} loops; HBM {args.hbm_tbps} TB/s")
    header = f"{'tp':>3} {'product':>11} {'M':>3} {'K':>6} {'N':>7} {'MB':>6} {'XLA us':>8} {'best us':>8} " \
             f"{'x XLA':>6} {'TB/s':>5} {'% HBM':>6}  tiling (bn, bk, splits, warps, stages)"  # fmt: skip
    print(header + "\n" + "-" * len(header), flush=True)
    rows, key, failures, start = [], jax.random.key(0), 0, time.perf_counter()
    meta = harness.metadata(PROG, argv, devices, hbm_tbps=args.hbm_tbps, copies=args.copies, iters=args.iters)
    for tp in args.tp:
        for name, layout, k, n in layer_shapes(args, tp):
            if only and name not in only:
                continue
            for m in args.rows:
                shape = (k, n) if layout == "kn" else (n, k)
                ws = [(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * k**-0.5).astype(dtype)
                      for i in range(args.copies)]  # fmt: skip
                prologue = "swiglu" if name == "down_swiglu" else "none"
                if prologue == "none":
                    x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.float32).astype(dtype)
                    base = lambda x, w, lay=layout: reference_matmul(x, w, lay)
                else:
                    x, base = _swiglu_operands(args, kind, tp, m, key, interpret)
                ref = np.asarray(jax.jit(base)(x, ws[0]), np.float64)
                wbytes = ws[0].size * 2
                xla = _timed(base, x, ws, args.iters, args.repeats)
                tried: list[dict] = []
                start_from = _table_config(kind, layout, k, n, m, prologue) if args.refine else None
                todo = [start_from] if start_from else sweep(m, k, n, layout)[: args.max_configs]
                todo = todo or [GemvConfig(32, 16, 1)]  # shapes too small for the sweep's filters (CPU smoke runs)
                for round_ in range(args.refine + 1):  # the sweep (or the table's tiling), then one-step neighbours
                    if round_:
                        done = [t for t in tried if "us" in t]
                        if not done:
                            break
                        best_config = GemvConfig(**min(done, key=lambda t: t["us"])["config"])
                        todo = neighbours(best_config, m, k, n, layout)
                    for c in todo:
                        if all(t["config"] != dataclasses.asdict(c) for t in tried):
                            tried.append(_try(c, layout, x, ws, ref, args, interpret, prologue))
                failures += sum("error" in t for t in tried)
                done = [t for t in tried if "us" in t]
                best = min(done, key=lambda t: t["us"]) if done else None
                row = dict(tp=tp, product=name, layout=layout, m=m, k=k, n=n, weight_bytes=wbytes, xla_us=xla * 1e6,
                           prologue=prologue, tried=tried)  # fmt: skip
                if best is not None:
                    row.update(best_us=best["us"], best=best["config"])
                rows.append(row)
                b_us = row.get("best_us", float("nan"))
                tbs = wbytes / (min(b_us, row["xla_us"]) * 1e-6) / 1e12
                tiling = tuple(row["best"].values()) if best else "-"
                print(f"{tp:>3} {name:>11} {m:>3} {k:>6} {n:>7} {wbytes / 1e6:>6.1f} {row['xla_us']:>8.1f} "
                      f"{b_us:>8.1f} {row['xla_us'] / b_us:>6.2f} {tbs:>5.2f} {100 * tbs / args.hbm_tbps:>6.0f}  "
                      f"{tiling}", flush=True)  # fmt: skip
                # written as it goes: a run stopped at its time limit keeps what it measured
                pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
                if args.write_table and not interpret:
                    _write_table(pathlib.Path(args.write_table), [row], kind)
    print(f"\n{len(rows)} products, {failures} tilings failed, {time.perf_counter() - start:.0f} s; wrote {args.json}"
          + (f", merged into {args.write_table}" if args.write_table and not interpret else ""))  # fmt: skip
    if not rows:
        print(f"{PROG}: nothing was measured.", file=sys.stderr)
        return 1
    return 0


def _rows(m: int) -> list[int]:
    """The row counts a measurement at ``m`` stands for: the kernel pads ``M > 1`` to 16, 32 or 64 rows."""
    if m == 1:
        return [1, 1]
    hi = max(16, 1 << (m - 1).bit_length())
    return [2 if hi == 16 else hi // 2 + 1, hi]


def _write_table(path: pathlib.Path, rows: list[dict], kind: str) -> None:
    """Merge measured rows into a tuning file: the kernel where it beat XLA, else an entry that says XLA."""
    raw = json.loads(path.read_text()) if path.exists() else {"entries": []}
    fresh = {}
    for r in rows:
        wins = "best_us" in r and r["best_us"] < 0.97 * r["xla_us"]  # a win beyond run-to-run noise
        prologue = r.get("prologue", "none")
        fresh[(kind, "bfloat16", r["layout"], r["k"], r["n"], _rows(r["m"])[0], prologue)] = {
            "device_kind": kind, "dtype": "bfloat16", "layout": r["layout"], "k": r["k"], "n": r["n"],
            "rows": _rows(r["m"]), "config": r["best"] if wins else None,
            "us": round(r.get("best_us", r["xla_us"]), 2), "xla_us": round(r["xla_us"], 2),
            **({"prologue": prologue} if prologue != "none" else {}),
        }  # fmt: skip
    kept = [e for e in raw["entries"]
            if (e["device_kind"], e["dtype"], e["layout"], e["k"], e["n"], e["rows"][0],
                e.get("prologue", "none")) not in fresh]  # fmt: skip
    raw["entries"] = kept + list(fresh.values())
    path.write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
