"""``TCPKVPipe``: arrays over one TCP connection, framed, validated, authenticated, never pickled.

Frame (every message, ``None`` included)::

    preamble  12 bytes, network order: magic b"SKVP" | version u16 (=1) | flags u16 (=0) | header_len u32
    header    header_len bytes (<= MAX_HEADER_BYTES) of UTF-8 JSON, exactly these keys:
              {"none": bool, "dtype": str | null, "shape": [int, ...] | null, "nbytes": int}
    payload   nbytes bytes: the array in C order, native byte order (absent for None)

The receiver checks the magic, the version, the header length, then the header itself (an
allowed dtype by name, ``bfloat16`` included; non-negative dimensions; ``nbytes`` equal to
``prod(shape) * itemsize`` and at most ``max_message_bytes``) and only then allocates the
payload buffer, which it fills with ``recv_into`` (no list of chunks, no join). The sender passes
a ``memoryview`` of the array to the socket (no ``tobytes`` copy; only a non-contiguous array is
made contiguous first).

Connection: the server binds (loopback unless told otherwise), accepts ONE peer inside the
constructor and closes its listening socket; the client connects, retrying until ``timeout_s``.
Then a handshake, which with a ``secret`` is a mutual HMAC-SHA256 challenge-response (as
``multiprocessing.connection`` does): the server sends a random nonce, the client answers
``HMAC(secret, "spmd-kv client" + nonce)`` and its own nonce, the server answers
``HMAC(secret, "spmd-kv server" + client nonce)``. A peer without the right secret is refused
(the server keeps waiting for a proper peer until its timeout); a client that has a secret
refuses a server that does not ask for one.

Timeouts: every blocking socket operation waits at most ``timeout_s`` for progress; a wait for
the next message that times out before any byte arrived leaves the pipe usable, any other
fault (a timeout mid-message, a peer gone, garbage) closes the pipe, since the stream is no
longer in step, and later calls say why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

import numpy as np

from spmd.kv_transfer._arrays import as_host_array, dtype_from_name
from spmd.kv_transfer.base import KVPipeBase

__all__ = ["MAX_HEADER_BYTES", "TCPKVPipe"]

MAGIC = b"SKVP"
VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1 << 36  # 64 GiB
_PREAMBLE = struct.Struct("!4sHHI")
_HELLO = struct.Struct("!4sHH32s")  # server -> client: magic, version, flags (bit 0: auth), nonce
_REPLY = struct.Struct("!4sHH32s32s")  # client -> server: magic, version, flags, digest, client nonce
_VERDICT = struct.Struct("!4s32s")  # server -> client: b"SKOK" | b"SKNO", digest of the client nonce
_AUTH = 1
_HEADER_KEYS = frozenset(["none", "dtype", "shape", "nbytes"])
_MAX_NDIM = 64
_RECYCLE_MIN_BYTES = 1 << 20
_POOL_SIZE = 4


def encode_header(a: np.ndarray | None) -> bytes:
    """The preamble and JSON header of one frame."""
    if a is None:
        head = {"none": True, "dtype": None, "shape": None, "nbytes": 0}
    else:
        head = {"none": False, "dtype": str(a.dtype), "shape": list(a.shape), "nbytes": int(a.nbytes)}
    body = json.dumps(head, separators=(",", ":")).encode()
    return _PREAMBLE.pack(MAGIC, VERSION, 0, len(body)) + body


def decode_preamble(raw: bytes | bytearray | memoryview) -> int:
    """The header length announced by a preamble.

    Raises:
      ValueError: wrong magic, version or flags, or a header longer than :data:`MAX_HEADER_BYTES`.
    """
    magic, version, flags, length = _PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise ValueError(
            f"not a KV-pipe frame: magic {bytes(magic)!r}, expected {MAGIC!r} (garbage on the connection)."
        )
    if version != VERSION or flags != 0:
        raise ValueError(f"unsupported KV-pipe frame version {version} / flags {flags}; this side speaks {VERSION}.")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"KV-pipe header of {length} bytes announced; the maximum is {MAX_HEADER_BYTES}.")
    return length


def decode_header(raw: bytes | bytearray | memoryview, max_message_bytes: int) -> tuple[np.dtype, tuple, int] | None:
    """``(dtype, shape, nbytes)`` of a validated JSON header, or ``None`` for a None message.

    Raises:
      ValueError: malformed JSON, unknown keys, a bad dtype or shape, or a payload size that is
        inconsistent or larger than ``max_message_bytes``.
    """
    try:
        head = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"KV-pipe header is not valid JSON: {e}") from None
    if not isinstance(head, dict) or set(head) != _HEADER_KEYS:
        raise ValueError(
            f"KV-pipe header has keys {sorted(head) if isinstance(head, dict) else head!r:.200}; "
            f"expected {sorted(_HEADER_KEYS)}."
        )
    if head["none"] is True:
        if head["dtype"] is not None or head["shape"] is not None or head["nbytes"] != 0:
            raise ValueError(f"KV-pipe header {head!r:.200}: a None message carries no array.")
        return None
    if head["none"] is not False:
        raise ValueError(f"KV-pipe header: 'none' must be a bool, got {head['none']!r:.50}.")
    dtype = head["dtype"]
    if not isinstance(dtype, str):
        raise ValueError(f"KV-pipe header: dtype must be a string, got {dtype!r:.50}.")
    dt = dtype_from_name(dtype)
    shape, nbytes = head["shape"], head["nbytes"]
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ValueError(f"KV-pipe header: bad shape {shape!r:.200}.")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"KV-pipe header: bad byte count {nbytes!r:.50}.")
    if nbytes > max_message_bytes:
        raise ValueError(
            f"KV-pipe header announces {nbytes} bytes; this pipe accepts at most {max_message_bytes} "
            f"(max_message_bytes); refusing before allocating."
        )
    expected = dt.itemsize
    for s in shape:
        expected *= s  # Python ints: no overflow
    if expected != nbytes:
        raise ValueError(f"KV-pipe header: {dtype}{shape} is {expected} bytes, but the header says {nbytes}.")
    return dt, tuple(shape), nbytes


def _digest(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"spmd-kv " + role + b" " + nonce, hashlib.sha256).digest()


class _Refused(Exception):
    """A connecting peer failed the handshake (the server goes on waiting for another)."""


class TCPKVPipe(KVPipeBase):
    """A KV pipe over one TCP connection (see the module docstring for the frame and handshake).

    Args:
      host: the server's address to bind (``"127.0.0.1"``: loopback only; ``"0.0.0.0"`` opens it
        to the network, so use a ``secret`` then), or the address the client connects to.
      port: the TCP port.
      role: ``"server"`` (binds and accepts one peer) or ``"client"`` (connects).
      timeout_s: the longest any wait (connect, accept, a send or receive making no progress) may block.
      secret: a shared key; both sides must hold the same one (HMAC-SHA256 challenge-response).
      max_message_bytes: the largest payload this side accepts (a header announcing more is refused).
      recycle_buffers: receive large payloads (>= 1 MiB) into buffers of earlier messages whose
        arrays the caller has dropped (no array, view or memoryview of them alive), which saves
        first-touch page faults; ``False`` allocates every time.

    Raises:
      TimeoutError: no (acceptable) peer within ``timeout_s``.
      PermissionError: on the client, the server refused its secret (or lack of one), or a
        server that does not authenticate when this client has a secret.
      ValueError: bad arguments, or a peer that does not speak this protocol.
      OSError: the server cannot bind ``host:port``.

    ``recv_tensor`` returns numpy arrays (host memory, used as is by any JAX function); the KV
    helpers place them on devices.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        role: str = "server",
        timeout_s: float = 30.0,
        secret: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        recycle_buffers: bool = True,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError(f"TCPKVPipe: role must be 'server' or 'client', got {role!r}.")
        if not isinstance(host, str) or not host:
            raise ValueError(f"TCPKVPipe: host must be a non-empty string, got {host!r}.")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"TCPKVPipe: port must be an int in [0, 65536), got {port!r}.")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"TCPKVPipe: timeout_s must be a positive number of seconds, got {timeout_s!r}.")
        if secret is not None and (not isinstance(secret, (bytes, bytearray)) or not secret):
            raise TypeError(f"TCPKVPipe: secret must be non-empty bytes or None, got {type(secret).__name__}.")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 0:
            raise ValueError(f"TCPKVPipe: max_message_bytes must be a non-negative int, got {max_message_bytes!r}.")
        self.host, self.role, self.timeout_s = host, role, float(timeout_s)
        self.max_message_bytes = max_message_bytes
        self.recycle_buffers = bool(recycle_buffers)
        self._pool: list[np.ndarray] = []
        self._secret = bytes(secret) if secret is not None else None
        self._sock: socket.socket | None = None
        self._broken: str | None = None
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._preamble = bytearray(_PREAMBLE.size)
        self.port = port
        if role == "server":
            self._sock = self._accept(host, port)
        else:
            self._sock = self._connect(host, port)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(self.timeout_s)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"TCPKVPipe({self.host!r}, {self.port}, role={self.role!r}, {state})"

    # Connection ------------------------------------------------------------------------------

    def _accept(self, host: str, port: int) -> socket.socket:
        deadline = time.monotonic() + self.timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        refused: list[str] = []
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1)
            self.port = listener.getsockname()[1]
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"; refused {len(refused)} peer(s), last: {refused[-1]}" if refused else ""
                    raise TimeoutError(
                        f"TCPKVPipe server on {host}:{self.port}: no peer connected and passed the handshake "
                        f"within {self.timeout_s:g} s{why}."
                    )
                listener.settimeout(left)
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    conn.settimeout(min(self.timeout_s, max(deadline - time.monotonic(), 0.05)))
                    self._server_handshake(conn)
                    return conn
                except (_Refused, OSError, ValueError) as e:
                    refused.append(f"{type(e).__name__}: {e}" if not isinstance(e, _Refused) else str(e))
                    conn.close()
        finally:
            listener.close()

    def _connect(self, host: str, port: int) -> socket.socket:
        deadline = time.monotonic() + self.timeout_s
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"TCPKVPipe client: could not connect to {host}:{port} within {self.timeout_s:g} s "
                    f"(last error: {type(last).__name__}: {last}). Is the server started on that address?"
                )
            try:
                conn = socket.create_connection((host, port), timeout=left)
            except OSError as e:  # refused / unreachable while the server is starting: retry
                last = e
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            try:
                conn.settimeout(min(self.timeout_s, max(deadline - time.monotonic(), 0.05)))
                self._client_handshake(conn)
                return conn
            except BaseException:
                conn.close()
                raise

    def _server_handshake(self, conn: socket.socket) -> None:
        nonce = os.urandom(32)
        conn.sendall(_HELLO.pack(MAGIC, VERSION, _AUTH if self._secret else 0, nonce))
        raw = _recv_small(conn, _REPLY.size, "the client's handshake")
        magic, version, flags, digest, client_nonce = _REPLY.unpack(raw)
        if magic != MAGIC or version != VERSION:
            raise _Refused(f"a peer that does not speak the KV-pipe protocol (magic {magic!r}, version {version})")
        if self._secret is not None:
            if not flags & _AUTH or not hmac.compare_digest(digest, _digest(self._secret, b"client", nonce)):
                conn.sendall(_VERDICT.pack(b"SKNO", bytes(32)))
                raise _Refused("a peer without the right secret (HMAC check failed)")
            conn.sendall(_VERDICT.pack(b"SKOK", _digest(self._secret, b"server", client_nonce)))
        else:
            conn.sendall(_VERDICT.pack(b"SKOK", bytes(32)))

    def _client_handshake(self, conn: socket.socket) -> None:
        where = f"{self.host}:{self.port}"
        raw = _recv_small(conn, _HELLO.size, "the server's handshake")
        magic, version, flags, nonce = _HELLO.unpack(raw)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"TCPKVPipe client: {where} does not speak the KV-pipe protocol (magic {magic!r}).")
        if self._secret is not None and not flags & _AUTH:
            raise PermissionError(
                f"TCPKVPipe client: {where} does not authenticate, but this client was given a secret; "
                f"refusing (give the server the same secret)."
            )
        client_nonce = os.urandom(32)
        if flags & _AUTH and self._secret is not None:
            conn.sendall(_REPLY.pack(MAGIC, VERSION, _AUTH, _digest(self._secret, b"client", nonce), client_nonce))
        else:
            conn.sendall(_REPLY.pack(MAGIC, VERSION, 0, bytes(32), client_nonce))
        try:
            verdict, digest = _VERDICT.unpack(_recv_small(conn, _VERDICT.size, "the server's verdict"))
        except ConnectionError:
            verdict, digest = b"SKNO", b""
        if verdict != b"SKOK":
            need = "the right secret" if self._secret is not None else "a secret (this client has none)"
            raise PermissionError(f"TCPKVPipe client: {where} refused the connection: it requires {need}.")
        if self._secret is not None and not hmac.compare_digest(digest, _digest(self._secret, b"server", client_nonce)):
            raise PermissionError(f"TCPKVPipe client: {where} failed to prove it holds the secret; refusing it.")

    # State -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        """Close the connection; idempotent. The peer's next receive raises ``ConnectionError``."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _live(self, op: str) -> socket.socket:
        if self._sock is None:
            why = f" after an earlier fault ({self._broken})" if self._broken else ""
            raise ValueError(f"TCPKVPipe.{op}: the pipe is closed{why}.")
        return self._sock

    def _break(self, why: str) -> None:
        self._broken = why
        self.close()

    # Sending ---------------------------------------------------------------------------------

    def send_tensor(self, tensor: Any | None) -> None:
        """Send an array (numpy or JAX, any allowed dtype, any shape) or ``None``.

        Raises:
          TypeError: not an array, or a dtype that cannot travel (nothing is sent).
          ValueError: the pipe is closed.
          ConnectionError: the peer went away; TimeoutError: the peer stopped reading for ``timeout_s``.
            Either closes the pipe.
        """
        a = None if tensor is None else as_host_array(tensor, fn="TCPKVPipe.send_tensor")
        head = encode_header(a)
        parts = [memoryview(head)]
        if a is not None and a.nbytes:
            parts.append(memoryview(a.reshape(-1).view(np.uint8)))
        with self._send_lock:
            self._send_parts(self._live("send_tensor"), parts)

    def _send_parts(self, sock: socket.socket, parts: list[memoryview]) -> None:
        total = sum(p.nbytes for p in parts)
        sent = 0
        while parts:
            try:
                n = sock.sendmsg(parts)
            except TimeoutError:
                self._break(f"a send timed out after {sent} of {total} bytes")
                raise TimeoutError(
                    f"TCPKVPipe.send_tensor: the peer read nothing for {self.timeout_s:g} s; {sent} of "
                    f"{total} bytes sent. The pipe is closed."
                ) from None
            except OSError as e:
                self._break(f"send failed: {e}")
                raise ConnectionError(
                    f"TCPKVPipe.send_tensor: the connection failed after {sent} of {total} bytes "
                    f"({type(e).__name__}: {e}); the peer is gone. The pipe is closed."
                ) from e
            sent += n
            while parts and n >= parts[0].nbytes:
                n -= parts[0].nbytes
                parts.pop(0)
            if n:
                parts[0] = parts[0][n:]

    # Receiving -------------------------------------------------------------------------------

    def recv_tensor(self) -> np.ndarray | None:
        """The next array (a numpy array in its original dtype and shape) or ``None``.

        Raises:
          TimeoutError: no message began within ``timeout_s`` (the pipe stays usable), or one
            stalled midway (the pipe is closed).
          ConnectionError: the peer closed or died; mid-message, the error says how many bytes are missing.
          ValueError: the pipe is closed, or garbage / an invalid or oversized header arrived
            (refused before allocating; the pipe is closed).
        """
        with self._recv_lock:
            sock = self._live("recv_tensor")
            self._recv_into(sock, memoryview(self._preamble), "the next message", first=True)
            try:
                length = decode_preamble(self._preamble)
                header = bytearray(length)
                self._recv_into(sock, memoryview(header), "a message header")
                spec = decode_header(header, self.max_message_bytes)
            except ValueError as e:
                self._break(str(e))
                raise ValueError(f"TCPKVPipe.recv_tensor: {e} The pipe is closed.") from None
            if spec is None:
                return None
            dtype, shape, nbytes = spec
            buf = self._buffer(nbytes)
            if nbytes:
                self._recv_into(sock, memoryview(buf), f"a {dtype}{list(shape)} payload")
            return buf.view(dtype).reshape(shape)

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A receive buffer: a recycled one that nothing references any more, else a fresh one.

        Fresh pages cost a page fault each on first touch (a third of loopback throughput at
        64 MiB); a stream of same-sized layers reuses the buffers of arrays the caller dropped.
        Only buffers whose reference count shows that no array, view or memoryview of them is
        alive are reused (the pool's list, the loop variable and ``getrefcount``'s argument: 3).
        """
        if nbytes < _RECYCLE_MIN_BYTES or not self.recycle_buffers:
            return np.empty(nbytes, np.uint8)
        for b in self._pool:
            if b.nbytes == nbytes and sys.getrefcount(b) == 3:
                return b
        buf = np.empty(nbytes, np.uint8)
        self._pool.append(buf)
        if len(self._pool) > _POOL_SIZE:
            self._pool.pop(0)
        return buf

    def _recv_into(self, sock: socket.socket, view: memoryview, what: str, *, first: bool = False) -> None:
        total, got = view.nbytes, 0
        while got < total:
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                if first and got == 0:
                    raise TimeoutError(
                        f"TCPKVPipe.recv_tensor: no message within {self.timeout_s:g} s (the pipe is still open)."
                    ) from None
                self._break(f"a receive stalled {got} bytes into {what}")
                raise TimeoutError(
                    f"TCPKVPipe.recv_tensor: {what} stalled for {self.timeout_s:g} s with {total - got} of "
                    f"{total} bytes missing. The pipe is closed."
                ) from None
            except OSError as e:
                self._break(f"receive failed: {e}")
                raise ConnectionError(
                    f"TCPKVPipe.recv_tensor: the connection failed with {total - got} of {total} bytes of "
                    f"{what} missing ({type(e).__name__}: {e}). The pipe is closed."
                ) from e
            if n == 0:
                if first and got == 0:
                    self._break("the peer closed the connection")
                    raise ConnectionError("TCPKVPipe.recv_tensor: the peer closed the pipe (no more messages).")
                self._break(f"the peer went away {got} bytes into {what}")
                raise ConnectionError(
                    f"TCPKVPipe.recv_tensor: the peer went away mid-message: {total - got} of {total} bytes "
                    f"of {what} missing. The pipe is closed."
                )
            got += n


def _recv_small(conn: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = conn.recv_into(view[got:])
        except TimeoutError:
            raise TimeoutError(f"TCPKVPipe: timed out waiting for {what} ({n - got} of {n} bytes missing).") from None
        if k == 0:
            raise ConnectionError(f"TCPKVPipe: the peer closed the connection during {what}.")
        got += k
    return bytes(buf)
