"""Probe: ``DevicePutKVPipe`` between two processes of one job: single arrays and whole KV caches.

    spmd-launch --nproc-per-node 2 -m spmd.bench.kv_device_put --sizes 20MiB,256MiB        # one GPU per process
    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 1 -m spmd.bench.kv_device_put --sizes 1MiB,20MiB

Process 0 sends from all its devices, process 1 receives on all of its own (TP = devices per
process). For each size, rows by ``--modes``:

* ``array``: one bf16 array of that size, ``send_tensor`` / ``recv_tensor`` (first device to first);
* ``kv-packed`` / ``kv-pieces``: a KV cache of that size, ``--kv-layers`` layers x K and V, each
  ``bf16[--kv-heads, tokens, --head-dim]`` (tokens from the size), sharded by heads over the
  sender's devices, ``send_kv_cache`` / ``recv_kv_cache`` with ``pack=True`` (one packed buffer
  per device pair) or ``pack=False`` (the pieces, one batched ``device_put`` per device pair).

Every message starts at a barrier of both processes; process 1 times from there until every
received array is ready (the sender's work counts), one warm-up then the best of ``--repeats``,
and checks every byte of the last message against the sender's data (regenerated from the same
seed). Where torch with two CUDA devices is importable, process 1 then times a torch
``cuda:0 -> cuda:1`` copy of each size in a subprocess (the peer-copy ceiling; events on the source
device's stream) and prints each row's fraction of it. Process 1 prints the table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from spmd.bench import harness

MODES = ("array", "kv-packed", "kv-pieces")
PROG = "spmd-launch --nproc-per-node 2 -m spmd.bench.kv_device_put"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=harness.HelpFormatter)
    p.add_argument(
        "--sizes",
        type=lambda t: harness.parse_list(t, harness.parse_size, what="sizes"),
        default="20MiB,256MiB",
        help="message sizes",
    )
    p.add_argument(
        "--modes", type=lambda t: harness.parse_list(t, _mode, what="modes"), default=",".join(MODES), help="rows"
    )
    p.add_argument("--kv-layers", type=harness.positive_int, default=32, help="KV-cache layers (each K and V)")
    p.add_argument("--kv-heads", type=harness.positive_int, default=8, help="KV heads per layer")
    p.add_argument("--head-dim", type=harness.positive_int, default=128, help="head size")
    p.add_argument("--repeats", type=harness.positive_int, default=5, help="timed messages per row (best reported)")
    p.add_argument("--json", default="bench_kv_device_put.json", help="where process 1 writes the results")
    p.add_argument("--torch-peer-copy", action="store_true", help=argparse.SUPPRESS)  # the baseline's subprocess
    return p


def _mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"expected one of {', '.join(MODES)}, got {text!r}")
    return text


def _tokens(size: int, args: argparse.Namespace) -> int:
    """Tokens per layer so that 2 x layers x bf16[heads, tokens, head_dim] is ``size`` bytes."""
    per_token = 2 * args.kv_layers * args.kv_heads * args.head_dim * 2
    if size % per_token:
        raise harness.BenchError(
            f"--sizes {harness.format_size(size)}: a KV cache of {args.kv_layers} layers x K and V of "
            f"bf16[{args.kv_heads}, tokens, {args.head_dim}] comes in steps of {per_token} bytes."
        )
    return size // per_token


# ---------------------------------------------------------------------------------------------------
# The torch baseline (a subprocess of process 1, so torch never shares a process with JAX)


def _torch_rows(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    rows = []
    for size in sizes:
        a = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda:0")
        b = torch.empty(size, dtype=torch.uint8, device="cuda:1")
        times = []
        for i in range(repeats + 1):
            with torch.cuda.device(0):  # torch copies between devices on the source device's stream
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                b.copy_(a)
                end.record()
            end.synchronize()
            torch.cuda.synchronize(1)
            if i:
                times.append(start.elapsed_time(end) / 1e3)
        ok = bool(torch.equal(a.cpu(), b.cpu()))
        best = min(times)
        rows.append({"mode": "torch-peer-copy", "bytes": size, "us": best * 1e6, "GBps": size / best / 1e9, "ok": ok})
        del a, b
        torch.cuda.empty_cache()
    return rows


def _run_torch_baseline(args: argparse.Namespace) -> list[dict[str, Any]]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return []
    cmd = [sys.executable, "-m", "spmd.bench.kv_device_put", "--torch-peer-copy", "--repeats", str(args.repeats)]
    cmd += ["--sizes", ",".join(str(s) for s in args.sizes)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPMD_")}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except subprocess.TimeoutExpired:
        print("torch peer copy: no result within 600 s", flush=True)
        return []
    if r.returncode:
        print(f"torch peer copy: failed ({r.stderr.strip()[-300:]})", flush=True)
        return []
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


# ---------------------------------------------------------------------------------------------------
# The pipe rows


def _data(mode: str, size: int, args: argparse.Namespace, device: Any) -> list[Any]:
    """The message's arrays on ``device``: deterministic, distinct per array (bytes checked exactly)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(size)
    if mode == "array":
        shapes = [(size // 2,)]
    else:
        shapes = [(args.kv_heads, _tokens(size, args), args.head_dim)] * (2 * args.kv_layers)
    with jax.default_device(device):
        return [jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16) for i, s in enumerate(shapes)]


def _same(got: list[Any], want: list[Any]) -> bool:
    import numpy as np

    return len(got) == len(want) and all(
        g.shape == w.shape and np.array_equal(np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16))
        for g, w in zip(got, want, strict=True)
    )


def _rows(args: argparse.Namespace, src: list[Any], dst: list[Any]) -> list[dict[str, Any]]:
    import jax

    from spmd import compat
    from spmd.kv_transfer import DevicePutKVPipe, kv_head_sharding

    me, client, rows = jax.process_index(), compat.distributed_client(), []
    for mode in args.modes:
        pipe = DevicePutKVPipe(src, dst, timeout_s=120, name=f"bench-{mode}", pack=mode != "kv-pieces")
        for size in args.sizes:
            times, got = [], None
            sent = _data(mode, size, args, src[0]) if me == 0 else None
            if me == 0 and mode != "array":
                sent = [jax.device_put(x, kv_head_sharding(src, args.kv_heads)) for x in sent]
            jax.block_until_ready(sent)
            for i in range(args.repeats + 1):
                client.wait_at_barrier(f"spmd/bench/kv_device_put/{mode}/{size}/{i}", 120_000)
                t0 = time.perf_counter()
                if me == 0 and mode == "array":
                    pipe.send_tensor(sent[0])
                if me == 0:
                    if mode != "array":
                        pipe.send_kv_cache(sent)
                    continue
                got = [pipe.recv_tensor()] if mode == "array" else pipe.recv_kv_cache()
                jax.block_until_ready(got)
                if i:
                    times.append(time.perf_counter() - t0)
            if me == 0:
                continue
            best = min(times)
            row = {"mode": mode, "bytes": size, "us": best * 1e6, "GBps": size / best / 1e9, "arrays": len(got)}
            row["ok"] = _same(got, _data(mode, size, args, dst[0]))
            rows.append(row)
            print(
                f"{mode:>16} {harness.format_size(size):>9} {best * 1e3:10.3f} ms {row['GBps']:9.2f} GB/s", flush=True
            )
        pipe.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the probe in each process of a two-process job (or the torch baseline); see the module docstring."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.torch_peer_copy:
        for row in _torch_rows(args.sizes, args.repeats):
            print(json.dumps(row), flush=True)
        return 0
    if any(m != "array" for m in args.modes):
        try:
            for size in args.sizes:
                _tokens(size, args)
        except harness.BenchError as e:
            p.exit(2, f"{p.prog}: {e}\n")
    from spmd.kv_transfer import DevicePutKVPipe

    if "SPMD_CPU_DEVICES_PER_PROCESS" in os.environ:
        DevicePutKVPipe.enable_transfers(timeout_s=120)
    import spmd

    spmd.init_distributed_environment()
    import jax

    if jax.process_count() != 2:
        p.exit(2, f"{p.prog}: needs exactly 2 processes, got {jax.process_count()}\n")
    src = [d for d in jax.devices() if d.process_index == 0]
    dst = [d for d in jax.devices() if d.process_index == 1]
    if jax.process_index() == 1:
        print(
            f"DevicePutKVPipe, {src[0].device_kind}: TP {len(src)} (process 0) -> TP {len(dst)} (process 1); "
            f"KV caches of {args.kv_layers} layers x K and V, bf16[{args.kv_heads}, tokens, {args.head_dim}]\n"
            f"{'mode':>16} {'size':>9} {'best':>13} {'bandwidth':>14}",
            flush=True,
        )
    rows = _rows(args, src, dst)
    if jax.process_index() != 1:
        return 0
    peer = _run_torch_baseline(args)
    by_size = {r["bytes"]: r for r in peer}
    for r in peer:
        print(f"{r['mode']:>16} {harness.format_size(r['bytes']):>9} {r['us'] / 1e3:10.3f} ms {r['GBps']:9.2f} GB/s")
    for r in rows:
        if r["bytes"] in by_size:
            r["peer_copy_fraction"] = r["GBps"] / by_size[r["bytes"]]["GBps"]
            print(f"{r['mode']} {harness.format_size(r['bytes'])}: {r['peer_copy_fraction']:.0%} of the peer copy")
    meta = harness.metadata(PROG, argv, dst, processes=2, src_tp=len(src), dst_tp=len(dst), kv_layers=args.kv_layers)
    meta.update(kv_heads=args.kv_heads, head_dim=args.head_dim, repeats=args.repeats)
    return harness.finish([*rows, *peer], meta, args.json, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
