"""Probe: ``DevicePutKVPipe`` throughput between two processes (one device each), GB/s by size.

    spmd-launch --nproc-per-node 2 -m spmd.bench.kv_device_put --sizes 20MiB,256MiB   # one GPU per process
    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 1 -m spmd.bench.kv_device_put --sizes 4MiB

Process 0 sends bf16 arrays from its first device, process 1 receives them on its first device;
each size is sent once to warm up, then ``--repeats`` times, and process 1 prints the best time
(until the received array is ready) and GB/s, and checks the bytes. Writes ``--json`` on process 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    """Run the probe in every process of a two-process job; see the module docstring."""
    p = argparse.ArgumentParser(prog="spmd-launch ... -m spmd.bench.kv_device_put", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="20MiB,256MiB", help="message sizes (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed sends per size (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the rows here (process 1; default: none)")
    args = p.parse_args(argv)
    from spmd.kv_transfer import DevicePutKVPipe

    cpu = "SPMD_CPU_DEVICES_PER_PROCESS" in __import__("os").environ
    if cpu:
        DevicePutKVPipe.enable_transfers(timeout_s=120)
    import spmd

    spmd.init_distributed_environment()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spmd.bench.harness import parse_size

    if jax.process_count() != 2:
        print(f"{p.prog}: needs exactly 2 processes, got {jax.process_count()}", file=sys.stderr)
        return 2
    src = [d for d in jax.devices() if d.process_index == 0][:1]
    dst = [d for d in jax.devices() if d.process_index == 1][:1]
    pipe = DevicePutKVPipe(src, dst, timeout_s=120)
    me, rows = jax.process_index(), []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        n = size // 2
        if me == 0:
            x = jax.device_put(jnp.arange(n, dtype=jnp.float32).astype(jnp.bfloat16), src[0])
            for _ in range(args.repeats + 1):
                pipe.send_tensor(x)
            continue
        times, y = [], None
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            y = jax.block_until_ready(pipe.recv_tensor())
            if i:
                times.append(time.perf_counter() - t0)
        want = np.asarray(jnp.arange(1 << 10, dtype=jnp.float32).astype(jnp.bfloat16), np.float32)
        ok = y.shape == (n,) and bool(np.array_equal(np.asarray(y[: 1 << 10], np.float32), want))
        best = min(times)
        row = {"bytes": size, "best_s": best, "GBps": size / best / 1e9, "ok": ok, "device": str(dst[0].device_kind)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    pipe.close()
    if me == 1 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
