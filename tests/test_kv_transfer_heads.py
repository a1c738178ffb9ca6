"""KV-cache head splitting for heterogeneous TP, against numpy references (no communication)."""

from __future__ import annotations

import itertools

import jax
import ml_dtypes
import numpy as np
import pytest

from spmd.kv_transfer import (
    kv_head_ranges,
    kv_head_sharding,
    kv_transfer_plan,
    merge_kv_heads,
    reshard_kv_heads,
    split_kv_heads,
)


def valid_tps(heads: int) -> list[int]:
    return [t for t in (1, 2, 4, 8) if heads % t == 0 or t % heads == 0]


CASES = [(h, t) for h in (1, 2, 4, 8) for t in valid_tps(h)]


@pytest.mark.parametrize("heads,tp", CASES)
@pytest.mark.parametrize("head_axis", [0, 2])
def test_split_matches_numpy_repeat_and_merge_inverts(rng, heads, tp, head_axis):
    shape = [3, 5, 6]
    shape.insert(head_axis, heads)
    x = rng.standard_normal(shape).astype(np.float32)
    shards = split_kv_heads(x, tp, head_axis=head_axis)
    assert len(shards) == tp
    # Reference: the rank-ordered concatenation is x itself (tp <= heads) or every head repeated tp/heads times.
    want = x if tp <= heads else np.repeat(x, tp // heads, axis=head_axis)
    np.testing.assert_array_equal(np.concatenate(shards, axis=head_axis), want)
    np.testing.assert_array_equal(merge_kv_heads(shards, heads, head_axis=head_axis), x)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_reshard_between_every_pair_of_tp_sizes(rng, heads):
    x = rng.standard_normal((heads, 7, 4)).astype(ml_dtypes.bfloat16)
    for p, d in itertools.product(valid_tps(heads), repeat=2):
        got = reshard_kv_heads(split_kv_heads(x, p), d, num_kv_heads=heads)
        for r, (g, w) in enumerate(zip(got, split_kv_heads(x, d), strict=True)):
            np.testing.assert_array_equal(g, w, err_msg=f"heads={heads} {p}->{d} rank {r}")


def test_plan_spreads_replicas_and_covers_each_destination_head_once():
    # 2 heads over src tp 4: ranks (0,1) hold head 0, (2,3) head 1; dst tp 4 spreads over replicas.
    plan = kv_transfer_plan(2, 4, 4)
    assert [p[0].src_rank for p in plan] == [0, 1, 2, 3]
    plan = kv_transfer_plan(8, 4, 2)  # each dst rank takes two whole source shards
    assert [(q.src_rank, q.src_start, q.src_stop, q.dst_start, q.dst_stop) for q in plan[1]] == [
        (2, 0, 2, 0, 2),
        (3, 0, 2, 2, 4),
    ]
    plan = kv_transfer_plan(8, 2, 4)  # each dst rank takes half a source shard
    assert [(q.src_rank, q.src_start, q.src_stop) for ps in plan for q in ps] == [
        (0, 0, 2),
        (0, 2, 4),
        (1, 0, 2),
        (1, 2, 4),
    ]


def test_ranges_follow_vllm():
    assert kv_head_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert kv_head_ranges(2, 8) == [(0, 1)] * 4 + [(1, 2)] * 4


@pytest.mark.parametrize(
    "heads,tp,match",
    [(8, 3, "does not divide"), (3, 4, "not a multiple"), (4, 0, "positive int"), (0, 2, "positive int")],
)
def test_bad_tp_sizes_raise(heads, tp, match):
    with pytest.raises(ValueError, match=match):
        kv_head_ranges(heads, tp)


def test_bad_head_axis_and_shard_counts_raise():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="head_axis=2 is out of range"):
        split_kv_heads(x, 2, head_axis=2)
    with pytest.raises(ValueError, match="shard 0 has 4 heads"):
        merge_kv_heads([x, x], 4)


@pytest.mark.parametrize("heads,tp", [(8, 4), (4, 8), (2, 8), (8, 8), (1, 2)])
def test_head_sharding_puts_each_rank_on_its_heads(rng, heads, tp):
    devices = jax.devices()[:tp]
    x = rng.standard_normal((heads, 5, 3)).astype(np.float32)
    y = jax.device_put(x, kv_head_sharding(devices, heads))
    want = split_kv_heads(x, tp)
    by_device = {s.device: np.asarray(s.data) for s in y.addressable_shards}
    for r, d in enumerate(devices):
        np.testing.assert_array_equal(by_device[d], want[r])
