"""The automatic low-latency choice (spmd.expert_parallel.plan_low_latency, models.moe.auto_low_latency):
each reason the kernel is not chosen, the opt-in, and the wiring into Mixtral's runner, on CPU.

GPU meshes are stood in for by plain objects with the attributes the plan reads (devices with a
platform and a process index, the axis sizes); nothing here allocates peer buffers."""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
from flax import nnx

import models.moe
import spmd
from kernels import symmetric_memory
from spmd.expert_parallel import ENABLE_ENV, LowLatencyPlan, plan_low_latency


def fake_mesh(ep: int, *, platform: str = "gpu", processes: list[int] | None = None, tp: int = 1):
    """An object shaped like a ``jax.sharding.Mesh`` of ``tp * ep`` devices on ``platform``."""
    procs = processes or [0] * (ep * tp)
    devices = np.array([types.SimpleNamespace(platform=platform, process_index=p) for p in procs], dtype=object)
    return types.SimpleNamespace(
        devices=devices.reshape(1, ep, tp), shape={"dp": 1, "ep": ep, "tp": tp}, axis_names=("dp", "ep", "tp")
    )


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setenv(ENABLE_ENV, "1")


def test_off_by_default_even_where_everything_else_fits(monkeypatch):
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    plan = plan_low_latency(fake_mesh(4))
    assert not plan and plan.reason.startswith("the low-latency kernel is off by default")
    assert ENABLE_ENV in plan.reason and "enabled=True" in plan.reason
    monkeypatch.setenv(ENABLE_ENV, "0")
    assert not plan_low_latency(fake_mesh(4))
    assert plan_low_latency(fake_mesh(4), enabled=True)  # the argument wins over the variable


def test_eligible_gpu_mesh(opted_in):
    plan = plan_low_latency(fake_mesh(4), max_tokens=64, tokens=64)
    assert plan == LowLatencyPlan(True, "", 4, 64) and bool(plan)
    assert not plan_low_latency(fake_mesh(4), enabled=False)


@pytest.mark.parametrize(
    "mesh,tokens,reason",
    [
        (fake_mesh(4, platform="cpu"), None, r"the mesh's devices are \['cpu'\], not NVIDIA GPUs"),
        (fake_mesh(1, tp=2), None, r"the EP group \('ep'\) has 1 rank: nothing to exchange"),
        (fake_mesh(16), None, r"has 16 ranks; the kernel serves one NVLink host \(at most 8\)"),
        (
            fake_mesh(2, tp=2, processes=[0, 0, 1, 1]),
            None,
            r"peer buffers cannot be shared for this mesh: process 0 holds 2 devices",
        ),
        (fake_mesh(4), 129, r"129 tokens per rank is more than max_tokens=128 \(the fallback manager runs\)"),
    ],
    ids=["cpu", "ep1", "group_over_8", "not_shareable", "too_many_tokens"],
)
def test_each_reason(opted_in, mesh, tokens, reason):
    plan = plan_low_latency(mesh, tokens=tokens)
    assert not plan and plan.eligible is False
    assert re.search(reason, plan.reason), plan.reason


def test_the_real_cpu_mesh(opted_in):
    spmd.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=4)
    plan = plan_low_latency(spmd.get_mesh())
    assert not plan and plan.reason == "the mesh's devices are ['cpu'], not NVIDIA GPUs" and plan.ep == 4


@pytest.mark.parametrize(
    "kwargs,env,match",
    [
        ({"max_tokens": 0}, None, r"expected a positive int max_tokens, got 0"),
        ({"max_tokens": True}, None, r"expected a positive int max_tokens, got True"),
        ({"tokens": 0}, None, r"expected a positive int tokens, got 0"),
        ({"ep_axis": "expert"}, None, r"ep_axis 'expert' is not an axis of the mesh"),
        ({"enabled": "yes"}, None, r"expected enabled True, False or None, got 'yes'"),
        ({}, "true", r"SPMD_EP_LOW_LATENCY: expected 1 \(opt in\) or 0 / unset \(off\), got 'true'"),
    ],
)
def test_errors(monkeypatch, kwargs, env, match):
    if env is None:
        monkeypatch.delenv(ENABLE_ENV, raising=False)
    else:
        monkeypatch.setenv(ENABLE_ENV, env)
    with pytest.raises(ValueError, match=match):
        plan_low_latency(fake_mesh(4), **kwargs)


# ---------------------------------------------------------------------------------------------
# models.moe: prepare_low_latency (explicit) and auto_low_latency (the opt-in choice)


def _blocks():
    ll = models.moe.MoEBlock(16, 32, 4, 2, manager="low_latency", fallback="naive", rngs=nnx.Rngs(0))
    naive = models.moe.MoEBlock(16, 32, 4, 2, manager="naive", rngs=nnx.Rngs(1))
    return ll, naive


def test_auto_on_cpu_says_why_and_changes_nothing(opted_in):
    spmd.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=4)
    ll, naive = _blocks()
    assert models.moe.auto_low_latency(ll) == [
        "low_latency: not used (the mesh's devices are ['cpu'], not NVIDIA GPUs); the fallback manager runs"
    ]
    assert models.moe.auto_low_latency(naive) == []
    assert models.moe.prepare_low_latency(ll, max_tokens=8) == [
        "block: no buffers (the mesh's devices are ['cpu'], not NVIDIA GPUs)"
    ]
    assert ll.manager.buffers is None and ll.manager.max_tokens is None


def test_auto_gives_buffers_only_when_opted_in(monkeypatch):
    """On an eligible (stand-in) GPU mesh: nothing without the opt-in; buffers and max_tokens with it."""
    calls = []

    def fake_allocate(mesh, **kwargs):
        calls.append(kwargs)
        return "BUFFERS"

    monkeypatch.setattr(models.moe, "allocate_low_latency_buffers", fake_allocate)
    monkeypatch.delenv(ENABLE_ENV, raising=False)
    ll, _ = _blocks()
    mesh = fake_mesh(4)
    (line,) = models.moe.auto_low_latency(ll, mesh=mesh, max_tokens=32)
    assert "off by default" in line and not calls and ll.manager.buffers is None
    assert models.moe.auto_low_latency(ll, mesh=mesh, max_tokens=32, enabled=True) == [
        "block: buffers for 32 tokens x 16 x top-2"
    ]
    assert ll.manager.buffers == "BUFFERS" and ll.manager.max_tokens == 32
    assert calls == [
        {"max_tokens": 32, "hidden": 16, "top_k": 2, "use_fp8": False, "dtype": np.float32, "ep_axis": "ep"}
    ]


def test_processes_on_two_hosts_keep_the_fallback(monkeypatch):
    def not_one_host(mesh, **kwargs):
        raise symmetric_memory.NotOneHost("processes [1] run on another machine")

    monkeypatch.setattr(models.moe, "allocate_low_latency_buffers", not_one_host)
    ll, _ = _blocks()
    assert models.moe.auto_low_latency(ll, mesh=fake_mesh(2), enabled=True) == [
        "block: no buffers (processes [1] run on another machine)"
    ]
    assert ll.manager.buffers is None


def test_mixtral_runner_records_the_choice(opted_in, monkeypatch):
    """shard_causal_lm asks the plan for a Mixtral whose blocks are low_latency (the GPU default)."""
    from model_fixtures import init, mixtral_config

    import models.mixtral

    monkeypatch.setattr(models.mixtral, "default_moe_manager", lambda platform=None: "low_latency")
    from models.runner import shard_causal_lm

    init(2, 2)
    module = models.mixtral.MixtralForCausalLM(mixtral_config(), params_dtype=np.float32, tp_size=2, rngs=nnx.Rngs(0))
    lm = shard_causal_lm(module)
    assert lm.moe_paths == (
        "low_latency: not used (the mesh's devices are ['cpu'], not NVIDIA GPUs); the fallback manager runs",
    )
