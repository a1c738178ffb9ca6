"""The GPU two-shot kernel on CPU: its Mosaic GPU module built for CUDA, its errors, and when the plan picks it.

The kernel runs only on NVIDIA GPUs (tests/test_gpu.py, tests/workers/gpu_mp_all_reduce.py). Here it is
lowered for CUDA as the one-shot is (tests/test_peer_all_reduce.py): a local custom call, and the
Mosaic GPU module before serialisation verified, with its two flag rounds. The protocol itself is
emulated in tests/test_two_shot_protocol.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import spmd
from kernels import symmetric_memory
from kernels.custom_all_reduce import all_reduce_kernel
from kernels.custom_all_reduce.two_shot import two_shot_peer
from kernels.symmetric_memory import Layout, _registry
from spmd.communicators import allreduce_plan, auto_algorithms, custom_all_reduce, tuning


def _mesh(n):
    return jax.make_mesh((n,), ("tp",), devices=jax.devices()[:n], axis_types=(AxisType.Explicit,))


@pytest.fixture
def mosaic_modules(monkeypatch):
    """The Mosaic GPU modules built while lowering, as text, each verified (before serialisation)."""
    from jax.experimental.mosaic.gpu import core

    seen = []
    real = getattr(core, "_run_serde_pass", None)
    if real is None:
        return None  # another JAX: the lowering is still checked, the module text is not

    def spy(module, **kw):
        module.operation.verify()
        seen.append(str(module))
        return real(module, **kw)

    monkeypatch.setattr(core, "_run_serde_pass", spy)
    return seen


@pytest.mark.parametrize(
    "n,dtype,numel",
    [
        (2, jnp.bfloat16, 8192),  # 16 KiB: 8 blocks of one tile, each rank half a tile per block
        (4, jnp.float32, 3 * 512 + 4),  # uneven: padded to 4 tiles
        (8, jnp.bfloat16, 1 << 20),  # 2 MiB: 8 tiles per block, 128 units per rank
        (2, jnp.float16, 2048 * 131),  # 262 tiles: padded to 264, 3 tiles per block (two rounds)
    ],
)
def test_two_shot_lowers_for_cuda_as_a_local_kernel(n, dtype, numel, mosaic_modules):
    mesh = _mesh(n)
    bufs = symmetric_memory.allocate(mesh, "tp")
    fn = lambda v: all_reduce_kernel(v, "tp", algorithm="two_shot", lowering="gpu", buffers=bufs)
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
    x = jax.ShapeDtypeStruct((n * numel,), dtype, sharding=jax.NamedSharding(mesh, P("tp")))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "uses_xla_collective_metadata = false" in text
    assert not any(f"stablehlo.{op}" in text for op in ("all_reduce", "all_gather", "collective_permute", "all_to_all"))
    if mosaic_modules is not None:
        (module,) = mosaic_modules
        assert module.count("fence.acq_rel.sys") == 2  # two flag rounds, each a release ...
        assert module.count("ld.acquire.sys.global.b32") == 2  # ... and a bounded acquire spin
        assert module.count("ld.volatile.global.v4.b32") > 0  # peers' data never from a stale L1 line
        assert module.count("st.relaxed.gpu.global.b32") == 1  # the epoch counter, moved once


def _traced(fn, *args):
    mesh = _mesh(2)
    specs = tuple(P() for _ in args)
    return jax.make_jaxpr(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))(*args)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: (jnp.ones((2, 1024), jnp.float32), t, {}), r"expected a 1-D input, got shape \(2, 1024\)"),
        (lambda t: (jnp.ones(1024, jnp.int32), t, {}), r"expected a dtype in \['bfloat16', 'float16', 'float32'\]"),
        (lambda t: (jnp.ones(1024, jnp.float32), t[:3], {}), r"expected table int32\[5\], got int32\[3\]"),
        (lambda t: (jnp.ones(1000, jnp.float32), t, {}), "4000 bytes cannot be staged in whole blocks"),
        (lambda t: (jnp.ones(262 * 512, jnp.float32), t, {}), "pad it with kernels.custom_all_reduce.peer.padded_plan"),
        (lambda t: (jnp.ones(2**20, jnp.float32), t, {}), "4194304 bytes cannot be staged in whole blocks"),
        (
            lambda t: (jnp.ones(1024, jnp.float32), jnp.zeros(7, jnp.int32), {"world_size": 3}),
            r"expected a world_size dividing 128 and at most layout.max_ranks=4, got 3",
        ),
        (
            lambda t: (jnp.ones(1024, jnp.float32), jnp.zeros(11, jnp.int32), {"world_size": 5}),
            r"dividing 128 and at most layout.max_ranks=4, got 5",
        ),
    ],
)
def test_two_shot_errors(make, match):
    layout = Layout(max_ranks=4)

    def f():
        x, t, kw = make(jnp.zeros(5, jnp.int32))
        return two_shot_peer(x, t, **{"world_size": 2, "layout": layout, **kw})

    with pytest.raises(ValueError, match=match):
        _traced(f)


def test_gpu_lowering_refuses_more_than_the_staging_area():
    bufs = symmetric_memory.allocate(_mesh(2), "tp")
    fn = lambda v: all_reduce_kernel(v, "tp", algorithm="two_shot", lowering="gpu", buffers=bufs)
    with pytest.raises(ValueError, match=r"4194320 bytes per device is more than the peer buffers stage \(2097152"):
        _traced(fn, jnp.ones(2**20 + 4, jnp.float32))


# ---------------------------------------------------------------------------------------------
# When the plan picks it: only where a table row that measured it says so; always when forced


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(allreduce_plan, "_device_platform", lambda x: "gpu")
    monkeypatch.setattr(_registry, "REGISTRY", _registry.Registry())
    spmd.initialize_model_parallel(2, devices=jax.devices()[:2])
    symmetric_memory.allocate(spmd.get_mesh(), "tp")


def _write(tmp_path, name, row):
    path = tmp_path / name
    path.write_text(json.dumps({"platforms": {"gpu": {"2": row}}}))
    return str(path)


def _picks(numel, table, **kw):
    """``(auto_algorithms, the traced program)`` for ``numel`` bf16 elements per device on the faked GPU."""
    spec = P(spmd.MESH_AXES)
    got = []

    def body(v):
        got.append(auto_algorithms(v[0], 2, "gpu", tuning=table, axis_name="tp"))
        return custom_all_reduce(v[0], "tp", platform="gpu", tuning=table, **kw)[None]

    f = spmd.shard_map(body, in_specs=spec, out_specs=spec, check_vma=False)
    text = str(jax.make_jaxpr(f)(jnp.ones((2, numel), jnp.bfloat16)))
    return got[0], text


ROW = {"max_bytes": 1 << 21, "one_shot_max_bytes": 1 << 17, "ll_max_bytes": 1 << 15, "source": "test"}


def test_auto_picks_two_shot_only_where_a_row_that_measured_it_says_so(on_gpu, tmp_path):
    measured = _write(tmp_path, "measured.json", {**ROW, "algorithms": ["one_shot", "two_shot"]})
    unmeasured = _write(tmp_path, "unmeasured.json", ROW)  # no "algorithms": a GPU row of the one-shot era
    one_only = _write(tmp_path, "one_only.json", {**ROW, "algorithms": ["one_shot"]})
    assert _picks(1 << 16, measured)[0] == ["one_shot"]  # 128 KiB: up to one_shot_max_bytes
    algos, jaxpr = _picks((1 << 16) + 8, measured)  # 128 KiB + 16 B: above it
    assert algos == ["two_shot"] and "inline_mgpu" in jaxpr and "psum" not in jaxpr
    for table in (unmeasured, one_only):  # the same size goes to psum: two-shot was never timed there
        algos, jaxpr = _picks((1 << 16) + 8, table)
        assert algos == ["xla"] and "psum" in jaxpr and "inline_mgpu" not in jaxpr
        assert _picks(1 << 16, table)[0] == ["one_shot"]
    why = tuning.auto_choice(((1 << 16) + 8,), jnp.bfloat16, 2, "gpu", tuning=unmeasured)[1]
    assert "which its measurement did not time (algorithms ['one_shot']); psum until it is measured" in why
    forced = _picks((1 << 16) + 8, unmeasured, algorithm="two_shot")[1]  # forced: no row needed
    assert "inline_mgpu" in forced and "psum" not in forced


def test_the_shipped_table_never_picks_two_shot():
    for (platform, n), entry in tuning.tuning_table().items():
        assert platform != "gpu" or "two_shot" not in entry.algorithms, (platform, n)
        for nbytes in range(16, entry.max_bytes + 1, 4096):
            algo = tuning.select_algorithm((nbytes // 2,), jnp.bfloat16, n, platform)
            assert algo in entry.algorithms or algo == "xla"


def test_rows_without_algorithms_keep_their_old_meaning_off_gpu(tmp_path):
    path = tmp_path / "tpu.json"
    path.write_text(json.dumps({"platforms": {"tpu": {"2": {"max_bytes": 4096, "one_shot_max_bytes": 1024}}}}))
    assert tuning.tuning_table(str(path))[("tpu", 2)].algorithms == ("one_shot", "two_shot")
    assert tuning.select_algorithm((1024,), np.float32, 2, "tpu", tuning=str(path)) == "two_shot"
    assert tuning.default_algorithms("cuda") == ("one_shot",)


@pytest.mark.parametrize("bad", [["three_shot"], "one_shot", ["one_shot", 2]])
def test_a_row_listing_unknown_algorithms_is_refused(tmp_path, bad):
    path = tmp_path / f"bad{abs(hash(str(bad)))}.json"
    path.write_text(json.dumps({"platforms": {"gpu": {"2": {**ROW, "algorithms": bad}}}}))
    with pytest.raises(ValueError, match=r"expected algorithms to be a list of names from \['one_shot', 'two_shot'\]"):
        tuning.tuning_table(str(path))


def test_the_bench_writes_the_kernels_it_timed_into_the_row(tmp_path):
    """``--write-tuning``: the two-shot enters a row only when it was timed, and then auto picks it."""
    from spmd.bench import custom_all_reduce as bench

    def rows(with_two_shot):
        out = []
        for size, times in (
            (1 << 16, {"xla": 10, "pull": 5, "two_shot": 7}),
            (1 << 19, {"xla": 16, "pull": 10, "two_shot": 7}),
        ):
            for variant, us in times.items():
                if variant != "two_shot" or with_two_shot:
                    out.append({"world": 2, "bytes": size, "variant": variant, "us": us, "ok": True})
        return out  # fmt: skip

    meta = {"device_kind": "test card", "date": "2026-12-04T00:00", "command": "test"}
    for with_two_shot, want in ((True, ["one_shot", "two_shot"]), (False, ["one_shot"])):
        path = tmp_path / f"t{with_two_shot}.json"
        table = bench._write_tuning(path, rows(with_two_shot), [2], "gpu", meta)
        row = table["platforms"]["gpu"]["2"]
        assert row["algorithms"] == want
        pick = tuning.select_algorithm((1 << 18,), jnp.bfloat16, 2, "gpu", tuning=str(path))  # 512 KiB
        assert pick == ("two_shot" if with_two_shot else "one_shot")
