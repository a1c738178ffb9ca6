"""IpcKVPipe against a forged peer (slot headers and control messages written by hand) and a peer that dies.

The forged peer speaks the protocol of ``spmd.kv_transfer._slots`` with its own slot headers, so
each test puts one malformed thing where a real peer would put the right one and checks the
pipe's error, and whether the pipe stays in step afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from test_kv_transfer_ipc import free_port, good_hello

from spmd.kv_transfer import IpcKVPipe, TCPKVPipe, _device, _slots
from spmd.kv_transfer import _shared_memory as shm_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Forged:
    """The other end of an IpcKVPipe, written by hand: its hello, slot headers, staging and control messages."""

    def __init__(self, timeout_s: float = 5.0, **hello) -> None:
        self.port, self.box = free_port(), {}
        self.files = shm_mod.Shm()
        self.headers = _slots.HeaderFile(self.files.dir, f"spmd-kv-{self.files.namespace}-{os.getpid()}_")
        self.sent, self.staging = 0, []

        def serve():
            self.control = TCPKVPipe("127.0.0.1", self.port, timeout_s=timeout_s)
            self.control.recv_tensor()  # the pipe's hello
            self.control.send_tensor(_device.meta_bytes({**good_hello(headers=self.headers.names), **hello}))

        self.thread = threading.Thread(target=serve)
        self.thread.start()

    def pipe(self, timeout_s: float = 5.0) -> IpcKVPipe:
        try:
            return IpcKVPipe("127.0.0.1", self.port, role="client", timeout_s=timeout_s, devices=jax.devices()[:1])
        finally:
            self.thread.join()

    def stage(self, data: np.ndarray, slot_id: int = 0, handle: str | None = None) -> None:
        """A staging buffer holding ``data``, announced by a map message (``handle``: announce another name)."""
        slot = self.files.alloc(None, 1 << 20)
        self.staging.append(slot)
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        np.frombuffer(slot.view, np.uint8, raw.size)[:] = raw
        meta = {"kind": "map", "id": slot_id, "h": handle or slot.handle, "cap": slot.capacity, "addr": 0}
        self.control.send_tensor(_device.meta_bytes(meta))

    def publish(self, layout: dict | bytes, inline: bytes = b"", seq: int | None = None) -> None:
        seq = self.sent if seq is None else seq
        raw = layout if isinstance(layout, bytes) else _device.meta_bytes({"seq": seq, **layout}).tobytes()
        gen = _slots.publish(self.headers, seq, raw, lambda slot: iter(()), lambda: 1 << 30, inline)
        _slots.run(gen, lambda: None)
        self.sent += 1

    def acks(self) -> list:
        out = []
        while True:
            try:
                out.append(_device.meta_from(self.control.recv_tensor(deadline=time.monotonic() + 0.3), "t"))
            except (TimeoutError, ConnectionError, ValueError):
                return out

    def close(self) -> None:
        self.thread.join()
        if hasattr(self, "control"):
            self.control.close()
        for slot in self.staging:
            self.files.free(None, slot)
        self.headers.close()


@pytest.fixture
def forged():
    peers = []

    def make(**kw):
        peers.append(Forged(**kw))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def piece(n, **kw):
    return {"id": 0, "off": 0, "n": n, **kw}


ARRAY = {"kind": "array", "dtype": "float32", "shape": [4096]}


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ({**ARRAY, "pieces": [piece(16)]}, "malformed piece"),
        ({**ARRAY, "pieces": [piece(16384, off=-1)]}, "malformed piece"),
        ({**ARRAY, "pieces": [piece(16384, off=1 << 20)]}, r"past the end of its 1048576-byte staging"),
        ({**ARRAY, "pieces": [piece(16384, id=True)]}, "malformed piece"),
        ({**ARRAY, "pieces": []}, "expected 1 pieces in message 0"),
        ({"kind": "gossip"}, "malformed layout"),
        ({"kind": "array", "dtype": "float32", "shape": [-1]}, "malformed array metadata"),
        ({"kind": "array", "dtype": "object", "shape": [1]}, "dtype 'object' is not allowed"),
        ({"kind": "array", "dtype": "float32", "shape": [1 << 62, 8], "pieces": []}, "more bytes than an int64"),
        ({"kind": "array", "dtype": "float32", "shape": [5], "inline": True}, "inline array holds 0 bytes"),
    ],
)
def test_a_refused_layout_is_dropped_acked_and_the_pipe_goes_on(forged, layout, match):
    peer = forged()
    with peer.pipe() as pipe:
        peer.stage(np.zeros(4096, np.float32))
        peer.publish(layout)
        with pytest.raises(ValueError, match=match):
            pipe.recv_tensor()
        x = np.arange(6, dtype=np.float32)
        peer.publish({"kind": "array", "dtype": "float32", "shape": [6], "inline": True}, inline=x.tobytes())
        np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), x)
        assert peer.acks() == [{"kind": "ack", "upto": 1}, {"kind": "ack", "upto": 2}]


@pytest.mark.parametrize(
    ("kv", "match"),
    [
        ({"heads": 2, "head_axis": 0, "src_tp": 4, "dst_tp": 1, "layers": [["float32", [2, 4]]]}, "TP 4 -> 1"),
        ({"heads": 2, "head_axis": 0, "src_tp": 1, "dst_tp": 1, "layers": [["float32", [3, 4]]]}, "not 2 heads"),
        ({"heads": 2, "head_axis": 0, "src_tp": 1, "dst_tp": 1, "layers": []}, "malformed KV-cache"),
        ({"heads": True, "head_axis": 0, "src_tp": 1, "dst_tp": 1, "layers": [["float32", [2]]]}, "malformed KV"),
        ({"heads": 2, "head_axis": 0, "src_tp": 1, "dst_tp": 1, "layers": [["float32"]]}, "malformed metadata"),
    ],
)
def test_malformed_kv_metadata_is_refused(forged, kv, match):
    peer = forged()
    with peer.pipe() as pipe:
        peer.publish({"kind": "kv", "kv": kv, "pieces": []})
        with pytest.raises(ValueError, match=match):
            pipe.recv_kv_cache()


@pytest.mark.parametrize(
    ("raw", "seq", "match"),
    [
        (b"\xff\xfe", None, "malformed layout from the peer"),
        (b'{"seq": 3, "kind": "none"}', None, "expected the layout of message 0"),
        (b'{"seq": 4, "kind": "none"}', 4, "slot 0 holds epoch 5, expected 1"),
    ],
)
def test_a_header_out_of_step_closes_the_pipe(forged, raw, seq, match):
    peer = forged()
    pipe = peer.pipe()
    peer.publish(raw, seq=seq)
    with pytest.raises(ValueError, match=match):
        pipe.recv_tensor()
    assert pipe.closed
    with pytest.raises(ValueError, match="closed"):
        pipe.recv_tensor()


def test_a_staging_name_outside_dev_shm_naming_is_refused(forged):
    peer = forged()
    with peer.pipe() as pipe:
        peer.stage(np.zeros(4096, np.float32), handle="../../etc/passwd")
        peer.publish({**ARRAY, "pieces": [piece(16384)]})
        with pytest.raises(ValueError, match="malformed shared-memory name"):
            pipe.recv_tensor()


def test_staging_that_is_gone_is_a_connection_error_and_the_next_message_is_in_step(forged):
    peer = forged()
    with peer.pipe() as pipe:
        peer.stage(np.zeros(4096, np.float32), handle="spmd-kv-0-0_missing")
        peer.publish({**ARRAY, "pieces": [piece(16384)]})
        with pytest.raises(ConnectionError, match="closed before this message was taken"):
            pipe.recv_tensor()
        x = np.arange(4096, dtype=np.float32)
        peer.stage(x, slot_id=1)
        peer.publish({**ARRAY, "pieces": [piece(16384, id=1)]})
        np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), x)


def test_a_64_bit_message_without_x64_is_refused_dropped_and_the_pipe_goes_on(forged):
    peer = forged()
    with peer.pipe() as pipe:
        peer.stage(np.zeros(4096, np.int64))
        peer.publish({"kind": "array", "dtype": "int64", "shape": [4096], "pieces": [piece(8 * 4096)]})
        inline = np.arange(3, dtype=np.int64).tobytes()
        peer.publish({"kind": "array", "dtype": "int64", "shape": [3], "inline": True}, inline=inline)
        for _ in range(2):
            with pytest.raises(TypeError, match="truncated to 32 bits"):
                pipe.recv_tensor()
        small = np.arange(6, dtype=np.float32)  # (slot 0 again: after its ack)
        peer.publish({"kind": "array", "dtype": "float32", "shape": [6], "inline": True}, inline=small.tobytes())
        np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), small)


def test_a_peer_that_reuses_a_slot_before_its_ack_is_caught(forged):
    """Three messages without waiting for acks: the third overwrote the first in slot 0."""
    peer = forged()
    pipe = peer.pipe()
    for _ in range(3):
        peer.publish({"kind": "none"})
    with pytest.raises(ValueError, match="slot 0 holds epoch 3, expected 1"):
        pipe.recv_tensor()
    assert pipe.closed


def test_an_ack_of_nothing_sent_is_refused(forged):
    peer = forged()
    with peer.pipe() as pipe:
        peer.control.send_tensor(_device.meta_bytes({"kind": "ack", "upto": 3}))
        with pytest.raises(ValueError, match="expected the ack of message 0"):
            pipe.recv_tensor()


@pytest.mark.parametrize(
    ("msg", "match"),
    [({"kind": "gossip"}, "malformed message"), ({"kind": "map", "id": -1, "h": "x"}, "malformed staging map")],
)
def test_a_malformed_control_message_is_refused(forged, msg, match):
    peer = forged()
    with peer.pipe() as pipe:
        peer.control.send_tensor(_device.meta_bytes(msg))
        with pytest.raises(ValueError, match=match):
            pipe.recv_tensor()


@pytest.mark.parametrize(
    ("headers", "match"),
    [(None, "malformed header names"), (["a", "b"], "malformed shared-memory name"), ("link", "symbolic link")],
)
def test_malformed_slot_headers_in_the_hello_are_refused(forged, tmp_path, headers, match):
    if headers == "link":
        files = shm_mod.Shm()
        name = f"spmd-kv-{files.namespace}-{os.getpid()}_link"
        (tmp_path / "target").write_bytes(bytes(_slots.HEADER_BYTES))
        os.symlink(tmp_path / "target", os.path.join(files.dir, name))
        headers = [name, name]
    peer = forged(headers=headers)
    try:
        with pytest.raises(ValueError, match=match):
            peer.pipe()
    finally:
        if isinstance(headers, list) and headers[0].endswith("_link"):
            os.unlink(os.path.join(shm_mod.Shm().dir, headers[0]))


def test_a_peer_that_closes_is_noticed_at_once_not_at_the_deadline(forged):
    peer = forged()
    with peer.pipe(timeout_s=10.0) as pipe:
        peer.control.close()
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            pipe.recv_tensor()
        assert time.monotonic() - t0 < 2


def test_nothing_within_timeout_is_a_timeout_and_the_pipe_stays_usable(forged):
    peer = forged()
    with peer.pipe(timeout_s=0.5) as pipe:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no message from the peer within 0\.5 s"):
            pipe.recv_tensor()
        assert time.monotonic() - t0 < 1.5
        peer.publish({"kind": "none"})
        assert pipe.recv_tensor() is None


_KILLED_SENDER = textwrap.dedent(
    """
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from spmd.kv_transfer import IpcKVPipe, _slots
    pipe = IpcKVPipe("127.0.0.1", int(sys.argv[1]), role="client", timeout_s=10.0)
    pipe._headers.release = lambda slot: os.kill(os.getpid(), 9)  # dies between the data and the epoch
    pipe.send_tensor(np.arange(1 << 16, dtype=np.float32))
    """
)


@pytest.mark.multiprocess
def test_a_peer_killed_mid_message_is_noticed_within_the_timeout():
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SENDER, str(port)], cwd=ROOT, env={**os.environ})
    try:
        with IpcKVPipe("127.0.0.1", port, timeout_s=60.0, devices=jax.devices()[:1]) as pipe:
            t0 = time.monotonic()
            with pytest.raises(ConnectionError):
                pipe.recv_tensor()
            assert time.monotonic() - t0 < 10  # the peer's EOF, not the 60 s deadline
    finally:
        assert child.wait(timeout=60) == -9
