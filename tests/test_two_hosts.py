"""Multi-host for real: two "hosts" as network namespaces joined by a veth pair (tests/two_hosts.py).

Each host runs its own ``spmd-launch --nnodes 2 --node-rank R`` (or its own worker), as a user
would on two machines. Skipped, with the reason, where namespaces cannot be made (not root, no
``ip``); CI runs as root, so it runs them. The namespaces are deleted on every exit path.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import two_hosts

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
_PORTS = itertools.count(29500)  # each namespace is fresh: any port is free there; one per job all the same


@pytest.fixture(scope="module")
def hosts():
    try:
        with two_hosts.two_hosts() as pair:
            yield pair
    except two_hosts.Unavailable as e:
        pytest.skip(f"two hosts as network namespaces are unavailable here: {e}")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "SPMD_HOST_ADDRESS")}
    env.update(SPMD_COLLECTIVE_TIMEOUT_S="30", PYTHONPATH=str(ROOT), **extra)
    return env


def _launch_cmd(node: int, port: int, *args: str, timeout: float = 60) -> list[str]:
    return [
        sys.executable, "-m", "spmd.launch", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
        "--cpu-devices-per-process", "2", "--coordinator", f"10.77.0.1:{port}", "--timeout", str(timeout), *args,
    ]  # fmt: skip


class Node:
    """One host's ``spmd-launch``, started in its namespace."""

    def __init__(self, host: two_hosts.Host, node: int, port: int, args: list[str], env: dict[str, str]) -> None:
        self.t0 = time.monotonic()
        self.proc = host.popen(
            _launch_cmd(node, port, *args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out = self.err = ""
        self.elapsed = 0.0

    def wait(self, timeout: float = 120) -> Node:
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        self.elapsed = time.monotonic() - self.t0
        return self

    def log(self) -> str:
        return f"exit {self.proc.returncode}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-2000:]}"


def _pair(hosts, args: list[str], *, envs=(None, None), node1_first_s: float = 0.0) -> tuple[Node, Node]:
    port = next(_PORTS)
    envs = [_env(**(e or {})) for e in envs]
    n1 = Node(hosts[1], 1, port, args, envs[1])
    time.sleep(node1_first_s)
    n0 = Node(hosts[0], 0, port, args, envs[0])
    return n0.wait(), n1.wait()


@pytest.mark.slow  # 5-16 s on 2 shared cores
def test_the_multi_process_example_across_two_hosts_node_1_first(hosts):
    """The README's example, one process per host; node 1 starts first and waits for node 0's coordinator.

    Node 1 gives SPMD_HOST_ADDRESS, node 0 leaves it unset (its address is the route to the coordinator)."""
    n0, n1 = _pair(
        hosts,
        ["docs/examples/multi_process.py"],
        envs=(None, {"SPMD_HOST_ADDRESS": hosts[1].address}),
        node1_first_s=2.0,
    )
    assert n0.proc.returncode == 0, n0.log()
    assert n1.proc.returncode == 0, n1.log()
    table = [line for line in n0.out.splitlines() if line.startswith("[rank 0] ") and "e-" in line]
    assert len(table) == 2, n0.out
    assert "[rank 0] broadcast_tensor_dict ok: max_seq_len=4096, layer1.weight bfloat16[8, 4]" in n0.out


@pytest.mark.slow  # 5-16 s on 2 shared cores
def test_tensor_dicts_a_tp_all_reduce_and_peer_buffers_across_two_hosts(hosts):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    n0, n1 = _pair(hosts, ["tests/workers/two_host_worker.py", "collectives", str(seed)])
    assert n0.proc.returncode == 0, n0.log()
    assert n1.proc.returncode == 0, n1.log()
    for node, n in enumerate((n0, n1)):
        assert f"[rank {node}] OK collectives" in n.out, n.log()
        assert f"[rank {node}] broadcast_tensor_dict ok from both hosts (process {node} on {hosts[node].hostname})" in (
            n.out
        )
        assert f"[rank {node}] peer buffers: process {node} fell back to psum" in n.out
    assert "TP all-reduce over 4 devices on 2 hosts" in n0.out


@pytest.mark.slow  # 5-16 s on 2 shared cores
def test_a_rank_killed_on_one_host_is_named_by_the_other_hosts_launcher(hosts):
    n0, n1 = _pair(hosts, ["tests/workers/two_host_worker.py", "die", "0"])
    assert n1.proc.returncode == 137, n1.log()
    assert "spmd-launch: rank 1 was killed by SIGKILL" in n1.err
    assert n0.proc.returncode == 1, n0.log()
    assert "ConnectionError" in n0.out and "process 1" in n0.out, n0.log()
    assert "spmd-launch: rank 0 exited with code 1" in n0.err
    assert n0.elapsed < 45, n0.elapsed


@pytest.mark.slow  # 5-16 s on 2 shared cores
def test_node_1_without_node_0_gives_up_within_its_timeout(hosts):
    port = next(_PORTS)
    n1 = Node(hosts[1], 1, port, ["docs/examples/multi_process.py"], _env(SPMD_INIT_TIMEOUT_S="3")).wait()
    assert n1.proc.returncode == 1, n1.log()  # not a SIGABRT in JAX's client
    assert f"RuntimeError: init_distributed_environment: the coordination service at 10.77.0.1:{port}" in n1.out
    assert "did not accept connections within 3 s" in n1.out, n1.log()
    assert n1.elapsed < 20, n1.elapsed


@pytest.mark.slow
@pytest.mark.parametrize("pipe", ["tcp", "transfer"])
def test_disaggregated_prefill_on_one_host_and_decode_on_the_other(hosts, pipe):
    """``python -m models.disagg --check``: the prefill worker in host 0, the decode worker in host 1 (listening
    on 10.77.0.2), the KV cache over the TCP or the transfer-server pipe; the tokens equal one-device generation."""
    prefix = [shlex.join(h.command([])) for h in hosts]
    args = ["--pipe", pipe, "--prefill-tp", "2", "--decode-tp", "1", "--max-new-tokens", "4", "--check"]
    args += ["--decode-host", hosts[1].address, "--prefill-exec", prefix[0], "--decode-exec", prefix[1]]
    args += ["--timeout", "100", "--transfer-timeout", "60"]
    r = subprocess.run(
        [sys.executable, "-m", "models.disagg", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"over the {pipe} pipe (TP 2 -> 1)" in r.stdout and "transfer: FAILED" not in r.stdout, r.stdout
    assert f"check: the tokens equal single-process generation on one device (after a transfer over the {pipe}" in (
        r.stdout
    )


IPC_END = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
from spmd.kv_transfer import IpcKVPipe
role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    IpcKVPipe(host, port, role=role, timeout_s=20, secret=bytes(range(32)))
except ValueError as e:
    print("REFUSED", e)
else:
    print("OPENED")
"""


def test_ipc_pipe_refuses_a_peer_on_another_host(hosts):
    """Shared memory needs one machine: both ends learn the other runs elsewhere (hostname and boot id)."""
    port = str(next(_PORTS))
    server = hosts[1].popen(
        [sys.executable, "-c", IPC_END, "server", hosts[1].address, port], env=_env(), stdout=subprocess.PIPE, text=True
    )
    client = hosts[0].run(
        [sys.executable, "-c", IPC_END, "client", hosts[1].address, port],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    out, _ = server.communicate(timeout=60)
    for side, text in (("server", out), ("client", client.stdout)):
        assert "REFUSED IpcKVPipe: the peer runs on another machine" in text, (side, text, client.stderr)
        assert "use TransferServerKVPipe or TCPKVPipe" in text


@pytest.mark.slow
def test_ray_across_two_hosts_one_actor_per_node(hosts):
    """``ray start --head`` in host 0, ``ray start --address`` in host 1, then ``spmd-launch --backend ray
    --placement strict_spread`` runs the example with one actor on each node."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
    ray_cli = str(pathlib.Path(sys.executable).with_name("ray"))
    temp = [tempfile.mkdtemp(prefix=f"spmd-ray{i}-", dir="/tmp") for i in range(3)]  # short: Ray's socket paths
    # Token authentication off, and a private HOME: a ~/.ray/auth_token left by another Ray run must not matter.
    env = _env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HOME=temp[2])
    head = f"{hosts[0].address}:{next(_PORTS)}"
    try:
        head_args = ["--head", "--port", head.rpartition(":")[2], "--include-dashboard", "false"]
        for i, role in enumerate((head_args, ["--address", head])):
            node = ["--node-ip-address", hosts[i].address, "--num-cpus", "1", "--temp-dir", temp[i]]
            r = hosts[i].run(
                [ray_cli, "start", *role, *node],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, f"ray start on host {i}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        launch = [sys.executable, "-m", "spmd.launch", "--backend", "ray", "--nproc", "2", "--placement"]
        launch += ["strict_spread", "--cpu-devices-per-process", "2", "--ray-address", head, "--timeout", "120"]
        r = hosts[0].run(
            [*launch, "docs/examples/multi_process.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
        assert "broadcast_tensor_dict ok: max_seq_len=4096" in out, out[-3000:]
        labels = {rank: set(re.findall(rf"\(rank {rank} pid=\d+(, ip=[\d.]+)?\)", out)) for rank in (0, 1)}
        # One actor on each node: the driver (host 0) labels the other node's actor with its address.
        assert sorted(map(sorted, labels.values())) == [[""], [f", ip={hosts[1].address}"]], labels
    finally:
        for h in hosts:  # Ray's daemons in the namespaces (never `ray stop`: it stops every Ray on the machine)
            for pid in h.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for t in temp:
            shutil.rmtree(t, ignore_errors=True)
