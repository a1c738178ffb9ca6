"""The decode benchmark's profiler trace: the top kernels of one traced call, per step."""

from __future__ import annotations

__all__ = ["profile"]


def profile(loop, make_args, steps: int, out_dir: str, label: str, top: int = 25) -> dict:
    """Trace one call of the decode loop with JAX's profiler; the GPU kernels per step and the costliest.

    Returns ``{"kernels_per_step", "kernel_us_per_step", "top": [[us per step, launches per step, name]]}``
    (empty where the trace has no device events, e.g. on CPU).
    """
    import collections
    import glob
    import gzip
    import json
    import os

    import jax

    path = os.path.join(out_dir, label)
    jax.block_until_ready(loop(*make_args()))  # the traced call is the second (the loop donates its cache)
    args = jax.block_until_ready(make_args())
    with jax.profiler.trace(path, create_perfetto_trace=True):
        jax.block_until_ready(loop(*args))
    files = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return {}
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "GPU" in n or "/device" in n}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    if not kernels:
        return {"processes": sorted(set(names.values()))}
    total, count = collections.defaultdict(float), collections.Counter()
    for e in kernels:
        total[e["name"]] += e.get("dur", 0.0)
        count[e["name"]] += 1
    ranked = sorted(total, key=total.__getitem__, reverse=True)[:top]
    summary = {
        "kernels_per_step": round(len(kernels) / steps, 1),
        "kernel_us_per_step": round(sum(total.values()) / steps, 1),
        "top": [[round(total[n] / steps, 2), round(count[n] / steps, 2), n[:160]] for n in ranked],
    }
    print(f"  trace {label}: {summary['kernels_per_step']} kernels, {summary['kernel_us_per_step']} us per step",
          flush=True)  # fmt: skip
    for us, per, name in summary["top"][:12]:
        print(f"    {us:8.1f} us {per:5.1f}x  {name[:100]}", flush=True)
    return summary
