"""End to end, in two independent processes: prefill TP P -> decode TP D over TCP, IPC and the transfer-server
pipe, P/D in (2/2, 4/2, 2/4), with ``jax_enable_x64`` on.

DevicePutKVPipe's runs across processes: its pipe contract in ``tests/test_kv_contract.py`` (one job),
its KV pieces for these P/D pairs and more in ``tests/test_kv_transfer_devput.py`` (the ``swap`` job).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from kv_pipes import free_port

WORKER = "tests/workers/kv_worker.py"  # what both ends of a transfer run

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).parent.parent
CASES = [(2, 2, 4), (4, 2, 2), (2, 4, 2)]  # (prefill TP, decode TP, KV heads): 2/4 replicates heads on decode
IDS = [f"P{p}-D{d}-heads{h}" for p, d, h in CASES]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


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
