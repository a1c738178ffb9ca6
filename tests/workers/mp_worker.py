"""Worker for the multi-process tests, started by spmd-launch: ``python mp_worker.py MODE``.

Prints ``OK <mode>`` when every check passed; any failed check raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys
import time

import spmd
import spmd.host

spmd.init_distributed_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers
from helpers import assert_same  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

MODE = sys.argv[1]
PID, NPROC, NDEV = jax.process_index(), jax.process_count(), jax.device_count()


def global_array(x: np.ndarray):
    sharding = NamedSharding(spmd.get_mesh(), P(spmd.MESH_AXES))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def run_per_device(fn, x: np.ndarray) -> np.ndarray:
    spec = P(spmd.MESH_AXES)
    f = jax.jit(spmd.shard_map(lambda v: jax.tree.map(lambda o: o[None], fn(v[0])), in_specs=spec, out_specs=spec))
    out = f(global_array(x))
    return jax.tree.map(lambda o: np.asarray(multihost_utils.process_allgather(o, tiled=True)), out)


def seed_dict(seed: int) -> dict:
    """The seed's example: rank 0 loads a config and weights."""
    rng = np.random.default_rng(seed)
    return {
        "max_seq_len": 4096,
        "hidden_size": 4096,
        "model_weights": {
            "layer1.weight": rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16),
            "layer1.bias": rng.standard_normal((32,)).astype(np.float32),
            "embed": jnp.asarray(rng.integers(0, 1000, (10, 3)), dtype=jnp.int32),
            "scalar": np.float16(1.5),
            "empty": np.zeros((0, 4), np.float32),
        },
        "names": ["q_proj", "k_proj"],
        "flags": {"causal": True, "rope": None, 7: (1.0, float("inf"))},
        "raw": b"\x00\x01\xff",
    }


def check_collectives(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for tp, pp in ((NDEV, 1), (NDEV // 2, 2)):
        spmd.destroy_model_parallel()
        spmd.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        x = rng.standard_normal((NDEV, 2 * tp, 4)).astype(np.float32)
        pp_group = spmd.get_pp_group()

        def body(v, pp_group=pp_group):
            return (
                spmd.tensor_model_parallel_all_reduce(v),
                spmd.tensor_model_parallel_all_gather(v, dim=0),
                spmd.tensor_model_parallel_reduce_scatter(v, dim=0),
                pp_group.send_tensor_dict({"h": v, "step": 3})["h"],
            )

        ar, ag, rs, sent = run_per_device(body, x)
        for base in range(0, NDEV, tp):
            g = list(range(base, base + tp))
            for rank, r in enumerate(g):
                np.testing.assert_allclose(ar[r], x[g].sum(0), rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(ag[r], np.concatenate(list(x[g]), 0))
                np.testing.assert_allclose(rs[r], np.split(x[g].sum(0), tp, 0)[rank], rtol=1e-5, atol=1e-5)
        for r in range(NDEV):  # pp stage = r // tp; stage 1 receives stage 0's value
            stage, t = divmod(r, tp)
            np.testing.assert_array_equal(sent[r], x[t] if stage == 1 else np.zeros_like(x[r]))
    print(f"cross-process collectives ok on {NPROC} processes x {NDEV // NPROC} devices", flush=True)


def check_group_host_level() -> None:
    """``src`` is a rank in the group: with TP 2, rank 1's process sends to its group's other processes."""
    spmd.destroy_model_parallel()
    spmd.initialize_model_parallel(tensor_model_parallel_size=2)
    per = NDEV // NPROC
    source = ((PID * per) // 2 * 2 + 1) // per  # the process holding TP rank 1 of this process's group
    mine = {"from": PID, "w": np.arange(4.0) * (PID + 1)}
    got = spmd.broadcast_tensor_dict(mine if PID == source else None, src=1)
    assert got["from"] == source and np.array_equal(np.asarray(got["w"]), np.arange(4.0) * (source + 1)), got
    obj = spmd.get_tp_group().broadcast_object(f"hello from {PID}" if PID == source else None, src=1)
    assert obj == f"hello from {source}", obj
    everyone = spmd.get_world_group().all_gather_object({"pid": PID})
    assert [e["pid"] for e in everyone] == [r // per for r in range(NDEV)], everyone  # one entry per rank
    tp = spmd.get_tp_group().all_gather_object(PID)
    first = (PID * per) // 2 * 2
    assert tp == [first // per, (first + 1) // per], tp
    print(f"group host-level ok: process {PID} received from process {source}", flush=True)


def expect_error(kind, match, fn, *, within_s=None):
    """``fn()`` raises ``kind`` with ``match`` in its message (within ``within_s`` seconds)."""
    t0 = time.monotonic()
    try:
        fn()
    except kind as e:
        assert match in str(e), (kind, match, str(e)[:600])
        took = time.monotonic() - t0
        assert within_s is None or took < within_s, (match, took)
        return e
    raise AssertionError(f"no {kind.__name__} ({match!r})")


def recv():
    return spmd.host.broadcast_object(None, src=0)


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def check_host_protocol() -> None:
    """Issue 10 items 1-6 on 2 processes (SPMD_COLLECTIVE_TIMEOUT_S is small here)."""
    import enum

    from spmd import host, host_store

    timeout = spmd.envs.SpmdEnv.from_environ().collective_timeout_s
    assert NPROC == 2 and timeout == 4.5, (NPROC, timeout)  # a float is accepted
    seed = host.broadcast_object(int(np.random.SeedSequence().entropy % 2**31) if PID == 0 else None)
    rng = np.random.default_rng(seed)  # the same stream on both processes: the reference

    # 1. numpy scalars of every dtype arrive as numpy scalars of that dtype, with their value.
    class Color(enum.IntEnum):
        RED = 7

    scalars = {
        name: np.asarray(rng.standard_normal() * 100).astype(jnp.dtype(name))[()]
        for name in sorted(host.ALLOWED_DTYPES)
    }
    x = rng.standard_normal(17)
    value = {
        "scalars": scalars,
        "np_float": np.float64(1.5),
        "mean": np.mean(x),
        "neg_nan": float(-np.float64("nan")),
        "enum": Color.RED,
        "big": int(rng.integers(1, 9)) * 10**5000 + 3,
    }
    got = host.broadcast_object(value if PID == 0 else None)
    assert PID != 0 or got is value  # the sender keeps its own value
    for name, v in scalars.items():
        assert type(got["scalars"][name]) is type(v), (name, type(got["scalars"][name]), type(v))
        assert np.asarray(got["scalars"][name]).tobytes() == np.asarray(v).tobytes(), name
    assert type(got["np_float"]) is np.float64 and got["np_float"] == 1.5
    assert type(got["mean"]) is np.float64 and got["mean"] == np.mean(x)
    assert np.isnan(got["neg_nan"]) and np.signbit(got["neg_nan"])
    assert type(got["enum"]) is (Color if PID == 0 else int) and got["enum"] == 7 and got["big"] == value["big"]

    # 2. every failure on the sender reaches the receivers at once, named.
    deep: dict = {}
    for _ in range(331):
        deep = {"d": deep}
    for bad, sent_as, match in ((deep, ValueError, "nested deeper than MAX_DEPTH=64"),):
        if PID == 0:
            expect_error(sent_as, match, lambda bad=bad: host.broadcast_object(bad), within_s=3)
        else:
            e = expect_error(RuntimeError, "process 0 could not send its value", recv, within_s=3)
            assert f"{sent_as.__name__}: " in str(e) and match in str(e), e

    # 5. a peer's record that announces 2 GiB (with 0 bytes of payload) is refused before allocating.
    call = host._CALLS._n + 1  # process 0 forges its record of the next call; process 1 receives it
    if PID == 0:
        tree = {"array": {"dtype": "uint8", "shape": [2**31], "kind": "numpy", "index": 0}}
        header = {"op": "broadcast_object", "call": call, "sources": [0], "role": "send", "tree": tree, "nbytes": 2**31}
        client = host._client()
        client.key_value_set_bytes(f"spmd/host/{call}/0", host_store._record(header))
        client.blocking_key_value_get_bytes(f"spmd/host/{call}/1", 10_000)  # process 1 reached the call
        if client.key_value_increment(f"spmd/host/{call}/done", 1) >= NPROC:  # as StoreCall.finish: the last
            client.key_value_delete(f"spmd/host/{call}")  # one out deletes the call's keys (else 3 stay behind)
    else:
        before = peak_mib()
        e = expect_error(ValueError, "over the limit SPMD_HOST_MAX_BYTES", recv, within_s=3)
        assert isinstance(e, host.MalformedMessageError) and peak_mib() - before < 100, (e, peak_mib() - before)
    host._CALLS._n = call

    # 6. misuse: both ranks as sender; src differs; a skipped call meets a barrier.
    mismatch = "the processes made different calls"
    expect_error(RuntimeError, mismatch, lambda: host.broadcast_object(PID, src=PID), within_s=3)
    expect_error(RuntimeError, mismatch, lambda: host.broadcast_object(None, src=1 - PID), within_s=3)
    d1 = {"w": rng.standard_normal((3, 2))}
    got = spmd.broadcast_tensor_dict(d1 if PID == 0 else None, src=0)
    np.testing.assert_array_equal(got["w"], d1["w"])
    if PID == 0:  # process 1 skips the second broadcast and goes on to a barrier
        e = expect_error(RuntimeError, mismatch, lambda: spmd.broadcast_tensor_dict({"w": 2}, src=0), within_s=3)
    else:
        e = expect_error(RuntimeError, mismatch, host.barrier, within_s=3)
    assert "barrier" in str(e) and "broadcast_tensor_dict from process 0" in str(e), e

    # Large payloads (device phase), one and two senders, against the reference.
    big = {"a": rng.standard_normal((300, 700)).astype(np.float32), "b": rng.integers(0, 9, (5,), dtype=np.int8)}
    other = {"c": rng.standard_normal(200_000)}
    got = host.broadcast_object(big if PID == 0 else None)
    assert_same(got, big)
    got = host.broadcast_from(big if PID == 0 else other, 0, sources=(0, 1), op="two_senders")
    assert_same(got, big)

    # 3. a receiver alive but not calling: the sender's wait (before the device phase) is bounded.
    if PID == 0:
        expect_error(TimeoutError, "waited 4.5 s for process 1", lambda: host.broadcast_object(big), within_s=8)
    else:
        time.sleep(timeout + 2)
        expect_error(RuntimeError, "process 0 gave up on this call", recv, within_s=3)

    # 4. the store holds only the calls in flight: 100 more calls leave no keys behind.
    for i in range(40):
        assert host.broadcast_object({"i": i, "s": "x" * 1000} if PID == 0 else None)["i"] == i
        assert host.all_gather_object(PID) == [0, 1]
        host.barrier()
    host.barrier()  # every earlier call's keys are gone once both processes passed this one
    left = [k for k, _ in host._client().key_value_dir_get_bytes("spmd/host/")]  # records are binary
    assert len(left) <= 3, left
    print(f"host protocol ok ({len(left)} keys left)", flush=True)


if MODE == "collectives":
    seed = spmd.host.broadcast_object(int(np.random.SeedSequence().entropy % 2**31) if PID == 0 else None)
    check_collectives(seed)
    spmd.destroy_model_parallel()  # before model parallelism, broadcast_tensor_dict spans every process
    got = spmd.broadcast_tensor_dict(seed_dict(seed) if PID == 0 else None, src=0)
    assert_same(got, seed_dict(seed))
    last = NPROC - 1
    got = spmd.broadcast_tensor_dict({"from": last, "w": jnp.arange(5.0)} if PID == last else None, src=last)
    assert got["from"] == last and np.array_equal(np.asarray(got["w"]), np.arange(5.0))
    everyone = spmd.host.all_gather_object({"pid": PID, "arr": np.full(2, PID, np.int16)})
    assert [e["pid"] for e in everyone] == list(range(NPROC))
    assert all(np.array_equal(e["arr"], np.full(2, i, np.int16)) for i, e in enumerate(everyone))
    check_group_host_level()
    spmd.get_world_group().barrier()
    print("broadcast_tensor_dict / broadcast_object / all_gather_object / barrier ok", flush=True)
elif MODE == "bad_value":
    bad = {"max_seq_len": 4096, "model_weights": {"w": np.ones(3), "opt": {1, 2}}} if PID == 0 else None
    try:
        spmd.broadcast_tensor_dict(bad, src=0)
    except TypeError as e:
        assert PID == 0 and "['model_weights']['opt']: cannot send a value of type builtins.set" in str(e), e
    except RuntimeError as e:
        assert PID != 0 and "process 0 could not send its value" in str(e) and "['opt']" in str(e), e
    else:
        raise AssertionError("no error for an unsupported value")
    # The job is still usable afterwards.
    assert spmd.broadcast_tensor_dict({"ok": 1} if PID == 0 else None)["ok"] == 1
elif MODE == "host_protocol":
    check_host_protocol()
elif MODE == "die":
    if PID == 1:
        print("dying with code 3", flush=True)
        os._exit(3)  # a crash: no clean-up, as when a process is killed or runs out of memory
    spmd.host.barrier(timeout_s=120)  # never completes: rank 1 is gone
elif MODE == "hang":
    print(f"READY {jax.process_index()}", flush=True)  # the test interrupts the job once every rank is here
    time.sleep(600)
else:
    raise SystemExit(f"unknown mode {MODE}")
print(f"OK {MODE}", flush=True)
