"""Worker for tests/test_host_multiprocess.py: spmd.host over direct TCP connections, 2 real processes.

Started by spmd-launch with ``SPMD_COLLECTIVE_TIMEOUT_S=2``; prints ``OK host_net`` when every
check passed (any failed check raises: non-zero exit). The last check ends both processes:
process 1 dies in the middle of a message and process 0 must raise at once.
"""

from __future__ import annotations

import enum
import os
import socket
import time

import spmd
from spmd import host

spmd.init_distributed_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

PID, NPROC = jax.process_index(), jax.process_count()
MISMATCH = "the processes made different calls"


def expect_error(kind, match, fn, *, within_s):
    t0 = time.monotonic()
    try:
        fn()
    except kind as e:
        assert match in str(e), (kind, match, str(e)[:600])
        assert time.monotonic() - t0 < within_s, (match, time.monotonic() - t0)
        return e
    raise AssertionError(f"no {kind.__name__} ({match!r})")


def recv(src=0):
    return host.broadcast_object(None, src=src)


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def main() -> None:
    assert NPROC == 2, NPROC
    seed = host.broadcast_object(int(np.random.SeedSequence().entropy % 2**31) if PID == 0 else None)
    mesh = host._PEERS.connections
    assert mesh is not None and mesh.mode == "tcp" and list(mesh.peers) == [1 - PID], mesh
    rng = np.random.default_rng(seed)  # the same stream on both processes: the reference

    # Values of every kind arrive as they were sent.
    class Color(enum.IntEnum):
        RED = 7

    scalars = {n: np.asarray(rng.standard_normal() * 100).astype(jnp.dtype(n))[()] for n in sorted(host.ALLOWED_DTYPES)}
    value = {
        "scalars": scalars,
        "mean": np.mean(rng.standard_normal(17)),
        "enum": Color.RED,
        "big_int": int(rng.integers(1, 9)) * 10**5000 + 3,
        "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
    }
    got = host.broadcast_object(value if PID == 0 else None)
    assert PID != 0 or got is value
    assert all(type(got["scalars"][k]) is type(v) and same(got["scalars"][k], v) for k, v in scalars.items())
    assert type(got["mean"]) is np.float64 and got["mean"] == value["mean"] and got["big_int"] == value["big_int"]
    assert isinstance(got["w"], jax.Array) and same(got["w"], value["w"]) and same(got["empty"], value["empty"])

    # Large payloads, one sender and two, and all_gather; against the reference.
    big = {"a": rng.standard_normal((1500, 1000)).astype(np.float32), "b": rng.integers(0, 9, (5,), dtype=np.int8)}
    other = {"c": rng.standard_normal(300_000)}
    got = host.broadcast_tensor_dict_across_processes(big if PID == 0 else None, 0)
    assert same(got["a"], big["a"]) and same(got["b"], big["b"]) and got["a"].flags.writeable
    got = host.broadcast_from(big if PID == 0 else other, 0, sources=(0, 1), op="two_senders")
    assert same(got["a"], big["a"]) and (PID == 1 or got is big)
    got = host.broadcast_from(big if PID == 0 else other, 1, sources=(0, 1), op="two_senders")
    assert same(got["c"], other["c"]) and (PID == 0 or got is other)
    base = rng.standard_normal((3, 700))  # the same draw on both: process p sends base[: p + 2] * (p + 1)
    everyone = host.all_gather_object({"p": PID, "x": base[: PID + 2] * (PID + 1)})
    assert [e["p"] for e in everyone] == [0, 1]
    assert all(same(e["x"], base[: i + 2] * (i + 1)) for i, e in enumerate(everyone))

    # A sender's failure reaches the receiver at once, named; misuse is seen on both sides.
    if PID == 0:
        expect_error(
            TypeError, "cannot send a value of type builtins.set", lambda: host.broadcast_object({1}), within_s=1
        )
    else:
        e = expect_error(RuntimeError, "process 0 could not send its value: TypeError", recv, within_s=1)
    expect_error(RuntimeError, MISMATCH, lambda: host.broadcast_object(PID, src=PID), within_s=1)
    expect_error(RuntimeError, MISMATCH, lambda: host.broadcast_object(None, src=1 - PID), within_s=1)
    if PID == 0:  # process 1 skips a broadcast and goes on to a barrier
        e = expect_error(RuntimeError, MISMATCH, lambda: spmd.broadcast_tensor_dict({"w": 2}, src=0), within_s=1)
    else:
        e = expect_error(RuntimeError, MISMATCH, host.barrier, within_s=1)
    assert "barrier" in str(e) and "broadcast_tensor_dict from process 0" in str(e), e
    assert host.broadcast_object({"x": big["a"]} if PID == 1 else None, src=1)["x"].shape == (1500, 1000)

    # A receiver alive but not calling: the sender's wait is bounded; the late receiver learns why.
    if PID == 0:
        expect_error(
            TimeoutError, "waited 2 s for process 1 and got nothing", lambda: host.broadcast_object(big), within_s=4
        )
    else:
        time.sleep(3.0)
        expect_error(RuntimeError, "process 0 gave up on this call: TimeoutError", recv, within_s=1)

    # Many small calls; nothing goes through the store (only the set-up's records are there).
    t0 = time.monotonic()
    for i in range(100):
        assert host.broadcast_object({"i": i, "s": "x" * 1000} if PID == 0 else None)["i"] == i
        assert host.all_gather_object(PID) == [0, 1]
        host.barrier()
    took = time.monotonic() - t0
    assert host._client().key_value_dir_get_bytes("spmd/host/") == []
    print(f"host net ok: 300 small calls in {took:.2f} s", flush=True)

    # Process 1 dies 1 MiB into a 64 MiB message: process 0 raises at once, not at its timeout.
    seq = host._CALLS._n + 1
    if PID == 1:
        from spmd.host_net._frame import FRAMES, INTENT, MSG

        sock = mesh.peers[0].sock
        sock.setblocking(True)
        for kind, header, size, payload in (
            (INTENT, {"source": 1, "max_bytes": 1 << 30}, 0, b""),
            (
                MSG,
                {"tree": {"array": {"dtype": "uint8", "shape": [1 << 26], "kind": "numpy", "index": 0}}},
                1 << 26,
                bytes(1 << 20),
            ),
        ):
            h = json_bytes({"op": "broadcast_object", "sources": [1], **header})
            sock.sendall(FRAMES.preamble(kind, seq, len(h), size) + h + payload)
        print("OK host_net (dying now)", flush=True)
        # Leave nothing unread: closing with process 0's intent still in the receive buffer would send a
        # reset, which can discard bytes already in flight to process 0 (the count checked below).
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass
        os._exit(0)
    expect_error(ConnectionError, "1048576 of the 67108864 payload bytes", lambda: recv(1), within_s=1.5)
    print("OK host_net", flush=True)
    os._exit(0)  # process 1 is gone: skip jax.distributed's shutdown barrier


def json_bytes(d: dict) -> bytes:
    import json

    return json.dumps(d).encode()


main()
