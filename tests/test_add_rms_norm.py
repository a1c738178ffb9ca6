"""The decode step's residual add + RMSNorm kernel (kernels/add_rms_norm) in Pallas's interpreter against
float64 numpy: split-K partials summed, cast, added to the residual, normalised as Hugging Face's RMSNorm.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.add_rms_norm import add_rms_norm, reference_add_rms_norm


def _round(x, dtype):
    return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def _numpy(delta, residual, weight, eps, dtype):
    """float64 numpy, rounding to ``dtype`` where the formula casts: the projection, the add, the norm, the product."""
    h = _round(_round(delta.astype(np.float64).sum(0), dtype) + residual.astype(np.float64), dtype)
    normed = _round(h / np.sqrt((h * h).mean(-1, keepdims=True) + eps), dtype)
    return _round(weight.astype(np.float64) * normed, dtype), h


def _close_normed(got, want, ulp):
    """Normalised rows: within two units of the dtype's rounding, relative or of the largest value."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 * ulp, atol=2 * ulp * np.abs(want).max())


def _inputs(rng, parts, b, d, dtype):
    delta = rng.standard_normal((parts, b, d)).astype(np.float32)
    residual = _round(rng.standard_normal((b, d)) * 3, dtype)
    weight = _round(rng.standard_normal(d), dtype)
    return delta, residual, weight


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(("parts", "b", "d"), [(1, 1, 64), (3, 5, 128), (8, 2, 256), (16, 64, 32)])
def test_kernel_matches_float64_numpy(rng, dtype, parts, b, d):
    delta, residual, weight = _inputs(rng, parts, b, d, dtype)
    eps = float(rng.uniform(1e-6, 1e-4))
    args = (jnp.asarray(delta), jnp.asarray(residual, dtype), jnp.asarray(weight, dtype))
    normed, h = add_rms_norm(*args, eps=eps, interpret=True)
    want_n, want_h = _numpy(delta, residual, weight, eps, dtype)
    assert normed.dtype == h.dtype == dtype and normed.shape == h.shape == (b, d)
    ulp = 1e-6 if dtype == jnp.float32 else (2**-7 if dtype == jnp.bfloat16 else 2**-10)
    # the partial sum's order can flip one rounding of the projection; everything after it follows the formula
    np.testing.assert_allclose(np.asarray(h, np.float64), want_h, rtol=ulp, atol=ulp * np.abs(want_h).max())
    _close_normed(normed, want_n, ulp)
    ref_n, ref_h = reference_add_rms_norm(*args, eps)
    np.testing.assert_allclose(np.asarray(ref_h, np.float64), want_h, rtol=ulp, atol=ulp * np.abs(want_h).max())
    _close_normed(ref_n, want_n, ulp)


def test_every_partial_and_the_residual_count(rng):
    """Break-it checks: drop a partial, skip the residual, skip the weight: each changes the result."""
    delta, residual, weight = _inputs(rng, 4, 3, 64, jnp.float32)
    normed, h = add_rms_norm(jnp.asarray(delta), jnp.asarray(residual), jnp.asarray(weight), eps=1e-6, interpret=True)
    want_n, want_h = _numpy(delta, residual, weight, 1e-6, jnp.float32)
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-5, atol=1e-5)
    wrong_h = _numpy(delta[:3], residual, weight, 1e-6, jnp.float32)[1]
    assert not np.allclose(wrong_h, want_h, atol=1e-2)
    np.testing.assert_allclose(np.asarray(normed), want_n, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_numpy(delta, residual, np.ones_like(weight), 1e-6, jnp.float32)[0], want_n, atol=1e-2)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((2, 3, 64), (3, 32), (64,)), r"delta \(2, 3, 64\) means a residual \[3, 64\] and a weight \[64\], got \(3, "),
        (((2, 3, 64), (3, 64), (32,)), r"means a residual \[3, 64\] and a weight \[64\], got \(3, 64\) and \(32,\)"),
        (((1, 2, 96), (2, 96), (96,)), r"hidden size 96 is not a power of two of at least 16"),
        (((1, 2, 8), (2, 8), (8,)), r"hidden size 8 is not a power of two"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    d, r, w = (jnp.ones(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=message):
        add_rms_norm(d, r, w, eps=1e-6, interpret=True)


def test_the_layers_fall_back_to_the_same_formula_where_the_kernel_does_not_run(rng):
    """``models.decode_kernels.add_rms_norm`` on CPU in "auto" mode: XLA, the same numbers as numpy."""
    from models import decode_kernels

    delta, residual, weight = _inputs(rng, 2, 3, 96, jnp.bfloat16)  # 96: not a kernel shape either
    normed, h = decode_kernels.add_rms_norm(
        jnp.asarray(delta), jnp.asarray(residual, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), 1e-5
    )
    want_n, want_h = _numpy(delta, residual, weight, 1e-5, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(h, np.float64), want_h, rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(np.asarray(normed, np.float64), want_n, rtol=2**-6, atol=2**-6 * np.abs(want_n).max())
