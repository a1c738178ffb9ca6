"""The raw-pointer one-shot all-reduce (kernels.custom_all_reduce.peer) and its peer buffers, on CPU.

The kernel itself runs only on NVIDIA GPUs (tests/test_gpu.py); here: its plan, the buffer layout
and address table (against numpy), its lowering for CUDA (the Mosaic GPU module is built), the
dispatch rules and the inline PTX (assembled by ptxas where installed). The flag protocol itself
is emulated in tests/test_pull_protocol.py (and with the two-shot in tests/test_two_shot_protocol.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import spmd
from kernels import symmetric_memory
from kernels.custom_all_reduce import peer, peer_ir
from kernels.symmetric_memory import TILE_BYTES, Layout, _registry
from spmd.communicators import allreduce_plan, custom_all_reduce


def _mesh(shape, names):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, devices=jax.devices()[:n], axis_types=(AxisType.Explicit,) * len(shape))


# ---------------------------------------------------------------------------------------------
# Plan and layout


@pytest.mark.parametrize(
    "nbytes,kwargs,want",
    [
        (2048, {}, (1, 1)),
        (8192, {}, (4, 1)),
        (128 * 2048, {}, (128, 1)),
        (256 * 2048, {}, (128, 2)),
        (1024 * 2048, {}, (128, 8)),
        (3 * 2048, {}, (3, 1)),
        (8192, {"tiles_per_block": 4}, (1, 4)),
        (8192, {"tiles_per_block": 3}, None),
        (1025 * 2048, {}, None),  # more than 128 blocks x 8 tiles
        (2048 + 16, {}, None),  # not whole tiles
        (0, {}, None),
        (256 * 2048, {"protocol": "ll"}, (128, 2)),
        (129 * 2048, {"protocol": "ll"}, None),  # 129 tiles: neither 1 nor 2 per block fits 128 blocks
        (129 * 2048, {}, (43, 3)),
        (8192, {"protocol": "ll", "tiles_per_block": 4}, None),
    ],
)
def test_plan_peer(nbytes, kwargs, want):
    got = peer.plan_peer(nbytes, Layout(), **kwargs)
    assert (None if got is None else (got.blocks, got.tiles_per_block)) == want


def test_layout_offsets_and_errors():
    lay = Layout(max_blocks=4, tiles_per_block_max=2, max_ranks=8)
    assert lay.slot_bytes == 2 * TILE_BYTES
    assert lay.max_message_bytes == 4 * 2 * TILE_BYTES
    assert lay.flags_offset == 2 * 4 * 2 * TILE_BYTES
    assert lay.counters_offset == lay.flags_offset + 4 * 4 * 8
    assert lay.inbox_offset == 4096 * -(-(lay.counters_offset + 4 * 4) // 4096)
    assert lay.inbox_slot_bytes == 2 * 2 * TILE_BYTES
    assert lay.nbytes == lay.inbox_offset + 2 * 4 * 8 * lay.inbox_slot_bytes
    assert lay.ll_max_message_bytes == 4 * 2 * TILE_BYTES
    assert Layout().max_message_bytes == 2 * 1024 * 1024
    assert Layout().ll_max_message_bytes == 512 * 1024
    for bad in ({"max_blocks": 0}, {"tiles_per_block_max": -1}, {"max_ranks": True}, {"max_blocks": 2.0}):
        with pytest.raises(ValueError, match=r"expected .* to be a positive int"):
            Layout(**bad)


# ---------------------------------------------------------------------------------------------
# Buffers and the address table


def _table(bufs, mesh, axis):
    f = jax.jit(
        jax.shard_map(lambda: bufs.peer_table(axis)[None], mesh=mesh, in_specs=(), out_specs=P(mesh.axis_names))
    )
    return np.asarray(f())


@pytest.mark.parametrize(
    "shape,names,axis", [((2, 2), ("dp", "tp"), "tp"), ((2, 2), ("dp", "tp"), "dp"), ((1, 4), ("dp", "tp"), "tp"),
                         ((2, 2), ("dp", "tp"), ("dp", "tp")), ((4,), ("tp",), "tp")],
)  # fmt: skip
def test_peer_table_holds_rank_and_group_addresses(shape, names, axis):
    mesh = _mesh(shape, names)
    bufs = symmetric_memory.allocate(mesh, axis)
    assert symmetric_memory.allocate(mesh, axis) is bufs  # made once, then reused
    assert len(set(bufs.addresses)) == mesh.size and all(a > 0 for a in bufs.addresses)
    got = _table(bufs, mesh, axis)
    group = (axis,) if isinstance(axis, str) else axis
    ids = np.arange(mesh.size).reshape(shape)  # device positions, mesh.devices.flat order
    gaxes = [names.index(a) for a in group]
    for pos in np.ndindex(*shape):
        row = got[ids[pos]]
        members = []  # the group's devices in rank order: vary the group axes, row-major
        for sub in np.ndindex(*[shape[a] for a in gaxes]):
            q = list(pos)
            for a, v in zip(gaxes, sub, strict=True):
                q[a] = v
            members.append(ids[tuple(q)])
        rank = members.index(ids[pos])
        want = [rank]
        for m in members:
            addr = bufs.addresses[m]
            want += [np.uint32(addr & 0xFFFFFFFF).view(np.int32), np.uint32(addr >> 32).view(np.int32)]
        np.testing.assert_array_equal(row, np.array(want, np.int32))


def test_each_group_has_its_own_buffers_and_lookup_finds_them():
    mesh = _mesh((2, 2), ("rows", "cols"))
    tp, dp = symmetric_memory.allocate(mesh, "cols"), symmetric_memory.allocate(mesh, "rows")
    assert not set(tp.addresses) & set(dp.addresses)  # TP and DP never share a device's buffer
    assert tp.group == ("cols",) and tp.layout.max_ranks == 2
    assert symmetric_memory.lookup(("rows", "cols"), (2, 2), "cols") is tp
    assert symmetric_memory.lookup(("rows", "cols"), (2, 2), ("rows",)) is dp
    assert symmetric_memory.lookup(("rows", "cols"), (2, 2), ("rows", "cols")) is None
    # the same devices in another mesh shape get new buffers; the old ones stay alive
    flat = symmetric_memory.allocate(_mesh((1, 4), ("rows", "cols")), "cols")
    assert symmetric_memory.lookup(("rows", "cols"), (2, 2), "cols") is tp and flat is not tp
    with pytest.raises(ValueError, match=r"these buffers serve the group \('cols',\), got axis_name='rows'"):
        _table(tp, mesh, "rows")


@pytest.mark.parametrize(
    "axis,layout,match",
    [
        ("ep", None, r"expected axis_name to name axes of the mesh \('tp',\), got 'ep'"),
        ((), None, "expected axis_name to name axes of the mesh"),
        ("tp", Layout(max_ranks=2), r"a group of 4 ranks is larger than layout\.max_ranks=2"),
    ],
)
def test_allocate_errors(axis, layout, match):
    with pytest.raises(ValueError, match=match):
        symmetric_memory.allocate(_mesh((4,), ("tp",)), axis, layout)


# ---------------------------------------------------------------------------------------------
# The kernel: errors, and the Mosaic GPU module built for CUDA (it runs only on GPUs)


def _peer_fn(bufs, n, **kw):
    return lambda x: peer.one_shot_peer(x, bufs.peer_table("tp"), world_size=n, layout=bufs.layout, **kw)


@pytest.mark.parametrize(
    "mode,protocol", [("full", "ll"), ("full", "pull"), ("flags", "pull"), ("copy", "pull"), ("full", "auto")]
)
@pytest.mark.parametrize("dtype,numel", [(jnp.bfloat16, 8192), (jnp.float32, 1024), (jnp.float16, 3 * 1024)])
def test_kernel_lowers_for_cuda(mode, protocol, dtype, numel):
    mesh = _mesh((2, 2), ("dp", "tp"))
    bufs = symmetric_memory.allocate(mesh, "tp")
    spec = P(("dp", "tp"))
    fn = _peer_fn(bufs, 2, mode=mode, protocol=protocol)
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    x = jax.ShapeDtypeStruct((4 * numel,), dtype, sharding=jax.NamedSharding(mesh, spec))
    text = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    # A local kernel to XLA: no collective, no cross-device barrier, one custom call.
    assert "uses_xla_collective_metadata = false" in text
    assert not any(f"stablehlo.{op}" in text for op in ("all_reduce", "all_gather", "collective_permute", "all_to_all"))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: (jnp.ones((2, 1024), jnp.float32), t, {}), r"expected a 1-D input, got shape \(2, 1024\)"),
        (lambda t: (jnp.ones(1024, jnp.float32), t[:3], {}), r"expected table int32\[5\], got int32\[3\]"),
        (lambda t: (jnp.ones(1000, jnp.float32), t, {}), "4000 bytes cannot be staged"),
        (lambda t: (jnp.ones(1024, jnp.float32), t, {"mode": "fast"}), "expected mode in"),
        (lambda t: (jnp.ones(2**20, jnp.float32), t, {}), "4194304 bytes cannot be staged by the pull protocol"),
        (lambda t: (jnp.ones(1024, jnp.float32), t, {"protocol": "ring"}), "expected protocol in"),
        (lambda t: (jnp.ones(1024, jnp.float32), t, {"protocol": "ll", "mode": "copy"}), "measures the pull protocol"),
        (lambda t: (jnp.ones(2**18 + 512, jnp.float32), t, {"protocol": "ll"}), "cannot be staged by the ll protocol"),
    ],
)
def test_kernel_errors(make, match):
    mesh = _mesh((2,), ("tp",))
    bufs = symmetric_memory.allocate(mesh, "tp")

    def f():
        x, t, kw = make(bufs.peer_table("tp"))
        return peer.one_shot_peer(x, t, world_size=2, layout=bufs.layout, **kw)

    with pytest.raises(ValueError, match=match):
        jax.make_jaxpr(jax.shard_map(f, mesh=mesh, in_specs=(), out_specs=P(), check_vma=False))()


# ---------------------------------------------------------------------------------------------
# Dispatch on GPU devices (the device platform is faked: the kernels are only traced)


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(allreduce_plan, "_device_platform", lambda x: "gpu")
    monkeypatch.setattr(_registry, "REGISTRY", _registry.Registry())  # no buffers from earlier tests
    spmd.initialize_model_parallel(2, devices=jax.devices()[:2])  # CPU mesh: no buffers allocated off GPU


def test_dispatch_gpu_needs_buffers_then_uses_the_peer_kernel(on_gpu):
    spec = P(spmd.MESH_AXES)
    x = jnp.ones((2, 4096), jnp.bfloat16)

    def traced(**kw):
        return jax.make_jaxpr(spmd.shard_map(lambda v: custom_all_reduce(v[0], "tp", **kw)[None], in_specs=spec,
                                             out_specs=spec, check_vma=False))(x)  # fmt: skip

    mesh = spmd.get_mesh()
    assert symmetric_memory.lookup(mesh.axis_names, mesh.devices.shape, "tp") is None
    with pytest.raises(ValueError, match="no peer buffers were allocated for this group of this mesh"):
        traced(algorithm="one_shot", platform="gpu")
    assert "inline_mgpu" not in str(traced(algorithm="auto", platform="gpu"))  # psum instead
    symmetric_memory.allocate(mesh, "tp")
    assert "inline_mgpu" in str(traced(algorithm="one_shot", platform="gpu"))
    assert "inline_mgpu" in str(traced(algorithm="two_shot", platform="gpu"))  # forced: no table row needed
    big = jnp.ones((2, 2**19 + 8), jnp.float32)
    with pytest.raises(ValueError, match="more than the peer buffers stage"):
        jax.make_jaxpr(
            spmd.shard_map(
                lambda v: custom_all_reduce(v[0], "tp", algorithm="one_shot", platform="gpu")[None],
                in_specs=spec,
                out_specs=spec,
                check_vma=False,
            )
        )(big)


# ---------------------------------------------------------------------------------------------
# Dispatch in a job of several processes (the process count and device platform are faked)


def _traced_all_reduce(fn, x):
    spec = P(spmd.MESH_AXES)
    return str(jax.make_jaxpr(spmd.shard_map(lambda v: fn(v[0])[None], in_specs=spec, out_specs=spec,
                                             check_vma=False))(x))  # fmt: skip


def test_dispatch_across_processes_takes_the_kernel_only_with_buffers(on_gpu, monkeypatch):
    from spmd.communicators import PallasCommunicator

    monkeypatch.setattr(allreduce_plan, "_process_count", lambda: 2)
    x = jnp.ones((2, 4096), jnp.bfloat16)  # 8 KiB per device: in the shipped table's range at 2 ranks
    assert allreduce_plan.ineligibility((4096,), jnp.bfloat16, 2, "gpu") is None  # the buffers decide, not the count
    comm = PallasCommunicator("tp", 2, platform="gpu")
    assert comm.peer_buffers is None
    assert "inline_mgpu" not in _traced_all_reduce(comm.all_reduce, x)  # no buffers: psum
    assert "psum" in _traced_all_reduce(comm.all_reduce, x)
    with pytest.raises(ValueError, match=r"in a job of 2 processes they are shared by CUDA IPC: .*initialize_model"):
        _traced_all_reduce(lambda v: custom_all_reduce(v, "tp", algorithm="one_shot", platform="gpu"), x)
    comm.peer_buffers = symmetric_memory.allocate(spmd.get_mesh(), "tp")
    traced = _traced_all_reduce(comm.all_reduce, x)
    assert "inline_mgpu" in traced and "psum" not in traced


def test_dispatch_across_processes_never_interprets(monkeypatch, tmp_path):
    """Pallas interpret mode (the kernels on CPU devices) cannot reach another process's devices."""
    spmd.initialize_model_parallel(2, devices=jax.devices()[:2])
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"platforms": {"tpu": {"2": {"max_bytes": 1 << 20, "one_shot_max_bytes": 1 << 20}}}}))
    x = jnp.ones((2, 1024), jnp.float32)

    def auto(v):
        return custom_all_reduce(v, "tp", platform="tpu", tuning=str(path))

    assert "pallas_call" in _traced_all_reduce(auto, x)  # one process: interpreted
    monkeypatch.setattr(allreduce_plan, "_process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"Pallas interpret mode on cpu devices, which needs every device in one proc"):
        _traced_all_reduce(lambda v: custom_all_reduce(v, "tp", algorithm="one_shot", platform="tpu"), x)
    got = _traced_all_reduce(auto, x)
    assert "psum" in got and "pallas_call" not in got


@pytest.mark.parametrize("problem", [None, "process 0 holds 2 devices of the mesh"])
def test_initialize_model_parallel_shares_buffers_when_symmetric_memory_can(monkeypatch, problem):
    from spmd import compat

    calls = []

    def fake_allocate(mesh, axis_name, layout=None, *, client=None, timeout_s=None):
        calls.append((axis_name, client, timeout_s))
        return ("buffers", axis_name)

    monkeypatch.setattr(compat, "mesh_platform", lambda mesh: "gpu")
    monkeypatch.setattr(compat, "distributed_client", lambda: "the job's client")
    monkeypatch.setattr(symmetric_memory, "unsupported", lambda mesh: problem)
    monkeypatch.setattr(symmetric_memory, "allocate", fake_allocate)
    monkeypatch.setenv("SPMD_COLLECTIVE_TIMEOUT_S", "7")
    spmd.initialize_model_parallel(2, data_parallel_size=2, devices=jax.devices()[:4])
    comms = {name: getattr(spmd, f"get_{name}_group")().device_communicator for name in ("world", "dp", "tp", "pp")}
    if problem is None:  # every group of 2 to 8 ranks, in the order every process builds them
        assert calls == [(spmd.MESH_AXES, "the job's client", 7.0), ("dp", "the job's client", 7.0),
                         ("tp", "the job's client", 7.0)]  # fmt: skip
        assert comms["tp"].peer_buffers == ("buffers", "tp") and comms["pp"].peer_buffers is None
    else:
        assert calls == [] and all(c.peer_buffers is None for c in comms.values())


def test_processes_on_several_machines_leave_every_group_on_psum(monkeypatch):
    from spmd import compat

    calls = []

    def fake_allocate(mesh, axis_name, layout=None, *, client=None, timeout_s=None):
        calls.append(axis_name)
        raise symmetric_memory.NotOneHost("process 1 runs on another machine")

    monkeypatch.setattr(compat, "mesh_platform", lambda mesh: "gpu")
    monkeypatch.setattr(symmetric_memory, "unsupported", lambda mesh: None)
    monkeypatch.setattr(symmetric_memory, "allocate", fake_allocate)
    spmd.initialize_model_parallel(2, data_parallel_size=2, devices=jax.devices()[:4])
    comms = {name: getattr(spmd, f"get_{name}_group")().device_communicator for name in ("world", "dp", "tp", "pp")}
    assert calls == [spmd.MESH_AXES]  # the first group learns it; no process tries the others
    assert all(c.peer_buffers is None for c in comms.values())


# ---------------------------------------------------------------------------------------------
# The protocol switch read from the tuning row


def test_dispatch_protocol_follows_the_tuning_row(tmp_path):
    table = {"platforms": {"gpu": {"2": {"max_bytes": 1 << 21, "one_shot_max_bytes": 1 << 21, "ll_max_bytes": 8192}}}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    assert allreduce_plan._protocol(jnp.ones(4096, jnp.bfloat16), 2, str(path)) == "ll"  # 8 KiB
    assert allreduce_plan._protocol(jnp.ones(4097, jnp.bfloat16), 2, str(path)) == "pull"
    assert allreduce_plan._protocol(jnp.ones(16, jnp.bfloat16), 4, str(path)) == "auto"  # no row: the kernel picks
    row = table["platforms"]["gpu"]["2"]
    row["ll_max_bytes"] = -1
    bad = tmp_path / "bad.json"  # tables are read once per path
    bad.write_text(json.dumps(table))
    with pytest.raises(ValueError, match="expected ll_max_bytes >= 0, got -1"):
        allreduce_plan.tuning_table(str(bad))


# ---------------------------------------------------------------------------------------------
# Review fixes: sizes that need padding to split over blocks, ambiguous lookups, input checks,
# and the inline PTX assembled where ptxas is installed.


@pytest.mark.parametrize("protocol", ["pull", "ll", "auto"])
def test_padded_plan_splits_every_tile_count(protocol):
    lay = Layout()
    for tiles in range(1, lay.max_blocks * lay.tiles_per_block_max + 1):
        nbytes = tiles * TILE_BYTES - 16  # not a whole tile either
        padded, plan, proto = peer.padded_plan(nbytes, lay, protocol)
        assert proto in ("ll", "pull")
        ll = tiles <= lay.max_blocks * lay.ll_tiles_per_block_max
        assert proto == ("pull" if protocol == "pull" or not ll else "ll")
        most = lay.ll_tiles_per_block_max if proto == "ll" else lay.tiles_per_block_max
        assert plan.blocks <= lay.max_blocks and 1 <= plan.tiles_per_block <= most
        assert padded == plan.blocks * plan.tiles_per_block * TILE_BYTES >= nbytes
        assert padded - tiles * TILE_BYTES < plan.tiles_per_block * TILE_BYTES  # less than one block of padding
        assert peer.plan_peer(padded, lay, tiles_per_block=plan.tiles_per_block, protocol=proto) == plan
    assert peer.padded_plan(lay.max_message_bytes + 1, lay, "pull") is None
    assert peer.padded_plan(0, lay, "auto") is None


def test_gpu_lowering_takes_a_size_with_no_even_split():
    """262 tiles (hidden 2048 x 131 tokens of bf16) used to raise at trace time under auto."""
    from kernels.custom_all_reduce import all_reduce_kernel

    mesh = _mesh((2,), ("tp",))
    bufs = symmetric_memory.allocate(mesh, "tp")
    f = jax.shard_map(
        lambda v: all_reduce_kernel(v, "tp", algorithm="one_shot", lowering="gpu", buffers=bufs, protocol="pull"),
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
        check_vma=False,
    )
    jaxpr = jax.make_jaxpr(f)(jnp.ones(2048 * 131, jnp.bfloat16))
    assert "inline_mgpu" in str(jaxpr) and jaxpr.out_avals[0].shape == (2048 * 131,)


def test_lookup_refuses_to_guess_between_device_sets(monkeypatch, on_gpu):
    monkeypatch.setattr(_registry, "REGISTRY", _registry.Registry())
    a = jax.make_mesh((1, 1, 1, 2), spmd.MESH_AXES, devices=jax.devices()[:2], axis_types=(AxisType.Explicit,) * 4)
    b = jax.make_mesh((1, 1, 1, 2), spmd.MESH_AXES, devices=jax.devices()[2:4], axis_types=(AxisType.Explicit,) * 4)
    mine, theirs = symmetric_memory.allocate(a, "tp"), symmetric_memory.allocate(b, "tp")
    with pytest.raises(ValueError, match=r"2 meshes of axes .* have peer buffers for the group \(.tp.,\)"):
        symmetric_memory.lookup(spmd.MESH_AXES, (1, 1, 1, 2), "tp")
    spec = P(spmd.MESH_AXES)
    x = jnp.ones((2, 4096), jnp.bfloat16)

    def traced(**kw):
        f = spmd.shard_map(lambda v: custom_all_reduce(v[0], "tp", platform="gpu", **kw)[None], in_specs=spec,
                           out_specs=spec, check_vma=False)  # fmt: skip
        return str(jax.make_jaxpr(f)(x))

    assert "inline_mgpu" not in traced(algorithm="auto")  # ambiguous: psum
    with pytest.raises(ValueError, match="pass the buffers explicitly"):
        traced(algorithm="one_shot")
    assert "inline_mgpu" in traced(algorithm="one_shot", buffers=mine)
    assert theirs is not mine


@pytest.mark.parametrize(
    "dtype,world,match",
    [
        (jnp.int32, 2, r"expected a dtype in \['bfloat16', 'float16', 'float32'\], got int32"),
        (jnp.float32, 3, r"expected 1 <= world_size <= layout\.max_ranks=2, got 3"),
    ],
)
def test_kernel_refuses_dtypes_and_groups_it_cannot_take(dtype, world, match):
    mesh = _mesh((2,), ("tp",))
    bufs = symmetric_memory.allocate(mesh, "tp")

    def f():
        table = jnp.zeros((1 + 2 * world,), jnp.int32)
        return peer.one_shot_peer(jnp.ones(1024, dtype), table, world_size=world, layout=bufs.layout)

    with pytest.raises(ValueError, match=match):
        jax.make_jaxpr(jax.shard_map(f, mesh=mesh, in_specs=(), out_specs=P(), check_vma=False))()


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("ptxas") is None, reason="needs ptxas (CUDA toolkit)")
def test_inline_ptx_assembles_for_sm90(tmp_path):
    """Every inline PTX block of the kernels, twice in one kernel (labels must stay local)."""

    def inline(template, outs, ins):
        regs = [*outs, *ins]
        for k in range(len(regs) - 1, -1, -1):  # $10 before $1
            template = template.replace(f"${k}", regs[k])
        return template

    body = []
    for _ in range(2):
        body.append(inline(peer_ir.WAIT_PTX, [], ["%rd1", "%r1", "%rd2"]))
        body.append(inline(peer_ir.SIGNAL_PTX, [], ["%rd1", "%r1"]))
        body.append(inline(peer_ir.LL_WAIT_PTX, ["%r2", "%r3", "%r4", "%r5"], ["%rd1", "%r1", "%rd2"]))
        body.append(inline(peer_ir.LL_PUSH_PTX, [], ["%rd1", "%r2", "%r3", "%r4", "%r5", "%r1"]))
        for load in (peer_ir.LOAD16_PTX, peer_ir.LOAD16_VOLATILE_PTX):
            body.append(inline(load, ["%r2", "%r3", "%r4", "%r5"], ["%rd1"]))
        body.append(inline(peer_ir.STORE16_PTX, [], ["%rd1", "%r2", "%r3", "%r4", "%r5"]))
    ptx = (
        ".version 8.0\n.target sm_90a\n.address_size 64\n"
        ".visible .entry probe(.param .u64 p0)\n{\n.reg .b32 %r<8>;\n.reg .b64 %rd<4>;\n"
        "ld.param.u64 %rd1, [p0];\nmov.u32 %r1, 7;\nmov.u64 %rd2, 1000;\n" + "\n".join(body) + "\nret;\n}\n"
    )
    src = tmp_path / "probe.ptx"
    src.write_text(ptx)
    r = subprocess.run(["ptxas", "-arch=sm_90a", str(src), "-o", str(tmp_path / "probe.cubin")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr + ptx
