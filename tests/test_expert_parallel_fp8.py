"""fp8 dispatch (spmd.expert_parallel.fp8): per-token e4m3 against numpy (ml_dtypes' float8_e4m3fn), the
error bound against bf16's, the edge cases (zeros, huge, tiny, NaN, inf), and every manager with
``use_fp8=True`` against a numpy reference on fresh random data, quantized before the exchange."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from spmd.expert_parallel import get_all2all_manager
from spmd.expert_parallel.fp8 import FP8_MAX, pack_fp8_rows, quantize_fp8, unpack_fp8_rows

E4M3 = ml_dtypes.float8_e4m3fn


def np_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token: the smallest power of two ``s`` (exponent searched, clipped to [-126, 127]) with
    ``max|x| / s <= 448``, ``q = e4m3(x / s)`` (ml_dtypes rounds to nearest even). Non-finite tokens:
    ``q = 0``, ``s = NaN``; all-zero tokens: ``q = 0``, ``s = NaN`` here too (any scale is right)."""
    x32 = np.asarray(x, np.float32)
    q = np.zeros(x32.shape, E4M3)
    s = np.full(x32.shape[0], np.nan, np.float32)
    for t, row in enumerate(x32):
        amax = float(np.abs(row).max())
        if not np.isfinite(amax) or amax == 0:
            continue
        p = -200
        while amax / 2.0**p > FP8_MAX:
            p += 1
        p = min(max(p, -126), 127)
        s[t] = np.float32(2.0**p)
        q[t] = (row / s[t]).astype(E4M3)
    return q, s


def np_roundtrip(x: np.ndarray) -> np.ndarray:
    """What the experts get: ``q * s`` in float32, zeros for all-zero tokens, NaN for non-finite ones."""
    q, s = np_quantize(x)
    out = q.astype(np.float32) * np.where(np.isnan(s), 1.0, s)[:, None]
    bad = ~np.isfinite(np.abs(np.asarray(x, np.float32)).max(-1))
    out[bad] = np.nan
    return out


def _tokens(rng, t, h, dtype=np.float32):
    """Tokens of widely different magnitudes (10**-30 .. 10**30 per token)."""
    mag = 10.0 ** rng.uniform(-30, 30, (t, 1))
    return (rng.standard_normal((t, h)) * mag).astype(np.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_quantize_matches_numpy_bit_for_bit(dtype, rng):
    x = _tokens(rng, 64, 48, dtype)
    q, s = jax.jit(quantize_fp8)(jnp.asarray(x))
    want_q, want_s = np_quantize(x)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), want_q.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(s), want_s)
    assert np.abs(np.asarray(q).astype(np.float32)).max() <= FP8_MAX


def test_error_bound_against_bf16(rng):
    """|deq - x| <= 2**-4 |x| + 2**-10 s (e4m3: 3 mantissa bits) and s <= max|x| / 224; bf16 is 2**-8 |x|."""
    x = _tokens(rng, 256, 64)
    _, s = quantize_fp8(jnp.asarray(x))
    deq = np.asarray(unpack_fp8_rows(pack_fp8_rows(jnp.asarray(x)), jnp.float32))
    s = np.asarray(s)[:, None]
    amax = np.abs(x).max(-1, keepdims=True)
    assert (s <= amax / 224).all() and (amax / s <= FP8_MAX).all()
    err = np.abs(deq - x)
    assert (err <= 2.0**-4 * np.abs(x) + 2.0**-10 * s).all()
    bf16_err = np.abs(x.astype(ml_dtypes.bfloat16).astype(np.float32) - x)
    assert (bf16_err <= 2.0**-8 * np.abs(x)).all()
    rel = (err / amax).max(), (bf16_err / amax).max()
    assert 2.0**-8 < rel[0] <= 2.0**-4 and rel[1] <= 2.0**-8  # fp8 costs 4 bits against bf16, no more


def test_edge_cases_zero_huge_tiny_nan_inf(rng):
    h = 16
    x = rng.standard_normal((7, h)).astype(np.float32)
    x[0] = 0.0  # all zero
    x[1] *= 1e38 / np.abs(x[1]).max()  # large
    x[2] = np.float32(3.3e38) * np.sign(x[2])  # within 1/16 of float32's maximum: rounds past it, saturates
    x[3] *= 2.0**-100 / np.abs(x[3]).max()  # tiny, still inside the bound
    x[4, 3] = np.nan
    x[5, 0] = -np.inf
    deq = np.asarray(unpack_fp8_rows(pack_fp8_rows(jnp.asarray(x)), jnp.float32))
    assert (deq[0] == 0).all()
    assert np.isfinite(deq[1:4]).all()
    np.testing.assert_array_equal(deq[2], np.sign(x[2]) * np.finfo(np.float32).max)  # saturated, not inf
    for t in (1, 3, 6):
        np.testing.assert_array_equal(deq[t], np_roundtrip(x[t : t + 1])[0])
        assert (np.abs(deq[t] - x[t]) <= 2.0**-4 * np.abs(x[t]) + 2.0**-17.8 * np.abs(x[t]).max()).all()
    assert np.isnan(deq[4]).all() and np.isnan(deq[5]).all()  # the NaN policy: the whole token
    _, s = quantize_fp8(jnp.asarray(x))
    assert np.isnan(np.asarray(s)[4:6]).all() and np.isfinite(np.asarray(s)[[0, 1, 2, 3, 6]]).all()


def test_bf16_saturates_at_bf16_max():
    x = np.full((1, 8), float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), ml_dtypes.bfloat16)
    deq = np.asarray(unpack_fp8_rows(pack_fp8_rows(jnp.asarray(x)), jnp.bfloat16))
    assert np.isfinite(deq.astype(np.float32)).all()


def test_pack_layout_and_unpack_errors(rng):
    x = _tokens(rng, 5, 12)
    rows = np.asarray(pack_fp8_rows(jnp.asarray(x)))
    q, s = np_quantize(x)
    assert rows.dtype == np.uint8 and rows.shape == (5, 16)
    np.testing.assert_array_equal(rows[:, :12], q.view(np.uint8))
    np.testing.assert_array_equal(rows[:, 12:].copy().view(np.float32)[:, 0], s)
    with pytest.raises(TypeError, match=r"expected uint8 rows of hidden \+ 4 bytes"):
        unpack_fp8_rows(jnp.zeros((2, 8), jnp.float32), jnp.float32)
    with pytest.raises(TypeError, match=r"got uint8\[2, 4\]"):
        unpack_fp8_rows(jnp.zeros((2, 4), jnp.uint8), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Every manager, every exchange path

CASES = [
    ("naive", {}, 1, False),
    ("naive", {}, 2, True),  # sequence parallel: the "tp" all-gather moves fp8 too
    ("capacity", {"expert_capacity": 64}, 1, False),
    ("ragged", {}, 2, False),
    ("ragged", {}, 2, True),
    ("low_latency", {"max_tokens": 8}, 1, False),  # its all_to_all form (the kernel's rows)
    ("low_latency", {"max_tokens": 2, "fallback": "naive"}, 2, False),  # more tokens than max: the fallback
    ("low_latency", {"max_tokens": 2, "fallback": "ragged"}, 1, True),
]


def _run(name, kwargs, tp, sp, x, w, ids, ep):
    mesh = Mesh(np.array(jax.devices()[: ep * tp]).reshape(ep, tp), ("ep", "tp"))
    manager = get_all2all_manager(name, 8, use_fp8=True, **kwargs)

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids, is_sequence_parallel=sp)
        halves = inputs.with_tokens(inputs.tokens / tp)  # identity experts, as "tp" partial sums (exact: tp 1, 2)
        return manager.combine(halves, state)  # y = sum_k w_k * x'

    spec = P(("ep", "tp")) if sp else P("ep")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))
    return manager, np.asarray(f(x, w, ids))


@pytest.mark.parametrize("name,kwargs,tp,sp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_every_manager_dispatches_fp8(name, kwargs, tp, sp, dtype, rng):
    ep, t, h, k = 4, 8, 24, 2  # 8 tokens per EP rank (split over "tp" too under sequence parallelism)
    n = ep * t
    x = _tokens(rng, n, h, dtype)
    x[3] = 0  # an all-zero token
    ids = np.stack([rng.choice(8, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = (rng.random((n, k)) + 0.1).astype(np.float32)
    manager, y = _run(name, kwargs, tp, sp, x, w, ids, ep)
    sent = np_roundtrip(x)
    want = (w[:, :, None].astype(np.float64) * sent[:, None, :].astype(np.float64)).sum(1)
    y32 = y.astype(np.float32)
    tol = 1e-6 if dtype == np.float32 else 2.0**-7
    np.testing.assert_allclose(y32, want, rtol=tol, atol=0)
    exact = (w[:, :, None].astype(np.float64) * x.astype(np.float64)[:, None, :]).sum(1)
    assert not np.allclose(y32, exact, rtol=1e-6, atol=0)  # quantized: not the unquantized result
    bound = (w[:, :, None] * (2.0**-4 * np.abs(x.astype(np.float64))[:, None, :])).sum(1)
    bound += (w.sum(1) * 2.0**-17.8 * np.abs(x.astype(np.float64)).max(-1))[:, None]
    assert (np.abs(y32 - exact) <= bound * (1 + tol) + tol * np.abs(exact)).all()
    wire = _dispatch_exchanges(manager, tp, sp, x, w, ids, ep)
    assert wire and not any(f"x{h}xf32>" in line or f"x{h}xbf16>" in line for line in wire), wire
    if name != "low_latency" or "fallback" in kwargs:  # the generic rows; low_latency's own rows are u32 words
        assert any(f"x{h + 4}xui8>" in line for line in wire), wire


def _dispatch_exchanges(manager, tp, sp, x, w, ids, ep):
    """The collectives of ``dispatch`` alone (lowered, StableHLO): the lines that name one."""
    mesh = Mesh(np.array(jax.devices()[: ep * tp]).reshape(ep, tp), ("ep", "tp"))
    spec = P(("ep", "tp")) if sp else P("ep")

    def body(x, w, ids):
        return manager.dispatch(x, w, ids, is_sequence_parallel=sp)[0].tokens[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=P(("ep", "tp")), check_vma=False))
    text = f.lower(x, w, ids).as_text()
    return [line for line in text.splitlines() if any(c in line for c in ("all_gather", "all_to_all", "ragged_all"))]


@pytest.mark.parametrize("name", ["naive", "capacity", "ragged", "low_latency"])
def test_use_fp8_must_be_a_bool(name):
    with pytest.raises(ValueError, match=r"expected use_fp8 True or False, got 1"):
        get_all2all_manager(name, 8, use_fp8=1)


def test_fp8_needs_float_tokens():
    mesh = Mesh(np.array(jax.devices()[:2]), ("ep",))
    manager = get_all2all_manager("naive", 4, use_fp8=True, tp_axis=None)
    x = jnp.ones((4, 8), jnp.int32)
    ids = jnp.zeros((4, 2), jnp.int32) + jnp.array([0, 1], jnp.int32)
    w = jnp.ones((4, 2), jnp.float32)
    f = jax.shard_map(lambda *a: manager.dispatch(*a)[0].tokens, mesh=mesh, in_specs=(P("ep"),) * 3, out_specs=P())
    with pytest.raises(TypeError, match=r"use_fp8 quantizes floating-point tokens; got hidden_states of int32"):
        jax.jit(f)(x, w, ids)
    assert "use_fp8=True" in repr(manager)
