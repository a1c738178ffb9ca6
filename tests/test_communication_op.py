"""vLLM-named ops over the TP group, the seed's usage patterns, jit and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DTYPES, MESH_IDS, MESH_SHAPES, groups, init, per_device, random_array, tolerance
from jax.sharding import PartitionSpec as P

import spmd


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=MESH_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", [0, -1])
def test_tensor_model_parallel_ops(shape, dtype, dim, rng):
    init(shape)
    x = random_array(rng, (8, 16, 8), dtype)
    ar, ag, rs = per_device(
        lambda v: (
            spmd.tensor_model_parallel_all_reduce(v),
            spmd.tensor_model_parallel_all_gather(v, dim=dim),
            spmd.tensor_model_parallel_reduce_scatter(v, dim=dim),
        ),
        x,
    )
    for g in groups(shape, ("tp",)):
        total = x[g].astype(np.float64).sum(0)
        gathered = np.concatenate(list(x[g]), axis=dim)
        for rank, r in enumerate(g):
            np.testing.assert_allclose(ar[r].astype(np.float64), total, **tolerance(dtype, len(g)))
            np.testing.assert_array_equal(ar[r], ar[g[0]])
            np.testing.assert_array_equal(ag[r], gathered)
            piece = np.split(total, len(g), axis=dim)[rank]
            np.testing.assert_allclose(rs[r].astype(np.float64), piece, **tolerance(dtype, len(g)))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_seed_column_parallel_linear_all_gather(tp, dtype, rng):
    """Seed example 1: each rank computes x @ W[:, shard]; all-gather gives the dense output."""
    init((8 // tp, 1, 1, tp))
    x = random_array(rng, (6, 32), dtype)
    w = random_array(rng, (32, 24), dtype)
    b = random_array(rng, (24,), dtype)

    def column_parallel(x, w_shard, b_shard):
        out = jnp.dot(x, w_shard, preferred_element_type=jnp.float32) + b_shard
        return spmd.tensor_model_parallel_all_gather(out.astype(x.dtype), dim=-1)

    f = jax.jit(spmd.shard_map(column_parallel, in_specs=(P(), P(None, "tp"), P("tp")), out_specs=P(), check_vma=False))
    out = np.asarray(f(x, w, b)).astype(np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    np.testing.assert_allclose(out, ref, **tolerance(dtype, 32))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_seed_row_parallel_linear_all_reduce(tp, dtype, rng):
    """Seed example 1: each rank computes x[:, shard] @ W[shard, :]; all-reduce gives the dense output."""
    init((8 // tp, 1, 1, tp))
    x = random_array(rng, (6, 32), dtype)
    w = random_array(rng, (32, 24), dtype)

    def row_parallel(x_shard, w_shard):
        partial = jnp.dot(x_shard, w_shard, preferred_element_type=jnp.float32)
        return spmd.tensor_model_parallel_all_reduce(partial)

    f = jax.jit(spmd.shard_map(row_parallel, in_specs=(P(None, "tp"), P("tp", None)), out_specs=P()))
    out = np.asarray(f(x, w)).astype(np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * 32)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_grad_through_tp_mlp(tp, rng):
    """jax.grad through column-parallel -> all_gather -> row-parallel -> all_reduce matches dense grads."""
    init((8 // tp, 1, 1, tp))
    x = random_array(rng, (5, 16), np.float32)
    w1 = random_array(rng, (16, 32), np.float32) / 4
    w2 = random_array(rng, (32, 16), np.float32) / 4
    c = random_array(rng, (5, 16), np.float32)

    def sharded_loss(w1, w2):
        def body(x, w1_shard, w2_shard, c):
            h = jnp.tanh(x @ w1_shard)  # column parallel: h sharded over its last dim
            h_full = spmd.tensor_model_parallel_all_gather(h, dim=-1)
            rank = spmd.get_tensor_model_parallel_rank()
            k = h.shape[-1]
            h_mine = jax.lax.dynamic_slice_in_dim(h_full, rank * k, k, axis=-1)
            y = spmd.tensor_model_parallel_all_reduce(h_mine @ w2_shard)  # row parallel
            return jnp.sum(y * c)

        f = spmd.shard_map(body, in_specs=(P(), P(None, "tp"), P("tp", None), P()), out_specs=P(), check_vma=False)
        return f(x, w1, w2, c)

    def dense_loss(w1, w2):
        return jnp.sum((jnp.tanh(x @ w1) @ w2) * c)

    val, grads = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1)))(w1, w2)
    ref_val, ref_grads = jax.value_and_grad(dense_loss, argnums=(0, 1))(w1, w2)
    np.testing.assert_allclose(val, ref_val, rtol=1e-4, atol=1e-4)
    for g, rg in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp", [2, 4])
def test_grad_through_reduce_scatter_and_broadcast(tp, rng):
    init((8 // tp, 1, 1, tp))
    x = random_array(rng, (8, 4), np.float32)
    c = random_array(rng, (8, 4), np.float32)
    src = tp - 1

    def sharded(x):
        def body(x, c):
            # x and c are split over tp by rows; every rank's block is broadcast from src,
            # then all ranks' copies are reduce-scattered: the result is tp * x_src on every block.
            b = spmd.broadcast(x, "tp", src=src)
            full = jnp.concatenate([b] * tp, axis=0)
            rs = spmd.tensor_model_parallel_reduce_scatter(full, dim=0)
            return spmd.all_reduce(jnp.sum(rs * c), "tp")

        return spmd.shard_map(body, in_specs=(P("tp"), P("tp")), out_specs=P(), check_vma=False)(x, c)

    def dense(x):
        blocks = jnp.split(x, tp)
        cb = jnp.split(c, tp)
        return sum(jnp.sum(tp * blocks[src] * cb[r]) for r in range(tp))

    # A float64 reference; the float32 sum of 16 * tp products may cancel to a small value, so the
    # absolute tolerance scales with the sum of the terms' magnitudes (fresh data hit 2.6e-5 relative).
    terms = [tp * np.split(x.astype(np.float64), tp)[src] * np.split(c.astype(np.float64), tp)[r] for r in range(tp)]
    want, scale = sum(t.sum() for t in terms), sum(np.abs(t).sum() for t in terms)
    np.testing.assert_allclose(jax.jit(sharded)(x), want, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(jax.jit(jax.grad(sharded))(x), jax.grad(dense)(x), rtol=1e-5, atol=1e-6)


def test_eager_shard_map_without_jit(rng):
    init((2, 1, 1, 4))
    x = random_array(rng, (8, 3, 4), np.float32)
    out = per_device(spmd.tensor_model_parallel_all_reduce, x, jit=False)
    for g in groups((2, 1, 1, 4), ("tp",)):
        np.testing.assert_allclose(out[g[0]], x[g].sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 1, 2, 2), (4, 1, 1, 2)], ids=str)
def test_broadcast_tensor_dict_in_graph(shape, rng):
    init(shape)
    src = shape[3] - 1
    x = {
        "hidden": random_array(rng, (8, 4, 6), jnp.bfloat16),
        "positions": random_array(rng, (8, 4), np.int32),
        "mask": rng.random((8, 4)) > 0.5,
    }

    def body(t):
        d = {
            "hidden": t["hidden"],
            "meta": {"positions": t["positions"], "mask": t["mask"], "max_seq_len": 4096, "name": "llama"},
            "none": None,
        }
        out = spmd.broadcast_tensor_dict(d, src=src)
        assert out["meta"]["max_seq_len"] == 4096 and out["meta"]["name"] == "llama" and out["none"] is None
        return {"hidden": out["hidden"], "positions": out["meta"]["positions"], "mask": out["meta"]["mask"]}

    out = per_device(body, x)
    for g in groups(shape, ("tp",)):
        for r in g:
            for k in x:
                np.testing.assert_array_equal(out[k][r], x[k][g[src]])


def test_broadcast_tensor_dict_without_distributed_returns_input():
    d = {"max_seq_len": 4096, "w": np.arange(3.0)}
    assert spmd.broadcast_tensor_dict(d) is d
    assert spmd.broadcast_tensor_dict(None) is None


def test_broadcast_tensor_dict_single_process_host_level():
    init((2, 1, 1, 4))
    d = {"max_seq_len": 4096, "w": np.arange(3.0)}
    assert spmd.broadcast_tensor_dict(d, src=3) is d


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 1, 2, 2)], ids=str)
def test_group_coordinator_ops(shape, rng):
    init(shape)
    tp = spmd.get_tp_group()
    n = tp.world_size
    x = random_array(rng, (8, 2 * n, 3), np.float32)

    def body(v):
        return {
            "rank": tp.rank_in_group,
            "next": tp.next_rank,
            "prev": tp.prev_rank,
            "first": tp.is_first_rank,
            "last": tp.is_last_rank,
            "bcast": tp.broadcast(v, src=n - 1),
            "gather": tp.gather(v, dst=0, dim=0),
            "send": tp.send(v),
            "recv": tp.recv(v, offset=-1),
            "a2a": tp.all_to_all(v, 0, 1),
        }

    out = per_device(body, x)
    for g in groups(shape, ("tp",)):
        for rank, r in enumerate(g):
            assert out["rank"][r] == rank
            assert out["next"][r] == (rank + 1) % n and out["prev"][r] == (rank - 1) % n
            assert out["first"][r] == (rank == 0) and out["last"][r] == (rank == n - 1)
            np.testing.assert_array_equal(out["bcast"][r], x[g[n - 1]])
            gathered = np.concatenate(list(x[g]), axis=0)
            np.testing.assert_array_equal(out["gather"][r], gathered if rank == 0 else 0 * gathered)
            np.testing.assert_array_equal(out["send"][r], x[g[(rank - 1) % n]])
            np.testing.assert_array_equal(out["recv"][r], x[g[(rank + 1) % n]])
            blocks = [np.split(x[s], n, axis=0)[rank] for s in g]
            np.testing.assert_array_equal(out["a2a"][r], np.concatenate(blocks, axis=1))


def test_collectives_in_a_loop(rng):
    """Many calls in a row inside lax.fori_loop stay correct (normalised so values stay bounded)."""
    init((1, 1, 1, 8))
    x = random_array(rng, (8, 64), np.float32)

    def step(i, a):
        return spmd.tensor_model_parallel_all_reduce(a) / 8.0

    def body(v):
        # The first call makes the value replicated over tp, the loop carry's type from then on.
        return jax.lax.fori_loop(1, 50, step, step(0, v))

    out = per_device(body, x)
    mean = x.mean(0)
    for r in range(8):
        np.testing.assert_allclose(out[r], mean, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The seed's custom_all_reduce(input_, use_custom=True) on the TP group


def _tp_sum(fn, x):
    spec = P(spmd.MESH_AXES)
    f = spmd.shard_map(lambda v: fn(v[0])[None], in_specs=spec, out_specs=spec, check_vma=False)
    return np.asarray(jax.jit(f)(x)), str(jax.make_jaxpr(f)(x))


@pytest.mark.parametrize("use_custom", [True, False])
def test_seed_custom_all_reduce_on_cpu_is_the_tp_all_reduce(use_custom, rng):
    """CPU communicators have no custom kernel: XLA's all-reduce over "tp", as tensor_model_parallel_all_reduce."""
    init((2, 1, 1, 4))
    x = random_array(rng, (8, 16), np.float32)
    out, jaxpr = _tp_sum(lambda v: spmd.custom_all_reduce(v, use_custom=use_custom), x)
    assert "psum" in jaxpr and "pallas_call" not in jaxpr
    for g in groups((2, 1, 1, 4), ("tp",)):
        for r in g:
            np.testing.assert_allclose(out[r], x[g].astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


@pytest.fixture
def tp_group_planned_for_tpu(tmp_path, monkeypatch):
    """A TP group of 2 whose communicator plans for "tpu" (kernels interpreted on CPU): one-shot up to 1 KiB."""
    from spmd import compat
    from spmd.communicators import tuning

    path = tmp_path / "tuning.json"
    path.write_text('{"platforms": {"tpu": {"2": {"max_bytes": 1024, "one_shot_max_bytes": 1024, "source": "t"}}}}')
    monkeypatch.setattr(tuning, "TUNING_PATH", path)

    def init_tp2(**kwargs):
        with monkeypatch.context() as m:  # the communicators are chosen for "tpu"; the devices stay CPUs
            m.setattr(compat, "mesh_platform", lambda mesh: "tpu")
            spmd.initialize_model_parallel(2, **kwargs)
        assert type(spmd.get_tp_group().device_communicator) is spmd.PallasCommunicator

    return init_tp2


@pytest.mark.parametrize(
    ("numel", "use_custom", "disable", "kernel"),
    [(64, True, False, True), (64, False, False, False), (512, True, False, False), (64, True, True, False)],
    ids=["small", "use_custom-false", "over-threshold", "disabled-group"],
)
def test_seed_custom_all_reduce_takes_the_kernel_only_when_asked_and_eligible(
    tp_group_planned_for_tpu, numel, use_custom, disable, kernel, rng
):
    tp_group_planned_for_tpu(disable_custom_all_reduce=disable)
    x = random_array(rng, (8, numel), np.float32)
    out, jaxpr = _tp_sum(lambda v: spmd.custom_all_reduce(v, use_custom), x)
    assert ("pallas_call" in jaxpr) is kernel and ("psum" in jaxpr) is not kernel
    want = x[::2].astype(np.float64) + x[1::2]
    np.testing.assert_allclose(out[::2], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[::2], out[1::2])
    if not kernel:  # the fallback: XLA's all-reduce over "tp", bit for bit
        np.testing.assert_array_equal(out, _tp_sum(lambda v: spmd.all_reduce(v, "tp"), x)[0])


def test_seed_custom_all_reduce_needs_initialized_state(rng):
    with pytest.raises(RuntimeError, match=r"get_tp_group: model parallel is not initialized"):
        spmd.custom_all_reduce(np.ones(4, np.float32))
