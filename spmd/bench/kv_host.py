"""Benchmark: IpcKVPipe's HOST work per message, both ends in one process on CPU (issue 25).

    python -m spmd.bench.kv_host                                   # copy and kernel paths, 1 MiB and 20 MiB
    python -m spmd.bench.kv_host --receive kernel --out --sizes 1MiB --messages 100

Both ends of one ``IpcKVPipe`` live in this process, on two simulated CPU devices (``/dev/shm``),
and take turns in one thread: ``send`` then ``recv``, so no phase waits for the other side and
each phase is the host work it does (plus, on CPU, the memory copies of the bytes). Per row:
microseconds per message (send + receive + the caller's ``block_until_ready``; the median, mean and
best of ``--messages``), the median of each phase of ``IpcKVPipe(profile=True)``, and two counts
over the timed messages: JAX compile steps (tracing, lowering, compile: ``jax.monitoring``; 0 once
a layout was seen) and ``jax.device_put`` calls (host-to-device copies: 0 on the kernel path; the
``copy`` path's ``/dev/shm`` reads are ``device_put`` by design, one per staged buffer).

``--receive kernel`` runs the receive-by-address path with the Mosaic GPU kernel replaced by an
XLA stand-in that reads NOTHING (``zeros + address``: the host path and the program around the
kernel are the real ones, the bytes are not checked); the copy path's bytes are checked against
what was sent on the last message. These are CPU host-path numbers, never GPU numbers: on a GPU
run ``python -m spmd.bench.kv_ipc --profile`` (two processes).

The kernel's stand-in is :func:`spmd.kv_transfer.host_probe.stand_in_kernel`. (The numbers before
issue 25's host-path change in docs/kv_transfer.md were taken with this file as first committed,
which had the stand-in inline, run against commit ``31c9dcb``'s tree.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

PROG = "python -m spmd.bench.kv_host"
_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _size(text: str) -> int:
    for unit, factor in _UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1MiB,20MiB", help="message sizes (a KV cache of this many bytes, or one array)")
    p.add_argument("--modes", default="kv,array", help="kv (send_kv_cache) and/or array (send_tensor)")
    p.add_argument("--receive", default="copy,kernel", help="copy and/or kernel (the kernel as a stand-in)")
    p.add_argument("--out", action="store_true", help="recv_kv_cache(out=the previous cache): donated, in place")
    p.add_argument("--kv-layers", type=int, default=16, help="KV-cache layers (each K and V: twice as many arrays)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads per layer")
    p.add_argument("--head-dim", type=int, default=128, help="head size")
    p.add_argument("--messages", type=int, default=50, help="timed messages per row (after 3 untimed)")
    p.add_argument("--json", default="", help="write the rows here")
    return p


class _Counts:
    """Compile steps and ``jax.device_put`` calls while active."""

    def __init__(self) -> None:
        import jax
        import jax.monitoring

        self.compiles = self.puts = 0
        self.on = False
        real = jax.device_put

        def put(*a: Any, **k: Any) -> Any:
            self.puts += self.on
            return real(*a, **k)

        def listener(event: str, duration: float, **kwargs: Any) -> None:
            if event.startswith("/jax/core/compile/"):
                self.compiles += self.on

        jax.device_put = put
        jax.monitoring.register_event_duration_secs_listener(listener)
        self._undo = (real, listener)

    def close(self) -> None:
        """Put ``jax.device_put`` back and stop listening."""
        import jax
        import jax.monitoring

        real, listener = self._undo
        jax.device_put = real
        jax.monitoring.unregister_event_duration_listener(listener)


def _pair(devices: list[Any]) -> tuple[Any, Any]:
    from spmd.kv_transfer import IpcKVPipe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box: dict[str, Any] = {}
    kw = dict(timeout_s=60, secret=b"kv_host", profile=True)
    t = threading.Thread(target=lambda: box.setdefault("s", IpcKVPipe("127.0.0.1", port, devices=devices[:1], **kw)))
    t.start()
    c = IpcKVPipe("127.0.0.1", port, role="client", devices=devices[1:2], **kw)
    t.join()
    return box["s"], c


def _row(args: argparse.Namespace, counts: _Counts, mode: str, size: int, receive: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    devices = jax.devices()
    per_token = 2 * args.kv_layers * args.kv_heads * args.head_dim * 2
    shapes = [(size // 2,)] if mode == "array" else [(args.kv_heads, size // per_token, args.head_dim)]
    shapes = shapes * (1 if mode == "array" else 2 * args.kv_layers)
    key = jax.random.key(size)
    normal = [jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16) for i, s in enumerate(shapes)]
    data = [jax.device_put(x, devices[0]) for x in normal]
    s, c = _pair(devices)
    if receive == "kernel":
        c.receive, c._fallback = "kernel", False
    times, got, per_phase, seen = [], None, {}, {}
    with s, c:
        for i in range(3 + args.messages):
            if i == 3:
                s.phases.reset()
                c.phases.reset()
                counts.compiles = counts.puts = 0
                counts.on = True
            t0 = time.perf_counter_ns()
            if mode == "array":
                s.send_tensor(data[0])
                got = [c.recv_tensor()]
            else:
                s.send_kv_cache(data)
                got = c.recv_kv_cache(out=got if args.out and got is not None else None)
            jax.block_until_ready(got)
            times.append(time.perf_counter_ns() - t0)
            if i >= 3:  # this message's phases (the totals' growth)
                now = {**s.phases.totals, **c.phases.totals}
                for name, ns in now.items():
                    per_phase.setdefault(name, []).append(ns - seen.get(name, 0))
                seen = now
        counts.on = False
        ok = None
        if receive == "copy":
            same = [
                np.array_equal(np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16))
                for g, w in zip(got, data, strict=False)
            ]
            ok = len(got) == len(data) and all(same)
        phases = {name: statistics.median(v) / 1e3 for name, v in per_phase.items()}
    timed = [t / 1e3 for t in times[3:]]
    return {
        "mode": mode,
        "bytes": size,
        "receive": receive,
        "out": bool(args.out and mode == "kv"),
        "mean_us": statistics.fmean(timed),
        "median_us": statistics.median(timed),
        "best_us": min(timed),
        "compiles_per_message": counts.compiles / args.messages,
        "device_puts_per_message": counts.puts / args.messages,
        "ok": ok,
        "phases_us": phases,
    }


def _print(row: dict[str, Any]) -> None:
    size = f"{row['bytes'] / (1 << 20):g} MiB"
    what = f"{row['mode']}{' out=' if row['out'] else ''} {size} receive={row['receive']}"
    ok = {None: "bytes not read (stand-in)", True: "bytes ok", False: "bytes WRONG"}[row["ok"]]
    print(
        f"{what}: median {row['median_us']:.0f} us, mean {row['mean_us']:.0f}, best {row['best_us']:.0f} per message; "
        f"compiles/msg {row['compiles_per_message']:g}, device_puts/msg {row['device_puts_per_message']:g}; {ok}"
    )
    for name, us in row["phases_us"].items():
        print(f"    {name:<58} {us:9.1f}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    """Measure; see the module docstring."""
    args = build_parser().parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    flag = "--xla_force_host_platform_device_count=2"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    from spmd.kv_transfer import host_probe

    sizes = [_size(t) for t in args.sizes.split(",")]
    per_token = 2 * args.kv_layers * args.kv_heads * args.head_dim * 2
    if "kv" in args.modes and any(size % per_token for size in sizes):
        print(f"{PROG}: a KV cache comes in steps of {per_token} bytes (--kv-layers/--kv-heads/--head-dim).")
        return 2
    counts = _Counts()
    try:
        print(
            f"{PROG} on {jax.devices()[0].device_kind} (JAX {jax.__version__}): us per message, both ends in one thread"
        )
        rows = []
        for mode in args.modes.split(","):
            for size in sizes:
                for receive in args.receive.split(","):
                    undo = host_probe.stand_in_kernel() if receive == "kernel" else lambda: None
                    try:
                        rows.append(_row(args, counts, mode, size, receive))
                    finally:
                        undo()
                    _print(rows[-1])
    finally:
        counts.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": [PROG, *(sys.argv[1:] if argv is None else argv)], "rows": rows}, f, indent=1)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
