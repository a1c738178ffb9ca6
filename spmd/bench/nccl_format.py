"""nccl-tests' definitions: each collective's size S, algbw, busbw, the size sweep and the table format.

Everything here follows NVIDIA's nccl-tests (github.com/NVIDIA/nccl-tests, read at version 2.19.6,
commit a0b82b2): ``doc/PERFORMANCE.md`` for the bandwidths and ``src/*.cu`` / ``src/util.cu`` for
the sizes and the printed table, so that a row of ``spmd-bench collectives`` can be diffed against
a row of ``all_reduce_perf``.

- ``algbw = S / t`` in GB/s (10^9 bytes per second), ``t`` the time of one call.
- ``busbw = algbw * factor``: all-reduce ``2(n-1)/n``; all-gather, reduce-scatter and all-to-all
  ``(n-1)/n``; broadcast ``1`` (``n`` ranks). Bus bandwidth is comparable with the hardware's
  per-rank link bandwidth whatever ``n`` is.
- ``S`` is the size column: the larger of the send and receive buffers of one rank, in bytes
  (``max(sendBytes, expectedBytes)`` in ``src/common.cu``). All-reduce and broadcast: the buffer.
  All-gather: the gathered output, ``n x`` one rank's input. Reduce-scatter: the input, ``n x``
  one rank's output. All-to-all: one rank's whole buffer, ``n`` chunks of ``count`` elements.
- ``count`` is the element count nccl-tests prints: the buffer for all-reduce and broadcast, one
  rank's chunk for all-gather, reduce-scatter and all-to-all.

nccl-tests rounds a chunk down to 16 bytes (and may print a size of 0 for tiny sizes); here a
chunk is rounded up to whole elements, at least one, so every row moves data; the size column is
the size actually run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

__all__ = [
    "KINDS",
    "TYPE_NAMES",
    "Kind",
    "Sizes",
    "algbw",
    "busbw",
    "float_str",
    "header_lines",
    "row_line",
    "sizes_for",
    "sweep",
]

# nccl-tests' names of the types (src/common.cu, test_typenames).
TYPE_NAMES = {"float32": "float", "bfloat16": "bfloat16", "float16": "half", "float64": "double", "int32": "int32"}


@dataclasses.dataclass(frozen=True)
class Kind:
    """One nccl-tests collective: its name, the redop and root it prints, and its bus-bandwidth factor.

    Attributes:
      name: nccl-tests' test (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``alltoall``, ``broadcast``).
      redop: ``"sum"`` for reductions, ``"none"`` otherwise (the ``redop`` column).
      rooted: the ``root`` column shows the root rank (broadcast), else ``-1``.
      chunked: ``S`` is ``n`` chunks of ``count`` elements (all-gather, reduce-scatter, all-to-all).
    """

    name: str
    redop: str
    rooted: bool
    chunked: bool

    def factor(self, n: int) -> float:
        """busbw / algbw for ``n`` ranks (doc/PERFORMANCE.md, "Summary")."""
        if n < 1:
            raise ValueError(f"{self.name}: expected at least 1 rank, got {n}")
        if self.name == "all_reduce":
            return 2.0 * (n - 1) / n
        if self.name == "broadcast":
            return 1.0
        return (n - 1) / n


KINDS = {
    "all_reduce": Kind("all_reduce", "sum", rooted=False, chunked=False),
    "all_gather": Kind("all_gather", "none", rooted=False, chunked=True),
    "reduce_scatter": Kind("reduce_scatter", "sum", rooted=False, chunked=True),
    "all_to_all": Kind("alltoall", "none", rooted=False, chunked=True),
    "broadcast": Kind("broadcast", "none", rooted=True, chunked=False),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The buffers of one row, per rank (elements), and ``S`` in bytes.

    Attributes:
      count: the ``count`` column (the buffer, or one rank's chunk for chunked collectives).
      send: elements in one rank's send buffer.
      recv: elements in one rank's receive buffer.
      size: ``S`` = max(send, recv) x itemsize, the ``size`` column.
    """

    count: int
    send: int
    recv: int
    size: int


def sizes_for(kind: str, size: int, n: int, itemsize: int) -> Sizes:
    """The buffers nccl-tests would use for ``size`` bytes over ``n`` ranks, rounded up to whole elements.

    Args:
      kind: a key of :data:`KINDS`.
      size: the requested ``S`` in bytes.
      n: the number of ranks.
      itemsize: bytes per element.

    Raises:
      ValueError: an unknown kind, or a size, rank count or itemsize below 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {sorted(KINDS)}")
    if size < 1 or n < 1 or itemsize < 1:
        raise ValueError(f"sizes_for: expected size, n and itemsize >= 1, got {size}, {n}, {itemsize}")
    if not KINDS[kind].chunked:
        count = max(-(-size // itemsize), 1)
        return Sizes(count=count, send=count, recv=count, size=count * itemsize)
    base = max(-(-size // (itemsize * n)), 1)
    send, recv = {
        "all_gather": (base, base * n),
        "reduce_scatter": (base * n, base),
        "all_to_all": (base * n, base * n),
    }[kind]
    return Sizes(count=base, send=send, recv=recv, size=max(send, recv) * itemsize)


def algbw(size: int, seconds: float) -> float:
    """``S / t`` in GB/s (10^9 bytes per second), as nccl-tests (``baseBw = bytes / 1.0E9 / sec``)."""
    if seconds <= 0:
        raise ValueError(f"algbw: expected a positive time, got {seconds} s")
    return size / 1.0e9 / seconds


def busbw(kind: str, size: int, seconds: float, n: int) -> float:
    """``algbw x factor``: the factor of ``kind`` for ``n`` ranks (doc/PERFORMANCE.md)."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {sorted(KINDS)}")
    return algbw(size, seconds) * KINDS[kind].factor(n)


def sweep(begin: int, end: int, factor: int) -> list[int]:
    """nccl-tests' ``-b begin -e end -f factor``: ``begin, begin*f, ...`` while ``<= end``.

    Raises:
      ValueError: ``begin > end``, a size below 1, or a factor below 2.
    """
    if begin < 1 or end < 1:
        raise ValueError(f"expected sizes of at least 1 byte, got -b {begin} -e {end}")
    if begin > end:
        raise ValueError(f"-b {begin} is larger than -e {end}; give the smaller size first")
    if factor < 2:
        raise ValueError(f"-f {factor}: expected a factor of at least 2 (nccl-tests' -f)")
    out, s = [], begin
    while s <= end:
        out.append(s)
        s *= factor
    return out


# --------------------------------------------------------------------------------------------
# The table (src/util.cu: writeResultHeader, writeBenchmarkLinePreamble, writeBenchmarkLineBody)


def float_str(value: float, width: int) -> str:
    """nccl-tests' ``getFloatStr``: 2 decimals if they fit in ``width``, then 1, then 0, then an exponent."""
    for fmt in (".2f", ".1f", ".0f"):
        text = f"{value:{width}{fmt}}"
        if len(text) <= width:
            return text
    return f"{value:{width}{'.1e' if width >= 7 else '.0e'}}"


_EMPTY_BODY = " " * 33  # a mode that was not run (nccl-tests: writeBenchMarkLineNullBody)


def header_lines(extra: Sequence[tuple[str, str, int]] = ()) -> list[str]:
    """The three header lines of nccl-tests' table, then ``extra`` columns ``(name, unit, width)``."""
    ext1 = "".join(f"  {name:>{w}}" for name, _, w in extra)
    ext2 = "".join(f"  {unit:>{w}}" for _, unit, w in extra)
    cols = ("size", "count", "type", "redop", "root")
    units = ("(B)", "(elements)", "", "", "")
    lead = "# {:>10}  {:>12}  {:>8}  {:>6}  {:>6}"
    body = "  {:>7}  {:>6}  {:>6}  {:>6}"
    return [
        lead.format("", "", "", "", "") + "           out-of-place                       in-place          ",
        (lead + body + body).format(*cols, "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong")
        + ext1,
        (lead + body + body).format(*units, "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "") + ext2,
    ]


def _body(m: dict[str, Any] | None) -> str:
    if m is None:
        return _EMPTY_BODY
    wrong = m.get("wrong")
    wrong_text = "N/A" if wrong is None else f"{float(wrong):g}"
    return f"  {float_str(m['time_us'], 7)}  {float_str(m['algbw'], 6)}  {float_str(m['busbw'], 6)}  {wrong_text:>6}"


def row_line(
    row: dict[str, Any],
    *,
    extra: Sequence[tuple[str, int]] = (),
) -> str:
    """One line of the table for ``row`` (keys ``size``, ``count``, ``type``, ``redop``, ``root``,
    ``out_of_place`` and ``in_place``: ``{time_us, algbw, busbw, wrong}`` or ``None``), then ``extra``
    cells ``(text, width)``."""
    lead = f"{row['size']:12d}  {row['count']:12d}  {row['type']:>8}  {row['redop']:>6}  {row['root']:6d}"
    return lead + _body(row.get("out_of_place")) + _body(row.get("in_place")) + "".join(f"  {t:>{w}}" for t, w in extra)
