"""``spmd-launch``: start one process per device group on this host (like ``torchrun``).

    spmd-launch --nproc-per-node 2 --cpu-devices-per-process 2 script.py [args...]
    spmd-launch --nproc-per-node 8 script.py                         # one GPU per process
    spmd-launch --nnodes 2 --node-rank 0 --coordinator 10.0.0.1:1234 --nproc-per-node 8 script.py
    spmd-launch --backend ray --nproc 16 script.py                  # Ray actors on a Ray cluster (spmd.ray)

Each process gets the ``SPMD_*`` environment that :func:`spmd.init_distributed_environment`
reads (see :mod:`spmd.envs`) and runs under :mod:`spmd._launch_runner`, which ends it at once on
an uncaught exception (code 1) or ``sys.exit(n != 0)`` (code ``n``) instead of letting it wait at
JAX's shutdown barrier, and which ends it when the launcher dies, even by SIGKILL. Every line a
process prints is prefixed with ``[rank N]``.

Exit codes: 0 when every rank exits 0; otherwise the first rank to fail (by time of exit) is
named and decides the code: its own exit code (``rank 1 exited with code 3``), or ``128 + S`` when
signal ``S`` killed it (``rank 1 was killed by SIGKILL`` -> 137). The launcher then stops the
others (SIGTERM to each rank's whole process group, so the processes a rank forked stop too, SIGKILL
after 3 s; it never waits longer on their output). SIGINT (Ctrl-C), SIGTERM and
SIGHUP to the launcher stop every rank (SIGTERM or SIGHUP is forwarded as is) and exit
``128 + signal`` (130, 143, 129); ``--timeout`` bounds the whole run (124); a script that does not
exist, or bad arguments, exit 2 before any rank starts: ``--coordinator`` must be ``HOST:PORT`` with
a host that resolves and a port from 1 to 65535 that, on node 0, is free; ``--timeout`` a positive,
finite number of seconds.

``--backend ray`` runs the ranks as Ray actors through :func:`spmd.ray.run` (joining the cluster
at ``--ray-address``, ``RAY_ADDRESS`` or the one ``ray start`` started here, else starting a local
one) with the same exit codes; an actor that died counts as killed by SIGKILL (137), and a Ray
cluster that cannot be joined exits 2.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import math
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from spmd import net
from spmd.net import free_port

__all__ = ["free_port", "main"]

_GRACE_S = 3.0  # JAX catches SIGTERM (preemption notice), so SIGKILL follows soon
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)
_RAY_LOG_DRAIN_S = 1.0
_PUMP_DRAIN_S = 0.5  # at most this long for the ranks' last output once they are stopped
_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch_runner.py")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="spmd-launch",
        description="Start N processes of a JAX SPMD job on this host, with rank-prefixed output.",
    )
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes to start on this host")
    p.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: processes on this host (default); ray: Ray actors on a Ray cluster (see spmd.ray)",
    )
    p.add_argument("--nproc", type=int, default=None, help="processes in the whole job (the ray backend's size)")
    p.add_argument(
        "--placement",
        choices=("pack", "strict_pack", "spread", "strict_spread"),
        default="pack",
        help="ray backend: Ray placement-group strategy (default pack: one node when the job fits on one)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="ray backend: the cluster to join (default: RAY_ADDRESS, else a running local cluster, else a new one)",
    )
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
    if a.nproc is not None and a.nproc < 1:
        p.error(f"--nproc must be a positive integer, got {a.nproc}")
    if a.backend == "ray":
        for flag, given in (
            ("--nnodes", a.nnodes != 1),
            ("--node-rank", a.node_rank),
            ("--coordinator", a.coordinator),
        ):
            if given:
                p.error(f"{flag} is for --backend local; with --backend ray, Ray places the processes (--nproc N)")
        if a.nproc is None:
            a.nproc = a.nproc_per_node
        if a.nproc is None:
            p.error("--nproc N is required with --backend ray (the processes in the whole job)")
        a.nproc_per_node = a.nproc
    elif a.nproc_per_node is None:
        if a.nproc is None or a.nnodes != 1:
            p.error("--nproc-per-node N is required (or --nproc N for a job on this host alone)")
        a.nproc_per_node = a.nproc
    elif a.nproc is not None and a.nproc != a.nproc_per_node * a.nnodes:
        p.error(f"--nproc {a.nproc} is not --nproc-per-node {a.nproc_per_node} x --nnodes {a.nnodes}")
    if a.cpu_devices_per_process is not None and a.devices_per_process is not None and a.backend == "ray":
        p.error("--devices-per-process (GPUs) and --cpu-devices-per-process exclude each other with --backend ray")
    for name in ("nproc_per_node", "nnodes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    if not 0 <= a.node_rank < a.nnodes:
        p.error(f"--node-rank {a.node_rank} is out of range for --nnodes {a.nnodes}")
    if a.nnodes > 1 and not a.coordinator:
        p.error("--coordinator HOST:PORT is required with --nnodes > 1 (the address of node 0, reachable from all)")
    if a.coordinator:
        problem = net.coordinator_problem(a.coordinator, serve=a.node_rank == 0, what="--coordinator")
        if problem:
            p.error(problem)
    for name in ("cpu_devices_per_process", "devices_per_process"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if a.timeout is not None and not (math.isfinite(a.timeout) and a.timeout > 0):
        p.error(f"--timeout must be a positive, finite number of seconds, got {a.timeout}")
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


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; whether the group still had a member."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its credentials: the rest of the group is already signalled
        return True


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie.

    An orphan that exited stays a zombie until an init process reaps it, and some container init
    processes never do; ``killpg(pgid, 0)`` counts zombies, so on Linux the members are read from /proc.
    """
    if not _signal_group(pgid, 0):
        return False
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:  # no /proc: trust killpg
        return True
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Stop every rank's whole process group (children a rank forked too): ``sig``, then SIGKILL after the grace.

    Each rank leads its own group (``start_new_session``), so its group id is its pid, which
    Linux does not hand to a new process while the group has a member, even after the rank
    itself exited. Waits at most ``_GRACE_S`` in all.
    """
    groups = [p.pid for p in procs]
    live = [g for g in groups if _signal_group(g, sig)]
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while live and time.monotonic() < deadline:  # the ranks' children, which this process cannot wait for
        live = [g for g in live if _group_alive(g)]
        if live:
            time.sleep(0.02)
    for g in live:
        _signal_group(g, signal.SIGKILL)
    for p in procs:
        p.wait()


def _say(msg: str) -> None:
    print(f"spmd-launch: {msg}", file=sys.stderr, flush=True)


class _Signalled(BaseException):
    """The launcher got SIGTERM or SIGHUP (SIGINT arrives as ``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame) -> None:
    raise _Signalled(signum)


def _set_handlers(handler, signums: Sequence[int]) -> dict[int, object]:
    """Install ``handler`` for ``signums``; returns the previous handlers (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signums}


def _failure(rank: int, rc: int) -> tuple[str, int]:
    """How to describe a rank's non-zero return code, and the launcher's exit code for it."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"rank {rank} was killed by {name}", 128 - rc
    return f"rank {rank} exited with code {rc}", rc


def _check_target(a: argparse.Namespace) -> str | None:
    """Why ``a.script`` cannot run (before any rank starts), or ``None``."""
    if a.module:
        top = a.script.partition(".")[0]
        if (
            top in sys.builtin_module_names
            or importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is not None
        ):
            return None
        return f"no module named {top!r} (searched the working directory and sys.path); check the -m MODULE name"
    path = pathlib.Path(a.script)
    if path.is_file() or (path.is_dir() and (path / "__main__.py").is_file()):
        return None
    where = f" (relative to {os.getcwd()})" if not path.is_absolute() else ""
    if path.is_dir():
        return f"{a.script!r}{where} is a directory without a __main__.py; pass a Python script"
    return f"script {a.script!r}{where} does not exist; pass the path of a Python script, or -m MODULE"


def _wait_for(index: int, p: subprocess.Popen, exits: queue.Queue) -> None:
    exits.put((index, p.wait()))


def _prefixed(rank: int, text: str) -> str:
    return "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").split("\n"))


def _main_ray(a: argparse.Namespace) -> int:
    """``--backend ray``: the job as Ray actors (:func:`spmd.ray.run`), with this launcher's exit codes."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every rank's lines, as the local backend prints them
    try:
        import ray
    except ImportError:
        _say("--backend ray needs Ray, which is not installed: pip install 'spmd-distributed[ray]'")
        return 2
    from spmd import ray as spmd_ray

    target = a.script if a.module else os.path.abspath(a.script)
    code = 0
    previous: dict[int, object] = {}
    try:
        previous = _set_handlers(_raise_signalled, _FORWARDED)
        try:
            spmd_ray.init_cluster(a.ray_address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            _say(f"could not join or start a Ray cluster ({type(e).__name__}: {e}); check --ray-address")
            return 2
        previous = {**_set_handlers(_raise_signalled, _FORWARDED), **previous}  # ray.init installs its own
        spmd_ray.run(
            spmd_ray.run_script,
            target,
            a.script_args,
            module=a.module,
            cwd=os.getcwd(),
            num_processes=a.nproc,
            devices_per_process=a.devices_per_process,
            cpu_devices_per_process=a.cpu_devices_per_process,
            placement_strategy=a.placement.upper(),
            timeout_s=a.timeout,
        )
    except spmd_ray.RankError as e:
        if e.remote_traceback:
            sys.stdout.write(_prefixed(e.rank, e.remote_traceback))
            sys.stdout.flush()
        _say(str(e).split("\n", 1)[0])
        code = 128 + signal.SIGKILL if e.exit_code is None else e.exit_code
    except TimeoutError as e:
        _say(str(e).removeprefix("spmd.ray.run: "))
        code = 124
    except KeyboardInterrupt:
        _say("interrupted; stopped every rank")
        code = 128 + signal.SIGINT
    except _Signalled as e:
        _say(f"got {signal.Signals(e.signum).name}; stopped every rank")
        code = 128 + e.signum
    finally:
        previous = {**_set_handlers(signal.SIG_IGN, (signal.SIGINT, *_FORWARDED)), **previous}
        try:
            if ray.is_initialized():
                time.sleep(_RAY_LOG_DRAIN_S)  # Ray forwards the actors' output asynchronously
                ray.shutdown()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; returns the launcher's exit code (see the module docstring)."""
    a = _parse(argv)
    problem = _check_target(a)
    if problem:
        _say(problem)
        return 2
    if a.backend == "ray":
        return _main_ray(a)
    coordinator = a.coordinator or f"127.0.0.1:{free_port()}"
    target = ["-m", a.script] if a.module else [a.script]
    cmd = [sys.executable, _RUNNER, str(os.getpid()), *target, *a.script_args]
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    exits: queue.Queue[tuple[int, int]] = queue.Queue()  # (local rank, return code), in order of exit
    first = a.node_rank * a.nproc_per_node
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    code = 0
    stop_signal = signal.SIGTERM

    def alive() -> list[int]:
        return [first + j for j, p in enumerate(procs) if p.returncode is None]

    previous: dict[int, object] = {}
    try:
        previous = _set_handlers(_raise_signalled, _FORWARDED)
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
            threading.Thread(target=_wait_for, args=(local, p, exits), daemon=True).start()

        finished = 0
        while finished < len(procs):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                _say(f"timed out after {a.timeout:g} s; ranks {alive()} were still running; stopping them")
                code = 124
                break
            try:
                i, rc = exits.get(timeout=0.2 if left is None else min(0.2, left))
            except queue.Empty:
                continue
            finished += 1
            if rc != 0:  # the first rank to fail, by time of exit
                what, code = _failure(first + i, rc)
                others = alive()
                _say(what + (f"; stopping ranks {others}" if others else ""))
                break
    except KeyboardInterrupt:
        _say("interrupted; stopping every rank")
        code = 128 + signal.SIGINT
    except _Signalled as e:
        _say(f"got {signal.Signals(e.signum).name}; stopping every rank")
        code, stop_signal = 128 + e.signum, e.signum
    finally:
        # A second signal (or Ctrl-C) must not cut the clean-up short; it is bounded by _GRACE_S.
        previous = {**_set_handlers(signal.SIG_IGN, (signal.SIGINT, *_FORWARDED)), **previous}
        try:
            _stop(procs, stop_signal)
            # Every rank's group is gone, so its pipe is closed unless a process that left the group
            # (setsid) still holds it: read what is left, briefly, never seconds.
            pumps_deadline = time.monotonic() + _PUMP_DRAIN_S
            for t in pumps:
                t.join(timeout=max(0.0, pumps_deadline - time.monotonic()))
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return code


if __name__ == "__main__":
    sys.exit(main())
