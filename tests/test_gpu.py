"""GPU-only checks (skipped on CPU): the Mosaic GPU one-shot on persistent peer buffers, every local GPU.

Run on a GPU machine with ``JAX_PLATFORMS=cuda python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fused_add_rms_norm_reference
from jax.sharding import PartitionSpec as P

import spmd
from kernels.custom_all_reduce import reference_all_reduce
from spmd.communicators import PallasCommunicator, custom_all_reduce

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    return len([d for d in jax.devices() if d.platform == "gpu"])


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize("numel", [1024, 3 * 1024 + 64, 131 * 1024 + 8, 1 << 19, 1 << 20])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float16])
def test_mosaic_gpu_kernels_bitwise(algorithm, numel, dtype, rng):
    if numel * np.dtype(dtype).itemsize > 2 * 1024 * 1024:
        pytest.skip("larger than the peer buffers stage")
    n = _gpus()
    if n < 2:
        pytest.skip("needs 2 GPUs")
    spmd.initialize_model_parallel(n)
    x = rng.standard_normal((n, numel)).astype(np.float32).astype(dtype)
    spec = P(spmd.MESH_AXES)
    f = jax.jit(
        spmd.shard_map(
            lambda v: (
                custom_all_reduce(v[0], "tp", algorithm=algorithm)[None],
                reference_all_reduce(v[0], "tp")[None],
            ),
            in_specs=spec,
            out_specs=(spec, spec),
            check_vma=False,
        )
    )
    for _ in range(3):  # repeated calls: no stale staging or semaphore state
        out, ref = (np.asarray(a) for a in f(x))
        np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))
        for r in range(n):
            np.testing.assert_array_equal(out[r].view(np.uint8), out[0].view(np.uint8))
    np.testing.assert_allclose(out[0].astype(np.float64), x.astype(np.float64).sum(0), rtol=2e-2, atol=2e-2 * n)


def test_gpu_communicator_all_reduce_matches_psum(rng):
    n = _gpus()
    if n < 2:
        pytest.skip("needs 2 GPUs")
    spmd.initialize_model_parallel(n)
    assert isinstance(spmd.get_tp_group().device_communicator, PallasCommunicator)
    x = rng.standard_normal((n, 1024)).astype(np.float32).astype(jnp.bfloat16)
    spec = P(spmd.MESH_AXES)
    f = jax.jit(
        spmd.shard_map(
            lambda v: spmd.tensor_model_parallel_all_reduce(v[0])[None], in_specs=spec, out_specs=spec, check_vma=False
        )
    )
    out = np.asarray(f(x)).astype(np.float32)
    np.testing.assert_allclose(out[0], x.astype(np.float32).sum(0), rtol=2e-2, atol=2e-2 * n)


@pytest.mark.parametrize("n", [2, 4])
def test_ten_thousand_back_to_back_calls_of_varying_sizes(n):
    """60,000 calls (6 x 10,000 steps) in one program, one-shot and two-shot interleaved: exact sums, no hang.

    Every element differs (``iota % 1024``), so a wrong tile, lane, chunk or block slot shows, not
    only stale data from an earlier call; the values stay exact in float32. The two-shot sizes are
    uneven (not whole tiles, not whole blocks); its calls count two epochs, the one-shot's one.
    """
    if _gpus() < n:
        pytest.skip(f"needs {n} GPUs")
    spmd.initialize_model_parallel(n, devices=jax.devices()[:n])
    # float32: 2 KiB, 64 KiB, 1 MiB one-shot; 11.7 KiB, 262 KiB + 16 B, 1 MiB two-shot
    calls = ((512, "one_shot"), (16384, "one_shot"), (262144, "one_shot"), (3000, "two_shot"),
             (131 * 512 + 4, "two_shot"), (262144, "two_shot"))  # fmt: skip
    steps = 10_000

    def run(_):
        me = jax.lax.axis_index("tp").astype(jnp.float32)

        def step(i, wrong):
            fi = i.astype(jnp.float32)
            for k, (size, algorithm) in enumerate(calls):
                iota = (jnp.arange(size, dtype=jnp.int32) % 1024).astype(jnp.float32)
                y = custom_all_reduce(iota + fi + me + k, "tp", algorithm=algorithm)
                want = n * (iota + fi + k) + n * (n - 1) / 2
                wrong = wrong + jnp.sum(y != want).astype(jnp.int32)
            return wrong

        return jax.lax.fori_loop(0, steps, step, jnp.int32(0))[None]

    spec = P(spmd.MESH_AXES)
    f = jax.jit(spmd.shard_map(run, in_specs=spec, out_specs=spec, check_vma=False))
    wrong = np.asarray(f(np.zeros(n, np.float32)))
    assert wrong.tolist() == [0] * n


def test_auto_takes_the_peer_kernel_and_psum_beyond_it(rng):
    n = _gpus()
    if n < 2:
        pytest.skip("needs 2 GPUs")
    spmd.initialize_model_parallel(n)
    from spmd.communicators import auto_algorithms

    small = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    big = jax.ShapeDtypeStruct((4 << 20,), jnp.bfloat16)
    spec = P(spmd.MESH_AXES)
    got = {}
    for name, x in (("small", small), ("big", big)):
        spmd.shard_map(
            lambda v, name=name: got.setdefault(name, auto_algorithms(v[0], n, "gpu", axis_name="tp")) and v,
            in_specs=spec,
            out_specs=spec,
            check_vma=False,
        )(jnp.zeros((n, *x.shape), x.dtype))
    assert got == {"small": ["one_shot"], "big": ["xla"]}


def _within_two_ulps(got, want):
    """2 ulps for 16-bit outputs (two roundings follow the norm); 8 for float32, whose ulp is finer
    than ``rsqrt.approx.f32``'s error (measured on an H200: up to 4)."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    k = 8 if want.dtype == np.float32 else 2
    bad = np.abs(g - w) > k * np.spacing(np.abs(want)).astype(np.float64)
    assert not bad.any(), f"{bad.sum()} of {bad.size} off by more than {k} ulps: {g[bad][:5]} vs {w[bad][:5]}"


@pytest.mark.parametrize(
    ("rows", "hidden", "dtype"),
    [
        (1, 2048, jnp.bfloat16),
        (4, 1024, jnp.bfloat16),
        (128, 2048, jnp.bfloat16),
        (3, 1024, jnp.float32),
        (2, 2048, jnp.float16),
    ],
)
def test_fused_kernel_on_one_gpu(rows, hidden, dtype, rng):
    """World size 1 (the one GPU lent): the exchange with itself, the residual add and the norm, exact."""
    from jax.sharding import Mesh

    from kernels.custom_all_reduce import fused, peer
    from kernels.symmetric_memory import allocate

    if _gpus() < 1:
        pytest.skip("needs a GPU")
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    bufs = allocate(mesh, "x")
    eps = 1e-5

    def body(x, r, w):
        t = bufs.peer_table("x")
        out, h = fused.fused_add_rms_norm_peer(x, r, w, t, world_size=1, layout=bufs.layout, eps=eps)
        plain = peer.one_shot_peer(x.reshape(-1), t, world_size=1, layout=bufs.layout, protocol="ll")  # same buffers
        return out, h, plain.reshape(x.shape)

    f = jax.jit(spmd.shard_map(body, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P(), P()), check_vma=False))
    for _ in range(3):  # fresh data, repeated calls interleaved with the plain kernel
        x = rng.standard_normal((rows, hidden)).astype(np.float32).astype(dtype)
        r = rng.standard_normal((rows, hidden)).astype(np.float32).astype(dtype)
        w = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32).astype(dtype)
        out, h, plain = (np.asarray(a) for a in f(x, r, w))
        want_out, want_h = fused_add_rms_norm_reference(x[None], r, w, eps)
        np.testing.assert_array_equal(h.view(np.uint8), want_h.view(np.uint8))
        np.testing.assert_array_equal(plain.view(np.uint8), x.view(np.uint8))
        _within_two_ulps(out, want_out)


def test_fused_op_through_the_communicator(rng):
    n = _gpus()
    if n < 2:
        pytest.skip("needs 2 GPUs")
    spmd.initialize_model_parallel(n)
    rows, hidden, eps = 2, 2048, 1e-6
    parts = rng.standard_normal((n, rows, hidden)).astype(np.float32).astype(jnp.bfloat16)
    r = rng.standard_normal((rows, hidden)).astype(np.float32).astype(jnp.bfloat16)
    w = rng.standard_normal(hidden).astype(np.float32).astype(jnp.bfloat16)
    comm = spmd.get_tp_group().device_communicator
    assert comm.fused_ineligibility(jnp.asarray(r), jnp.asarray(r), jnp.asarray(w)) is None

    def body(p, r, w):
        out, h = spmd.tensor_model_parallel_all_reduce_add_rms_norm(p[0], r, w, eps)
        return out[None], h[None]

    spec = P(spmd.MESH_AXES)
    f = jax.jit(spmd.shard_map(body, in_specs=(spec, P(), P()), out_specs=(spec, spec), check_vma=False))
    out, h = (np.asarray(a) for a in f(parts, r, w))
    want_out, want_h = fused_add_rms_norm_reference(parts, r, w, eps)
    for k in range(n):
        np.testing.assert_array_equal(h[k].view(np.uint8), want_h.view(np.uint8))
        np.testing.assert_array_equal(out[k].view(np.uint8), out[0].view(np.uint8))
        _within_two_ulps(out[k], want_out)
