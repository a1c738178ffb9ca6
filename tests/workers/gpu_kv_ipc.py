"""IpcKVPipe on GPUs: two processes (on one GPU, or GPU 0 -> GPU 1), every path checked byte for byte.

    python tests/workers/gpu_kv_ipc.py            # starts the sender; prints PASS/FAIL per check, exit 0 when all pass

For each receive path (``kernel``: one program reads the staging by address; ``copy``): arrays of
several dtypes and sizes (inline, one tile, odd sizes, 64 MiB), KV caches of 32 arrays (bf16) and
of mixed dtypes with an empty layer, ``recv_kv_cache(out=...)`` written in place, and the pipe
still on the path it was asked for (no silent fallback). Then ``close`` right after a send.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")


def messages():
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(7)
    arrays = [
        rng.standard_normal((3, 5)).astype(np.float32),  # inline
        rng.standard_normal(512).astype(np.float32).repeat(8),  # 16 KiB: inline limit
        rng.standard_normal((70, 301)).astype(ml_dtypes.bfloat16),  # not whole tiles
        rng.integers(-100, 100, 100_003).astype(np.int8),
        rng.random((300, 77)) > 0.5,
        rng.standard_normal(16 << 20).astype(np.float32),  # 64 MiB
    ]
    kv = [rng.standard_normal((8, 320, 128)).astype(ml_dtypes.bfloat16) for _ in range(32)]
    mixed = [
        rng.standard_normal((2, 4, 0, 16)).astype(np.float32),
        rng.standard_normal((2, 4, 48, 16)).astype(ml_dtypes.bfloat16),
        rng.integers(-100, 100, (2, 4, 48, 16)).astype(np.int8),
        rng.standard_normal((2, 4, 48, 16)).astype(np.float32),
    ]
    return arrays, kv, mixed, jnp


def sender(port: int) -> None:
    import jax

    from spmd.kv_transfer import IpcKVPipe

    arrays, kv, mixed, _ = messages()
    with IpcKVPipe("127.0.0.1", port, role="client", timeout_s=120, devices=jax.devices()[:1]) as pipe:
        for _ in ("kernel", "copy"):
            for a in arrays:
                pipe.send_tensor(jax.device_put(a))
            pipe.send_kv_cache([jax.device_put(x) for x in kv])
            pipe.send_kv_cache([jax.device_put(x) for x in mixed], head_axis=1)
            pipe.send_kv_cache([jax.device_put(x * 2) for x in mixed], head_axis=1)  # into out=
        pipe.send_tensor(jax.device_put(arrays[-1]))  # then close at once: must not be lost
    print("sender done", flush=True)


def check(name: str, ok: bool, failures: list) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        failures.append(name)


def receiver(port: int, child: subprocess.Popen) -> int:
    import jax
    import numpy as np

    from spmd.kv_transfer import IpcKVPipe

    local = jax.local_devices()
    device = local[1] if len(local) > 1 else local[0]
    arrays, kv, mixed, _ = messages()
    failures: list[str] = []
    same = lambda got, want: (
        got.shape == want.shape
        and got.dtype == want.dtype
        and np.array_equal(np.asarray(got).view(np.uint8), np.ascontiguousarray(want).view(np.uint8))
    )
    print(f"receiver on {device} ({'another GPU' if device is not local[0] else 'the same GPU as the sender'})")
    paths = ("kernel", "copy") if device.platform == "gpu" else ("copy", "copy")  # (a dry run on CPU)
    pipe = IpcKVPipe("127.0.0.1", port, timeout_s=120, devices=[device], receive=paths[0])
    for receive in paths:
        pipe.receive = receive
        for i, a in enumerate(arrays):
            check(f"{receive}: array {i} {a.dtype}{list(a.shape)}", same(pipe.recv_tensor(), a), failures)
        got = pipe.recv_kv_cache()
        check(f"{receive}: KV cache of 32 x bf16[8, 320, 128]", all(map(same, got, kv)), failures)
        got = pipe.recv_kv_cache()
        check(f"{receive}: KV cache of mixed dtypes with an empty layer", all(map(same, got, mixed)), failures)
        where = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in got if x.size]
        again = pipe.recv_kv_cache(out=got)
        check(
            f"{receive}: recv_kv_cache(out=...) values",
            all(same(g, w * 2) for g, w in zip(again, mixed, strict=True)),
            failures,
        )
        now = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in again if x.size]
        check(f"{receive}: recv_kv_cache(out=...) written in place", now == where, failures)
        check(f"{receive}: still receive={receive} (no fallback)", pipe.receive == receive, failures)
    check("close right after send: the last message arrives", same(pipe.recv_tensor(), arrays[-1]), failures)
    pipe.close()
    code = child.wait(timeout=120)
    check("sender exited 0", code == 0, failures)
    print("gpu_kv_ipc:", "PASS" if not failures else f"FAIL {failures}", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    from spmd.net import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--send", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the sender process
    args = parser.parse_args(argv)
    if args.send is not None:
        sender(args.send)
        return 0
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--send", str(port)], cwd=ROOT)
    try:
        return receiver(port, child)
    finally:
        if child.poll() is None:
            child.kill()


if __name__ == "__main__":
    sys.exit(main())
