"""``TCPKVPipe``: arrays over one TCP connection, framed, validated, authenticated, never pickled.

The wire is :mod:`spmd.stream`'s (the one the host-level messages use too): every message is one
frame, ``None`` included::

    preamble  32 bytes, network order: magic b"SKVP" | version u8 (=2) | kind u8 (1 ARRAY, 2 NONE) |
              flags u16 (=0) | sequence number u64 | header length u64 | payload length u64
    header    header length (<= MAX_HEADER_BYTES) bytes of UTF-8 JSON: {"dtype": str, "shape": [int, ...]}
              for an ARRAY, {} for NONE
    payload   the array in C order, native byte order (none for NONE)

The receiver checks the preamble (magic, version, kind, the sequence number: the count of
messages before it), the header's length and the payload's length against ``max_message_bytes``
before reading anything else, then the header (an allowed dtype by name, ``bfloat16`` included;
at most 64 non-negative dimensions; ``prod(shape) * itemsize`` equal to the payload length) and
only then allocates the payload buffer, which it fills with ``recv_into`` (no list of chunks, no
join). The sender passes a ``memoryview`` of the array to the socket (no ``tobytes`` copy; only a
non-contiguous array is made contiguous first).

Connection: the server binds (loopback unless told otherwise), accepts ONE peer inside the
constructor and closes its listening socket; the client connects, retrying until ``timeout_s``.
Then :mod:`spmd.stream`'s handshake, which with a ``secret`` is a mutual HMAC-SHA256
challenge-response. The constructor has ONE deadline, ``timeout_s`` from its start, for
connecting and the handshake together. The server runs the handshakes of every connection side
by side, so strangers (garbage, the wrong secret, silent or dripping one byte at a time) are
dropped and never keep the right peer out; a client that has a secret refuses a server that does
not ask for one. WITHOUT a secret the server takes the first peer that speaks the protocol: any
process that can reach the port (every local user, on loopback) can then read and inject arrays.

Timeouts: every blocking socket operation waits at most ``timeout_s`` for progress; a wait for
the next message that times out before any byte arrived leaves the pipe usable, any other
fault (a timeout mid-message, a peer gone, garbage) closes the pipe, since the stream is no
longer in step, and later calls say why.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from spmd.kv_transfer._arrays import as_host_array, check_shape, dtype_from_name, dtype_name
from spmd.kv_transfer.base import KVPipeBase
from spmd.stream import Acceptor, FrameError, FrameFormat, Handshake, Refused, json_header

__all__ = ["MAX_HEADER_BYTES", "TCPKVPipe"]

ARRAY, NONE = 1, 2
FRAMES = FrameFormat(b"SKVP", 2, {ARRAY: "ARRAY", NONE: "NONE"})
HANDSHAKE = Handshake(b"SKVH", b"spmd-kv", version=2)
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1 << 36  # 64 GiB
_RECYCLE_MIN_BYTES = 1 << 20
_POOL_SIZE = 4


def encode_frame(a: np.ndarray | None, seq: int) -> bytes:
    """The preamble and JSON header of message ``seq`` (its payload, the array's bytes, follows)."""
    if a is None:
        return FRAMES.frame(NONE, seq, {})
    return FRAMES.frame(ARRAY, seq, {"dtype": dtype_name(a.dtype), "shape": list(a.shape)}, a.nbytes)


def check_preamble(raw: bytes | bytearray, seq: int, max_message_bytes: int) -> tuple[int, int, int]:
    """``(kind, header length, payload length)`` of message ``seq``'s preamble, within this side's limits.

    Raises:
      ValueError: garbage, a message out of order, a header over :data:`MAX_HEADER_BYTES`, or a
        payload over ``max_message_bytes`` (refused before anything is read or allocated).
    """
    try:
        kind, got, header_len, payload_len = FRAMES.parse(raw)
    except FrameError as e:
        raise ValueError(f"{e}.") from None
    if got != seq:
        raise ValueError(f"message #{got} arrived where #{seq} was due: the stream is out of step (or forged).")
    if not 2 <= header_len <= MAX_HEADER_BYTES:
        raise ValueError(f"a {header_len}-byte header announced; the maximum is {MAX_HEADER_BYTES}.")
    if payload_len > max_message_bytes:
        raise ValueError(
            f"a message of {payload_len} bytes announced; this pipe accepts at most {max_message_bytes} "
            f"(max_message_bytes); refusing before allocating."
        )
    if kind == NONE and payload_len:
        raise ValueError(f"a None message with a {payload_len}-byte payload.")
    return kind, header_len, payload_len


def check_header(raw: bytes | bytearray, kind: int, payload_len: int) -> tuple[np.dtype, tuple[int, ...]] | None:
    """``(dtype, shape)`` of an ARRAY message's header, checked against its payload length; ``None`` for NONE.

    Raises:
      ValueError: not a JSON object of exactly the expected keys, a dtype that may not travel, a
        bad shape, or a shape whose bytes are not the payload length.
    """
    try:
        head = json_header(raw)
    except FrameError as e:
        raise ValueError(f"KV-pipe header: {e}.") from None
    if kind == NONE:
        if head:
            raise ValueError(f"KV-pipe header {head!r:.200}: a None message carries no array.")
        return None
    if set(head) != {"dtype", "shape"}:
        raise ValueError(f"KV-pipe header has keys {sorted(head)!r:.200}; expected ['dtype', 'shape'].")
    dt = dtype_from_name(head["dtype"])
    shape = check_shape(head["shape"], dt.itemsize, "KV-pipe header")
    expected = dt.itemsize
    for s in shape:
        expected *= s  # Python ints: no overflow
    if expected != payload_len:
        raise ValueError(
            f"KV-pipe header: {head['dtype']}{list(shape)} is {expected} bytes, but the frame carries {payload_len}."
        )
    return dt, shape


class TCPKVPipe(KVPipeBase):
    """A KV pipe over one TCP connection (see the module docstring for the frame and handshake).

    Args:
      host: the server's address to bind (``"127.0.0.1"``: loopback only; ``"0.0.0.0"`` opens it
        to the network, so use a ``secret`` then), or the address the client connects to.
      port: the TCP port.
      role: ``"server"`` (binds and accepts one peer) or ``"client"`` (connects).
      timeout_s: the constructor's deadline (connecting and the handshake, in all), and the longest
        any later wait (a send or receive making no progress) may block.
      secret: a shared key; both sides must hold the same one (HMAC-SHA256 challenge-response).
        Without one the server takes the first peer that speaks the protocol: any process that can
        reach the port may read and inject arrays.
      max_message_bytes: the largest payload this side accepts (a header announcing more is refused).
      recycle_buffers: receive large payloads (>= 1 MiB) into buffers of earlier messages whose
        arrays the caller has dropped (no array, view or memoryview of them alive), which saves
        first-touch page faults; ``False`` allocates every time.
      deadline: the constructor's ``time.monotonic()`` deadline, when it is part of a longer set-up
        (the device pipes' constructors); default: ``timeout_s`` from now.

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
        deadline: float | None = None,
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
        if deadline is None:
            deadline = time.monotonic() + timeout_s  # one for connecting and the handshake together
        self.host, self.role, self.timeout_s = host, role, float(timeout_s)
        self.max_message_bytes = max_message_bytes
        self.recycle_buffers = bool(recycle_buffers)
        self._pool: list[np.ndarray] = []
        self._secret = bytes(secret) if secret is not None else None
        self._sock: socket.socket | None = None
        self._broken: str | None = None
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._preamble = bytearray(FRAMES.size)
        self._sent = self._received = 0  # messages, for the frames' sequence numbers
        self.port = port
        if role == "server":
            self._sock = self._accept(host, port, deadline)
        else:
            self._sock = self._connect(host, port, deadline)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(self.timeout_s)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"TCPKVPipe({self.host!r}, {self.port}, role={self.role!r}, {state})"

    # Connection ------------------------------------------------------------------------------

    def _accept(self, host: str, port: int, deadline: float) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        refused: list[str] = []
        acceptor = None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(16)
            self.port = listener.getsockname()[1]
            acceptor = Acceptor(listener, HANDSHAKE, self._secret, on_refused=refused.append)
            try:
                sock, _ = acceptor.next(deadline)
            except TimeoutError:
                why = f"; refused {len(refused)} peer(s), last: {refused[-1]}" if refused else ""
                raise TimeoutError(
                    f"TCPKVPipe server on {host}:{self.port}: no peer connected and passed the handshake "
                    f"within {self.timeout_s:g} s{why}."
                ) from None
            return sock
        finally:
            if acceptor is not None:
                acceptor.close()
            listener.close()

    def _connect(self, host: str, port: int, deadline: float) -> socket.socket:
        where = f"{host}:{port}"
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"TCPKVPipe client: could not connect to {where} and pass the handshake within "
                    f"{self.timeout_s:g} s (last error: {type(last).__name__}: {last}). Is the server started on "
                    f"that address?"
                )
            try:
                conn = socket.create_connection((host, port), timeout=left)
            except OSError as e:  # refused / unreachable while the server is starting: retry
                last = e
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            try:
                HANDSHAKE.client(conn, self._secret, deadline, where=where)
                return conn
            except Refused as e:
                conn.close()
                raise ValueError(f"TCPKVPipe client: {e}.") from None
            except PermissionError as e:
                conn.close()
                raise PermissionError(f"TCPKVPipe client: {e}") from None
            except (ConnectionError, TimeoutError) as e:  # dropped mid-handshake (or out of time): again
                conn.close()
                last = e
            except BaseException:
                conn.close()
                raise

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
        with self._send_lock:
            parts = [memoryview(encode_frame(a, self._sent))]
            if a is not None and a.nbytes:
                parts.append(memoryview(a.reshape(-1).view(np.uint8)))
            self._send_parts(self._live("send_tensor"), parts)
            self._sent += 1

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

    def recv_tensor(self, *, deadline: float | None = None) -> np.ndarray | None:
        """The next array (a numpy array in its original dtype and shape) or ``None``.

        Args:
          deadline: (set-up exchanges) a ``time.monotonic()`` by which the whole message must be
            in; by default each wait may take ``timeout_s``.

        Raises:
          TimeoutError: no message began within ``timeout_s`` (the pipe stays usable), or one
            stalled midway or missed ``deadline`` (the pipe is closed).
          ConnectionError: the peer closed or died; mid-message, the error says how many bytes are missing.
          ValueError: the pipe is closed, or garbage / an invalid or oversized header arrived
            (refused before allocating; the pipe is closed), or a message this process cannot
            allocate (the pipe is closed: it is out of step).
        """
        with self._recv_lock:
            sock = self._live("recv_tensor")
            self._recv_into(sock, memoryview(self._preamble), "the next message", deadline, first=True)
            try:
                kind, header_len, nbytes = check_preamble(self._preamble, self._received, self.max_message_bytes)
                header = bytearray(header_len)
                self._recv_into(sock, memoryview(header), "a message header", deadline)
                spec = check_header(header, kind, nbytes)
            except ValueError as e:
                self._break(str(e))
                raise ValueError(f"TCPKVPipe.recv_tensor: {e} The pipe is closed.") from None
            if spec is None:
                self._received += 1
                return None
            dtype, shape = spec
            try:
                buf = self._buffer(nbytes)
            except MemoryError:
                why = f"a {dtype}{list(shape)} message of {nbytes} bytes announced; this process cannot allocate it"
                self._break(why)
                raise ValueError(
                    f"TCPKVPipe.recv_tensor: {why} (lower max_message_bytes to refuse such messages from the header). "
                    f"The pipe is closed."
                ) from None
            if nbytes:
                self._recv_into(sock, memoryview(buf), f"a {dtype}{list(shape)} payload", deadline)
            self._received += 1
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

    def _recv_into(
        self, sock: socket.socket, view: memoryview, what: str, deadline: float | None, *, first: bool = False
    ) -> None:
        try:
            self._fill(sock, view, what, deadline, first)
        finally:
            if deadline is not None and self._sock is sock:
                sock.settimeout(self.timeout_s)

    def _fill(self, sock: socket.socket, view: memoryview, what: str, deadline: float | None, first: bool) -> None:
        total, got = view.nbytes, 0
        while got < total:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._break(f"{what} missed its deadline")
                    raise TimeoutError(
                        f"TCPKVPipe.recv_tensor: {what} did not arrive in time ({total - got} of {total} bytes "
                        f"missing). The pipe is closed."
                    )
                sock.settimeout(min(self.timeout_s, left))
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    continue  # (the deadline's error, above)
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
