"""Small networking helpers: free ports, ``host:port`` parsing, and which address this host is reached at.

A job on one host talks over loopback. A job across hosts needs, on every host, an address the
other hosts can reach: the one gloo (CPU collectives) binds and advertises, and the one the
host-level connections (:mod:`spmd.host_net`) listen on. :func:`host_address` chooses it:
``SPMD_HOST_ADDRESS`` when set, else the local address of the route to the coordinator (a UDP
``connect`` sends nothing; ``getsockname`` then names the interface the kernel would use), else
this host's name. A loopback answer while the coordinator is not on loopback is an error: the
other hosts would dial themselves.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import time

__all__ = [
    "HostAddress",
    "coordinator_problem",
    "free_port",
    "host_address",
    "is_loopback",
    "is_wildcard",
    "route_address",
    "split_host_port",
    "wait_until_listening",
]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (loopback by default)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_host_port(address: str, *, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` (IPv6 as ``"[::1]:port"``) as ``(host, port)``.

    Args:
      address: the address to split.
      what: what the address is, for the error (e.g. ``"--coordinator"``).

    Raises:
      ValueError: no ``:``, an empty host, or a port that is not an integer in 1..65535.
    """
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"{what}: expected HOST:PORT (e.g. 10.0.0.1:29500 or [fe80::1]:29500), got {address!r}.")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{what}: an IPv6 host goes in brackets, as [{host}]:{port_text}; got {address!r}.")
    if not host:
        raise ValueError(f"{what}: expected HOST:PORT with a host before the ':', got {address!r}.")
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else -1
    if not 0 < port < 65536:
        raise ValueError(f"{what}: the port must be an integer from 1 to 65535, got {port_text!r} in {address!r}.")
    return host, port


def coordinator_problem(address: str, *, serve: bool, what: str = "the coordinator") -> str | None:
    """What is wrong with a coordinator address (``None``: nothing): its form, its host, and its port.

    Args:
      address: ``host:port``.
      serve: this host serves it (node 0 of ``spmd-launch``, whose rank 0 runs the coordination
        service): then the port must be free here. JAX binds the address itself when it is a
        loopback one, else every interface; a taken port would crash that rank, so it is tried
        here first (only a race can take it between this check and the bind).
      what: how the caller names the address, for the message (e.g. ``"--coordinator"``).
    """
    try:
        host, port = split_host_port(address, what=what)
    except ValueError as e:
        return str(e)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        return f"{what} {address}: cannot resolve the host {host!r} ({e}); give node 0's address or name"
    if not serve:
        return None
    loopback = is_loopback(host)
    binds = [(host, port)] if loopback else [("::", port), ("0.0.0.0", port)]  # JAX binds [::]:port there
    for where in binds:
        family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gRPC server: TIME_WAIT is no conflict
                s.bind(where)
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"{what} {address}: port {port} is already in use on this host (node 0 serves the "
                    f"coordination service there); pick a free port"
                )
            if e.errno == errno.EACCES:
                return f"{what} {address}: no permission to listen on port {port} here; pick a port above 1023"
            if not loopback and where[0] == "::":  # no IPv6 here: JAX then binds IPv4 (tried next)
                continue
            return f"{what} {address}: cannot listen there on node 0 ({e}); give an address of this host"
    return None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (an IPv4-mapped IPv6 address as its IPv4 address), or ``None`` for a name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_wildcard(host: str) -> bool:
    """Whether ``host`` means every interface: ``0.0.0.0``, ``::``, ``::ffff:0.0.0.0``, ``0``, ``*`` or ``""``."""
    ip = _ip(host)
    if ip is not None:
        return ip.is_unspecified
    try:  # the short IPv4 forms the socket calls accept ("0" is 0.0.0.0)
        return socket.inet_aton(host) == bytes(4)
    except OSError:
        return host.strip("[]") in ("", "*")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback: ``127.0.0.0/8``, ``::1`` (IPv4-mapped too), ``localhost``,
    or a name every address of which is loopback (as Debian's ``127.0.1.1 hostname`` line makes it)."""
    ip = _ip(host)
    if ip is not None:
        return ip.is_loopback
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    ips = [_ip(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return bool(ips) and all(ip is not None and ip.is_loopback for ip in ips)


def route_address(host: str, port: int) -> str | None:
    """This host's local address on the route to ``host:port`` (nothing is sent), or ``None`` when there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)
                local = str(s.getsockname()[0]).split("%", 1)[0]
        except OSError:
            continue
        if not is_wildcard(local):
            return local
    return None


def wait_until_listening(host: str, port: int, timeout_s: float) -> str | None:
    """Wait until something accepts TCP connections at ``host:port`` (connect, then close at once).

    Returns:
      ``None`` once it did, within ``timeout_s`` (one deadline); else the last error, as text.
    """
    deadline = time.monotonic() + timeout_s
    last = "nothing tried"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return last
        try:
            with socket.create_connection((host, port), timeout=min(1.0, left)):
                return None
        except OSError as e:  # refused while the server starts, unreachable, or timed out
            last = f"{type(e).__name__}: {e}"
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


@dataclasses.dataclass(frozen=True)
class HostAddress:
    """Where this host listens and what the other hosts dial.

    Attributes:
      bind: the address this host's sockets listen on (a wildcard only when the user allowed one).
      advertise: the address the other processes dial, and the one gloo binds and advertises.
      source: how it was chosen, for messages (``"SPMD_HOST_ADDRESS"``, ``"the route to 10.0.0.1"``...).
    """

    bind: str
    advertise: str
    source: str


def host_address(coordinator: str | None, configured: str | None = None) -> HostAddress | None:
    """This host's address for a job whose coordination service is at ``coordinator`` (see the module docstring).

    Args:
      coordinator: ``host:port`` of the coordination service, or ``None`` (not known: one host).
      configured: ``SPMD_HOST_ADDRESS`` (already checked: a wildcard only where allowed), or ``None``.

    Returns:
      ``None`` for a job on one host (the coordinator on loopback, or none) without ``configured``:
      loopback, the default. Otherwise the address.

    Raises:
      ValueError: ``coordinator`` is not ``host:port``; or the address chosen is a loopback one while
        the coordinator is not (the other hosts could not reach this one): set ``SPMD_HOST_ADDRESS``.
    """
    coord = None if coordinator is None else split_host_port(coordinator, what="the coordinator address")
    one_host = coord is None or is_loopback(coord[0])
    if configured is not None and not is_wildcard(configured):
        chosen = HostAddress(configured, configured, "SPMD_HOST_ADDRESS")
    elif one_host:
        if configured is None:
            return None
        loop = coord[0] if coord is not None and _ip(coord[0]) is not None else "127.0.0.1"
        return HostAddress(configured, loop, "SPMD_HOST_ADDRESS (a wildcard) on one host")
    else:
        route = route_address(*coord)
        if route is not None:
            advertise, source = route, f"the local address of the route to the coordinator {coord[0]}"
        else:
            advertise, source = socket.gethostname(), f"this host's name (no route to the coordinator {coord[0]})"
        chosen = HostAddress(configured if configured is not None else advertise, advertise, source)
    if not one_host and is_loopback(chosen.advertise):
        raise ValueError(
            f"this host's address for the job is {chosen.advertise!r} ({chosen.source}), a loopback address, but the "
            f"coordinator {coordinator} is not on loopback: processes on other hosts would dial themselves. Set "
            f"SPMD_HOST_ADDRESS to this host's address that the other hosts can reach (e.g. 10.0.0.5), or give "
            f"the coordinator as a loopback address when every process runs on this host."
        )
    return chosen
