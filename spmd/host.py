"""Host-level communication between the processes of a multi-controller job.

vLLM's ``broadcast_tensor_dict`` / ``broadcast_object`` / ``all_gather_object`` / ``barrier``
run on CPU process groups. Here every process numbers its host-level calls the same way
(:class:`_CallCounter`) and each call travels on one of two transports:

* **direct TCP connections** between the processes (:mod:`spmd.host_net`), set up on the first
  call through the ``jax.distributed`` coordination service and authenticated with a per-job
  secret: used when every process runs on one machine (over loopback) or every process was given
  ``SPMD_HOST_ADDRESS``;
* otherwise the **key-value store** of the coordination service, with large array payloads in
  device collectives (the protocol below).

``SPMD_HOST_TRANSPORT`` (``auto``, the default; ``tcp``; ``store``) chooses; it must be the same on
every process (:mod:`spmd.envs` reads it, and ``SPMD_HOST_ADDRESS``). No pickle either way: the
wire format is JSON with tagged containers, validated on receipt (docs/host_messages.md has both
protocols and the measurements). A process makes its host-level calls from one thread at a time:
they are numbered in the order it makes them (over TCP, a second thread's call raises
``RuntimeError``).

**Values.** What may travel, and how it is encoded (tagged JSON plus packed array bytes, no
pickle), is :mod:`spmd.wire`: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``,
containers of them, numpy/JAX arrays and numpy scalars. Anything else raises on the sender before
anything is sent, and the receivers get a ``RuntimeError`` that says what failed.

**The store's protocol** (records, the device phase, clean-up) is :mod:`spmd.host_store`'s.

On either transport, sizes announced by a peer are checked against ``SPMD_HOST_MAX_BYTES`` (and
against the bytes that arrive) before anything is allocated; every malformed message raises
:class:`MalformedMessageError` (a ``ValueError``); every wait shares the call's one deadline
(``SPMD_COLLECTIVE_TIMEOUT_S``); a mismatch between the processes' calls raises ``RuntimeError``
on both sides. Over TCP, a peer that closes its connection mid-call (it exited or crashed)
raises ``ConnectionError`` at once.

``src`` here is a process index. The group-level forms (``GroupCoordinator.broadcast_tensor_dict``
and ``spmd.broadcast_tensor_dict``) take a rank in the group and map it to its process
(:mod:`spmd.tensor_dict`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from spmd import compat, host_store
from spmd.distributed import job_host_address
from spmd.envs import SpmdEnv, host_env
from spmd.host_store import CHUNK_BYTES, INLINE_MAX_BYTES
from spmd.wire import ALLOWED_DTYPES, MAX_DEPTH, MalformedMessageError, decode, encode, layout, specs_of

if TYPE_CHECKING:  # loaded on first use (connections, threads), so `import spmd` stays light
    from spmd import host_net

__all__ = [
    "ALLOWED_DTYPES",
    "CHUNK_BYTES",
    "INLINE_MAX_BYTES",
    "MAX_DEPTH",
    "MalformedMessageError",
    "all_gather_object",
    "barrier",
    "broadcast_from",
    "broadcast_object",
    "broadcast_tensor_dict_across_processes",
    "decode",
    "encode",
]

# Transport --------------------------------------------------------------------------------------


class _CallCounter:
    """Numbers this process's host-level calls; every process counts the same sequence."""

    def __init__(self) -> None:
        self._n = 0

    def next(self) -> int:
        self._n += 1
        return self._n


_CALLS = _CallCounter()


def _client():
    return compat.distributed_client()


_env = host_env  # (every call reads the settings)


def _timeout_s(timeout_s: float | None, env: SpmdEnv | None = None) -> float:
    if timeout_s is None:
        return (env or _env()).collective_timeout_s
    t = float(timeout_s)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds.")
    return t


class _Peers:
    """This process's direct connections (:class:`spmd.host_net.PeerConnections`), one per coordination client."""

    def __init__(self) -> None:
        self.connections: host_net.PeerConnections | None = None

    def get(self, client: Any, me: int, n_proc: int, env: SpmdEnv) -> host_net.PeerConnections | None:
        """The connections to use (set up, or finishing set-up within the caller's call), or ``None``: use the store."""
        if env.host_transport == "store":
            return None
        from spmd import host_net

        m = self.connections
        if m is None or m.client is not client or (m.me, m.n_proc) != (me, n_proc):
            if m is not None:
                m.close()
            address = job_host_address(env.host_address)  # None: one host, loopback
            config = host_net.NetConfig(env.host_transport, address and address.advertise, address and address.bind)
            m = self.connections = host_net.PeerConnections(client, me, n_proc, config)
        return m


_PEERS = _Peers()


class _Call:
    """One host-level call: its number, its settings and its one deadline; which transport carries it."""

    def __init__(self, op: str, sources: tuple[int, ...], timeout_s: float | None) -> None:
        self.env = _env()
        self.op, self.sources = op, tuple(sources)
        self.timeout = _timeout_s(timeout_s, self.env)
        self.deadline = time.monotonic() + self.timeout
        self.me, self.n_proc = jax.process_index(), jax.process_count()
        self.n = _CALLS.next()
        self.client = _client()

    def direct(self) -> tuple[host_net.PeerConnections, host_net.Call] | None:
        """The direct connections and this call's frame identity, or ``None`` to use the key-value store.

        Sets the connections up on the first call (within this call's deadline).
        """
        peers = _PEERS.get(self.client, self.me, self.n_proc, self.env)
        if peers is None:
            return None
        from spmd import host_net

        net_call = host_net.Call(self.n, self.op, self.sources, self.timeout, self.deadline, self.env.host_max_bytes)
        return (peers, net_call) if peers.ready(net_call) else None

    def on_store(self) -> host_store.StoreCall:
        """This call on the coordination service's key-value store."""
        return host_store.StoreCall(
            self.n, self.op, self.sources, self.timeout, self.deadline, self.client, self.env.host_max_bytes
        )


def broadcast_from(
    value: Any,
    source: int,
    *,
    sources: tuple[int, ...] | None = None,
    op: str,
    timeout_s: float | None = None,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """Every process gets process ``source``'s ``value``; ``sources`` are every sender of this call.

    The building block of the host-level broadcasts: each process names its own source, and
    ``sources`` (the same on every process; default ``(source,)``) lists every process that sends
    in this call, for groups whose senders differ. Senders return their own ``value``.

    Raises:
      TypeError: on a sender, a value that cannot travel (or that ``check`` refuses).
      ValueError: on a sender, containers nested deeper than :data:`MAX_DEPTH` or more array bytes
        than ``SPMD_HOST_MAX_BYTES``; ``source`` not among ``sources``.
      RuntimeError: on every other process, when a sender could not send (the message says why);
        on every process, when the processes made different calls (op, ``src``, or a skipped call).
      TimeoutError: a process did not reach the call within the timeout (on every side).
      ConnectionError: (direct connections) a process this call needs closed its connection: it
        exited or crashed (raised at once, saying how much of its message was missing).
      MalformedMessageError: (a ``ValueError``) a message (a frame, or a record read from the
        store) is malformed, or announces more than ``SPMD_HOST_MAX_BYTES``.
    """
    sources = (source,) if sources is None else tuple(sorted(set(sources)))
    n_proc = jax.process_count()
    if not all(isinstance(s, (int, np.integer)) and 0 <= s < n_proc for s in sources) or source not in sources:
        raise ValueError(
            f"{op}: source={source!r} and sources={sources!r}: expected process indices in [0, {n_proc}) "
            f"with source among sources."
        )
    sources = tuple(int(s) for s in sources)
    if n_proc == 1:
        env = _env()
        _timeout_s(timeout_s, env)
        if check is not None:
            check(value)
        _, arrays = encode(value)  # the same validation as in a multi-process job
        layout(specs_of(arrays), env.host_max_bytes, what=f"{op}: this value")
        return value

    call = _Call(op, sources, timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].broadcast(direct[1], value, source, check)
    return host_store.broadcast(call.on_store(), value, source, check)


def _check_src(op: str, src: Any) -> int:
    n = jax.process_count()
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < n:
        raise ValueError(f"{op}: src={src!r} is out of range for {n} processes; expected 0 <= src < {n}.")
    return int(src)


def broadcast_tensor_dict_across_processes(
    tensor_dict: dict[Any, Any] | None, src: int = 0, *, timeout_s: float | None = None
) -> dict[Any, Any]:
    """Every process gets process ``src``'s dict (the others pass ``None``).

    Over the direct connections, or through the coordination service's key-value store (array
    payloads over :data:`INLINE_MAX_BYTES` then in device collectives): see the module docstring.
    Arrays come back as the kind they were sent as (numpy or JAX).

    Raises:
      TypeError: on ``src``, a value that cannot travel (named by its key), or no dict at all,
        before anything is sent.
      RuntimeError: on the other processes, when ``src`` could not send; anywhere, when the
        processes made different calls.
      TimeoutError: a process did not reach the call within the timeout.
      ConnectionError: a process this call needs exited or crashed (direct connections).
      ValueError: ``src`` out of range.
    """

    def must_be_dict(v: Any) -> None:
        if not isinstance(v, dict) and not (v is None and jax.process_count() == 1):  # vLLM: no-op alone
            raise TypeError(f"broadcast_tensor_dict: process src={src} must pass a dict, got {type(v).__name__}.")

    return broadcast_from(
        tensor_dict,
        _check_src("broadcast_tensor_dict", src),
        op="broadcast_tensor_dict",
        timeout_s=timeout_s,
        check=must_be_dict,
    )


def broadcast_object(obj: Any, src: int = 0, *, timeout_s: float | None = None) -> Any:
    """Every process gets process ``src``'s ``obj`` (the same safe values as ``broadcast_tensor_dict``)."""
    return broadcast_from(obj, _check_src("broadcast_object", src), op="broadcast_object", timeout_s=timeout_s)


def all_gather_object(obj: Any, *, timeout_s: float | None = None) -> list[Any]:
    """Every process gets the list of every process's ``obj``, in process order.

    Every process sends its value straight to every other one (direct connections), or inside
    its key-value record (the store: meant for small objects).

    Raises:
      TypeError: ``obj`` holds a value that cannot travel (the others get a ``RuntimeError``).
      RuntimeError: another process could not send, or made a different call.
      TimeoutError: a process did not contribute within the timeout.
      ConnectionError: another process exited or crashed (direct connections).
    """
    op = "all_gather_object"
    n_proc = jax.process_count()
    if n_proc == 1:
        _timeout_s(timeout_s)
        encode(obj)
        return [obj]
    call = _Call(op, tuple(range(n_proc)), timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].all_gather(direct[1], obj)
    return host_store.all_gather(call.on_store(), obj)


def barrier(*, timeout_s: float | None = None) -> None:
    """Wait for this process's queued device work, then for every process to arrive.

    Raises:
      TimeoutError: some process did not arrive within the timeout.
      RuntimeError: some process made another host-level call at this point.
      ConnectionError: some process exited or crashed (direct connections).
    """
    jax.effects_barrier()
    jax.block_until_ready(jax.live_arrays())
    n_proc = jax.process_count()
    if n_proc == 1:
        _timeout_s(timeout_s)
        return
    call = _Call("barrier", tuple(range(n_proc)), timeout_s)
    if (direct := call.direct()) is not None:
        return direct[0].barrier(direct[1])
    host_store.barrier(call.on_store())
