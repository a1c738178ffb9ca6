"""The GEMV's SwiGLU prologue (the MLP's activation built inside the down projection) against float64
numpy, its rounding against XLA's unfused ``jax.nn.silu(gate) * up``, its table key, and the MLP's choice."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels.gemv import GemvConfig, gemv, load_table, lookup
from kernels.gemv.ops import swiglu
from models import decode_kernels


@pytest.fixture(autouse=True)
def _exact_float32_products():
    with jax.default_matmul_precision("highest"):
        yield


def _np_round(v: np.ndarray, dtype) -> np.ndarray:
    return v.astype(np.float32).astype(dtype).astype(np.float64)


def _np_swiglu(gate_up: np.ndarray, dtype) -> np.ndarray:
    """numpy: the partials summed in float32, then silu(gate) * up with each step rounded to ``dtype``."""
    summed = gate_up.astype(np.float32).sum(axis=0, dtype=np.float32).astype(np.float64)
    k = summed.shape[-1] // 2
    g, u = _np_round(summed[..., :k], dtype), _np_round(summed[..., k:], dtype)
    sig = _np_round(1.0 / (1.0 + np.exp(-g)), dtype)
    return _np_round(_np_round(g * sig, dtype) * u, dtype)


def _operands(rng, s, m, k, n, layout, dtype):
    gate_up = (rng.standard_normal((s, m, 2 * k)) * 1.5).astype(np.float32)
    w = (rng.standard_normal((k, n) if layout == "kn" else (n, k)) * k**-0.5).astype(dtype)
    w64 = w.astype(np.float64)
    ref = _np_swiglu(gate_up, dtype) @ (w64 if layout == "kn" else w64.T)
    return jnp.asarray(gate_up), jnp.asarray(w), ref


SWIGLU_SHAPES = [
    (1, 1, 256, 128, GemvConfig(64, 32, 2)),
    (4, 1, 512, 64, GemvConfig(32, 64, 4)),  # gate and up blocks 4 apart
    (2, 1, 128, 64, GemvConfig(64, 128, 1)),
    (2, 5, 256, 128, GemvConfig(128, 32, 4)),  # the tensor-core path, rows padded
    (1, 33, 64, 32, GemvConfig(32, 16, 2)),
]
# Every shape in float32; in bfloat16 the fast lane keeps one M = 1 loop (the first) and one tensor-core case (the
# last, rows padded), the full suite runs the rest (the same code paths with bfloat16 weights).
SWIGLU_CASES = [(np.float32, *shape) for shape in SWIGLU_SHAPES] + [
    pytest.param(ml_dtypes.bfloat16, *shape, marks=() if i in (0, 4) else pytest.mark.slow)
    for i, shape in enumerate(SWIGLU_SHAPES)
]


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize(("dtype", "s", "m", "k", "n", "config"), SWIGLU_CASES)
def test_swiglu_prologue_matches_float64_reference(rng, layout, s, m, k, n, config, dtype):
    gate_up, w, ref = _operands(rng, s, m, k, n, layout, dtype)
    y = gemv(gate_up, w, config=config, layout=layout, prologue="swiglu", out_dtype=jnp.float32, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    tol = 1e-4 if dtype == np.float32 else 2e-2  # bf16: the activation's inputs to the tensor cores are bf16
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=tol * np.abs(ref).max())
    parts = gemv(gate_up, w, config=config, layout=layout, prologue="swiglu", reduce=False, interpret=True)
    assert parts.shape == (config.splits, m, n) and parts.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(parts).sum(0), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert gemv(gate_up, w, config=config, layout=layout, prologue="swiglu", interpret=True).dtype == w.dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_swiglu_rounds_as_xla_rounds_the_unfused_activation(rng, dtype):
    g = jnp.asarray(rng.standard_normal(4096) * 4, jnp.float32)
    u = jnp.asarray(rng.standard_normal(4096) * 4, jnp.float32)
    gd, ud = g.astype(dtype), u.astype(dtype)
    xla = np.asarray(jax.jit(lambda a, b: jax.nn.silu(a) * b)(gd, ud), np.float64)
    mine = np.asarray(jax.jit(lambda a, b: swiglu(a, b, dtype))(g, u), np.float64)
    ref = _np_swiglu(np.concatenate([np.asarray(g), np.asarray(u)])[None], jnp.dtype(dtype))
    ulp = np.abs(xla) * 2.0 ** -jnp.finfo(dtype).nmant
    # XLA rounds its own way (fused steps; on CPU a float16 sigmoid under 6e-5 is flushed to zero): close
    assert np.all(np.abs(mine - xla) <= 4 * ulp + 1e-4 * np.abs(xla).max())
    if dtype == jnp.float32:
        np.testing.assert_allclose(mine, ref, rtol=4e-7, atol=1e-7)  # exp's last bits differ from numpy's float64
    else:  # rounded after each step, as documented: numpy's steps to the bit
        np.testing.assert_array_equal(mine, ref)


def test_swiglu_prologue_errors(rng):
    w = jnp.ones((64, 32), jnp.float32)
    cfg = GemvConfig(32, 16, 2)
    with pytest.raises(ValueError, match=r"prologue 'gelu' is not one of \('none', 'swiglu'\)"):
        gemv(jnp.ones((1, 64)), w, config=cfg, prologue="gelu", interpret=True)
    with pytest.raises(
        ValueError, match=r"expects gate/up partials \[S, M, 2K\] and a 2-D weight, got shapes \(1, 128\) and"
    ):
        gemv(jnp.ones((1, 128)), w, config=cfg, prologue="swiglu", interpret=True)
    with pytest.raises(ValueError, match=r"got shapes \(1, 1, 127\)"):
        gemv(jnp.ones((1, 1, 127)), w, config=cfg, prologue="swiglu", interpret=True)
    with pytest.raises(ValueError, match=r"x is \[1, 32\] but the weight \(kn\) is \(64, 32\): K differs"):
        gemv(jnp.ones((1, 1, 64)), w, config=cfg, prologue="swiglu", interpret=True)
    with pytest.raises(ValueError, match=r"swiglu_matmul_partials: gate/up partials \(1, 1, 64\) do not match"):
        decode_kernels.swiglu_matmul_partials(jnp.ones((1, 1, 64)), w)


def _entry(**kw):
    base = dict(
        device_kind="NVIDIA H200", dtype="bfloat16", layout="kn", k=8192, n=2048, rows=[1, 1],
        config=dict(block_n=64, block_k=64, splits=8, num_warps=4, num_stages=3), us=10.0, xla_us=14.0,
    )  # fmt: skip
    return {**base, **kw}


def test_the_table_keeps_prologue_entries_apart(tmp_path):
    path = tmp_path / "t.json"
    fused = GemvConfig(32, 128, 4, 4, 3)
    path.write_text(json.dumps({"entries": [_entry(), _entry(prologue="swiglu", config=fused.__dict__)]}))
    entries = load_table(path)
    assert entries[0].prologue == "none" and entries[1].to_dict()["prologue"] == "swiglu"
    args = ("NVIDIA H200", "bfloat16", "kn", 1, 8192, 2048)
    assert lookup(entries, *args) == GemvConfig(64, 64, 8, 4, 3)
    assert lookup(entries, *args, "swiglu") == fused
    plain = tmp_path / "plain.json"  # (load_table caches per path)
    plain.write_text(json.dumps({"entries": [_entry()]}))
    assert lookup(load_table(plain), *args, "swiglu") is None  # not measured with the prologue: apart
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [_entry(prologue="gelu")]}))
    with pytest.raises(ValueError, match="entry 0 is not a valid GEMV table entry: prologue 'gelu' is not one of"):
        load_table(bad)


def test_the_shipped_table_lists_no_unmeasured_prologue():
    """A prologue entry names the run that measured it against the activation and product apart."""
    for e in load_table():
        assert e.prologue in ("none", "swiglu") and (e.config is None or e.us < e.xla_us), e


@pytest.mark.parametrize("mode", ["xla", "interpret"])
def test_swiglu_matmul_partials_in_every_mode_equals_the_reference(rng, mode):
    gate_up, w, ref = _operands(rng, 2, 3, 128, 64, "kn", np.float32)
    with decode_kernels.kernel_mode(mode):
        chosen = decode_kernels.choose_gemv(3, 128, 64, jnp.float32, prologue="swiglu")
        parts = jax.jit(decode_kernels.swiglu_matmul_partials)(gate_up, w)
    assert (chosen is None) == (mode == "xla")
    np.testing.assert_allclose(np.asarray(parts).sum(0), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_auto_mode_on_cpu_keeps_the_activation_apart():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("auto mode reads the device's table")
    assert decode_kernels.choose_gemv(1, 8192, 2048, jnp.bfloat16, prologue="swiglu") is None


def test_the_bench_writes_prologue_entries_beside_plain_ones(tmp_path):
    from models import bench_gemv

    path = tmp_path / "table.json"
    row = dict(layout="kn", k=8192, n=2048, m=1, xla_us=14.0, best_us=10.0, best=GemvConfig(32, 128, 4).__dict__)
    bench_gemv._write_table(path, [row, {**row, "prologue": "swiglu", "best_us": 15.0}], "NVIDIA H200")
    bench_gemv._write_table(path, [{**row, "best_us": 9.0}], "NVIDIA H200")  # replaces the plain entry only
    entries = load_table(path)
    got = sorted((e.prologue, e.us, e.config is None) for e in entries)
    assert got == [("none", 9.0, False), ("swiglu", 15.0, True)]
    assert lookup(entries, "NVIDIA H200", "bfloat16", "kn", 1, 8192, 2048, "swiglu") is None  # apart was faster


@pytest.mark.parametrize("m", [1, 2, 32])
def test_swiglu_prologue_lowers_for_cuda(m):
    """The Pallas-to-Triton lowering runs here (no GPU needed): both kernel bodies take the prologue's refs."""
    x = jax.ShapeDtypeStruct((4, m, 16384), jnp.float32)
    w = jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16)
    f = jax.jit(lambda x, w: gemv(x, w, config=GemvConfig(64, 64, 8), prologue="swiglu", reduce=False))
    try:
        text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # newer JAX asks the GPU for its compute capability while lowering Triton
        if "No supported GPU devices" not in str(e):
            raise
        pytest.skip("this JAX lowers Triton only with a GPU present")
    assert "triton" in text.lower()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 32])
def test_swiglu_prologue_compiles_and_matches_on_the_gpu(rng, m):
    """The 1B Llama's down projection (8192 x 2048, bf16) with the prologue, compiled for the device."""
    s, k, n = 4, 8192, 2048
    gate_up, w, ref = _operands(rng, s, m, k, n, "kn", ml_dtypes.bfloat16)
    for config in (GemvConfig(64, 64, 8), GemvConfig(32, 128, 4, 8, 3)):
        y = gemv(gate_up, w, config=config, prologue="swiglu", out_dtype=jnp.float32)
        got = np.asarray(y, np.float64)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2, config
