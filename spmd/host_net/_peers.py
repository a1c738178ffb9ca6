"""Setting up the direct connections: addresses in the key-value store, the transport decision, the connections.

Lazily, inside the first host-level call, bounded by its deadline, and resumable if that call
fails. Every process binds a listening socket: to loopback, or across hosts to this host's address
(:func:`spmd.net.host_address`; a wildcard only if allowed). It publishes ``{host, port, machine}`` in the
key-value store (the trust root; ``machine`` is the hostname, boot id and network namespace), and
process 0 publishes a random 32-byte secret. Every process reads every record and makes the same
decision: direct connections when every process runs on this machine (same ``machine``) or every
process was given an address; otherwise the store (``SPMD_HOST_TRANSPORT=tcp`` makes that an error
instead). Process ``i`` connects to every ``j < i`` and accepts every ``j > i`` (this order cannot
deadlock). Every connection is authenticated both ways (:mod:`spmd.stream`'s handshake, the ids
being the process indices), within the call's one deadline: the accepting side runs every
handshake side by side (:class:`spmd.stream.Acceptor`), so a stranger, garbage or a peer without
the secret is dropped while the right peers get in, silent or slow strangers included.

One PeerConnections serves one thread at a time: host-level calls are numbered in the order a process makes
them, so two threads calling at once cannot agree with the other processes; a second thread's
call raises ``RuntimeError`` instead of interleaving its frames with the first one's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kernels.rendezvous import Rendezvous, publish
from spmd.envs import HOST_TRANSPORTS
from spmd.host_net import _ops
from spmd.host_net._call import Call
from spmd.host_net._exchange import Exchange
from spmd.host_net._frame import DRAIN_BYTES, HANDSHAKE, VERSION, Peer
from spmd.stream import Acceptor, Refused
from spmd.wire import fail

_KEY = "spmd/host_net"
_WHERE = "setting up the direct host-level connections"
_RETRY_S = 0.02


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """How this process's host-level messages travel (``SPMD_HOST_TRANSPORT``, ``SPMD_HOST_ADDRESS``).

    Attributes:
      transport: ``auto`` (direct connections where every process can reach every other, else the
        key-value store), ``tcp`` (direct connections or an error) or ``store``.
      address: an address of this host that the other processes can reach, to listen on instead of
        loopback (and to publish); ``None``: loopback.
      bind: where to listen when that differs from ``address`` (a wildcard the user allowed).
    """

    transport: str = "auto"
    address: str | None = None
    bind: str | None = None

    def __post_init__(self) -> None:
        if self.transport not in HOST_TRANSPORTS:
            raise ValueError(f"NetConfig: transport={self.transport!r}: expected one of {', '.join(HOST_TRANSPORTS)}.")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ValueError(f"NetConfig: address={self.address!r}: expected a host name or IP address, or None.")


def machine() -> str:
    """Hostname, boot id and network namespace: equal on two processes that share loopback."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("")
    try:
        parts.append(os.readlink("/proc/self/ns/net"))
    except OSError:
        parts.append("")
    return "|".join(parts)


class PeerConnections:
    """This process's connections to every other process of the job (see the module docstring).

    Args:
      client: the coordination service's client (``key_value_set_bytes`` and
        ``blocking_key_value_get_bytes``).
      me: this process's index; n_proc: the number of processes.
      config: transport and address (:class:`NetConfig`).
    """

    def __init__(self, client: Any, me: int, n_proc: int, config: NetConfig) -> None:
        self.client, self.me, self.n_proc, self.config = client, me, n_proc, config
        self.mode: str | None = None  # "tcp" or "store" once every process's record is read
        self.peers: dict[int, Peer] = {}
        self.scratch = memoryview(bytearray(DRAIN_BYTES))
        self._listener: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._records: dict[int, dict[str, Any]] = {}
        self._secret: bytes | None = None
        self._refused: collections.deque[str] = collections.deque(maxlen=8)  # the last few, for errors
        self._n_refused = 0
        self._lock = threading.Lock()
        self._busy = ""  # what holds the lock, for the error of a second thread

    @contextlib.contextmanager
    def _one_thread(self, call: Call) -> Iterator[None]:
        """Run one call's socket work; a call from a second thread meanwhile raises ``RuntimeError``."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"{call.where()}: host-level calls from two threads at once (thread "
                f"{threading.current_thread().name!r} while {self._busy}). Every process numbers its host-level "
                f"calls in the order it makes them, so make them from one thread at a time; this call's number is "
                f"spent, so later calls of this process no longer line up with the other processes' calls."
            )
        try:
            self._busy = f"thread {threading.current_thread().name!r} is in {call.where()}"
            yield
        finally:
            self._busy = ""
            self._lock.release()

    # Calls --------------------------------------------------------------------------------------

    def _exchange(self, call: Call) -> Exchange:
        return Exchange(self.peers, self.me, self.n_proc, self.scratch, call)

    def broadcast(self, call: Call, value: Any, source: int, check: Callable[[Any], None] | None) -> Any:
        """Process ``source``'s ``value`` (see :func:`spmd.host.broadcast_from`) over the connections."""
        with self._one_thread(call):
            return _ops.broadcast(self._exchange(call), value, source, check)

    def all_gather(self, call: Call, value: Any) -> list[Any]:
        """Every process's ``value``, in process order (see :func:`spmd.host.all_gather_object`)."""
        with self._one_thread(call):
            return _ops.all_gather(self._exchange(call), value)

    def barrier(self, call: Call) -> None:
        """Return once every process reached this call."""
        with self._one_thread(call):
            _ops.barrier(self._exchange(call))

    # Setting up -------------------------------------------------------------------------------

    def ready(self, call: Call) -> bool:
        """Finish setting up (within ``call``'s deadline); whether messages go over TCP (else the store).

        Raises:
          TimeoutError: a process did not publish its address or connect in time.
          ValueError: ``SPMD_HOST_TRANSPORT=tcp`` but the processes span machines without ``SPMD_HOST_ADDRESS``.
          PermissionError: the process at a peer's published port cannot prove it holds the job's secret.
          MalformedMessageError: a record in the store that this module cannot have written.
        """
        if self.mode == "tcp" and len(self.peers) == self.n_proc - 1:
            return True
        if self.mode == "store":
            return False
        with self._one_thread(call):
            return self._set_up(call)

    def _set_up(self, call: Call) -> bool:
        self._publish()
        for p in range(self.n_proc):
            if p != self.me and p not in self._records:
                self._records[p] = self._read_record(p, call)
        if self.mode is None:
            try:
                self.mode = self._decide()
            except ValueError:
                self._close_listener()
                raise
        if self.mode == "store":
            self._close_listener()
            return False
        if self._secret is None:
            secret = self._get(f"{_KEY}/secret", 0, call, "its secret")
            if len(secret) != 32:
                fail(f"the job's secret in the key-value store is {len(secret)} bytes, not 32")
            self._secret = secret
        for p in range(self.me):
            if p not in self.peers:
                self._connect(p, call)
        if any(p not in self.peers for p in range(self.me + 1, self.n_proc)):
            self._accept(call)
        self._close_listener()
        return True

    def _publish(self) -> None:
        """Listen, and publish where (the secret first, on process 0); all again if a step failed."""
        if self._records.get(self.me):
            return
        host = self.config.address or "127.0.0.1"
        bind = self.config.bind or host
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((bind, 0))
            listener.listen(max(8, self.n_proc))
            record = {"v": VERSION, "host": host, "port": listener.getsockname()[1], "machine": machine()}
            record["explicit"] = self.config.address is not None
            if self.me == 0:  # (nobody reads the secret before process 0's record, written after it)
                self._secret = os.urandom(32)
                publish(self.client, f"{_KEY}/secret", self._secret, where=_WHERE, overwrite=True)
            publish(self.client, f"{_KEY}/{self.me}", json.dumps(record).encode(), where=_WHERE)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._records[self.me] = record

    def _get(self, key: str, p: int, call: Call, what: str) -> bytes:
        raw = Rendezvous(self.client, call.timeout, call.where(), deadline=call.deadline).read(
            key,
            who=f"process {p}",
            what=f"setting up the direct host-level connections: {what}",
            hint=f"Every process must make the same host-level calls, with the same SPMD_HOST_TRANSPORT; check that "
            f"process {p} is alive and reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S.",
        )
        if not isinstance(raw, (bytes, bytearray)):
            fail(f"process {p}'s {what}: {type(raw).__name__}")
        return bytes(raw)

    def _read_record(self, p: int, call: Call) -> dict[str, Any]:
        raw = self._get(f"{_KEY}/{p}", p, call, "its address")
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if (
            not isinstance(rec, dict)
            or rec.get("v") != VERSION
            or not isinstance(rec.get("host"), str)
            or not isinstance(rec.get("port"), int)
            or not isinstance(rec.get("machine"), str)
            or not isinstance(rec.get("explicit"), bool)
        ):
            fail(f"process {p}'s host-level address record {raw[:200]!r}")
        return rec

    def _decide(self) -> str:
        recs = [self._records[p] for p in range(self.n_proc)]
        if all(r["machine"] == recs[0]["machine"] for r in recs) or all(r["explicit"] for r in recs):
            return "tcp"
        if self.config.transport == "tcp":
            raise ValueError(
                "SPMD_HOST_TRANSPORT=tcp: the processes run on several machines, and not every process was given "
                "SPMD_HOST_ADDRESS (an address of its host that the others can reach); set it on every process, or "
                "use SPMD_HOST_TRANSPORT=auto to fall back to the key-value store."
            )
        return "store"

    def _close_listener(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _add(self, p: int, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.peers[p] = Peer(p, sock)

    def _connect(self, p: int, call: Call) -> None:
        rec, last = self._records[p], "nothing yet"
        while True:
            left = call.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{call.where()}: waited {call.timeout:g} s for process {p} and got nothing (could not connect "
                    f"to its host-level port {rec['host']}:{rec['port']}: {last}). Check that process {p} is alive "
                    f"and reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S."
                )
            try:
                sock = socket.create_connection((rec["host"], rec["port"]), timeout=left)
            except OSError as e:  # refused while the peer is starting: retry
                last = f"{type(e).__name__}: {e}"
                time.sleep(min(_RETRY_S, max(0.0, call.deadline - time.monotonic())))
                continue
            try:
                HANDSHAKE.client(
                    sock,
                    self._secret,
                    call.deadline,
                    me=self.me,
                    server=p,
                    where=f"process {p}'s port",
                    hint="Its secret differs: is this process part of the same job, with the same coordinator?",
                )
                self._add(p, sock)
                return
            except (OSError, Refused) as e:
                sock.close()
                if isinstance(e, PermissionError):
                    raise
                last = f"{type(e).__name__}: {e}"
                time.sleep(min(_RETRY_S, max(0.0, call.deadline - time.monotonic())))
            except BaseException:  # Ctrl-C included: no half-open connection left behind
                sock.close()
                raise

    def _accept(self, call: Call) -> None:
        if self._acceptor is None:
            self._acceptor = Acceptor(
                self._listener,
                HANDSHAKE,
                self._secret,
                me=self.me,
                accept=lambda c: self.me < c < self.n_proc and c not in self.peers,
                on_refused=self._note_refused,
            )
        while True:
            missing = [p for p in range(self.me + 1, self.n_proc) if p not in self.peers]
            if not missing:
                return
            try:
                sock, p = self._acceptor.next(call.deadline)
            except TimeoutError:
                why = f"; refused {self._n_refused} connection(s), last: {self._refused[-1]}" if self._refused else ""
                raise TimeoutError(
                    f"{call.where()}: waited {call.timeout:g} s for process {missing[0]} and got nothing (it did not "
                    f"connect to this process's host-level port{why}). Check that process {missing[0]} is alive and "
                    f"reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S."
                ) from None
            try:
                self._add(p, sock)
            except BaseException:
                sock.close()
                raise

    def _note_refused(self, why: str) -> None:
        self._refused.append(f"Refused: {why[:200]}")
        self._n_refused += 1

    def close(self) -> None:
        """Close the listener and every connection (later calls that need one raise ``ConnectionError``)."""
        self._close_listener()
        for peer in self.peers.values():
            peer.close("closed by this process")
