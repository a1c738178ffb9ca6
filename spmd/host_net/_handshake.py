"""Authentication of a new connection: an HMAC-SHA256 challenge-response both ways.

The job's secret (32 random bytes that process 0 publishes in the coordination service's
key-value store, the trust root) never travels on the connection. The listening side (the server,
the lower process index) sends a fresh nonce and its index; the connecting side (the client)
answers with its own nonce, its index and a MAC over the server's nonce; the server answers
``OKAY`` with a MAC over the client's nonce, or ``DENY``. Both MACs bind the two process indices
and a role, so a proof cannot be replayed, reflected or moved to another pair of processes::

    server -> client   HELLO    magic "SPHN", version, server index, server nonce
    client -> server   REPLY    magic, version, client index, client nonce, HMAC(secret, "client", server nonce, c, s)
    server -> client   VERDICT  "OKAY" | "DENY", HMAC(secret, "server", client nonce, c, s)

Every read is bounded by the socket's timeout, which the caller sets.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from collections.abc import Container

from spmd.host_net._frame import VERSION

HS_MAGIC = b"SPHN"
HELLO = struct.Struct("!4sHI32s")  # server -> client: magic, version, server index, server nonce
REPLY = struct.Struct("!4sHI32s32s")  # client -> server: magic, version, client index, client nonce, proof
VERDICT = struct.Struct("!4s32s")  # server -> client: b"OKAY" | b"DENY", proof


class Refused(Exception):
    """A peer failed the handshake in a way worth retrying or ignoring (not the job's process, or garbage)."""


def digest(secret: bytes, role: bytes, nonce: bytes, client: int, server: int) -> bytes:
    msg = b"spmd-host " + role + b" " + nonce + struct.pack("!II", client, server)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    """``n`` bytes (within the socket's timeout).

    Raises:
      ConnectionError: the peer closed the connection first.
      TimeoutError: the socket's timeout passed first.
    """
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"the peer closed the connection during {what}")
        got += k
    return bytes(buf)


def client_handshake(sock: socket.socket, secret: bytes, me: int, p: int) -> None:
    """Prove to process ``p`` (listening at the other end of ``sock``) that this process ``me`` holds ``secret``.

    Raises:
      Refused: the other end does not speak this protocol (worth retrying until the deadline).
      PermissionError: the other end is not process ``p`` of this job, or refused this process.
      OSError: the connection failed or timed out.
    """
    magic, version, server, nonce = HELLO.unpack(recv_exact(sock, HELLO.size, "the handshake"))
    if magic != HS_MAGIC or version != VERSION:
        raise Refused(f"the peer at process {p}'s port does not speak this protocol (magic {magic!r})")
    if server != p:
        raise PermissionError(f"process {p}'s port is held by a process calling itself {server}")
    mine = os.urandom(32)
    proof = digest(secret, b"client", nonce, me, p)
    sock.sendall(REPLY.pack(HS_MAGIC, VERSION, me, mine, proof))
    verdict, theirs = VERDICT.unpack(recv_exact(sock, VERDICT.size, "the handshake verdict"))
    if verdict != b"OKAY":
        raise PermissionError(
            f"process {p} refused this process's handshake: its secret differs (is this process part of the "
            f"same job, with the same coordinator?)."
        )
    if not hmac.compare_digest(theirs, digest(secret, b"server", mine, me, p)):
        raise PermissionError(f"the peer at process {p}'s port failed to prove it holds the job's secret.")


def server_handshake(sock: socket.socket, secret: bytes, me: int, n_proc: int, connected: Container[int]) -> int:
    """The index of the process that connected to this process ``me``, once it proved it holds ``secret``.

    Only a process ``me < client < n_proc`` not already ``connected`` is accepted.

    Raises:
      Refused: garbage, a stranger, or a peer without the secret (told ``DENY``).
      OSError: the connection failed or timed out.
    """
    nonce = os.urandom(32)
    sock.sendall(HELLO.pack(HS_MAGIC, VERSION, me, nonce))
    magic, version, client, theirs, proof = REPLY.unpack(recv_exact(sock, REPLY.size, "the handshake"))
    if magic != HS_MAGIC or version != VERSION:
        raise Refused(f"a peer that does not speak this protocol (magic {magic!r})")
    ok = me < client < n_proc and client not in connected
    if not ok or not hmac.compare_digest(proof, digest(secret, b"client", nonce, client, me)):
        sock.sendall(VERDICT.pack(b"DENY", bytes(32)))
        raise Refused(f"a peer calling itself process {client} without the job's secret (HMAC check failed)")
    sock.sendall(VERDICT.pack(b"OKAY", digest(secret, b"server", theirs, client, me)))
    return client
