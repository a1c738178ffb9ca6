"""TransferServerKVPipe inside one process (two threads, two transfer servers), beyond the pipe contract
(tests/test_kv_contract.py): int64 byte counts, pull deadlines, replays, ids, releases, a sender that dies."""

from __future__ import annotations

import gc
import os
import time

import jax
import kv_pipes
import numpy as np
import pytest
from kv_pipes import within

from spmd.kv_transfer import TransferServerKVPipe


def pair(**kw):
    """A connected transfer-server (server, client) pair (``kv_pipes.pair``, the one factory)."""
    return kv_pipes.pair("ts", **kw)


def test_a_shape_whose_bytes_overflow_int64_is_refused_before_pulling():
    from spmd.kv_transfer import _device

    s, c = pair(timeout_s=2.0)
    with s, c:
        s._control.send_tensor(_device.meta_bytes({"dtype": "float32", "shape": [1 << 62, 8], "id": "5"}))
        with pytest.raises(ValueError, match="holds more bytes than an int64 can count"):
            c.recv_tensor()


# Pulls bounded by a deadline, arrays released, replays refused, JAX's errors as the pipe's (item 9) ----


def test_a_pull_after_the_senders_deadline_times_out_and_the_pipe_goes_on(rng):
    s, c = pair(timeout_s=0.3)
    with s, c:
        s.send_tensor(rng.standard_normal(1000).astype(np.float32))
        time.sleep(s._servers.hold_s + 0.2)  # the registration expired: JAX's pull would never complete
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"did not arrive within 0.3 s.*the pipe stays usable"):
            within(5, c.recv_tensor)
        assert time.monotonic() - t0 < 1.3
        y = rng.standard_normal(1000).astype(np.float32)
        s.send_tensor(y)
        np.testing.assert_array_equal(np.asarray(within(5, c.recv_tensor)), y)


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
            within(10, c.recv_tensor)
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
        sent_at = time.monotonic()
        s.send_tensor(x)  # never pulled
        holding, asked_at = s._servers.held(), time.monotonic()
        if asked_at - sent_at < s._servers.hold_s + s._servers.timeout_s:  # the earliest its holder may go
            assert holding == 1  # (a send that took longer under load may already be released: nothing to check)
        del x
        gc.collect()
        held = _rss_mib()  # (held by the pipe until the timer: how long it takes to get here varies with the load)
        time.sleep(s._servers.hold_s + 0.3 + 0.3)  # no call on the pipe meanwhile: the timer releases
        gc.collect()
        after = _rss_mib()
        assert s._servers.held() == 0
        # The bytes themselves: where the array showed in the RSS (a worker that freed as much earlier may
        # have reused those pages, so it need not), they left it again.
        if held - before > 200:
            assert after - before < 64, (before, held, after)


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
    port = kv_pipes.free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    child = subprocess.Popen([sys.executable, "-c", _DYING_SENDER, str(port), str(delay)], cwd=root, env=env)
    try:
        # (a long timeout for the child to start JAX on a loaded machine, then a short one for the pull)
        with TransferServerKVPipe("127.0.0.1", port, timeout_s=60, secret=b"s", devices=jax.devices()[:1]) as pipe:
            pipe._servers.timeout_s = 3.0
            t0 = time.monotonic()
            try:
                got = within(10, pipe.recv_tensor)
            except (ConnectionError, TimeoutError) as e:
                assert not isinstance(e, jax.errors.JaxRuntimeError)
            else:
                assert np.asarray(got).sum() == 256 << 20  # it all arrived before the sender died: fine too
            assert time.monotonic() - t0 < 5
    finally:
        child.kill()
        child.wait()
