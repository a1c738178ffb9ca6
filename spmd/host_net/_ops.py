"""Which frames each host-level op sends and waits for, over an :class:`~spmd.host_net._exchange.Exchange`.

A broadcast (senders ``S``; each process names its own source in ``S``):

* a process in ``S`` first encodes its value (a failure becomes an ``ERROR`` frame to every other
  process, which raises ``RuntimeError`` naming it);
* process ``p`` sends an ``INTENT`` to ``q`` whenever ``p`` or ``q`` is in ``S``, and waits for
  the same from every such ``q``: so a sender knows that every process reached the same call
  (same sequence number, op and senders) before it returns, and two processes that both think
  they send, or name different sources, see it at once;
* a sender sends its ``MSG`` to each process whose intent names it, so a payload flows only once
  its receiver is known to be in the same call (and within the receiver's ``SPMD_HOST_MAX_BYTES``,
  which its intent carries); it returns when the payload is with the kernel. The one exception,
  for latency: the only sender of at most :data:`~spmd.host_net._frame.EAGER_MAX_BYTES` of arrays
  (and as much JSON tree at most) sends its ``MSG`` at once, in place of its intent; a receiver then reads
  whatever already follows it, so a sender that gave up on the call (an ``ABORT`` waiting there)
  is still reported;
* a process whose source is another process waits for that source's ``MSG`` after its intent.

``barrier``: everyone is in ``S`` (an ``INTENT`` each way between every pair).
``all_gather_object``: everyone sends its ``MSG`` straight to everyone (no intents).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spmd.host_net._exchange import Exchange
from spmd.host_net._frame import ABORT, EAGER_MAX_BYTES, ERROR, INTENT, MSG, Frame, payload_parts
from spmd.wire import MalformedMessageError, decode, encode, layout, specs_of


def _encode(ex: Exchange, value: Any) -> tuple[bytes, list[memoryview], int]:
    """``(MSG header, payload parts, payload bytes)`` of this process's value, checked against its limit.

    Raises:
      TypeError: a value that cannot travel.
      ValueError: more than ``SPMD_HOST_MAX_BYTES`` (arrays, or the JSON tree), or nested too deep.
    """
    call = ex.call
    tree, arrays = encode(value)
    specs = specs_of(arrays)
    try:
        offsets, total = layout(specs, call.max_bytes, what=f"{call.op}: this value")
    except MalformedMessageError as e:
        raise ValueError(str(e)) from None
    head = ex.header(tree=tree)
    if len(head) > call.max_bytes:
        raise ValueError(
            f"{call.op}: this value's JSON tree is {len(head)} bytes, over the limit "
            f"SPMD_HOST_MAX_BYTES={call.max_bytes} (bytes and str values travel in it)."
        )
    return head, payload_parts(arrays, offsets), total


def broadcast(ex: Exchange, value: Any, source: int, check: Callable[[Any], None] | None) -> Any:
    """Process ``source``'s ``value`` (see :func:`spmd.host.broadcast_from`)."""
    call, me, senders = ex.call, ex.me, ex.call.sources
    try:
        if me in senders:
            try:
                if check is not None:
                    check(value)
                head, parts, total = _encode(ex, value)
            except Exception as e:  # every failure reaches the receivers, named
                ex.notify(ERROR, e)
                raise
        # The only sender of a small value sends it at once; else intents first, payloads to who asked.
        eager = senders == (me,) and total <= EAGER_MAX_BYTES and len(head) <= EAGER_MAX_BYTES
        intent = ex.header(source=source, max_bytes=call.max_bytes)
        for q in range(ex.n_proc):
            if q != me and (me in senders or q in senders):
                if eager:
                    ex.send(q, MSG, head, parts, total)
                else:
                    ex.send(q, INTENT, intent)
                ex.expect(q, *((INTENT, MSG) if q == source else (INTENT,)))

        def on_intent(q: int, frame: Frame) -> None:
            if frame.kind != INTENT or frame.header["source"] != me:
                return
            cap = frame.header["max_bytes"]
            if total > cap or len(head) > cap:
                what = f"{total} bytes of arrays" if total > cap else f"a {len(head)}-byte JSON tree"
                raise ValueError(
                    f"{call.op}: this value has {what}; process {q} accepts at most {cap} (its "
                    f"SPMD_HOST_MAX_BYTES). Use the same limit everywhere."
                )
            if not eager:
                ex.send(q, MSG, head, parts, total)

        ex.run(on_intent if me in senders else None)
        if source == me:
            return value
        return decode(*ex.message(source))
    except BaseException as e:
        ex.notify(ABORT, e)
        raise


def all_gather(ex: Exchange, value: Any) -> list[Any]:
    """Every process's ``value``, in process order (see :func:`spmd.host.all_gather_object`)."""
    me = ex.me
    try:
        try:
            head, parts, total = _encode(ex, value)
        except Exception as e:
            ex.notify(ERROR, e)
            raise
        for q in range(ex.n_proc):
            if q != me:
                ex.send(q, MSG, head, parts, total)
                ex.expect(q, MSG)
        ex.run()
        return [value if q == me else decode(*ex.message(q)) for q in range(ex.n_proc)]
    except BaseException as e:
        ex.notify(ABORT, e)
        raise


def barrier(ex: Exchange) -> None:
    """Return once every process reached this call."""
    try:
        intent = ex.header(source=ex.me, max_bytes=ex.call.max_bytes)
        for q in range(ex.n_proc):
            if q != ex.me:
                ex.send(q, INTENT, intent)
                ex.expect(q, INTENT)
        ex.run()
    except BaseException as e:
        ex.notify(ABORT, e)
        raise
