"""Split a KV cache by KV heads for any tensor-parallel size: pure functions, no communication.

vLLM shards attention by heads: with ``tp <= num_kv_heads`` (``num_kv_heads % tp == 0``) rank
``r`` holds KV heads ``[r * h / tp, (r + 1) * h / tp)``; with ``tp > num_kv_heads``
(``tp % num_kv_heads == 0``) each head is replicated ``tp / h`` times and rank ``r`` holds head
``r // (tp / h)``. A prefill worker with TP ``p`` and a decode worker with TP ``d`` therefore hold
different slices; :func:`kv_transfer_plan` says, for each decode rank, which slices of which
prefill ranks make its shard (what vLLM's NIXL connector does by head splitting), and
:func:`reshard_kv_heads` applies that plan to arrays.

Every function takes the head axis as ``head_axis`` (0 for ``[kv_heads, tokens, head_dim]``,
2 for the seed's ``[batch, seq_len, num_heads, head_dim]``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "KVPiece",
    "kv_head_ranges",
    "kv_head_sharding",
    "kv_transfer_plan",
    "merge_kv_heads",
    "reshard_kv_heads",
    "split_kv_heads",
]


def _check(num_kv_heads: int, tp: int, what: str = "tp") -> None:
    for name, v in (("num_kv_heads", num_kv_heads), (what, tp)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if tp <= num_kv_heads and num_kv_heads % tp:
        raise ValueError(
            f"{what}={tp} does not divide num_kv_heads={num_kv_heads}; expected a divisor of "
            f"{num_kv_heads} (or a multiple of it, which replicates heads)."
        )
    if tp > num_kv_heads and tp % num_kv_heads:
        raise ValueError(
            f"{what}={tp} is larger than num_kv_heads={num_kv_heads} but not a multiple of it; expected "
            f"a multiple of {num_kv_heads} (each head replicated {what} / num_kv_heads times) or a divisor."
        )


def kv_head_ranges(num_kv_heads: int, tp: int) -> list[tuple[int, int]]:
    """The KV heads ``[start, stop)`` each TP rank holds, in rank order.

    Raises:
      ValueError: ``tp`` neither divides ``num_kv_heads`` nor is a multiple of it.
    """
    _check(num_kv_heads, tp)
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return [(r * per, (r + 1) * per) for r in range(tp)]
    replicas = tp // num_kv_heads
    return [(r // replicas, r // replicas + 1) for r in range(tp)]


@dataclasses.dataclass(frozen=True)
class KVPiece:
    """Local heads ``[src_start, src_stop)`` of source rank ``src_rank`` go to ``[dst_start, dst_stop)``
    of the destination rank's shard."""

    src_rank: int
    src_start: int
    src_stop: int
    dst_start: int
    dst_stop: int


def kv_transfer_plan(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[list[KVPiece]]:
    """For each destination rank, the pieces of source shards that make its shard, in head order.

    Each destination head is taken from one source rank holding it; when the source replicates
    heads, destination ranks spread over the replicas (so no source rank serves them all).

    Raises:
      ValueError: either TP size does not fit ``num_kv_heads`` (see :func:`kv_head_ranges`).
    """
    _check(num_kv_heads, src_tp, "src_tp")
    _check(num_kv_heads, dst_tp, "dst_tp")
    src = kv_head_ranges(num_kv_heads, src_tp)
    holders: dict[int, list[int]] = {}
    for r, (a, b) in enumerate(src):
        for h in range(a, b):
            holders.setdefault(h, []).append(r)
    plan = []
    for d, (a, b) in enumerate(kv_head_ranges(num_kv_heads, dst_tp)):
        pieces: list[KVPiece] = []
        for h in range(a, b):
            ranks = holders[h]
            r = ranks[d % len(ranks)]
            s = h - src[r][0]
            last = pieces[-1] if pieces else None
            if last is not None and last.src_rank == r and last.src_stop == s:  # extend a contiguous run
                pieces[-1] = dataclasses.replace(last, src_stop=s + 1, dst_stop=last.dst_stop + 1)
            else:
                pieces.append(KVPiece(r, s, s + 1, h - a, h - a + 1))
        plan.append(pieces)
    return plan


def _take(x: Any, start: int, stop: int, head_axis: int) -> Any:
    index = (slice(None),) * head_axis + (slice(start, stop),)
    return x[index]


def _concat(parts: list[Any], head_axis: int) -> Any:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts, axis=head_axis)
    import jax.numpy as jnp

    return jnp.concatenate(parts, axis=head_axis)


def _heads_of(x: Any, head_axis: int, fn: str) -> int:
    shape = np.shape(x)
    if isinstance(head_axis, bool) or not isinstance(head_axis, int) or not 0 <= head_axis < len(shape):
        raise ValueError(f"{fn}: head_axis={head_axis!r} is out of range for an array of shape {list(shape)}.")
    return int(shape[head_axis])


def split_kv_heads(x: Any, tp: int, *, head_axis: int = 0) -> list[Any]:
    """Split one layer holding every KV head into the ``tp`` per-rank shards (slices, no copy for numpy).

    Args:
      x: ``[..., kv_heads (at head_axis), ...]``, numpy or JAX.
      tp: the TP size to split for.

    Returns:
      ``tp`` arrays; rank ``r``'s holds heads ``kv_head_ranges(kv_heads, tp)[r]``.

    Raises:
      ValueError: a bad ``head_axis`` or a ``tp`` that does not fit the heads.
    """
    heads = _heads_of(x, head_axis, "split_kv_heads")
    return [_take(x, a, b, head_axis) for a, b in kv_head_ranges(heads, tp)]


def merge_kv_heads(shards: Sequence[Any], num_kv_heads: int, *, head_axis: int = 0) -> Any:
    """The inverse of :func:`split_kv_heads`: one array with every head (replicas taken once).

    Raises:
      ValueError: the number of shards, or a shard's head count, does not fit ``num_kv_heads``.
    """
    tp = len(shards)
    ranges = kv_head_ranges(num_kv_heads, tp)
    for r, (s, (a, b)) in enumerate(zip(shards, ranges, strict=True)):
        if _heads_of(s, head_axis, "merge_kv_heads") != b - a:
            raise ValueError(
                f"merge_kv_heads: shard {r} has {np.shape(s)[head_axis]} heads on axis {head_axis}; "
                f"expected {b - a} for {num_kv_heads} KV heads over tp={tp}."
            )
    first: dict[int, Any] = {}
    for s, (a, _) in zip(shards, ranges, strict=True):
        first.setdefault(a, s)
    return _concat([first[a] for a in sorted(first)], head_axis)


def reshard_kv_heads(shards: Sequence[Any], dst_tp: int, *, num_kv_heads: int, head_axis: int = 0) -> list[Any]:
    """Per-rank shards for TP ``len(shards)`` -> per-rank shards for TP ``dst_tp``, by :func:`kv_transfer_plan`.

    Never builds the full array: each destination shard is the concatenation of its pieces.

    Raises:
      ValueError: a TP size that does not fit the heads.
    """
    plan = kv_transfer_plan(num_kv_heads, len(shards), dst_tp)
    return [
        _concat([_take(shards[p.src_rank], p.src_start, p.src_stop, head_axis) for p in pieces], head_axis)
        for pieces in plan
    ]


def kv_head_sharding(devices: Sequence[Any], num_kv_heads: int, *, head_axis: int = 0) -> Any:
    """The ``NamedSharding`` that puts TP rank ``r`` (``devices[r]``) on its KV heads.

    A 2-D mesh ``(kv_heads groups, replicas)`` with the heads axis split over the first mesh axis:
    with ``tp > num_kv_heads`` each group of ``tp / num_kv_heads`` consecutive devices holds one
    head, as in vLLM.

    Raises:
      ValueError: a TP size (``len(devices)``) that does not fit the heads.
    """
    return _kv_head_sharding(tuple(devices), num_kv_heads, head_axis)


@functools.lru_cache(maxsize=64)
def _kv_head_sharding(devices: tuple[Any, ...], num_kv_heads: int, head_axis: int) -> Any:
    """:func:`kv_head_sharding`, made once per arguments (a pipe asks for it with every cache)."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devs = np.asarray(list(devices), dtype=object)
    tp = devs.size
    kv_head_ranges(num_kv_heads, tp)  # validates
    groups = min(tp, num_kv_heads)
    mesh = Mesh(devs.reshape(groups, tp // groups), ("kv_heads", "kv_replicas"))
    return NamedSharding(mesh, P(*([None] * head_axis), "kv_heads"))
