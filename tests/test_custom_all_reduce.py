"""Custom all-reduce: the kernels' algorithm in Pallas TPU interpret mode (races detected), planning, dispatch, errors.

The kernels live in ``kernels.custom_all_reduce`` (JAX only); the decision and the psum fallback in
``spmd.communicators.allreduce_plan`` (re-exported by ``spmd.communicators``).

Interpret mode simulates every device's memory, remote DMAs and semaphores. Its global thread
barrier needs every simulated device's computation running at once; on a 2-core machine (CI)
4 devices do and 8 deadlock, so world size 8 runs only where 8 or more cores are available (it
was run on a lent machine's CPUs).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

import spmd
from kernels.custom_all_reduce import all_reduce_kernel, make_plan, reference_all_reduce
from spmd.communicators import (
    TUNING_PATH,
    TuningEntry,
    allreduce_plan,
    custom_all_reduce,
    ineligibility,
    select_algorithm,
    should_use_custom_all_reduce,
    tuning,
    tuning_table,
)

RACES = pltpu.InterpretParams(detect_races=True)
EIGHT = pytest.param(
    8,
    marks=pytest.mark.skipif(
        len(os.sched_getaffinity(0)) < 8, reason="8 interpreted devices need 8 cores (the interpreter's thread barrier)"
    ),
)
SPEC = P(spmd.MESH_AXES)


def _run(fn, x):
    body = lambda t: jax.tree.map(lambda v: v[None], fn(jax.tree.map(lambda v: v[0], t)))
    f = jax.jit(spmd.shard_map(body, in_specs=SPEC, out_specs=SPEC, check_vma=False))
    return jax.tree.map(np.asarray, f(x))


@pytest.mark.parametrize("tp", [2, 4, EIGHT])
@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((3, 104), ml_dtypes.bfloat16), ((1000,), np.float32), ((2, 8, 64), np.float16)],
    ids=["bf16-3x104", "f32-1000", "f16-2x8x64"],
)
def test_kernel_matches_reference_bitwise(tp, algorithm, shape, dtype, rng):
    spmd.initialize_model_parallel(tp)
    x = rng.standard_normal((8, *shape)).astype(np.float32).astype(dtype)
    out, ref = _run(
        lambda v: (custom_all_reduce(v, "tp", algorithm=algorithm, interpret=RACES), reference_all_reduce(v, "tp")), x
    )
    assert out.dtype == np.dtype(dtype) and out.shape == x.shape
    for g in range(8 // tp):
        ranks = range(g * tp, (g + 1) * tp)
        dense = x[list(ranks)].astype(np.float64).sum(0)
        for r in ranks:
            np.testing.assert_array_equal(out[r].view(np.uint8), ref[r].view(np.uint8))  # rank-ordered f32 sum
            np.testing.assert_array_equal(out[r].view(np.uint8), out[g * tp].view(np.uint8))  # same bits everywhere
            np.testing.assert_allclose(out[r].astype(np.float64), dense, rtol=1e-2, atol=1e-2)


def test_pytree_is_packed_per_dtype_and_correct(rng):
    spmd.initialize_model_parallel(4)
    tree = {
        "a": rng.standard_normal((8, 40)).astype(np.float32),
        "b": rng.standard_normal((8, 3, 8)).astype(ml_dtypes.bfloat16),
        "c": rng.standard_normal((8, 24)).astype(np.float32),
    }
    jaxpr = str(
        jax.make_jaxpr(
            spmd.shard_map(
                lambda t: custom_all_reduce(t, "tp", algorithm="one_shot"), in_specs=P(), out_specs=P(), check_vma=False
            )
        )(jax.tree.map(lambda v: v[0], tree))
    )
    assert jaxpr.count("pallas_call") == 2  # one launch for the two f32 leaves, one for bf16
    out = _run(lambda t: custom_all_reduce(t, "tp", algorithm="one_shot", interpret=RACES), tree)
    for k, v in tree.items():
        for g in (0, 4):
            np.testing.assert_allclose(
                out[k][g].astype(np.float64), v[g : g + 4].astype(np.float64).sum(0), rtol=1e-2, atol=1e-2
            )


def test_many_calls_in_a_loop(rng):
    spmd.initialize_model_parallel(2)
    x = rng.standard_normal((8, 256)).astype(np.float32)

    def body(v):
        step = lambda i, a: custom_all_reduce(a, "tp", algorithm="two_shot") * 0.5
        return jax.lax.fori_loop(0, 3, step, v)

    out = _run(body, x)
    for g in range(4):
        np.testing.assert_allclose(out[2 * g], x[2 * g : 2 * g + 2].mean(0), rtol=1e-5, atol=1e-6)


def test_auto_and_xla_use_psum_on_cpu(rng):
    spmd.initialize_model_parallel(4)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    for algorithm in ("auto", "xla"):
        f = spmd.shard_map(
            lambda v, algorithm=algorithm: custom_all_reduce(v, "tp", algorithm=algorithm), in_specs=P(), out_specs=P()
        )
        text = str(jax.make_jaxpr(f)(x[0]))
        assert "psum" in text and "pallas_call" not in text
    out = _run(lambda v: custom_all_reduce(v, "tp"), x)
    np.testing.assert_allclose(out[0], x[:4].sum(0), rtol=1e-5, atol=1e-5)


def test_size_one_axis():
    spmd.initialize_model_parallel(1)
    x = np.arange(16.0, dtype=np.float32).reshape(8, 2)
    np.testing.assert_array_equal(_run(lambda v: custom_all_reduce(v, "tp", algorithm="one_shot"), x), x)


@pytest.mark.parametrize(
    "shape,dtype,world,platform,why",
    [
        ((64,), np.int32, 4, "gpu", "dtype int32 is not one of"),
        ((64,), np.float32, 3, "gpu", "world size 3 is not one of"),
        ((0,), np.float32, 4, "gpu", "the input is empty"),
        ((3,), np.float32, 4, "gpu", "12 bytes is not a multiple of 16"),
        ((64,), np.float32, 4, "metal", "platform 'metal' has no custom all-reduce kernel"),
    ],
)
def test_ineligibility_reasons(shape, dtype, world, platform, why):
    assert why in ineligibility(shape, dtype, world, platform)
    assert select_algorithm(shape, dtype, world, platform) == "xla"


def test_gpu_kernels_across_processes_depend_on_the_buffers(monkeypatch):
    monkeypatch.setattr(allreduce_plan, "_process_count", lambda: 2)
    assert ineligibility((64,), np.float32, 2, "gpu") is None  # the group's peer buffers decide (test_peer_all_reduce)
    assert ineligibility((64,), np.float32, 2, "tpu") is None


TWO_KERNELS = ["one_shot", "two_shot"]  # a GPU row must list the two-shot for auto to pick it
TABLE = {
    "platforms": {
        "gpu": {
            "4": {"max_bytes": 1 << 20, "one_shot_max_bytes": 1 << 16, "source": "test", "algorithms": TWO_KERNELS},
            "8": {"max_bytes": 0, "one_shot_max_bytes": 0, "source": "test"},
        }
    }
}


def test_tuning_table_drives_auto(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(TABLE))
    assert select_algorithm((1024,), jnp.bfloat16, 4, "gpu", tuning=path) == "one_shot"  # 2 KiB
    assert select_algorithm((1 << 15,), jnp.bfloat16, 4, "gpu", tuning=path) == "one_shot"  # 64 KiB: the switch
    assert select_algorithm(((1 << 15) + 8,), jnp.bfloat16, 4, "gpu", tuning=path) == "two_shot"  # 64 KiB + 16 B
    assert select_algorithm((1 << 16,), jnp.bfloat16, 4, "cuda", tuning=path) == "two_shot"  # 128 KiB
    assert select_algorithm((1 << 19,), jnp.bfloat16, 4, "gpu", tuning=path) == "two_shot"  # 1 MiB: the max
    assert select_algorithm((1 << 20,), jnp.bfloat16, 4, "gpu", tuning=path) == "xla"  # 2 MiB > max
    assert select_algorithm((1024,), jnp.bfloat16, 8, "gpu", tuning=path) == "xla"  # measured slower: never
    assert select_algorithm((1024,), jnp.bfloat16, 2, "gpu", tuning=path) == "xla"  # not measured: never
    assert select_algorithm((1024,), jnp.bfloat16, 4, "tpu", tuning=path) == "xla"  # no TPU rows: never
    assert should_use_custom_all_reduce(jax.ShapeDtypeStruct((1024,), jnp.bfloat16), 4, "gpu", tuning=path)
    assert not should_use_custom_all_reduce(jax.ShapeDtypeStruct((1024,), jnp.int32), 4, "gpu", tuning=path)
    # The default table is read from TUNING_PATH at call time.
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    assert select_algorithm((1024,), jnp.bfloat16, 4, "gpu") == "one_shot"
    assert tuning_table() == {
        ("gpu", 4): TuningEntry(1 << 20, 1 << 16, "test", algorithms=("one_shot", "two_shot")),
        ("gpu", 8): TuningEntry(0, 0, "test", algorithms=("one_shot",)),  # no "algorithms": a one-shot-era GPU row
    }


def test_shipped_tuning_table_is_well_formed():
    assert TUNING_PATH.name == "custom_all_reduce_tuning.json" and TUNING_PATH.parent.name == "communicators"
    table = tuning_table()
    assert table, "the shipped table has GPU rows"
    for (platform, world), entry in table.items():
        assert platform in ("gpu", "tpu") and world in (2, 4, 8)
        assert 0 <= entry.one_shot_max_bytes <= entry.max_bytes and entry.source


@pytest.mark.parametrize(
    "text,match",
    [
        ("[1, 2]", "to hold {'platforms'"),
        ('{"platforms": {"gpu": {"2": {"max_bytes": 16}}}}', "KeyError.*one_shot_max_bytes"),
        ("not json", "JSONDecodeError"),
        ('{"platforms": {"gpu": {"2": {"max_bytes": 16, "one_shot_max_bytes": 32}}}}', "one_shot_max_bytes <= max"),
    ],
)
def test_malformed_tuning_table_raises(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        tuning_table(path)


def test_missing_tuning_table_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        tuning_table(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "numel,dtype,world,rows,row_tile",
    [
        (1000, np.float32, 4, 32, 8),  # ceil(1000 / 128) = 8 rows -> one quantum of 4 * 8
        (312, ml_dtypes.bfloat16, 2, 32, 16),  # 3 rows -> one quantum of 2 * 16 (a (16, 128) bf16 tile)
        (128 * 33, np.float32, 2, 48, 8),  # 33 rows -> three quanta of 2 * 8
        (1, np.float16, 8, 128, 16),  # one element still fills a quantum of 8 * 16 rows
    ],
)
def test_plan_tiles_for_every_rank(numel, dtype, world, rows, row_tile):
    plan = make_plan(numel, dtype, world)
    assert (plan.rows, plan.row_tile) == (rows, row_tile)
    assert plan.padded_numel == rows * 128 and plan.rows_per_rank == rows // world


def test_kernel_directly_matches_numpy(rng):
    """``kernels.custom_all_reduce.all_reduce_kernel`` alone (no dispatch) on a 2-D input."""
    spmd.initialize_model_parallel(2)
    x = rng.standard_normal((8, 5, 24)).astype(np.float32)
    out = _run(lambda v: all_reduce_kernel(v, "tp", algorithm="two_shot", lowering="tpu", interpret=RACES), x)
    for g in range(4):
        np.testing.assert_allclose(out[2 * g], x[2 * g] + x[2 * g + 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"algorithm": "auto", "lowering": "tpu"}, r"expected algorithm in \('one_shot', 'two_shot'\), got 'auto'"),
        ({"algorithm": "one_shot", "lowering": "cpu"}, r"expected lowering in \('gpu', 'tpu'\), got 'cpu'"),
        ({"algorithm": "one_shot", "lowering": "gpu", "interpret": RACES}, "Mosaic GPU lowering has no interpret"),
    ],
)
def test_kernel_entry_errors(kwargs, match):
    spmd.initialize_model_parallel(2)
    f = spmd.shard_map(lambda v: all_reduce_kernel(v, "tp", **kwargs), in_specs=P(), out_specs=P(), check_vma=False)
    with pytest.raises(ValueError, match=match):
        jax.make_jaxpr(f)(jnp.ones(64, jnp.float32))


def test_gpu_lowering_needs_buffers_and_takes_both_kernels():
    """The Mosaic GPU lowering traces on CPU (tests/test_peer_all_reduce.py lowers it for CUDA)."""
    from kernels import symmetric_memory

    spmd.initialize_model_parallel(2, devices=jax.devices()[:2])
    bufs = symmetric_memory.allocate(spmd.get_mesh(), "tp")

    def traced(**kw):
        f = spmd.shard_map(
            lambda v: all_reduce_kernel(v, "tp", lowering="gpu", **kw), in_specs=P(), out_specs=P(), check_vma=False
        )
        return jax.make_jaxpr(f)(jnp.ones(1000, jnp.bfloat16))

    for algorithm in ("one_shot", "two_shot"):  # 1000 elements: padded to a whole 2 KiB tile, then cut
        jaxpr = traced(algorithm=algorithm, buffers=bufs)
        assert "inline_mgpu" in str(jaxpr)
        assert jaxpr.out_avals[0].shape == (1000,) and jaxpr.out_avals[0].dtype == jnp.bfloat16
        with pytest.raises(ValueError, match="the GPU lowering needs the mesh's peer buffers"):
            traced(algorithm=algorithm)


@pytest.mark.multiprocess
def test_kernels_package_imports_only_jax():
    """``kernels`` is a leaf: importing it (GPU lowering included) loads no ``spmd`` module."""
    code = (
        "import sys, kernels.custom_all_reduce as k, kernels.custom_all_reduce.peer, kernels.custom_all_reduce.tpu\n"
        "import kernels.custom_all_reduce.two_shot\n"
        "import kernels.symmetric_memory\n"
        "bad = sorted(m for m in sys.modules if m == 'spmd' or m.startswith('spmd.'))\n"
        "assert not bad, bad\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for path in (root / "kernels").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.lstrip().startswith(("import spmd", "from spmd")), f"{path}: {line}"


@pytest.mark.parametrize(
    "kwargs,x,match",
    [
        ({"algorithm": "fast"}, np.ones((8, 64), np.float32), "unknown algorithm 'fast'"),
        ({"algorithm": "one_shot"}, np.ones((8, 64), np.int32), "cannot take 64 elements of int32 .* dtype int32"),
        ({"algorithm": "two_shot"}, np.ones((8, 3), np.float32), "12 bytes is not a multiple of 16"),
        ({"algorithm": "one_shot", "platform": "metal"}, np.ones((8, 64), np.float32), "no custom all-reduce kernel"),
    ],
)
def test_forced_kernel_on_bad_input_raises(kwargs, x, match):
    spmd.initialize_model_parallel(4)
    with pytest.raises(ValueError, match=match):
        _run(lambda v: custom_all_reduce(v, "tp", **kwargs), x)


def test_forced_kernel_under_check_vma_raises_and_auto_falls_back(rng):
    spmd.initialize_model_parallel(2)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    forced = spmd.shard_map(
        lambda v: custom_all_reduce(v, "tp", algorithm="one_shot"), in_specs=P(None, "tp"), out_specs=P()
    )
    with pytest.raises(ValueError, match=r"check_vma=True.*pass check_vma=False"):
        forced(x)
    auto = jax.jit(spmd.shard_map(lambda v: custom_all_reduce(v, "tp"), in_specs=P(None, "tp"), out_specs=P()))
    np.testing.assert_allclose(auto(x), x[:, :128] + x[:, 128:], rtol=1e-6)


def test_unbound_axis():
    with pytest.raises(spmd.UnboundAxisError, match="custom_all_reduce: found an unbound axis name"):
        custom_all_reduce(jnp.ones(64), "tp")


def test_inside_a_model_step(rng):
    """A jitted TP MLP step whose row-parallel all-reduce is the custom kernel matches the dense MLP."""
    spmd.initialize_model_parallel(4)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    w1 = rng.standard_normal((32, 64)).astype(np.float32) / 6
    w2 = rng.standard_normal((64, 32)).astype(np.float32) / 8

    def step(x, w1_shard, w2_shard):
        h = jax.nn.gelu(x @ w1_shard)  # column parallel
        return custom_all_reduce(h @ w2_shard, "tp", algorithm="one_shot", interpret=RACES)  # row parallel

    f = jax.jit(spmd.shard_map(step, in_specs=(P(), P(None, "tp"), P("tp", None)), out_specs=P(), check_vma=False))
    np.testing.assert_allclose(np.asarray(f(x, w1, w2)), jax.nn.gelu(x @ w1) @ w2, rtol=1e-4, atol=1e-4)
