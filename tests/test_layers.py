"""vLLM's parallel layers (models.layers) against dense numpy math, on simulated TP meshes.

Weights come in as checkpoint tensors (``[out, in]``, numpy) through each layer's
``weight_loader``, so the fused layouts (``[gate_r | up_r]``, ``[Q_r | K_r | V_r]`` with replicated
KV heads) are checked against the logical matrices, rank by rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import init
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spmd
from models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from models.sharding import shard_module
from models.vocab import ParallelLMHead, VocabParallelEmbedding


def _load(layer: nnx.Module, tensors: dict[str, list[np.ndarray]]) -> None:
    """Place each named parameter from checkpoint tensors through the layer's ``weight_loader``."""
    mesh = spmd.get_mesh()
    for name, loaded in tensors.items():
        variable = getattr(layer, name)
        spec = nnx.get_partition_spec(variable).get_value()
        arr = jax.make_array_from_callback(
            variable.get_value().shape,
            NamedSharding(mesh, spec),
            lambda index, name=name, loaded=loaded: layer.weight_loader(name, loaded, index).astype(np.float32),
        )
        variable.set_value(arr)


def _shards(x: jax.Array) -> list[np.ndarray]:
    """The per-device blocks of a global array in TP-rank order (TP is the only non-trivial axis here)."""
    return [np.asarray(s.data) for s in sorted(x.addressable_shards, key=lambda s: s.device.id)]


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# column / row ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 4])
def test_column_parallel_linear(tp, rng):
    init(tp=tp)
    w, b, x = _rand(rng, 16, 8), _rand(rng, 16), _rand(rng, 5, 8)  # w: [out, in] as in a checkpoint
    ref = x.astype(np.float64) @ w.T + b
    gathered = ColumnParallelLinear(8, 16, bias=True, gather_output=True, return_bias=False, rngs=nnx.Rngs(0))
    _load(gathered, {"weight": [w], "bias": [b]})
    np.testing.assert_allclose(shard_module(gathered, in_specs=P(), out_specs=P())(x), ref, rtol=1e-5, atol=1e-5)

    split = ColumnParallelLinear(8, 16, bias=True, skip_bias_add=True, rngs=nnx.Rngs(0))
    _load(split, {"weight": [w], "bias": [b]})
    y, bias = shard_module(split, in_specs=P(), out_specs=(P(None, "tp"), P("tp")))(x)
    np.testing.assert_allclose(np.asarray(y) + np.asarray(bias), ref, rtol=1e-5, atol=1e-5)
    assert _shards(y)[-1].shape == (5, 16 // tp)


@pytest.mark.parametrize("tp", [1, 4])
def test_row_parallel_linear_adds_bias_once(tp, rng):
    init(tp=tp)
    w, b, x = _rand(rng, 6, 16), _rand(rng, 6), _rand(rng, 5, 16)
    ref = x.astype(np.float64) @ w.T + b
    row = RowParallelLinear(16, 6, bias=True, return_bias=False, rngs=nnx.Rngs(0))
    _load(row, {"weight": [w], "bias": [b]})
    np.testing.assert_allclose(shard_module(row, in_specs=P(None, "tp"), out_specs=P())(x), ref, rtol=1e-5, atol=1e-5)

    full_input = RowParallelLinear(16, 6, bias=True, input_is_parallel=False, return_bias=False, rngs=nnx.Rngs(0))
    _load(full_input, {"weight": [w], "bias": [b]})
    np.testing.assert_allclose(shard_module(full_input, in_specs=P(), out_specs=P())(x), ref, rtol=1e-5, atol=1e-5)

    partial = RowParallelLinear(16, 6, bias=True, reduce_results=False, skip_bias_add=True, rngs=nnx.Rngs(0))
    _load(partial, {"weight": [w], "bias": [b]})
    y, bias = shard_module(partial, in_specs=P(None, "tp"), out_specs=(P("tp"), P()))(x)
    parts = np.asarray(y).reshape(tp, 5, 6)  # one partial sum per rank
    np.testing.assert_allclose(parts.sum(0) + np.asarray(bias), ref, rtol=1e-5, atol=1e-5)


def test_merged_column_holds_each_ranks_slice_of_every_matrix(rng):
    tp = 4
    init(tp=tp)
    gate, up, x = _rand(rng, 32, 8), _rand(rng, 32, 8), _rand(rng, 3, 8)
    layer = MergedColumnParallelLinear(8, [32, 32], bias=False, return_bias=False, rngs=nnx.Rngs(0))
    _load(layer, {"weight": [gate, up]})
    for r, shard in enumerate(_shards(layer.weight[...])):
        np.testing.assert_array_equal(shard, np.concatenate([gate[r * 8 : (r + 1) * 8], up[r * 8 : (r + 1) * 8]]).T)
    y = np.asarray(shard_module(layer, in_specs=P(), out_specs=P(None, "tp"))(x)).reshape(3, tp, 2, 8)
    np.testing.assert_allclose(y[:, :, 0].reshape(3, 32), x @ gate.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, :, 1].reshape(3, 32), x @ up.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_qkv_parallel_linear_replicates_kv_heads(tp, rng):
    """8 query heads, 2 KV heads: split at tp=2; at 4 and 8 each rank holds one KV head, replicated."""
    init(tp=tp)
    heads, kv, d, hidden = 8, 2, 4, 16
    q, k, v = _rand(rng, heads * d, hidden), _rand(rng, kv * d, hidden), _rand(rng, kv * d, hidden)
    qb, kb, vb = _rand(rng, heads * d), _rand(rng, kv * d), _rand(rng, kv * d)
    layer = QKVParallelLinear(hidden, d, heads, kv, bias=True, return_bias=False, rngs=nnx.Rngs(0))
    assert (layer.num_heads, layer.num_kv_heads) == (heads // tp, max(1, kv // tp))
    assert layer.num_kv_head_replicas == max(1, tp // kv)
    _load(layer, {"weight": [q, k, v], "bias": [qb, kb, vb]})
    x = _rand(rng, 3, hidden)

    class Split(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x):
            return jnp.concatenate([a.reshape(3, -1) for a in self.inner.split_output(self.inner(x))], axis=-1)

    out = np.asarray(shard_module(Split(layer), in_specs=P(), out_specs=P(None, "tp"))(x)).reshape(3, tp, -1)
    hq, hkv = heads // tp, max(1, kv // tp)
    for r in range(tp):
        kv_first = r // max(1, tp // kv) * hkv  # the rank's first KV head
        rows_q = slice(r * hq * d, (r + 1) * hq * d)
        rows_kv = slice(kv_first * d, (kv_first + hkv) * d)
        want = np.concatenate(
            [x @ q[rows_q].T + qb[rows_q], x @ k[rows_kv].T + kb[rows_kv], x @ v[rows_kv].T + vb[rows_kv]], -1
        )
        np.testing.assert_allclose(out[:, r], want, rtol=1e-5, atol=1e-5)


# vocabulary ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 4])
def test_vocab_parallel_embedding_and_lm_head(tp, rng):
    init(tp=tp)
    vocab, hidden = 200, 8
    table = _rand(rng, vocab, hidden)
    emb = VocabParallelEmbedding(vocab, hidden, rngs=nnx.Rngs(0))
    assert emb.num_embeddings_padded == -(-vocab // (64 * tp)) * 64 * tp
    _load(emb, {"weight": [table]})
    padded = np.asarray(emb.weight[...])
    np.testing.assert_array_equal(padded[:vocab], table)
    assert not padded[vocab:].any()
    ids = rng.integers(0, vocab, (4, 7)).astype(np.int32)
    ids[0, :4] = [0, vocab - 1, 63, 64]  # first, last, either side of a shard edge at tp > 1
    np.testing.assert_array_equal(shard_module(emb, in_specs=P(), out_specs=P())(ids), table[ids])

    class Head(nnx.Module):
        def __init__(self, head):
            self.head = head

        def __call__(self, x):
            return self.head.compute_logits(x)

    x = _rand(rng, 3, hidden)
    untied = ParallelLMHead(vocab, hidden, rngs=nnx.Rngs(1))
    tied = untied.tie_weights(emb)
    assert tied is emb
    logits = shard_module(Head(tied), in_specs=P(), out_specs=P())(x)
    assert logits.shape == (3, vocab) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)


# errors ----------------------------------------------------------------------------------------------


def test_layer_errors():
    init(tp=4)
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"reduce_results=False with a bias that is added"):
        RowParallelLinear(8, 8, bias=True, reduce_results=False, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"total_num_heads=6 cannot be split over tp=4; TP sizes that divide it: \[1, 2, 3, 6\]"
    ):
        QKVParallelLinear(16, 4, 6, 2, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"total_num_kv_heads=3 cannot be split over or replicated on tp=4.*work: \[1, 3, 6, 12\]"
    ):
        QKVParallelLinear(16, 4, 12, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"output_size=6 cannot be split over tp=4"):
        ColumnParallelLinear(8, 6, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"input_size=6 cannot be split over tp=4; TP sizes that divide it: \[1, 2, 3, 6\]"
    ):
        RowParallelLinear(6, 8, rngs=rngs)
    with pytest.raises(
        ValueError, match=r"num_embeddings=250 cannot be split over tp=4; TP sizes that divide it: \[1, 2, 5,"
    ):
        VocabParallelEmbedding(250, 8, padding_size=0, rngs=rngs)
    with pytest.raises(ValueError, match=r"expected an embedding of 256 x 8, got 128 x 8"):
        ParallelLMHead(256, 8, rngs=rngs).tie_weights(VocabParallelEmbedding(128, 8, rngs=rngs))
    with pytest.raises(ValueError, match=r"expected a positive int tp_size, got 0"):
        ColumnParallelLinear(8, 8, tp_size=0, rngs=rngs)
    layer = ColumnParallelLinear(8, 8, tp_size=2, return_bias=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"built for tp_size=2 but called on a 'tp' axis of size 4"):
        shard_module(layer, in_specs=P(), out_specs=P(None, "tp"))(np.ones((2, 8), np.float32))
    with pytest.raises(spmd.UnboundAxisError, match=r"unbound axis name: 'tp'"):
        ColumnParallelLinear(8, 8, rngs=rngs)(jnp.ones((2, 8)))
