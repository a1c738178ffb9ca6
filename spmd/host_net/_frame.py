"""Frames on one connection: their format, and a non-blocking writer and incremental reader.

A frame is :mod:`spmd.stream`'s ``preamble | JSON header | payload``, with magic ``b"SPHM"`` and
the call's number as the sequence number; connections open with :mod:`spmd.stream`'s handshake
(:data:`HANDSHAKE`). The header always names the call's ``op`` and ``sources`` (every
sender). Kinds: ``INTENT`` (``source``: the sender this process takes its value from;
``max_bytes``: its ``SPMD_HOST_MAX_BYTES``), ``MSG`` (``tree``; the payload is the packed arrays),
``ERROR`` (a sender could not encode its value: ``error``) and ``ABORT`` (this process gave up on
the call: ``error``).

Sizes are checked against ``SPMD_HOST_MAX_BYTES`` before anything is allocated; payloads are read
with ``recv_into`` straight into the one ``uint8[nbytes]`` buffer the arrays are views of, and sent
as memoryviews of the caller's arrays (no copies). A peer that closes its connection raises
``ConnectionError`` at once, with how many bytes were missing; garbage (bad magic, absurd sizes)
raises :class:`~spmd.wire.MalformedMessageError` and closes the connection. What a frame means
for a call is :mod:`spmd.host_net._exchange`'s business (its ``dispatch``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from spmd.host_net._call import describe
from spmd.stream import FrameError, FrameFormat, Handshake, json_header
from spmd.wire import MalformedMessageError, fail

VERSION = 1
INTENT, MSG, ERROR, ABORT = 1, 2, 3, 4
KIND_NAMES = {INTENT: "INTENT", MSG: "MSG", ERROR: "ERROR", ABORT: "ABORT"}
FRAMES = FrameFormat(b"SPHM", VERSION, KIND_NAMES)
HANDSHAKE = Handshake(b"SPHN", b"spmd-host", version=2)
"""Authenticates every connection with the job's secret; the ids are the two process indices."""
MAX_CONTROL_HEADER = 1 << 20
"""Longest header of a frame without a payload (intents, errors, aborts)."""
EAGER_MAX_BYTES = 64 << 10
"""The only sender of a call sends up to this many bytes of arrays (and of JSON tree) without waiting for intents.

So a receiver takes a message's header and payload of up to this size, or its ``SPMD_HOST_MAX_BYTES``
if larger, off the connection before checking them against that limit (and refusing the message,
the connection kept)."""
DRAIN_BYTES = 1 << 20
"""Size of the scratch buffer that payloads nobody keeps are read into and dropped."""
_ZEROS = bytes(64)
_MAX_IOV = 512
_PREAMBLE, _HEADER, _READY, _BODY = 0, 1, 2, 3


def payload_parts(arrays: list[np.ndarray], offsets: list[int]) -> list[memoryview]:
    """The packed payload as memoryviews of the arrays themselves (and up to 63 zero bytes between them)."""
    parts, pos = [], 0
    for a, off in zip(arrays, offsets, strict=True):
        if off > pos:
            parts.append(memoryview(_ZEROS)[: off - pos])
        if a.nbytes:
            parts.append(memoryview(a.reshape(-1).view(np.uint8)))
        pos = off + a.nbytes
    return parts


def _check_header(raw: bytearray, who: str) -> dict[str, Any]:
    try:
        header = json_header(raw)
    except FrameError as e:
        fail(f"{who}: {e}")
    if (
        not isinstance(header.get("op"), str)
        or not isinstance(header.get("sources"), list)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in header["sources"])
    ):
        fail(f"{who}: bad header {header!r:.120}")
    return header


@dataclasses.dataclass
class Frame:
    """A frame of the current call, kept: its header and, for a message, its payload buffer and layout."""

    kind: int
    header: dict[str, Any]
    buf: np.ndarray | None = None
    specs: list | None = None
    offsets: list | None = None


class Peer:
    """One connection: a queue of outgoing bytes and an incremental reader of incoming frames."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index, self.sock = index, sock
        self.fd = sock.fileno()
        self.closed: str | None = None
        self.out: collections.deque[memoryview] = collections.deque()
        self.pre = bytearray(FRAMES.size)
        self.stage, self.got = _PREAMBLE, 0
        self.view: memoryview = memoryview(self.pre)
        self.kind = self.seq = self.header_len = self.payload_len = 0
        self.header: dict[str, Any] | None = None
        self.pre_header = bytearray()
        self.frame: Frame | None = None  # what the payload being read belongs to (None: discard it)

    def close(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
            try:
                self.sock.close()
            except OSError:
                pass

    # Sending ----------------------------------------------------------------------------------

    def queue(self, kind: int, seq: int, header: bytes, parts: list[memoryview] = (), payload_len: int = 0) -> None:
        """Append a frame to the outgoing bytes (:meth:`flush` hands them to the kernel)."""
        self.out.append(memoryview(FRAMES.preamble(kind, seq, len(header), payload_len) + header))
        self.out.extend(parts)

    def flush(self) -> None:
        """Hand queued bytes to the kernel until it takes no more (never blocks).

        Raises:
          ConnectionError: the connection failed (it is closed).
        """
        out = self.out
        while out:
            try:
                n = self.sock.sendmsg(list(itertools.islice(out, _MAX_IOV)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.close(f"a send failed ({type(e).__name__}: {e})")
                raise ConnectionError(
                    f"the connection to process {self.index} failed while sending ({type(e).__name__}: {e}); "
                    f"did process {self.index} exit or crash?"
                ) from e
            while out and n >= out[0].nbytes:
                n -= out.popleft().nbytes
            if n:
                out[0] = out[0][n:]

    # Receiving --------------------------------------------------------------------------------

    def progress(self) -> str:
        """How much of the frame in flight has arrived, for error messages."""
        if self.stage == _PREAMBLE and self.got == 0:
            return "got nothing"
        if self.stage == _BODY:
            return f"got {self.got} of the {self.payload_len} payload bytes of its frame"
        return "got part of a frame header"

    def _recv(self, view: memoryview) -> int | None:
        """One ``recv_into``: the bytes read, or ``None`` when none are ready.

        Raises:
          ConnectionError: the peer closed the connection, or it failed (it is closed).
        """
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self.close(f"a receive failed ({type(e).__name__}: {e})")
            raise ConnectionError(
                f"the connection to process {self.index} failed ({type(e).__name__}: {e}; {self.progress()}); "
                f"did it exit or crash?"
            ) from e
        if n == 0 and view.nbytes:
            what = self.progress()
            self.close(f"process {self.index} closed the connection ({what})")
            raise ConnectionError(
                f"process {self.index} closed its connection to this process ({what}); did it exit or crash?"
            )
        return n

    def _fill(self) -> bool:
        """Read into ``self.view`` from ``self.got``; whether it is full (False: no more bytes ready)."""
        view, total = self.view, self.view.nbytes
        while self.got < total:
            n = self._recv(view[self.got :])
            if n is None:
                return False
            self.got += n
        return True

    def _drain(self, scratch: memoryview) -> bool:
        """Read and drop the rest of the payload; whether it is all gone (False: no more bytes ready)."""
        while self.got < self.payload_len:
            n = self._recv(scratch[: min(scratch.nbytes, self.payload_len - self.got)])
            if n is None:
                return False
            self.got += n
        return True

    def read(
        self, seq: int, max_bytes: int, dispatch: Callable[[Peer], None], scratch: memoryview, *, peek: bool = False
    ) -> Frame | None:
        """Read until a frame of call ``seq`` is complete (returned) or no more bytes are ready (``None``).

        Frames of earlier calls are read and dropped. ``dispatch`` sees each frame of call ``seq``
        once its header is in: it raises to refuse it (its payload is then dropped) or calls
        :meth:`keep` to keep it. A frame of a later call is kept for that call (with ``peek``,
        quietly: ``None``).

        Raises:
          RuntimeError: a frame of a later call (without ``peek``).
          ConnectionError: the peer closed the connection or it failed.
          MalformedMessageError: garbage on the connection (it is closed) or in a header.
        """
        while True:
            if self.stage == _PREAMBLE:
                if not self._fill():
                    return None
                self._parse_preamble(max_bytes)
            if self.stage == _HEADER:
                if not self._fill():
                    return None
                who = f"process {self.index}'s {KIND_NAMES[self.kind]} frame of call #{self.seq}"
                self.stage = _READY
                try:
                    self.header = _check_header(self.pre_header, who)
                except MalformedMessageError:
                    self._to_body(None)
                    if self.seq == seq:
                        raise
                    continue
            if self.stage == _READY:
                if self.seq > seq and peek:
                    return None
                if self.seq > seq:
                    raise RuntimeError(
                        f"process {self.index} sent its part of host-level call #{self.seq} "
                        f"({describe(self.header['op'], self.header['sources'])}) while this process is at call "
                        f"#{seq}: the processes made different calls (process {self.index} went on without this "
                        f"call's part)."
                    )
                self._to_body(None)
                if self.seq == seq:
                    dispatch(self)  # may raise (the payload is then dropped) or keep the frame
            if self.stage == _BODY:
                if self.frame is None or self.seq != seq:
                    self.frame = None
                    if not self._drain(scratch):
                        return None
                elif not self._fill():
                    return None
                frame, self.frame = self.frame, None
                self._reset()
                if frame is not None:
                    return frame

    def keep(self, frame: Frame) -> None:
        """Keep the frame being read (from ``dispatch``): its payload goes into ``frame.buf``."""
        self.frame = frame
        if frame.buf is not None:
            self.view = memoryview(frame.buf)

    def _reset(self) -> None:
        self.stage, self.got, self.view, self.header = _PREAMBLE, 0, memoryview(self.pre), None

    def _to_body(self, frame: Frame | None) -> None:
        self.stage, self.got, self.frame = _BODY, 0, frame
        self.view = memoryview(_ZEROS)[:0]

    def _parse_preamble(self, max_bytes: int) -> None:
        where = f"process {self.index}"
        problem = None
        try:
            kind, seq, header_len, payload_len = FRAMES.parse(self.pre)
        except FrameError as e:
            problem = str(e)
        else:
            problem = _limits(kind, header_len, payload_len, max_bytes)
        if problem is not None:
            self.close(f"it sent garbage: {problem}")
            fail(f"{where} sent {problem}; refused before allocating anything, and its connection is closed")
        self.kind, self.seq, self.header_len, self.payload_len = kind, seq, header_len, payload_len
        self.pre_header = bytearray(header_len)
        self.stage, self.got, self.view = _HEADER, 0, memoryview(self.pre_header)


def _limits(kind: int, header_len: int, payload_len: int, max_bytes: int) -> str | None:
    """What is wrong with a frame's sizes (``None``: within this process's limits)."""
    if header_len > (max(max_bytes, EAGER_MAX_BYTES) if kind == MSG else MAX_CONTROL_HEADER) or header_len < 2:
        return f"a frame of kind {KIND_NAMES[kind]} with a {header_len}-byte header"
    if kind == MSG and payload_len > max(max_bytes, EAGER_MAX_BYTES):
        return f"a {payload_len}-byte payload, over the limit SPMD_HOST_MAX_BYTES={max_bytes}"
    if kind != MSG and payload_len:
        return f"a frame of kind {KIND_NAMES[kind]} with a {payload_len}-byte payload"
    return None
