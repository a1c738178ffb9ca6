"""What the two device-to-device pipes share: metadata as JSON, and the KV pieces split by heads.

A KV layer travels as one single-device piece per DISTINCT head group of the receiver: piece
``g`` holds the heads of the receiver's ranks in group ``g`` (their ranks hold the same heads
when ``tp > kv_heads``), is cut on the sender's device that holds most of it (by
:func:`kv_transfer_plan`), lands on the group's first receiver device, and is copied locally to
the group's other (replica) devices. Both sides compute the same plan from the two TP sizes, so
only the layer's dtype and shape need to travel.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from spmd.kv_transfer import heads as _heads


def meta_bytes(meta: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)


def meta_from(raw: Any, fn: str) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(np.asarray(raw, np.uint8)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{fn}: malformed metadata from the peer: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{fn}: malformed metadata from the peer: {meta!r:.100}")
    return meta


def groups(num_heads: int, dst_tp: int) -> list[tuple[int, int, list[int]]]:
    """``(head_start, head_stop, dst ranks)`` per distinct head group of the receiver."""
    out: dict[tuple[int, int], list[int]] = {}
    for r, rng in enumerate(_heads.kv_head_ranges(num_heads, dst_tp)):
        out.setdefault(rng, []).append(r)
    return [(a, b, ranks) for (a, b), ranks in out.items()]


def source_rank(num_heads: int, src_tp: int, dst_tp: int, dst_rank: int) -> int:
    """The sender rank that holds the first piece of ``dst_rank``'s shard (0 when src_tp does not fit)."""
    try:
        return _heads.kv_transfer_plan(num_heads, src_tp, dst_tp)[dst_rank][0].src_rank
    except ValueError:
        return 0


def piece_shape(shape: tuple[int, ...], head_axis: int, a: int, b: int) -> tuple[int, ...]:
    return (*shape[:head_axis], b - a, *shape[head_axis + 1 :])


def sender_pieces(layer: Any, head_axis: int, src_devices: list[Any], dst_tp: int) -> list[Any]:
    """One single-device ``jax.Array`` per receiver head group, on the sender device holding it."""
    import jax

    num_heads = int(np.shape(layer)[head_axis])
    out = []
    for a, b, ranks in groups(num_heads, dst_tp):
        dev = src_devices[source_rank(num_heads, len(src_devices), dst_tp, ranks[0])]
        index = (slice(None),) * head_axis + (slice(a, b),)
        out.append(jax.device_put(layer[index], dev))
    return out


def assemble(pieces: list[Any], sharding: Any, devices: list[Any], shape: tuple[int, ...], head_axis: int) -> Any:
    """The receiver's layer, sharded by heads, from the pieces (one per head group, on the group's first device)."""
    import jax

    num_heads = shape[head_axis]
    by_rank: dict[int, Any] = {}
    for piece, (_, _, ranks) in zip(pieces, groups(num_heads, len(devices)), strict=True):
        by_rank[ranks[0]] = piece
        for r in ranks[1:]:
            by_rank[r] = jax.device_put(piece, devices[r])
    # In the mesh's device order (rank order): the order make_array_from_single_device_arrays expects.
    return jax.make_array_from_single_device_arrays(shape, sharding, [by_rank[r] for r in range(len(devices))])
