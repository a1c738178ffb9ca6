"""GPU check: the fused all-reduce + add + RMSNorm kernel at world size 2, two processes on ONE GPU.

    python tests/workers/gpu_fused_ipc.py            # starts both ranks; exit status 0 when both are exact

Each process allocates its peer buffer with cuMemAlloc (kernels.symmetric_memory.cuda), exports
its CUDA IPC handle through a file, maps the other's, and runs the fused kernel and the plain
one-shot on the same buffers (three calls per shape, bf16 / f16 / f32) against numpy: the new
residual and the plain sum bit for bit, the normalised output within 2 ulps (16-bit) or 8
(float32). Two processes time-slice one GPU, so nothing here is timed. Not collected by pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = (("bfloat16", 1, 2048), ("bfloat16", 16, 2048), ("float16", 128, 1024), ("float32", 4, 1024))
EPS = 1e-5


def launch() -> int:
    d = tempfile.mkdtemp()
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), d], env=env) for r in (0, 1)]
    codes = [p.wait(timeout=300) for p in procs]
    print("gpu_fused_ipc:", "PASS" if codes == [0, 0] else f"FAIL {codes}", flush=True)
    return 0 if codes == [0, 0] else 1


class Files:
    """The two ranks' rendezvous: JSON files in a shared directory."""

    def __init__(self, d: str, rank: int) -> None:
        self.d, self.rank = d, rank

    def put(self, name: str, obj) -> None:
        tmp = f"{self.d}/{name}.{self.rank}.tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, f"{self.d}/{name}.{self.rank}")

    def get(self, name: str, timeout: float = 120.0):
        path, t0 = f"{self.d}/{name}.{1 - self.rank}", time.time()
        while not os.path.exists(path):
            if time.time() - t0 > timeout:
                raise TimeoutError(f"rank {1 - self.rank} never wrote {name}")
            time.sleep(0.01)
        with open(path) as f:
            return json.load(f)


def reference(parts, r, w):
    import numpy as np

    dt = parts.dtype
    acc = parts[0].astype(np.float32) + parts[1].astype(np.float32)
    h = (acc.astype(dt).astype(np.float32) + r.astype(np.float32)).astype(dt)
    x32 = h.astype(np.float32)
    ms = np.mean(x32.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
    y = (x32 / np.sqrt(ms + np.float32(EPS))).astype(dt)
    return (w.astype(np.float32) * y.astype(np.float32)).astype(dt), h, acc.astype(dt)


def rank_main(rank: int, d: str) -> int:
    import jax
    import ml_dtypes
    import numpy as np

    from kernels.custom_all_reduce import fused, peer
    from kernels.symmetric_memory import Layout, cuda

    files = Files(d, rank)
    dev = jax.devices()[0]
    ordinal = dev.local_hardware_id
    layout = Layout(max_ranks=2)
    mine = cuda.mem_alloc(ordinal, layout.nbytes)
    files.put("handle", {"h": cuda.ipc_handle(ordinal, mine).hex()})
    other = cuda.ipc_open(ordinal, bytes.fromhex(files.get("handle")["h"]))
    words = np.array([mine, other] if rank == 0 else [other, mine], np.uint64)
    pairs = np.stack([words & 0xFFFFFFFF, words >> 32], axis=1).astype(np.uint32).view(np.int32).reshape(-1)
    table = jax.device_put(np.concatenate([[rank], pairs]).astype(np.int32), dev)

    def fused_call(x, r, w, t):
        return fused.fused_add_rms_norm_peer(x, r, w, t, world_size=2, layout=layout, eps=EPS)

    def plain_call(x, t):
        return peer.one_shot_peer(x.reshape(-1), t, world_size=2, layout=layout).reshape(x.shape)

    ok = True
    for name, rows, hidden in SHAPES:
        dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
        rng = np.random.default_rng(rows * hidden)
        parts = rng.standard_normal((2, rows, hidden)).astype(np.float32).astype(dtype)
        r = rng.standard_normal((rows, hidden)).astype(np.float32).astype(dtype)
        w = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32).astype(dtype)
        want_out, want_h, want_sum = reference(parts, r, w)
        f, g = jax.jit(fused_call), jax.jit(plain_call)
        args = [jax.device_put(a, dev) for a in (parts[rank], r, w)]
        f.lower(*args, table).compile()
        g.lower(args[0], table).compile()
        files.put(f"compiled-{name}-{rows}", {})
        files.get(f"compiled-{name}-{rows}")  # both compiled: no kernel waits on a compiling peer
        for it in range(3):
            out, h = (np.asarray(a) for a in f(*args, table))
            plain = np.asarray(g(args[0], table))  # the plain kernel on the same buffers, in between
            exact_h = np.array_equal(h.view(np.uint8), want_h.view(np.uint8))
            exact_sum = np.array_equal(plain.view(np.uint8), want_sum.view(np.uint8))
            ulps = np.abs(out.astype(np.float64) - want_out.astype(np.float64))
            ulps /= np.spacing(np.abs(want_out)).astype(np.float64)
            good = exact_h and exact_sum and ulps.max() <= (8 if name == "float32" else 2)
            ok &= bool(good)
            print(
                f"[{rank}] {rows}x{hidden} {name} call {it}: residual exact={exact_h} plain exact={exact_sum} "
                f"norm max {ulps.max():.0f} ulp ({np.mean(ulps > 0):.3%} not exact) -> {'OK' if good else 'WRONG'}",
                flush=True,
            )
    files.put("result", {"ok": bool(ok)})
    ok = ok and files.get("result")["ok"]
    print(f"[{rank}] {'ALL OK' if ok else 'SOME FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(launch() if len(sys.argv) == 1 else rank_main(int(sys.argv[1]), sys.argv[2]))
