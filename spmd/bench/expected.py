"""What every collective of the sweep must produce, from each rank's short pattern (the ``#wrong`` column).

Rank ``r``'s input is its pattern ``p_r`` (``P`` small integers in [-8, 8), so every sum is exact in
bfloat16 and float32) repeated: ``x_r[i] = p_r[i % P]``, with ``P`` prime (or the whole buffer when
that is shorter), so a block moved by any power-of-two offset or taken from the wrong rank shows up.
From the ``n`` patterns of a group, :func:`expected` computes rank ``k``'s output at positions ``j``
with index arithmetic only (``//``, ``%``, indexing, ``sum(0)``), so the same code runs on numpy,
on ``jax.numpy`` inside a per-device check (no collective involved) and on torch tensors in the
NCCL/gloo workers, and a 1 GiB check needs no host copy of the data.

In-place (nccl-tests' ``in-place`` column): one buffer per rank is both input and output.
All-gather's input is the rank's slot of the output buffer (``recvbuff + rank * count``), and
reduce-scatter writes its result into its slot of the input buffer; the other ops use the same
buffer whole.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPS_WITH_MODES", "PATTERN_PRIME", "expected", "input_length", "output_length", "pattern_length"]

PATTERN_PRIME = 8191  # a prime: no power-of-two shift is a multiple of it
OPS_WITH_MODES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")


def input_length(kind: str, mode: str, count: int, n: int) -> int:
    """Elements of one rank's input buffer for ``kind`` (``sizes_for(...).count`` = ``count``), ``mode`` ip/oop.

    Raises:
      ValueError: an unknown kind or mode.
    """
    _check(kind, mode)
    if kind == "all_gather":
        return count * n if mode == "in_place" else count
    if kind in ("reduce_scatter", "all_to_all"):
        return count * n
    return count


def output_length(kind: str, mode: str, count: int, n: int) -> int:
    """Elements of one rank's output buffer (the whole buffer for in-place)."""
    _check(kind, mode)
    if kind == "reduce_scatter" and mode == "out_of_place":
        return count
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return count * n
    return count


def pattern_length(kind: str, mode: str, count: int, n: int) -> int:
    """``P`` for this row: the prime, or the input length when shorter."""
    return min(PATTERN_PRIME, input_length(kind, mode, count, n))


def _check(kind: str, mode: str) -> None:
    if kind not in OPS_WITH_MODES:
        raise ValueError(f"unknown collective {kind!r}; expected one of {list(OPS_WITH_MODES)}")
    if mode not in ("in_place", "out_of_place"):
        raise ValueError(f"unknown mode {mode!r}; expected 'in_place' or 'out_of_place'")


def expected(kind: str, mode: str, pats: Any, k: Any, count: int, j: Any, *, root: int = 0) -> Any:
    """Rank ``k``'s expected output at positions ``j``.

    Args:
      kind: ``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all`` or ``broadcast``.
      mode: ``"in_place"`` or ``"out_of_place"``.
      pats: the group's patterns, ``[n, P]`` (numpy, jax or torch; a float dtype).
      k: this rank in the group (an int or a traced scalar).
      count: the row's ``count`` (the buffer, or one rank's chunk).
      j: positions in the output, ``arange(output_length(...))`` in the library of ``pats``.
      root: broadcast's root.

    Returns:
      ``[len(j)]`` values in ``pats``' dtype.
    """
    _check(kind, mode)
    p = pats.shape[1]
    if kind == "all_reduce":
        return pats.sum(0)[j % p]
    if kind == "broadcast":
        return pats[root][j % p]
    if kind == "all_gather":
        src = j // count
        pos = j if mode == "in_place" else j % count  # the slot of a rank's own buffer, or its whole input
        return pats[src, pos % p]
    if kind == "all_to_all":
        return pats[j // count, (k * count + j % count) % p]
    total = pats.sum(0)  # reduce_scatter
    if mode == "out_of_place":
        return total[(k * count + j) % p]
    mine = (j // count == k) * 1  # in place: rank k's slot gets the sum, the rest keeps its input
    return total[j % p] * mine + pats[k][j % p] * (1 - mine)
