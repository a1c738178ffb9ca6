"""``spmd-launch``: start one process per device group on this host (like ``torchrun``).

    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 2 script.py [args...]
    spmd-launch --nproc-per-node 8 script.py                         # one GPU per process
    spmd-launch --nnodes 2 --node-rank 0 --coordinator 10.0.0.1:1234 --nproc-per-node 8 script.py

Each process gets the ``SPMD_*`` environment that :func:`spmd.init_distributed_environment`
reads (see :mod:`spmd.envs`). Every line a process prints is prefixed with ``[rank N]``. If a
process fails, the launcher stops the others and exits with that process's code, naming it;
Ctrl-C stops them all; ``--timeout`` bounds the whole run (exit code 124).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["free_port", "main"]

_GRACE_S = 3.0  # JAX catches SIGTERM (preemption notice), so SIGKILL follows soon


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spmd-launch",
        description="Start N processes of a JAX SPMD job on this host, with rank-prefixed output.",
    )
    p.add_argument("--nproc-per-node", type=int, required=True, help="processes to start on this host")
    p.add_argument("--nnodes", type=int, default=1, help="hosts in the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this host's index, 0 <= node-rank < nnodes")
    p.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0's coordination service (default: a free loopback port; needed with --nnodes > 1)",
    )
    p.add_argument(
        "--cpu-devices-per-process", type=int, default=None, help="run on CPU with K simulated devices per process"
    )
    p.add_argument(
        "--devices-per-process",
        type=int,
        default=None,
        help="accelerators per process (default: 1 when several processes share a host, else all)",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds the whole run may take")
    p.add_argument("-m", dest="module", action="store_true", help="run the target as a module (python -m)")
    p.add_argument("script", help="the Python script (or module with -m) each process runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    a = p.parse_args(argv)
    for name in ("nproc_per_node", "nnodes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    if not 0 <= a.node_rank < a.nnodes:
        p.error(f"--node-rank {a.node_rank} is out of range for --nnodes {a.nnodes}")
    if a.nnodes > 1 and not a.coordinator:
        p.error("--coordinator HOST:PORT is required with --nnodes > 1 (the address of node 0, reachable from all)")
    if a.coordinator and ":" not in a.coordinator:
        p.error(f"--coordinator must be HOST:PORT, got {a.coordinator!r}")
    for name in ("cpu_devices_per_process", "devices_per_process"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if a.timeout is not None and a.timeout <= 0:
        p.error(f"--timeout must be positive, got {a.timeout}")
    return a


def _env_for(a: argparse.Namespace, local_rank: int, coordinator: str) -> dict[str, str]:
    env = dict(os.environ)
    n = a.nproc_per_node
    env.update(
        SPMD_COORDINATOR_ADDRESS=coordinator,
        SPMD_NUM_PROCESSES=str(n * a.nnodes),
        SPMD_PROCESS_ID=str(a.node_rank * n + local_rank),
        SPMD_LOCAL_RANK=str(local_rank),
        SPMD_LOCAL_WORLD_SIZE=str(n),
        PYTHONUNBUFFERED="1",
    )
    if a.cpu_devices_per_process:
        env["SPMD_CPU_DEVICES_PER_PROCESS"] = str(a.cpu_devices_per_process)
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("SPMD_LOCAL_DEVICE_IDS", None)
    else:
        per = a.devices_per_process or (1 if n > 1 else None)
        if per is not None:
            env["SPMD_LOCAL_DEVICE_IDS"] = ",".join(str(local_rank * per + i) for i in range(per))
    if a.timeout is not None:
        env.setdefault("SPMD_INIT_TIMEOUT_S", str(max(1, int(a.timeout))))
    return env


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
            sys.stdout.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every live process (its whole process group), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _say(msg: str) -> None:
    print(f"spmd-launch: {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse(argv)
    coordinator = a.coordinator or f"127.0.0.1:{free_port()}"
    target = ["-m", a.script] if a.module else [a.script]
    cmd = [sys.executable, *target, *a.script_args]
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    first = a.node_rank * a.nproc_per_node
    for local in range(a.nproc_per_node):
        p = subprocess.Popen(
            cmd,
            env=_env_for(a, local, coordinator),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group, so stopping it stops its children too
        )
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[rank {first + local}] ", lock), daemon=True)
        t.start()
        pumps.append(t)

    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    code = 0

    def alive() -> list[int]:
        return [first + j for j, p in enumerate(procs) if p.poll() is None]

    try:
        while True:
            done = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
            failed = [(i, rc) for i, rc in done if rc != 0]
            if failed:
                i, rc = failed[0]
                others = alive()
                _say(f"rank {first + i} exited with code {rc}" + (f"; stopping ranks {others}" if others else ""))
                code = rc if 0 < rc < 256 else 1
                break
            if len(done) == len(procs):
                break
            if deadline is not None and time.monotonic() > deadline:
                _say(f"timed out after {a.timeout:g} s; ranks {alive()} were still running; stopping them")
                code = 124
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        _say("interrupted; stopping every rank")
        code = 130
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=2.0)
    return code


if __name__ == "__main__":
    sys.exit(main())
