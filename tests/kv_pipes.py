"""The one factory of connected KV-pipe pairs the tests use (imported, not collected).

``pair(kind, ...)`` builds both ends of a :class:`TCPKVPipe` (``"tcp"``), an :class:`IpcKVPipe` on
its CPU shared-memory backend (``"ipc"``) or a :class:`TransferServerKVPipe` (``"ts"``) inside this
process: the server in a thread, the client here. :class:`DevicePutKVPipe` (``"devput"``) needs a
two-process ``jax.distributed`` job; its pipes are made by ``tests/workers/kv_contract_worker.py``.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import jax

from spmd.kv_transfer import IpcKVPipe, TCPKVPipe, TransferServerKVPipe

IN_PROCESS = {"tcp": TCPKVPipe, "ipc": IpcKVPipe, "ts": TransferServerKVPipe}
"""The pipes one process can hold both ends of, by the short name the tests' ids use."""

_UNSET: Any = object()


def free_port() -> int:
    """A loopback port nobody listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pair(
    kind: str,
    *,
    timeout_s: float = 10.0,
    server_secret: bytes | None = _UNSET,
    client_secret: bytes | None = _UNSET,
    server_devices: int = 2,
    client_devices: int = 4,
    **kw: Any,
) -> tuple[Any, Any]:
    """A connected ``(server, client)`` pair of pipe ``kind`` (see :data:`IN_PROCESS`), on loopback.

    Args:
      kind: ``"tcp"``, ``"ipc"`` or ``"ts"``.
      timeout_s: both ends' timeout.
      server_secret, client_secret: the HMAC secrets (default: none for ``"tcp"``, ``b"s"`` on both
        ends for the device pipes, whose control channel is a secret-holding TCP pipe).
      server_devices, client_devices: how many simulated devices each end of a device pipe holds; the
        server's are the first ones, the client's the next ones (disjoint, as two processes' would be).
      **kw: passed to both constructors (``max_message_bytes=...`` for TCP, ``backend=...`` for IPC).

    Returns:
      ``(server, client)``; the caller closes both (``with server, client:``).

    Raises:
      Whatever either constructor raised (the server's error first; the client is closed then).
    """
    cls = IN_PROCESS[kind]
    default = None if kind == "tcp" else b"s"
    secrets = [default if s is _UNSET else s for s in (server_secret, client_secret)]
    port, box, devs = free_port(), {}, jax.devices()
    server_kw, client_kw = dict(kw), dict(kw)
    if kind != "tcp":
        server_kw["devices"] = devs[:server_devices]
        client_kw["devices"] = devs[server_devices : server_devices + client_devices]

    def serve() -> None:
        try:
            box["server"] = cls("127.0.0.1", port, timeout_s=timeout_s, secret=secrets[0], **server_kw)
        except Exception as e:  # handed to the caller below
            box["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        client = cls("127.0.0.1", port, role="client", timeout_s=timeout_s, secret=secrets[1], **client_kw)
    finally:
        t.join()
    if "error" in box:
        client.close()
        raise box["error"]
    return box["server"], client


def within(seconds: float, fn: Any) -> Any:
    """``fn()``'s result, or its exception re-raised; a test failure instead of a hang past ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s: a wait without a timeout"
    if "error" in box:
        raise box["error"]
    return box.get("value")
