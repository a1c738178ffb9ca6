"""Host-level wire format (no pickle) and the single-process forms of the host-level ops."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import spmd
from spmd import host, host_store, wire


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
    assert g.all_gather_object(5) == [5] * 8  # one entry per rank of the group; one process holds all 8
    assert spmd.get_tp_group().all_gather_object("x") == ["x", "x"]
    d = {"x": np.ones(2)}
    assert g.broadcast_tensor_dict(d) is d
    assert g.broadcast_tensor_dict(d, src=7) is d
    g.barrier()


def test_src_is_a_rank_in_the_group_everywhere():
    """One meaning of ``src``: the module-level function, the group method, host level and in-graph agree."""
    d = {"max_seq_len": 4096}
    # Before model parallelism: the world of processes (the seed's config sync after init_distributed_environment).
    assert spmd.broadcast_tensor_dict(d, src=0) is d
    with pytest.raises(ValueError, match=r"src=1 is out of range for 1 processes"):
        spmd.broadcast_tensor_dict(d, src=1)
    spmd.initialize_model_parallel(tensor_model_parallel_size=2)
    tp = spmd.get_tp_group()
    assert spmd.broadcast_tensor_dict(d, src=1) is d and tp.broadcast_tensor_dict(d, src=1) is d
    for call in (lambda: spmd.broadcast_tensor_dict(d, src=3), lambda: tp.broadcast_tensor_dict(d, src=3)):
        with pytest.raises(ValueError, match=r"src=3 is out of range for the tp group of size 2"):
            call()
    with pytest.raises(ValueError, match=r"src=3 is out of range for the tp group of size 2"):
        tp.broadcast_object(1, src=3)
    with pytest.raises(TypeError, match=r"rank src=0 of the tp group must pass a dict, got list"):
        spmd.broadcast_tensor_dict([1], src=0)
    with pytest.raises(TypeError, match=r"\['bad'\]: cannot send"):
        tp.broadcast_tensor_dict({"bad": {1}}, src=0)


def test_group_source_processes_maps_ranks_to_processes(monkeypatch):
    """Rank ``src`` of each group is a device; its owner process sends (faked 4-process layout)."""
    from spmd import tensor_dict as td

    owner = {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}  # two devices per process
    monkeypatch.setattr(td, "_process_of_device", lambda: owner)
    tp_groups = ((0, 1), (2, 3), (4, 5), (6, 7))
    dp_groups = ((0, 2, 4, 6), (1, 3, 5, 7))
    mine = {d.id for d in jax.local_devices()}  # this process holds 0..7; restrict to process 1's devices
    monkeypatch.setattr(td.jax, "local_devices", lambda: [d for d in jax.devices() if d.id in (2, 3)])
    assert mine == set(range(8))
    assert td.group_source_processes(tp_groups, 1, op="t", group_name="tp") == (1, (0, 1, 2, 3))
    assert td.group_source_processes(dp_groups, 2, op="t", group_name="dp") == (2, (2,))
    with pytest.raises(ValueError, match=r"several dp groups whose rank src=0 lives on different processes \[0, 1\]"):
        td.group_source_processes(((0, 2), (3, 1)), 0, op="t", group_name="dp")


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


# Issue 10: wire-format fixes -----------------------------------------------------------------------


@pytest.mark.parametrize("inline", [False, True])
def test_numpy_scalars_and_floats_arrive_with_their_value(inline, rng):
    """numpy scalars stay numpy scalars of their dtype (np.float64 is a float subclass: not a repr string)."""
    import enum

    class Color(enum.IntEnum):
        RED = 7

    scalars = {n: np.asarray(rng.standard_normal() * 50).astype(jnp.dtype(n))[()] for n in sorted(host.ALLOWED_DTYPES)}
    floats = [float(f) for f in rng.standard_normal(20) * 10.0 ** rng.integers(-300, 300, 20)]
    value = {
        "scalars": scalars,
        "mean": np.mean(rng.standard_normal(9)),
        "floats": floats,
        "neg_nan": -float("nan"),
        "enum": Color.RED,
        "big": int(rng.integers(1, 9)) * 10**5000 - 1,
        "neg": -(2**200),
    }
    out = _roundtrip(value, inline)
    for name, v in scalars.items():
        assert (
            type(out["scalars"][name]) is type(v)
            and np.asarray(out["scalars"][name]).tobytes() == np.asarray(v).tobytes()
        )
    assert type(out["mean"]) is np.float64 and out["mean"] == value["mean"]
    assert [f.hex() for f in out["floats"]] == [f.hex() for f in floats]
    assert np.isnan(out["neg_nan"]) and np.signbit(out["neg_nan"])
    assert type(out["enum"]) is int and out["enum"] == 7  # an IntEnum arrives as int (documented)
    assert out["big"] == value["big"] and out["neg"] == value["neg"]


def _nest(depth):
    v: dict = {}
    for _ in range(depth):
        v = {"d": v}
    return v


def test_depth_limit_is_named():
    _roundtrip(_nest(host.MAX_DEPTH))  # at the limit: fine
    with pytest.raises(ValueError, match=r"nested deeper than MAX_DEPTH=64 levels \(or a cycle\)"):
        host.encode(_nest(331))
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="nested deeper than MAX_DEPTH"):
        host.encode(cycle)
    with pytest.raises(ValueError, match="nested deeper than MAX_DEPTH"):
        host.broadcast_object(_nest(100))  # single process: the same check as a sender


def _raw(header, payload=b""):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(4, "little") + h + payload


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"", "a record of 0 bytes"),
        (b"\xff\xff\xff\x7f{}", "past the end"),
        (_raw(b"{not json"), "the header is not JSON"),
        (_raw(b"\xff\xfe"), "the header is not JSON"),
        (_raw(b"[" * 5000 + b"]" * 5000), "the header is not JSON"),
        (_raw([1, 2]), "bad header"),
        (_raw({"op": "x", "role": "send", "sources": [[0]]}), "bad header"),
    ],
)
def test_malformed_records_raise_one_error_type(raw, match):
    with pytest.raises(host.MalformedMessageError, match=match):
        host_store._parse_record(raw, who="test")


@pytest.mark.parametrize(
    "tree,match",
    [
        ({"dict": [[{"list": [{"int": "0x1"}]}, None]]}, "a dict key of type list"),
        ({"int": 5}, "int body is not a string"),
        ({"int": "zz"}, "ValueError"),
        ({"float": "xyz"}, "bad float"),
        ({"float": "zz" * 8}, "ValueError"),
        ({"bytes": "!!!"}, "Error"),
        ({"array": {"dtype": "uint8", "shape": [3], "kind": "numpy", "b64": "AAAAAA=="}}, "with 4 bytes"),
        ({"array": {"dtype": "uint8", "shape": [2**62, 3], "kind": "numpy", "b64": ""}}, "with 0 bytes"),
        ({"array": {"dtype": "uint8", "shape": [True], "kind": "numpy", "index": 0}}, "bad array shape"),
        ({"array": {"dtype": "uint8", "shape": [2], "kind": "scalar", "index": 0}}, "a scalar of shape"),
        (_nest(0) or {"list": [{"list": []}]}, None),
    ],
)
def test_malformed_trees_raise_one_error_type(tree, match):
    if match is None:
        assert host.decode(tree) == [[]]
        return
    with pytest.raises(host.MalformedMessageError, match=match):
        host.decode(tree, [np.zeros(2, np.uint8)])


class _FakeCall:
    max_bytes = 1 << 30


def _send_header(shape, nbytes, dtype="uint8"):
    tree = {"array": {"dtype": dtype, "shape": shape, "kind": "numpy", "index": 0}}
    return {"op": "t", "call": 1, "sources": [0], "role": "send", "tree": tree, "nbytes": nbytes}


@pytest.mark.parametrize(
    "shape,nbytes,payload,match",
    [
        ([2**31], 2**31, b"", r"announces more than 1073741824 bytes .* over the limit SPMD_HOST_MAX_BYTES"),
        ([2**62, 3], 3 * 2**62, b"", "over the limit SPMD_HOST_MAX_BYTES"),
        ([100], 100, b"", "announces 100 bytes of arrays; its arrays need 100, 0 arrived"),
        ([100], 7, b"\0" * 100, "announces 7 bytes"),
        ([host.INLINE_MAX_BYTES + 1], host.INLINE_MAX_BYTES + 1, b"\0" * 10, "10 arrived"),
    ],
)
def test_announced_sizes_are_checked_before_allocating(shape, nbytes, payload, match):
    """Sizes from a peer: Python ints (no int64 overflow), the cap, and the bytes that arrived."""
    header, body = host_store._parse_record(_raw(_send_header(shape, nbytes), payload), who="t")
    with pytest.raises(host.MalformedMessageError, match=match):
        host_store._message(_FakeCall, header, body, "t")


def test_inline_payload_roundtrip_through_a_record(rng):
    arrays = [rng.standard_normal((3, 5)).astype(np.float32), rng.integers(0, 99, (7,), dtype=np.int8)]
    specs = [(str(a.dtype), list(a.shape)) for a in arrays]
    offsets, total = wire.layout(specs, 1 << 20, what="t")
    assert all(o % 64 == 0 for o in offsets) and total == offsets[-1] + 7
    buf = np.zeros(total, np.uint8)
    wire.pack_into(buf, 0, arrays, offsets)
    half = np.zeros(total - 40, np.uint8)
    wire.pack_into(half, 40, arrays, offsets)  # a chunk that starts inside the first array
    np.testing.assert_array_equal(half, buf[40:])
    for got, want in zip(wire.views(bytearray(buf.tobytes()), specs, offsets), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.flags.writeable


def test_bucket_pads_little(rng):
    for n in [*rng.integers(1, 1 << 31, 200).tolist(), 1, 1024, 1025, 64 << 20, (64 << 20) + 1]:
        b = host_store._bucket(n)
        assert n <= b and (b <= max(1024, 1.25 * n)), (n, b)
    sizes = {host_store._bucket(n) for n in range((1 << 20) + 1, 1 << 21, 997)}
    assert len(sizes) == 4


def test_size_cap_and_timeout_are_checked_on_one_process(monkeypatch):
    monkeypatch.setenv("SPMD_HOST_MAX_BYTES", "1000")
    with pytest.raises(host.MalformedMessageError, match="over the limit SPMD_HOST_MAX_BYTES=1000"):
        host.broadcast_object({"w": np.zeros(2000, np.uint8)})
    assert host.broadcast_object({"w": np.zeros(900, np.uint8)})["w"].size == 900
    with pytest.raises(ValueError, match=r"timeout_s=-1: expected a positive number of seconds"):
        host.broadcast_object(1, timeout_s=-1)
    with pytest.raises(ValueError, match=r"timeout_s=nan: expected a positive number"):
        host.barrier(timeout_s=float("nan"))


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "inf"])
def test_env_timeout_must_be_positive_seconds(raw):
    from spmd.envs import SpmdEnv

    with pytest.raises(ValueError, match=rf"SPMD_COLLECTIVE_TIMEOUT_S='{raw}': expected a positive number of seconds"):
        SpmdEnv.from_environ({"SPMD_COLLECTIVE_TIMEOUT_S": raw})


def test_env_timeout_and_cap_parse():
    from spmd.envs import SpmdEnv

    e = SpmdEnv.from_environ({"SPMD_COLLECTIVE_TIMEOUT_S": "2.5", "SPMD_HOST_MAX_BYTES": "4096"})
    assert (e.collective_timeout_s, e.host_max_bytes) == (2.5, 4096)
    assert SpmdEnv.from_environ({}).host_max_bytes == 4 << 30
    with pytest.raises(ValueError, match=r"SPMD_HOST_MAX_BYTES=0: expected a positive integer"):
        SpmdEnv.from_environ({"SPMD_HOST_MAX_BYTES": "0"})


@pytest.mark.parametrize(
    "env,match",
    [
        ({"SPMD_HOST_TRANSPORT": "udp"}, r"SPMD_HOST_TRANSPORT='udp': expected one of auto, tcp, store"),
        (
            {"SPMD_HOST_ADDRESS": "0.0.0.0"},
            r"SPMD_HOST_ADDRESS='0.0.0.0': expected this host's address .* not a wildcard",
        ),
        ({"SPMD_HOST_ADDRESS": "[::]"}, r"SPMD_HOST_ADDRESS='\[::\]': .* not a wildcard"),
        ({"SPMD_HOST_ADDRESS": "*"}, "not a wildcard"),
        ({"SPMD_HOST_ADDRESS": "0"}, "not a wildcard"),  # what bind() takes for 0.0.0.0
    ],
)
def test_env_host_transport_and_address_are_checked(env, match):
    from spmd.envs import SpmdEnv

    with pytest.raises(ValueError, match=match):
        SpmdEnv.from_environ(env)


def test_env_host_transport_and_address_parse():
    from spmd.envs import SpmdEnv

    e = SpmdEnv.from_environ({})
    assert (e.host_transport, e.host_address) == ("auto", None)
    e = SpmdEnv.from_environ({"SPMD_HOST_TRANSPORT": " Store ", "SPMD_HOST_ADDRESS": "10.1.2.3"})
    assert (e.host_transport, e.host_address) == ("store", "10.1.2.3")
    assert SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": "[fe80::1]"}).host_address == "fe80::1"
    assert SpmdEnv.from_environ({"SPMD_HOST_ADDRESS": "node-7.cluster"}).host_address == "node-7.cluster"


def test_a_bad_host_setting_is_named_by_every_host_level_call(monkeypatch):
    monkeypatch.setenv("SPMD_HOST_TRANSPORT", "udp")
    with pytest.raises(ValueError, match="SPMD_HOST_TRANSPORT='udp': expected one of auto, tcp, store"):
        host.broadcast_object(1)
