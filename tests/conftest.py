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


def compile_cache_dir(environ=os.environ) -> str | None:
    """Where the in-process tests keep XLA's compiled CPU programs between runs, or None.

    Two thirds of a cold run is XLA compiling (measured on the fast lane); the programs are the same from one run to
    the next, so a developer's second run skips that. JAX keys each entry by the program, the compile options, the
    XLA flags and the JAX/jaxlib version, so a changed kernel or flag compiles afresh. CPU only; off with
    ``SPMD_TEST_COMPILE_CACHE=off``; a path there puts it elsewhere; a ``JAX_COMPILATION_CACHE_DIR`` of the user's
    is left to JAX.
    """
    value = environ.get("SPMD_TEST_COMPILE_CACHE", "")
    if value.lower() in ("0", "off", "no", "false") or environ.get("JAX_PLATFORMS") != "cpu":
        return None
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if value:
        return value
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spmd-tests", "xla-cpu")


def pytest_configure(config):
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    cache = compile_cache_dir()
    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # most test programs compile in < 1 s
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        # No size bound: JAX's LRU eviction locks the directory and scans every entry on each write, which cost a cold
        # run more than the cache saved it. The two xdist workers may write one key at once (the same bytes) or read
        # an entry being written: JAX then fails to decompress it, warns and compiles. The size is kept down here.
        if os.environ.get("PYTEST_XDIST_WORKER") is None:
            prune_compile_cache(cache)


def prune_compile_cache(path: str, high: int = 1 << 30, low: int = 1 << 29) -> list[str]:
    """Over ``high`` bytes, delete the least recently written files until ``low`` remain; returns the deleted names."""
    try:
        entries = [(e.stat().st_mtime_ns, e.name, e.stat().st_size) for e in os.scandir(path) if e.is_file()]
    except FileNotFoundError:
        return []
    total = sum(size for _, _, size in entries)
    if total <= high:
        return []
    deleted = []
    for _, name, size in sorted(entries):
        if total <= low:
            break
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
        total -= size
        deleted.append(name)
    return deleted


@pytest.fixture(autouse=True)
def _clean_parallel_state():
    spmd.destroy_model_parallel()
    yield
    spmd.destroy_model_parallel()


# Fresh random data every run; SPMD_TEST_SEED=<n> replays a run (the seed is in the header).
SESSION_SEED = int(os.environ.get("SPMD_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
os.environ["SPMD_TEST_SEED"] = str(SESSION_SEED)  # pytest-xdist's workers (started later) draw the same data


def pytest_report_header(config):
    cache = compile_cache_dir() or "off"
    return f"spmd: {NUM_DEVICES} simulated CPU devices, SPMD_TEST_SEED={SESSION_SEED}, compile cache: {cache}"


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
