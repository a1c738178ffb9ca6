"""Every bad input gets a clear error: what was given, what was expected, how to fix it."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import init, per_device

import spmd

UNBOUND = [
    ("all_reduce", lambda x: spmd.all_reduce(x, "tp")),
    ("all_gather", lambda x: spmd.all_gather(x, "tp")),
    ("reduce_scatter", lambda x: spmd.reduce_scatter(x, "tp")),
    ("all_to_all", lambda x: spmd.all_to_all(x, "tp")),
    ("broadcast", lambda x: spmd.broadcast(x, "tp")),
    ("gather", lambda x: spmd.gather(x, "tp")),
    ("shift", lambda x: spmd.shift(x, "tp")),
    ("axis_index", lambda x: spmd.axis_index("tp")),
]


@pytest.mark.parametrize("name,op", UNBOUND, ids=[n for n, _ in UNBOUND])
def test_unbound_axis_outside_shard_map(name, op):
    x = jnp.ones((8, 8))
    with pytest.raises(spmd.UnboundAxisError, match=rf"{name}: found an unbound axis name: 'tp'.*shard_map"):
        op(x)
    with pytest.raises(NameError):  # also a NameError, as JAX raises
        jax.jit(op)(x)


def test_unbound_axis_from_vllm_wrappers_and_groups():
    init((2, 1, 1, 4))
    with pytest.raises(spmd.UnboundAxisError, match=r"under jax\.shard_map|spmd\.shard_map"):
        spmd.tensor_model_parallel_all_reduce(jnp.ones(4))
    with pytest.raises(spmd.UnboundAxisError, match=r"tp.rank_in_group: found an unbound axis name"):
        _ = spmd.get_tp_group().rank_in_group


def test_unbound_axis_in_a_mesh_without_it():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    f = jax.shard_map(lambda v: spmd.all_reduce(v, "tp"), mesh=mesh, in_specs=jax.P("x"), out_specs=jax.P("x"))
    with pytest.raises(spmd.UnboundAxisError, match="'tp'"):
        f(np.ones((8, 2), np.float32))


@pytest.mark.parametrize(
    "op",
    [
        lambda v: spmd.all_gather(v, "tp", axis=3),
        lambda v: spmd.reduce_scatter(v, "tp", axis=-4),
        lambda v: spmd.all_to_all(v, "tp", split_axis=5),
        lambda v: spmd.all_to_all(v, "tp", concat_axis=-9),
        lambda v: spmd.gather(v, "tp", axis=7),
        lambda v: spmd.tensor_model_parallel_all_gather(v, dim=3),
        lambda v: spmd.tensor_model_parallel_reduce_scatter(v, dim=-4),
    ],
)
def test_dim_out_of_range(op):
    init((2, 1, 1, 4))
    with pytest.raises(ValueError, match=r"dim -?\d+ is out of range for an array of shape \(8, 4, 8\)"):
        per_device(op, np.ones((8, 8, 4, 8), np.float32))


def test_dim_must_be_an_int():
    init((2, 1, 1, 4))
    with pytest.raises(TypeError, match=r"expected an int dimension, got 1.5"):
        per_device(lambda v: spmd.all_gather(v, "tp", axis=1.5), np.ones((8, 4, 4), np.float32))


@pytest.mark.parametrize(
    "op,dim",
    [
        (lambda v: spmd.reduce_scatter(v, "tp", axis=1), 1),
        (lambda v: spmd.tensor_model_parallel_reduce_scatter(v, dim=-1), 2),
        (lambda v: spmd.all_to_all(v, "tp", split_axis=1, concat_axis=0), 1),
        (lambda v: spmd.get_tp_group().all_to_all(v, 2, 0), 2),
    ],
)
def test_size_not_divisible_by_group(op, dim):
    init((2, 1, 1, 4))
    with pytest.raises(
        ValueError,
        match=rf"dimension {dim} of shape \(8, 6, 6\) has size 6, which is not divisible by the group size 4",
    ):
        per_device(op, np.ones((8, 8, 6, 6), np.float32))


@pytest.mark.parametrize(
    "getter",
    [
        spmd.get_world_group,
        spmd.get_tp_group,
        spmd.get_pp_group,
        spmd.get_dp_group,
        spmd.get_ep_group,
        spmd.get_mesh,
        spmd.get_parallel_config,
        spmd.get_tensor_model_parallel_world_size,
    ],
)
def test_getter_before_initialize(getter):
    with pytest.raises(RuntimeError, match=r"model parallel is not initialized\. Call spmd.initialize_model_parallel"):
        getter()


def test_vllm_op_before_initialize():
    with pytest.raises(RuntimeError, match="get_tp_group: model parallel is not initialized"):
        spmd.tensor_model_parallel_all_reduce(jnp.ones(3))
    with pytest.raises(RuntimeError, match="get_mesh: model parallel is not initialized"):
        spmd.shard_map(lambda v: v, in_specs=jax.P(), out_specs=jax.P())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"tensor_model_parallel_size": 3},
            r"tensor_parallel_size=3.*do not fit 8 devices: tp \* pp \* ep = 3",
        ),
        ({"tensor_model_parallel_size": 16}, r"do not fit 8 devices"),
        (
            {"tensor_model_parallel_size": 2, "data_parallel_size": 2},
            r"need dp \* pp \* ep \* tp = 4 devices, but 8 are available",
        ),
        ({"tensor_model_parallel_size": 0}, r"expected tensor_parallel_size to be a positive int, got 0"),
        (
            {"pipeline_model_parallel_size": -1},
            r"expected pipeline_parallel_size to be a positive int, got -1",
        ),
        ({"expert_model_parallel_size": 2.0}, r"expected expert_parallel_size to be a positive int, got 2.0"),
        ({"data_parallel_size": True}, r"expected data_parallel_size to be a positive int, got True"),
    ],
)
def test_sizes_that_do_not_fit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spmd.initialize_model_parallel(**kwargs)
    assert not spmd.model_parallel_is_initialized()


def test_initialize_twice_with_a_different_config():
    spmd.initialize_model_parallel(4)
    with pytest.raises(
        RuntimeError, match=r"already initialized with .*tensor_parallel_size=4.*destroy_model_parallel"
    ):
        spmd.initialize_model_parallel(2)
    with pytest.raises(
        RuntimeError, match="ensure_model_parallel_initialized: initialized with tensor_parallel_size=4"
    ):
        spmd.ensure_model_parallel_initialized(8)


@pytest.mark.parametrize("src", [-1, 4, 100])
def test_src_dst_out_of_range(src):
    init((2, 1, 1, 4))
    x = np.ones((8, 4, 4), np.float32)
    with pytest.raises(ValueError, match=rf"broadcast: src={src} is out of range for axis 'tp' of size 4"):
        per_device(lambda v: spmd.broadcast(v, "tp", src=src), x)
    with pytest.raises(ValueError, match=rf"gather: dst={src} is out of range for axis 'tp' of size 4"):
        per_device(lambda v: spmd.get_tp_group().gather(v, dst=src), x)
    with pytest.raises(ValueError, match=rf"src={src} is out of range"):
        per_device(lambda v: spmd.broadcast_tensor_dict({"a": v}, src=src), x)
    with pytest.raises(ValueError, match=rf"broadcast_tensor_dict: src={src} is out of range for axis 'tp'"):
        per_device(lambda v: spmd.broadcast_tensor_dict({"only": "plain values"}, src=src) and v, x)
    with pytest.raises(
        ValueError, match=rf"broadcast_tensor_dict: src={src} is out of range for the tp group of size 4"
    ):
        spmd.broadcast_tensor_dict({"a": 1}, src=src)


def test_src_must_be_an_int():
    init((2, 1, 1, 4))
    with pytest.raises(TypeError, match=r"expected an int src, got 1.0"):
        per_device(lambda v: spmd.broadcast(v, "tp", src=1.0), np.ones((8, 2), np.float32))
    with pytest.raises(TypeError, match=r"expected an int offset, got 'next'"):
        per_device(lambda v: spmd.shift(v, "tp", offset="next"), np.ones((8, 2), np.float32))


def test_broadcast_tensor_dict_none_inside_shard_map():
    init((2, 1, 1, 4))
    with pytest.raises(ValueError, match=r"got tensor_dict=None inside shard_map.*same-structured dict"):
        per_device(lambda v: spmd.broadcast_tensor_dict(None) or v, np.ones((8, 2), np.float32))


def test_sum_of_booleans_is_refused():
    init((2, 1, 1, 4))
    with pytest.raises(TypeError, match=r"all_reduce: cannot sum a boolean array .*astype\(jnp.int32\)"):
        per_device(lambda v: spmd.all_reduce(v, "tp"), np.ones((8, 2), bool))
    with pytest.raises(TypeError, match=r"reduce_scatter: cannot sum a boolean array"):
        per_device(lambda v: spmd.reduce_scatter(v, "tp", axis=0), np.ones((8, 4), bool))


def test_communicator_world_size_must_be_positive():
    with pytest.raises(ValueError, match=r"XlaCommunicator: expected a positive int world_size, got 0"):
        spmd.XlaCommunicator("tp", 0, platform="cpu")


def test_mesh_shape_of_an_unresolved_config():
    with pytest.raises(ValueError, match=r"call resolve\(num_devices\) first"):
        _ = spmd.ParallelConfig(2).mesh_shape


def test_one_cpu_device_error_says_how_to_simulate_devices():
    """A fresh CPU machine has one device: the error names JAX_NUM_CPU_DEVICES (the README's fix)."""
    with pytest.raises(ValueError, match=r"tp \* pp \* ep = 4 does not divide 1.*JAX_NUM_CPU_DEVICES=8"):
        spmd.initialize_model_parallel(tensor_model_parallel_size=4, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"does not divide 8") as e:
        spmd.initialize_model_parallel(tensor_model_parallel_size=3)
    assert "JAX_NUM_CPU_DEVICES" not in str(e.value)  # 8 devices: the hint would mislead


def test_package_metadata_uses_an_spdx_license():
    import tomllib

    meta = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"  # a table here is deprecated by setuptools
