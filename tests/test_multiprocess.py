"""Real subprocesses through spmd-launch: cross-process collectives, host-level dicts, failures."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

WORKER = "tests/workers/mp_worker.py"  # the script every rank runs

pytestmark = pytest.mark.multiprocess

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent


def launch(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["SPMD_COLLECTIVE_TIMEOUT_S"] = "60"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "spmd.launch", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r, time.monotonic() - t0


@pytest.mark.parametrize("nproc,devices", [(2, 2), (4, 1)], ids=["2x2", "4x1"])
def test_cross_process_collectives_and_tensor_dicts(nproc, devices):
    r, _ = launch(
        "--nproc-per-node",
        str(nproc),
        "--cpu-devices-per-process",
        str(devices),
        "--timeout",
        "90",
        WORKER,
        "collectives",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for rank in range(nproc):
        assert f"[rank {rank}] OK collectives" in r.stdout
        assert f"[rank {rank}] cross-process collectives ok on {nproc} processes x {devices} devices" in r.stdout
        assert f"[rank {rank}] group host-level ok: process {rank}" in r.stdout


def test_unsupported_value_fails_cleanly_everywhere():
    r, _ = launch("--nproc-per-node", "2", "--cpu-devices-per-process", "1", "--timeout", "60", WORKER, "bad_value")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "[rank 0] OK bad_value" in r.stdout and "[rank 1] OK bad_value" in r.stdout


def test_a_dying_process_stops_the_job_and_is_named():
    r, elapsed = launch("--nproc-per-node", "2", "--cpu-devices-per-process", "1", "--timeout", "60", WORKER, "die")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "spmd-launch: rank 1 exited with code 3; stopping ranks [0]" in r.stderr
    assert elapsed < 30


def test_launcher_timeout():
    r, elapsed = launch("--nproc-per-node", "2", "--cpu-devices-per-process", "1", "--timeout", "3", WORKER, "hang")
    assert r.returncode == 124
    assert "spmd-launch: timed out after 3 s; ranks [0, 1] were still running" in r.stderr
    assert elapsed < 20


def test_docs_example_runs():
    r, _ = launch(
        "--nproc-per-node", "2", "--cpu-devices-per-process", "2", "--timeout", "60", "docs/examples/multi_process.py"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "broadcast_tensor_dict ok: max_seq_len=4096, layer1.weight bfloat16[8, 4]" in r.stdout
    printed = [line for line in r.stdout.splitlines() if "[Gloo]" not in line]  # gloo's own lines: every rank
    assert printed and all(line.startswith("[rank 0] ") for line in printed), r.stdout  # as its docstring says


@pytest.mark.parametrize(
    "args,match",
    [
        (["--nproc-per-node", "0", "x.py"], "--nproc-per-node must be a positive integer"),
        (["--nproc-per-node", "2", "--nnodes", "2", "x.py"], "--coordinator HOST:PORT is required"),
        (
            ["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--coordinator", "h:1", "x.py"],
            "out of range",
        ),
        (["--nproc-per-node", "2", "--coordinator", "nohostport", "x.py"], "--coordinator: expected HOST:PORT"),
        (["--nproc-per-node", "2", "--timeout", "-1", "x.py"], "--timeout must be a positive, finite number"),
        (["--nproc-per-node", "2", "--cpu-devices-per-process", "0", "x.py"], "must be a positive integer"),
    ],
)
def test_launcher_bad_arguments(args, match):
    r, _ = launch(*args, timeout=30)
    assert r.returncode == 2 and match in r.stderr


def test_init_after_jax_started_is_a_clear_error():
    code = (
        "import jax.numpy as jnp; jnp.ones(2).block_until_ready(); import spmd\n"
        "try:\n"
        "    spmd.init_distributed_environment('127.0.0.1:1', num_processes=2, process_id=0)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "ERR init_distributed_environment: JAX has already started its backend" in r.stdout, r.stderr
    assert "join a multi-process job" in r.stdout


def _signal_masks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return " ".join(line.strip() for line in f if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt")))
    except OSError as e:
        return repr(e)


def test_ctrl_c_stops_every_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT then prints every thread's stack
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spmd.launch",
            "--nproc-per-node",
            "2",
            "--cpu-devices-per-process",
            "1",
            WORKER,
            "hang",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, deadline = 0, time.monotonic() + 120  # every rank started (a fixed sleep interrupted a slow import)
    for line in p.stdout:
        ready += "READY" in line
        if ready == 2 or time.monotonic() > deadline:
            break
    assert ready == 2, "the ranks never reported READY"
    signals = _signal_masks(p.pid)  # SIGINT is bit 1: ignored (SigIgn) or blocked (SigBlk) would explain a hang
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # once seen in a full run: name where the launcher was (faulthandler)
        p.send_signal(signal.SIGABRT)
        _, err = p.communicate(timeout=30)
        pytest.fail(f"the launcher did not stop within 30 s of SIGINT; its signal masks then: {signals}\n{err[-6000:]}")
    assert p.returncode == 130, err[-2000:]
    assert "spmd-launch: interrupted; stopping every rank" in err
