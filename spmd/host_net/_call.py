"""One host-level call as every process numbers it, and how error messages name calls."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Call:
    """One host-level call: the frames' sequence number, op and senders, its one deadline and size limit.

    Attributes:
      seq: the call's number (:mod:`spmd.host` counts every process's calls the same way).
      op: ``broadcast_object``, ``barrier``, ... (every frame names it).
      sources: every sender of the call (process indices, sorted).
      timeout: seconds the call may wait in all (for messages); deadline: ``time.monotonic()`` when it ends.
      max_bytes: this process's ``SPMD_HOST_MAX_BYTES``.
    """

    seq: int
    op: str
    sources: tuple[int, ...]
    timeout: float
    deadline: float
    max_bytes: int

    def where(self) -> str:
        return f"{self.op}: host-level call #{self.seq}"


def describe(op: str, sources: list[int] | tuple[int, ...]) -> str:
    """``broadcast_object from process 0``; ``barrier`` (every process sends)."""
    if op in ("barrier", "all_gather_object"):
        return op
    names = ", ".join(f"process {s}" for s in sources[:8])
    more = f" and {len(sources) - 8} more" if len(sources) > 8 else ""  # (a peer's header could list millions)
    return f"{op} from {names}{more}"


def mismatch(where: str, me: int, op: str, sources: Any, p: int, their_op: str, their_sources: Any) -> RuntimeError:
    return RuntimeError(
        f"{where}: the processes made different calls: this process ({me}) called {describe(op, sources)}, "
        f"process {p} called {describe(their_op, their_sources)}. Every process must make the same host-level "
        f"calls, with the same src, in the same order (a process that skipped a call or passed another src shows "
        f"up here)."
    )
