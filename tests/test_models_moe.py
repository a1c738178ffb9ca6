"""The MoE block and the model-level wrapper, against references written in numpy.

The references share no code with ``models.moe``: softmax, top-k, renormalisation and the SwiGLU
experts are numpy here, so dropping the renormalisation, swapping gate and up, or picking the
wrong expert fails a test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import models.moe
import spmd
from models.moe import MoEBlock, apply_experts, moe_forward, moe_token_spec, route, shard_moe_block
from models.sharding import ShardedModule, partitioned, shard_module, shard_state
from spmd.expert_parallel import ExpertTokens, get_all2all_manager

MANAGER_NAMES = ["naive", "capacity", "ragged", "low_latency"]
# (dp, ep, tp)
MESHES = [(2, 2, 2), (1, 4, 2), (1, 8, 1)]
MESH_IDS = [f"dp{d}ep{e}tp{t}" for d, e, t in MESHES]


def _init(dp: int, ep: int, tp: int) -> None:
    spmd.initialize_model_parallel(tensor_model_parallel_size=tp, data_parallel_size=dp, expert_model_parallel_size=ep)


# numpy references ------------------------------------------------------------------------------


def np_route(x, w_router, k):
    """Softmax, top-k (highest first), renormalised weights; also the margin to the (k+1)-th choice."""
    logits = x.astype(np.float64) @ w_router.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    ranked = -np.sort(-p, axis=1)
    margin = ranked[:, k - 1] - ranked[:, k] if k < p.shape[1] else np.full(len(p), np.inf)
    return w / w.sum(1, keepdims=True), ids, margin


def np_swiglu(x, w_gate, w_up, w_down):
    """One expert: ``silu(x @ w_gate) * (x @ w_up) @ w_down`` in float64."""
    g = x @ w_gate
    return (g / (1.0 + np.exp(-g)) * (x @ w_up)) @ w_down


def np_moe(x, w_router, w_gate, w_up, w_down, k):
    """``(y float64[T, H], routing margin float64[T])``: each token through its top-k experts."""
    f = [np.asarray(a, dtype=np.float64) for a in (x, w_gate, w_up, w_down)]
    w, ids, margin = np_route(np.asarray(x, np.float64), np.asarray(w_router, np.float64), k)
    y = np.zeros(f[0].shape)
    for t in range(len(y)):
        for j in range(k):
            e = ids[t, j]
            y[t] += w[t, j] * np_swiglu(f[0][t], f[1][e], f[2][e], f[3][e])
    return y, margin


def _weights(block):
    return [np.asarray(v[...]).astype(np.float32) for v in (block.w_router, block.w_gate, block.w_up, block.w_down)]


def _assert_close(y, ref, margin, tol):
    """Compare tokens whose routing is unambiguous (a near-tie may rank differently in float32)."""
    sure = margin > 1e-4
    assert sure.mean() > 0.9
    np.testing.assert_allclose(np.asarray(y, np.float64)[sure], ref[sure], rtol=tol, atol=tol)


def _block(rng, name, *, hidden=16, ffn=32, e=8, k=2, dtype=jnp.float32, **kwargs):
    if name == "capacity":
        kwargs.setdefault("capacity_factor", 16.0)  # enough: nothing dropped
    return MoEBlock(hidden, ffn, e, k, manager=name, dtype=dtype, rngs=nnx.Rngs(int(rng.integers(1 << 30))), **kwargs)


# route / apply_experts ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_matches_numpy(k, rng):
    x = rng.standard_normal((40, 16)).astype(np.float32)
    w_router = rng.standard_normal((16, 8)).astype(np.float32)
    weights, ids = route(jnp.asarray(x), jnp.asarray(w_router), k)
    ref_w, ref_ids, margin = np_route(x, w_router, k)
    sure = margin > 1e-4
    np.testing.assert_array_equal(np.asarray(ids)[sure], ref_ids[sure])
    np.testing.assert_allclose(np.asarray(weights)[sure], ref_w[sure], rtol=1e-5, atol=1e-6)
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32


def test_route_errors():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 4))
    for k in (0, 5, True):
        with pytest.raises(ValueError, match=rf"expected top_k between 1 and the number of experts 4, got {k!r}"):
            route(x, w, k)
    with pytest.raises(ValueError, match=r"expected x: \[tokens, hidden\] and w_router.*got \(4, 8\) and \(4, 4\)"):
        route(x, jnp.ones((4, 4)), 1)


def test_apply_experts_on_both_layouts_matches_numpy(rng):
    e_local, c, h, f = 3, 4, 8, 16
    w_gate, w_up = rng.standard_normal((2, e_local, h, f)).astype(np.float32) / 3
    w_down = rng.standard_normal((e_local, f, h)).astype(np.float32) / 4
    padded = rng.standard_normal((e_local, c, h)).astype(np.float32)
    out = np.asarray(apply_experts(ExpertTokens(jnp.asarray(padded)), w_gate, w_up, w_down).tokens)
    for e in range(e_local):
        np.testing.assert_allclose(out[e], np_swiglu(padded[e], w_gate[e], w_up[e], w_down[e]), rtol=1e-4, atol=1e-5)

    sizes = np.array([2, 0, 3], np.int32)  # expert 1 gets nothing; 2 rows of padding at the end
    rows = rng.standard_normal((7, h)).astype(np.float32)
    out = apply_experts(ExpertTokens(jnp.asarray(rows), jnp.asarray(sizes)), w_gate, w_up, w_down)
    assert out.is_ragged
    out = np.asarray(out.tokens)
    start = 0
    for e, n in enumerate(sizes):
        ref = np_swiglu(rows[start : start + n], w_gate[e], w_up[e], w_down[e])
        np.testing.assert_allclose(out[start : start + n], ref, rtol=1e-4, atol=1e-5)
        start += n


# the block through the wrapper ---------------------------------------------------------------------


def _grid(meshes, ids):
    """Every manager on every mesh; the fast lane runs each manager once and each mesh at least once, the rest slow."""
    return [
        pytest.param(name, mesh, id=f"{name}-{mid}", marks=() if j == i % len(meshes) else pytest.mark.slow)
        for i, name in enumerate(MANAGER_NAMES)
        for j, (mesh, mid) in enumerate(zip(meshes, ids, strict=True))
    ]


@pytest.mark.parametrize(("name", "mesh"), _grid(MESHES, MESH_IDS))
def test_sharded_block_matches_numpy(mesh, name, rng):
    _init(*mesh)
    block = _block(rng, name)
    x = rng.standard_normal((8 * 4, 16)).astype(np.float32)
    moe = shard_moe_block(block)
    y, dropped = moe(x)
    ref, margin = np_moe(x, *_weights(block), k=2)
    _assert_close(y, ref, margin, 2e-4)
    assert dropped.shape == (8,) and not np.asarray(dropped).any()


@pytest.mark.parametrize(("name", "mesh"), _grid([(2, 2, 2), (1, 2, 4)], ["dp2ep2tp2", "dp1ep2tp4"]))
def test_sharded_block_sequence_parallel_matches_numpy(mesh, name, rng):
    _init(*mesh)
    block = _block(rng, name, k=3)
    x = rng.standard_normal((8 * 3, 16)).astype(np.float32)
    y, dropped = shard_moe_block(block, is_sequence_parallel=True)(x)
    ref, margin = np_moe(x, *_weights(block), k=3)
    _assert_close(y, ref, margin, 2e-4)
    assert not np.asarray(dropped).any()


def test_sharded_block_bf16(rng):
    _init(1, 4, 2)
    block = _block(rng, "ragged", dtype=jnp.bfloat16)
    x = rng.standard_normal((32, 16)).astype(ml_dtypes.bfloat16)
    y, _ = shard_moe_block(block)(x)
    assert y.dtype == jnp.bfloat16
    ref, margin = np_moe(x.astype(np.float32), *_weights(block), k=2)
    _assert_close(np.asarray(y).astype(np.float32), ref, margin, 5e-2)


def test_capacity_block_reports_exact_drops(rng):
    dp, ep, tp = 1, 4, 2
    _init(dp, ep, tp)
    block = _block(rng, "capacity", expert_capacity=1)
    t_local = 6
    for _ in range(100):  # data whose top-2 choice has no near-tie (float32 and numpy would then agree)
        x = rng.standard_normal((ep * t_local, 16)).astype(np.float32)
        _, ids, margin = np_route(x, _weights(block)[0], 2)
        if (margin > 1e-4).all():
            break
    assert (margin > 1e-4).all()
    _, dropped = shard_moe_block(block)(x)
    expected = []
    for r in range(ep):  # each EP rank's tokens; its TP ranks see the same tokens and drops
        counts = np.bincount(ids[r * t_local : (r + 1) * t_local].ravel(), minlength=8)
        expected += [np.maximum(counts - 1, 0).sum()] * tp
    np.testing.assert_array_equal(np.asarray(dropped), expected)
    assert sum(expected) > 0


def test_wrapper_traces_once(rng, monkeypatch):
    _init(2, 2, 2)
    traces = []

    def counting_forward(*args, **kwargs):
        traces.append(1)
        return moe_forward(*args, **kwargs)

    monkeypatch.setattr(models.moe, "moe_forward", counting_forward)
    moe = shard_moe_block(_block(rng, "ragged"))
    for _ in range(3):
        y, _ = moe(rng.standard_normal((32, 16)).astype(np.float32))
    y.block_until_ready()
    assert len(traces) == 1


def test_state_is_placed_by_parameter_metadata(rng):
    _init(2, 2, 2)
    moe = shard_moe_block(_block(rng, "naive"))
    assert isinstance(moe, ShardedModule)
    assert moe.state_specs["w_gate"].get_value() == P("ep", None, "tp")
    assert moe.state_specs["w_down"].get_value() == P("ep", "tp", None)
    assert moe.state["w_gate"][...].sharding.spec == P("ep", None, "tp")
    assert moe.state["w_gate"][...].addressable_shards[0].data.shape == (4, 16, 16)  # 8 experts / 2, 32 ffn / 2
    assert moe.state["w_router"][...].sharding.is_fully_replicated


# the block inside a caller's own shard_map ---------------------------------------------------------


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_block_called_inside_users_shard_map(name, rng):
    """A merged, sharded module and the functional API with per-device weight shards."""
    _init(2, 2, 2)
    block = _block(rng, name)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    ref, margin = np_moe(x, *_weights(block), k=2)
    tokens = moe_token_spec()

    graphdef, state = nnx.split(block)
    state, specs = shard_state(state)

    def merged(state, x):
        y, dropped = nnx.merge(graphdef, state)(x)
        return y * 2.0, dropped  # the caller's own math around the layer

    f = jax.jit(spmd.shard_map(merged, in_specs=(specs, tokens), out_specs=(tokens, P(spmd.MESH_AXES))))
    _assert_close(np.asarray(f(state, x)[0]) / 2.0, ref, margin, 2e-4)

    def functional(x, wr, wg, wu, wd):
        return moe_forward(x, wr, wg, wu, wd, manager=block.manager, top_k=2)[0]

    expert = P("ep", None, "tp")
    g = jax.jit(
        spmd.shard_map(
            functional, in_specs=(tokens, P(), expert, expert, P("ep", "tp", None)), out_specs=tokens, check_vma=False
        )
    )
    _assert_close(g(x, *_weights(block)), ref, margin, 2e-4)


# the wrapper is general ---------------------------------------------------------------------------


class _ColumnLinear(nnx.Module):
    """A column-parallel linear layer: per-device ``x @ w[:, my columns] + b[my columns]``, scaled."""

    def __init__(self, d_in, d_out, rngs):
        self.w = nnx.Param(partitioned(nnx.initializers.normal(1.0), (None, "tp"))(rngs.params(), (d_in, d_out)))
        self.b = nnx.Param(jax.random.normal(rngs.params(), (d_out,)))  # no metadata: replicated

    def __call__(self, x, *, scale=1.0):
        cols = self.w.shape[1]  # this TP rank's columns
        b = jax.lax.dynamic_slice_in_dim(self.b[...], spmd.axis_index("tp") * cols, cols)
        return scale * (x @ self.w[...] + b)


def test_shard_module_on_another_layer(rng):
    _init(2, 1, 4)
    layer = _ColumnLinear(8, 16, nnx.Rngs(int(rng.integers(1 << 30))))
    x = rng.standard_normal((6, 8)).astype(np.float32)
    f = shard_module(layer, in_specs=P(), out_specs=P(None, "tp"), call_kwargs={"scale": 3.0})
    ref = 3.0 * (x.astype(np.float64) @ np.asarray(layer.w[...]) + np.asarray(layer.b[...]))
    np.testing.assert_allclose(np.asarray(f(x)), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f.module.w[...]), np.asarray(layer.w[...]))


# errors --------------------------------------------------------------------------------------------


def test_block_construction_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="expected top_k between 1 and num_experts=8, got 9"):
        MoEBlock(8, 8, 8, 9, rngs=rngs)
    with pytest.raises(ValueError, match="expected top_k between 1 and num_experts=8, got True"):
        MoEBlock(8, 8, 8, True, rngs=rngs)
    with pytest.raises(ValueError, match="expected a positive int hidden, got 0"):
        MoEBlock(0, 8, 8, 2, rngs=rngs)
    with pytest.raises(ValueError, match=r"expected a positive int num_experts, got 2\.0"):
        MoEBlock(8, 8, 2.0, 2, rngs=rngs)
    with pytest.raises(ValueError, match="unknown manager 'deepep'"):
        MoEBlock(8, 8, 8, 2, manager="deepep", rngs=rngs)
    with pytest.raises(ValueError, match="expected a manager for num_experts=8, got one for 4"):
        MoEBlock(8, 8, 8, 2, manager=get_all2all_manager("naive", 4), rngs=rngs)
    with pytest.raises(ValueError, match=r"manager options \['expert_capacity'\] need a manager name"):
        MoEBlock(8, 8, 8, 2, manager=get_all2all_manager("naive", 8), expert_capacity=2, rngs=rngs)
    with pytest.raises(ValueError, match="expected a positive int expert_capacity, got True"):
        MoEBlock(8, 8, 8, 2, manager="capacity", expert_capacity=True, rngs=rngs)


def test_wrapper_errors(rng):
    _init(1, 4, 2)
    with pytest.raises(
        ValueError,
        match=r"cannot be sharded .*expected dimension 0 \(6\) to be divisible by the 4 devices of \('ep',\)",
    ):
        shard_moe_block(MoEBlock(8, 8, 6, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(
        ValueError,
        match=r"w_down of shape \(8, 3, 8\) .*dimension 1 \(3\) to be divisible by the 2 devices of \('tp',\)",
    ):
        shard_moe_block(MoEBlock(8, 3, 8, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="expected a MoEBlock, got _ColumnLinear"):
        shard_moe_block(_ColumnLinear(4, 4, nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"expected an nnx\.Module, got function"):
        shard_module(lambda x: x, in_specs=P(), out_specs=P())
    moe = shard_moe_block(MoEBlock(8, 8, 8, 2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"expected 1 positional argument\(s\), one per in_specs entry, got 2"):
        moe(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32))

    class Bad(nnx.Module):
        def __init__(self, spec):
            self.w = nnx.Param(partitioned(nnx.initializers.ones, spec)(jax.random.key(0), (4, 4)))

    with pytest.raises(
        ValueError, match=r"sharded over 'xp'; expected one of the mesh axes \('dp', 'pp', 'ep', 'tp'\)"
    ):
        shard_module(Bad(("xp", None)), in_specs=P(), out_specs=P())
    with pytest.raises(ValueError, match=r"has a partition spec .* with 3 entries; expected at most 2"):
        shard_module(Bad(("ep", None, None)), in_specs=P(), out_specs=P())


def test_block_call_outside_shard_map_names_the_fix(rng):
    _init(1, 4, 2)
    block = _block(rng, "ragged")
    with pytest.raises(spmd.UnboundAxisError, match=r"unbound axis name: 'ep'.*spmd\.shard_map"):
        block(jnp.ones((8, 16)))
