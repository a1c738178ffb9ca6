"""The low-latency manager: dispatch and combine against numpy, the GPU kernel's lowering, the flag protocol.

Experts are stand-ins (global expert ``e`` scales its rows by ``e + 1``) so a row at the wrong
expert, a token sent twice or a weight applied twice shows in the result. The numpy references
are written from the protocol's description (rows per destination in token order, grouped by
local expert source by source), not from the code under test.
"""

from __future__ import annotations

import shutil
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels import symmetric_memory
from kernels.expert_parallel import ExchangeLayout, exchange_rows_peer, symmetric_layout
from spmd.expert_parallel import (
    ExpertTokens,
    LowLatencyAll2AllManager,
    NaiveAll2AllManager,
    NaiveRoutingState,
    get_all2all_manager,
)

SPEC = P("ep")


def _mesh(ep: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:ep]), ("ep",))


def _scale(inputs: ExpertTokens, e_local: int) -> ExpertTokens:
    """Ragged rows of local expert ``e`` times ``global e + 1``."""
    ends = jnp.cumsum(inputs.group_sizes)
    local = jnp.sum(jnp.arange(inputs.tokens.shape[0])[:, None] >= ends[None, :], axis=1)
    first = jax.lax.axis_index("ep") * e_local
    scale = (first + local + 1).astype(jnp.float32)[:, None]
    return inputs.with_tokens((inputs.tokens.astype(jnp.float32) * scale).astype(inputs.tokens.dtype))


def _run(manager, ep, x, w, ids):
    """``(grouped rows, group sizes, y)`` per rank, stacked over ranks."""
    e_local = manager.num_experts // ep

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids)
        y = manager.combine(_scale(inputs, e_local), state)
        return inputs.tokens[None], inputs.group_sizes[None], y

    f = jax.jit(
        jax.shard_map(body, mesh=_mesh(ep), in_specs=(SPEC,) * 3, out_specs=(SPEC, SPEC, SPEC), check_vma=False)
    )
    g, sizes, y = f(x, w, ids)
    return np.asarray(g), np.asarray(sizes), np.asarray(y)


def _fp8_roundtrip(x: np.ndarray) -> np.ndarray:
    """Numpy's per-token e4m3: the power-of-two scale 2**p with max|x| / 2**p <= 448, round, back, cast."""
    x32 = x.astype(np.float32)
    m, e = np.frexp(np.abs(x32).max(axis=-1))
    p = np.clip(np.where(m <= 0.875, e - 9, e - 8), -126, 127)
    q = np.ldexp(x32, -p[:, None]).astype(ml_dtypes.float8_e4m3fn)
    return np.ldexp(q.astype(np.float32), p[:, None]).astype(x.dtype)


def _reference(x, w, ids, ep, e_local, fp8):
    """Per owner rank and local expert, the rows it must receive; and every token's combined output."""
    t = x.shape[0] // ep
    sent = _fp8_roundtrip(x) if fp8 else x
    groups = [[[] for _ in range(e_local)] for _ in range(ep)]
    for owner in range(ep):
        for src in range(ep):
            for tok in range(src * t, (src + 1) * t):
                if not any(i // e_local == owner for i in ids[tok]):
                    continue
                for i in ids[tok]:  # one copy per rank; each of its experts there takes the row
                    if i // e_local == owner:
                        groups[owner][i % e_local].append(sent[tok])
    y = (w.astype(np.float64)[:, :, None] * (ids + 1)[:, :, None] * sent.astype(np.float64)[:, None, :]).sum(1)
    return groups, y


def _routing(rng, kind, n, e, k, ep):
    e_local = e // ep
    if kind == "random":
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    elif kind == "duplicates_on_one_rank":  # both choices on one rank (e_local >= 2)
        r = rng.integers(0, ep, n)
        ids = np.stack([r * e_local, r * e_local + 1], axis=1)
    elif kind == "idle_rank":  # the last rank receives nothing
        ids = np.stack([rng.choice(e - e_local, k, replace=False) for _ in range(n)])
    elif kind == "all_to_one_rank":
        ids = np.stack([rng.choice(e_local, k, replace=False) + e_local * (ep - 1) for _ in range(n)])
    else:
        raise AssertionError(kind)
    w = (rng.random((n, k)) + 0.1).astype(np.float32)
    return ids.astype(np.int32), w


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("kind", ["random", "duplicates_on_one_rank", "idle_rank", "all_to_one_rank"])
@pytest.mark.parametrize(
    "dtype,fp8",
    [(ml_dtypes.bfloat16, False), (np.float32, False), (ml_dtypes.bfloat16, True)],
    ids=["bf16", "f32", "fp8"],
)
def test_dispatch_and_combine_match_numpy(ep, kind, dtype, fp8, rng):
    t, h, e, k = 5, 24, 2 * ep, 2
    x = rng.standard_normal((ep * t, h)).astype(np.float32).astype(dtype)
    ids, w = _routing(rng, kind, ep * t, e, k, ep)
    manager = LowLatencyAll2AllManager(e, max_tokens=t + 3, use_fp8=fp8, tp_axis=None)
    g, sizes, y = _run(manager, ep, x, w, ids)
    groups, want = _reference(x, w, ids, ep, e // ep, fp8)
    for r in range(ep):
        assert sizes[r].tolist() == [len(rows) for rows in groups[r]]
        got = g[r][: sizes[r].sum()]
        flat = [row for rows in groups[r] for row in rows]
        np.testing.assert_array_equal(got, np.asarray(flat, dtype).reshape(-1, h))  # the same bits
        assert not np.any(g[r][sizes[r].sum() :].astype(np.float32))  # padding rows are zeros
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("max_tokens", [4, None])
def test_exactly_max_tokens_and_a_rank_with_no_routed_tokens(max_tokens, rng):
    ep, t, h, e = 2, 4, 8, 4
    x = rng.standard_normal((ep * t, h)).astype(np.float32)
    ids, w = _routing(rng, "all_to_one_rank", ep * t, e, 2, ep)
    ids[:t] = -1  # rank 0's slots all invalid inside jit: it sends nothing, drops all
    _, sizes, y = _run(LowLatencyAll2AllManager(e, max_tokens=max_tokens, tp_axis=None), ep, x, w, ids)
    valid = (ids >= 0).astype(np.float64)
    want = ((w * valid)[:, :, None] * (np.clip(ids, 0, None) + 1)[:, :, None] * x[:, None, :]).sum(1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert sizes[0].sum() == 0 and sizes[1].sum() == 2 * t  # rank 1's own tokens, both choices


def test_more_than_max_tokens_raises_or_falls_back(rng):
    ep, t, h, e = 2, 6, 8, 4
    x = rng.standard_normal((ep * t, h)).astype(np.float32)
    ids, w = _routing(rng, "random", ep * t, e, 2, ep)
    with pytest.raises(ValueError, match=r"6 tokens on this rank is more than max_tokens=5; raise max_tokens"):
        _run(LowLatencyAll2AllManager(e, max_tokens=5, tp_axis=None), ep, x, w, ids)
    manager = LowLatencyAll2AllManager(e, max_tokens=5, fallback="naive", tp_axis=None)
    states = []

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids)
        states.append(state)
        return manager.combine(inputs.with_tokens(inputs.tokens * 1.0), state)

    f = jax.jit(jax.shard_map(body, mesh=_mesh(ep), in_specs=(SPEC,) * 3, out_specs=SPEC, check_vma=False))
    y = np.asarray(f(x, w, ids))
    assert isinstance(states[0], NaiveRoutingState)  # the fallback routed it: nothing lost
    np.testing.assert_allclose(y, (w[:, :, None] * x[:, None, :]).sum(1), rtol=1e-5, atol=1e-5)


def test_bit_exact_against_naive_and_the_same_bits_every_run(rng):
    """Small integers and power-of-two weights: every order gives the same sum, so a misrouted row cannot hide."""
    ep, t, h, e, k = 4, 7, 32, 8, 2
    x = rng.integers(-6, 7, (ep * t, h)).astype(ml_dtypes.bfloat16)
    ids, _ = _routing(rng, "random", ep * t, e, k, ep)
    w = rng.choice([0.25, 0.5, 1.0], (ep * t, k)).astype(np.float32)
    _, _, ours = _run(LowLatencyAll2AllManager(e, tp_axis=None), ep, x, w, ids)
    _, _, again = _run(LowLatencyAll2AllManager(e, tp_axis=None), ep, x, w, ids)

    def naive(x, w, ids):
        m = NaiveAll2AllManager(e, tp_axis=None)
        inputs, state = m.dispatch(x, w, ids)
        scale = (jax.lax.axis_index("ep") * (e // ep) + jnp.arange(e // ep) + 1).astype(jnp.float32)
        return m.combine(
            inputs.with_tokens((inputs.tokens.astype(jnp.float32) * scale[:, None, None]).astype(x.dtype)), state
        )

    ref = np.asarray(
        jax.jit(jax.shard_map(naive, mesh=_mesh(ep), in_specs=(SPEC,) * 3, out_specs=SPEC, check_vma=False))(x, w, ids)
    )
    np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))
    np.testing.assert_array_equal(ours.view(np.uint16), again.view(np.uint16))


# The GPU kernel: lowering for CUDA on CPU -------------------------------------------------------------


def _lower_exchange(ep, lay, bufs, form="push"):
    def f(send, counts):
        r, c = exchange_rows_peer(send[0], counts[0], bufs.peer_table("ep"), layout=lay, form=form)
        return r[None], c[None]

    mesh = _mesh(ep)
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(SPEC, SPEC), out_specs=(SPEC, SPEC), check_vma=False))
    s = jax.ShapeDtypeStruct((ep, ep, lay.max_rows, lay.row_words), jnp.uint32, sharding=jax.NamedSharding(mesh, SPEC))
    c = jax.ShapeDtypeStruct((ep, ep), jnp.int32, sharding=jax.NamedSharding(mesh, SPEC))
    return g.trace(s, c).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("form", ["push", "pull"])
@pytest.mark.parametrize("ep,rows,words,chunks", [(2, 16, 12, 2), (4, 128, 3600, 16), (8, 1, 4, 1), (2, 33, 516, 5)])
def test_exchange_kernel_lowers_for_cuda_as_a_local_kernel(ep, rows, words, chunks, form):
    lay = ExchangeLayout(ep, rows, words, chunks)
    bufs = symmetric_memory.allocate(_mesh(ep), "ep", symmetric_layout(lay.end, ep))
    text = _lower_exchange(ep, lay, bufs, form)
    assert "mosaic_gpu" in text and "uses_xla_collective_metadata = false" in text
    assert not any(f"stablehlo.{op}" in text for op in ("all_reduce", "all_gather", "collective_permute", "all_to_all"))


def test_pull_form_is_its_own_kernel():
    """The pull form lowers to another program than the push form (the addresses differ), same operands."""
    lay = ExchangeLayout(4, 8, 12, 2)
    bufs = symmetric_memory.allocate(_mesh(4), "ep", symmetric_layout(lay.end, 4))
    assert _lower_exchange(4, lay, bufs, "pull") != _lower_exchange(4, lay, bufs, "push")


@pytest.mark.parametrize("combine_form", ["push", "pull"])
def test_manager_peer_path_lowers_for_cuda(monkeypatch, rng, combine_form):
    """The whole dispatch + combine with the kernel as the wire: two Mosaic GPU calls, no XLA collective."""
    ep, t, h, e = 2, 8, 64, 4
    mesh = _mesh(ep)
    from kernels.expert_parallel import exchange
    from spmd.expert_parallel import allocate_low_latency_buffers

    forms = []
    real = exchange._exchange_body
    monkeypatch.setattr(exchange, "_exchange_body", lambda lay, t, form: forms.append(form) or real(lay, t, form))
    bufs = allocate_low_latency_buffers(mesh, max_tokens=t, hidden=h, top_k=2, dtype=jnp.bfloat16)
    manager = LowLatencyAll2AllManager(e, buffers=bufs, wire="peer", tp_axis=None, combine_form=combine_form)
    with pytest.raises(ValueError, match=r"wire='peer' but the kernel cannot run: the buffers' devices are \['cpu'\]"):
        _run(manager, ep, np.ones((ep * t, h), ml_dtypes.bfloat16), *_routing(rng, "random", ep * t, e, 2, ep)[::-1])
    monkeypatch.setattr(LowLatencyAll2AllManager, "kernel_ineligibility", lambda self, *a: None)

    def body(x, w, ids):
        inputs, state = manager.dispatch(x, w, ids)
        return manager.combine(inputs, state)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(SPEC,) * 3, out_specs=SPEC, check_vma=False))
    sh = jax.NamedSharding(mesh, SPEC)
    args = [
        jax.ShapeDtypeStruct((ep * t, h), jnp.bfloat16, sharding=sh),
        jax.ShapeDtypeStruct((ep * t, 2), jnp.float32, sharding=sh),
        jax.ShapeDtypeStruct((ep * t, 2), jnp.int32, sharding=sh),
    ]
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2 and "stablehlo.all_to_all" not in text
    assert forms == ["push", combine_form]  # dispatch always pushes; the combine in the form asked for


def test_kernel_ineligibility_reasons(rng):
    """Each rule of the kernel's eligibility, with stand-in buffers on "GPU" devices where a rule needs them."""
    import types

    ep = 2
    mesh = _mesh(ep)
    small = symmetric_memory.allocate(mesh, "ep", symmetric_layout(4096, ep))
    gpu = types.SimpleNamespace(platform="gpu")
    fake_mesh = types.SimpleNamespace(devices=np.array([gpu, gpu]), axis_names=("ep",))
    room = symmetric_layout(1 << 20, ep)

    def fake(group=("ep",), mesh=fake_mesh, layout=room):
        return types.SimpleNamespace(mesh=mesh, group=group, layout=layout)

    def probe(manager, t=4, h=16):
        out = []

        def body(x):
            out.append(manager.kernel_ineligibility(t, h, 2, jnp.bfloat16))
            return x

        jax.shard_map(body, mesh=mesh, in_specs=SPEC, out_specs=SPEC, check_vma=False)(np.zeros(ep, np.float32))
        return out[0]

    def ll(**kw):
        return LowLatencyAll2AllManager(4, tp_axis=None, **kw)

    assert "no peer buffers" in probe(ll())
    assert "not NVIDIA GPUs" in probe(ll(buffers=small))
    assert "serve the group ('tp',)" in probe(ll(buffers=fake(group=("tp",))))
    other = types.SimpleNamespace(devices=np.array([[gpu, gpu]]), axis_names=("dp", "ep"))
    assert "allocated for another mesh" in probe(ll(buffers=fake(mesh=other)))
    assert "5 tokens is more than max_tokens=4" in probe(ll(buffers=fake(), max_tokens=4), t=5)
    assert "these shapes need" in probe(ll(buffers=fake(layout=symmetric_layout(4096, ep))), h=4096)
    assert probe(ll(buffers=fake(), max_tokens=4)) is None


# Errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "expected a positive int max_tokens or None, got 0"),
        ({"max_tokens": True}, "expected a positive int max_tokens or None, got True"),
        ({"wire": "nvlink"}, r"expected wire in \('auto', 'peer', 'all_to_all'\), got 'nvlink'"),
        (
            {"fallback": "low_latency"},
            r"expected fallback None or one of \[.capacity., .naive., .ragged.\], got .low_latency.",
        ),
        ({"fallback": "fast"}, "expected fallback None or one of"),
        ({"chunks": 0}, "expected a positive int chunks or None, got 0"),
        ({"use_fp8": 1}, "expected use_fp8 True or False, got 1"),
        ({"combine_form": "both"}, r"expected combine_form in \('push', 'pull'\), got 'both'"),
    ],
)
def test_manager_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_all2all_manager("low_latency", 8, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ranks": 0}, "expected ranks to be a positive int, got 0"),
        ({"row_words": 6}, "expected row_words to be a multiple of 4, got 6"),
        ({"base": 100}, "expected base to be a non-negative multiple of 4096, got 100"),
        ({"chunks": 2.0}, r"expected chunks to be a positive int, got 2.0"),
    ],
)
def test_exchange_layout_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExchangeLayout(**{"ranks": 2, "max_rows": 4, "row_words": 8, **kwargs})


@pytest.mark.parametrize(
    "send,counts,table,match",
    [
        ((2, 4, 4), (2,), (5,), r"expected send uint32\[2, 4, 8\], got uint32\[2, 4, 4\]"),
        ((2, 4, 8), (3,), (5,), r"expected counts int32\[2\], got int32\[3\]"),
        ((2, 4, 8), (2,), (3,), r"expected table int32\[5\], got int32\[3\]"),
    ],
)
def test_exchange_operand_errors(send, counts, table, match):
    lay = ExchangeLayout(2, 4, 8)
    with pytest.raises(ValueError, match=match):
        exchange_rows_peer(
            jnp.zeros(send, jnp.uint32), jnp.zeros(counts, jnp.int32), jnp.zeros(table, jnp.int32), layout=lay
        )


def test_exchange_form_error():
    ok = (jnp.zeros((2, 4, 8), jnp.uint32), jnp.zeros((2,), jnp.int32), jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"expected form in \('push', 'pull'\), got 'poll'"):
        exchange_rows_peer(*ok, layout=ExchangeLayout(2, 4, 8), form="poll")


def test_prepare_low_latency_leaves_cpu_blocks_on_their_fallback():
    from flax import nnx

    import spmd
    from models.moe import MoEBlock, prepare_low_latency

    spmd.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=4)
    block = MoEBlock(16, 32, 4, 2, manager="low_latency", fallback="naive", rngs=nnx.Rngs(0))
    other = MoEBlock(16, 32, 4, 2, manager="naive", rngs=nnx.Rngs(1))
    assert prepare_low_latency(block, max_tokens=8) == [
        "block: no buffers (the mesh's devices are ['cpu'], not NVIDIA GPUs)"
    ]
    assert prepare_low_latency(other, max_tokens=8) == []
    assert block.manager.buffers is None and block.manager.max_tokens is None


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas (CUDA toolkit)")
def test_inline_ptx_assembles_for_sm90(tmp_path):
    """Every inline PTX block of the exchange kernel, twice in one kernel (labels must stay local)."""
    from kernels.expert_parallel import exchange

    def inline(template, regs):
        for k in range(len(regs) - 1, -1, -1):  # $10 before $1
            template = template.replace(f"${k}", regs[k])
        return template

    body = []
    for _ in range(2):
        body.append(inline(exchange._WAIT_PTX, ["%rd1", "%r1", "%rd2"]))
        body.append(inline(exchange._SIGNAL_PTX, ["%rd1", "%r1"]))
        body.append(inline(exchange._LOAD16_PTX, ["%r2", "%r3", "%r4", "%r5", "%rd1"]))
        body.append(inline(exchange._LOAD16_VOLATILE_PTX, ["%r2", "%r3", "%r4", "%r5", "%rd1"]))
        body.append(inline(exchange._STORE16_PTX, ["%rd1", "%r2", "%r3", "%r4", "%r5"]))
        body.append(inline(exchange._COUNTER_LOAD_PTX, ["%r6", "%rd1"]))
        body.append(inline(exchange._ROWCOUNT_STORE_PTX, ["%rd1", "%r1"]))
        body.append(inline(exchange._ROWCOUNT_LOAD_PTX, ["%r6", "%rd1"]))
        body.append(inline(exchange._PLAIN_STORE_PTX, ["%rd1", "%r1"]))
        body.append(inline(exchange._COUNTER_STORE_PTX, ["%rd1", "%r1"]))
    ptx = (
        ".version 8.0\n.target sm_90a\n.address_size 64\n"
        ".visible .entry probe(.param .u64 p0)\n{\n.reg .b32 %r<8>;\n.reg .b64 %rd<4>;\n"
        "ld.param.u64 %rd1, [p0];\nmov.u32 %r1, 7;\nmov.u64 %rd2, 1000;\n" + "\n".join(body) + "\nret;\n}\n"
    )
    src = tmp_path / "probe.ptx"
    src.write_text(ptx)
    r = subprocess.run(
        ["ptxas", "-arch=sm_90a", str(src), "-o", str(tmp_path / "probe.cubin")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + ptx


def test_spin_timeout_from_env_reaches_the_kernel(monkeypatch):
    """$SPMD_EP_SPIN_TIMEOUT_NS bounds the spin (the GPU check sets 2 s); a bad value names the variable."""
    from kernels.expert_parallel import exchange

    monkeypatch.delenv(exchange.TIMEOUT_ENV, raising=False)
    assert exchange.spin_timeout_ns() == 20_000_000_000
    monkeypatch.setenv(exchange.TIMEOUT_ENV, "2000000000")
    assert exchange.spin_timeout_ns() == 2_000_000_000
    seen = []
    real = exchange._exchange_body
    monkeypatch.setattr(exchange, "_exchange_body", lambda lay, t, form: seen.append(t) or real(lay, t, form))
    lay = ExchangeLayout(2, 4, 4, 1)
    bufs = symmetric_memory.allocate(_mesh(2), "ep", symmetric_layout(lay.end, 2))
    _lower_exchange(2, lay, bufs)
    assert seen == [2_000_000_000]
    for bad in ("2s", "0", "-5"):
        monkeypatch.setenv(exchange.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="SPMD_EP_SPIN_TIMEOUT_NS: expected a positive number of nanoseconds"):
            exchange.spin_timeout_ns()
