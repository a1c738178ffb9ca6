"""TransferServerKVPipe inside one process (two threads, two transfer servers): dtypes, faults."""

from __future__ import annotations

import socket
import threading

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
