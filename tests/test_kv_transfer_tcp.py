"""TCPKVPipe beyond the pipe contract (tests/test_kv_contract.py): framing faults, authentication, timeouts,
stalls, soak and descriptor hygiene."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import kv_pipes
import numpy as np
import pytest
from kv_pipes import within

from spmd.kv_transfer import TCPKVPipe
from spmd.kv_transfer.tcp import MAX_HEADER_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair(timeout_s=5.0, **kw):
    """A connected TCP (server, client) pair (``kv_pipes.pair``, the one factory)."""
    return kv_pipes.pair("tcp", timeout_s=timeout_s, **kw)


@pytest.fixture
def pipes():
    s, c = pair()
    yield s, c
    s.close()
    c.close()


def test_after_the_peer_closed_the_pipe_says_why(pipes):
    """(The contract checks the ConnectionError itself; this pipe then names the fault.)"""
    server, client = pipes
    client.close()
    with pytest.raises(ConnectionError, match="peer closed the pipe"):
        server.recv_tensor()
    with pytest.raises(ValueError, match=r"closed after an earlier fault \(the peer closed the connection\)"):
        server.recv_tensor()


def test_send_to_a_gone_peer_raises(pipes):
    server, client = pipes
    server.close()
    with pytest.raises(ConnectionError, match="send_tensor: the connection failed"):
        for _ in range(100):  # the first sends may land in the kernel buffer
            client.send_tensor(np.ones(1 << 20, np.float32))


def test_stall_mid_message_times_out_and_closes():
    server, client = pair(timeout_s=0.3)
    with server, client:
        client._sock.sendall(_frame({"dtype": "float32", "shape": [100]}, b"\0" * 100, payload_len=400))
        with pytest.raises(TimeoutError, match="300 of 400 bytes missing"):
            within(3, server.recv_tensor)
        assert server.closed


def test_bad_arguments():
    with pytest.raises(ValueError, match="role must be"):
        TCPKVPipe("127.0.0.1", 1, role="peer")
    with pytest.raises(ValueError, match="timeout_s must be"):
        TCPKVPipe("127.0.0.1", 1, timeout_s=0)
    with pytest.raises(ValueError, match="port must be"):
        TCPKVPipe("127.0.0.1", 70000)
    with pytest.raises(TypeError, match="secret must be"):
        TCPKVPipe("127.0.0.1", 1, secret="text")


def test_client_gives_up_after_its_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="could not connect"):
        TCPKVPipe("127.0.0.1", kv_pipes.free_port(), role="client", timeout_s=0.5)
    assert time.monotonic() - t0 < 3


def test_server_gives_up_after_its_timeout():
    with pytest.raises(TimeoutError, match="no peer connected"):
        TCPKVPipe("127.0.0.1", kv_pipes.free_port(), role="server", timeout_s=0.3)


# Framing faults -----------------------------------------------------------------------------


def _frame(header: dict, payload: bytes = b"", *, kind=1, seq=0, magic=b"SKVP", length=None, payload_len=None):
    """A frame as the module docstring describes it (written here, not by the code under test)."""
    body = json.dumps(header).encode()
    n = len(body) if length is None else length
    p = len(payload) if payload_len is None else payload_len
    return struct.pack("!4sBBHQQQ", magic, 2, kind, 0, seq, n, p) + body + payload


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 32, "not a frame of this protocol"),
        (_frame({"a": 1}, length=MAX_HEADER_BYTES + 1), "maximum is"),
        (struct.pack("!4sBBHQQQ", b"SKVP", 2, 1, 0, 0, 5, 4) + b"{bad}", "not JSON"),
        (_frame({"dtype": "float32", "shape": [1 << 40, 1 << 20]}, payload_len=1 << 62), "refusing before"),
        (_frame({"dtype": "float32", "shape": [4]}, payload_len=17), "the frame carries 17"),
        (_frame({"dtype": "object", "shape": [1]}, payload_len=8), "not allowed"),
        (_frame({"dtype": "float32", "shape": [-1]}, payload_len=4), "malformed array shape"),
        (_frame({"dtype": "float32", "shape": [1]}, kind=2), "carries no array"),
        (_frame({"dtype": "float32", "shape": [1], "pickle": 1}, payload_len=4), "expected"),
        (_frame({"dtype": "float32", "shape": [1]}, seq=5, payload_len=4), r"message #5 arrived where #0 was due"),
        (_frame({}, kind=9), "unknown frame kind 9"),
    ],
    ids=[
        "garbage", "huge-header", "bad-json", "absurd-size", "inconsistent", "dtype", "shape", "none", "keys", "seq",
        "kind",
    ],
)  # fmt: skip
def test_bad_frames_raise_valueerror_and_close(raw, match):
    server, client = pair()
    with server, client:
        client._sock.sendall(raw)
        with pytest.raises(ValueError, match=match):
            server.recv_tensor()
        assert server.closed


def test_absurd_size_is_refused_without_allocating(monkeypatch):
    server, client = pair(max_message_bytes=1 << 20)
    calls = []
    real = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: calls.append(a) or real(*a, **k))
    with server, client:
        client._sock.sendall(_frame({"dtype": "uint8", "shape": [2 << 20]}, payload_len=2 << 20))
        with pytest.raises(ValueError, match="at most 1048576"):
            server.recv_tensor()
    assert calls == []


def test_peer_gone_mid_message_says_how_much_is_missing():
    server, client = pair()
    with server:
        client._sock.sendall(_frame({"dtype": "float32", "shape": [256]}, b"\0" * 24, payload_len=1024))
        client.close()
        with pytest.raises(ConnectionError, match="1000 of 1024 bytes"):
            server.recv_tensor()


_KILLED_SENDER = """
import sys, numpy as np
from spmd.kv_transfer import TCPKVPipe
p = TCPKVPipe("127.0.0.1", int(sys.argv[1]), role="client", timeout_s=10)
x = np.ones(64 << 20, np.uint8)
print("connected", flush=True)
while True:
    p.send_tensor(x)
"""


@pytest.mark.multiprocess
def test_peer_killed_mid_transfer_raises_within_the_timeout():
    port = kv_pipes.free_port()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SENDER, str(port)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        server = TCPKVPipe("127.0.0.1", port, role="server", timeout_s=20)
        with server:
            server._sock.recv(1 << 20, socket.MSG_PEEK)  # a message has started
            os.kill(child.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(ConnectionError):
                while True:
                    server.recv_tensor()
            assert time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


# Authentication ------------------------------------------------------------------------------


def test_same_secret_connects():
    server, client = pair(server_secret=b"k" * 32, client_secret=b"k" * 32)
    with server, client:
        client.send_tensor(np.arange(4))
        np.testing.assert_array_equal(server.recv_tensor(), np.arange(4))


@pytest.mark.parametrize(
    "server_secret,client_secret,match",
    [
        (b"right", b"wrong", "requires the right secret"),
        (b"right", None, "requires a secret"),
        (None, b"mine", "does not authenticate"),
    ],
    ids=["wrong", "missing", "server-without"],
)
def test_wrong_or_missing_secret_is_refused(server_secret, client_secret, match):
    with pytest.raises((PermissionError, TimeoutError)) as info:
        pair(timeout_s=1.0, server_secret=server_secret, client_secret=client_secret)
    # The client raises PermissionError; the server keeps waiting, then times out naming the refusal.
    assert info.type is PermissionError and info.match(match)


def test_server_refuses_garbage_then_accepts_a_proper_peer():
    port = kv_pipes.free_port()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", TCPKVPipe("127.0.0.1", port, timeout_s=5, secret=b"s")))
    t.start()
    for _ in range(100):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=1)
            break
        except OSError:
            time.sleep(0.02)
    raw.sendall(b"\xff" * 200)
    raw.close()
    client = TCPKVPipe("127.0.0.1", port, role="client", timeout_s=5, secret=b"s")
    t.join()
    with box["s"] as server, client:
        client.send_tensor(None)
        assert server.recv_tensor() is None


def test_server_timeout_names_the_refused_peer():
    port = kv_pipes.free_port()
    box = {}

    def serve():
        try:
            TCPKVPipe("127.0.0.1", port, timeout_s=1.0, secret=b"s")
        except TimeoutError as e:
            box["e"] = e

    t = threading.Thread(target=serve)
    t.start()
    with pytest.raises(PermissionError):
        TCPKVPipe("127.0.0.1", port, role="client", timeout_s=1.0, secret=b"x")
    t.join()
    assert "refused 1 peer(s)" in str(box["e"]) and "HMAC" in str(box["e"])


# Soak ----------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_soak_1000_messages_and_50_pipes_without_fd_growth(rng):
    server, client = pair()
    msgs = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(0, 2000, 1000)]
    with server, client:
        t = threading.Thread(target=lambda: [client.send_tensor(m if i % 7 else None) for i, m in enumerate(msgs)])
        t.start()
        for i, m in enumerate(msgs):
            got = server.recv_tensor()
            if i % 7:
                np.testing.assert_array_equal(got, m)
            else:
                assert got is None
        t.join()
    before = _fds()
    for i in range(50):
        s, c = pair(server_secret=b"k" if i % 2 else None, client_secret=b"k" if i % 2 else None)
        c.send_tensor(np.full(3, i))
        assert int(s.recv_tensor()[0]) == i
        s.close()
        c.close()
    assert _fds() <= before + 2


def test_recycled_buffers_never_alias_live_arrays(pipes, rng):
    server, client = pipes
    xs = [rng.integers(0, 255, 2 << 20, dtype=np.uint8) for _ in range(8)]
    kept = []
    for i, x in enumerate(xs):
        client.send_tensor(x)
        got = server.recv_tensor()
        if i % 2 == 0:
            kept.append((x, got))  # alive: its buffer must not be reused
        view = memoryview(got) if i == 1 else None  # a memoryview keeps it alive too
        del got
    for x, got in kept:
        np.testing.assert_array_equal(got, x)
    assert view is None or view.nbytes == 2 << 20


def test_benchmark_runs_and_checks(tmp_path):
    from spmd.bench import kv_transfer

    out = tmp_path / "kv.json"
    rc = kv_transfer.main(["--sizes", "1MiB", "--transports", "naive,raw,tcp", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["transport"] for r in rows] == ["naive", "raw", "tcp"]
    assert all(r["ok"] and r["GBps"] > 0 for r in rows) and "ratio_raw" in rows[2]


# Strangers on the port: one deadline, handshakes side by side (issue 22, items 1 and 2) -------------


def _stranger(port: int, kind: str, stop: threading.Event) -> threading.Thread:
    """A connection to ``port`` that never completes the handshake: silent, or dripping one byte at a time."""

    def run():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                while not stop.is_set():
                    if kind == "drip":
                        s.sendall(b"\x01")
                    stop.wait(0.05)
        except OSError:  # dropped by the server: what should happen
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _listening(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)


def test_silent_and_dripping_strangers_never_keep_the_right_peer_out():
    port, stop, box = kv_pipes.free_port(), threading.Event(), {}
    t = threading.Thread(
        target=lambda: box.setdefault("s", TCPKVPipe("127.0.0.1", port, timeout_s=2.0, secret=b"k")), daemon=True
    )
    t.start()
    _listening(port)  # (a probe: refused, as a stranger)
    strangers = [_stranger(port, kind, stop) for kind in ("silent", "silent", "silent", "drip", "drip")]
    time.sleep(0.2)  # they are all in their handshakes
    t0 = time.monotonic()
    try:
        client = TCPKVPipe("127.0.0.1", port, role="client", timeout_s=2.0, secret=b"k")
        t.join(3)
        assert time.monotonic() - t0 < 1.0, "the right peer waited for the strangers"
        with box["s"] as server, client:
            client.send_tensor(np.arange(3))
            np.testing.assert_array_equal(server.recv_tensor(), np.arange(3))
    finally:
        stop.set()
        for s in strangers:
            s.join(2)


def test_a_dripping_stranger_cannot_stretch_the_servers_deadline():
    port, stop = kv_pipes.free_port(), threading.Event()
    box: dict = {}

    def serve():
        try:
            TCPKVPipe("127.0.0.1", port, timeout_s=0.8, secret=b"k")
        except TimeoutError as e:
            box["e"] = e

    t = threading.Thread(target=serve, daemon=True)
    t0 = time.monotonic()
    t.start()
    _listening(port)
    dripper = _stranger(port, "drip", stop)  # 76 bytes at 20 a second: 4 s if each byte restarted the clock
    t.join(5)
    stop.set()
    dripper.join(2)
    assert "e" in box and time.monotonic() - t0 < 2.0, time.monotonic() - t0
    assert "no peer connected and passed the handshake within 0.8 s" in str(box["e"])


def test_a_dripping_server_cannot_stretch_the_clients_deadline():
    listener = socket.create_server(("127.0.0.1", 0))
    port, stop = listener.getsockname()[1], threading.Event()

    def drip():  # a stranger holding the port: says its HELLO one byte at a time
        conn, _ = listener.accept()
        with conn:
            for b in bytes(64):
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([b]))

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"could not connect to .* and pass the handshake within 0\.6 s"):
            TCPKVPipe("127.0.0.1", port, role="client", timeout_s=0.6, secret=b"k")
        assert time.monotonic() - t0 < 1.5
    finally:
        stop.set()
        t.join(2)
        listener.close()


# Sizes a receiver cannot hold (issue 22, item 5) -------------------------------------------------------


def test_a_message_this_process_cannot_allocate_is_a_valueerror_and_closes_the_pipe():
    server, client = pair(max_message_bytes=1 << 62)  # the header passes every limit; the memory is not there
    with server, client:
        client._sock.sendall(_frame({"dtype": "uint8", "shape": [1 << 46]}, payload_len=1 << 46))
        with pytest.raises(ValueError, match=r"of 70368744177664 bytes announced; this process cannot allocate it"):
            server.recv_tensor()
        assert server.closed
        with pytest.raises(ValueError, match="closed after an earlier fault"):
            server.recv_tensor()


def test_a_shape_whose_bytes_overflow_int64_is_refused():
    server, client = pair(max_message_bytes=(1 << 64) - 1)
    with server, client:
        client._sock.sendall(_frame({"dtype": "float32", "shape": [1 << 31, 1 << 31]}, payload_len=1 << 63))
        with pytest.raises(ValueError, match="holds more bytes than an int64 can count"):
            server.recv_tensor()
        assert server.closed
