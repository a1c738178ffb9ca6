"""The one benchmark harness: a benchmark describes its cases; this module checks, times and reports them.

A benchmark is a list of :class:`Case` (the row's key and a function that builds a
:class:`Trial`: what to call once and check against a reference, and the jitted chained loop to
time). :func:`run_cases` runs them in order:

1. build the trial and compile its loop; estimate its memory from the compiled executable
   (``memory_analysis``, times the devices that share host memory on CPU) and skip the row with a
   message when it exceeds the budget, before anything runs;
2. call it once and check the outputs (``Trial.check`` returns ``ok`` and any columns);
3. time the loop: warm-up, then best of ``repeats`` (``block_until_ready``), divided by the calls
   it chains.

It prints a table row as each case finishes and a progress line on long sweeps (:class:`Progress`,
shared by the tables of one sweep); a case that
raises becomes an error row and the sweep goes on. :func:`finish` writes the JSON (device, date,
command metadata and the rows) and turns the rows into the exit status: non-zero when nothing was
measured (no JSON is written then) or when any row is wrong or failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from spmd.bench.cli_args import (
    BenchError,
    HelpFormatter,
    add_device_args,
    add_timing_args,
    fill_defaults,
    format_size,
    metadata,
    parse_and_start,
    parse_list,
    parse_size,
    positive_int,
    start_devices,
)

__all__ = [
    "BenchError",
    "Case",
    "Column",
    "HelpFormatter",
    "Progress",
    "Trial",
    "add_device_args",
    "add_timing_args",
    "best_seconds",
    "chain",
    "estimate_bytes",
    "fill_defaults",
    "finish",
    "format_size",
    "host_memory_budget",
    "memory_budget",
    "metadata",
    "parse_and_start",
    "parse_list",
    "parse_size",
    "positive_int",
    "run_cases",
    "start_devices",
]

# --------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Trial:
    """What one row checks and times.

    Attributes:
      once: runs one call and returns its outputs (host arrays), for ``check``.
      check: outputs -> ``{"ok": bool, ...}``; the other keys become columns of the row.
      loop: the jitted chained loop to time; returns arrays.
      args: ``loop``'s arguments (device arrays).
      calls: calls chained in one run of ``loop`` (the time is divided by it).
      extra: columns known before running; ``bytes_moved`` (bytes per device per call) also
        yields a ``GBps`` column.
      feed: ``feed(outputs, args) -> args``: the arguments of the next timed run, from the last
        run's outputs (for a loop that donates its arguments, e.g. a KV cache); runs outside the
        timed window. ``None``: every run takes ``args``.
    """

    once: Callable[[], Any]
    check: Callable[[Any], dict[str, Any]]
    loop: Callable[..., Any]
    args: tuple
    calls: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    feed: Callable[[Any, tuple], tuple] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of a sweep: its key columns and how to build its trial (lazily, when its turn comes)."""

    key: dict[str, Any]
    build: Callable[[], Trial]


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: the row key it shows, its header, width and number format."""

    key: str
    header: str
    width: int
    fmt: str = ""

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return f"{'-':>{self.width}}"
        if isinstance(value, bool):
            return f"{('ok' if value else 'WRONG'):>{self.width}}"
        return f"{value:>{self.width}{self.fmt}}"


def chain(step: Callable[[Any], Any], iters: int, *, unroll: int = 1) -> tuple[Callable[[Any], Any], int]:
    """``step`` applied ``iters`` times in one ``lax.fori_loop`` (``unroll`` calls written out per iteration).

    Returns:
      ``(fn, calls)``: ``fn(carry)`` runs the loop; ``calls`` is how many calls it chains
      (``iters`` rounded down to a multiple of ``unroll``, at least ``unroll``).
    """
    import jax

    trips = max(1, iters // unroll)

    def body(i, c):
        for _ in range(unroll):
            c = step(c)
        return c

    return (lambda carry: jax.lax.fori_loop(0, trips, body, carry)), trips * unroll


def best_seconds(
    fn: Callable[..., Any], *args: Any, repeats: int, feed: Callable[[Any, tuple], tuple] | None = None
) -> float:
    """Run ``fn(*args)`` once to warm up, then ``repeats`` times; the fastest wall time in seconds.

    With ``feed``, each run takes ``feed(last outputs, last args)`` (made and readied before the clock starts).
    """
    import jax

    out = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        if feed is not None:
            args = jax.block_until_ready(feed(out, args))
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def host_memory_budget(fraction: float = 0.8) -> int | None:
    """``fraction`` of the memory the OS says is available (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * fraction)
    except (ValueError, OSError, AttributeError):
        return None


def estimate_bytes(compiled: Any, devices: Sequence[Any]) -> int | None:
    """Bytes the compiled program needs where memory is shared: per device, times the CPU devices."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if stats is None:
        return None
    per_device = sum(
        int(getattr(stats, f, 0) or 0)
        for f in (
            "temp_size_in_bytes",
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "generated_code_size_in_bytes",
        )
    )
    sharing = len(devices) if devices and devices[0].platform == "cpu" else 1
    return per_device * sharing


def memory_budget(devices: Sequence[Any], limit_bytes: int | None) -> int | None:
    """``limit_bytes`` if given, else 80% of available host memory on CPU, 90% of the device limit elsewhere."""
    if limit_bytes is not None:
        return limit_bytes
    if devices and devices[0].platform == "cpu":
        return host_memory_budget()
    stats = devices[0].memory_stats() if devices else None
    return int(stats["bytes_limit"] * 0.9) if stats and "bytes_limit" in stats else None


def _run_one(case: Case, devices: Sequence[Any], repeats: int, budget: int | None) -> dict[str, Any]:
    row = dict(case.key)
    trial = case.build()
    row.update(trial.extra)
    compiled = trial.loop
    lower = getattr(trial.loop, "lower", None)
    if lower is not None:
        compiled = lower(*trial.args).compile()
        need = estimate_bytes(compiled, devices)
        if need is not None:
            row["memory_estimate_bytes"] = need
            if budget is not None and need > budget:
                row["skipped"] = (
                    f"needs ~{need / 1e9:.2f} GB ({len(devices)} x {devices[0].platform} devices), "
                    f"over the {budget / 1e9:.2f} GB budget (--max-memory-gb)"
                )
                return row
    checked = trial.check(trial.once())
    row.update(checked)
    row["ok"] = bool(checked["ok"])
    row["us"] = best_seconds(compiled, *trial.args, repeats=repeats, feed=trial.feed) / trial.calls * 1e6
    if "bytes_moved" in row:
        row["GBps"] = row["bytes_moved"] / row["us"] / 1e3
    return row


PROGRESS_EVERY_S = 10.0


class Progress:
    """``[done/total] elapsed, ~left`` on stderr at most every ``every_s``, counted over a WHOLE sweep.

    A sweep of several tables (one :func:`run_cases` per TP size) makes one ``Progress(total)`` of all
    its cases and passes it to each call, so the count and the estimate cover the run, not one table.
    """

    def __init__(self, total: int, *, every_s: float | None = None):
        self.total = total
        self.done = 0
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = time.perf_counter()

    def before_case(self) -> None:
        """Print the progress line when it is due (never before the first case, nor for a single case)."""
        now = time.perf_counter()
        if self.total > 1 and self.done and now - self.last >= self.every_s:
            eta = (now - self.start) / self.done * (self.total - self.done)
            print(
                f"[{self.done}/{self.total}] {now - self.start:.0f} s elapsed, ~{eta:.0f} s left",
                file=sys.stderr,
                flush=True,
            )
            self.last = now


def run_cases(
    cases: Iterable[Case],
    columns: Sequence[Column],
    *,
    devices: Sequence[Any],
    repeats: int,
    max_memory_bytes: int | None = None,
    progress_every_s: float | None = None,
    progress: Progress | None = None,
    derive: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
    out: Any = None,
) -> list[dict[str, Any]]:
    """Check and time every case, printing a table row as each finishes.

    Args:
      cases: the rows to run, in order.
      columns: the table's columns (key columns first); ``us`` and ``ok`` are filled in here.
      devices: the devices the cases run on (for the memory estimate).
      repeats: timed runs per case; the best is kept.
      max_memory_bytes: skip a case whose compiled estimate is larger (default: 80% of available
        host memory on CPU, 90% of the device's memory limit on accelerators).
      progress_every_s: print ``[done/total]`` with the elapsed time to stderr this often (default
        ``PROGRESS_EVERY_S``); used when no ``progress`` is given.
      progress: the sweep's :class:`Progress` when it runs several tables (counts across calls).
      derive: ``derive(row, earlier_rows)`` adds columns computed from other rows (e.g. a ratio
        to a baseline measured earlier) before the row is printed.
      out: the stream for the table (default ``sys.stdout``).

    Returns:
      One dict per case: its key, the trial's columns, and ``us`` + ``ok``, or ``error`` or ``skipped``.
    """
    out = out or sys.stdout
    cases = list(cases)
    budget = memory_budget(devices, max_memory_bytes)
    header = " ".join(f"{c.header:>{c.width}}" for c in columns)
    print(header, file=out, flush=True)
    print("-" * len(header), file=out, flush=True)
    rows = []
    if progress is None:
        progress = Progress(len(cases), every_s=progress_every_s)
    for case in cases:
        progress.before_case()
        try:
            row = _run_one(case, devices, repeats, budget)
        except Exception as e:  # one failing case must not hide the others; reported in the row and the exit status
            row = {**case.key, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        if derive is not None and "us" in row:
            derive(row, rows)
        rows.append(row)
        progress.done += 1
        keys = " ".join(c.cell(row) for c in columns if c.key in case.key)
        if "error" in row:
            print(f"{keys} ERROR {row['error']}", file=out, flush=True)
        elif "skipped" in row:
            print(f"{keys} SKIPPED {row['skipped']}", file=out, flush=True)
        else:
            print(" ".join(c.cell(row) for c in columns), file=out, flush=True)
    return rows


def finish(rows: Sequence[dict[str, Any]], meta: dict[str, Any], json_path: str, *, prog: str) -> int:
    """Write the results and return the exit status.

    Returns:
      1 (and no file written) when nothing was measured; 1 when any row is wrong or failed;
      else 0. Skipped rows (memory) are reported but are not failures.
    """
    measured = [r for r in rows if "us" in r]
    wrong = [r for r in measured if not r.get("ok", False)]
    errors = [r for r in rows if "error" in r]
    skipped = [r for r in rows if "skipped" in r]
    summary = f"{len(measured) - len(wrong)} ok, {len(wrong)} wrong, {len(errors)} failed, {len(skipped)} skipped"
    if not measured:
        print(f"{prog}: nothing was measured ({summary}); {json_path} not written.", file=sys.stderr, flush=True)
        return 1
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": list(rows)}, f, indent=1)
    print(f"\n{summary}; wrote {json_path}", flush=True)
    if wrong or errors:
        print(f"{prog}: {len(wrong)} wrong and {len(errors)} failed rows (see above).", file=sys.stderr, flush=True)
        return 1
    return 0
