"""Host-level messages between real processes (spmd-launch on CPU): issue 10, items 1-6, in one launch."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).parent.parent


def test_host_protocol_two_processes():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["SPMD_COLLECTIVE_TIMEOUT_S"] = "4.5"  # a float; the timeout checks wait about this long
    env["SPMD_HOST_MAX_BYTES"] = str(1 << 30)
    launch = ["-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", "2", "--timeout", "120"]
    r = subprocess.run(
        [sys.executable, *launch, "tests/mp_worker.py", "host_protocol"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] OK host_protocol" in r.stdout
        assert f"[rank {rank}] host protocol ok" in r.stdout
