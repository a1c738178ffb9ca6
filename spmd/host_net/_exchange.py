"""The frames of one host-level call: what to send to whom, what to wait for from whom, one deadline.

An :class:`Exchange` is built for each call (:mod:`spmd.host_net._ops` says which frames each op
sends and expects). :meth:`Exchange.run` moves bytes on every connection at once (non-blocking
sockets under ``poll``) until every expected frame is in and everything sent is with the kernel,
within the call's one deadline. Every frame of the call is checked as soon as its header is in:

* it names the same op and senders, else both sides raise ``RuntimeError`` ("the processes made
  different calls"); a frame of a later call means the peer went on without this call's part;
* an ``ERROR`` frame (a sender could not encode its value) or an ``ABORT`` frame (a peer gave up
  on this call) raises ``RuntimeError`` naming why;
* a message's sizes are checked against ``SPMD_HOST_MAX_BYTES`` before its buffer is allocated.

A process that fails (timeout, mismatch, malformed input, Ctrl-C) tells every peer
(:meth:`Exchange.notify`), so a process arriving late raises ``RuntimeError("process p gave up
on this call")``. Frames of earlier, failed calls still in a stream are read and dropped; an
outgoing frame cut short by a failure is finished in later calls (the streams stay in step).
"""

from __future__ import annotations

import collections
import json
import select
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spmd.host_net._call import Call, mismatch
from spmd.host_net._frame import ABORT, ERROR, INTENT, KIND_NAMES, MSG, Frame, Peer
from spmd.wire import MalformedMessageError, array_specs, fail, layout, views


class Exchange:
    """The frames of one call between this process ``me`` and its ``peers``.

    Args:
      peers: the connections, by process index (every other process of the job).
      me: this process's index; n_proc: the number of processes.
      scratch: a buffer that payloads nobody keeps are read into and dropped.
      call: the call (its number, op, senders, deadline and size limit).
    """

    def __init__(self, peers: dict[int, Peer], me: int, n_proc: int, scratch: memoryview, call: Call) -> None:
        self.peers, self.me, self.n_proc, self.scratch, self.call = peers, me, n_proc, scratch, call
        self.want: dict[int, collections.deque[int]] = {}
        self.frames: dict[int, list[Frame]] = collections.defaultdict(list)
        self.sent: set[int] = set()
        self.noticed = False  # an ERROR or ABORT went out: the peers know this process failed
        self.eager: set[int] = set()  # peers whose message came without an intent first
        self.sources = list(call.sources)

    def _peer(self, p: int) -> Peer:
        peer = self.peers[p]
        if peer.closed is not None:
            raise ConnectionError(
                f"{self.call.where()}: the connection to process {p} was lost earlier ({peer.closed}); host-level "
                f"calls that involve process {p} cannot complete."
            )
        return peer

    def header(self, **extra: Any) -> bytes:
        """A frame header of this call (its op and senders) with ``extra`` fields."""
        return json.dumps({"op": self.call.op, "sources": self.sources, **extra}, separators=(",", ":")).encode()

    def send(self, p: int, kind: int, header: bytes, parts: list[memoryview] = (), payload_len: int = 0) -> None:
        """Queue a frame to process ``p`` and hand what the kernel takes of it now (:meth:`run` sends the rest)."""
        peer = self._peer(p)
        peer.queue(kind, self.call.seq, header, parts, payload_len)
        self.sent.add(p)
        self._flush(peer)

    def expect(self, p: int, *kinds: int) -> None:
        """Wait (in :meth:`run`) for frames of these kinds from process ``p``, in this order."""
        self._peer(p)
        self.want.setdefault(p, collections.deque()).extend(kinds)

    def message(self, p: int) -> tuple[Any, list[np.ndarray]]:
        """``(tree, arrays)`` of the last message process ``p`` sent in this call (arrays: views of its buffer)."""
        msg = self.frames[p][-1]
        return msg.header["tree"], views(msg.buf, msg.specs, msg.offsets)

    def _flush(self, peer: Peer) -> None:
        try:
            peer.flush()
        except ConnectionError as e:
            if peer.index in self.sent or peer.index in self.want:
                raise ConnectionError(f"{self.call.where()}: {e}") from e

    def _notice(self, peer: Peer) -> None:
        """Raise for a frame of another call (by op or senders), an ``ERROR`` or an ``ABORT``."""
        call, h, p = self.call, peer.header, peer.index
        if h["op"] != call.op or h["sources"] != self.sources:
            raise mismatch(call.where(), self.me, call.op, call.sources, p, h["op"], h["sources"])
        if peer.kind in (ERROR, ABORT):
            error = h.get("error")
            if not isinstance(error, str):
                fail(f"{call.where()}, process {p}: an {KIND_NAMES[peer.kind]} frame without an error")
            if peer.kind == ERROR:
                raise RuntimeError(f"{call.op}: process {p} could not send its value: {error[:2000]}")
            raise RuntimeError(f"{call.where()}: process {p} gave up on this call: {error[:500]}")

    def _dispatch(self, peer: Peer) -> None:
        """Check a frame of this call and keep it (a buffer for its payload), or raise."""
        self._notice(peer)
        call, h, p = self.call, peer.header, peer.index
        kinds = self.want[p]
        expected = kinds[0]
        who = f"{call.where()}, process {p}"
        if peer.kind == MSG and expected == INTENT and len(kinds) == 2 and len(call.sources) == 1:
            kinds.popleft()  # an eager message: the only sender's value stands for its intent
            self.eager.add(p)
            expected = MSG
        if peer.kind != expected:
            fail(f"{who}: expected an {KIND_NAMES[expected]} frame, got {KIND_NAMES[peer.kind]}")
        if peer.kind == INTENT:
            src, cap = h.get("source"), h.get("max_bytes")
            if (
                not isinstance(src, int)
                or isinstance(src, bool)
                or src not in call.sources
                or not isinstance(cap, int)
                or isinstance(cap, bool)
            ):
                fail(f"{who}: a bad intent {h!r:.160}")
            peer.keep(Frame(INTENT, h))
            return
        if peer.header_len > call.max_bytes:
            fail(
                f"{who}: a {peer.header_len}-byte JSON tree, over the limit SPMD_HOST_MAX_BYTES={call.max_bytes} "
                f"(bytes and str values travel in it)"
            )
        tree = h.get("tree")
        specs = array_specs(tree)
        offsets, total = layout(specs, call.max_bytes, what=who)
        if total != peer.payload_len:
            fail(f"{who}: its arrays need {total} bytes; the frame carries {peer.payload_len}")
        try:
            buf = np.empty(total, np.uint8)
        except MemoryError:  # under SPMD_HOST_MAX_BYTES, yet more than this process has: refused (and drained)
            fail(f"{who}: its arrays need {total} bytes, which this process cannot allocate")
        peer.keep(Frame(MSG, h, buf, specs, offsets))

    def _after_eager(self, peer: Peer) -> None:
        self._notice(peer)  # an ABORT: the sender gave up on this call (it timed out waiting for this process)
        fail(f"{self.call.where()}, process {peer.index}: a {KIND_NAMES[peer.kind]} frame after its message")

    def _look_for_abort(self, peer: Peer) -> None:
        """After an eager message, read what is already there: a sender that gave up has said so.

        Anything else (the peer's next call, garbage, a closed connection) is left for the next
        call that involves the peer: this call has its value.
        """
        try:
            peer.read(self.call.seq, self.call.max_bytes, self._after_eager, self.scratch, peek=True)
        except (ConnectionError, MalformedMessageError):
            pass

    def run(self, on_frame: Callable[[int, Frame], None] | None = None) -> None:
        """Move bytes until every wanted frame is in and everything sent is with the kernel.

        ``on_frame(p, frame)`` sees every wanted frame as it arrives (it may :meth:`send`).

        Raises:
          TimeoutError: the call's deadline passed first (the message names the process waited for).
          RuntimeError, ConnectionError, MalformedMessageError: see the module docstring.
        """
        call, peers, scratch = self.call, self.peers, self.scratch
        while True:
            for p in list(self.want):
                peer = self._peer(p)
                while p in self.want:
                    try:
                        frame = peer.read(call.seq, call.max_bytes, self._dispatch, scratch)
                    except (ConnectionError, MalformedMessageError, RuntimeError) as e:
                        raise type(e)(e.args[0] if str(e).startswith(call.op) else f"{call.where()}: {e}") from None
                    if frame is None:
                        break
                    kinds = self.want[p]
                    kinds.popleft()
                    if not kinds:
                        del self.want[p]
                    self.frames[p].append(frame)
                    if on_frame is not None:
                        on_frame(p, frame)
                    if p in self.eager and p not in self.want:
                        self._look_for_abort(peer)
            for peer in peers.values():
                if peer.out and peer.closed is None:
                    self._flush(peer)
            if not self.want and not any(peers[p].out for p in self.sent):
                return
            left = call.deadline - time.monotonic()
            if left <= 0:
                raise self._timeout()
            poller = select.poll()
            for p, peer in peers.items():
                if peer.closed is not None:
                    continue
                mask = (select.POLLIN if p in self.want else 0) | (select.POLLOUT if peer.out else 0)
                if mask:
                    poller.register(peer.fd, mask)
            poller.poll(min(left, 86400.0) * 1000 + 1)

    def _timeout(self) -> TimeoutError:
        call = self.call
        fix = (
            "Every process must make the same host-level calls in the same order; check that process {p} is alive "
            "and reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S."
        )
        for p in self.want:
            peer = self.peers[p]
            return TimeoutError(
                f"{call.where()}: waited {call.timeout:g} s for process {p} and {peer.progress()}. " + fix.format(p=p)
            )
        p = next(p for p in self.sent if self.peers[p].out)
        left = sum(v.nbytes for v in self.peers[p].out)
        return TimeoutError(
            f"{call.where()}: waited {call.timeout:g} s for process {p} to read this process's message "
            f"({left} bytes still unsent). " + fix.format(p=p)
        )

    def notify(self, kind: int, e: BaseException) -> None:
        """Tell every peer this process failed (``ERROR``: its value; ``ABORT``: the call); never blocks."""
        if self.noticed:
            return
        self.noticed = True
        limit = 2000 if kind == ERROR else 500
        header = self.header(error=f"{type(e).__name__}: {str(e)[:limit]}")
        for peer in self.peers.values():
            if peer.closed is None:
                peer.queue(kind, self.call.seq, header)
                try:
                    peer.flush()
                except ConnectionError:
                    pass
