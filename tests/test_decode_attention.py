"""The fused decode-attention kernel (kernels/decode_attention) in Pallas's interpreter against float64 numpy:
RoPE, the cache write in place, GQA attention over the rows up to each position; its error paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.decode_attention import decode_attention, decode_attention_ineligibility, reference_decode_attention


def _numpy_step(qkv, kc, vc, pos, inv_freq, heads):
    """float64 (angles in float32, as the model defines them): rotate-half RoPE, write row pos,
    softmax(q k^T / sqrt(d)) v over rows 0..pos."""
    qkv = np.asarray(qkv, np.float64).sum(0)
    kc, vc = np.array(kc, np.float64), np.array(vc, np.float64)
    b, _, d = qkv.shape
    kv, half = kc.shape[1], d // 2
    q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv], qkv[:, heads + kv :]
    out = np.zeros((b, heads, d))
    for i in range(b):
        ang = (np.float32(pos[i]) * np.asarray(inv_freq, np.float32)).astype(np.float64)
        c, s = np.cos(ang), np.sin(ang)

        def rope(x, c=c, s=s):
            return np.concatenate([x[..., :half] * c - x[..., half:] * s, x[..., half:] * c + x[..., :half] * s], -1)

        kc[i, :, pos[i]] = rope(k[i])
        vc[i, :, pos[i]] = v[i]
        for j in range(heads):
            g = j // (heads // kv)
            scores = kc[i, g, : pos[i] + 1] @ rope(q[i, j]) / np.sqrt(d)
            p = np.exp(scores - scores.max())
            out[i, j] = (p / p.sum()) @ vc[i, g, : pos[i] + 1]
    return out, kc, vc


def _inputs(rng, b, h, kv, d, s, dtype, parts=1):
    """Split-K partials of a random fused QKV row (they sum to it), random caches, positions, frequencies."""

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv = rng.standard_normal((parts, b, h + 2 * kv, d)).astype(np.float32) / np.sqrt(parts)
    pos = rng.integers(0, s, b).astype(np.int32)
    pos[0] = s - 1 if b > 1 else pos[0]  # the last row of the cache is exercised
    inv_freq = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    return jnp.asarray(qkv), arr(b, kv, s, d), arr(b, kv, s, d), pos, inv_freq


@pytest.mark.parametrize(
    ("b", "h", "kv", "d", "s", "parts", "block_s"),
    [
        (1, 8, 2, 32, 32, 1, 16),
        (3, 4, 4, 32, 16, 3, 64),
        (2, 2, 1, 64, 64, 8, 16),
        (2, 16, 1, 32, 16, 2, 16),
        (1, 8, 8, 64, 128, 1, 128),
    ],
)
def test_kernel_matches_float64_numpy(rng, b, h, kv, d, s, parts, block_s):
    qkv, kc, vc, pos, inv_freq = _inputs(rng, b, h, kv, d, s, jnp.float32, parts)
    out, kc2, vc2 = decode_attention(qkv, kc, vc, jnp.asarray(pos), jnp.asarray(inv_freq), heads=h,
                                     block_s=block_s, interpret=True)  # fmt: skip
    want, kc_want, vc_want = _numpy_step(qkv, kc, vc, pos, inv_freq, h)
    assert out.shape == (b, h, d)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(kc2), kc_want, rtol=0, atol=2e-5)  # untouched rows identical
    np.testing.assert_allclose(np.asarray(vc2), vc_want, rtol=0, atol=2e-6)
    changed = np.asarray(kc2) != np.asarray(kc)
    assert all(set(np.nonzero(changed[i])[1]) <= {pos[i]} for i in range(b))  # only each row's position


def test_bf16_cache_and_output(rng):
    qkv, kc, vc, pos, inv_freq = _inputs(rng, 2, 8, 2, 64, 64, jnp.bfloat16, parts=4)
    out, kc2, vc2 = decode_attention(qkv, kc, vc, jnp.asarray(pos), jnp.asarray(inv_freq), heads=8, interpret=True)
    assert out.dtype == kc2.dtype == vc2.dtype == jnp.bfloat16
    want, kc_want, _ = _numpy_step(qkv, kc, vc, pos, inv_freq, 8)
    got = np.asarray(out, np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2
    np.testing.assert_allclose(np.asarray(kc2, np.float64), kc_want, rtol=1e-2, atol=2e-2)


def test_jax_reference_matches_numpy(rng):
    qkv, kc, vc, pos, inv_freq = _inputs(rng, 2, 8, 2, 32, 32, jnp.float32, parts=2)
    out, kc2, _ = reference_decode_attention(qkv, kc, vc, jnp.asarray(pos), jnp.asarray(inv_freq), heads=8)
    want, kc_want, _ = _numpy_step(qkv, kc, vc, pos, inv_freq, 8)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(kc2), kc_want, rtol=0, atol=2e-5)


def test_inside_jit_with_donated_caches_updates_in_place(rng):
    qkv, kc, vc, pos, inv_freq = _inputs(rng, 1, 4, 2, 32, 16, jnp.float32)
    want, kc_want, _ = _numpy_step(qkv, kc, vc, pos, inv_freq, 4)
    step = jax.jit(
        lambda kc, vc: decode_attention(qkv, kc, vc, jnp.asarray(pos), inv_freq, heads=4, interpret=True),
        donate_argnums=(0, 1),
    )
    out, kc2, _ = step(kc, vc)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(kc2), kc_want, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ((6, 4, 32, 16), "6 query heads do not group over 4 KV heads"),
        ((12, 4, 32, 16), "3 query heads per KV head"),
        ((64, 2, 32, 16), "32 query heads per KV head"),
        ((8, 2, 48, 16), "head_dim=48: half of it must be a power of two of at least 16"),
        ((8, 2, 16, 16), "head_dim=16: half of it must be a power of two of at least 16"),
        ((8, 2, 32, 48), "cache length 48 is not a power of two of at least 16"),
        ((8, 2, 32, 8), "cache length 8 is not a power of two of at least 16"),
    ],
)
def test_ineligible_shapes_are_named(dims, message):
    h, kv, d, s = dims
    assert message in (decode_attention_ineligibility(h, kv, d, s) or "")
    z = jnp.zeros
    with pytest.raises(ValueError, match="decode_attention: " + message):
        decode_attention(z((1, 1, h + 2 * kv, d)), z((1, kv, s, d)), z((1, kv, s, d)), z((1,), jnp.int32),
                         z((d // 2,)), heads=h, interpret=True)  # fmt: skip


def test_mismatched_shapes_are_named():
    z = jnp.zeros
    with pytest.raises(ValueError, match=r"qkv \(1, 1, 8, 32\) with 4 query heads means caches \[1, 2, S, 32\]"):
        decode_attention(z((1, 1, 8, 32)), z((1, 1, 16, 32)), z((1, 1, 16, 32)), z((1,), jnp.int32), z((16,)),
                         heads=4, interpret=True)  # fmt: skip
