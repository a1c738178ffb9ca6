"""The fused all-reduce + residual add + RMSNorm: the op on CPU (the three steps), the GPU kernel's lowering.

The reference is numpy: a float32 sum in rank order cast to the dtype, the residual added and
cast, then Hugging Face's RMSNorm in float32. On CPU the op is the three steps with XLA's psum
(its own summation order and precision), so both outputs are checked against numpy within a few
units in the last place and bit for bit against the model's unfused path. On GPU
(tests/test_gpu.py) the kernel's new residual must match numpy bit for bit and the normalised
output be within two units in the last place (the mean's summation order and the square root
differ, and two roundings follow).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import fused_add_rms_norm_reference
from jax.sharding import PartitionSpec as P

import spmd
from kernels.custom_all_reduce import fused
from kernels.symmetric_memory import Layout
from spmd.communicators import PallasCommunicator

DTYPES = [ml_dtypes.bfloat16, np.float16, np.float32]


def assert_within_two_ulps(got: np.ndarray, want: np.ndarray):
    """Two roundings follow the norm (``cast(h * rsqrt)``, then ``cast(weight * y)``): 2 ulps of slack."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    ulp = np.spacing(np.abs(want)).astype(np.float64)
    bad = np.abs(g - w) > 2 * ulp
    assert not bad.any(), f"{bad.sum()} of {bad.size} elements off by more than 2 ulps: {g[bad][:5]} vs {w[bad][:5]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [2, 4])
def test_op_matches_numpy_and_the_unfused_model_path(rng, dtype, tp):
    spmd.initialize_model_parallel(tp)
    rows, hidden, eps = 3, 256, 1e-5
    parts = rng.standard_normal((tp, rows, hidden)).astype(dtype)
    residual = rng.standard_normal((rows, hidden)).astype(dtype)
    weight = (1 + 0.1 * rng.standard_normal(hidden)).astype(dtype)

    def body(p, r, w):
        normed, h = spmd.tensor_model_parallel_all_reduce_add_rms_norm(p[0], r, w, eps)
        from models.blocks import rms_norm  # the formula the Llama layers use

        h2 = spmd.tensor_model_parallel_all_reduce(p[0]) + r
        return normed[None], h[None], rms_norm(h2, w, eps)[None], h2[None]

    spec = P("tp")
    f = jax.jit(spmd.shard_map(body, in_specs=(spec, P(), P()), out_specs=(spec,) * 4, check_vma=False))
    normed, h, normed2, h2 = (np.asarray(a) for a in f(parts, residual, weight))
    want_out, want_h = fused_add_rms_norm_reference(parts, residual, weight, eps)
    tol = 8 * float(np.finfo(dtype).eps)
    for r in range(tp):
        # XLA's psum adds in its own order and precision (float16 adds on CPU), not the kernels'
        # float32 rank order: numpy is a sanity bound here; the unfused path below is exact.
        np.testing.assert_allclose(h[r].astype(np.float32), want_h.astype(np.float32), rtol=tol, atol=tol * 4)
        np.testing.assert_allclose(normed[r].astype(np.float32), want_out.astype(np.float32), rtol=tol, atol=tol * 4)
        # the fused op's fallback is the model's unfused path, bit for bit
        np.testing.assert_array_equal(normed[r].view(np.uint8), normed2[r].view(np.uint8))
        np.testing.assert_array_equal(h[r].view(np.uint8), h2[r].view(np.uint8))


@pytest.mark.parametrize(
    ("shape", "dtype", "wdtype", "match"),
    [
        ((1, 2048), jnp.bfloat16, jnp.bfloat16, None),
        ((128, 1024), jnp.float16, jnp.float16, None),
        ((5, 512), jnp.float32, jnp.float32, None),
        ((2, 1024), jnp.float32, jnp.float32, None),  # 4 KiB rows: two tiles
        ((2, 1536), jnp.bfloat16, jnp.bfloat16, "is not 1 to 2 whole tiles"),
        ((2, 4096), jnp.bfloat16, jnp.bfloat16, "is not 1 to 2 whole tiles"),
        ((129, 2048), jnp.bfloat16, jnp.bfloat16, "129 rows"),
        ((0, 2048), jnp.bfloat16, jnp.bfloat16, "0 rows"),
        ((2, 2048), jnp.bfloat16, jnp.float32, "the norm weight is float32"),
        ((2, 2048), jnp.int32, jnp.int32, "dtype int32"),
        ((), jnp.bfloat16, jnp.bfloat16, "no hidden axis"),
    ],
)
def test_fused_ineligibility(shape, dtype, wdtype, match):
    why = fused.fused_ineligibility(shape, dtype, wdtype, Layout(max_ranks=2))
    if match is None:
        assert why is None
    else:
        assert why is not None and match in why


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize(
    ("rows", "hidden", "dtype"), [(1, 2048, jnp.bfloat16), (7, 1024, jnp.float16), (3, 512, jnp.float32)]
)
def test_the_kernel_lowers_for_cuda_as_a_local_custom_call(n, rows, hidden, dtype):
    layout = Layout(max_ranks=4)
    x = jax.ShapeDtypeStruct((rows, hidden), dtype)
    w = jax.ShapeDtypeStruct((hidden,), dtype)
    t = jax.ShapeDtypeStruct((1 + 2 * n,), jnp.int32)
    f = jax.jit(lambda x, r, w, t: fused.fused_add_rms_norm_peer(x, r, w, t, world_size=n, layout=layout, eps=1e-6))
    text = f.trace(x, x, w, t).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert text.count("stablehlo.custom_call") == 1  # one launch for the three steps
    assert "uses_xla_collective_metadata = false" in text  # a local kernel: no XLA barrier, no metadata copy


def test_kernel_errors():
    layout = Layout(max_ranks=2)
    x = jnp.zeros((2, 2048), jnp.bfloat16)
    w = jnp.ones((2048,), jnp.bfloat16)
    t = jnp.zeros((5,), jnp.int32)
    call = fused.fused_add_rms_norm_peer
    with pytest.raises(ValueError, match="expected residual"):
        call(x, x[:1], w, t, world_size=2, layout=layout, eps=1e-6)
    with pytest.raises(ValueError, match="expected residual"):
        call(x, x, w[:100], t, world_size=2, layout=layout, eps=1e-6)
    with pytest.raises(ValueError, match="whole tiles"):
        call(x[:, :1000], x[:, :1000], w[:1000], t, world_size=2, layout=layout, eps=1e-6)
    with pytest.raises(ValueError, match="table int32"):
        call(x, x, w, t[:3], world_size=2, layout=layout, eps=1e-6)
    with pytest.raises(ValueError, match="world_size=3"):
        call(x, x, w, jnp.zeros((7,), jnp.int32), world_size=3, layout=layout, eps=1e-6)


class _Buffers:
    layout = Layout(max_ranks=4)


@pytest.mark.parametrize(
    ("kw", "inputs", "match"),
    [
        ({"disable_custom_all_reduce": True}, None, "disabled"),
        ({"platform": "cpu"}, None, "no peer buffers"),
        ({"buffers": None}, None, "no peer buffers"),
        ({"world_size": 8}, None, "world size 8"),
        ({}, ((2, 2048), (3, 2048), (2048,)), "differ in shape"),
        ({}, ((2, 2048), (2, 2048), (1024,)), "the weight's shape"),
        ({}, ((2, 1536), (2, 1536), (1536,)), "whole tiles"),
        ({}, ((2, 2048), (2, 2048), (2048,)), None),
        ({"world_size": 4}, ((4, 2048), (4, 2048), (2048,)), None),  # 16 KiB: the table's ll range at 4 GPUs
        ({"world_size": 4}, ((16, 2048), (16, 2048), (2048,)), "does not send 65536 bytes at world size 4"),
    ],
)
def test_when_the_communicator_fuses(kw, inputs, match):
    platform = kw.get("platform", "gpu")
    comm = PallasCommunicator(
        "tp",
        kw.get("world_size", 2),
        platform=platform,
        disable_custom_all_reduce=kw.get("disable_custom_all_reduce", False),
    )
    comm.peer_buffers = kw.get("buffers", _Buffers())
    xs, rs, ws = inputs or ((2, 2048), (2, 2048), (2048,))
    why = comm.fused_ineligibility(
        jnp.zeros(xs, jnp.bfloat16), jnp.zeros(rs, jnp.bfloat16), jnp.zeros(ws, jnp.bfloat16)
    )
    if match is None:
        assert why is None
    else:
        assert why is not None and match in why


def test_check_vma_keeps_the_three_steps():
    comm = PallasCommunicator("tp", 2, platform="gpu")
    comm.peer_buffers = _Buffers()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    seen = {}

    def body(x):
        seen["why"] = comm.fused_ineligibility(x, x, x[0])
        return x

    jax.jit(spmd.shard_map(body, mesh=mesh, in_specs=P("tp"), out_specs=P("tp")))(jnp.zeros((2, 2048), jnp.bfloat16))
    assert "check_vma" in seen["why"]
