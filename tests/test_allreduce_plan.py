"""The custom all-reduce's plan in one place: planned once per call, the reasons it declines, who owns the buffers.

The communicators read ``if plan: run it, else psum``. These tests count the planning calls, read the
reasons a plan gives, check that a plan runs what it says (sums against numpy), and that the
communicators allocate their own peer buffers (``create``), with ``spmd.parallel_state`` only keeping
the books. Kernels run on the simulated CPU devices in Pallas's TPU interpret mode.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_array
from jax.sharding import PartitionSpec as P

import spmd
from kernels import symmetric_memory
from kernels.symmetric_memory import Layout
from spmd import compat
from spmd.communicators import (
    AllReducePlan,
    FusedPlan,
    PallasCommunicator,
    XlaCommunicator,
    allreduce_plan,
    make_group_communicators,
    plan_all_reduce,
    plan_all_reduce_add_rms_norm,
    tuning,
)

# tpu / gpu rows at world size 2: one-shot up to 1 KiB, two-shot up to 4 KiB; gpu's ll protocol up to 16 KiB.
TABLE = {
    "platforms": {
        "tpu": {"2": {"max_bytes": 4096, "one_shot_max_bytes": 1024, "source": "test"}},
        "gpu": {"2": {"max_bytes": 1 << 16, "one_shot_max_bytes": 1 << 16, "ll_max_bytes": 1 << 14, "source": "t"}},
    }
}


@pytest.fixture
def tuned(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(TABLE))
    monkeypatch.setattr(tuning, "TUNING_PATH", path)
    return path


@pytest.fixture
def plan_calls(monkeypatch):
    """A count of the planning passes (one per dtype-grouping of an input)."""
    calls = []
    real = allreduce_plan._plan_groups

    def spy(leaves, *args, **kwargs):
        calls.append(len(leaves))
        return real(leaves, *args, **kwargs)

    monkeypatch.setattr(allreduce_plan, "_plan_groups", spy)
    return calls


def _per_device(fn, x, *, check_vma=False, calls=None):
    """``fn`` on every device: ``(numpy outputs, jaxpr text)``; ``calls`` (a spy): one planning pass per trace."""
    spec = P(spmd.MESH_AXES)
    f = spmd.shard_map(lambda v: jax.tree.map(lambda o: o[None], fn(jax.tree.map(lambda a: a[0], v))),
                       in_specs=spec, out_specs=spec, check_vma=check_vma)  # fmt: skip
    jaxpr = str(jax.make_jaxpr(f)(x))  # one trace
    if calls is not None:
        assert calls == [1], f"planned {len(calls)} times in one trace"
    return jax.tree.map(np.asarray, jax.jit(f)(x)), jaxpr


def test_the_communicator_plans_once_and_runs_the_plan(tuned, plan_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = PallasCommunicator("tp", 2, platform="tpu")
    x = random_array(rng, (8, 64), np.float32)  # 256 B per device: one-shot
    out, jaxpr = _per_device(comm.all_reduce, x, calls=plan_calls)  # one planning pass, not two
    assert "pallas_call" in jaxpr and "psum" not in jaxpr
    np.testing.assert_allclose(out[::2], x[::2].astype(np.float64) + x[1::2], rtol=1e-6, atol=1e-6)


def test_a_declined_plan_plans_once_and_uses_psum(tuned, plan_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = PallasCommunicator("tp", 2, platform="tpu")
    x = random_array(rng, (8, 2048), np.float32)  # 8 KiB: over the row's 4 KiB
    out, jaxpr = _per_device(comm.all_reduce, x, calls=plan_calls)
    assert "pallas_call" not in jaxpr and "psum" in jaxpr
    np.testing.assert_allclose(out[::2], x[::2] + x[1::2], rtol=1e-6, atol=1e-6)


def test_a_disabled_communicator_never_plans(tuned, plan_calls, rng):
    spmd.initialize_model_parallel(2)
    comm = PallasCommunicator("tp", 2, platform="tpu", disable_custom_all_reduce=True)
    x = random_array(rng, (8, 64), np.float32)
    out, jaxpr = _per_device(comm.all_reduce, x)
    assert "pallas_call" not in jaxpr and plan_calls == []
    np.testing.assert_allclose(out[::2], x[::2] + x[1::2], rtol=1e-6, atol=1e-6)
    seen = []
    _per_device(lambda v: seen.append((comm.plan_all_reduce(v), comm.custom_all_reduce(v))) or v, np.ones((8, 64)))
    assert seen[0] == ("the custom all-reduce is disabled", None)


def test_a_plan_is_per_dtype_and_names_the_declined_groups(tuned, rng):
    spmd.initialize_model_parallel(2)
    tree = {
        "a": random_array(rng, (8, 40), np.float32),
        "b": rng.integers(-50, 50, (8, 24)).astype(np.int32),
        "c": random_array(rng, (8, 24), np.float32),
    }
    plans = []

    def body(t):
        plan = plan_all_reduce(t, "tp", platform="tpu")
        plans.append(plan)
        return plan(t)

    out, _ = _per_device(body, tree)
    (plan,) = plans[:1]
    assert isinstance(plan, AllReducePlan) and plan.world_size == 2 and plan.axis_name == "tp"
    assert plan.algorithms == ["one_shot", "xla"]  # dtypes in first-seen order: f32 (a and c packed), int32
    f32, i32 = plan.groups
    assert f32.leaves == (0, 2) and f32.reason is None and f32.lowering == "tpu"
    assert i32.leaves == (1,) and "dtype int32 is not one of" in i32.reason
    for k, v in tree.items():
        np.testing.assert_allclose(out[k][::2], v[::2].astype(np.float64) + v[1::2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kw", "shape", "check_vma", "why"),
    [
        ({}, (8, 2048), False, "8192 bytes per device is over the tuning table's 4096 for tpu at world size 2"),
        ({"platform": "cpu"}, (8, 64), False, "the tuning table has no row for cpu at world size 2"),
        ({}, (8, 3), False, "12 bytes is not a multiple of 16"),
        ({}, (8, 64), True, "check_vma=True"),
        ({"algorithm": "xla"}, (8, 64), False, "algorithm='xla'"),
        ({"world_size": 1}, (8, 64), False, "one rank"),
    ],
    ids=["over-max", "no-row", "unaligned", "check-vma", "xla", "one-rank"],
)
def test_plan_all_reduce_says_why_it_declines(tuned, kw, shape, check_vma, why, rng):
    spmd.initialize_model_parallel(2)
    seen = []

    def body(v):
        seen.append(plan_all_reduce(v, "tp", **{"platform": "tpu", **kw}))
        return v

    _per_device(body, random_array(rng, shape, np.float32), check_vma=check_vma)
    assert isinstance(seen[0], str) and why in seen[0], seen[0]


def test_plan_all_reduce_of_an_empty_tree_and_bad_algorithm():
    assert plan_all_reduce({}, "tp", world_size=2) == "the input has no arrays"
    with pytest.raises(ValueError, match=r"unknown algorithm 'fast'; expected one of"):
        plan_all_reduce(jnp.ones(4), "tp", world_size=2, algorithm="fast")
    with pytest.raises(spmd.UnboundAxisError):
        plan_all_reduce(jnp.ones(4), "tp")  # no world size: the axis must be bound


class _Buffers:
    layout = Layout(max_ranks=4)

    def peer_table(self, axis_name):
        return jnp.zeros((5,), jnp.int32)


def test_the_fused_path_plans_once_and_calls_the_plan(monkeypatch, tuned, plan_calls):
    """Communicator -> plan -> kernel: the fused plan (GPU buffers faked) is made once and run once."""
    comm = PallasCommunicator("tp", 2, platform="gpu", peer_buffers=_Buffers())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2048)), jnp.bfloat16)
    w = jnp.ones((2048,), jnp.bfloat16)
    ran = []
    monkeypatch.setattr(FusedPlan, "__call__", lambda self, *a: ran.append((self.world_size, a[-1])) or (a[0], a[1]))
    plan = comm.plan_all_reduce_add_rms_norm(x, x, w)
    assert isinstance(plan, FusedPlan) and plan.buffers is comm.peer_buffers and plan_calls == [1]
    assert comm.all_reduce_add_rms_norm(x, x, w, 1e-6)[0] is x
    assert ran == [(2, 1e-6)] and plan_calls == [1, 1]


def test_plan_all_reduce_add_rms_norm_reasons(tuned):
    x = jnp.zeros((2, 2048), jnp.bfloat16)
    kw = {"axis_name": "tp", "world_size": 2, "platform": "gpu", "buffers": _Buffers()}
    assert isinstance(plan_all_reduce_add_rms_norm(x, x, x[0], **kw), FusedPlan)
    assert "no peer buffers" in plan_all_reduce_add_rms_norm(x, x, x[0], **{**kw, "buffers": None})
    big = jnp.zeros((4, 2048), jnp.bfloat16)  # 16 KiB: the ll row's edge; 32 KiB below is past it
    assert isinstance(plan_all_reduce_add_rms_norm(big, big, x[0], **kw), FusedPlan)
    bigger = jnp.zeros((8, 2048), jnp.bfloat16)
    why = plan_all_reduce_add_rms_norm(bigger, bigger, x[0], **kw)
    assert why == "the tuning table does not send 32768 bytes at world size 2 to the ll kernel"


# ---------------------------------------------------------------------------------------------
# Communicators own their peer buffers


def _fake_gpu(monkeypatch, allocate):
    monkeypatch.setattr(compat, "mesh_platform", lambda mesh: "gpu")
    monkeypatch.setattr(compat, "distributed_client", lambda: "client")
    monkeypatch.setattr(symmetric_memory, "unsupported", lambda mesh: None)
    monkeypatch.setattr(symmetric_memory, "allocate", allocate)


def test_create_reads_the_mesh_and_allocates_its_own_buffers(monkeypatch):
    calls = []
    _fake_gpu(monkeypatch, lambda mesh, axis, **kw: calls.append((axis, kw["client"])) or ("buffers", axis))
    mesh = jax.make_mesh((2, 4), ("dp", "tp"), devices=jax.devices()[:8])
    comm = PallasCommunicator.create(mesh, "tp", unique_name="tp")
    assert (comm.world_size, comm.platform, comm.unique_name) == (4, "gpu", "tp")
    assert comm.peer_buffers == ("buffers", "tp") and calls == [("tp", "client")]
    both = PallasCommunicator.create(mesh, ("dp", "tp"))
    assert both.world_size == 8 and both.peer_buffers == ("buffers", ("dp", "tp"))
    for kw in ({"disable_custom_all_reduce": True}, {"allocate_peer_buffers": False}):
        assert PallasCommunicator.create(mesh, "tp", **kw).peer_buffers is None
    assert PallasCommunicator.create(jax.make_mesh((1, 8), ("dp", "tp")), "dp").peer_buffers is None  # one rank
    assert len(calls) == 2
    plain = XlaCommunicator.create(mesh, "dp")
    assert type(plain) is XlaCommunicator and plain.world_size == 2 and not hasattr(plain, "peer_buffers")


def test_create_on_cpu_or_an_unsupported_mesh_allocates_nothing(monkeypatch):
    _fake_gpu(monkeypatch, lambda *a, **k: pytest.fail("allocated"))
    monkeypatch.setattr(symmetric_memory, "unsupported", lambda mesh: "process 0 holds 2 devices of the mesh")
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2])
    assert PallasCommunicator.create(mesh, "tp").peer_buffers is None
    monkeypatch.setattr(compat, "mesh_platform", lambda mesh: "cpu")
    monkeypatch.setattr(symmetric_memory, "unsupported", lambda mesh: None)
    assert PallasCommunicator.create(mesh, "tp").peer_buffers is None


def test_make_group_communicators_stops_allocating_once_the_job_spans_machines(monkeypatch):
    calls = []

    def allocate(mesh, axis, **kw):
        calls.append(axis)
        raise symmetric_memory.NotOneHost("process 1 runs on another machine")

    _fake_gpu(monkeypatch, allocate)
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), devices=jax.devices()[:4])
    comms = make_group_communicators(mesh, {"world": ("dp", "tp"), "dp": "dp", "tp": "tp"})
    assert list(comms) == ["world", "dp", "tp"] and calls == [("dp", "tp")]
    assert all(type(c) is PallasCommunicator and c.peer_buffers is None for c in comms.values())
    assert [c.world_size for c in comms.values()] == [4, 2, 2]
