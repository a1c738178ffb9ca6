"""Worker for the KV-transfer end-to-end tests: a prefill (sender) or decode (receiver) process.

    spmd-launch --nproc-per-node 2 --cpu-devices-per-process N tests/workers/kv_worker.py devput P D HEADS
    python tests/workers/kv_worker.py {tcp,ts,ipc} {send,recv} P D HEADS PORT  (two independent processes)

P and D are the prefill and decode TP sizes, HEADS the number of KV heads. The sender sends a
list of arrays of every dtype (and None), then a head-sharded KV cache; the receiver checks each
against the same deterministic data and the decode shard of every rank. Prints ``OK <pipe> <role>``.
"""

from __future__ import annotations

import os
import sys

PIPE = sys.argv[1]
if PIPE == "devput":
    from spmd.kv_transfer import DevicePutKVPipe

    DevicePutKVPipe.enable_transfers(timeout_s=60)
    import spmd

    spmd.init_distributed_environment()
    import jax

    ROLE = "send" if jax.process_index() == 0 else "recv"
    P, D, HEADS = (int(a) for a in sys.argv[2:5])
else:
    n = max(int(sys.argv[3]), int(sys.argv[4]))
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    import jax

    ROLE = sys.argv[2]
    P, D, HEADS, PORT = (int(a) for a in sys.argv[3:7])

jax.config.update("jax_enable_x64", True)

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from spmd.kv_transfer import (  # noqa: E402
    DevicePutKVPipe,
    IpcKVPipe,
    TCPKVPipe,
    TransferServerKVPipe,
    kv_head_sharding,
    split_kv_heads,
)


def data():
    rng = np.random.default_rng(1234)
    base = rng.standard_normal((6, 8))
    msgs = [
        base.astype(np.float32),
        base.astype(np.float16),
        base.astype(ml_dtypes.bfloat16),
        rng.integers(-128, 127, (5, 3)).astype(np.int8),
        rng.integers(-(2**31), 2**31 - 1, (4,)).astype(np.int32),
        rng.integers(-(2**62), 2**62, (3, 2)).astype(np.int64),
        rng.integers(0, 255, (7,)).astype(np.uint8),
        rng.random((3, 3)) > 0.5,
        np.array(rng.standard_normal(), np.float32),
        np.zeros((0, 5), np.float32),
        None,
        base.astype(np.float32)[::2, 1::3],
        rng.standard_normal(4 << 20).astype(np.float32),
        None,
    ]
    layers = [rng.standard_normal((HEADS, 16, 8)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    return msgs, layers


def main() -> None:
    msgs, layers = data()
    local = jax.local_devices()
    if PIPE == "devput":
        devs = jax.devices()
        src = [d for d in devs if d.process_index == 0][:P]
        dst = [d for d in devs if d.process_index == 1][:D]
        pipe = DevicePutKVPipe(src, dst, timeout_s=60)
        mine = src if ROLE == "send" else dst
    elif PIPE == "tcp":
        mine = local[: P if ROLE == "send" else D]
        pipe = TCPKVPipe("127.0.0.1", PORT, role="server" if ROLE == "send" else "client", timeout_s=60, secret=b"e2e")
    else:
        mine = local[: P if ROLE == "send" else D]
        cls = IpcKVPipe if PIPE == "ipc" else TransferServerKVPipe
        pipe = cls(
            "127.0.0.1", PORT, role="server" if ROLE == "send" else "client", timeout_s=60, secret=b"e2e", devices=mine
        )
    with pipe:
        if ROLE == "send":
            for m in msgs:
                pipe.send_tensor(m)
            # The prefill worker's cache, sharded by heads over its own TP devices.
            pipe.send_kv_cache([jax.device_put(x, kv_head_sharding(mine, HEADS)) for x in layers])
            if PIPE != "devput":
                assert pipe.recv_tensor() is None  # the receiver's "done": keep buffers alive until then
        else:
            for i, m in enumerate(msgs):
                got = pipe.recv_tensor()
                if m is None:
                    assert got is None, (i, got)
                    continue
                got = np.asarray(got)
                assert got.dtype == m.dtype and got.shape == m.shape, (i, got.dtype, got.shape, m.dtype, m.shape)
                np.testing.assert_array_equal(got, m, err_msg=f"message {i}")
            kv = pipe.recv_kv_cache(devices=mine) if PIPE == "tcp" else pipe.recv_kv_cache()
            for x, y in zip(layers, kv, strict=True):
                np.testing.assert_array_equal(np.asarray(y), x)
                want = split_kv_heads(x, D)
                shards = {s.device: np.asarray(s.data) for s in y.addressable_shards}
                assert len(shards) == D, shards.keys()
                for r, d in enumerate(mine):
                    np.testing.assert_array_equal(shards[d], want[r], err_msg=f"decode rank {r}")
            if PIPE != "devput":
                pipe.send_tensor(None)
    print(f"OK {PIPE} {ROLE} P={P} D={D} heads={HEADS}", flush=True)


main()
