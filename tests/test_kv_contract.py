"""The KV-pipe contract (``tests/kv_contract.py``) over every pipe ``spmd.kv_transfer`` exports.

TCP, IPC (CPU shared memory) and the transfer-server pipe run each case in this process, the two
halves in two threads on a fresh pair (``kv_pipes.pair``); :class:`DevicePutKVPipe` runs every case
in ONE two-process job (``tests/workers/kv_contract_worker.py``), whose lines each case's test reads.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading

import kv_contract
import kv_pipes
import pytest

import spmd.kv_transfer

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = "tests/workers/kv_contract_worker.py"
NAMES = list(kv_contract.CASES)


def test_every_exported_pipe_is_under_contract():
    pipes = {n for n in spmd.kv_transfer.__all__ if n.endswith("KVPipe")}
    under = {cls.__name__ for cls in kv_pipes.IN_PROCESS.values()} | {"DevicePutKVPipe"}
    assert pipes == under and set(kv_contract.CAPS) == {*kv_pipes.IN_PROCESS, "devput"}
    assert all(issubclass(getattr(spmd.kv_transfer, n), spmd.kv_transfer.KVPipeBase) for n in pipes)


@pytest.mark.parametrize("kind", ["ipc", "ts"])
def test_a_wrong_secret_is_refused(kind):
    """The device pipes' control channel authenticates (TCP's own secret tests: test_kv_transfer_tcp.py)."""
    with pytest.raises(PermissionError, match="requires the right secret"):
        kv_pipes.pair(kind, server_secret=b"a", client_secret=b"b", timeout_s=1.0)


def run_case(name: str, sender, receiver, caps: kv_contract.Caps, seed: int, limit_s: float = 60.0) -> None:
    """Case ``name``'s two halves in two threads, on ``sender`` and ``receiver``; a failure, never a hang."""
    barrier = threading.Barrier(2, timeout=30)
    case, errors = kv_contract.CASES[name], {}

    def sync(_: str) -> None:
        barrier.wait()

    def half(pipe, role: str) -> None:
        try:
            case(kv_contract.Side(pipe, caps, seed, sync), role)
        except BaseException as e:  # handed to the test below
            errors[role] = e
            barrier.abort()

    threads = [threading.Thread(target=half, args=a, daemon=True) for a in ((sender, "send"), (receiver, "recv"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s)
    assert not any(t.is_alive() for t in threads), f"{name}: a half blocked for {limit_s} s (a wait without a timeout)"
    if errors:  # the sender's failure first: a receiver fails waiting for what never came
        raise errors.get("send") or errors["recv"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(kv_pipes.IN_PROCESS))
def test_contract(kind, name, rng):
    server, client = kv_pipes.pair(kind, timeout_s=kv_contract.TIMEOUT_S.get(name, kv_contract.DEFAULT_TIMEOUT_S))
    with server, client:
        run_case(name, server, client, kv_contract.CAPS[kind], int(rng.integers(2**31)))


@pytest.fixture(scope="module")
def devput_job() -> str:
    """ONE two-process job (4 CPU devices each) running every case over DevicePutKVPipe: its output."""
    seed = int(os.environ["SPMD_TEST_SEED"]) ^ 0xC0DE
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", "4"]
    cmd += ["--timeout", "150", WORKER, ",".join(NAMES), str(seed)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return f"seed {seed}, exit code {r.returncode}\n" + r.stdout + r.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", NAMES)
def test_contract_device_put(name, devput_job):
    for rank, half in ((0, "send"), (1, "recv")):
        line = f"[rank {rank}] PASS {name} {half}"
        assert line in devput_job, f"no '{line}':\n" + devput_job[-6000:]
