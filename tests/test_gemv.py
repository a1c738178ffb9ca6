"""The decode GEMV kernel (kernels/gemv) in Pallas's interpreter against float64 numpy, its tuning table,
and the layers' choice (models.decode_kernels); GPU-marked tests run the measured tilings on the device.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gemv import GemvConfig, gemv, ineligibility, load_table, lookup, reference_matmul
from models import decode_kernels


@pytest.fixture(autouse=True)
def _exact_float32_products():
    """float32 products in full precision wherever the tests run (GPUs default to TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


def _operands(rng, m, k, n, layout, dtype):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n) if layout == "kn" else (n, k)) * k**-0.5).astype(np.float32)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return x, w, x64 @ (w64 if layout == "kn" else w64.T)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize(
    ("m", "k", "n", "config"),
    [
        (1, 256, 128, GemvConfig(64, 32, 2)),
        (1, 512, 96, GemvConfig(32, 64, 8)),
        (1, 128, 64, GemvConfig(64, 128, 1)),
        (5, 256, 128, GemvConfig(128, 32, 4)),
        (16, 128, 64, GemvConfig(32, 32, 2)),
        (33, 64, 32, GemvConfig(32, 16, 2)),
    ],
)
def test_gemv_matches_float64_reference(rng, layout, m, k, n, config):
    x, w, ref = _operands(rng, m, k, n, layout, jnp.float32)
    y = gemv(x, w, config=config, layout=layout, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_gemv_bf16_accumulates_in_float32(rng, layout):
    x, w, ref = _operands(rng, 1, 1024, 64, layout, jnp.bfloat16)
    y = gemv(x, w, config=GemvConfig(32, 64, 4), layout=layout, interpret=True)
    assert y.dtype == jnp.bfloat16
    got = np.asarray(y, np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2  # bf16 rounding of the output only
    f32 = gemv(x, w, config=GemvConfig(32, 64, 4), layout=layout, out_dtype=jnp.float32, interpret=True)
    np.testing.assert_allclose(np.asarray(f32), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_reference_matmul_is_the_plain_product(rng):
    for layout in ("kn", "nk"):
        x, w, ref = _operands(rng, 3, 64, 32, layout, jnp.float32)
        np.testing.assert_allclose(np.asarray(reference_matmul(x, w, layout)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("m", "k", "n", "config", "layout", "message"),
    [
        (0, 64, 32, GemvConfig(32, 16, 1), "kn", "M=0 rows: the kernel is for 1 to 64"),
        (65, 64, 32, GemvConfig(32, 16, 1), "kn", "M=65 rows"),
        (1, 64, 32, GemvConfig(24, 16, 1), "kn", "must be powers of two"),
        (1, 64, 32, GemvConfig(32, 16, 3), "kn", "must be powers of two"),
        (1, 64, 48, GemvConfig(32, 16, 1), "kn", "N=48 is not a multiple of block_n=32"),
        (1, 64, 32, GemvConfig(32, 32, 4), "kn", "K=64 is not a multiple of splits x block_k = 128"),
        (1, 64, 32, GemvConfig(32, 16, 1), "mk", "layout 'mk' is not one of"),
    ],
)
def test_ineligible_tilings_are_named(m, k, n, config, layout, message):
    assert message in (ineligibility(m, k, n, config, layout) or "")
    if m >= 1 and layout in ("kn", "nk"):
        with pytest.raises(ValueError, match="gemv: .*" + re.escape(message)):
            gemv(jnp.ones((m, k)), jnp.ones((k, n)), config=config, layout=layout, interpret=True)


def test_gemv_rejects_mismatched_operands():
    with pytest.raises(ValueError, match=r"x is \[1, 64\] but the weight \(kn\) is \(32, 16\): K differs"):
        gemv(jnp.ones((1, 64)), jnp.ones((32, 16)), config=GemvConfig(16, 16, 1), interpret=True)
    with pytest.raises(ValueError, match=r"expected x\[M, K\] and a 2-D weight"):
        gemv(jnp.ones((64,)), jnp.ones((64, 16)), config=GemvConfig(16, 16, 1), interpret=True)


def _entry(**kw):
    base = dict(
        device_kind="NVIDIA H200", dtype="bfloat16", layout="kn", k=2048, n=3072, rows=[1, 1],
        config=dict(block_n=64, block_k=64, splits=8, num_warps=4, num_stages=3), us=6.0, xla_us=22.0,
    )  # fmt: skip
    return {**base, **kw}


def test_table_lookup_picks_by_device_dtype_layout_shape_and_rows(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": [_entry(), _entry(rows=[2, 16], config=None), _entry(n=2048)]}))
    entries = load_table(path)
    want = GemvConfig(64, 64, 8, 4, 3)
    assert lookup(entries, "NVIDIA H200", "bfloat16", "kn", 1, 2048, 3072) == want
    assert lookup(entries, "NVIDIA H200", "bfloat16", "kn", 8, 2048, 3072) is None  # XLA measured faster
    assert lookup(entries, "NVIDIA H200", "bfloat16", "kn", 17, 2048, 3072) is None  # not measured
    assert lookup(entries, "NVIDIA H100", "bfloat16", "kn", 1, 2048, 3072) is None
    assert lookup(entries, "NVIDIA H200", "float32", "kn", 1, 2048, 3072) is None
    assert lookup(entries, "NVIDIA H200", "bfloat16", "nk", 1, 2048, 3072) is None
    assert lookup(entries, "NVIDIA H200", "bfloat16", "kn", 1, 2048, 2048) == want


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry(rows=[0, 1]), r"entry 0 is not a valid GEMV table entry: layout 'kn' or rows \(0, 1\) out of range"),
        (_entry(layout="x"), "layout 'x'"),
        (_entry(n=100), "N=100 is not a multiple of block_n=64"),
        ({"k": 1}, "entry 0 is not a valid GEMV table entry"),
    ],
)
def test_table_rejects_bad_entries(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"entries": [entry]}))
    with pytest.raises(ValueError, match=message):
        load_table(path)
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="expected a JSON object with a list 'entries'"):
        load_table(path)


def test_shipped_table_loads_and_every_entry_beats_xla():
    entries = load_table()
    for e in entries:
        assert e.config is None or e.us < e.xla_us, e


def test_layers_choose_xla_on_cpu_and_the_kernel_when_asked():
    if jax.devices()[0].platform == "cpu":
        assert decode_kernels.choose_gemv(1, 2048, 3072, jnp.bfloat16) is None  # no table entry applies
    with decode_kernels.kernel_mode("interpret"):  # any shape the kernel tiles, a default tiling
        assert decode_kernels.choose_gemv(1, 256, 96, jnp.float32) == GemvConfig(32, 64, 2)
        assert decode_kernels.choose_gemv(65, 256, 96, jnp.float32) is None  # prefill-sized: XLA
    with decode_kernels.kernel_mode("xla"):
        assert decode_kernels.choose_gemv(1, 256, 96, jnp.float32) is None
    with pytest.raises(ValueError, match=r"kernel_mode: expected one of \('auto', 'xla', 'pallas', 'interpret'\)"):
        with decode_kernels.kernel_mode("gpu"):
            pass


@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_matmul_with_the_kernel_equals_reference(rng, layout):
    x, w, ref = _operands(rng, 2 * 3, 128, 64, layout, jnp.float32)
    with decode_kernels.kernel_mode("interpret"):
        y = jax.jit(lambda x, w: decode_kernels.matmul(x.reshape(2, 3, 128), w, layout=layout))(x, w)
    assert y.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(y).reshape(6, 64), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.gpu
def test_measured_tilings_on_the_gpu(rng):
    """Every tiling the table picks for this GPU, run for real against float64 numpy."""
    kind = jax.devices()[0].device_kind
    entries = [e for e in load_table() if e.device_kind == kind and e.config is not None]
    if not entries:
        pytest.skip(f"the GEMV table has no entry for {kind}")
    for e in entries:
        m = e.rows[0]
        x, w, ref = _operands(rng, m, e.k, e.n, e.layout, jnp.dtype(e.dtype))
        y = np.asarray(gemv(x, w, config=e.config, layout=e.layout, out_dtype=jnp.float32), np.float64)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2, e


def test_attention_kernel_mode_by_dtype_and_shape():
    mode = decode_kernels.decode_attention_mode
    if jax.devices()[0].platform == "cpu":
        assert mode(32, 8, 64, 256, jnp.bfloat16) is None  # auto on CPU: XLA's path
    with decode_kernels.kernel_mode("interpret"):
        assert mode(32, 8, 64, 256, jnp.float32) == "interpret"
        assert mode(32, 8, 16, 256, jnp.bfloat16) is None  # head_dim too small for the kernel
    with decode_kernels.kernel_mode("xla"):
        assert mode(32, 8, 64, 256, jnp.bfloat16) is None
