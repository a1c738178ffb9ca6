"""TransferServerKVPipe inside one process (two threads, two transfer servers): dtypes, faults."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import jax
import ml_dtypes
import numpy as np
import pytest

from spmd.kv_transfer import TransferServerKVPipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pair(server_secret=b"s", client_secret=b"s", timeout_s=10.0):
    port = free_port()
    devs = jax.devices()
    box: dict = {}

    def serve():
        try:
            box["s"] = TransferServerKVPipe(
                "127.0.0.1", port, timeout_s=timeout_s, secret=server_secret, devices=devs[:2]
            )
        except Exception as e:
            box["e"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        c = TransferServerKVPipe(
            "127.0.0.1", port, role="client", timeout_s=timeout_s, secret=client_secret, devices=devs[2:6]
        )
    finally:
        t.join()
    return box["s"], c


def test_round_trip_in_order_both_ways(rng):
    s, c = pair()
    base = rng.standard_normal((5, 6))
    msgs = [
        base.astype(np.float32),
        base.astype(np.float16),
        base.astype(ml_dtypes.bfloat16),
        rng.integers(-100, 100, (3, 4)).astype(np.int8),
        rng.integers(-(2**31), 2**31 - 1, (4,)).astype(np.int32),
        rng.integers(0, 255, (9,)).astype(np.uint8),
        rng.random(7) > 0.5,
        np.array(rng.standard_normal(), np.float32),
        np.zeros((0, 3), np.float32),
        None,
        base.astype(np.float32)[::2, ::3],
        rng.standard_normal(1 << 20).astype(np.float32),
    ]
    with s, c:
        for m in msgs:
            s.send_tensor(m)
            got = c.recv_tensor()
            if m is None:
                assert got is None
                continue
            assert isinstance(got, jax.Array) and got.devices() == {jax.devices()[2]}
            assert got.dtype == m.dtype and got.shape == m.shape
            np.testing.assert_array_equal(np.asarray(got), m)
        c.send_tensor(msgs[0])
        np.testing.assert_array_equal(np.asarray(s.recv_tensor()), msgs[0])


def test_kv_cache_from_tp2_to_tp4_in_the_models_layout(rng):
    s, c = pair()
    # models.llama's KVCache layout: [batch, kv_heads, max_len, head_dim] (head_axis=1).
    layers = [rng.standard_normal((3, 2, 8, 4)).astype(np.float32) for _ in range(2)]
    with s, c:
        s.send_kv_cache(layers, head_axis=1)
        got = c.recv_kv_cache()
        for x, y in zip(layers, got, strict=True):
            np.testing.assert_array_equal(np.asarray(y), x)
            for shard in y.addressable_shards:
                r = jax.devices()[2:6].index(shard.device)
                np.testing.assert_array_equal(np.asarray(shard.data), x[:, r // 2 : r // 2 + 1])


def test_64_bit_without_x64_is_refused_not_truncated():
    s, c = pair()
    with s, c:
        with pytest.raises(TypeError, match="truncated to 32 bits"):
            s.send_tensor(np.arange(3, dtype=np.int64))


def test_closed_pipe_and_gone_peer():
    s, c = pair(timeout_s=2.0)
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.recv_tensor()
    with pytest.raises(ConnectionError):
        c.recv_tensor()


def test_wrong_secret_is_refused():
    with pytest.raises(PermissionError, match="requires the right secret"):
        pair(server_secret=b"a", client_secret=b"b", timeout_s=1.0)


def test_a_shape_whose_bytes_overflow_int64_is_refused_before_pulling():
    from spmd.kv_transfer import _device

    s, c = pair(timeout_s=2.0)
    with s, c:
        s._control.send_tensor(_device.meta_bytes({"dtype": "float32", "shape": [1 << 62, 8], "id": "5"}))
        with pytest.raises(ValueError, match="holds more bytes than an int64 can count"):
            c.recv_tensor()


# Pulls bounded by a deadline, arrays released, replays refused, JAX's errors as the pipe's (item 9) ----


def _within(seconds: float, fn):
    """``fn()``'s result; its exception re-raised; a failure instead of a hang past ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_a_pull_after_the_senders_deadline_times_out_and_the_pipe_goes_on(rng):
    s, c = pair(timeout_s=0.3)
    with s, c:
        s.send_tensor(rng.standard_normal(1000).astype(np.float32))
        time.sleep(s._servers.hold_s + 0.2)  # the registration expired: JAX's pull would never complete
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"did not arrive within 0.3 s.*the pipe stays usable"):
            _within(5, c.recv_tensor)
        assert time.monotonic() - t0 < 1.3
        y = rng.standard_normal(1000).astype(np.float32)
        s.send_tensor(y)
        np.testing.assert_array_equal(np.asarray(_within(5, c.recv_tensor)), y)


def test_an_id_pulled_before_is_refused_at_once(rng):
    from spmd.kv_transfer import _device

    s, c = pair(timeout_s=5.0)
    with s, c:
        x = rng.standard_normal(64).astype(np.float32)
        meta = {"dtype": "float32", "shape": [64], **s._servers.register([jax.device_put(x, s.devices[0])])}
        for _ in range(2):
            s._control.send_tensor(_device.meta_bytes(meta))  # the second time: a replay
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"were already pulled by this pipe; the message is a replay"):
            _within(10, c.recv_tensor)
        assert time.monotonic() - t0 < 0.5


def test_ids_are_random_not_a_sequence(rng):
    s, c = pair()
    with s, c:
        ids = [int(s._servers.register([jax.device_put(np.ones(2, np.float32), s.devices[0])])["id"]) for _ in range(3)]
    assert len(set(ids)) == 3 and not (ids[1] - ids[0] == ids[2] - ids[1] == 1), ids


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_arrays_never_pulled_are_released_within_twice_the_timeout_and_two_seconds():
    s, c = pair(timeout_s=0.3)
    with s, c:
        before = _rss_mib()
        x = np.ones(256 << 20, np.uint8)
        s.send_tensor(x)  # never pulled
        del x
        gc.collect()
        held = _rss_mib()
        time.sleep(s._servers.hold_s + 0.3 + 0.3)  # no call on the pipe meanwhile: the timer releases
        gc.collect()
        after = _rss_mib()
        assert held - before > 200, (before, held)
        assert after - before < 64, (before, held, after)
        assert s._servers.held() == 0


_DYING_SENDER = """
import os, sys, time
import numpy as np
from spmd.kv_transfer import TransferServerKVPipe
pipe = TransferServerKVPipe("127.0.0.1", int(sys.argv[1]), role="client", timeout_s=10, secret=b"s")
pipe.send_tensor(np.ones(256 << 20, np.uint8))
time.sleep(float(sys.argv[2]))
os._exit(3)  # mid-transfer (or before it): the receiver must not see JAX's raw error
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_a_sender_that_dies_mid_transfer_is_a_connection_or_timeout_error_never_jax_s(delay):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = subprocess.Popen([sys.executable, "-c", _DYING_SENDER, str(port), str(delay)], cwd=root, env=env)
    try:
        # (a long timeout for the child to start JAX on a loaded machine, then a short one for the pull)
        with TransferServerKVPipe("127.0.0.1", port, timeout_s=60, secret=b"s", devices=jax.devices()[:1]) as pipe:
            pipe._servers.timeout_s = 3.0
            t0 = time.monotonic()
            try:
                got = _within(10, pipe.recv_tensor)
            except (ConnectionError, TimeoutError) as e:
                assert not isinstance(e, jax.errors.JaxRuntimeError)
            else:
                assert np.asarray(got).sum() == 256 << 20  # it all arrived before the sender died: fine too
            assert time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait()
