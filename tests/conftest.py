"""Test setup: 8 simulated CPU devices, configured before JAX starts its backend."""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
# On CPU most of the suite's time is XLA compiling tiny programs: LLVM's optimisation passes (backend level 0)
# cost more than running them saves (a third of the fast lane's CPU time). XLA's HLO passes still run, and without
# fast math the arithmetic is IEEE either way. An explicit level in XLA_FLAGS wins.
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import spmd  # noqa: E402

NUM_DEVICES = 8


def pytest_configure(config):
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)


@pytest.fixture(autouse=True)
def _clean_parallel_state():
    spmd.destroy_model_parallel()
    yield
    spmd.destroy_model_parallel()


# Fresh random data every run; SPMD_TEST_SEED=<n> replays a run (the seed is in the header).
SESSION_SEED = int(os.environ.get("SPMD_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
os.environ["SPMD_TEST_SEED"] = str(SESSION_SEED)  # pytest-xdist's workers (started later) draw the same data


def pytest_report_header(config):
    return f"spmd: {NUM_DEVICES} simulated CPU devices, SPMD_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def _processes_need_the_marker(request, monkeypatch):
    """A test that starts a process must say so (``@pytest.mark.multiprocess``): the fast lane leaves those out."""
    if request.node.get_closest_marker("multiprocess") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a process but is not marked: add @pytest.mark.multiprocess "
            "(the fast lane, -m 'not slow and not multiprocess', leaves such tests out)"
        )

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.fixture
def rng(request):
    """A fresh generator per test: the session seed mixed with the test's id."""
    return np.random.default_rng([SESSION_SEED, zlib.crc32(request.node.nodeid.encode())])


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs NVIDIA GPUs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
