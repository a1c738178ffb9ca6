"""spmd.stream: the one TCP wire (handshake, frame preamble, deadline-bounded reads, the Acceptor).

The expected bytes and MACs are written here from the module docstring's description (struct
layouts, HMAC-SHA256 over label, role, nonce and ids), not read back from the code under test.
TCPKVPipe's and host_net's tests run the same pieces end to end.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

import pytest

from spmd import stream
from spmd.stream import Acceptor, FrameError, FrameFormat, Handshake, Refused

HS = Handshake(b"TEST", b"spmd-test", version=3)


def _mac(secret: bytes, label: bytes, role: bytes, nonce: bytes, client: int, server: int) -> bytes:
    return hmac.new(
        secret, label + b" " + role + b" " + nonce + struct.pack("!II", client, server), hashlib.sha256
    ).digest()


def test_proofs_bind_the_protocol_the_role_the_nonce_and_both_ids():
    secret, nonce = os.urandom(32), os.urandom(32)
    assert HS.digest(secret, b"client", nonce, 3, 1) == _mac(secret, b"spmd-test", b"client", nonce, 3, 1)
    others = [
        HS.digest(secret, b"server", nonce, 3, 1),  # reflected
        HS.digest(secret, b"client", nonce, 2, 1),  # another client
        HS.digest(secret, b"client", nonce, 3, 0),  # another server
        Handshake(b"TEST", b"spmd-kv").digest(secret, b"client", nonce, 3, 1),  # another protocol
    ]
    assert len({HS.digest(secret, b"client", nonce, 3, 1), *others}) == 5


def _reply(secret, nonce, client, server, *, flags=1, magic=b"TEST", version=3, mine=None):
    proof = _mac(secret, b"spmd-test", b"client", nonce, client, server) if secret else bytes(32)
    return struct.pack("!4sHHI32s32s", magic, version, flags, client, mine or os.urandom(32), proof)


def test_the_server_side_accepts_the_right_proof_and_proves_itself():
    secret = os.urandom(32)
    hello, nonce = HS.hello(secret, 7)
    assert struct.unpack("!4sHHI32s", hello) == (b"TEST", 3, 1, 7, nonce)
    mine = os.urandom(32)
    verdict, client = HS.verdict(_reply(secret, nonce, 9, 7, mine=mine), nonce, secret, 7, lambda c: True)
    assert client == 9 and verdict == b"OKAY" + _mac(secret, b"spmd-test", b"server", mine, 9, 7)


@pytest.mark.parametrize(
    ("reply_kw", "accept", "match", "denied"),
    [
        ({"magic": b"GET "}, True, "does not speak this protocol", False),
        ({"version": 2}, True, "does not speak this protocol", False),
        ({"secret": b"wrong"}, True, "without the secret", True),
        ({"flags": 0}, True, "without the secret", True),
        ({"client": 8}, True, "without the secret", True),  # a proof made for another client id
        ({}, False, "not a peer this side waits for", True),
    ],
)
def test_the_server_side_refuses_strangers(reply_kw, accept, match, denied):
    secret = os.urandom(32)
    _, nonce = HS.hello(secret, 7)
    kw = {"secret": secret, "client": 9, **reply_kw}
    raw = _reply(kw.pop("secret"), nonce, kw.pop("client"), 7, **kw)
    if reply_kw.get("client") == 8:
        raw = raw[:8] + struct.pack("!I", 9) + raw[12:]  # claims 9, proof for 8
    with pytest.raises(Refused, match=match) as info:
        HS.verdict(raw, nonce, secret, 7, lambda c: accept)
    assert (info.value.deny == b"DENY" + bytes(32)) if denied else info.value.deny is None


def test_frames_preamble_layout_and_refusals():
    frames = FrameFormat(b"TFRM", 4, {1: "A", 2: "B"})
    pre = frames.preamble(2, 99, 10, 1 << 40)
    assert pre == struct.pack("!4sBBHQQQ", b"TFRM", 4, 2, 0, 99, 10, 1 << 40) and len(pre) == frames.size
    assert frames.parse(pre) == (2, 99, 10, 1 << 40)
    assert frames.frame(1, 5, {"a": 1}, 3) == struct.pack("!4sBBHQQQ", b"TFRM", 4, 1, 0, 5, 7, 3) + b'{"a":1}'
    for bad, match in [
        (struct.pack("!4sBBHQQQ", b"XXXX", 4, 1, 0, 0, 2, 0), "not a frame of this protocol"),
        (struct.pack("!4sBBHQQQ", b"TFRM", 5, 1, 0, 0, 2, 0), "not a frame of this protocol"),
        (struct.pack("!4sBBHQQQ", b"TFRM", 4, 1, 1, 0, 2, 0), "flags 1"),
        (struct.pack("!4sBBHQQQ", b"TFRM", 4, 3, 0, 0, 2, 0), "unknown frame kind 3"),
    ]:
        with pytest.raises(FrameError, match=match):
            frames.parse(bad)
    assert issubclass(FrameError, ValueError)


@pytest.mark.parametrize(("raw", "match"), [(b"{bad", "not JSON"), (b"[1]", "not a JSON object"), (b"\xff", "JSON")])
def test_json_headers_must_be_objects(raw, match):
    with pytest.raises(FrameError, match=match):
        stream.json_header(raw)
    assert stream.json_header(b'{"k": [1]}') == {"k": [1]}


def test_recv_exact_keeps_one_deadline_however_the_bytes_trickle():
    a, b = socket.socketpair()
    stop = threading.Event()

    def drip():
        while not stop.wait(0.05):
            try:
                b.sendall(b"x")
            except OSError:
                return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(
            TimeoutError, match=r"the deadline passed during the test read \(\d+ of 100 bytes missing\)"
        ):
            stream.recv_exact(a, 100, time.monotonic() + 0.4, "the test read")
        assert time.monotonic() - t0 < 0.8
        b.sendall(b"y" * 5)
        b.close()
        with pytest.raises(ConnectionError, match="the peer closed the connection during it"):
            stream.recv_exact(a, 10_000, time.monotonic() + 2, "it")
    finally:
        stop.set()
        t.join(2)
        a.close()


def test_a_deadline_passed_between_reads_says_how_many_bytes_are_missing():
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * 3)
        with pytest.raises(TimeoutError, match=r"the deadline passed during the read \(100 of 100 bytes missing\)"):
            stream.recv_exact(a, 100, time.monotonic() - 1, "the read")


def test_the_acceptor_drops_the_oldest_of_too_many_strangers_and_takes_the_right_peer():
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    refused: list[str] = []
    secret = os.urandom(32)
    acceptor = Acceptor(listener, HS, secret, me=0, on_refused=refused.append, max_pending=4)
    strangers = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]  # silent
    box: dict = {}

    def right_peer():
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            HS.client(s, secret, time.monotonic() + 5, me=1, server=0)
            box["ok"] = True
            s.recv(1)  # until the test closes its end

    t = threading.Thread(target=right_peer)
    t.start()
    try:
        sock, client = acceptor.next(time.monotonic() + 5)
        assert client == 1
        sock.close()
        t.join(5)
        assert box.get("ok")
        assert len(refused) >= 6 and all("the oldest of more than 4 handshakes" in r for r in refused), refused
        with pytest.raises(TimeoutError, match="no peer passed the handshake"):
            acceptor.next(time.monotonic() + 0.2)
    finally:
        acceptor.close()
        listener.close()
        for s in strangers:
            s.close()


def test_a_client_refuses_a_server_that_asks_for_no_secret_or_cannot_prove_it():
    for flags, verdict, match in [
        (0, None, "does not authenticate, but this side was given a secret"),
        (1, b"OKAY" + os.urandom(32), "failed to prove it holds the secret"),
        (1, b"DENY" + bytes(32), "refused the connection: it requires the right secret"),
    ]:
        a, b = socket.socketpair()
        try:
            b.sendall(struct.pack("!4sHHI32s", b"TEST", 3, flags, 0, os.urandom(32)))
            if verdict:
                b.sendall(verdict)
            with pytest.raises(PermissionError, match=match):
                HS.client(a, b"k", time.monotonic() + 2, where="the server")
        finally:
            a.close()
            b.close()
