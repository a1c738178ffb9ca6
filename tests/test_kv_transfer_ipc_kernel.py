"""IpcKVPipe's receive by address (``receive="kernel"``) and ``recv_kv_cache(out=...)``, on CPU.

The Mosaic GPU kernel itself runs only on GPUs (tests/workers/gpu_kv_ipc.py): here it is lowered for CUDA,
and the pipe's kernel path runs with the kernel replaced by its host reference
(``kernels.peer_copy.copy_from_address_reference``, through ``jax.pure_callback``) reading the
same addresses, so everything around it (addresses, offsets, whole-tile padding, bitcasts, the cut
into layers, donation) is checked against numpy.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_kv_transfer_ipc import pair

from kernels import peer_copy
from spmd.kv_transfer import IpcKVPipe, _receive, _route, kv_head_sharding, split_kv_heads


@pytest.mark.parametrize(
    ("nbytes", "plan"), [(1, (1, 1)), (2048, (1, 1)), (2049, (2, 1)), (20 << 20, (5120, 2)), (256 << 20, (8192, 16))]
)
def test_the_copy_plan_covers_the_bytes_in_whole_tiles(nbytes, plan):
    assert peer_copy.plan(nbytes) == plan
    blocks, tpb = plan
    assert peer_copy.padded_bytes(nbytes) == blocks * tpb * 2048 >= nbytes
    assert blocks <= peer_copy.MAX_BLOCKS and (blocks - 1) * tpb * 2048 < nbytes


@pytest.mark.parametrize("nbytes", [0, -4, 1.5])
def test_the_copy_plan_refuses_nothing_to_copy(nbytes):
    with pytest.raises(ValueError, match="expected a positive byte count"):
        peer_copy.plan(nbytes)


@pytest.mark.parametrize("nbytes", [100, 20 << 20])
def test_the_kernel_lowers_for_cuda_as_a_local_custom_call(nbytes):
    f = jax.jit(lambda a: peer_copy.copy_from_address(a, nbytes))
    text = f.trace(jax.ShapeDtypeStruct((2,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert not any(f"stablehlo.{op}" in text for op in ("all_reduce", "collective_permute", "all_to_all"))


def test_the_kernel_refuses_an_address_that_is_not_two_int32_words():
    with pytest.raises(ValueError, match=r"expected an int32\[2\] address, got int64\[2\]|got uint32\[2\]"):
        peer_copy.copy_from_address(jnp.zeros(2, jnp.uint32), 64)


def test_the_reference_reads_whole_tiles_at_a_host_address(rng):
    buf = rng.integers(0, 2**32, 2048, dtype=np.uint64).astype(np.uint32)
    at = buf.ctypes.data + 16
    words = np.array([at & 0xFFFFFFFF, at >> 32], np.uint32).view(np.int32)
    got = peer_copy.copy_from_address_reference(words, 100)
    assert got.shape == (512,)
    np.testing.assert_array_equal(got, buf[4 : 4 + 512])


def test_the_receive_program_of_a_route_lowers_for_cuda():
    route = _route.kv_route(2, 2, 1, 1, (("bfloat16", (1, 2, 64, 128)),) * 4)
    fn = _receive._kernel_fn(route, 0, False, None)
    words = jax.ShapeDtypeStruct((len(_receive.buffers(route, 0)), 2), jnp.int32)
    assert "mosaic_gpu" in fn.trace(words).lower(lowering_platforms=("cuda",)).as_text()


@pytest.fixture
def by_address(monkeypatch):
    """The kernel path on CPU: staging files mapped here (read by address), the kernel as its host reference."""
    from spmd.kv_transfer import _shared_memory

    held = []

    def copy(words, nbytes):
        out = jax.ShapeDtypeStruct((peer_copy.padded_bytes(nbytes) // 4,), jnp.uint32)
        return jax.pure_callback(lambda w: peer_copy.copy_from_address_reference(np.asarray(w), nbytes), out, words)

    def open_by_address(self, device, handle):
        fd = os.open(os.path.join(self.dir, handle), os.O_RDWR)
        try:
            m = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(m)
        held.append((m, anchor))
        return ctypes.addressof(anchor)

    monkeypatch.setattr(_receive, "COPY", copy)
    monkeypatch.setattr(_shared_memory.Shm, "open", open_by_address)
    monkeypatch.setattr(_shared_memory.Shm, "check_room", lambda self, device, mapped, end: None, raising=False)
    monkeypatch.setattr(_shared_memory.Shm, "close_mapping", lambda self, device, mapped: None)

    def fetch(self, device, mapped, offset, nbytes, dtype, shape):  # the copy path, from the same address
        return jax.device_put(np.frombuffer(ctypes.string_at(mapped + offset, nbytes), dtype).reshape(shape), device)

    monkeypatch.setattr(_shared_memory.Shm, "fetch", fetch)
    yield
    _receive._kernel_fn.cache_clear()
    _receive._array_fn.cache_clear()
    held.clear()


def kernel_pair(**kw):
    s, c = pair(**kw)
    c.receive, c._fallback = "kernel", False  # (the kernel path needs CUDA; here its host reference stands in)
    return s, c


@pytest.mark.parametrize(("src", "dst", "heads"), [(1, 1, 2), (2, 4, 2), (4, 2, 4), (1, 4, 2)])
def test_a_kv_cache_read_by_address_equals_numpy(by_address, rng, src, dst, heads):
    layers = [rng.standard_normal((2, heads, 24, 16)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    layers.append(rng.integers(-100, 100, (2, heads, 24, 16)).astype(np.int8))  # a second carrier width
    layers.append(rng.standard_normal((2, heads, 0, 16)).astype(np.float32))  # empty: made by the receiver
    s, c = kernel_pair(server_devices=src, client_devices=dst)
    with s, c:
        for _ in range(3):  # both slots, then slot 0 again
            sharded = [jax.device_put(x, kv_head_sharding(s.devices, heads, head_axis=1)) for x in layers]
            s.send_kv_cache(sharded, head_axis=1)
            got = c.recv_kv_cache()
            for x, y in zip(layers, got, strict=True):
                assert y.dtype == x.dtype and y.shape == x.shape
                assert y.sharding.is_equivalent_to(kv_head_sharding(c.devices, heads, head_axis=1), y.ndim)
                want = split_kv_heads(x, dst, head_axis=1)
                for shard in y.addressable_shards:
                    r = c.devices.index(shard.device)
                    np.testing.assert_array_equal(np.asarray(shard.data), want[r], err_msg=f"decode rank {r}")


def test_an_array_read_by_address_equals_numpy(by_address, rng):
    msgs = [
        rng.standard_normal(1 << 14).astype(np.float32),
        rng.standard_normal((70, 301)).astype(ml_dtypes.bfloat16),  # not whole tiles
        rng.random((200, 100)) > 0.5,
    ]
    s, c = kernel_pair()
    with s, c:
        for x in msgs:
            s.send_tensor(x)
            y = c.recv_tensor()
            assert y.dtype == x.dtype and y.shape == x.shape
            np.testing.assert_array_equal(np.asarray(y), x)


def test_a_kernel_that_fails_to_compile_falls_back_to_copying_once_with_a_warning(by_address, monkeypatch, rng):
    def broken(words, nbytes):
        raise NotImplementedError("no Mosaic GPU here")

    monkeypatch.setattr(_receive, "COPY", broken)
    s, c = pair()
    c.receive, c._fallback = "kernel", True  # as receive="auto" on CUDA
    x = rng.standard_normal(1 << 14).astype(np.float32)
    layers = [rng.standard_normal((2, 24, 16)).astype(np.float32) for _ in range(2)]
    with s, c:
        s.send_tensor(x)
        with pytest.warns(RuntimeWarning, match=r"the receive kernel failed \(NotImplementedError: no Mosaic"):
            np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
        assert c.receive == "copy"
        s.send_kv_cache(layers)
        for want, got in zip(layers, c.recv_kv_cache(), strict=True):
            np.testing.assert_array_equal(np.asarray(got), want)
    _receive._array_fn.cache_clear()


def test_a_kernel_that_fails_after_it_worked_is_an_error_not_a_fallback(by_address, monkeypatch, rng):
    s, c = pair()
    c.receive, c._fallback = "kernel", False
    monkeypatch.setattr(_receive, "COPY", lambda words, nbytes: (_ for _ in ()).throw(RuntimeError("trap")))
    with s, c:
        s.send_tensor(rng.standard_normal(1 << 14).astype(np.float32))
        with pytest.raises(RuntimeError, match="trap"):
            c.recv_tensor()
    _receive._array_fn.cache_clear()


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kernel", [False, True], ids=["copy", "kernel"])
def test_recv_kv_cache_writes_into_out(by_address, rng, kernel, tp):
    heads = 2
    layers = [rng.standard_normal((2, heads, 24, 16)).astype(np.float32) for _ in range(4)]
    s, c = (kernel_pair if kernel else pair)(server_devices=tp, client_devices=tp)
    with s, c:
        s.send_kv_cache(layers, head_axis=1)
        first = c.recv_kv_cache()
        where = [[sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards] for x in first]
        fresh = [x * 3 for x in layers]
        s.send_kv_cache(fresh, head_axis=1)
        got = c.recv_kv_cache(out=first)
        for x, y, ptrs in zip(fresh, got, where, strict=True):
            np.testing.assert_array_equal(np.asarray(y), x)
            assert [sh.data.unsafe_buffer_pointer() for sh in y.addressable_shards] == ptrs  # written in place


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda got: got[:1], "out has 1 layers, the cache sent has 2"),
        (lambda got: [got[0], got[1].astype(np.float16)], r"out\[1\] is float16\[2, 2, 24, 16\]; expected float32"),
        (lambda got: [got[0], jax.device_put(got[1], jax.devices()[0])], r"out\[1\] is float32.*sharded by KV heads"),
        (lambda got: [got[0], np.asarray(got[1])], r"out\[1\] is float32"),
    ],
)
def test_an_out_that_does_not_match_is_refused_and_the_message_dropped(rng, make, match):
    layers = [rng.standard_normal((2, 2, 24, 16)).astype(np.float32) for _ in range(2)]
    s, c = pair(server_devices=2, client_devices=2)
    with s, c:
        s.send_kv_cache(layers, head_axis=1)
        got = c.recv_kv_cache()
        s.send_kv_cache(layers, head_axis=1)
        with pytest.raises(ValueError, match=match):
            c.recv_kv_cache(out=make(got))
        s.send_kv_cache(layers, head_axis=1)  # the refused one was dropped: the pipe is in step
        for want, y in zip(layers, c.recv_kv_cache(), strict=True):
            np.testing.assert_array_equal(np.asarray(y), want)


def test_receive_kernel_needs_cuda():
    with pytest.raises(ValueError, match=r"expected receive in \('auto', 'kernel', 'copy'\)"):
        IpcKVPipe("127.0.0.1", 1, receive="kernel", devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="expected receive in"):
        IpcKVPipe("127.0.0.1", 1, receive="dma", devices=jax.devices()[:1])
