"""JAX's transfer servers as :class:`~spmd.kv_transfer.TransferServerKVPipe` uses them.

What ``jax.experimental.transfer`` does not do by itself, found by experiment (JAX 0.10.2 and
0.12.0.1, CPU), and what this module does about it:

* ``await_pull(id, arrays, timeout=...)`` keeps only the whole seconds of its deadline: a
  registration for 0.5 s can no longer be pulled one moment later when the clock's fraction of
  a second was past 0.5. So a registration is made for ``ceil(timeout_s) + 1`` seconds.
* after that deadline the arrays can no longer be pulled, but the server keeps them until the
  server itself is dropped. So arrays are registered on a *holding* server that takes
  registrations for ``timeout_s``, then a fresh one takes over; a holding server is dropped, with
  everything it still holds, ``timeout_s`` after the deadline of its last registration (which
  lets a pull in flight finish). A timer does it, so an idle sender releases too: an array never
  pulled is gone at most ``2 x timeout_s + 2`` seconds after it was sent.
* ``pull`` returns at once with arrays that become ready when the bytes are in, and never, if the
  registration expired, the id was already taken, or the sender is gone (its own ``timeout``
  argument did not fire). So every pull waits for its arrays against ONE deadline
  (``timeout_s``) and raises ``TimeoutError`` after it; the pipe stays usable.
* a transfer that breaks (the sender died mid-transfer) leaves arrays that raise JAX's
  ``JaxRuntimeError`` when used: they are checked here, and the error is a ``ConnectionError``.

Ids are 63 random bits per registration, so nobody who cannot read the control channel can take
(pull) another's arrays by guessing; an id this pipe has pulled before is refused at once.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import threading
import time
from typing import Any

__all__ = ["Servers"]

_TAKEN_KEPT = 4096  # ids remembered as pulled
_CONNECTIONS_KEPT = 8


def _jax_error() -> type[BaseException]:
    import jax

    return jax.errors.JaxRuntimeError


@dataclasses.dataclass
class _Holder:
    server: Any
    address: str
    opened: float  # time.monotonic() of its first registration
    last: float = 0.0  # time.monotonic() deadline of its last registration


class Servers:
    """One side's transfer servers: one to pull with (it holds nothing), and the holding ones.

    Args:
      start: starts a transfer server (``transfer.start_transfer_server`` with this side's client and address).
      timeout_s: how long a registration waits to be pulled, and a pull for its arrays.
      where: the pipe, for errors.

    Raises:
      ConnectionError: JAX could not start the pulling server.
    """

    def __init__(self, start: Any, timeout_s: float, where: str) -> None:
        self._start, self.timeout_s, self.where = start, float(timeout_s), where
        self.hold_s = math.ceil(self.timeout_s) + 1.0  # a registration's lifetime (JAX keeps whole seconds)
        self._lock = threading.Lock()
        self._holders: list[_Holder] = []
        self._timer: threading.Timer | None = None
        self._conns: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._taken: collections.deque[int] = collections.deque(maxlen=_TAKEN_KEPT)
        self._taken_set: set[int] = set()
        self.puller = self._call(start, "start a transfer server")

    def _call(self, fn: Any, what: str, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except _jax_error() as e:
            raise ConnectionError(f"{self.where}: JAX's transfer server failed to {what}: {str(e)[:300]}") from None

    # Sending ---------------------------------------------------------------------------------

    def register(self, arrays: list[Any]) -> dict[str, Any]:
        """Register ``arrays`` for the peer to pull; what the peer needs to pull them (``{"id", "server"}``)."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            holder = self._holders[-1] if self._holders else None
            if holder is None or now >= holder.opened + self.timeout_s:
                server = self._call(self._start, "start a transfer server")
                holder = _Holder(server, server.address(), now)
                self._holders.append(holder)
            uid = int.from_bytes(os.urandom(8), "big") >> 1 or 1
            until = datetime.datetime.now() + datetime.timedelta(seconds=self.hold_s)
            self._call(holder.server.await_pull, "register arrays", uid, arrays, timeout=until)
            holder.last = now + self.hold_s
            self._schedule()
            return {"id": str(uid), "server": holder.address}

    def held(self) -> int:
        """How many holding servers are alive (each with the arrays it still holds)."""
        with self._lock:
            return len(self._holders)

    def _expire(self, now: float) -> None:
        self._holders = [h for h in self._holders if h.last + self.timeout_s > now]

    def _schedule(self) -> None:
        if self._timer is not None or not self._holders:
            return
        due = min(h.last for h in self._holders) + self.timeout_s - time.monotonic()
        self._timer = threading.Timer(max(due, 0.0) + 0.01, self._on_timer)
        self._timer.daemon = True
        self._timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._expire(time.monotonic())  # (dropping a server frees what it holds)
            self._schedule()

    # Receiving -------------------------------------------------------------------------------

    def pull(self, meta: dict[str, Any], specs: list[Any], fn: str) -> list[Any]:
        """The arrays ``meta`` names (as ``register`` returned it), with ``specs``' shapes and shardings, ready.

        Raises:
          ValueError: malformed ``meta``, or an id this side has already pulled (a replay).
          TimeoutError: the arrays did not arrive within ``timeout_s`` (the message is lost).
          ConnectionError: the transfer failed (the sender died mid-transfer, ...).
        """
        uid, address = meta.get("id"), meta.get("server")
        if not (isinstance(uid, str) and uid.isdigit() and len(uid) <= 20) or not (
            isinstance(address, str) and 0 < len(address) <= 300
        ):
            raise ValueError(f"{fn}: malformed transfer metadata {meta!r:.200}")
        uid_n = int(uid)
        if uid_n in self._taken_set:
            raise ValueError(
                f"{fn}: the arrays of id {uid} were already pulled by this pipe; the message is a replay (refused at "
                f"once: a second pull of an id never completes)."
            )
        deadline = time.monotonic() + self.timeout_s
        conn = self._conns.get(address)
        if conn is None:
            conn = self._call(self.puller.connect, "connect to the peer", address)
            self._conns[address] = conn
            if len(self._conns) > _CONNECTIONS_KEPT:
                self._conns.popitem(last=False)
        self._conns.move_to_end(address)
        out = self._call(conn.pull, "pull", uid_n, specs)
        if len(self._taken) == self._taken.maxlen:
            self._taken_set.discard(self._taken[0])
        self._taken.append(uid_n)
        self._taken_set.add(uid_n)
        self._wait(out, deadline, uid, fn)
        return out

    def _wait(self, arrays: list[Any], deadline: float, uid: str, fn: str) -> None:
        import jax

        pause = 1e-5
        while not all(a.is_ready() for a in arrays):
            if time.monotonic() >= deadline:
                arrays.clear()  # (arrays that never arrive block whoever looks at them: a traceback's repr, say)
                raise TimeoutError(
                    f"{fn}: the arrays of id {uid} did not arrive within {self.timeout_s:g} s: the sender's "
                    f"registration expired (it waits timeout_s), the sender is gone, or someone else took them. "
                    f"This message is lost; the pipe stays usable."
                )
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        try:
            jax.block_until_ready(arrays)
        except _jax_error() as e:
            arrays.clear()
            raise ConnectionError(f"{fn}: the transfer of id {uid} failed: {str(e)[:300]}") from None

    def close(self) -> None:
        """Drop every server (and every array they hold)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._holders.clear()
            self._conns.clear()
            self.puller = None
