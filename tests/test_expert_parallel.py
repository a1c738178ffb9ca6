"""Expert parallelism: every manager against a dense single-device numpy reference.

The experts here are stand-ins (expert ``e`` scales its tokens by ``e + 1``), so a token sent to the
wrong expert, a row landing in the wrong place, or a weight applied twice shows in the result.
The MoE block itself is tested in ``test_models_moe.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import spmd
from spmd.expert_parallel import (
    CapacityAll2AllManager,
    CapacityRoutingState,
    ExpertInputs,
    ExpertTokens,
    LowLatencyRoutingState,
    NaiveAll2AllManager,
    NaiveRoutingState,
    RaggedAll2AllManager,
    RaggedRoutingState,
    get_all2all_manager,
)

MANAGER_NAMES = ["naive", "capacity", "ragged", "low_latency"]
# (dp, pp, ep, tp): ep in 1, 2, 4, 8, with and without tp
EP_MESHES = [(8, 1, 1, 1), (1, 1, 2, 4), (2, 1, 4, 1), (1, 1, 4, 2), (1, 1, 8, 1)]
EP_IDS = [f"ep{e}tp{t}dp{d}" for d, _, e, t in EP_MESHES]
TOKENS = P(("dp", "ep"))  # tokens split over dp and ep, replicated over tp


def _init(shape):
    d, p, e, t = shape
    spmd.initialize_model_parallel(t, p, d, e)


def _scale_experts(inputs: ExpertTokens, manager, tp: int) -> ExpertTokens:
    """Expert e maps x -> x * (e + 1) / tp (a partial sum over tp, as a TP-sharded expert's output is)."""
    e_local = manager.local_experts()
    first = spmd.axis_index("ep") * e_local
    x = inputs.tokens.astype(jnp.float32)
    if inputs.is_ragged:
        ends = jnp.cumsum(inputs.group_sizes)
        local = jnp.sum(jnp.arange(x.shape[0])[:, None] >= ends[None, :], axis=1)
        scale = (first + local + 1).astype(jnp.float32)[:, None]
    else:
        scale = (first + jnp.arange(e_local) + 1).astype(jnp.float32)[:, None, None]
    return inputs.with_tokens((x * scale / tp).astype(inputs.tokens.dtype))


def _route_and_combine(shape, manager, x, w, ids, *, sp=False):
    tp = shape[3]
    spec = P(("dp", "ep", "tp")) if sp else TOKENS

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids, is_sequence_parallel=sp)
        y = manager.combine(_scale_experts(inputs, manager, tp), state)
        return y, state.num_dropped[None]

    f = jax.jit(spmd.shard_map(body, in_specs=(spec, spec, spec), out_specs=(spec, P(spmd.MESH_AXES)), check_vma=False))
    y, dropped = f(x, w, ids)
    return np.asarray(y).astype(np.float64), np.asarray(dropped)


def _expected(x, w, ids, kept=None):
    scale = (ids + 1).astype(np.float64)
    contrib = w.astype(np.float64)[:, :, None] * scale[:, :, None] * x.astype(np.float64)[:, None, :]
    if kept is not None:
        contrib = contrib * kept[:, :, None]
    return contrib.sum(1)


def _random_routing(rng, t, e, k):
    ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).astype(np.int32)
    w = rng.random((t, k)).astype(np.float32) + 0.1
    return w / w.sum(1, keepdims=True), ids


# float32 on every mesh; bfloat16 (the same routing, another payload dtype) on EP 4 x TP 2 in the fast lane and
# on the other meshes under slow.
ROUTING_CASES = [pytest.param(np.float32, m, id=f"f32-{i}") for m, i in zip(EP_MESHES, EP_IDS, strict=True)] + [
    pytest.param(ml_dtypes.bfloat16, m, id=f"bf16-{i}", marks=() if m == (1, 1, 4, 2) else pytest.mark.slow)
    for m, i in zip(EP_MESHES, EP_IDS, strict=True)
]


@pytest.mark.parametrize("name", MANAGER_NAMES)
@pytest.mark.parametrize(("dtype", "shape"), ROUTING_CASES)
def test_routing_matches_reference(shape, name, dtype, rng):
    _init(shape)
    groups = shape[0] * shape[2]
    t_local, h, e, k = 6, 16, 16, 2
    t = groups * t_local
    x = rng.standard_normal((t, h)).astype(np.float32).astype(dtype)
    w, ids = _random_routing(rng, t, e, k)
    kwargs = {"expert_capacity": t_local * k} if name == "capacity" else {}  # enough: nothing dropped
    y, dropped = _route_and_combine(shape, get_all2all_manager(name, e, **kwargs), x, w, ids)
    tol = 3e-2 if dtype != np.float32 else 1e-5
    np.testing.assert_allclose(y, _expected(x, w, ids), rtol=tol, atol=tol)
    assert (dropped == 0).all()


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_uneven_routing_all_to_one_expert_and_idle_experts(name, rng):
    shape = (1, 1, 4, 2)
    _init(shape)
    t, h, e = 4 * 5, 8, 8
    x = rng.standard_normal((t, h)).astype(np.float32)
    ids = np.full((t, 2), 5, np.int32)
    ids[:, 1] = 6  # experts 5 and 6 get everything; experts 0-4 and 7 get nothing
    w = np.full((t, 2), 0.5, np.float32)
    kwargs = {"expert_capacity": 5} if name == "capacity" else {}
    y, dropped = _route_and_combine(shape, get_all2all_manager(name, e, **kwargs), x, w, ids)
    np.testing.assert_allclose(y, _expected(x, w, ids), rtol=1e-5, atol=1e-5)
    assert (dropped == 0).all()


@pytest.mark.parametrize("capacity", [1, 3, 5])
def test_capacity_drops_are_exact(capacity, rng):
    shape = (1, 1, 4, 2)
    _init(shape)
    t_local, h, e = 5, 8, 8
    t = 4 * t_local
    x = rng.standard_normal((t, h)).astype(np.float32)
    ids = np.zeros((t, 1), np.int32)  # every slot to expert 0
    w = np.ones((t, 1), np.float32)
    y, dropped = _route_and_combine(shape, CapacityAll2AllManager(e, expert_capacity=capacity), x, w, ids)
    # first `capacity` tokens of each EP rank (in token order) kept, the rest dropped
    kept = (np.arange(t) % t_local < capacity).astype(np.float64)[:, None]
    np.testing.assert_allclose(y, _expected(x, w, ids, kept), rtol=1e-5, atol=1e-5)
    per_device = dropped.reshape(1, 1, 4, 2)
    assert (per_device == t_local - min(capacity, t_local)).all()


def test_out_of_range_ids_inside_jit_are_dropped_and_counted(rng):
    shape = (1, 1, 4, 2)
    _init(shape)
    t, h, e = 8, 8, 8
    x = rng.standard_normal((t, h)).astype(np.float32)
    ids = np.array([[0, 1], [2, 99], [-1, 3], [4, 5]] * 2, np.int32)
    w = np.full((t, 2), 0.5, np.float32)
    valid = ((ids >= 0) & (ids < e)).astype(np.float64)
    for name in MANAGER_NAMES:
        y, dropped = _route_and_combine(shape, get_all2all_manager(name, e), x, w, ids)
        np.testing.assert_allclose(y, _expected(x, w, np.clip(ids, 0, e - 1), valid), rtol=1e-5, atol=1e-5)
        assert dropped.reshape(4, 2)[:, 0].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_sequence_parallel_input(name, rng):
    shape = (1, 1, 2, 4)
    _init(shape)
    t, h, e, k = 8 * 3, 8, 4, 2
    x = rng.standard_normal((t, h)).astype(np.float32)
    w, ids = _random_routing(rng, t, e, k)
    kwargs = {"expert_capacity": 3 * 4 * k} if name == "capacity" else {}
    y, dropped = _route_and_combine(shape, get_all2all_manager(name, e, **kwargs), x, w, ids, sp=True)
    np.testing.assert_allclose(y, _expected(x, w, ids), rtol=1e-5, atol=1e-5)
    assert (dropped == 0).all()


def test_ragged_collective_emulation_matches_dense_all_to_all(rng):
    """The CPU fallback of ragged_all_to_all has ragged_all_to_all's semantics."""
    spmd.initialize_model_parallel(1, 1, 2, 4)
    n, rows, h = 4, 8, 3
    sizes = rng.integers(0, 3, size=(n, n)).astype(np.int32)  # sizes[src, dst] <= 2, so a src sends <= rows
    x = rng.standard_normal((2, n, rows, h)).astype(np.float32)

    def body(x, sizes):
        me = spmd.axis_index("ep")
        send = sizes[0][me]
        in_off = jnp.cumsum(send) - send
        before = (jnp.arange(n) < me).astype(jnp.int32)
        out_off = (before[:, None] * sizes[0]).sum(0)
        recv = sizes[0][:, me]
        out = spmd.expert_parallel.ragged_all_to_all_dense(
            x[0, 0], jnp.zeros((n * rows, h), x.dtype), in_off, send, out_off, recv, axis_name="ep"
        )
        return out[None, None]

    spec = P("dp", "ep")
    f = jax.jit(spmd.shard_map(body, in_specs=(spec, P()), out_specs=spec, check_vma=False))
    out = np.asarray(f(x, sizes[None]))
    for dst in range(n):
        expect = np.concatenate([x[0, s, sum(sizes[s, :dst]) : sum(sizes[s, : dst + 1])] for s in range(n)])
        np.testing.assert_array_equal(out[0, dst, : len(expect)], expect)
        assert not out[0, dst, len(expect) :].any()


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_seed_scatter_combine_roundtrip(name, rng):
    shape = (1, 1, 4, 2)
    _init(shape)
    e, c, h = 8, 3, 4
    x = rng.standard_normal((4, e, c, h)).astype(np.float32)  # per EP rank: [E, C, H] buckets
    manager = get_all2all_manager(name, e)

    def body(b):
        sent = manager.scatter(b[0], c)
        return sent[None], manager.combine(sent)[None]

    spec = P("ep")
    sent, back = jax.jit(spmd.shard_map(body, in_specs=spec, out_specs=(spec, spec), check_vma=False))(x)
    sent, back = np.asarray(sent), np.asarray(back)
    for r in range(4):
        for le in range(2):  # rank r's local expert le is global expert 2r + le
            np.testing.assert_array_equal(sent[r, le], np.concatenate([x[s, 2 * r + le] for s in range(4)]))
    np.testing.assert_array_equal(back, x)  # combine undoes scatter


# Errors -----------------------------------------------------------------------------------------


def _dispatch(manager, x, w, ids, shape=(1, 1, 4, 2)):
    _init(shape)
    spec = TOKENS
    f = spmd.shard_map(
        lambda x, w, ids: manager.dispatch(x, w, ids)[0].tokens,
        in_specs=(spec, spec, spec),
        out_specs=spec,
        check_vma=False,
    )
    return f(x, w, ids)


@pytest.mark.parametrize(
    "ids,w,x,match,exc",
    [
        (
            np.zeros((8, 9), np.int32),
            np.ones((8, 9), np.float32),
            np.ones((8, 4), np.float32),
            "top-k 9 is larger than the number of experts 8",
            ValueError,
        ),
        (
            np.zeros((8, 2), np.int32),
            np.ones((8, 3), np.float32),
            np.ones((8, 4), np.float32),
            r"topk_weights has shape \(2, 3\) but topk_ids has \(2, 2\)",
            ValueError,
        ),
        (
            np.zeros((8, 2), np.float32),
            np.ones((8, 2), np.float32),
            np.ones((8, 4), np.float32),
            "expected integer topk_ids, got float32",
            TypeError,
        ),
        (
            np.zeros((8, 2), np.int32),
            np.ones((8, 2), np.int32),
            np.ones((8, 4), np.float32),
            "expected floating-point topk_weights, got int32",
            TypeError,
        ),
        (
            np.zeros((8, 2), np.int32),
            np.ones((8, 2), np.float32),
            np.ones((8, 4, 2), np.float32),
            r"expected hidden_states of shape \[tokens, hidden\]",
            ValueError,
        ),
    ],
)
def test_bad_routing_inputs(ids, w, x, match, exc):
    with pytest.raises(exc, match=match):
        _dispatch(RaggedAll2AllManager(8), x, w, ids)


def test_concrete_out_of_range_ids_raise():
    _init((1, 1, 4, 2))
    m = NaiveAll2AllManager(8)
    f = spmd.shard_map(
        lambda x: m._check_routing(x, jnp.ones((2, 1)), np.array([[0], [8]], np.int32)) or x,
        in_specs=P(),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\); got \[8\]"):
        f(np.ones((2, 4), np.float32))


def test_experts_not_divisible_by_ep():
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the EP size 4"):
        _dispatch(
            CapacityAll2AllManager(6),
            np.ones((8, 4), np.float32),
            np.ones((8, 1), np.float32),
            np.zeros((8, 1), np.int32),
        )


def test_manager_construction_errors():
    with pytest.raises(ValueError, match="unknown manager 'deepep'"):
        get_all2all_manager("deepep", 8)
    with pytest.raises(ValueError, match="expected a positive int num_experts, got 0"):
        NaiveAll2AllManager(0)
    with pytest.raises(ValueError, match="expected a positive int expert_capacity, got 0"):
        CapacityAll2AllManager(8, expert_capacity=0)
    with pytest.raises(ValueError, match="expected a positive int expert_capacity, got True"):
        CapacityAll2AllManager(8, expert_capacity=True)
    with pytest.raises(ValueError, match=r"expected a positive int expert_capacity, got 2\.0"):
        CapacityAll2AllManager(8, expert_capacity=2.0)
    for factor in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match=f"expected a positive finite capacity_factor, got {factor!r}"):
            CapacityAll2AllManager(8, capacity_factor=factor)
    with pytest.raises(ValueError, match="expected use_ragged_collective to be True, False or None, got 'yes'"):
        RaggedAll2AllManager(8, use_ragged_collective="yes")
    with pytest.raises(ValueError, match="expected a positive int num_experts, got True"):
        get_all2all_manager("ragged", True)


def test_scatter_shape_and_combine_state_errors():
    _init((1, 1, 4, 2))
    m = CapacityAll2AllManager(8)
    f = spmd.shard_map(lambda b: m.scatter(b, 3), in_specs=P(), out_specs=P(), check_vma=False)
    with pytest.raises(
        ValueError, match=r"expected input_ of shape \[num_experts=8, expert_capacity=3, hidden\], got \(8, 4, 2\)"
    ):
        f(np.ones((8, 4, 2), np.float32))
    with pytest.raises(TypeError, match=r"expected a CapacityRoutingState from dispatch \(or nothing\), got dict"):
        m.combine(jnp.ones((2, 3, 4)), {"not": "a state"})
    with pytest.raises(ValueError, match="expected a positive int expert_capacity, got True"):
        f = spmd.shard_map(lambda b: m.scatter(b, True), in_specs=P(), out_specs=P(), check_vma=False)
        f(np.ones((8, 1, 2), np.float32))


def test_combine_takes_only_its_own_routing_state(rng):
    _init((1, 1, 4, 2))
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w, ids = _random_routing(rng, 8, 8, 2)
    naive, ragged = NaiveAll2AllManager(8), RaggedAll2AllManager(8)

    def body(x, w, ids):
        inputs, state = naive.dispatch(x, w, ids)
        assert isinstance(state, NaiveRoutingState)
        return ragged.combine(inputs, state)

    f = spmd.shard_map(body, in_specs=(TOKENS,) * 3, out_specs=TOKENS, check_vma=False)
    with pytest.raises(
        TypeError, match="expected a RaggedRoutingState from this manager's dispatch, got NaiveRoutingState"
    ):
        f(x, w, ids)


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_routing_state_is_typed_per_manager(name, rng):
    _init((1, 1, 2, 4))
    x = rng.standard_normal((8, 4)).astype(np.float32)
    w, ids = _random_routing(rng, 8, 4, 2)
    manager = get_all2all_manager(name, 4)
    out = {}

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids, is_sequence_parallel=True)
        out["state"], out["inputs"] = state, inputs
        return manager.combine(inputs, state)

    spec = P(("dp", "ep", "tp"))
    jax.eval_shape(spmd.shard_map(body, in_specs=(spec,) * 3, out_specs=spec, check_vma=False), x, w, ids)
    expected = {
        "naive": NaiveRoutingState,
        "capacity": CapacityRoutingState,
        "ragged": RaggedRoutingState,
        "low_latency": LowLatencyRoutingState,
    }[name]
    assert type(out["state"]) is expected and out["state"].is_sequence_parallel
    assert isinstance(out["inputs"], ExpertTokens) and ExpertInputs is ExpertTokens
    assert out["inputs"].is_ragged == (name in ("ragged", "low_latency"))


@pytest.mark.parametrize("name", MANAGER_NAMES)
def test_seed_scatter_combine_sequence_parallel(name, rng):
    """Each TP rank holds its share of every bucket; scatter gathers them, combine hands them back."""
    _init((1, 1, 2, 4))
    ep, tp, e, c, h = 2, 4, 4, 2, 3
    x = rng.standard_normal((ep, tp, e, c, h)).astype(np.float32)
    manager = get_all2all_manager(name, e)

    def body(b):
        sent = manager.scatter(b[0, 0], c, is_sequence_parallel=True)
        return sent[None, None], manager.combine(sent, True)[None, None]

    spec = P("ep", "tp")
    sent, back = jax.jit(spmd.shard_map(body, in_specs=spec, out_specs=(spec, spec), check_vma=False))(x)
    sent, back = np.asarray(sent), np.asarray(back)
    for r in range(ep):
        for le in range(e // ep):  # owner r's local expert le is global expert 2r + le
            expect = np.concatenate([x[s, t, 2 * r + le] for s in range(ep) for t in range(tp)])
            for t in range(tp):
                np.testing.assert_array_equal(sent[r, t, le], expect)
    np.testing.assert_array_equal(back, x)
