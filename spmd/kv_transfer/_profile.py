"""Where a KV pipe's time goes, per message and phase (``IpcKVPipe(profile=True)``; ``spmd.bench.kv_ipc --profile``)."""

from __future__ import annotations

import time

__all__ = ["Phases"]


class Phases:
    """Host time per named phase of a pipe's messages, summed over messages (off: every call is a no-op).

    A phase is the time from the previous mark (or :meth:`start`) to :meth:`mark`; on the GPU a
    phase that only queues work (a dispatch, an asynchronous copy) is short and the wait for that
    work shows up in the phase that synchronises (the release on the sender, the copy on the receiver).
    """

    def __init__(self, *, enabled: bool = False) -> None:
        self.enabled = enabled
        self.reset()

    def reset(self) -> None:
        """Forget what was timed so far."""
        self.totals: dict[str, int] = {}
        self.messages = 0
        self._t = 0

    def start(self) -> None:
        """A message begins (the public call was entered)."""
        if self.enabled:
            self._t = time.perf_counter_ns()

    def mark(self, name: str, *, message: bool = False) -> None:
        """The phase ``name`` ends now; ``message``: the message is done."""
        if not self.enabled:
            return
        now = time.perf_counter_ns()
        self.totals[name] = self.totals.get(name, 0) + now - self._t
        self._t = now
        self.messages += message

    def per_message_us(self) -> dict[str, float]:
        """Microseconds per message for each phase, in the order the phases were first seen."""
        n = max(self.messages, 1)
        return {name: ns / n / 1e3 for name, ns in self.totals.items()}
