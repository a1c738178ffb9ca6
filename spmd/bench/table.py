"""The collectives sweep's tables on stdout, in nccl-tests' format (:mod:`spmd.bench.nccl_format`).

One table per op and TP size, as nccl-tests prints one per binary: the 13 columns of
``all_reduce_perf`` (so rows can be diffed against it), and, when torch ran beside, two more:
NCCL's (or gloo's) busbw at that size and ``x nccl``, this row's busbw over it. The ratio compares
the out-of-place JAX time with torch's out-of-place call where its API has one (all-gather,
reduce-scatter, all-to-all) and its in-place call otherwise (``dist.all_reduce`` and
``dist.broadcast`` work in place); the sizes are the same, so it is also torch's time over JAX's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

from spmd.bench import nccl_format

__all__ = ["footer_lines", "print_jax_table", "print_torch_tables", "ratio_to_torch", "summarize", "torch_busbw"]


def torch_busbw(row: dict[str, Any] | None) -> float | None:
    """The busbw a torch row is compared at: out-of-place where torch has it, else in-place."""
    if row is None or "us" not in row:
        return None
    m = row.get("out_of_place") or row.get("in_place")
    return m["busbw"] if m else None


def ratio_to_torch(row: dict[str, Any], torch_row: dict[str, Any] | None) -> float | None:
    """``row``'s out-of-place busbw over torch's (see the module docstring); ``None`` when either is missing."""
    ref = torch_busbw(torch_row)
    mine = (row.get("out_of_place") or {}).get("busbw")
    if ref is None or mine is None or ref <= 0:
        return None
    return mine / ref


def footer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """nccl-tests' two footer lines: the wrong elements (its "Out of bounds values") and the average busbw."""
    wrong = sum(int(r[m]["wrong"] or 0) for r in rows for m in ("out_of_place", "in_place") if r.get(m))
    bws = [r[m]["busbw"] for r in rows for m in ("out_of_place", "in_place") if r.get(m)]
    avg = sum(bws) / len(bws) if bws else 0.0
    return [
        f"# {'Out of bounds values':<20} : {wrong} {'FAILED' if wrong else 'OK'}",
        f"# {'Avg bus bandwidth':<20} : {avg:g} ",
        "#",
    ]


def _print_row(row: dict[str, Any], extra: list[tuple[str, int]], out) -> None:
    if "error" in row or "skipped" in row:
        lead = f"{row['size']:12d}  {row['count']:12d}  {row['type']:>8}  {row['redop']:>6}  {row['root']:6d}"
        what = f"ERROR {row['error']}" if "error" in row else f"SKIPPED {row['skipped']}"
        print(f"{lead}  {what}", file=out, flush=True)
    else:
        print(nccl_format.row_line(row, extra=extra), file=out, flush=True)


def print_jax_table(
    op: str,
    tp: int,
    num_devices: int,
    impl: str,
    cases: Iterable[Callable[[], dict[str, Any]]],
    torch_rows: dict[tuple, dict[str, Any]],
    backend: str | None,
    progress: Any,
    into: list[dict[str, Any]],
    out: Any = None,
) -> list[dict[str, Any]]:
    """Run ``cases`` (each returns a row) and print them as one table.

    Each row (with ``vs_torch`` when torch ran) is appended to ``into`` as it finishes, so an
    interrupted sweep keeps what it measured; returns this table's rows.
    """
    out = out or sys.stdout
    groups = num_devices // tp
    print(f"#\n# {op} over {tp} ranks ({groups} group{'s' * (groups > 1)} at once): {impl}", file=out)
    extra_cols = [(f"{backend} busbw", "(GB/s)", 11), (f"x {backend}", "", 7)] if backend else []
    for line in nccl_format.header_lines(extra_cols):
        print(line, file=out, flush=True)
    rows = []
    for case in cases:
        progress.before_case()
        row = case()
        progress.done += 1
        extra: list[tuple[str, int]] = []
        if backend:
            ref = torch_rows.get((row["kind"], row["tp"], row["size"]))
            bw, ratio = torch_busbw(ref), ratio_to_torch(row, ref)
            if ratio is not None:
                row["vs_torch"] = ratio
            extra = [
                ("-" if bw is None else nccl_format.float_str(bw, 6), 11),
                ("-" if ratio is None else f"{ratio:.2f}", 7),
            ]
        _print_row(row, extra, out)
        rows.append(row)
        into.append(row)
    for line in footer_lines([r for r in rows if "us" in r]):
        print(line, file=out, flush=True)
    return rows


def print_torch_tables(rows: list[dict[str, Any]], backend: str, out: Any = None) -> None:
    """torch's rows, one table per collective, in the same format (a mode torch's API lacks is blank)."""
    out = out or sys.stdout
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        tp = mine[0]["tp"]
        print(f"#\n# {kind} over {tp} ranks: torch.distributed {backend}, one process per device", file=out)
        for line in nccl_format.header_lines():
            print(line, file=out, flush=True)
        for row in mine:
            _print_row(row, [], out)
        for line in footer_lines([r for r in mine if "us" in r]):
            print(line, file=out, flush=True)


def summarize(rows: list[dict[str, Any]], out: Any = None) -> None:
    """One line per (op, TP size): busbw at the largest size measured, and the ratio to torch there."""
    out = out or sys.stdout
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if "us" in r and r["impl"] == "jax":
            seen[(r["op"], r["tp"])] = r  # rows come in size order: the last one is the largest
    if seen:
        print("#\n# at the largest size measured (out-of-place busbw):", file=out)
    for (op, tp), r in seen.items():
        ratio = f", {r['vs_torch']:.2f}x torch" if "vs_torch" in r else ""
        bw = r["out_of_place"]["busbw"]
        print(f"#   {op:<20} tp={tp:<3} S={r['size']:>11} B  busbw {bw:9.3f} GB/s{ratio}", file=out, flush=True)
