"""Collectives against dense single-device references, on every mesh shape, dtype and dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPES, MESH_IDS, MESH_SHAPES, groups, init, per_device, random_array, tolerance
from jax.sharding import PartitionSpec as P

import spmd

LOCAL_SHAPE = (8, 16, 8)  # every dim divisible by 8, the largest group
DIMS = [0, 1, -1]
# The groups a test reduces over: vLLM's TP group, the EP group, DP, and the world group.
GROUP_AXES = {"tp": ("tp",), "ep": ("ep",), "dp": ("dp",), "world": spmd.MESH_AXES}


def _axis_name(axes):
    return axes if len(axes) > 1 else axes[0]


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("group", ["tp", "world"])
def test_all_reduce(shape, dtype, group, rng):
    init(shape)
    axes = GROUP_AXES[group]
    x = random_array(rng, (8, *LOCAL_SHAPE), dtype)
    out = per_device(lambda v: spmd.all_reduce(v, _axis_name(axes)), x)
    assert out.dtype == np.dtype(dtype)
    for g in groups(shape, axes):
        ref = x[g].astype(np.float64).sum(0)
        for r in g:
            np.testing.assert_allclose(out[r].astype(np.float64), ref, **tolerance(dtype, len(g)))
            np.testing.assert_array_equal(out[r], out[g[0]])  # bitwise identical on every rank


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", DIMS)
def test_all_gather(shape, dtype, dim, rng):
    init(shape)
    x = random_array(rng, (8, *LOCAL_SHAPE), dtype)
    out = per_device(lambda v: spmd.all_gather(v, "tp", axis=dim), x)
    for g in groups(shape, ("tp",)):
        ref = np.concatenate([x[r] for r in g], axis=dim)
        for r in g:
            np.testing.assert_array_equal(out[r], ref)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", DIMS)
def test_reduce_scatter(shape, dtype, dim, rng):
    init(shape)
    x = random_array(rng, (8, *LOCAL_SHAPE), dtype)
    out = per_device(lambda v: spmd.reduce_scatter(v, "tp", axis=dim), x)
    for g in groups(shape, ("tp",)):
        full = x[g].astype(np.float64).sum(0)
        pieces = np.split(full, len(g), axis=dim)
        for rank, r in enumerate(g):
            assert out[r].shape == pieces[rank].shape
            np.testing.assert_allclose(out[r].astype(np.float64), pieces[rank], **tolerance(dtype, len(g)))


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("split_axis,concat_axis", [(0, 0), (0, -1), (2, 1)])
@pytest.mark.parametrize("group", ["tp", "ep"])
def test_all_to_all(shape, split_axis, concat_axis, group, rng):
    init(shape)
    axes = GROUP_AXES[group]
    x = random_array(rng, (8, *LOCAL_SHAPE), np.float32)
    out = per_device(lambda v: spmd.all_to_all(v, axes[0], split_axis=split_axis, concat_axis=concat_axis), x)
    for g in groups(shape, axes):
        n = len(g)
        for rank, r in enumerate(g):
            blocks = [np.split(x[s], n, axis=split_axis)[rank] for s in g]
            np.testing.assert_array_equal(out[r], np.concatenate(blocks, axis=concat_axis))


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16, np.int32, np.int8, np.bool_], ids=["f32", "bf16", "i32", "i8", "bool"]
)
def test_broadcast_is_bitwise(shape, dtype, rng):
    init(shape)
    tp = shape[3]
    src = int(rng.integers(tp))
    if dtype == np.bool_:
        x = rng.random((8, 5, 3)) > 0.5
    else:
        x = random_array(rng, (8, 5, 3), dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype == jnp.bfloat16:
        # Values a sum would not keep: -0.0, NaN, inf.
        x[:, 0, 0] = -0.0
        x[:, 0, 1] = np.nan
        x[:, 0, 2] = -np.inf
    out = per_device(lambda v: spmd.broadcast(v, "tp", src=src), x)
    for g in groups(shape, ("tp",)):
        for r in g:
            np.testing.assert_array_equal(out[r].view(np.uint8), x[g[src]].view(np.uint8))


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 1, 2, 2), (4, 1, 1, 2)], ids=str)
@pytest.mark.parametrize("dim", DIMS)
def test_gather_to_dst(shape, dim, rng):
    init(shape)
    tp = shape[3]
    dst = tp - 1
    x = random_array(rng, (8, *LOCAL_SHAPE), np.float32)
    out = per_device(lambda v: spmd.gather(v, "tp", dst=dst, axis=dim), x)
    for g in groups(shape, ("tp",)):
        ref = np.concatenate([x[r] for r in g], axis=dim)
        for rank, r in enumerate(g):
            np.testing.assert_array_equal(out[r], ref if rank == dst else np.zeros_like(ref))


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("offset", [1, -1, 3])
@pytest.mark.parametrize("wrap", [True, False])
def test_shift(shape, offset, wrap, rng):
    init(shape)
    x = random_array(rng, (8, 4, 3), np.float32)
    out = per_device(lambda v: spmd.shift(v, "tp", offset=offset, wrap=wrap), x)
    for g in groups(shape, ("tp",)):
        n = len(g)
        for rank, r in enumerate(g):
            src = rank - offset
            if wrap:
                np.testing.assert_array_equal(out[r], x[g[src % n]])
            elif 0 <= src < n:
                np.testing.assert_array_equal(out[r], x[g[src]])
            else:
                np.testing.assert_array_equal(out[r], np.zeros_like(x[r]))


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (1, 1, 1, 8)], ids=str)
def test_size_one_axis_returns_input_untouched(shape, rng):
    init(shape)
    x = random_array(rng, (8, 4, 8), np.float32)
    ops = {
        "all_reduce": lambda v: spmd.all_reduce(v, "pp"),
        "all_gather": lambda v: spmd.all_gather(v, "pp", axis=0),
        "reduce_scatter": lambda v: spmd.reduce_scatter(v, "pp", axis=0),
        "all_to_all": lambda v: spmd.all_to_all(v, "pp"),
        "broadcast": lambda v: spmd.broadcast(v, "pp"),
        "gather": lambda v: spmd.gather(v, "pp", axis=0),
        "shift": lambda v: spmd.shift(v, "pp"),
    }
    for name, op in ops.items():
        # A replicated input: no collective at all.
        jaxpr = str(jax.make_jaxpr(spmd.shard_map(op, in_specs=P(), out_specs=P()))(x))
        for prim in ("psum", "all_gather", "reduce_scatter", "all_to_all", "ppermute"):
            assert prim not in jaxpr, f"{name} emitted {prim} for a size-1 axis"
        np.testing.assert_array_equal(per_device(op, x), x)


def test_size_one_reduction_is_typed_invariant(rng):
    """tp=1 must accept the same out_specs as tp>1: an all-reduced value is replicated over tp."""
    init((8, 1, 1, 1))
    x = random_array(rng, (6, 4), np.float32)
    f = jax.jit(
        spmd.shard_map(
            lambda v: (spmd.all_reduce(v, "tp"), spmd.broadcast(v, "tp")),
            in_specs=P(None, "tp"),
            out_specs=(P(), P()),
        )
    )
    ar, bc = f(x)
    np.testing.assert_array_equal(ar, x)
    np.testing.assert_array_equal(bc, x)


def test_pytree_inputs(rng):
    init((2, 1, 1, 4))
    tree = {
        "a": random_array(rng, (8, 4, 8), np.float32),
        "b": [random_array(rng, (8, 8), jnp.bfloat16), random_array(rng, (8, 12), np.int32)],
    }
    out = per_device(lambda t: spmd.all_reduce(t, "tp"), tree)
    gathered = per_device(lambda t: spmd.all_gather(t, "tp", axis=0), tree)
    for g in groups((2, 1, 1, 4), ("tp",)):
        for r in g:
            np.testing.assert_allclose(out["a"][r], tree["a"][g].sum(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(out["b"][1][r], tree["b"][1][g].sum(0))
            np.testing.assert_array_equal(gathered["b"][0][r], np.concatenate(tree["b"][0][g], 0))


@pytest.mark.parametrize("shape", [(2, 1, 1, 4), (8, 1, 1, 1), (1, 1, 2, 4)], ids=str)
def test_all_gather_is_typed_invariant_under_check_vma(shape, rng):
    """An all-gathered value is the same on every rank: ``out_specs=P()`` accepts it with check_vma=True."""
    init(shape)
    tp = shape[3]
    x = random_array(rng, (4, 3 * tp), np.float32)
    f = jax.jit(
        spmd.shard_map(
            lambda v: (spmd.tensor_model_parallel_all_gather(v, dim=-1), spmd.all_gather(v, "tp", axis=0)),
            in_specs=P(None, "tp"),
            out_specs=(P(), P()),
        )
    )
    full, stacked = f(x)
    np.testing.assert_array_equal(np.asarray(full), x)
    np.testing.assert_array_equal(np.asarray(stacked), np.concatenate(np.split(x, tp, axis=1), axis=0))
    # The transpose of an invariant gather is this rank's slice: d/dx sum(w * gather(x)) = w.
    w = random_array(rng, (4, 3 * tp), np.float32)
    g = jax.grad(lambda v: (f(v)[0] * w).sum())(x)
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6)
