"""Worker for the KV-transfer end-to-end tests: a prefill (sender) or decode (receiver) process.

    python tests/workers/kv_worker.py {tcp,ts,ipc} {send,recv} P D HEADS PORT  (two independent processes)

P and D are the prefill and decode TP sizes, HEADS the number of KV heads. With ``jax_enable_x64``
on, the two run the pipe contract's ``dtypes`` and ``none_is_a_flag`` cases (``tests/kv_contract.py``:
every dtype, 64-bit included, small and large; None among arrays; drawn from ``$SPMD_TEST_SEED``),
then the sender sends a head-sharded KV cache and the receiver checks the decode shard of every rank.
Prints ``OK <pipe> <role>``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: kv_contract


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipe", choices=["tcp", "ts", "ipc"])
    parser.add_argument("role", choices=["send", "recv"])
    for name in ("P", "D", "HEADS", "PORT"):
        parser.add_argument(name.lower(), type=int, metavar=name)
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(args.p, args.d)}"
    import jax

    jax.config.update("jax_enable_x64", True)
    import kv_contract
    import ml_dtypes
    import numpy as np

    from spmd.kv_transfer import IpcKVPipe, TCPKVPipe, TransferServerKVPipe, kv_head_sharding, split_kv_heads

    sender = args.role == "send"
    mine = jax.local_devices()[: args.p if sender else args.d]
    role = "server" if sender else "client"
    if args.pipe == "tcp":
        pipe = TCPKVPipe("127.0.0.1", args.port, role=role, timeout_s=60, secret=b"e2e")
    else:
        cls = IpcKVPipe if args.pipe == "ipc" else TransferServerKVPipe
        pipe = cls("127.0.0.1", args.port, role=role, timeout_s=60, secret=b"e2e", devices=mine)
    seed = int(os.environ.get("SPMD_TEST_SEED", "1234"))
    rng = np.random.default_rng([seed, 7])
    layers = [kv_contract.random_of(rng, ml_dtypes.bfloat16, (args.heads, 16, 8)) for _ in range(3)]
    with pipe:
        side = kv_contract.Side(pipe, kv_contract.CAPS[args.pipe], seed, lambda _: None)
        for case in ("dtypes", "none_is_a_flag"):
            kv_contract.CASES[case](side, args.role)
        if sender:
            # The prefill worker's cache, sharded by heads over its own TP devices.
            pipe.send_kv_cache([jax.device_put(x, kv_head_sharding(mine, args.heads)) for x in layers])
            assert pipe.recv_tensor() is None  # the receiver's "done": keep buffers alive until then
        else:
            kv = pipe.recv_kv_cache(devices=mine) if args.pipe == "tcp" else pipe.recv_kv_cache()
            for x, y in zip(layers, kv, strict=True):
                np.testing.assert_array_equal(np.asarray(y), x)
                want = split_kv_heads(x, args.d)
                shards = {s.device: np.asarray(s.data) for s in y.addressable_shards}
                assert len(shards) == args.d, shards.keys()
                for r, d in enumerate(mine):
                    np.testing.assert_array_equal(shards[d], want[r], err_msg=f"decode rank {r}")
            pipe.send_tensor(None)
    print(f"OK {args.pipe} {args.role} P={args.p} D={args.d} heads={args.heads}", flush=True)


if __name__ == "__main__":
    main()
