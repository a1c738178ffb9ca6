"""Host-level wire format (no pickle) and the single-process forms of the host-level ops."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import spmd
from spmd import host


def _roundtrip(value, inline=False):
    tree, arrays = host.encode(value, inline_arrays=inline)
    tree = json.loads(json.dumps(tree))  # what travels is JSON text
    arrays = [np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape) for a in arrays]
    return host.decode(tree, arrays)


@pytest.mark.parametrize("inline", [False, True])
def test_roundtrip_every_allowed_kind(inline, rng):
    value = {
        "none": None,
        "flags": [True, False],
        "big": 2**80,
        "neg": -7,
        "floats": (1.5, float("inf"), -0.0),
        "text": "héllo",
        "raw": b"\x00\xff",
        3: {"nested": [[1, 2], {"k": "v"}]},
        (1, "a"): "tuple key",
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-(2**40), 2**40, (5,)),
        "jax": jnp.asarray(rng.standard_normal((2, 2)), jnp.float32),
        "scalar": np.int8(-3),
        "empty": np.zeros((0, 3), np.float16),
    }
    out = _roundtrip(value, inline)
    assert list(out) == list(value)
    for k in ("none", "flags", "big", "neg", "floats", "text", "raw", 3, (1, "a")):
        assert out[k] == value[k] and type(out[k]) is type(value[k])
    assert str(out["floats"][2]) == "-0.0"
    for k in ("bf16", "i64", "jax", "empty"):
        assert np.asarray(out[k]).dtype == np.asarray(value[k]).dtype
        assert np.asarray(out[k]).tobytes() == np.asarray(value[k]).tobytes()
    assert isinstance(out["jax"], type(jnp.zeros(1))) and isinstance(out["bf16"], np.ndarray)
    assert type(out["scalar"]) is np.int8 and out["scalar"] == -3


@pytest.mark.parametrize(
    "value,match",
    [
        ({"a": {"b": {1, 2}}}, r"\['a'\]\['b'\]: cannot send a value of type builtins.set"),
        ({"f": lambda x: x}, r"\['f'\]: cannot send a value of type builtins.function"),
        ({"l": [1, object()]}, r"\['l'\]\[1\]: cannot send a value of type builtins.object"),
        ({"s": np.array(["a"])}, r"\['s'\]: cannot send an array of dtype <U1"),
        ({frozenset(): 1}, r"cannot send a dict key of type frozenset"),
    ],
)
def test_unsupported_values_are_named(value, match):
    with pytest.raises(TypeError, match=match):
        host.encode(value)


@pytest.mark.parametrize(
    "tree,arrays,match",
    [
        ({"pickle": "x"}, [], "unknown tag 'pickle'"),
        ({"array": {"dtype": "object", "shape": [1], "kind": "numpy", "index": 0}}, [np.zeros(1)], "not allowed"),
        ({"array": {"dtype": "float32", "shape": [-1], "kind": "numpy", "index": 0}}, [np.zeros(1)], "bad array shape"),
        ({"array": {"dtype": "float32", "shape": [1], "kind": "numpy", "index": 5}}, [np.zeros(1)], "bad array index"),
        ({"dict": [["only-one"]]}, [], "not a list of pairs"),
        ([1, 2], [], "unexpected node"),
    ],
)
def test_malformed_messages_are_refused(tree, arrays, match):
    with pytest.raises(ValueError, match=match):
        host.decode(tree, arrays)


def test_single_process_host_ops():
    d = {"max_seq_len": 4096, "w": np.arange(3.0)}
    assert host.broadcast_tensor_dict_across_processes(d, 0) is d
    assert host.broadcast_object([1, "a"], 0) == [1, "a"]
    assert host.all_gather_object({"x": 1}) == [{"x": 1}]
    host.barrier()
    with pytest.raises(TypeError, match=r"\['bad'\]: cannot send"):
        host.broadcast_tensor_dict_across_processes({"bad": {1}}, 0)
    with pytest.raises(TypeError, match="process src=0 must pass a dict, got list"):
        host.broadcast_tensor_dict_across_processes([1], 0)
    with pytest.raises(ValueError, match=r"src=1 is out of range for 1 processes"):
        host.broadcast_object(1, src=1)
    with pytest.raises(TypeError, match=r"cannot send a value of type builtins\.set"):
        host.all_gather_object({1, 2})


def test_group_coordinator_host_level_forms():
    spmd.initialize_model_parallel(2)
    g = spmd.get_world_group()
    assert g.broadcast_object({"a": 1}) == {"a": 1}
    assert g.all_gather_object(5) == [5]
    d = {"x": np.ones(2)}
    assert g.broadcast_tensor_dict(d) is d
    g.barrier()


def test_env_parsing():
    from spmd.envs import SpmdEnv

    e = SpmdEnv.from_environ(
        {"SPMD_NUM_PROCESSES": "4", "SPMD_PROCESS_ID": "2", "SPMD_LOCAL_DEVICE_IDS": "0,1", "SLURM_NTASKS": "4"}
    )
    assert (e.num_processes, e.process_id, e.local_device_ids, e.cluster_launched) == (4, 2, (0, 1), True)
    assert SpmdEnv.from_environ({}).cluster_launched is False
    with pytest.raises(ValueError, match=r"SPMD_NUM_PROCESSES='two': expected an integer"):
        SpmdEnv.from_environ({"SPMD_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="expected comma-separated integers"):
        SpmdEnv.from_environ({"SPMD_LOCAL_DEVICE_IDS": "0;1"})
