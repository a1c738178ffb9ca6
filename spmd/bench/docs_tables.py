"""Render the benchmark results (``docs/results/*.json``) into the markdown tables of ``docs/``.

A generated table sits between two marker comments in a docs page; the first names the renderer,
the JSON file (relative to the repository root) and optional ``key=value`` filters:

    <!-- generated: decode_tp docs/results/decode_4xH200_2026-11-28.json -->
    ...   (a caption with the card, the date and the command, then the table)
    <!-- /generated -->

``spmd-bench docs-tables`` rewrites every such block from its JSON; ``spmd-bench docs-tables
--check`` rewrites nothing and exits 1 naming each block that no longer matches its JSON (a
number edited by hand, a result file replaced), which is what ``tests/test_bench_docs.py`` runs.

Renderers: ``collectives`` (``spmd-bench collectives``; filters ``ops=``, ``sizes=``, ``tp=``),
``decode_tp`` (``models.bench_decode``, one row per TP size and all-reduce) and ``decode_loop``
(``models.bench_decode`` of the decode loop, one row per batch and kernel choice).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["RENDERERS", "Block", "blocks", "caption", "main", "render", "update"]

MARKER = re.compile(
    r"(?P<open><!-- generated: (?P<renderer>[a-z_]+) (?P<path>\S+?\.json)(?P<opts>(?: [a-z_]+=\S+)*) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /generated -->)",
    re.S,
)


def caption(meta: dict[str, Any], path: str) -> str:
    """The line above every generated table: card, date, versions, the command and the raw file."""
    return (
        f"{meta.get('num_devices')} x {meta.get('device_kind')} ({meta.get('platform')}), "
        f"{str(meta.get('date', '?'))[:10]}, jax {meta.get('jax')}: `{meta.get('command')}` (raw: `{path}`)"
    )


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _opt_list(opts: dict[str, str], key: str, kind: Callable[[str], Any]) -> list | None:
    return [kind(v) for v in opts[key].split(",")] if key in opts else None


def render_collectives(data: dict[str, Any], opts: dict[str, str]) -> list[str]:
    """``spmd-bench collectives``: one line per op, TP size and size, both modes, and torch's busbw beside."""
    ops, sizes, tps = _opt_list(opts, "ops", str), _opt_list(opts, "sizes", int), _opt_list(opts, "tp", int)
    rows = [r for r in data["results"] if r.get("impl") == "jax" and "us" in r]
    rows = [r for r in rows if (ops is None or r["op"] in ops) and (sizes is None or r["size"] in sizes)]
    rows = [r for r in rows if tps is None or r["tp"] in tps]
    backend = data["meta"].get("torch_backend") or "torch"
    torch_rows = {(r["kind"], r["tp"], r["size"]): r for r in data["results"] if r.get("impl") != "jax" and "us" in r}
    out = [
        f"| op | n | size (B) | out-of-place (us) | busbw (GB/s) | in-place (us) | busbw (GB/s) | #wrong "
        f"| {backend} busbw (GB/s) | x {backend} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        oop, ip = r["out_of_place"], r["in_place"]
        ref = torch_rows.get((r["kind"], r["tp"], r["size"]))
        ref_m = (ref.get("out_of_place") or ref.get("in_place")) if ref else None
        out.append(
            f"| {r['op']} | {r['tp']} | {r['size']} | {oop['time_us']:.1f} | {oop['busbw']:.3g} | {ip['time_us']:.1f} "
            f"| {ip['busbw']:.3g} | {oop['wrong'] + ip['wrong']} | {_f(ref_m and ref_m['busbw'], '.3g')} "
            f"| {_f(r.get('vs_torch'), '.2f')} |"
        )
    return out


def _decode_rows(data: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    return {(r["tp"], r["allreduce"], r.get("kernels"), r["phase"], r["batch"]): r for r in data["results"]}


def render_decode_tp(data: dict[str, Any], opts: dict[str, str]) -> list[str]:
    """``models.bench_decode`` over TP sizes: all-reduce and decode at batch 1 and 32, prefill of 2048 tokens."""
    by = {(r["tp"], r["allreduce"], r["phase"], r["batch"]): r for r in data["results"] if "us" in r}
    out = [
        "| tp | all-reduce | all-reduce b=1 | decode b=1 | x roof | all-reduce b=32 | decode b=32 | x roof "
        "| tok/s b=32 | prefill 2048 tok (tok/s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tp, ar in dict.fromkeys((r["tp"], r["allreduce"]) for r in data["results"]):
        cell = lambda phase, batch, key, fmt: _f(by.get((tp, ar, phase, batch), {}).get(key), fmt)  # noqa: B023
        out.append(
            f"| {tp} | {ar} | {cell('allreduce', 1, 'us', '.1f')} | {cell('decode', 1, 'us', '.1f')} "
            f"| {cell('decode', 1, 'x_roofline', '.2f')} | {cell('allreduce', 32, 'us', '.1f')} "
            f"| {cell('decode', 32, 'us', '.1f')} | {cell('decode', 32, 'x_roofline', '.2f')} "
            f"| {cell('decode', 32, 'tok_per_s', '.0f')} | {cell('prefill', 1, 'tok_per_s', '.0f')} |"
        )
    return out


def render_decode_loop(data: dict[str, Any], opts: dict[str, str]) -> list[str]:
    """``models.bench_decode`` of the decode loop: per batch and kernel choice; the faster per batch in bold."""
    rows = [r for r in data["results"] if r["phase"] in ("decode", "generate") and "us" in r]
    by = {(r["batch"], r["kernels"], r["phase"]): r for r in rows}
    best = {(b, ph): min(r["us"] for r in rows if (r["batch"], r["phase"]) == (b, ph)) for b, _, ph in by}
    out = [
        "| batch | kernels | decode loop (us/token) | generate (us/token) | % of HBM roofline (loop) | launches / step "
        "| tok/s (generate) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for batch, kernels in dict.fromkeys((r["batch"], r["kernels"]) for r in rows):
        dec, gen = by[(batch, kernels, "decode")], by[(batch, kernels, "generate")]
        us = [
            f"**{r['us']:.1f}**" if r["us"] == best[(batch, ph)] and len(by) > 2 else f"{r['us']:.1f}"
            for r, ph in ((dec, "decode"), (gen, "generate"))
        ]
        out.append(
            f"| {batch} | {kernels} | {us[0]} | {us[1]} | {dec['pct_roofline']:.0f} | {dec['kernels_per_step']} "
            f"| {gen['tok_per_s']:,.0f} |"
        )
    return out


RENDERERS: dict[str, Callable[[dict[str, Any], dict[str, str]], list[str]]] = {
    "collectives": render_collectives,
    "decode_tp": render_decode_tp,
    "decode_loop": render_decode_loop,
}


class Block:
    """One generated block of a docs page: where it is and what it says now."""

    def __init__(self, match: re.Match, page: str):
        self.match, self.page = match, page
        self.renderer, self.path = match["renderer"], match["path"]
        self.opts = dict(kv.split("=", 1) for kv in match["opts"].split())
        self.body = match["body"]

    def __repr__(self) -> str:
        return f"{self.page}: {self.renderer} {self.path}"


def blocks(text: str, page: str = "") -> list[Block]:
    """The generated blocks of one page's text."""
    return [Block(m, page) for m in MARKER.finditer(text)]


def render(renderer: str, path: str, opts: dict[str, str], root: str) -> str:
    """The body of one block: caption, blank line, table.

    Raises:
      ValueError: an unknown renderer, or a result file that is missing or not a benchmark's JSON.
    """
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r} in a docs marker; expected one of {sorted(RENDERERS)}")
    full = os.path.join(root, path)
    try:
        with open(full) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the results ({e}); the marker names a path from the repo root") from None
    if not isinstance(data, dict) or "meta" not in data or "results" not in data:
        raise ValueError(f"{path}: expected a benchmark's JSON with 'meta' and 'results'")
    lines = RENDERERS[renderer](data, opts)
    return caption(data["meta"], path) + "\n\n" + "\n".join(lines) + "\n"


def update(text: str, root: str, page: str = "") -> tuple[str, list[str]]:
    """``text`` with every block re-rendered, and the blocks that changed."""
    changed, pieces, last = [], [], 0
    for b in blocks(text, page):
        body = render(b.renderer, b.path, b.opts, root)
        if body != b.body:
            changed.append(repr(b))
        pieces += [text[last : b.match.start("body")], body]
        last = b.match.end("body")
    return "".join(pieces) + text[last:], changed


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or ``--check``) every generated table under ``--docs``; 1 when a check finds stale blocks."""
    p = argparse.ArgumentParser(prog="spmd-bench docs-tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default="docs", help="the folder of markdown pages (default: %(default)s)")
    p.add_argument("--root", default=".", help="the repository root the JSON paths are relative to (default: .)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any table differs from its JSON")
    args = p.parse_args(argv)
    stale, count = [], 0
    for name in sorted(os.listdir(args.docs)):
        if not name.endswith(".md"):
            continue
        page = os.path.join(args.docs, name)
        with open(page) as f:
            text = f.read()
        try:
            new, changed = update(text, args.root, page)
        except ValueError as e:
            print(f"spmd-bench docs-tables: {page}: {e}", file=sys.stderr)
            return 2
        count += len(blocks(text))
        stale += changed
        if changed and not args.check:
            with open(page, "w") as f:
                f.write(new)
    verb = "differ from their JSON" if args.check else "rewritten"
    print(f"{count} generated tables, {len(stale)} {verb}" + "".join(f"\n  {s}" for s in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
