"""The readiness protocol of :class:`~spmd.kv_transfer.IpcKVPipe`: epochs in shared memory, acks on TCP.

Each side stages what it sends in ``SLOTS`` slots used in turn (message ``k`` in slot ``k % SLOTS``).
A slot is a small HEADER (a ``/dev/shm`` file on every backend, :class:`HeaderFile`) plus data
buffers (per sender device, ``/dev/shm`` or CUDA IPC memory). Header layout (bytes)::

    0   magic b"SKVH"      4   version u32 (=1)
    8   epoch u64          the message's epoch (seq + 1), written LAST; 0 = never used
    16  layout length u32  20  inline length u32
    24  layout             JSON: seq, kind, dtype, shape, pieces (sender device, slot id, offset, bytes), kv
    INLINE_OFFSET          a small array's bytes (<= INLINE_BYTES), instead of a data buffer

The sender of message ``k`` (:func:`publish`):

1. waits until message ``k - SLOTS`` was ACKED (its slot is free again; acks come over TCP, batched:
   one ack says "taken up to n", and the sender reads them only when it needs a slot);
2. writes the data, then the layout;
3. RELEASES: everything written so far is visible to the peer before what follows (device copies
   synchronised, a host memory fence);
4. writes the epoch ``k + 1``.

The receiver of message ``k`` (:func:`receive`) polls the slot's epoch against one absolute deadline
(the caller's loop, which also watches the TCP channel: a peer that closed or died is noticed
there); seeing ``k + 1`` it ACQUIRES, reads the layout, copies the data, reads the epoch again
(unchanged, or the sender broke the protocol and reused the slot before its ack: ``ValueError``)
and acks. Epochs grow with every message, so a slot's previous message (epoch ``k + 1 - SLOTS``) is
never taken for the current one. The protocol is written as generators that yield at every step
that touches shared memory, so :mod:`tests.test_kv_slots_emulation` can run a sender and a receiver
step by step under a weak memory model and check every interleaving it draws; the pipe runs the
same generators to the end.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Generator
from typing import Any

__all__ = [
    "HEADER_BYTES",
    "INLINE_BYTES",
    "INLINE_OFFSET",
    "LAYOUT_MAX",
    "MAGIC",
    "SLOTS",
    "WAIT",
    "HeaderFile",
    "HeaderView",
    "epoch_of",
    "publish",
    "receive",
]

SLOTS = 2
MAGIC = b"SKVH"
VERSION = 1
HEADER_BYTES = 64 << 10
INLINE_OFFSET = 32 << 10
INLINE_BYTES = 16 << 10
LAYOUT_MAX = INLINE_OFFSET - 24
_EPOCH = 8
_LENGTHS = 16
_LAYOUT = 24
WAIT = "wait"  # yielded by a generator that cannot go on yet (the driver sleeps, reads TCP, checks its deadline)
STEP = "step"  # yielded after every step that touches shared memory
_FENCE = threading.Lock()


def epoch_of(seq: int) -> int:
    """The epoch of message ``seq``: unique per message, so a slot's older message never passes for it."""
    return seq + 1


def publish(
    mem: Any, seq: int, layout: bytes, write_data: Callable[[int], Generator], acked: Callable[[], int], inline=b""
) -> Generator:
    """Stage message ``seq`` in slot ``seq % SLOTS`` (a generator: yields ``WAIT`` until its slot is acked).

    Args:
      mem: the sender's headers (``store(slot, offset, bytes)``, ``release(slot)``).
      seq: the message's number (this side's count of messages sent before it).
      layout: the message's JSON layout.
      write_data: ``write_data(slot)``, a generator that writes the data buffers.
      acked: how many of this side's messages the peer has taken so far.
      inline: a small array's bytes, kept in the header.
    """
    slot = seq % SLOTS
    while acked() < seq - SLOTS + 1:  # message seq - SLOTS still occupies the slot
        yield WAIT
    yield from write_data(slot)
    if inline:
        mem.store(slot, INLINE_OFFSET, inline)
        yield STEP
    mem.store(slot, _LENGTHS, struct.pack("<II", len(layout), len(inline)) + layout)
    yield STEP
    mem.release(slot)
    yield STEP
    mem.store(slot, _EPOCH, struct.pack("<Q", epoch_of(seq)))
    yield STEP


def receive(mem: Any, seq: int, read_data: Callable[[dict, bytes], Generator], fn: str) -> Generator:
    """Take message ``seq`` from slot ``seq % SLOTS`` (a generator returning ``read_data``'s result).

    Args:
      mem: the peer's headers (``load(slot, offset, n)``, ``acquire(slot)``).
      seq: the number of the message (this side's count of messages received before it).
      read_data: ``read_data(layout, inline)``, a generator copying the data out; returns the arrays.
      fn: the public method, for errors.

    Raises:
      ValueError: the slot holds an epoch other than this message's or the slot's previous one, a
        malformed layout, or its epoch changed while it was read (reused before its ack).
    """
    slot, want = seq % SLOTS, epoch_of(seq)
    while True:
        (epoch,) = struct.unpack("<Q", mem.load(slot, _EPOCH, 8))
        yield STEP
        if epoch == want:
            break
        if epoch not in (0, epoch_of(seq - SLOTS)):
            raise ValueError(f"{fn}: slot {slot} holds epoch {epoch}, expected {want} (or the slot's last).")
        yield WAIT
    mem.acquire(slot)
    n, k = struct.unpack("<II", mem.load(slot, _LENGTHS, 8))
    yield STEP
    if n > LAYOUT_MAX or k > INLINE_BYTES:
        raise ValueError(f"{fn}: malformed slot header (layout {n} bytes, inline {k} bytes).")
    raw = mem.load(slot, _LAYOUT, n)
    inline = mem.load(slot, INLINE_OFFSET, k) if k else b""
    yield STEP
    try:
        layout = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{fn}: malformed layout from the peer: {e}") from None
    if not isinstance(layout, dict) or layout.get("seq") != seq:
        raise ValueError(f"{fn}: expected the layout of message {seq}, got {layout!r:.200}.")
    out = yield from read_data(layout, inline)
    (epoch,) = struct.unpack("<Q", mem.load(slot, _EPOCH, 8))
    yield STEP
    if epoch != want:
        raise ValueError(
            f"{fn}: slot {slot} was overwritten (epoch {epoch}) while message {seq} was read: the peer reused it "
            "before its ack."
        )
    return out


def run(gen: Generator, on_wait: Callable[[], None]) -> Any:
    """Drive a protocol generator to its end in this process; ``on_wait()`` between polls. Its return value."""
    try:
        while True:
            if next(gen) is WAIT:
                on_wait()
    except StopIteration as stop:
        return stop.value


# ---------------------------------------------------------------------------------------------------
# The headers as files in /dev/shm


class HeaderFile:
    """This side's ``SLOTS`` header files (written through a mapping); ``names`` go in the hello."""

    def __init__(self, directory: str, prefix: str, flush: Callable[[int], None] = lambda slot: None) -> None:
        self.paths: list[str] = []
        self.views: list[mmap.mmap] = []
        self._flush = flush
        try:
            for _ in range(SLOTS):
                fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
                self.paths.append(path)
                try:
                    os.ftruncate(fd, HEADER_BYTES)
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(fd, 0, HEADER_BYTES)
                    view = mmap.mmap(fd, HEADER_BYTES)
                finally:
                    os.close(fd)
                view[:8] = MAGIC + struct.pack("<I", VERSION)
                self.views.append(view)
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return [os.path.basename(p) for p in self.paths]

    def store(self, slot: int, offset: int, data: bytes) -> None:
        self.views[slot][offset : offset + len(data)] = data

    def release(self, slot: int) -> None:
        """What was written before is visible before what follows: device copies done, then a fence."""
        self._flush(slot)
        with _FENCE:  # a lock round trip is a full memory barrier (the stores above cannot sink below it)
            pass

    def close(self) -> None:
        for v in self.views:
            try:
                v.close()
            except (BufferError, ValueError):
                pass
        for p in self.paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.views, self.paths = [], []


class HeaderView:
    """The peer's header files, read with ``pread`` (never mapped: a truncated file is an error, not a SIGBUS).

    Each is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` (a regular file of this
    user, at least ``HEADER_BYTES`` long, the magic and version right) when opened, and its size
    again before every read.

    Raises:
      ValueError: a malformed name, a link, not a regular file, another user's, too short, wrong magic.
      ConnectionError: the file is gone (the peer closed).
    """

    def __init__(self, directory: str, names: Any, name_ok: Callable[[str], bool], fn: str) -> None:
        if not isinstance(names, list) or len(names) != SLOTS or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{fn}: malformed header names from the peer: {names!r:.200}")
        self.fds: list[int] = []
        self.names = names
        try:
            for name in names:
                if not name_ok(name):
                    raise ValueError(f"{fn}: malformed shared-memory name {name!r:.80}")
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                try:
                    self.fds.append(os.open(os.path.join(directory, name), flags))
                except FileNotFoundError:
                    raise ConnectionError(f"{fn}: the peer's slot header {name!r} is gone (the peer closed).") from None
                except OSError as e:
                    why = "is a symbolic link; refused" if e.errno == errno.ELOOP else f"cannot be opened: {e}"
                    raise ValueError(f"{fn}: the slot header {name!r} {why}.") from None
                if self.load(len(self.fds) - 1, 0, 8) != MAGIC + struct.pack("<I", VERSION):
                    raise ValueError(f"{fn}: the slot header {name!r} is not one of this protocol (magic, version).")
        except BaseException:
            self.close()
            raise

    def load(self, slot: int, offset: int, n: int) -> bytes:
        fd, name = self.fds[slot], self.names[slot]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"IpcKVPipe: the slot header {name!r} is not a regular file of this user; refused.")
        if st.st_size < HEADER_BYTES:
            raise ValueError(f"IpcKVPipe: the slot header {name!r} holds {st.st_size} bytes: it was truncated.")
        data = os.pread(fd, n, offset)
        if len(data) != n:
            raise ValueError(f"IpcKVPipe: the slot header {name!r} ended early: it was truncated while being read.")
        return data

    def acquire(self, slot: int) -> None:
        """Reads after this see what the peer wrote before its epoch (``pread`` is a system call: a barrier)."""

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
