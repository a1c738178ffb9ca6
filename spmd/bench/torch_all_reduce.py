"""Reference: NCCL and torch symmetric-memory all-reduce latency, one process per GPU (needs PyTorch).

    torchrun --nproc-per-node 2 -m spmd.bench.torch_all_reduce --json torch_ar_w2.json

The reference columns beside ``python -m spmd.bench.custom_all_reduce`` (run both in one device
call, on the same GPUs). For each size (bf16, bytes per device) it times 200 all-reduces replayed
in one CUDA graph (no host dispatch, as vLLM runs decode), falling back to eager calls where graph
capture fails: ``dist.all_reduce`` (NCCL), and torch's symmetric-memory ``one_shot_all_reduce``
and ``two_shot_all_reduce_`` up to 32 MiB. PyTorch is not a dependency of this project: run it
where PyTorch is installed. Never enable NVLink multicast (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

SIZES = tuple(2**k for k in range(11, 28, 2))  # 2 KiB .. 128 MiB
SYMM_MAX_BYTES = 2**25


def _time(fn: Callable[[], object], iters: int) -> tuple[float, str]:
    import torch
    import torch.distributed as dist

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        start.record()
        graph.replay()
        end.record()
        mode = "graph"
    except Exception as e:  # some collectives cannot be captured: time them eagerly
        dist.barrier()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        mode = f"eager ({type(e).__name__})"
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters, mode


def main(argv: list[str] | None = None) -> int:
    """Time every size on every rank; rank 0 prints one row per size and writes ``--json``."""
    p = argparse.ArgumentParser(prog="torchrun ... -m spmd.bench.torch_all_reduce", description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=200, help="calls per timing (default: %(default)s)")
    p.add_argument("--json", default=None, help="write the rows to this file on rank 0 (default: none)")
    args = p.parse_args(argv)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    group = dist.group.WORLD.group_name
    try:
        import torch.distributed._symmetric_memory as symm
    except ImportError:
        symm = None
    rows = []
    for nbytes in SIZES:
        x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        us, mode = _time(lambda x=x: dist.all_reduce(x), args.iters)
        row: dict = {"bytes": nbytes, "nccl_us": us, "nccl_mode": mode, "world_size": dist.get_world_size()}
        if symm is not None and nbytes <= SYMM_MAX_BYTES:
            buf = symm.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
            symm.rendezvous(buf, group)
            buf.copy_(x)
            row["symm_one_shot_us"], _ = _time(
                lambda buf=buf: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group), args.iters
            )
            row["symm_two_shot_us"], _ = _time(
                lambda buf=buf: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group), args.iters
            )
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
