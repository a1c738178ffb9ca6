"""End to end, in real processes: prefill TP P -> decode TP D over every pipe, P/D in (2/2, 4/2, 2/4)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

WORKER = "tests/workers/kv_worker.py"  # what both ends of a transfer run

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).parent.parent
CASES = [(2, 2, 4), (4, 2, 2), (2, 4, 2)]  # (prefill TP, decode TP, KV heads): 2/4 replicates heads on decode
IDS = [f"P{p}-D{d}-heads{h}" for p, d, h in CASES]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("p,d,heads", CASES, ids=IDS)
def test_device_put_pipe(p, d, heads):
    args = ["--nproc-per-node", "2", "--cpu-devices-per-process", str(max(p, d)), "--timeout", "120"]
    r = subprocess.run(
        [sys.executable, "-m", "spmd.launch", *args, WORKER, "devput", str(p), str(d), str(heads)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"[rank 0] OK devput send P={p} D={d}" in out and f"[rank 1] OK devput recv P={p} D={d}" in out


@pytest.mark.parametrize("pipe", ["tcp", "ts", "ipc"], ids=["tcp", "transfer_server", "ipc"])
@pytest.mark.parametrize("p,d,heads", CASES, ids=IDS)
def test_independent_processes(pipe, p, d, heads):
    port = str(free_port())
    cmd = [sys.executable, WORKER, pipe]
    tail = [str(p), str(d), str(heads), port]
    opts = dict(cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sender = subprocess.Popen([*cmd, "send", *tail], **opts)
    receiver = subprocess.Popen([*cmd, "recv", *tail], **opts)
    try:
        out_r, _ = receiver.communicate(timeout=120)
        out_s, _ = sender.communicate(timeout=60)
    finally:
        for proc in (sender, receiver):
            proc.kill()
    assert receiver.returncode == 0 and sender.returncode == 0, out_s[-3000:] + out_r[-3000:]
    assert f"OK {pipe} recv P={p} D={d}" in out_r and f"OK {pipe} send" in out_s


def test_device_put_pipe_needs_two_processes():
    import jax

    from spmd.kv_transfer import DevicePutKVPipe

    devs = jax.devices()
    with pytest.raises(ValueError, match="overlap"):
        DevicePutKVPipe(devs[:2], devs[1:3])
    with pytest.raises(ValueError, match="devices of one process, and the two processes must differ"):
        DevicePutKVPipe(devs[:2], devs[2:4])
    with pytest.raises(RuntimeError, match="already started its backend"):
        DevicePutKVPipe.enable_transfers()
