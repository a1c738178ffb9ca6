"""Benchmark: what one call of IpcKVPipe's programs costs the host, in one process (issue 25).

    python -m spmd.bench.kv_dispatch                      # on the GPU: the Mosaic receive kernel reads a buffer here
    python -m spmd.bench.kv_dispatch --platform cpu       # CPU: the kernel as an XLA stand-in (checks the script)

``IpcKVPipe``'s receiver dispatched its receive program in 919 us per 20 MiB cache on one H200
(2026-12-04, docs/kv_transfer.md) where a plain jitted call costs ~20 us. This times the pieces
apart, ``--iters`` calls each (median, microseconds of host time), for a KV cache of ``--layers``
arrays of ``bf16[8, tokens, 128]`` of each size and for one array:

* ``recv program, operand kept``: the jitted call alone, its address operand a device array made
  once (what the pipe does now); ``... + wait``: the same, waited for (``block_until_ready``);
* ``recv program, operand per call``: the address packed with numpy and ``jax.device_put`` before
  every call (what the pipe did before); ``device_put(address)``: that copy alone;
* ``pack program``: the sender's packing of the cache's arrays into one buffer (dispatch; + wait);
* the compiled receive program's kernels: fusions and custom calls in the optimised HLO (each is a
  launch on a GPU), and whether XLA wrapped them in command buffers (CUDA graphs, ``XLA_FLAGS=
  --xla_gpu_enable_command_buffer=`` turns them off: run it both ways).

On a GPU the receive kernel reads a buffer of this process by its address (``cuMemAlloc``): the
same program the pipe runs on a peer's mapping. The bytes read are checked once per row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any

PROG = "python -m spmd.bench.kv_dispatch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1MiB,20MiB", help="cache sizes in MiB (e.g. 1MiB,20MiB)")
    p.add_argument("--layers", type=int, default=32, help="arrays per KV cache (K and V of 16 layers: 32)")
    p.add_argument("--iters", type=int, default=200, help="calls per timing (median reported)")
    p.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto")
    p.add_argument("--json", default="", help="write the rows here")
    return p


def _median_us(fn: Any, iters: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        out = fn()
        times.append(time.perf_counter_ns() - t0)
        jax.block_until_ready(out)  # (untimed: the next call finds the device idle, not queued behind this one)
        del out
    return statistics.median(times) / 1e3


def _kernels(compiled_text: str) -> dict[str, int]:
    return {
        "fusions": len(re.findall(r"= [^=\n]*\bfusion\(", compiled_text)),
        "custom_calls": len(re.findall(r"\bcustom-call\(", compiled_text)),
        "command_buffers": len(re.findall(r"command_buffer", compiled_text)),
    }


def _source(device: Any, nbytes: int) -> tuple[int, Any, Any]:
    """``(address, free, expected uint32 words)`` of a buffer of ``nbytes`` the receive program reads."""
    import numpy as np

    from kernels import peer_copy

    words = np.arange(peer_copy.padded_bytes(nbytes) // 4, dtype=np.uint32)
    if device.platform == "cpu":  # the stand-in reads nothing: any address
        return 4096, lambda: None, None
    from kernels.symmetric_memory import cuda

    ordinal = device.local_hardware_id
    at = cuda.mem_alloc(ordinal, words.nbytes)
    import jax

    src = jax.block_until_ready(jax.device_put(words, device))
    cuda.copy_async(ordinal, at, src.unsafe_buffer_pointer(), words.nbytes)
    cuda.synchronize(ordinal)
    return at, lambda: cuda.mem_free(ordinal, at), words


def _rows(args: argparse.Namespace, device: Any, mib: float) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spmd.kv_transfer import host_probe

    nbytes = int(mib * (1 << 20))
    tokens = max(1, nbytes // (args.layers * 8 * 128 * 2))
    layers = (("bfloat16", (8, tokens, 128)),) * args.layers
    total = sum(int(np.prod(s)) * 2 for _, s in layers)
    at, free, want = _source(device, total)
    rows = []
    try:
        words = host_probe.address_operand([at], device)
        fn = host_probe.receive_program(layers, 8, device)
        got = jax.block_until_ready(fn(words))
        ok = None
        if want is not None:  # the first layer's bytes are the buffer's first words
            ok = bool(np.array_equal(np.asarray(got[0]).reshape(-1).view(np.uint32), want[: got[0].size // 2]))
        kernels = _kernels(fn.lower(words).compile().as_text())
        kv = f"KV cache {args.layers} x bf16[8, {tokens}, 128] ({total / (1 << 20):g} MiB)"
        per_call = lambda: fn(host_probe.address_operand([at], device))
        for name, call in [
            ("recv program, operand kept (dispatch)", lambda: fn(words)),
            ("recv program, operand kept + wait", lambda: jax.block_until_ready(fn(words))),
            ("recv program, operand per call (dispatch)", per_call),
            ("device_put(address) alone", lambda: host_probe.address_operand([at], device)),
        ]:
            rows.append({"what": kv, "step": name, "us": _median_us(call, args.iters), "ok": ok, **kernels})
            ok, kernels = None, {}  # (said on the first row)
        xs = [jnp.zeros(s, jnp.bfloat16, device=device) for _, s in layers]
        pack = host_probe.pack_program(layers, 8)
        for name, call in [
            ("pack program (dispatch)", lambda: pack(*xs)),
            ("pack program + wait", lambda: jax.block_until_ready(pack(*xs))),
        ]:
            rows.append({"what": kv, "step": name, "us": _median_us(call, args.iters), "ok": None})
        one = host_probe.array_program("bfloat16", (total // 2,))
        arr = f"one array bf16[{total // 2}] ({total / (1 << 20):g} MiB)"
        for name, call in [
            ("recv program, operand kept (dispatch)", lambda: one(words)),
            ("recv program, operand kept + wait", lambda: jax.block_until_ready(one(words))),
        ]:
            rows.append({"what": arr, "step": name, "us": _median_us(call, args.iters), "ok": None})
    finally:
        free()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure; see the module docstring."""
    args = build_parser().parse_args(argv)
    if args.platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    import jax

    device = jax.devices()[0]
    if args.platform == "gpu" and device.platform != "gpu":
        print(f"{PROG}: --platform gpu, but JAX sees {device.platform} devices.")
        return 2
    if device.platform == "cpu":  # the Mosaic GPU kernel cannot run here: an XLA op of its shape that reads nothing
        from spmd.kv_transfer import host_probe

        undo = host_probe.stand_in_kernel(map_staging=False)
    else:
        undo = lambda: None
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"{PROG} on {device.device_kind} (JAX {jax.__version__}), XLA_FLAGS={flags!r}; median of {args.iters} calls")
    rows = []
    try:
        for text in args.sizes.split(","):
            for row in _rows(args, device, float(text.removesuffix("MiB"))):
                rows.append(row)
                kern = "" if "fusions" not in row else (
                    f"  [program: {row['fusions']} fusions, {row['custom_calls']} custom calls, "
                    f"{row['command_buffers']} command-buffer mentions]"
                )  # fmt: skip
                check = {None: "", True: "  bytes PASS", False: "  bytes FAIL"}[row["ok"]]
                print(f"{row['what']:<44} {row['step']:<44} {row['us']:9.1f} us{check}{kern}", flush=True)
    finally:
        undo()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "xla_flags": flags, "rows": rows}, f, indent=1)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
