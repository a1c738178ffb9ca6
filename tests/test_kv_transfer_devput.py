"""``DevicePutKVPipe``: the KV routes (every P/D pair, in one process) and, in real processes, pieces in place.

Also the worker of its multi-process tests (``spmd-launch ... tests/test_kv_transfer_devput.py MODES SEED``,
``MODES`` comma-separated, run in order in one job):

* ``swap``: many same-shaped pieces with distinct contents, sent again and again over several P/D
  pairs (both ``pack`` modes), each received shard compared with numpy: a transfer that lands
  in another device pair's place (what one batched ``device_put`` across pairs does) fails it;
* ``errors``: mismatched calls (drained, the pipe stays in step), bad metadata, a foreign record.

The pipe contract (dtypes, order, None, empty, 0-d, non-contiguous, bad input, close, timeout) runs
over this pipe in ``tests/test_kv_contract.py``.
"""

from __future__ import annotations

import base64
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (prefill TP, decode TP, KV heads): equal, 4 -> 2, 2 -> 4 replicating on decode, 4 -> 2 replicating on
# prefill, 1 -> 4, 4 -> 1.
SWAP_CASES = [(2, 2, 4), (4, 2, 4), (2, 4, 2), (4, 2, 2), (1, 4, 4), (4, 1, 4)]


def _layers(seed: int, rep: int, heads: int) -> list[np.ndarray]:
    """One message's cache: same-shaped layers (distinct random contents), a bf16 layer, an empty one."""
    import ml_dtypes

    rng = np.random.default_rng([seed, rep, heads])
    out = [rng.standard_normal((heads, 16, 8)).astype(np.float32) for _ in range(6)]
    out.append(rng.standard_normal((heads, 16, 8)).astype(ml_dtypes.bfloat16))
    out.append(np.zeros((heads, 0, 8), np.float32))
    return out


def _tensors(seed: int, rep: int) -> list[np.ndarray]:
    """Same-shaped arrays over the device path (more than the inline limit) and small inline ones."""
    rng = np.random.default_rng([seed, rep, 99])
    return [rng.standard_normal((64, 128)).astype(np.float32) for _ in range(3)] + [rng.integers(0, 9, (5,), np.int32)]


# ---------------------------------------------------------------------------------------------------
# In one process: the routes, packing and unpacking, for every P/D pair (the "transfer" is a local copy)


# (KV heads, P, D): every pair of TP sizes 1, 2, 4 with 2 KV heads (replicated heads on either
# side or both), and with 8 heads the pairs that join heads of several sender ranks, cut a slice of
# one rank's heads, or move one head per pair (TP 8).
ROUTE_CASES = [(2, p, d) for p in (1, 2, 4) for d in (1, 2, 4)] + [
    (8, 8, 2),
    (8, 2, 8),
    (8, 8, 8),
    (8, 4, 1),
    (2, 8, 1),
]


# The fast lane: replicated heads on the receiver, on the sender and on both, heads joined from several senders,
# one rank's heads cut in slices; the other pairs under slow.
FAST_ROUTE_CASES = [(2, 1, 4), (2, 4, 1), (2, 4, 4), (8, 8, 2), (8, 2, 8)]


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(FAST_ROUTE_CASES, id="fast"),
        pytest.param([c for c in ROUTE_CASES if c not in FAST_ROUTE_CASES], id="rest", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "pieces"])
def test_route_puts_every_head_in_place_for_every_tp_pair(pack, cases, rng):
    import jax
    import ml_dtypes
    from jax.sharding import SingleDeviceSharding

    from spmd.kv_transfer import _route, kv_head_sharding, split_kv_heads

    devs = jax.devices()
    for heads, p, d in cases:
        src, dst = devs[:p], devs[8 - d :]
        layers = [rng.standard_normal((3, heads, 5, 2)).astype(np.float32) for _ in range(3)]
        layers.insert(1, rng.standard_normal((3, heads, 5, 2)).astype(ml_dtypes.bfloat16))
        layers += [rng.random((3, heads, 5, 2)) > 0.5, np.zeros((3, heads, 0, 2), np.float32)]
        specs = tuple((str(x.dtype), x.shape) for x in layers)
        route = _route.KVRoute(heads, p, d, 1, specs)
        sharding = kv_head_sharding(src, heads, head_axis=1)
        shards = [_route.local_shards(x, sharding, src) if i in route.live else None for i, x in enumerate(layers)]
        arrived = {}
        for s, g in route.pairs:
            sent = _route.sender_arrays(route, shards, s, g, pack)
            want = [(np.dtype(dt), shape) for dt, shape in route.buffer_specs(s, g, pack)]
            assert [(x.dtype, x.shape) for x in sent] == want, (p, d, s, g)
            assert all(x.sharding.device_set == {src[s]} for x in sent)
            arrived[(s, g)] = [jax.device_put(x, SingleDeviceSharding(dst[g])) for x in sent]
        for _, _, ranks in route.groups:
            got = _route.receiver_shards(route, arrived, ranks[0], pack)
            for i, y in zip(route.live, got, strict=True):
                want = split_kv_heads(layers[i], d, head_axis=1)
                for r in ranks:  # the replicas' shards are the first rank's
                    np.testing.assert_array_equal(np.asarray(y), want[r], err_msg=f"P{p} D{d} layer {i} rank {r}")
                assert y.sharding.device_set == {dst[ranks[0]]}
        # One pair per (sender holding the heads, receiver head group), each only once.
        assert len(route.pairs) == len(set(route.pairs)) and route.pairs == sorted(route.pairs)
        assert {g for _, g in route.pairs} == {ranks[0] for _, _, ranks in route.groups}
        kv_head_sharding(dst, heads)  # the receiver's layout exists for this pair


def test_route_counts_and_pieces_mode_needs_no_copy_for_equal_tp():
    from spmd.kv_transfer import _route

    route = _route.KVRoute(8, 4, 2, 0, tuple(("bfloat16", (8, 160, 128)) for _ in range(64)))
    assert route.pairs == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert route.buffer_specs(0, 0, True) == [(np.dtype(np.uint16), (64 * 2 * 160 * 128,))]  # the bf16 bits
    assert len(route.buffer_specs(0, 0, False)) == 64
    same = _route.KVRoute(8, 2, 2, 0, route.layers)
    assert same.pairs == [(0, 0), (1, 1)] and same.whole_shards(0, 0) and same.one_piece(1)
    assert not route.one_piece(0) and route.whole_shards(0, 0)
    narrow = _route.KVRoute(8, 2, 4, 0, route.layers)
    assert narrow.pairs == [(0, 0), (0, 1), (1, 2), (1, 3)] and not narrow.whole_shards(0, 1)
    assert _route.KVRoute(2, 2, 2, 0, (("float32", (2, 0, 4)),)).pairs == []  # nothing to move
    # pack=None packs >= 16 pieces a pair under 1 MiB: a 20 MiB cache of 64 layers (320 KiB each), not
    # 256 MiB (4 MiB each), nor 8 layers.
    assert same.mean_piece_bytes() == 8 * 160 * 128 * 2 / 2 and same.pieces_per_pair() == 64
    big = (("bfloat16", (8, 2048, 128)),) * 64
    assert _route.KVRoute(8, 1, 1, 0, big).mean_piece_bytes() == 4 << 20
    assert route.pieces_per_pair() == 64 and narrow.pieces_per_pair() == 64


# ---------------------------------------------------------------------------------------------------
# Two processes of one job


def _launch(mode: str, seed: int, devices: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", str(devices)]
    cmd += ["--timeout", "150", __file__, mode, str(seed)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # about 10 s or more on 2 shared cores
@pytest.mark.multiprocess
def test_pieces_land_in_place_and_mismatched_calls_keep_the_pipe_in_step(rng):
    """One job (2 processes of 4 devices) runs both workers: ``swap``, then ``errors``."""
    seed = int(rng.integers(2**31))
    r = _launch("swap,errors", seed, 4)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"seed {seed}\n" + out[-5000:]
    for p, d, h in SWAP_CASES:
        assert f"[rank 1] OK swap recv P={p} D={d} heads={h}" in out, out[-3000:]
    assert "[rank 0] OK swap send" in out
    assert "[rank 0] OK errors send" in out and "[rank 1] OK errors recv" in out


@pytest.mark.multiprocess
def test_benchmark_runs_and_checks_its_bytes(tmp_path):
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", "2"]
    cmd += ["--timeout", "150", "-m", "spmd.bench.kv_device_put", "--sizes", "64KiB,1MiB", "--kv-layers", "4"]
    cmd += ["--kv-heads", "2", "--head-dim", "16", "--repeats", "2", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(x["mode"], x["bytes"]) for x in rows] == [
        (m, s) for m in ("array", "kv-packed", "kv-pieces") for s in (1 << 16, 1 << 20)
    ]
    assert all(x["ok"] and x["us"] > 0 for x in rows) and rows[2]["arrays"] == 8
    assert "TP 2 (process 0) -> TP 2 (process 1)" in r.stdout


def test_pipe_arguments():
    import jax

    from spmd.kv_transfer import DevicePutKVPipe

    devs = jax.devices()
    with pytest.raises(ValueError, match="overlap"):
        DevicePutKVPipe(devs[:2], devs[1:3])
    with pytest.raises(ValueError, match="must both be non-empty"):
        DevicePutKVPipe([], devs[1:3])
    with pytest.raises(ValueError, match="devices of one process, and the two processes must differ"):
        DevicePutKVPipe(devs[:2], devs[2:4])
    with pytest.raises(RuntimeError, match="already started its backend"):
        DevicePutKVPipe.enable_transfers()


# ---------------------------------------------------------------------------------------------------
# The workers


def _barrier(name: str) -> None:
    from spmd import compat

    compat.distributed_client().wait_at_barrier(f"test-devput/{name}", 60_000)


def _check_kv(kv, layers, dst, heads, what: str) -> None:
    from spmd.kv_transfer import split_kv_heads

    assert len(kv) == len(layers), what
    for i, (x, y) in enumerate(zip(layers, kv, strict=True)):
        assert y.dtype == x.dtype and y.shape == x.shape, (what, i, y.dtype, y.shape)
        np.testing.assert_array_equal(np.asarray(y), x, err_msg=f"{what} layer {i}")
        want = split_kv_heads(x, len(dst))
        shards = {s.device: np.asarray(s.data) for s in y.addressable_shards}
        assert set(shards) == set(dst), (what, i)
        for r, dev in enumerate(dst):
            np.testing.assert_array_equal(shards[dev], want[r], err_msg=f"{what} layer {i} decode rank {r}")


def _swap_worker(seed: int) -> None:
    import jax

    from spmd.kv_transfer import DevicePutKVPipe, kv_head_sharding

    me = jax.process_index()
    side = [[d for d in jax.devices() if d.process_index == i] for i in (0, 1)]
    for p, d, heads in SWAP_CASES:
        src, dst = side[0][:p], side[1][:d]
        for pack in (True, False):
            pipe = DevicePutKVPipe(src, dst, timeout_s=60, name=f"swap-{p}-{d}-{heads}-{pack}", pack=pack)
            for rep in range(4):
                layers, tensors = _layers(seed, rep, heads), _tensors(seed, rep)
                if me == 0:
                    pipe.send_kv_cache([jax.device_put(x, kv_head_sharding(src, heads)) for x in layers])
                    for t in tensors:
                        pipe.send_tensor(t)
                    continue
                _check_kv(pipe.recv_kv_cache(), layers, dst, heads, f"P{p} D{d} pack={pack} rep {rep}")
                got = [pipe.recv_tensor() for _ in tensors]
                for i, (t, g) in enumerate(zip(tensors, got, strict=True)):
                    assert g.devices() == {dst[0]}
                    np.testing.assert_array_equal(np.asarray(g), t, err_msg=f"P{p} D{d} rep {rep} tensor {i}")
            pipe.close()
        if me == 1:
            print(f"OK swap recv P={p} D={d} heads={heads}", flush=True)
    if me == 0:
        print("OK swap send", flush=True)


def _errors_worker(seed: int) -> None:
    import jax

    from spmd.kv_transfer import DevicePutKVPipe, kv_head_sharding

    me = jax.process_index()
    side = [[d for d in jax.devices() if d.process_index == i] for i in (0, 1)]
    src, dst = side[0][:2], side[1][:2]
    layers, tensors = _layers(seed, 0, 2), _tensors(seed, 0)
    pipe = DevicePutKVPipe(src, dst, timeout_s=60.0, name="errors")
    with pytest.raises(TypeError, match="pack must be True, False or None, got 1"):
        DevicePutKVPipe(src, dst, pack=1)
    if me == 0:
        with pytest.raises(RuntimeError, match="only the receiver may call it"):
            pipe.recv_tensor()
        pipe.send_tensor(tensors[0])
        pipe.send_tensor(tensors[1])  # the receiver asks for a KV cache: drained
        pipe.send_kv_cache([jax.device_put(x, kv_head_sharding(src, 2)) for x in layers])  # ... for a tensor
        pipe.send_tensor(None)  # ... for a KV cache
        pipe.send_tensor(tensors[2])  # still in step
        pipe.send_kv_cache(layers)  # numpy layers, in step
        with pytest.raises(ValueError, match="tp=2 does not divide num_kv_heads=3"):
            pipe.send_kv_cache([np.zeros((3, 4), np.float32)])
        with pytest.raises(TypeError, match="int64 array would be truncated"):
            pipe.send_kv_cache([np.zeros((2, 4), np.int64)])
        # A foreign sender: inline bytes that do not fit, then a KV record cut for other TP sizes.
        pipe._put_meta({"none": False, "dtype": "float32", "shape": [4], "data": base64.b64encode(b"x" * 8).decode()})
        pipe.send_tensor(tensors[3])
        kv = {"heads": 2, "head_axis": 0, "src_tp": 3, "dst_tp": 2, "pack": True, "layers": [["float32", [2, 4]]]}
        pipe._put_meta({"none": False, "kv": kv})
        for name, layer in (
            ("errors-heads", ["float32", [3, 4]]),
            ("errors-dtype", ["object", [2, 4]]),
            ("errors-huge-kv", ["float32", [2, 1 << 62]]),  # its bytes overflow int64 (issue 22, item 5)
        ):
            bad = DevicePutKVPipe(src, dst, name=name)
            bad._put_meta({"none": False, "kv": {**kv, "src_tp": 2, "layers": [["float32", [2, 4]], layer]}})
        huge = {"none": False, "dtype": "float32", "shape": [1 << 62, 8]}
        DevicePutKVPipe(src, dst, name="errors-huge")._put_meta(huge)
        # A key someone else wrote first: named, never JAX's raw ALREADY_EXISTS (issue 22, item 9).
        from spmd import compat

        compat.distributed_client().key_value_set("spmd/kv_transfer/errors-dup/1", '{"none":true}')
        with pytest.raises(ValueError, match=r"the key 'spmd/kv_transfer/errors-dup/1' is already in the key-value"):
            DevicePutKVPipe(src, dst, name="errors-dup").send_tensor(None)
        _barrier("done")
        print("OK errors send", flush=True)
        return
    with pytest.raises(RuntimeError, match="only the sender may call it"):
        pipe.send_tensor(None)
    np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), tensors[0])
    with pytest.raises(
        ValueError, match=r"expected the KV cache sent by send_kv_cache, got a tensor float32\[64, 128\]"
    ):
        pipe.recv_kv_cache()
    with pytest.raises(ValueError, match="the sender sent a KV cache"):
        pipe.recv_tensor()
    with pytest.raises(ValueError, match="expected the KV cache sent by send_kv_cache, got None"):
        pipe.recv_kv_cache()
    with pytest.raises(ValueError, match="receive on the pipe's dst_devices"):
        pipe.recv_kv_cache(devices=dst[:1])
    np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), tensors[2])
    _check_kv(pipe.recv_kv_cache(tp=2), layers, dst, 2, "numpy layers")
    with pytest.raises(ValueError, match=r"8 inline bytes for float32\[4\]; expected 16"):
        pipe.recv_tensor()
    np.testing.assert_array_equal(np.asarray(pipe.recv_tensor()), tensors[3])
    with pytest.raises(ValueError, match=r"the sender cut the cache for TP 3 -> 2, but this pipe is TP 2 -> 2"):
        pipe.recv_kv_cache()
    with pytest.raises(ValueError, match=r"the pipe is closed \(DevicePutKVPipe.recv_kv_cache: the sender cut"):
        pipe.recv_tensor()
    with pytest.raises(ValueError, match=r"layer 1 has shape \[3, 4\], not 2 heads on axis 0"):
        DevicePutKVPipe(src, dst, name="errors-heads").recv_kv_cache()
    with pytest.raises(ValueError, match=r"dtype 'object' is not allowed"):
        DevicePutKVPipe(src, dst, name="errors-dtype").recv_tensor()  # a KV record, drained: malformed first
    with pytest.raises(ValueError, match="holds more bytes than an int64 can count"):
        DevicePutKVPipe(src, dst, name="errors-huge-kv").recv_kv_cache()
    with pytest.raises(ValueError, match="holds more bytes than an int64 can count"):
        DevicePutKVPipe(src, dst, name="errors-huge").recv_tensor()
    assert DevicePutKVPipe(src, dst, name="errors-dup").recv_tensor() is None  # (the record written first)
    _barrier("done")
    print("OK errors recv", flush=True)


if __name__ == "__main__":
    from spmd.kv_transfer import DevicePutKVPipe

    DevicePutKVPipe.enable_transfers(timeout_s=60)
    import spmd

    spmd.init_distributed_environment()
    for mode in sys.argv[1].split(","):
        {"swap": _swap_worker, "errors": _errors_worker}[mode](int(sys.argv[2]))
