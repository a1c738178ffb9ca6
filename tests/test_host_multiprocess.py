"""Host-level messages between real processes (spmd-launch on CPU), over each transport.

The key-value store (``SPMD_HOST_TRANSPORT=store``): issue 10, items 1-6, in one launch
(tests/workers/mp_worker.py, which also checks what the store holds). Direct TCP connections (the default
when every process runs on one machine): tests/workers/host_net_worker.py.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).parent.parent


def _launch(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "SPMD_HOST_TRANSPORT")}
    launch = ["-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", "2", "--timeout", "120"]
    return subprocess.run(
        [sys.executable, *launch, script, *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow  # about 10 s or more on 2 shared cores
def test_host_protocol_two_processes_through_the_store():
    env = {
        "SPMD_HOST_TRANSPORT": "store",
        "SPMD_COLLECTIVE_TIMEOUT_S": "4.5",  # a float; the timeout checks wait about this long
        "SPMD_HOST_MAX_BYTES": str(1 << 30),
    }
    r = _launch("tests/workers/mp_worker.py", "host_protocol", env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] OK host_protocol" in r.stdout
        assert f"[rank {rank}] host protocol ok" in r.stdout


def test_host_protocol_two_processes_over_direct_connections():
    env = {"SPMD_COLLECTIVE_TIMEOUT_S": "2", "SPMD_HOST_MAX_BYTES": str(1 << 30)}
    r = _launch("tests/workers/host_net_worker.py", env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] host net ok: 300 small calls" in r.stdout
    assert "[rank 1] OK host_net (dying now)" in r.stdout and "[rank 0] OK host_net" in r.stdout
