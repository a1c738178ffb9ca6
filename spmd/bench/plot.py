"""``--plot PATH.png``: latency and busbw against size, log-log, one line per implementation.

One row of panels per collective (nccl-tests' kinds), latency on the left and busbw on the right;
a line per implementation and TP size (the JAX ops, and NCCL / gloo when torch ran beside), the
out-of-place column where it was run, else the in-place one. The link peak (``--peak-gbps``, or the
known value for the device kind) is drawn dashed: on the busbw panel as a level, on the latency
panel as the time a call would take at that busbw. Needs matplotlib: ``pip install -e '.[plot]'``.
"""

from __future__ import annotations

from typing import Any

from spmd.bench.cli_args import BenchError
from spmd.bench.nccl_format import KINDS

__all__ = ["require_matplotlib", "series", "write_png"]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
      BenchError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib, which is not installed here. Install the plot extra: pip install -e '.[plot]' "
            "(or pip install matplotlib), or leave out --plot."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _measure(row: dict[str, Any]) -> dict[str, Any] | None:
    return row.get("out_of_place") or row.get("in_place")


def series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """``{kind: {label: [(size, time_us, busbw), ...]}}`` from the measured rows, sorted by size."""
    out: dict[str, dict[str, list]] = {}
    for r in rows:
        m = _measure(r) if "us" in r else None
        if m is None:
            continue
        label = f"{r['op'] if r['impl'] == 'jax' else r['impl']} (n={r['tp']})"
        out.setdefault(r["kind"], {}).setdefault(label, []).append((r["size"], m["time_us"], m["busbw"]))
    for lines in out.values():
        for pts in lines.values():
            pts.sort()
    return out


def write_png(result: dict[str, Any], path: str) -> None:
    """Draw ``result`` (the JSON the sweep writes: ``meta`` and ``results``) to ``path``.

    Raises:
      BenchError: matplotlib is missing, or no row was measured.
    """
    plt = require_matplotlib()
    meta, data = result["meta"], series(result["results"])
    if not data:
        raise BenchError("--plot: no row was measured, nothing to draw")
    kinds = [k for k in KINDS if k in data]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 3.6 * len(kinds)), squeeze=False)
    peak = meta.get("peak_gbps")
    for (ax_t, ax_b), kind in zip(axes, kinds, strict=True):
        sizes = sorted({s for pts in data[kind].values() for s, _, _ in pts})
        for label, pts in sorted(data[kind].items()):
            style = "-." if label.startswith(("nccl", "gloo")) else "-"
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=label)
            ax_b.plot([p[0] for p in pts], [p[2] for p in pts], style, marker=".", label=label)
        if peak:
            ax_b.axhline(peak, color="k", linestyle="--", label=f"link peak {peak:g} GB/s")
            for n in sorted({int(lbl.rsplit("n=", 1)[1].rstrip(")")) for lbl in data[kind]}):
                f = KINDS[kind].factor(n)
                ax_t.plot(sizes, [s * f / (peak * 1e9) * 1e6 for s in sizes], "k--", linewidth=1,
                          label=f"at link peak (n={n})")  # fmt: skip
        for ax, ylabel in ((ax_t, "time per call (us)"), (ax_b, "busbw (GB/s)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("size S (bytes)")
            ax.set_ylabel(ylabel)
            ax.set_title(kind)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"{meta.get('num_devices')} x {meta.get('device_kind')}, jax {meta.get('jax')}, {meta.get('dtype')}, "
        f"{str(meta.get('date', ''))[:10]}\n{meta.get('command', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
