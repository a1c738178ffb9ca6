"""kernels.rendezvous: one deadline per exchange, error records, keys someone else wrote.

An in-memory store stands in for the coordination service (the same two calls, the same
``ALREADY_EXISTS`` / deadline errors); one test runs against JAX's real coordination service in a
subprocess, since what the helper recognises is that service's error.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from kernels import rendezvous
from kernels.rendezvous import KeyTaken, PeerFailed, Rendezvous

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Store:
    """The coordination service's two key-value calls, on a dict (no overwrite unless asked)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.waits: list[int] = []
        self.cv = threading.Condition()

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        with self.cv:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self.data[key] = bytes(value)
            self.cv.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        self.waits.append(timeout_in_ms)
        with self.cv:
            if not self.cv.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.data[key]


def test_records_travel_and_every_wait_shares_one_deadline():
    store = Store()
    rv = Rendezvous(store, 0.6, "exchange #1")
    rv.publish("k/0", b"\x00\x01 binary")
    assert rv.read("k/0", who="process 0") == b"\x00\x01 binary"
    t0 = time.monotonic()
    for p in (1, 2, 3):  # three missing records: the first wait takes what is left, the others nothing
        with pytest.raises(TimeoutError, match=rf"exchange #1: waited 0.6 s for process {p} and got nothing"):
            rv.read(f"k/{p}", who=f"process {p}", hint="Check it.")
    assert time.monotonic() - t0 < 1.2  # one deadline, not 3 x 0.6 s
    assert store.waits[1] > 300 and store.waits[2:] == [1, 1], store.waits


def test_a_record_that_arrives_while_waiting_is_read():
    store = Store()
    rv = Rendezvous(store, 5.0, "exchange")
    threading.Timer(0.1, lambda: store.key_value_set_bytes("late", b"here")).start()
    assert rv.read("late", who="process 1") == b"here"


def test_an_error_record_raises_at_once_quoting_the_error():
    store = Store()
    writer, reader = Rendezvous(store, 5.0, "call #2"), Rendezvous(store, 60.0, "call #2")
    writer.publish_error("k/1", TypeError("cannot send a set"), note="could not send its value")
    t0 = time.monotonic()
    with pytest.raises(PeerFailed, match=r"call #2: process 1 could not send its value: TypeError: cannot send a set"):
        reader.read("k/1", who="process 1")
    assert time.monotonic() - t0 < 1
    assert isinstance(PeerFailed("x"), RuntimeError)


def test_an_error_record_is_told_from_every_record_the_users_write():
    """JSON records start with '{', spmd.host's binary ones with a 4-byte length: neither with the magic."""
    assert rendezvous.error_record("boom").startswith(rendezvous.ERROR_MAGIC)
    assert not rendezvous.ERROR_MAGIC.startswith(b"{")
    store = Store()
    rv = Rendezvous(store, 1.0, "x")
    store.key_value_set_bytes("garbled", rendezvous.ERROR_MAGIC + b"{not json")
    with pytest.raises(PeerFailed, match="process 3 wrote a malformed error record"):
        rv.read("garbled", who="process 3")
    for raw in (b'{"error": "a field named error is data"}', (12).to_bytes(4, "little") + b"{}", os.urandom(32)):
        store.key_value_set_bytes("plain", raw, allow_overwrite=True)
        assert rv.read("plain", who="process 0") == raw


def test_a_key_someone_else_wrote_is_named_and_never_overwritten():
    store = Store()
    store.key_value_set_bytes("spmd/x/handle/1", b"forged")
    rv = Rendezvous(store, 1.0, "allocation #1")
    with pytest.raises(KeyTaken, match=r"allocation #1: the key 'spmd/x/handle/1' is already in the") as info:
        rv.publish("spmd/x/handle/1", b"mine")
    assert info.value.key == "spmd/x/handle/1" and isinstance(info.value, RuntimeError)
    assert store.data["spmd/x/handle/1"] == b"forged"
    rv.publish("spmd/x/handle/1", b"mine", overwrite=True)  # only when asked (an abort notice)
    assert store.data["spmd/x/handle/1"] == b"mine"


def test_other_store_failures_are_not_taken_for_a_taken_key():
    class Down(Store):
        def key_value_set_bytes(self, key, value, allow_overwrite=False):
            raise RuntimeError("UNAVAILABLE: the coordination service is gone")

    with pytest.raises(RuntimeError, match="UNAVAILABLE") as info:
        Rendezvous(Down(), 1.0, "x").publish("k", b"v")
    assert not isinstance(info.value, KeyTaken)


_REAL = """
import json, socket, sys
import jax
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=1, process_id=0)
from spmd import compat
from kernels.rendezvous import KeyTaken, PeerFailed, Rendezvous
rv = Rendezvous(compat.distributed_client(), 0.5, "real")
out = {}
rv.publish("t/a", b"first")
try:
    rv.publish("t/a", b"second")
except KeyTaken as e:
    out["taken"] = str(e)
out["value"] = rv.read("t/a", who="me").decode()
rv.publish_error("t/e", ValueError("no"), note="failed")
try:
    rv.read("t/e", who="process 0")
except PeerFailed as e:
    out["failed"] = str(e)
try:
    rv.read("t/missing", who="process 9")
except TimeoutError as e:
    out["timeout"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.multiprocess
def test_against_the_real_coordination_service():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", _REAL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(line[7:])
    assert "the key 't/a' is already in the coordination service's key-value store" in out["taken"]
    assert out["value"] == "first"
    assert out["failed"] == "real: process 0 failed: ValueError: no"
    assert "real: waited 0.5 s for process 9 and got nothing" in out["timeout"]
