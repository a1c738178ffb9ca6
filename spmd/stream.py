"""Framed, authenticated TCP streams: the one wire both of the project's TCP protocols speak.

Two protocols run on it, each with its own magic and frame kinds: the host-level messages between
the processes of a job (:mod:`spmd.host_net`) and :class:`~spmd.kv_transfer.TCPKVPipe` (which
also carries the control messages of the device KV pipes). What they share lives here, once:

**The handshake** (:class:`Handshake`): a mutual HMAC-SHA256 challenge-response, as
``multiprocessing.connection`` does, with a fresh 32-byte nonce from each side; the proofs bind
the protocol, the role and both sides' ids, so a proof cannot be replayed, reflected or moved to
another pair of peers. The secret never travels::

    server -> client   HELLO    magic, version, flags (bit 0: authenticates), server id, server nonce
    client -> server   REPLY    magic, version, flags, client id, client nonce,
                                HMAC(secret, label "client" server-nonce client-id server-id)
    server -> client   VERDICT  "OKAY" | "DENY", HMAC(secret, label "server" client-nonce client-id server-id)

A server without a secret sends flags 0 and says ``OKAY`` to anyone who answers in the protocol;
a client holding a secret refuses such a server.

**One absolute deadline** (``time.monotonic()``) bounds a whole handshake (every read gets only
what is left of it, so a peer dripping one byte at a time cannot stretch it), and a whole
set-up. **Strangers never keep the right peer out**: :class:`Acceptor` runs every connection's
handshake side by side in one event loop (nothing blocks on one peer), drops a stranger as soon as
it fails, keeps at most ``max_pending`` handshakes open (the oldest goes first), and hands out
each peer that passes.

**The frame** (:class:`FrameFormat`): ``preamble | JSON header | payload``. The 32-byte preamble
is (network order) magic (4 bytes), version (u8), kind (u8), flags (u16, zero), sequence number
(u64), header length (u64) and payload length (u64). A receiver checks the preamble, then the
sizes against its own limits, before it allocates anything; :func:`json_header` parses a header.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "HELLO",
    "PREAMBLE",
    "REPLY",
    "VERDICT",
    "Acceptor",
    "FrameError",
    "FrameFormat",
    "Handshake",
    "Refused",
    "json_header",
    "recv_exact",
    "send_all",
]

HELLO = struct.Struct("!4sHHI32s")  # magic, version, flags, server id, server nonce
REPLY = struct.Struct("!4sHHI32s32s")  # magic, version, flags, client id, client nonce, proof
VERDICT = struct.Struct("!4s32s")  # b"OKAY" | b"DENY", proof
PREAMBLE = struct.Struct("!4sBBHQQQ")  # magic, version, kind, flags, seq, header length, payload length
AUTH = 1
_OKAY, _DENY = b"OKAY", b"DENY"


class Refused(Exception):
    """A peer failed the handshake: garbage, a stranger, or a peer without the secret.

    Attributes:
      deny: the ``DENY`` verdict to send it (``None``: it does not speak the protocol, send nothing).
    """

    def __init__(self, message: str, deny: bytes | None = None) -> None:
        super().__init__(message)
        self.deny = deny


class FrameError(ValueError):
    """A frame that does not follow the format (or breaks a receiver's limits)."""


# Blocking reads and writes within a deadline -------------------------------------------------------


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"the deadline passed during {what}")
    return left


def recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    """``n`` bytes from a blocking socket, before ``deadline`` (``time.monotonic()``) in all.

    Raises:
      TimeoutError: the deadline passed first (however the bytes trickled in).
      ConnectionError: the peer closed the connection first.
    """
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        left = deadline - time.monotonic()
        try:
            if left <= 0:  # the same error whether the deadline passes inside recv or between two
                raise TimeoutError
            sock.settimeout(left)
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise TimeoutError(f"the deadline passed during {what} ({n - got} of {n} bytes missing)") from None
        if k == 0:
            raise ConnectionError(f"the peer closed the connection during {what} ({n - got} of {n} bytes missing)")
        got += k
    return bytes(buf)


def send_all(sock: socket.socket, data: bytes, deadline: float, what: str) -> None:
    """``sock.sendall(data)`` before ``deadline``.

    Raises:
      TimeoutError: the deadline passed first. OSError: the connection failed.
    """
    sock.settimeout(_left(deadline, what))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise TimeoutError(f"the deadline passed during {what}") from None


# The handshake -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Handshake:
    """One protocol's handshake (see the module docstring).

    Attributes:
      magic: the 4 bytes that open its HELLO and REPLY.
      label: bound into every proof (``b"spmd-kv"``, ``b"spmd-host"``): a proof of one protocol is
        worthless in the other.
      version: the protocol's version.
    """

    magic: bytes
    label: bytes
    version: int = 1

    def digest(self, secret: bytes, role: bytes, nonce: bytes, client: int, server: int) -> bytes:
        msg = self.label + b" " + role + b" " + nonce + struct.pack("!II", client, server)
        return hmac.new(secret, msg, hashlib.sha256).digest()

    def hello(self, secret: bytes | None, server: int) -> tuple[bytes, bytes]:
        """``(HELLO bytes, the server's nonce)``."""
        nonce = os.urandom(32)
        return HELLO.pack(self.magic, self.version, AUTH if secret is not None else 0, server, nonce), nonce

    def verdict(
        self, reply: bytes, nonce: bytes, secret: bytes | None, server: int, accept: Callable[[int], bool]
    ) -> tuple[bytes, int]:
        """``(VERDICT bytes to send, the client's id)`` for a client's REPLY to the HELLO that carried ``nonce``.

        Raises:
          Refused: garbage, an id ``accept`` refuses, or no proof of ``secret``; its ``deny``
            attribute holds the ``DENY`` verdict to send when the peer spoke the protocol.
        """
        magic, version, flags, client, theirs, proof = REPLY.unpack(reply)
        if magic != self.magic or version != self.version:
            raise Refused(f"a peer that does not speak this protocol (magic {magic!r}, version {version})")
        deny = VERDICT.pack(_DENY, bytes(32))
        if not accept(client):
            raise Refused(f"a peer calling itself {client}, not a peer this side waits for", deny)
        if secret is None:
            return VERDICT.pack(_OKAY, bytes(32)), client
        if not flags & AUTH or not hmac.compare_digest(proof, self.digest(secret, b"client", nonce, client, server)):
            raise Refused(f"a peer calling itself {client} without the secret (HMAC check failed)", deny)
        return VERDICT.pack(_OKAY, self.digest(secret, b"server", theirs, client, server)), client

    def client(
        self,
        sock: socket.socket,
        secret: bytes | None,
        deadline: float,
        *,
        me: int = 0,
        server: int | None = None,
        where: str = "the server",
        hint: str = "",
    ) -> None:
        """Prove to the server at the other end of ``sock`` that this side holds ``secret`` (and check its proof).

        Args:
          sock: a connected blocking socket.
          secret: the shared key, or ``None`` (then only a server without one is accepted).
          deadline: ``time.monotonic()`` by which the whole handshake ends.
          me: this side's id; server: the id the server must have (``None``: any).
          where: what the server is, for errors (``"127.0.0.1:5000"``, ``"process 2's port"``).
          hint: appended to the error when the server refuses this side.

        Raises:
          Refused: the other end does not speak this protocol.
          PermissionError: the server refused this side, cannot prove it holds ``secret``, asks for
            none while this side has one, or is not peer ``server``.
          ConnectionError: the server closed the connection before its verdict.
          TimeoutError: the deadline passed.
        """
        magic, version, flags, server_id, nonce = HELLO.unpack(recv_exact(sock, HELLO.size, deadline, "the handshake"))
        if magic != self.magic or version != self.version:
            raise Refused(f"{where} does not speak this protocol (magic {magic!r}, version {version})")
        if server is not None and server_id != server:
            raise PermissionError(f"{where} is held by a peer calling itself {server_id}, not {server}")
        if secret is not None and not flags & AUTH:
            raise PermissionError(
                f"{where} does not authenticate, but this side was given a secret; refusing it (give the other "
                f"side the same secret)."
            )
        mine = os.urandom(32)
        auth = secret is not None
        proof = self.digest(secret, b"client", nonce, me, server_id) if auth else bytes(32)
        reply = REPLY.pack(self.magic, self.version, AUTH if auth else 0, me, mine, proof)
        send_all(sock, reply, deadline, "the handshake's reply")
        verdict, theirs = VERDICT.unpack(recv_exact(sock, VERDICT.size, deadline, "the handshake's verdict"))
        if verdict != _OKAY:
            need = "the right secret" if auth else "a secret (this side has none)"
            raise PermissionError(f"{where} refused the connection: it requires {need}.{' ' + hint if hint else ''}")
        if auth and not hmac.compare_digest(theirs, self.digest(secret, b"server", mine, me, server_id)):
            raise PermissionError(f"{where} failed to prove it holds the secret; refusing it.")


@dataclasses.dataclass
class _Pending:
    sock: socket.socket
    nonce: bytes
    reply: bytearray


class Acceptor:
    """Accepts connections on ``listener`` and runs their handshakes side by side.

    Args:
      listener: a bound, listening socket (the caller owns it; :meth:`close` leaves it open).
      handshake: the protocol's :class:`Handshake`.
      secret: the shared key, or ``None`` (then any peer that speaks the protocol passes).
      me: this side's id (in the HELLO and the proofs).
      accept: which client ids may pass (the others are told ``DENY``).
      on_refused: told why each refused connection was dropped.
      max_pending: handshakes in flight at most; one more drops the oldest.
    """

    def __init__(
        self,
        listener: socket.socket,
        handshake: Handshake,
        secret: bytes | None,
        *,
        me: int = 0,
        accept: Callable[[int], bool] = lambda client: True,
        on_refused: Callable[[str], None] = lambda why: None,
        max_pending: int = 64,
    ) -> None:
        self.listener, self.handshake, self.secret, self.me = listener, handshake, secret, me
        self.accept, self.on_refused, self.max_pending = accept, on_refused, max_pending
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._sel = selectors.DefaultSelector()
        listener.setblocking(False)
        self._sel.register(listener, selectors.EVENT_READ, None)

    def next(self, deadline: float) -> tuple[socket.socket, int]:
        """The next connection that passes its handshake, and its client id (a blocking socket, no timeout).

        Raises:
          TimeoutError: none passed before ``deadline`` (strangers were dropped meanwhile).
        """
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no peer passed the handshake before the deadline")
            for key, _ in self._sel.select(min(left, 1.0)):
                if key.data is None:
                    self._accept_all()
                    continue
                done = self._read(key.data)
                if done is not None:
                    return done

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # (out of descriptors, ...): the next round may do better
                self.on_refused(f"accept failed: {type(e).__name__}: {e}")
                return
            sock.setblocking(False)
            hello, nonce = self.handshake.hello(self.secret, self.me)
            try:
                if sock.send(hello) != len(hello):  # a fresh socket takes 44 bytes at once
                    raise OSError("the HELLO did not fit in the send buffer")
            except OSError as e:
                self.on_refused(f"{type(e).__name__}: {e}")
                sock.close()
                continue
            pending = _Pending(sock, nonce, bytearray())
            self._pending[sock.fileno()] = pending
            self._sel.register(sock, selectors.EVENT_READ, pending)
            if len(self._pending) > self.max_pending:
                oldest = next(iter(self._pending.values()))
                self._drop(oldest, f"the oldest of more than {self.max_pending} handshakes at once")

    def _read(self, p: _Pending) -> tuple[socket.socket, int] | None:
        try:
            chunk = p.sock.recv(REPLY.size - len(p.reply))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._drop(p, f"{type(e).__name__}: {e}")
            return None
        if not chunk:
            self._drop(p, f"a peer that closed the connection during the handshake ({len(p.reply)} bytes sent)")
            return None
        p.reply += chunk
        if len(p.reply) < REPLY.size:
            return None
        try:
            verdict, client = self.handshake.verdict(bytes(p.reply), p.nonce, self.secret, self.me, self.accept)
        except Refused as e:
            if e.deny is not None:
                try:
                    p.sock.send(e.deny)
                except OSError:
                    pass
            self._drop(p, str(e))
            return None
        self._forget(p)
        try:
            if p.sock.send(verdict) != len(verdict):
                raise OSError("the verdict did not fit in the send buffer")
        except OSError as e:
            p.sock.close()
            self.on_refused(f"{type(e).__name__}: {e}")
            return None
        p.sock.setblocking(True)
        return p.sock, client

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        self._sel.unregister(p.sock)

    def _drop(self, p: _Pending, why: str) -> None:
        self._forget(p)
        p.sock.close()
        self.on_refused(why)

    def close(self) -> None:
        """Drop every handshake in flight (the listener stays open)."""
        for p in list(self._pending.values()):
            self._forget(p)
            p.sock.close()
        self._sel.close()


# Frames --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrameFormat:
    """One protocol's frames: its magic, version and kinds (see the module docstring).

    Attributes:
      magic: 4 bytes that open every preamble.
      version: the protocol's version.
      kinds: frame kind -> name.
    """

    magic: bytes
    version: int
    kinds: Mapping[int, str]

    size = PREAMBLE.size

    def preamble(self, kind: int, seq: int, header_len: int, payload_len: int) -> bytes:
        return PREAMBLE.pack(self.magic, self.version, kind, 0, seq, header_len, payload_len)

    def frame(self, kind: int, seq: int, header: dict[str, Any], payload_len: int = 0) -> bytes:
        """Preamble and compact JSON header of a frame (its payload follows)."""
        body = json.dumps(header, separators=(",", ":")).encode()
        return self.preamble(kind, seq, len(body), payload_len) + body

    def parse(self, raw: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
        """``(kind, seq, header length, payload length)`` of a preamble; the caller checks the sizes.

        Raises:
          FrameError: another protocol's bytes (or garbage), or an unknown kind.
        """
        magic, version, kind, flags, seq, header_len, payload_len = PREAMBLE.unpack(raw)
        if magic != self.magic or version != self.version or flags != 0:
            raise FrameError(
                f"not a frame of this protocol (magic {bytes(magic)!r}, version {version}, flags {flags}; expected "
                f"{self.magic!r} version {self.version}): garbage on the connection"
            )
        if kind not in self.kinds:
            raise FrameError(f"unknown frame kind {kind}")
        return kind, seq, header_len, payload_len


def json_header(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A frame's JSON header, which must be an object.

    Raises:
      FrameError: not UTF-8 JSON, or not an object.
    """
    try:
        header = json.loads(bytes(raw))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise FrameError(f"the header is not JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(header, dict):
        raise FrameError(f"the header is not a JSON object: {header!r:.100}")
    return header
