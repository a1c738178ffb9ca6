"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own hostname.

Host ``i`` is network namespace ``spmd-<pid>-<random>-<i>`` with address ``10.77.0.<i+1>/24`` on
its end of the pair and loopback up; its processes also get their own UTS namespace, so
``socket.gethostname()`` differs between the hosts as it does between machines (what the code
uses, with the boot id, to tell machines apart). Needs root, ``ip`` (iproute2) and ``unshare``
(util-linux); :func:`two_hosts` raises :class:`Unavailable` with the reason otherwise.

Clean-up on every exit path: the context manager kills every process left in the namespaces and
deletes them (a failing test, Ctrl-C), an ``atexit`` hook does it if the context manager could not
run, and :func:`two_hosts` first deletes namespaces that a killed run left behind (their creator's
pid, in the name, is gone). Names are unique per run, so parallel runs do not collide.

By hand (as root), what this does::

    ip netns add A && ip netns add B
    ip link add vA type veth peer name vB && ip link set vA netns A && ip link set vB netns B
    ip -n A addr add 10.77.0.1/24 dev vA && ip -n A link set vA up && ip -n A link set lo up
    ip -n B addr add 10.77.0.2/24 dev vB && ip -n B link set vB up && ip -n B link set lo up
    ip netns exec B unshare --uts sh -c 'hostname node-b && exec CMD'
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence

_PREFIX = "spmd-"
_NAME = re.compile(r"^spmd-(\d+)-[0-9a-f]{6}-[01]$")
_LIVE: set[str] = set()  # namespaces this process made and has not deleted yet


class Unavailable(RuntimeError):
    """Network namespaces cannot be made here (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One "host": a network namespace, its address and its hostname."""

    netns: str
    address: str
    hostname: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (its network namespace, a UTS namespace with its hostname)."""
        return [
            "ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
            self.hostname, *argv,
        ]  # fmt: skip

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        """The processes now in this host's network namespace."""
        r = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode:
        raise Unavailable(f"`ip {' '.join(args)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")


def _delete(netns: str) -> None:
    """Kill every process in ``netns`` (by pid), then delete it; the veth pair goes with it."""
    host = Host(netns, "", "")
    for _ in range(3):
        pids = host.pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30, check=False)
    _LIVE.discard(netns)


def _delete_live() -> None:
    for netns in sorted(_LIVE):
        _delete(netns)


atexit.register(_delete_live)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_stale() -> None:
    """Delete the namespaces of runs whose process is gone (killed before it could clean up)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _delete(name)


def why_unavailable() -> str | None:
    """Why two hosts cannot be made here, or ``None``."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces and veth pairs): run as root, as CI does"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2 / util-linux) on PATH"
    return None


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Make the two hosts; yield them; delete them on the way out, however it goes.

    Raises:
      Unavailable: not root, a tool missing, or the kernel refused (the reason is the message).
    """
    why = why_unavailable()
    if why:
        raise Unavailable(why)
    _delete_stale()
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    hosts = tuple(Host(f"{_PREFIX}{tag}-{i}", f"10.77.0.{i + 1}", f"spmd-node{i}-{tag}") for i in range(2))
    veth = [f"sv{tag[-6:]}{i}" for i in range(2)]  # at most 15 characters
    try:
        for h in hosts:
            _ip("netns", "add", h.netns)
            _LIVE.add(h.netns)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for h, dev in zip(hosts, veth, strict=True):
            _ip("link", "set", dev, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", dev)
            _ip("-n", h.netns, "link", "set", dev, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        r = hosts[1].run([sys.executable, "-c", "import socket; print(socket.gethostname())"], capture_output=True)
        r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
        if r.returncode or r.stdout.strip() != hosts[1].hostname:
            raise Unavailable(f"cannot run a process with its own hostname in a namespace: {r.stderr.strip()[:300]}")
        yield hosts  # type: ignore[misc]
    finally:
        subprocess.run(["ip", "link", "delete", veth[0]], capture_output=True, check=False)  # if still in the root
        for h in hosts:
            if h.netns in _LIVE:
                _delete(h.netns)
