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


def assert_same(a, b, path="d"):
    assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), (path, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), path
    else:
        assert a == b, (path, a, b)


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


if MODE == "collectives":
    seed = spmd.host.broadcast_object(int(np.random.SeedSequence().entropy % 2**31) if PID == 0 else None)
    check_collectives(seed)
    got = spmd.broadcast_tensor_dict(seed_dict(seed) if PID == 0 else None, src=0)
    assert_same(got, seed_dict(seed))
    last = NPROC - 1
    got = spmd.broadcast_tensor_dict({"from": last, "w": jnp.arange(5.0)} if PID == last else None, src=last)
    assert got["from"] == last and np.array_equal(np.asarray(got["w"]), np.arange(5.0))
    everyone = spmd.get_world_group().all_gather_object({"pid": PID, "arr": np.full(2, PID, np.int16)})
    assert [e["pid"] for e in everyone] == list(range(NPROC))
    assert all(np.array_equal(e["arr"], np.full(2, i, np.int16)) for i, e in enumerate(everyone))
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
elif MODE == "die":
    if PID == 1:
        print("dying with code 3", flush=True)
        os._exit(3)  # a crash: no clean-up, as when a process is killed or runs out of memory
    spmd.host.barrier(timeout_s=120)  # never completes: rank 1 is gone
elif MODE == "hang":
    time.sleep(600)
else:
    raise SystemExit(f"unknown mode {MODE}")
print(f"OK {MODE}", flush=True)
