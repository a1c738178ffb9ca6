"""Benchmark: ``IpcKVPipe`` (and ``TransferServerKVPipe``) between two independent processes of one host.

    python -m spmd.bench.kv_ipc --sizes 1MiB,20MiB,256MiB --repeats 5            # GPUs: CUDA IPC
    python -m spmd.bench.kv_ipc --sizes 1MiB,20MiB --pipes ipc --platform cpu     # CPU: /dev/shm

This process sends; it starts the receiver as a subprocess. With two or more GPUs the receiver
uses the next GPU (device to device over NVLink / PCIe); with one, the SAME GPU (then every copy
is an HBM copy and the rows only show the pipe's overheads, not a link's bandwidth). Rows:

* ``ipc`` / ``transfer`` x ``array`` / ``kv``: one bf16 array of the size (``send_tensor``), or a
  KV cache of the size (``--kv-layers`` x K and V of ``bf16[--kv-heads, tokens, --head-dim]``,
  ``send_kv_cache``);
* ``raw-copy`` (GPU, the ceiling in the same run): one ``cuMemcpyDtoDAsync`` of the size from a
  buffer of the sender's, mapped by IPC, into the receiver's device, timed the same way.

Timing: the receiver says "go", the sender stamps ``time.monotonic_ns()`` (one clock for every
process of the machine) and sends; the receiver stops the clock when every array it received is
ready. One warm-up, then the best of ``--repeats``; the last message of every row is checked byte
for byte. The receiver prints the table and writes ``--json``.

``--profile`` (the ``ipc`` pipe): both ends time every phase of each timed message (host time,
``IpcKVPipe(profile=True)``: waiting for a slot's ack, packing dispatch, the layout and staging
maps, queueing the staging copies, the release (staging copies finished) and the epoch, on the
receiver the wait for the epoch, the layout and route, the copy (and the wait for it), the
unpacking dispatch, the ack, and the caller's ``block_until_ready``); the receiver prints a table
of microseconds per message for every row and adds it to the row's JSON (``"profile"``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from spmd.bench import harness

PIPES = ("ipc", "transfer")
MODES = ("array", "kv")
PROG = "python -m spmd.bench.kv_ipc"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=harness.HelpFormatter)
    p.add_argument(
        "--sizes",
        type=lambda t: harness.parse_list(t, harness.parse_size, what="sizes"),
        default="1MiB,20MiB,256MiB",
        help="message sizes",
    )
    pipes = lambda t: harness.parse_list(t, _choice(PIPES), what="pipes")
    p.add_argument("--pipes", type=pipes, default="ipc,transfer", help="pipes to measure")
    p.add_argument("--modes", type=lambda t: harness.parse_list(t, _choice(MODES), what="modes"), default="array,kv")
    p.add_argument("--kv-layers", type=harness.positive_int, default=16, help="KV-cache layers (each K and V)")
    p.add_argument("--kv-heads", type=harness.positive_int, default=8, help="KV heads per layer")
    p.add_argument("--head-dim", type=harness.positive_int, default=128, help="head size")
    p.add_argument("--repeats", type=harness.positive_int, default=5, help="timed messages per row (best reported)")
    p.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto", help="the devices to use")
    p.add_argument("--profile", action="store_true", help="time each phase of every message (ipc pipe)")
    p.add_argument(
        "--receive",
        choices=("auto", "kernel", "copy"),
        default="auto",
        help="how the ipc receiver reads the staging: by address in one program (kernel, CUDA) or copies",
    )
    p.add_argument("--json", default="bench_kv_ipc.json", help="where the receiver writes the results")
    p.add_argument("--role", choices=("send", "recv"), default="send", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _choice(options: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


def _tokens(size: int, args: argparse.Namespace) -> int:
    per_token = 2 * args.kv_layers * args.kv_heads * args.head_dim * 2
    if size % per_token:
        raise harness.BenchError(
            f"--sizes {harness.format_size(size)}: a KV cache of {args.kv_layers} layers x K and V of "
            f"bf16[{args.kv_heads}, tokens, {args.head_dim}] comes in steps of {per_token} bytes."
        )
    return size // per_token


def _data(mode: str, size: int, args: argparse.Namespace, device: Any) -> list[Any]:
    """Deterministic bf16 arrays on ``device`` (both processes make the same ones)."""
    import jax
    import jax.numpy as jnp

    shapes = (
        [(size // 2,)]
        if mode == "array"
        else [(args.kv_heads, _tokens(size, args), args.head_dim)] * (2 * args.kv_layers)
    )
    key = jax.random.key(size)
    with jax.default_device(device):
        return [jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16) for i, s in enumerate(shapes)]


def _same(got: list[Any], want: list[Any]) -> bool:
    import numpy as np

    return len(got) == len(want) and all(
        g.shape == w.shape and np.array_equal(np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16))
        for g, w in zip(got, want, strict=True)
    )


def _stamp() -> Any:
    import numpy as np

    return np.array(divmod(time.monotonic_ns(), 1 << 30), np.int32)


def _pipe(kind: str, role: str, args: argparse.Namespace, device: Any) -> Any:
    from spmd.kv_transfer import IpcKVPipe, TransferServerKVPipe

    kw = dict(role="server" if role == "send" else "client", timeout_s=300, devices=[device])
    if kind == "ipc":
        receive = args.receive if role == "recv" else "auto"
        return IpcKVPipe("127.0.0.1", args.port, profile=args.profile, receive=receive, **kw)
    return TransferServerKVPipe("127.0.0.1", args.port, **kw)


class _Profile:
    """Per-phase host time of the timed messages of one row (``IpcKVPipe.phases``, reset around each)."""

    def __init__(self, pipe: Any) -> None:
        self.phases = getattr(pipe, "phases", None)
        self.enabled = bool(self.phases is not None and self.phases.enabled)
        self.totals: dict[str, float] = {}
        self.n = 0

    def begin(self) -> None:
        if self.enabled:
            self.phases.reset()

    def end(self, extra: dict[str, float] | None = None) -> None:
        if self.enabled:
            for name, ns in {**self.phases.totals, **(extra or {})}.items():
                self.totals[name] = self.totals.get(name, 0.0) + ns
            self.n += 1

    def per_message_us(self) -> dict[str, float]:
        return {name: ns / max(self.n, 1) / 1e3 for name, ns in self.totals.items()}


def _sender(args: argparse.Namespace, device: Any) -> None:
    import jax
    import numpy as np

    for kind in args.pipes:
        with _pipe(kind, "send", args, device) as pipe:
            for mode in args.modes:
                for size in args.sizes:
                    sent = jax.block_until_ready(_data(mode, size, args, device))
                    prof = _Profile(pipe)
                    for i in range(args.repeats + 1):
                        assert pipe.recv_tensor() is None  # the receiver's "go"
                        stamp = _stamp()
                        prof.begin()
                        if mode == "array":
                            pipe.send_tensor(sent[0])
                        else:
                            pipe.send_kv_cache(sent)
                        if i:
                            prof.end()
                        pipe.send_tensor(stamp)
                    if prof.enabled:  # the sender's phases, for the receiver's table
                        pipe.send_tensor(np.frombuffer(json.dumps(prof.per_message_us()).encode(), np.uint8))
    if "raw-copy" in _rows_wanted(args, device):
        _raw_copy_sender(args, device)


def _rows_wanted(args: argparse.Namespace, device: Any) -> list[str]:
    return ["raw-copy"] if device.platform == "gpu" else []


def _raw_copy_sender(args: argparse.Namespace, device: Any) -> None:
    """Offer one IPC-exported buffer of the largest size; wait until the receiver is done with it."""
    import numpy as np

    from kernels.symmetric_memory import cuda
    from spmd.kv_transfer import TCPKVPipe

    ordinal, size = device.local_hardware_id, max(args.sizes)
    ptr = cuda.mem_alloc(ordinal, size)
    with TCPKVPipe("127.0.0.1", args.port, timeout_s=300) as ctl:
        ctl.send_tensor(np.frombuffer(cuda.ipc_handle(ordinal, ptr), np.uint8))
        ctl.recv_tensor()  # done
    cuda.mem_free(ordinal, ptr)


def _raw_copy_rows(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels.symmetric_memory import cuda
    from spmd.kv_transfer import TCPKVPipe

    rows = []
    ordinal = device.local_hardware_id
    with TCPKVPipe("127.0.0.1", args.port, role="client", timeout_s=300) as ctl:
        src = cuda.ipc_open(ordinal, bytes(np.asarray(ctl.recv_tensor())))
        for size in args.sizes:
            dst = jax.block_until_ready(jnp.zeros(size // 4, jnp.uint32, device=device))
            times = []
            for i in range(args.repeats + 1):
                t0 = time.monotonic_ns()
                cuda.copy_async(ordinal, dst.unsafe_buffer_pointer(), src, size)
                cuda.synchronize(ordinal)
                if i:
                    times.append((time.monotonic_ns() - t0) / 1e9)
            best = min(times)
            ok = bool(np.all(np.asarray(dst) == 0))  # the sender's buffer is zero-filled
            row = {"pipe": "raw-copy", "mode": "array", "bytes": size, "us": best * 1e6, "GBps": size / best / 1e9}
            rows.append({**row, "ok": ok})
            _print(rows[-1])
        cuda.ipc_close(ordinal, src)
        ctl.send_tensor(None)
    return rows


def _print(row: dict[str, Any]) -> None:
    print(
        f"{row['pipe']:>9} {row['mode']:>6} {harness.format_size(row['bytes']):>9} {row['us'] / 1e3:10.3f} ms "
        f"{row['GBps']:9.2f} GB/s {'ok' if row['ok'] else 'WRONG'}",
        flush=True,
    )


def _print_profile(row: dict[str, Any], times: list[float]) -> None:
    mean = sum(times) / len(times) * 1e6
    print(f"  profile of {row['mode']} {harness.format_size(row['bytes'])}, receive={row.get('receive')}: "
          f"us per message (mean of {len(times)}; "
          f"end to end mean {mean:.1f} us, best {row['us']:.1f} us)")  # fmt: skip
    for side in ("send", "recv"):
        phases = row["profile"][side]
        for name, us in phases.items():
            print(f"    {name:<44} {us:10.1f}")
        print(f"    {side + ': all phases':<44} {sum(phases.values()):10.1f}", flush=True)


def _receiver(args: argparse.Namespace, device: Any) -> list[dict[str, Any]]:
    import jax
    import numpy as np

    rows = []
    for kind in args.pipes:
        with _pipe(kind, "recv", args, device) as pipe:
            for mode in args.modes:
                for size in args.sizes:
                    times, got = [], None
                    prof = _Profile(pipe)
                    for i in range(args.repeats + 1):
                        pipe.send_tensor(None)  # go
                        prof.begin()
                        got = [pipe.recv_tensor()] if mode == "array" else pipe.recv_kv_cache()
                        t0 = time.monotonic_ns()
                        jax.block_until_ready(got)
                        t1 = time.monotonic_ns()
                        if i:
                            prof.end({"recv: block_until_ready (the caller)": t1 - t0})
                        hi, lo = (int(v) for v in np.asarray(pipe.recv_tensor()))
                        if i:
                            times.append((t1 - (hi << 30 | lo)) / 1e9)
                    best = min(times)
                    row = {"pipe": kind, "mode": mode, "bytes": size, "us": best * 1e6, "GBps": size / best / 1e9}
                    row["ok"] = _same(got, _data(mode, size, args, device))
                    if kind == "ipc":
                        row["receive"] = pipe.receive  # (after a fallback: "copy")
                    rows.append(row)
                    _print(row)
                    if prof.enabled:
                        sender = json.loads(bytes(np.asarray(pipe.recv_tensor())))
                        row["profile"] = {"send": sender, "recv": prof.per_message_us()}
                        _print_profile(row, times)
    if "raw-copy" in _rows_wanted(args, device):
        rows += _raw_copy_rows(args, device)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Send (and start the receiver), or receive; see the module docstring."""
    p = build_parser()
    args = p.parse_args(argv)
    if "kv" in args.modes:
        try:
            for size in args.sizes:
                _tokens(size, args)
        except harness.BenchError as e:
            p.exit(2, f"{p.prog}: {e}\n")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.4")  # two processes may share one GPU
    if args.platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    local = jax.local_devices()
    if args.role == "recv":
        device = local[1] if len(local) > 1 and local[0].platform == "gpu" else local[0]
        print(
            f"KV pipes between two processes, {device.device_kind}: sender on device 0, receiver on "
            f"{device} ({'another GPU' if device is not local[0] else 'the same device'})\n"
            f"{'pipe':>9} {'mode':>6} {'size':>9} {'best':>13} {'bandwidth':>14}",
            flush=True,
        )
        rows = _receiver(args, device)
        given = sys.argv[1:] if argv is None else list(argv)
        given = given[: given.index("--role")] if "--role" in given else given  # the sender's own arguments
        meta = harness.metadata(PROG, given, [device], processes=2, kv_layers=args.kv_layers, kv_heads=args.kv_heads)
        meta.update(head_dim=args.head_dim, repeats=args.repeats, same_device=device is local[0])
        return harness.finish(rows, meta, args.json, prog=PROG)
    args.port = _free_port()
    cmd = [sys.executable, "-m", "spmd.bench.kv_ipc", *(sys.argv[1:] if argv is None else argv)]
    child = subprocess.Popen([*cmd, "--role", "recv", "--port", str(args.port)])
    try:
        _sender(args, local[0])
        return child.wait(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()


if __name__ == "__main__":
    sys.exit(main())
