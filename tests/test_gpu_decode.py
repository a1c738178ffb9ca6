"""GPU-only checks of the decode kernels (skipped on CPU): the fused attention lowered by Triton against float64
numpy, and a model whose decode step runs the kernels giving the numpy reference's greedy tokens.

Run on a GPU machine with ``JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu_decode.py tests/test_gemv.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SESSION_SEED
from model_fixtures import WIDE_HEADS, checkpoint_without_near_ties, init, llama_config
from test_decode_attention import _inputs, _numpy_step

import models
from kernels.decode_attention import decode_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    ("b", "h", "kv", "d", "s", "parts"), [(1, 32, 8, 64, 256, 8), (4, 8, 2, 64, 1024, 1), (2, 4, 4, 128, 64, 2)]
)
def test_decode_attention_on_the_gpu(rng, dtype, b, h, kv, d, s, parts):
    qkv, kc, vc, pos, inv_freq = _inputs(rng, b, h, kv, d, s, dtype, parts)
    want, kc_want, _ = _numpy_step(qkv, kc, vc, pos, inv_freq, h)
    step = jax.jit(functools.partial(decode_attention, heads=h), donate_argnums=(1, 2))
    out, kc2, _ = step(qkv, kc, vc, jnp.asarray(pos), jnp.asarray(inv_freq))
    got = np.asarray(out, np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
    np.testing.assert_allclose(np.asarray(kc2, np.float64), kc_want, rtol=tol, atol=tol)


def test_model_with_decode_kernels_gives_reference_tokens():
    """A float32 Llama on one GPU with every decode kernel compiled for it ("pallas": the GEMV in every product,
    the fused attention in every step): tokens equal to numpy's greedy."""
    config = llama_config(**WIDE_HEADS)
    rng = np.random.default_rng([SESSION_SEED, 31])
    weights, prompts, greedy = checkpoint_without_near_ties(config, rng, (7, 3), 12)
    init(1)
    model = models.load_state_dict(config, weights).with_kernels("pallas")
    assert models.generate(model, prompts, 12, chunk_size=5) == [g for g, _ in greedy]


def test_attention_kernel_runs_for_half_precision_only_on_the_gpu():
    from models import decode_kernels

    assert decode_kernels.decode_attention_mode(32, 8, 64, 256, jnp.bfloat16) == "gpu"
    assert decode_kernels.decode_attention_mode(32, 8, 64, 256, jnp.float32) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("parts", "b", "d"), [(8, 1, 2048), (3, 32, 4096), (1, 64, 128)])
def test_add_rms_norm_on_the_gpu(rng, dtype, parts, b, d):
    from test_add_rms_norm import _close_normed, _inputs, _numpy

    from kernels.add_rms_norm import add_rms_norm

    delta, residual, weight = _inputs(rng, parts, b, d, dtype)
    normed, h = jax.jit(functools.partial(add_rms_norm, eps=1e-5))(
        jnp.asarray(delta), jnp.asarray(residual, dtype), jnp.asarray(weight, dtype)
    )
    want_n, want_h = _numpy(delta, residual, weight, 1e-5, dtype)
    ulp = 1e-6 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(np.asarray(h, np.float64), want_h, rtol=ulp, atol=ulp * np.abs(want_h).max())
    _close_normed(normed, want_n, ulp)


def test_norm_kernel_runs_for_half_precision_decode_rows_on_the_gpu(monkeypatch):
    import kernels.add_rms_norm
    from models import decode_kernels

    calls = []
    real = kernels.add_rms_norm.add_rms_norm
    monkeypatch.setattr(kernels.add_rms_norm, "add_rms_norm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for dtype, rows, used in [(jnp.bfloat16, 1, 1), (jnp.bfloat16, 64, 1), (jnp.bfloat16, 65, 0), (jnp.float32, 1, 0)]:
        calls.clear()
        decode_kernels.add_rms_norm(jnp.ones((2, rows, 256)), jnp.ones((rows, 256), dtype), jnp.ones(256, dtype), 1e-5)
        assert len(calls) == used, (dtype, rows)
