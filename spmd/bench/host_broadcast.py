"""Host-level broadcast across processes: ``spmd.host.broadcast_object`` against torch's gloo.

Starts two 2-process jobs on this host, one after the other, and sends the same value from
process 0 at every size: ``{"x": uint8[size]}`` of random bytes.

* spmd: ``spmd-launch --nproc-per-node 2 --cpu-devices-per-process 1``, ``spmd.host.broadcast_object``
  over ``--spmd-transport`` (``auto``: direct TCP connections, as both processes share this host;
  ``store``: the coordination service's key-value store and device collectives);
* torch: ``torch.distributed`` with the gloo backend, ``broadcast_object_list`` (pickle), run by
  ``--torch-python`` (a separate virtual environment: torch is not a dependency of this project).

Each call is timed on every process (the median of ``--iters`` calls after one warm-up); the
receiver checks the bytes once per size. Peak memory is the receiver's and the sender's resident
high-water mark (``VmHWM``, reset before each size through ``/proc/self/clear_refs``) above the
resident size just before the size's calls, also as a multiple of the payload. Prints a table and
writes JSON.

    python -m spmd.bench.host_broadcast --torch-python /work/torchvenv/bin/python
    python -m spmd.bench.host_broadcast --sizes 1KiB,1MiB --skip-torch
    python -m spmd.bench.host_broadcast --sizes 128MiB,512MiB --skip-torch --spmd-transport store

The worker half of this file imports only the standard library and numpy at module level, so
the torch interpreter can run it without JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_SIZES = "1KiB,64KiB,1MiB,16MiB,128MiB,512MiB"
PROG = "python -m spmd.bench.host_broadcast"


# Worker (runs inside each process of a job) --------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _iters_for(size: int, iters: int | None) -> int:
    if iters is not None:
        return iters
    return max(3, min(200, (64 << 20) // max(size, 1)))


def _worker(kind: str, rank: int, sizes: list[int], iters: int | None, seed: int, out_path: str) -> None:
    if kind == "spmd":
        import spmd
        import spmd.host

        spmd.init_distributed_environment()

        def bcast(value):
            return spmd.host.broadcast_object(value, src=0)

    else:
        import torch.distributed as dist

        port = os.environ["BENCH_TORCH_PORT"]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

        def bcast(value):
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

    transport = None
    rows = []
    for size in sizes:
        expected = np.random.default_rng([seed, size]).integers(0, 256, size, dtype=np.uint8)
        n = _iters_for(size, iters)
        got = bcast({"x": expected} if rank == 0 else None)  # warm-up (compiles, connects)
        ok = bool(np.array_equal(np.asarray(got["x"]), expected))
        del got
        if kind == "spmd" and transport is None:
            mesh = spmd.host._PEERS.connections
            transport = "tcp" if mesh is not None and mesh.mode == "tcp" else "store"
        base = _status_kib("VmRSS")
        _reset_peak()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            got = bcast({"x": expected} if rank == 0 else None)
            times.append(time.perf_counter() - t0)
            del got
        peak = _status_kib("VmHWM")
        rows.append(
            {
                "size": size,
                "iters": n,
                "ms": statistics.median(times) * 1e3,
                "peak_above_start_mib": (peak - base) / 1024,
                "ok": ok,
                "transport": transport,
            }
        )
        print(f"{kind} rank {rank}: {size} B {rows[-1]['ms']:.3f} ms", flush=True)
    with open(f"{out_path}.{kind}.{rank}.json", "w") as f:
        json.dump(rows, f)
    if kind == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()


# Driver ------------------------------------------------------------------------------------------


def _run_spmd(args: argparse.Namespace, out: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "spmd.launch",
        "--nproc-per-node",
        "2",
        "--cpu-devices-per-process",
        "1",
        "--timeout",
        str(args.timeout),
        os.path.abspath(__file__),
        "--worker",
        "spmd",
        *_worker_args(args, out),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["SPMD_HOST_TRANSPORT"] = args.spmd_transport
    subprocess.run(cmd, check=True, env=env)


def _worker_args(args: argparse.Namespace, out: str) -> list[str]:
    extra = ["--iters", str(args.iters)] if args.iters else []
    return ["--sizes", args.sizes_text, "--seed", str(args.seed), "--out", out, *extra]


def _run_torch(args: argparse.Namespace, out: str) -> None:
    from spmd.net import free_port

    env = {**os.environ, "BENCH_TORCH_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [
                args.torch_python,
                os.path.abspath(__file__),
                "--worker",
                "torch",
                "--rank",
                str(r),
                *_worker_args(args, out),
            ],
            env=env,
        )
        for r in (0, 1)
    ]
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if any(codes):
        raise SystemExit(f"torch workers exited with {codes}")


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores visible"


def _parse_sizes(text: str) -> list[int]:
    from spmd.bench.harness import parse_list, parse_size

    return parse_list(text, parse_size, what="sizes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="payload sizes, e.g. 1KiB,1MiB,512MiB")
    p.add_argument("--iters", type=int, default=None, help="timed calls per size (default: by size, 3 to 200)")
    p.add_argument("--torch-python", default="/work/torchvenv/bin/python", help="an interpreter with torch")
    p.add_argument("--skip-torch", action="store_true", help="measure spmd only")
    p.add_argument(
        "--spmd-transport",
        choices=("auto", "tcp", "store"),
        default="auto",
        help="SPMD_HOST_TRANSPORT of the spmd job (auto: direct TCP on one host) (default: %(default)s)",
    )
    p.add_argument("--timeout", type=int, default=1200, help="seconds each job may run")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    p.add_argument("--json", default="bench_host_broadcast.json", help="where to write the results")
    p.add_argument("--worker", choices=("spmd", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        sizes = [int(s) for s in args.sizes.split(",")]
        rank = int(os.environ.get("SPMD_PROCESS_ID", args.rank))
        _worker(args.worker, rank, sizes, args.iters, args.seed, args.out)
        return 0

    from spmd.bench import harness

    sizes = _parse_sizes(args.sizes)
    args.sizes_text = ",".join(str(s) for s in sizes)
    args.seed = int(np.random.SeedSequence().entropy % 2**31) if args.seed is None else args.seed
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows")
        _run_spmd(args, out)
        kinds = ["spmd"]
        if not args.skip_torch:
            _run_torch(args, out)
            kinds.append("torch")
        res = {(k, r): json.load(open(f"{out}.{k}.{r}.json")) for k in kinds for r in (0, 1)}
    rows = []
    for i, size in enumerate(sizes):
        row: dict = {"size": size}
        for k in kinds:
            snd, rcv = res[(k, 0)][i], res[(k, 1)][i]
            row[f"{k}_ms"] = max(snd["ms"], rcv["ms"])
            row[f"{k}_recv_peak_x"] = rcv["peak_above_start_mib"] * (1 << 20) / size
            row[f"{k}_recv_peak_mib"] = rcv["peak_above_start_mib"]
            row[f"{k}_send_peak_mib"] = snd["peak_above_start_mib"]
            row[f"{k}_ok"] = rcv["ok"]
        row["spmd_transport"] = res[("spmd", 1)][i]["transport"]
        rows.append(row)
    header = f"{'size':>9} {'spmd ms':>9} {'recv peak':>15}"
    if "torch" in kinds:
        header += f" {'torch ms':>9} {'recv peak':>15} {'spmd/torch':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (
            f"{harness.format_size(r['size']):>9} {r['spmd_ms']:>9.3f} "
            f"{r['spmd_recv_peak_mib']:>8.1f} MiB {r['spmd_recv_peak_x']:>4.1f}x"
        )
        if "torch" in kinds:
            line += (
                f" {r['torch_ms']:>9.3f} {r['torch_recv_peak_mib']:>8.1f} MiB {r['torch_recv_peak_x']:>4.1f}x"
                f" {r['spmd_ms'] / r['torch_ms']:>10.2f}"
            )
        if not all(r[f"{k}_ok"] for k in kinds):
            line += " WRONG"
        print(line)
    print(f"spmd transport: {', '.join(sorted({str(r['spmd_transport']) for r in rows}))}")
    import datetime
    import platform

    meta = {
        "command": " ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "python": platform.python_version(),
        "seed": args.seed,
        "spmd_transport": args.spmd_transport,
        "ms": "per call, median over iters, the slower of sender and receiver",
        "peak": "resident high-water mark above the resident size before the size's calls (VmHWM)",
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0 if all(r[f"{k}_ok"] for r in rows for k in kinds) else 1


if __name__ == "__main__":
    sys.exit(main())
