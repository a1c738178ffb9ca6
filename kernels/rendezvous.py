"""Rendezvous through a coordination service's key-value store: publish a record, wait for the others'.

Every exchange of small records between the processes of a job goes this way (the host-level
calls' store transport and the set-up of their direct connections in :mod:`spmd`, the peer
buffers' handles in :mod:`kernels.symmetric_memory`): each process publishes its record under a
key of its own, then waits for the records it needs, every wait within ONE absolute deadline
(``time.monotonic()``) for the whole exchange, not one timeout per wait. A process that fails
publishes an *error record* where its record would go, so the others raise at once, quoting it,
instead of waiting out the deadline.

The store is the client passed in: JAX's coordination-service client, or anything with its two
calls ``key_value_set_bytes(key, value, allow_overwrite=False)`` and
``blocking_key_value_get_bytes(key, timeout_in_ms)``. So this module imports nothing: ``kernels``
stays a leaf.

Publishing never overwrites unless asked: a key that is already there was written by someone
else (a stranger, another job on the same coordinator, a leftover of an earlier one), and
:class:`KeyTaken` names it.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["ERROR_MAGIC", "KeyTaken", "PeerFailed", "Rendezvous", "error_record", "publish"]

ERROR_MAGIC = b"\x00spmd-error-record\x00"
"""How an error record starts: never the start of a JSON record, nor of :mod:`spmd.host`'s binary ones."""


class KeyTaken(RuntimeError):
    """A key this process must write is already in the store (written by someone else)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class PeerFailed(RuntimeError):
    """Another process published an error record where its record would be."""


def error_record(error: BaseException | str, *, note: str = "failed") -> bytes:
    """The bytes of an error record: what failed (``"TypeError: ..."``) and what that meant (``note``)."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return ERROR_MAGIC + json.dumps({"note": note, "error": text[:2000]}).encode()


def _error_of(raw: bytes) -> tuple[str, str] | None:
    """``(note, error)`` of an error record; ``None`` for any other record."""
    if not raw.startswith(ERROR_MAGIC):
        return None
    try:
        body = json.loads(raw[len(ERROR_MAGIC) :])
        return str(body["note"])[:200], str(body["error"])[:2000]
    except (ValueError, TypeError, KeyError):
        return "wrote a malformed error record", repr(raw[:200])


def publish(client: Any, key: str, value: bytes, *, where: str, overwrite: bool = False) -> None:
    """Write ``value`` under ``key``.

    Raises:
      KeyTaken: ``key`` is already there and ``overwrite`` is off.
      Exception: what the client raises otherwise (the service is gone, ...).
    """
    try:
        client.key_value_set_bytes(key, bytes(value), allow_overwrite=overwrite)
    except Exception as e:
        if "ALREADY_EXISTS" not in str(e):
            raise
        raise KeyTaken(
            f"{where}: the key {key!r} is already in the coordination service's key-value store, written by "
            f"someone else (a leftover of an earlier job on this coordinator, another job sharing it, or a "
            f"stranger); refusing to go on with records this process did not write. Give every job its own "
            f"coordinator (a fresh port), and keep its port away from other users (docs/multi_host.md).",
            key,
        ) from None


class Rendezvous:
    """One exchange of records through ``client``'s store, within one deadline.

    Args:
      client: the store (see the module docstring).
      timeout_s: the exchange's time budget, named in errors.
      where: what the exchange is, the start of every error message (``"barrier: host-level call #3"``).
      deadline: ``time.monotonic()`` when the exchange ends (default: now + ``timeout_s``).
    """

    def __init__(self, client: Any, timeout_s: float, where: str, *, deadline: float | None = None) -> None:
        self.client, self.timeout_s, self.where = client, float(timeout_s), where
        self.deadline = time.monotonic() + self.timeout_s if deadline is None else float(deadline)

    def publish(self, key: str, value: bytes, *, overwrite: bool = False) -> None:
        """Write this process's record (see :func:`publish`)."""
        publish(self.client, key, value, where=self.where, overwrite=overwrite)

    def publish_error(self, key: str, error: BaseException | str, *, note: str, overwrite: bool = False) -> None:
        """Write an error record under ``key``: readers raise :class:`PeerFailed` with ``note`` and ``error``."""
        publish(self.client, key, error_record(error, note=note), where=self.where, overwrite=overwrite)

    def read(self, key: str, *, who: str, what: str = "its record", hint: str = "") -> bytes:
        """The record under ``key``, waiting for it until the deadline.

        Args:
          key: the record's key.
          who: whose record (``"process 2"``), for errors.
          what: what the record is, for errors.
          hint: what to check when nothing came (appended to the timeout's message).

        Raises:
          TimeoutError: nothing under ``key`` by the deadline (or the store failed while waiting).
          PeerFailed: ``who`` published an error record.
        """
        left_ms = max(1, int((self.deadline - time.monotonic()) * 1000))
        try:
            raw = self.client.blocking_key_value_get_bytes(key, left_ms)
        except Exception as e:  # the runtime raises its own error type on deadline
            raise TimeoutError(
                f"{self.where}: waited {self.timeout_s:g} s for {who} and got nothing ({what}, key {key!r}, never "
                f"appeared in the key-value store; {type(e).__name__}: {str(e)[:120]}).{' ' + hint if hint else ''}"
            ) from e
        raw = bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        if isinstance(raw, bytes) and (failed := _error_of(raw)) is not None:
            raise PeerFailed(f"{self.where}: {who} {failed[0]}: {failed[1]}")
        return raw
