"""spmd.host_net: host-level messages over direct TCP connections, their set-up and their error paths.

Each "process" is a :class:`spmd.host_net.PeerConnections` on its own thread, over real loopback sockets; an
in-memory key-value store stands in for the coordination service, so every error path runs in well
under a second. One test kills a real subprocess in the middle of a message. The same protocol
under ``jax.distributed`` and ``spmd-launch``: tests/test_host_multiprocess.py.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import assert_same

from spmd import stream
from spmd.host_net import ABORT, INTENT, MSG, Call, NetConfig, PeerConnections, _peers
from spmd.host_net._frame import HANDSHAKE
from spmd.wire import MalformedMessageError

ROOT = pathlib.Path(__file__).resolve().parent.parent


class MemoryKV:
    """The two key-value calls a Mesh makes, on a dict shared by threads."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cv = threading.Condition()

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        with self.cv:
            assert allow_overwrite or key not in self.data, key
            self.data[key] = bytes(value)
            self.cv.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        end = time.monotonic() + timeout_ms / 1000
        with self.cv:
            while key not in self.data:
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
                self.cv.wait(left)
            return self.data[key]


class FileKV(MemoryKV):
    """The same, on files in a directory (shared with a subprocess)."""

    def __init__(self, root: str) -> None:
        self.root = pathlib.Path(root)

    def _path(self, key: str) -> pathlib.Path:
        return self.root / key.replace("/", "__")

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        tmp = self._path(key).with_suffix(".tmp")
        tmp.write_bytes(bytes(value))
        tmp.rename(self._path(key))

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        end = time.monotonic() + timeout_ms / 1000
        while not self._path(key).exists():
            if time.monotonic() > end:
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            time.sleep(0.01)
        return self._path(key).read_bytes()


def run_threads(fns: list) -> list:
    """``fns[i]()`` on thread ``i``; its result, or the exception it raised."""
    out: list = [None] * len(fns)

    def go(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as e:  # the test inspects it
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,), name=f"p{i}") for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a process thread hung"
    return out


class Job:
    """``n`` meshes on one in-memory store; every call numbers itself like spmd.host does."""

    def __init__(self, n: int, *, timeout: float = 10.0, max_bytes: int = 1 << 30, connect: bool = True) -> None:
        self.n, self.timeout, self.max_bytes = n, timeout, max_bytes
        self.kv = MemoryKV()
        self.meshes = [PeerConnections(self.kv, p, n, NetConfig()) for p in range(n)]
        self.seq = 0
        if connect:
            assert self.each(lambda m, c: m.ready(c), op="setup") == [True] * n

    def call(self, op: str, sources=None, *, timeout: float | None = None, seq: int | None = None) -> Call:
        timeout = self.timeout if timeout is None else timeout
        sources = tuple(range(self.n)) if sources is None else tuple(sources)
        return Call(self.seq if seq is None else seq, op, sources, timeout, time.monotonic() + timeout, self.max_bytes)

    def each(self, fn, *, op: str = "broadcast_object", sources=None, timeout: float | None = None) -> list:
        """One call on every process: ``fn(mesh, call)`` (the same call) on ``n`` threads."""
        self.seq += 1
        return run_threads([lambda m=m: fn(m, self.call(op, sources, timeout=timeout)) for m in self.meshes])

    def per_process(self, fns: list) -> list:
        """One call number, a different call per process: ``fns[p](mesh, seq)``."""
        self.seq += 1
        return run_threads([lambda m=m, f=f: f(m, self.seq) for m, f in zip(self.meshes, fns, strict=True)])

    def bcast(self, values: list, src: int, **kw) -> list:
        return self.each(lambda m, c: m.broadcast(c, values[m.me], src, None), sources=(src,), **kw)

    def close(self) -> None:
        for m in self.meshes:
            m.close()


@pytest.fixture
def job2():
    j = Job(2)
    yield j
    j.close()


def random_value(rng: np.random.Generator, big: int = 0) -> dict:
    return {
        "w": rng.standard_normal((int(rng.integers(1, 40)), 7)).astype(ml_dtypes.bfloat16),
        "ids": rng.integers(-(2**40), 2**40, int(rng.integers(0, 30))),
        "mask": rng.random(13) > 0.5,
        "scalar": np.float16(rng.standard_normal()),
        "zero_d": np.asarray(rng.standard_normal()),
        "empty": np.zeros((0, 5), np.float32),
        "jax": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "big": rng.integers(0, 256, big, dtype=np.uint8),
        "meta": {"n": int(rng.integers(1 << 62)), "f": float(rng.standard_normal()), "s": "ß" * 3, "b": b"\x00\xff"},
        (1, "k"): [None, True, (2.5,)],
    }


# Results against references -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3])
def test_every_op_delivers_the_senders_values(n, rng):
    job = Job(n)
    try:
        for big in (0, 3 << 20):  # 3 MiB: many partial sends and receives
            src = int(rng.integers(n))
            value = random_value(rng, big)
            got = job.bcast([value if p == src else None for p in range(n)], src)
            assert got[src] is value
            for p in range(n):
                assert_same(got[p], value)
                assert got[p]["w"].flags.writeable
        values = [random_value(rng, int(rng.integers(0, 70_000))) for _ in range(n)]
        got = job.each(lambda m, c: m.all_gather(c, values[m.me]), op="all_gather_object")
        for p in range(n):
            assert_same(got[p], values)
        assert job.each(lambda m, c: m.barrier(c), op="barrier") == [None] * n
    finally:
        job.close()


def test_a_random_sequence_of_calls(rng):
    """Sent-at-once and intents-first messages, gathers and barriers interleaved: every result checked."""
    job = Job(3)
    try:
        for _ in range(24):
            op = rng.choice(["broadcast", "all_gather", "barrier"])
            sizes = rng.choice([0, 100, 70_000, 1_500_000], size=3)
            values = [{"p": p, "x": rng.integers(0, 256, int(sizes[p]), dtype=np.uint8)} for p in range(3)]
            if op == "broadcast":
                src = int(rng.integers(3))
                got = job.bcast([values[p] if p == src else None for p in range(3)], src)
                assert all(g["p"] == src and np.array_equal(g["x"], values[src]["x"]) for g in got), got
            elif op == "all_gather":
                got = job.each(lambda m, c, v=values: m.all_gather(c, v[m.me]), op="all_gather_object")
                for g in got:
                    assert [e["p"] for e in g] == [0, 1, 2], g
                    assert all(np.array_equal(e["x"], v["x"]) for e, v in zip(g, values, strict=True))
            else:
                assert job.each(lambda m, c: m.barrier(c), op="barrier") == [None] * 3
    finally:
        job.close()


def test_several_senders_each_reach_their_receivers(rng):
    """Groups whose sources differ: processes 0 and 3 take sender 1's value, sender 1 takes sender 2's."""
    job = Job(4)
    try:
        values = [random_value(rng, int(rng.integers(100, 300_000))) for _ in range(4)]
        source = [1, 2, 2, 1]
        got = job.each(lambda m, c: m.broadcast(c, values[m.me], source[m.me], None), sources=(1, 2))
        for p in range(4):
            assert_same(got[p], values[source[p]])
        assert got[2] is values[2]
    finally:
        job.close()


# Misuse: both sides see it, at once, and the job goes on ------------------------------------------


def _b(src, value=None, op="broadcast_object"):
    return lambda m, seq: m.broadcast(Call(seq, op, (src,), 10.0, time.monotonic() + 10.0, 1 << 30), value, src, None)


def _barrier(m, seq):
    return m.barrier(Call(seq, "barrier", (0, 1), 10.0, time.monotonic() + 10.0, 1 << 30))


def _gather(value):
    return lambda m, seq: m.all_gather(
        Call(seq, "all_gather_object", (0, 1), 10.0, time.monotonic() + 10.0, 1 << 30), value
    )


@pytest.mark.parametrize(
    "calls,theirs",
    [
        ([_b(0, "a"), _b(1, "b")], ["broadcast_object from process 1", "broadcast_object from process 0"]),
        ([_b(1), _b(0)], ["broadcast_object from process 0", "broadcast_object from process 1"]),
        (
            [_b(0, {"w": np.ones(3)}, "broadcast_tensor_dict"), _barrier],
            ["barrier", "broadcast_tensor_dict from process 0"],
        ),
        ([_gather(np.arange(300_000)), _b(0)], ["broadcast_object from process 0", "all_gather_object"]),
    ],
    ids=["both-send", "src-differs", "broadcast-vs-barrier", "all-gather-payload-vs-broadcast"],
)
def test_mismatched_calls_raise_on_both_sides_and_the_streams_stay_in_step(job2, calls, theirs, rng):
    t0 = time.monotonic()
    got = job2.per_process(calls)
    assert time.monotonic() - t0 < 3
    for p, e in enumerate(got):
        assert isinstance(e, RuntimeError) and "the processes made different calls" in str(e), e
        assert f"this process ({p})" in str(e) and f"process {1 - p} called {theirs[p]}" in str(e), e
    value = random_value(rng, 1000)
    assert_same(job2.bcast([None, value], 1)[0], value)  # stale frames (payloads included) are skipped


def test_a_sender_that_cannot_encode_names_why_on_every_process(rng):
    job = Job(3)
    try:
        t0 = time.monotonic()
        got = job.bcast([{"w": np.ones(2), "bad": {1, 2}}, None, None], 0)
        assert time.monotonic() - t0 < 2
        assert isinstance(got[0], TypeError) and "['bad']: cannot send a value of type builtins.set" in str(got[0])
        for e in got[1:]:
            assert isinstance(e, RuntimeError) and "process 0 could not send its value: TypeError:" in str(e), e
            assert "['bad']" in str(e)
        value = random_value(rng)
        assert_same(job.bcast([value, None, None], 0)[2], value)
    finally:
        job.close()


@pytest.mark.parametrize(
    "n,receiver_error",
    [
        (20_000, "process 0 gave up on this call: ValueError"),  # 160 kB: the sender waits for intents first
        (2_000, "announces more than 1000 bytes of arrays"),  # 16 kB: sent at once, refused on arrival
    ],
)
def test_a_value_over_a_receivers_limit_is_refused(job2, n, receiver_error):
    calls = [  # process 1 accepts 1000 bytes, process 0 up to 1 GiB
        lambda m, seq: m.broadcast(Call(seq, "b", (0,), 5, time.monotonic() + 5, 1 << 30), {"x": np.ones(n)}, 0, None),
        lambda m, seq: m.broadcast(Call(seq, "b", (0,), 5, time.monotonic() + 5, 1000), None, 0, None),
    ]
    sender, receiver = job2.per_process(calls)
    assert isinstance(sender, ValueError) and "process 1 accepts at most 1000" in str(sender), sender
    assert isinstance(receiver, (RuntimeError, ValueError)) and receiver_error in str(receiver), receiver
    assert job2.bcast([{"x": np.arange(5)}, None], 0)[1]["x"].tolist() == list(range(5))


# Timeouts and dead peers ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [9, 200_000], ids=["sent-at-once", "intents-first"])
def test_a_peer_that_never_calls_times_out_and_a_late_peer_learns_why(job2, size, rng):
    t0 = time.monotonic()
    job2.seq += 1
    seq = job2.seq
    x = rng.standard_normal(size)
    (e,) = run_threads([lambda: job2.meshes[0].broadcast(job2.call("b", (0,), timeout=0.5), {"x": x}, 0, None)])
    assert 0.5 <= time.monotonic() - t0 < 2
    assert isinstance(
        e, TimeoutError
    ) and f"b: host-level call #{seq}: waited 0.5 s for process 1 and got nothing" in str(e)
    (late,) = run_threads([lambda: job2.meshes[1].broadcast(job2.call("b", (0,), seq=seq), None, 0, None)])
    assert isinstance(late, RuntimeError) and "process 0 gave up on this call: TimeoutError" in str(late), late
    value = random_value(rng, 5000)
    assert_same(job2.bcast([value, None], 0)[1], value)


def _frame(kind, seq, header, payload=b"", *, payload_len=None):
    h = json.dumps(header).encode() if isinstance(header, dict) else header
    n = len(payload) if payload_len is None else payload_len
    return struct.pack("!4sBBHQQQ", b"SPHM", 1, kind, 0, seq, len(h), n) + h + payload


def _raw_socket(job, p, q):
    """Process ``p``'s socket to ``q``, for writing forged frames."""
    return job.meshes[p].peers[q].sock


def test_a_peer_that_dies_mid_message_is_an_error_at_once(job2):
    seq = job2.seq + 1
    tree = {"array": {"dtype": "uint8", "shape": [1 << 20], "kind": "numpy", "index": 0}}
    s = _raw_socket(job2, 0, 1)
    s.setblocking(True)
    s.sendall(_frame(INTENT, seq, {"op": "b", "sources": [0], "source": 0, "max_bytes": 1 << 30}))
    s.sendall(_frame(MSG, seq, {"op": "b", "sources": [0], "tree": tree}, b"\1" * 100_000, payload_len=1 << 20))
    s.close()  # as the kernel does when a process dies
    t0 = time.monotonic()
    job2.seq = seq
    (e,) = run_threads([lambda: job2.meshes[1].broadcast(job2.call("b", (0,)), None, 0, None)])
    assert time.monotonic() - t0 < 1
    assert isinstance(e, ConnectionError), e
    assert "process 0 closed its connection to this process (got 100000 of the 1048576 payload bytes" in str(e)
    (again,) = run_threads([lambda: job2.meshes[1].barrier(job2.call("barrier"))])
    assert isinstance(again, ConnectionError) and "the connection to process 0 was lost earlier" in str(again)


_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from test_host_net import FileKV, _frame
from spmd.host_net import INTENT, MSG, Call, NetConfig, PeerConnections
mesh = PeerConnections(FileKV({root!r}), 1, 2, NetConfig())
mesh.ready(Call(1, "setup", (0, 1), 30, time.monotonic() + 30, 1 << 30))
s = mesh.peers[0].sock
s.setblocking(True)
tree = {{"array": {{"dtype": "uint8", "shape": [1 << 26], "kind": "numpy", "index": 0}}}}
s.sendall(_frame(INTENT, 2, {{"op": "b", "sources": [1], "source": 1, "max_bytes": 1 << 30}}))
s.sendall(_frame(MSG, 2, {{"op": "b", "sources": [1], "tree": tree}}, bytes(3 << 20), payload_len=1 << 26))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.multiprocess
def test_a_killed_process_mid_message_is_an_error_within_the_timeout(tmp_path):
    """A real process, SIGKILLed 3 MiB into a 64 MiB payload: the receiver raises at once, not at its timeout."""
    code = _CHILD.format(tests=str(ROOT / "tests"), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        mesh = PeerConnections(FileKV(str(tmp_path)), 0, 2, NetConfig())
        assert mesh.ready(Call(1, "setup", (0, 1), 60, time.monotonic() + 60, 1 << 30))
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"(closed its connection|connection to process 1 failed).*payload"):
            mesh.broadcast(Call(2, "b", (1,), 30, time.monotonic() + 30, 1 << 30), None, 1, None)
        assert time.monotonic() - t0 < 10
        assert child.wait(30) == -9, child.stderr.read()
    finally:
        child.kill()
        child.wait()


# Garbage and absurd sizes: refused before allocating ----------------------------------------------

_HDR = {"op": "b", "sources": [0]}


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"GET / HTTP/1.1\r\n\r\n" + bytes(20), "not a frame of this protocol"),
        (_frame(7, 1, _HDR), "unknown frame kind 7"),
        (_frame(MSG, 1, _HDR, payload_len=1 << 62), "a 4611686018427387904-byte payload, over the limit"),
        (struct.pack("!4sBBHQQQ", b"SPHM", 1, MSG, 0, 1, 1 << 40, 0), "kind MSG with a 1099511627776-byte header"),
        (_frame(INTENT, 1, _HDR, payload_len=1 << 20), "kind INTENT with a 1048576-byte payload"),
    ],
)
def test_garbage_and_absurd_sizes_close_the_connection_before_allocating(job2, raw, match):
    s = _raw_socket(job2, 0, 1)
    s.setblocking(True)
    s.sendall(raw)
    s.setblocking(False)
    job2.seq += 1
    tracemalloc.start()
    try:
        (e,) = run_threads([lambda: job2.meshes[1].broadcast(job2.call("b", (0,)), None, 0, None)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(e, MalformedMessageError) and match in str(e), e
    assert "refused before allocating anything, and its connection is closed" in str(e)
    assert peak < 1 << 20, peak
    assert job2.meshes[1].peers[0].closed


@pytest.mark.parametrize(
    "header,payload,match",
    [
        (b"{not json", b"", "the header is not JSON"),
        ({"op": "b"}, b"", "bad header"),
        (
            {**_HDR, "tree": {"array": {"dtype": "uint8", "shape": [1 << 31], "kind": "numpy", "index": 0}}},
            b"",
            "over the limit",
        ),
        (
            {**_HDR, "tree": {"array": {"dtype": "uint8", "shape": [10], "kind": "numpy", "index": 0}}},
            bytes(64),
            "need 10 bytes",
        ),
        ({**_HDR, "tree": {"pickle": "x"}}, b"", "unknown tag 'pickle'"),
    ],
)
def test_a_malformed_message_is_one_error_type_and_the_connection_stays_usable(job2, header, payload, match, rng):
    job2.seq += 1
    s = _raw_socket(job2, 0, 1)
    s.setblocking(True)
    s.sendall(_frame(INTENT, job2.seq, {**_HDR, "source": 0, "max_bytes": 1 << 30}))
    s.sendall(_frame(MSG, job2.seq, header, payload))
    s.setblocking(False)
    (e,) = run_threads([lambda: job2.meshes[1].broadcast(job2.call("b", (0,)), None, 0, None)])
    assert isinstance(e, MalformedMessageError) and match in str(e), e
    value = random_value(rng, 100)
    assert_same(job2.bcast([value, None], 0)[1], value)


def test_a_frame_of_a_later_call_means_the_peer_went_on(job2, rng):
    job2.seq += 1
    s = _raw_socket(job2, 0, 1)
    s.setblocking(True)
    s.sendall(_frame(INTENT, job2.seq + 1, {"op": "barrier", "sources": [0, 1], "source": 0, "max_bytes": 1}))
    s.setblocking(False)
    (e,) = run_threads([lambda: job2.meshes[1].broadcast(job2.call("b", (0,)), None, 0, None)])
    assert isinstance(e, RuntimeError), e
    n = job2.seq
    assert f"process 0 sent its part of host-level call #{n + 1} (barrier) while this process is at call #{n}" in str(e)
    assert "the processes made different calls" in str(e)


def test_an_abort_notice_names_the_reason(job2):
    job2.seq += 1
    s = _raw_socket(job2, 0, 1)
    s.setblocking(True)
    s.sendall(_frame(ABORT, job2.seq, {"op": "barrier", "sources": [0, 1], "error": "KeyboardInterrupt: "}))
    s.setblocking(False)
    (e,) = run_threads([lambda: job2.meshes[1].barrier(job2.call("barrier"))])
    assert isinstance(e, RuntimeError) and "process 0 gave up on this call: KeyboardInterrupt" in str(e), e


# Set-up: authentication, fallback, configuration --------------------------------------------------


def test_strangers_are_refused_and_the_job_still_connects(rng):
    """Garbage, then a peer with the wrong secret, reach process 0's port before process 1 does."""
    job = Job(2, connect=False)
    try:
        job.seq = 1
        for m in job.meshes:
            m._publish()  # both addresses are known; process 1 connects only after the strangers
        rec = json.loads(job.kv.blocking_key_value_get_bytes("spmd/host_net/0", 10_000))
        garbage = socket.create_connection((rec["host"], rec["port"]), timeout=5)
        stranger = socket.create_connection((rec["host"], rec["port"]), timeout=5)
        results: list = []
        threads = [
            threading.Thread(target=lambda m=m: results.append(m.ready(job.call("setup", seq=1)))) for m in job.meshes
        ]
        threads[0].start()
        garbage.recv(stream.HELLO.size)
        garbage.sendall(b"\x00" * stream.REPLY.size)
        assert garbage.recv(100)[:4] in (b"", b"DENY")
        magic, version, flags, _, nonce = stream.HELLO.unpack(stranger.recv(stream.HELLO.size))
        proof = HANDSHAKE.digest(os.urandom(32), b"client", nonce, 1, 0)  # the wrong secret
        stranger.sendall(stream.REPLY.pack(magic, version, flags, 1, os.urandom(32), proof))
        assert stranger.recv(4) == b"DENY"
        threads[1].start()
        for t in threads:
            t.join(10)
        garbage.close()
        stranger.close()
        assert results == [True, True]
        refused = job.meshes[0]._refused
        assert len(refused) == 2 and "does not speak" in refused[0] and "without the secret" in refused[1]
        value = random_value(rng)
        assert_same(job.bcast([value, None], 0)[1], value)
    finally:
        job.close()


def test_a_server_without_the_secret_is_refused_by_the_client():
    kv = MemoryKV()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    kv.key_value_set_bytes("spmd/host_net/secret", os.urandom(32))
    rec = {"v": 1, "host": "127.0.0.1", "port": port, "machine": _peers.machine(), "explicit": False}
    kv.key_value_set_bytes("spmd/host_net/0", json.dumps(rec).encode())

    def impostor():
        conn, _ = listener.accept()
        conn.sendall(HANDSHAKE.hello(b"not the job's secret", 0)[0])
        conn.recv(stream.REPLY.size)
        conn.sendall(stream.VERDICT.pack(b"OKAY", os.urandom(32)))  # cannot prove the secret
        time.sleep(0.5)
        conn.close()

    t = threading.Thread(target=impostor)
    t.start()
    mesh = PeerConnections(kv, 1, 2, NetConfig())
    with pytest.raises(PermissionError, match="process 0's port failed to prove it holds the secret"):
        mesh.ready(Call(1, "setup", (0, 1), 5, time.monotonic() + 5, 1 << 30))
    t.join()
    mesh.close()
    listener.close()


def test_a_process_that_never_arrives_times_out_the_set_up():
    job = Job(2, connect=False)
    try:
        t0 = time.monotonic()
        with pytest.raises(
            TimeoutError, match=r"setup: host-level call #1: waited 0.3 s for process 1 and got nothing"
        ):
            job.meshes[0].ready(job.call("setup", timeout=0.3, seq=1))
        assert time.monotonic() - t0 < 2
    finally:
        job.close()


def _record(machine: str, explicit: bool) -> dict:
    return {"v": 1, "host": "127.0.0.1", "port": 1, "machine": machine, "explicit": explicit}


@pytest.mark.parametrize(
    "machines,explicit,transport,expect",
    [
        (["a", "a"], [False, False], "auto", "tcp"),
        (["a", "b"], [False, False], "auto", "store"),
        (["a", "b"], [True, False], "auto", "store"),
        (["a", "b"], [True, True], "auto", "tcp"),
        (["a", "b"], [False, True], "tcp", "SPMD_HOST_TRANSPORT=tcp: the processes run on several machines"),
    ],
)
def test_direct_connections_only_where_every_process_can_reach_every_other(machines, explicit, transport, expect):
    mesh = PeerConnections(MemoryKV(), 0, 2, NetConfig(transport))
    mesh._records = {p: _record(m, e) for p, (m, e) in enumerate(zip(machines, explicit, strict=True))}
    if expect in ("tcp", "store"):
        assert mesh._decide() == expect
    else:
        with pytest.raises(ValueError, match=expect):
            mesh._decide()


def test_several_machines_fall_back_to_the_store(monkeypatch):
    monkeypatch.setattr(_peers, "machine", lambda: threading.current_thread().name)  # p0, p1: two "machines"
    job = Job(2, connect=False)
    assert job.each(lambda m, c: m.ready(c), op="setup") == [False, False]
    assert all(m._listener is None and not m.peers for m in job.meshes)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"transport": "udp"}, r"NetConfig: transport='udp': expected one of auto, tcp, store"),
        ({"address": ""}, r"NetConfig: address='': expected a host name or IP address, or None"),
    ],
)
def test_bad_configs_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        NetConfig(**kw)


# Bugs found in review: each test failed before its fix ---------------------------------------------


def test_an_all_gather_tree_over_the_limit_is_refused_on_the_sender_and_the_connections_stay_usable(rng):
    """A str/bytes value travels in the JSON tree: over SPMD_HOST_MAX_BYTES it is the sender's error."""
    job = Job(2, max_bytes=1000)
    try:
        values = [{"s": "x" * 2000}, {"s": "y"}]
        got = job.each(lambda m, c: m.all_gather(c, values[m.me]), op="all_gather_object")
        assert isinstance(got[0], ValueError) and "JSON tree is" in str(got[0]), got[0]
        assert "over the limit SPMD_HOST_MAX_BYTES=1000" in str(got[0])
        assert isinstance(got[1], RuntimeError) and "process 0 could not send its value: ValueError" in str(got[1])
        assert all(p.closed is None for m in job.meshes for p in m.peers.values())
        value = {"x": rng.integers(0, 256, 300, dtype=np.uint8), "f": float(rng.standard_normal())}
        assert_same(job.bcast([value, None], 0)[1], value)
    finally:
        job.close()


@pytest.mark.parametrize("chars", [5_000, 200_000], ids=["sent-at-once", "intents-first"])
def test_a_tree_over_a_receivers_limit_is_refused_and_the_connection_stays_usable(job2, chars):
    calls = [  # process 1 accepts 1000 bytes, process 0 up to 1 GiB
        lambda m, seq: m.broadcast(Call(seq, "b", (0,), 5, time.monotonic() + 5, 1 << 30), {"s": "x" * chars}, 0, None),
        lambda m, seq: m.broadcast(Call(seq, "b", (0,), 5, time.monotonic() + 5, 1000), None, 0, None),
    ]
    sender, receiver = job2.per_process(calls)
    assert isinstance(sender, ValueError) and "process 1 accepts at most 1000" in str(sender), sender
    assert isinstance(receiver, (RuntimeError, ValueError)), receiver
    assert "over the limit SPMD_HOST_MAX_BYTES=1000" in str(receiver) or "gave up" in str(receiver), receiver
    assert all(p.closed is None for m in job2.meshes for p in m.peers.values())
    assert job2.bcast([{"x": np.arange(5)}, None], 0)[1]["x"].tolist() == list(range(5))


def test_calls_from_two_threads_at_once_are_refused_not_interleaved(job2):
    """A second thread's call raises at once instead of mixing its frames into the first call's streams."""
    first: list = []

    def waiting():  # process 1 never makes this call: the first thread waits out its timeout
        try:
            job2.meshes[0].barrier(job2.call("barrier", timeout=1.0, seq=job2.seq + 1))
        except TimeoutError as e:
            first.append(e)

    t = threading.Thread(target=waiting, name="first")
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"two threads at once \(thread 'MainThread' while thread 'first' is in"):
        job2.meshes[0].barrier(job2.call("barrier", seq=job2.seq + 2))
    assert time.monotonic() - t0 < 0.5
    t.join(5)
    assert len(first) == 1, first


class _Interrupt(BaseException):
    """Stands for KeyboardInterrupt (which pytest would take for the user's)."""


def test_an_interrupt_during_the_handshake_leaks_no_socket():
    """Ctrl-C while waiting for the peer's verdict: the half-open connection is closed, not left to gc."""
    kv = MemoryKV()
    listener = socket.create_server(("127.0.0.1", 0))
    kv.key_value_set_bytes("spmd/host_net/secret", os.urandom(32))
    rec = {"v": 1, "host": "127.0.0.1", "port": listener.getsockname()[1], "machine": _peers.machine()}
    kv.key_value_set_bytes("spmd/host_net/0", json.dumps({**rec, "explicit": False}).encode())
    done = threading.Event()

    def slow_server():  # says hello, then never gives its verdict
        conn, _ = listener.accept()
        conn.sendall(HANDSHAKE.hello(os.urandom(32), 0)[0])
        done.wait(10)
        conn.close()

    def interrupt(*_):
        raise _Interrupt

    t = threading.Thread(target=slow_server)
    t.start()
    mesh = PeerConnections(kv, 1, 2, NetConfig())
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(_Interrupt):
                mesh.ready(Call(1, "setup", (0, 1), 5, time.monotonic() + 5, 1 << 30))
            mesh.close()
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        t.join()
        listener.close()


def test_a_refused_transport_decision_closes_the_listener(monkeypatch):
    """SPMD_HOST_TRANSPORT=tcp across machines: every call raises the ValueError; no port stays open."""
    monkeypatch.setattr(_peers, "machine", lambda: threading.current_thread().name)  # p0, p1: two "machines"
    job = Job(2, connect=False)
    job.meshes = [PeerConnections(job.kv, p, 2, NetConfig("tcp")) for p in range(2)]
    for _ in range(2):
        got = job.each(lambda m, c: m.ready(c), op="setup")
        assert all(isinstance(e, ValueError) and "SPMD_HOST_TRANSPORT=tcp" in str(e) for e in got), got
        assert all(m._listener is None for m in job.meshes)


def test_a_failed_publish_is_retried_by_the_next_call():
    """The store refuses process 1's record once: its next call publishes again (before: never, and process 0 hung)."""

    class FlakyKV(MemoryKV):
        fails = 1

        def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
            if key == "spmd/host_net/1" and self.fails:
                self.fails -= 1
                raise RuntimeError("UNAVAILABLE: the coordination service hiccuped")
            super().key_value_set_bytes(key, value, allow_overwrite)

    kv = FlakyKV()
    meshes = [PeerConnections(kv, p, 2, NetConfig()) for p in range(2)]

    def process_1():
        with pytest.raises(RuntimeError, match="UNAVAILABLE"):
            meshes[1].ready(Call(1, "setup", (0, 1), 5, time.monotonic() + 5, 1 << 30))
        assert meshes[1]._listener is None  # no port left open by the failed attempt
        return meshes[1].ready(Call(2, "setup", (0, 1), 5, time.monotonic() + 5, 1 << 30))

    try:
        got = run_threads(
            [lambda: meshes[0].ready(Call(1, "setup", (0, 1), 5, time.monotonic() + 5, 1 << 30)), process_1]
        )
        assert got == [True, True], got
    finally:
        for m in meshes:
            m.close()


def test_a_flood_of_strangers_is_counted_not_kept():
    job = Job(2, connect=False)
    try:
        for m in job.meshes:
            m._publish()  # process 1 never connects: process 0 accepts strangers until its deadline
        rec = json.loads(job.kv.blocking_key_value_get_bytes("spmd/host_net/0", 10_000))
        results: list = []

        def waiting():
            try:
                job.meshes[0].ready(job.call("setup", timeout=2.0, seq=1))
            except TimeoutError as e:
                results.append(e)

        t = threading.Thread(target=waiting)
        t.start()
        for _ in range(20):
            with socket.create_connection((rec["host"], rec["port"]), timeout=5) as s:
                s.recv(stream.HELLO.size)
                s.sendall(b"\x00" * stream.REPLY.size)
                s.recv(100)  # closed
        t.join(10)
        assert len(results) == 1 and "refused 20 connection(s), last: Refused" in str(results[0]), results
        assert len(job.meshes[0]._refused) <= 8
    finally:
        job.close()


# Strangers on the port: one deadline, handshakes side by side (issue 22, items 1 and 2) -------------


def _hold(addr: tuple, kind: str, stop: threading.Event) -> threading.Thread:
    """A stranger's connection that never finishes the handshake: silent, or one byte every 50 ms."""

    def run():
        try:
            with socket.create_connection(addr, timeout=5) as s:
                while not stop.wait(0.05):
                    if kind == "drip":
                        s.sendall(b"\x01")
        except OSError:  # dropped: what should happen
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_silent_and_dripping_strangers_never_keep_the_job_from_connecting(rng):
    """Three silent strangers and a dripping one reach process 0's port before process 1 does."""
    job = Job(3, connect=False)
    stop = threading.Event()
    try:
        job.seq = 1
        for m in job.meshes:
            m._publish()
        rec = json.loads(job.kv.blocking_key_value_get_bytes("spmd/host_net/0", 10_000))
        addr = (rec["host"], rec["port"])
        strangers = [_hold(addr, kind, stop) for kind in ("silent", "silent", "silent", "drip")]
        time.sleep(0.2)
        assert all(t.is_alive() for t in strangers)  # connected, in their handshakes
        t0 = time.monotonic()
        got = run_threads([lambda m=m: m.ready(job.call("setup", seq=1, timeout=2.0)) for m in job.meshes])
        assert got == [True, True, True], got
        assert time.monotonic() - t0 < 1.5, "the processes waited for the strangers"
        value = random_value(rng)
        assert_same(job.bcast([value, None, None], 0)[2], value)
    finally:
        stop.set()
        job.close()


def test_a_dripping_stranger_on_a_peers_port_cannot_stretch_the_set_up():
    """Process 0's published port is held by a stranger that says its HELLO one byte at a time."""
    kv = MemoryKV()
    listener = socket.create_server(("127.0.0.1", 0))
    kv.key_value_set_bytes("spmd/host_net/secret", os.urandom(32))
    rec = {"v": 1, "host": "127.0.0.1", "port": listener.getsockname()[1], "machine": _peers.machine()}
    kv.key_value_set_bytes("spmd/host_net/0", json.dumps({**rec, "explicit": False}).encode())
    stop = threading.Event()

    def drip():
        while not stop.is_set():
            listener.settimeout(0.1)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                for b in bytes(64):
                    if stop.wait(0.05):
                        return
                    try:
                        conn.sendall(bytes([b]))
                    except OSError:
                        break

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    mesh = PeerConnections(kv, 1, 2, NetConfig())
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"waited 0.8 s for process 0 and got nothing \(could not connect"):
            mesh.ready(Call(1, "setup", (0, 1), 0.8, time.monotonic() + 0.8, 1 << 30))
        assert time.monotonic() - t0 < 1.6
    finally:
        stop.set()
        t.join(2)
        mesh.close()
        listener.close()


def test_a_message_this_process_cannot_allocate_is_a_malformed_message_not_a_memory_error():
    """Under a huge SPMD_HOST_MAX_BYTES a peer announces 64 TiB of arrays: ValueError, never MemoryError (item 5)."""
    job = Job(2, max_bytes=1 << 50)
    try:
        seq = job.seq + 1
        tree = {"array": {"dtype": "uint8", "shape": [1 << 46], "kind": "numpy", "index": 0}}
        s = _raw_socket(job, 0, 1)
        s.setblocking(True)
        s.sendall(_frame(INTENT, seq, {"op": "b", "sources": [0], "source": 0, "max_bytes": 1 << 50}))
        s.sendall(_frame(MSG, seq, {"op": "b", "sources": [0], "tree": tree}, payload_len=1 << 46))
        s.setblocking(False)
        job.seq = seq
        (e,) = run_threads([lambda: job.meshes[1].broadcast(job.call("b", (0,), timeout=2.0), None, 0, None)])
        assert isinstance(e, MalformedMessageError), e
        assert "its arrays need 70368744177664 bytes, which this process cannot allocate" in str(e)
    finally:
        job.close()
