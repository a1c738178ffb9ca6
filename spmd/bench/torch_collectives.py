"""NCCL (or gloo) beside the JAX collectives: the same rows through ``torch.distributed``, one process per device.

:func:`run` starts ``n`` worker processes of this module (``RANK`` / ``WORLD_SIZE`` in their
environment, like ``torchrun``), which meet through a ``FileStore`` in a private temporary
directory (no TCP store is opened; gloo's and NCCL's own sockets are kept on the loopback
interface unless ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` say otherwise), run every
collective and size of the sweep, and rank 0 writes the rows as JSON, which the parent reads
(no pickle). The parent waits under one absolute deadline and kills its workers past it.

Each row is measured as nccl-tests does: the same ``S`` and ``count``
(:func:`spmd.bench.nccl_format.sizes_for`), the same input patterns and expected outputs
(:mod:`spmd.bench.expected`), ``#wrong`` summed over the ranks, the time of one call averaged
over ``iters`` eager calls (CUDA synchronised around them on GPUs), best of ``repeats``, the
slowest rank's. Modes torch's API does not have stay blank: ``dist.all_reduce`` and
``dist.broadcast`` work in place only; ``all_to_all_single`` is run out of place only.

    python -m spmd.bench.torch_collectives --worker SPEC.json      # what run() starts; not for people
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from spmd.bench.cli_args import BenchError
from spmd.bench.expected import expected, input_length, output_length, pattern_length
from spmd.bench.nccl_format import KINDS, TYPE_NAMES, algbw, busbw, sizes_for

__all__ = ["backend_for", "run"]

TORCH_MODES = {
    "all_reduce": ("in_place",),
    "broadcast": ("in_place",),
    "all_gather": ("out_of_place", "in_place"),
    "reduce_scatter": ("out_of_place", "in_place"),
    "all_to_all": ("out_of_place",),
}


def backend_for(platform: str, mode: str) -> str | None:
    """``"nccl"`` on GPUs, ``"gloo"`` on CPU, ``None`` when torch is off or absent (``mode="auto"``).

    Returns ``"error: ..."`` when ``mode="on"`` and that cannot be.
    """
    if mode == "off":
        return None
    if importlib.util.find_spec("torch") is None:
        return "error: --torch on: torch is not installed here (pip install torch)" if mode == "on" else None
    if platform == "gpu":
        return "nccl"
    if platform == "cpu":
        return "gloo"
    return f"error: --torch on: no torch.distributed backend for {platform}" if mode == "on" else None


def run(
    kinds: list[str],
    sizes: list[int],
    world: int,
    *,
    dtype: str,
    iters: int,
    repeats: int,
    backend: str,
    timeout_s: float,
    large_size: int | None = None,
    large_iters: int | None = None,
) -> list[dict[str, Any]]:
    """Run ``kinds`` x ``sizes`` over ``world`` torch processes; the rows rank 0 wrote.

    Raises:
      BenchError: a worker failed (its last output lines in the message) or the deadline passed.
    """
    deadline = time.monotonic() + timeout_s
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(prefix="spmd-bench-torch-") as tmp:
        spec = {
            "kinds": kinds,
            "sizes": sizes,
            "dtype": dtype,
            "iters": iters,
            "large_size": large_size,
            "large_iters": large_iters,
            "repeats": repeats,
            "backend": backend,
            "store": os.path.join(tmp, "store"),
            "out": os.path.join(tmp, "rows.json"),
            "seed": int.from_bytes(os.urandom(4), "little"),
            "timeout_s": timeout_s,
        }
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        procs, logs = [], []
        try:
            for rank in range(world):
                log = open(os.path.join(tmp, f"rank{rank}.log"), "w+")
                logs.append(log)
                worker_env = env | {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
                cmd = [sys.executable, "-m", "spmd.bench.torch_collectives", "--worker", spec_path]
                procs.append(subprocess.Popen(cmd, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
            _wait(procs, logs, deadline, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        with open(spec["out"]) as f:
            rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BenchError(f"torch workers wrote {type(rows).__name__}, expected a list of rows")
    return rows


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return "".join(log.read().splitlines(keepends=True)[-15:])


def _wait(procs, logs, deadline: float, timeout_s: float) -> None:
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                raise BenchError(
                    f"torch worker rank {rank} exited with status {code}; its last lines:\n{_tail(logs[rank])}"
                )
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"torch workers did not finish within {timeout_s:g} s (--torch-timeout-s); rank 0's last lines:\n"
                f"{_tail(logs[0])}"
            )
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# The worker (one process per device)


def _ops(dist, kind: str, mode: str, rank: int, count: int):
    """``(make buffers, call)`` for one collective and mode: torch's in-place forms alias nccl-tests' offsets."""
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    mine = slice(rank * count, (rank + 1) * count)
    if kind == "all_reduce":
        return lambda buf, out: dist.all_reduce(buf)
    if kind == "broadcast":
        return lambda buf, out: dist.broadcast(buf, src=0)
    if kind == "all_to_all":
        return lambda buf, out: dist.all_to_all_single(out, buf)
    if kind == "all_gather":
        return (lambda buf, out: ag(out, buf)) if mode == "out_of_place" else (lambda buf, out: ag(buf, buf[mine]))
    return (lambda buf, out: rs(out, buf)) if mode == "out_of_place" else (lambda buf, out: rs(buf[mine], buf))


def _measure(torch, dist, kind, mode, sz, world, rank, device, tdtype, iters, repeats, seed, case) -> dict[str, Any]:
    import numpy as np

    lin, lout = input_length(kind, mode, sz.count, world), output_length(kind, mode, sz.count, world)
    plen = pattern_length(kind, mode, sz.count, world)
    pats_np = np.random.default_rng([seed, *case]).integers(-8, 8, (world, plen)).astype(np.float32)
    pats = torch.from_numpy(pats_np).to(device=device, dtype=tdtype)
    buf = pats[rank][torch.arange(lin, device=device) % plen].contiguous()
    out = buf if mode == "in_place" else torch.empty(lout, dtype=tdtype, device=device)
    call = _ops(dist, kind, mode, rank, sz.count)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    call(buf, out)
    sync()
    ref = expected(kind, mode, pats, rank, sz.count, torch.arange(lout, device=device), root=0)
    wrong = torch.tensor([int((out != ref).sum())], dtype=torch.int64, device=device)
    dist.all_reduce(wrong)
    best = float("inf")
    for _ in range(repeats):
        call(buf, out)  # warm-up
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            call(buf, out)
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    slowest = torch.tensor([best], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    t = float(slowest.item())
    return {
        "time_us": t * 1e6,
        "algbw": algbw(sz.size, t),
        "busbw": busbw(kind, sz.size, t, world),
        "wrong": int(wrong.item()),
        "calls": iters,
    }


def _worker(spec_path: str) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    with open(spec_path) as f:
        spec = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = spec["backend"]
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=spec["timeout_s"])
    dist.init_process_group(backend, store=dist.FileStore(spec["store"], world), rank=rank, world_size=world,
                            timeout=timeout)  # fmt: skip
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    rows = []
    for ki, kind in enumerate(spec["kinds"]):
        for size in spec["sizes"]:
            sz = sizes_for(kind, size, world, itemsize)
            large = spec["large_iters"] and spec["large_size"] is not None and size > spec["large_size"]
            iters = spec["large_iters"] if large else spec["iters"]
            row: dict[str, Any] = {
                "impl": backend,
                "op": kind,
                "kind": kind,
                "tp": world,
                "size": sz.size,
                "size_requested": size,
                "count": sz.count,
                "type": TYPE_NAMES[spec["dtype"]],
                "redop": KINDS[kind].redop,
                "root": 0 if KINDS[kind].rooted else -1,
                "torch": torch.__version__,
                "out_of_place": None,
                "in_place": None,
            }
            try:
                for mi, mode in enumerate(TORCH_MODES[kind]):
                    case = (ki, size, mi)
                    row[mode] = _measure(torch, dist, kind, mode, sz, world, rank, device, tdtype, iters,
                                         spec["repeats"], spec["seed"], case)  # fmt: skip
            except Exception as e:  # reported in the row; the sweep goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                measured = [row[m] for m in TORCH_MODES[kind]]
                row["ok"] = all(m["wrong"] == 0 for m in measured)
                row["us"] = measured[0]["time_us"]
            rows.append(row)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m spmd.bench.torch_collectives --worker SPEC.json (started by spmd-bench collectives)")
    sys.exit(_worker(sys.argv[2]))
