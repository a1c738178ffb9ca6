"""IpcKVPipe's host work per message (issue 25): nothing is traced, compiled or copied to a device twice.

A stream of messages of one layout must reuse what the first one made: the jitted programs (no
trace, no lowering, no compile after the first message of a layout, counted with ``jax.monitoring``),
and on the kernel path the address operand of the receive program (made once per set of staging
addresses, then passed as the same device array: no host-to-device copy per message, checked with
JAX's transfer guard). The kernel runs as its host reference here (``by_address``, see
tests/test_kv_transfer_ipc_kernel.py); every message's bytes are checked against numpy.
"""

from __future__ import annotations

import jax
import jax.monitoring
import ml_dtypes
import numpy as np
import pytest
from test_kv_transfer_ipc import pair
from test_kv_transfer_ipc_kernel import by_address, kernel_pair  # noqa: F401  (a fixture)

from spmd.kv_transfer import _receive, kv_head_sharding, split_kv_heads


class Compiles:
    """JAX's compile steps (tracing, lowering, backend compile) while active."""

    def __enter__(self) -> Compiles:
        self.events: list[str] = []

        def listener(event: str, duration: float, **kwargs) -> None:
            if event.startswith("/jax/core/compile/"):
                self.events.append(event)

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def cache(rng, heads: int, tokens: int = 24, empty: bool = False) -> list[np.ndarray]:
    layers = [rng.standard_normal((2, heads, tokens, 16)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    layers.append(rng.integers(-100, 100, (2, heads, tokens, 16)).astype(np.int8))  # a second carrier
    if empty:  # a layer without elements, between the others: made by the receiver
        layers.insert(1, np.zeros((2, heads, 0, 16), np.float32))
    return layers


def check_layers(got: list, layers: list[np.ndarray], devices: list, heads: int) -> None:
    for x, y in zip(layers, got, strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.sharding.is_equivalent_to(kv_head_sharding(devices, heads, head_axis=1), y.ndim)
        want = split_kv_heads(x, len(devices), head_axis=1)
        for shard in y.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[devices.index(shard.device)])


@pytest.mark.parametrize("out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("kernel", [False, True], ids=["copy", "kernel"])
@pytest.mark.parametrize(("src", "dst"), [(1, 1), (2, 2)])
def test_a_second_cache_of_one_layout_traces_and_compiles_nothing(by_address, rng, kernel, out, src, dst):  # noqa: F811
    heads = 2
    s, c = (kernel_pair if kernel else pair)(server_devices=src, client_devices=dst)
    with s, c:
        got = None
        for i in range(5):  # both slots twice, then slot 0 again
            layers = cache(rng, heads, empty=True)
            sharded = [jax.device_put(x, kv_head_sharding(s.devices, heads, head_axis=1)) for x in layers]
            donated = out and got is not None
            where = donated and [
                [sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards] for x in got if x.size
            ]
            with Compiles() as compiles:
                s.send_kv_cache(sharded, head_axis=1)
                got = c.recv_kv_cache(out=got if donated else None)
                jax.block_until_ready(got)
            if i >= 2:  # (message 0 compiles the programs; message 1 with out= compiles the donating one)
                assert compiles.events == [], f"message {i} of the same layout: {compiles.events}"
            check_layers(got, layers, c.devices, heads)
            if donated:  # every non-empty layer written in place (the empty one is made anew)
                assert [
                    [sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards] for x in got if x.size
                ] == where


@pytest.mark.parametrize("kernel", [False, True], ids=["copy", "kernel"])
def test_a_second_array_of_one_shape_traces_and_compiles_nothing(by_address, rng, kernel):  # noqa: F811
    s, c = (kernel_pair if kernel else pair)(server_devices=1, client_devices=1)
    with s, c:
        for i in range(4):
            x = rng.standard_normal((70, 301)).astype(ml_dtypes.bfloat16)  # > INLINE_BYTES: staged
            with Compiles() as compiles:
                s.send_tensor(x)
                y = jax.block_until_ready(c.recv_tensor())
            if i:
                assert compiles.events == [], f"message {i} of the same shape: {compiles.events}"
            np.testing.assert_array_equal(np.asarray(y), x)


@pytest.mark.parametrize(("src", "dst"), [(1, 1), (2, 4)])
def test_the_kernel_path_builds_one_address_operand_per_slot_not_per_message(by_address, rng, src, dst):  # noqa: F811
    heads = 2
    s, c = kernel_pair(server_devices=src, client_devices=dst)
    with s, c:
        for _ in range(6):
            layers = cache(rng, heads)
            sharded = [jax.device_put(x, kv_head_sharding(s.devices, heads, head_axis=1)) for x in layers]
            s.send_kv_cache(sharded, head_axis=1)
            check_layers(c.recv_kv_cache(), layers, c.devices, heads)
        groups = min(dst, heads)  # distinct head groups: one receiving device each
        assert c._address_words.built == 2 * groups  # one operand per (slot, receiving device), not per message


def test_the_kernel_path_reuses_an_array_address_operand(by_address, rng):  # noqa: F811
    s, c = kernel_pair(server_devices=1, client_devices=1)
    with s, c:
        for _ in range(5):
            x = rng.standard_normal(1 << 14).astype(np.float32)
            s.send_tensor(x)
            np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
        assert c._address_words.built == 2


@pytest.fixture
def stand_in(by_address, monkeypatch):  # noqa: F811
    """The kernel as an XLA op that reads nothing (no host callback, whose own transfers the guard would see)."""
    import jax.numpy as jnp

    from kernels import peer_copy

    def copy(words, nbytes):
        return jnp.zeros(peer_copy.padded_bytes(nbytes) // 4, jnp.uint32) + words[0].astype(jnp.uint32)

    monkeypatch.setattr(_receive, "COPY", copy)


@pytest.mark.parametrize("what", ["kv", "array"])
def test_the_kernel_path_copies_nothing_host_to_device_once_the_slots_are_known(stand_in, rng, what):
    """JAX's transfer guard: after one message per slot, receiving copies nothing from the host to a device."""
    heads = 2
    s, c = kernel_pair(server_devices=1, client_devices=2)
    with s, c:
        for i in range(5):
            if what == "kv":
                s.send_kv_cache(cache(rng, heads), head_axis=1)
            else:
                s.send_tensor(rng.standard_normal(1 << 14).astype(np.float32))
            receive = c.recv_kv_cache if what == "kv" else c.recv_tensor
            if i < 2:
                jax.block_until_ready(receive())
            else:
                with jax.transfer_guard_host_to_device("disallow_explicit"):
                    jax.block_until_ready(receive())


def test_slots_that_grow_get_new_address_operands_and_the_right_bytes(by_address, rng):  # noqa: F811
    """Small caches, then caches too big for the slots (new staging, new addresses), then small again."""
    heads = 2
    s, c = kernel_pair(server_devices=1, client_devices=1)
    with s, c:
        for tokens in (8, 8, 4096, 4096, 8, 8):  # 4096 tokens: 1.5 MiB per message > the 1 MiB first slots
            layers = cache(rng, heads, tokens)
            s.send_kv_cache(layers, head_axis=1)
            check_layers(c.recv_kv_cache(), layers, c.devices, heads)
        assert c._address_words.built == 6  # per slot and layout: the first two slots, then the new ones, twice


def test_address_words_are_the_low_and_high_words():
    at = [0x1234_5678_9ABC_DEF0, 64, (1 << 48) - 8]
    words = _receive.address_words(at).view(np.uint32).astype(np.uint64)
    assert words.shape == (3, 2)
    np.testing.assert_array_equal(words[:, 0] | words[:, 1] << np.uint64(32), np.array(at, np.uint64))


def test_address_words_keeps_at_most_its_limit():
    words = _receive.AddressWords(limit=2)
    dev = jax.devices()[0]
    a = words(dev, [64])
    assert words(dev, [64]) is a and words.built == 1
    words(dev, [128])
    words(dev, [192])  # a third set: the held ones are dropped
    assert words.built == 3 and len(words._held) == 1
    np.testing.assert_array_equal(np.asarray(words(dev, [64])).view(np.uint32), [[64, 0]])
    assert words.built == 4


def test_the_sender_plans_each_shape_once_and_tells_shapes_apart(rng, monkeypatch):
    """Same shapes twice each: dtypes and head axes that differ are other plans, and the bytes arrive right."""
    from spmd.kv_transfer import _arrays

    planned = []
    num_heads = _arrays.num_heads
    monkeypatch.setattr(_arrays, "num_heads", lambda layers, axis: planned.append(axis) or num_heads(layers, axis))
    s, c = pair(server_devices=2, client_devices=1)
    kinds = [(ml_dtypes.bfloat16, 1), (np.float32, 1), (np.float32, 0)]  # same shape [2, 2, 24, 16] each time
    with s, c:
        for dtype, axis in kinds * 2:
            layers = [rng.standard_normal((2, 2, 24, 16)).astype(dtype) for _ in range(2)]
            s.send_kv_cache(layers, head_axis=axis)
            for x, y in zip(layers, c.recv_kv_cache(), strict=True):
                assert y.dtype == x.dtype
                np.testing.assert_array_equal(np.asarray(y), x)
        assert planned == [1, 1, 0]  # once per distinct (dtypes, shapes, head axis)
        with pytest.raises(ValueError, match="head_axis must be a non-negative int, got True"):
            s.send_kv_cache(layers, head_axis=True)  # (equal to 1 as a dictionary key)


def test_the_stand_in_kernel_is_undone():
    from kernels import peer_copy
    from spmd.kv_transfer import _shared_memory, host_probe

    shm = _shared_memory.Shm
    before = (_receive.COPY, shm.open, shm.close_mapping)
    undo = host_probe.stand_in_kernel()
    assert _receive.COPY is not peer_copy.copy_from_address and shm.open is not before[1]
    undo()
    assert (_receive.COPY, shm.open, shm.close_mapping) == before == (peer_copy.copy_from_address, *before[1:])
    assert "check_room" not in vars(shm)


@pytest.fixture
def bench_env(monkeypatch):
    """The benches set JAX_PLATFORMS and XLA_FLAGS for a process of their own: put them back after."""
    import os

    for name in ("JAX_PLATFORMS", "XLA_FLAGS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


def test_the_host_bench_sees_no_compile_and_no_address_copy_per_message(bench_env, tmp_path):
    import json

    from spmd.bench import kv_host

    out = tmp_path / "kv_host.json"
    argv = ["--sizes", "1MiB", "--kv-layers", "2", "--messages", "3", "--json", str(out)]
    assert kv_host.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["receive"]) for r in rows} == {(m, k) for m in ("kv", "array") for k in ("copy", "kernel")}
    for r in rows:
        assert r["compiles_per_message"] == 0, r
        assert r["device_puts_per_message"] == (0 if r["receive"] == "kernel" else 1), r  # (copy: the pread buffer)
        assert r["ok"] is (None if r["receive"] == "kernel" else True)
        assert r["phases_us"] and r["median_us"] > 0


def test_the_dispatch_bench_runs_on_cpu(bench_env, tmp_path):
    import json

    from spmd.bench import kv_dispatch

    out = tmp_path / "kv_dispatch.json"
    assert (
        kv_dispatch.main(["--platform", "cpu", "--sizes", "1MiB", "--layers", "2", "--iters", "3", "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows][:4] == [
        "recv program, operand kept (dispatch)",
        "recv program, operand kept + wait",
        "recv program, operand per call (dispatch)",
        "device_put(address) alone",
    ]
    assert rows[0]["fusions"] >= 1 and all(r["us"] > 0 for r in rows)
    assert _receive.COPY.__module__ == "kernels.peer_copy"  # the stand-in was undone
