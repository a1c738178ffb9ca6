"""KV-pipe throughput on loopback: GB/s against message size, with two TCP baselines in the same run.

    python -m spmd.bench.kv_transfer                       # 1 MiB .. 1 GiB, every transport
    python -m spmd.bench.kv_transfer --sizes 64MiB --transports naive,raw,tcp

Transports (one sender thread, the receiver in the main thread, one connection each):

* ``naive``: the seed's design: ``tobytes()``, a text header, ``sendall(header + b"\\n" + bytes)``;
  the receiver appends ``recv`` chunks to a list and ``b"".join``\\ s them;
* ``raw``: a bare socket: ``sendall`` of a memoryview, ``recv_into`` one preallocated buffer
  (the TCP ceiling: no framing, no allocation per message);
* ``tcp``: :class:`spmd.kv_transfer.TCPKVPipe` (framing, validation, a fresh buffer per message);
* ``transfer_server``: :class:`spmd.kv_transfer.TransferServerKVPipe` between two devices of this
  process (``jax.experimental.transfer`` over loopback), timed until the pulled array is ready.

Every row checks the received array against the sent one. ``ratio_naive`` and ``ratio_raw`` are
this row's GB/s over the naive and raw rows of the same size. Uses :mod:`spmd.bench.harness`
(its Python-level timing path: the trial's loop is a plain function).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spmd.bench import harness
from spmd.net import free_port

__all__ = ["main"]

TRANSPORTS = ("naive", "raw", "tcp", "transfer_server")
DEFAULT_SIZES = "1MiB,4MiB,16MiB,64MiB,256MiB,1GiB"


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (listener, then client)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        cli = socket.create_connection(lst.getsockname(), timeout=30)
        srv, _ = lst.accept()
    for s in (srv, cli):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(60)
    return srv, cli


class _Naive:
    """The seed's TCP example, completed the obvious way (header line, then chunks joined)."""

    def __init__(self) -> None:
        self.rx, self.tx = _socket_pair()

    def send(self, x: np.ndarray) -> None:
        data = x.tobytes()
        header = f"{list(x.shape)}:{x.dtype}:{len(data)}".encode()
        self.tx.sendall(header + b"\n" + data)

    def recv(self) -> np.ndarray:
        chunks, first = [], self.rx.recv(65536)
        while b"\n" not in first:
            first += self.rx.recv(65536)
        header, rest = first.split(b"\n", 1)
        shape_s, dtype_s, n_s = header.decode().rsplit(":", 2)
        n = int(n_s)
        chunks.append(rest)
        got = len(rest)
        while got < n:
            c = self.rx.recv(min(65536 * 16, n - got))
            if not c:
                raise ConnectionError("naive: peer closed")
            chunks.append(c)
            got += len(c)
        shape = [int(v) for v in shape_s.strip("[]").split(",") if v.strip()]
        return np.frombuffer(b"".join(chunks), np.dtype(dtype_s)).reshape(shape)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


class _Raw:
    """The ceiling: a length prefix, a memoryview sent, one reused buffer filled with recv_into."""

    def __init__(self, template: np.ndarray) -> None:
        self.rx, self.tx = _socket_pair()
        self.buf = np.empty_like(template)
        self.view = memoryview(self.buf.reshape(-1).view(np.uint8))

    def send(self, x: np.ndarray) -> None:
        self.tx.sendall(struct.pack("!Q", x.nbytes))
        self.tx.sendall(memoryview(x.reshape(-1).view(np.uint8)))

    def recv(self) -> np.ndarray:
        (n,) = struct.unpack("!Q", self.rx.recv(8, socket.MSG_WAITALL))
        got = 0
        while got < n:
            k = self.rx.recv_into(self.view[got:n])
            if not k:
                raise ConnectionError("raw: peer closed")
            got += k
        return self.buf

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def _pair_of(cls: Callable[..., Any], **kw: Any) -> tuple[Any, Any]:
    port = free_port()
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("s", cls("127.0.0.1", port, role="server", **kw)))
    t.start()
    c = cls("127.0.0.1", port, role="client", **kw)
    t.join()
    return box["s"], c


class _Pipe:
    """A KV pipe pair as one transport: ``send`` on the client, ``recv`` on the server."""

    def __init__(self, kind: str) -> None:
        import jax

        from spmd.kv_transfer import TCPKVPipe, TransferServerKVPipe

        if kind == "tcp":
            self.rx, self.tx = _pair_of(TCPKVPipe, timeout_s=60)
        else:
            devs = jax.devices()
            if len(devs) < 2:
                raise harness.BenchError("transfer_server needs two devices (use --cpu-devices 2 or more).")
            port = free_port()
            box: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: box.setdefault(
                    "s", TransferServerKVPipe("127.0.0.1", port, timeout_s=60, devices=devs[:1])
                )
            )
            t.start()
            self.tx = TransferServerKVPipe("127.0.0.1", port, role="client", timeout_s=60, devices=devs[1:2])
            t.join()
            self.rx = box["s"]

    def send(self, x: Any) -> None:
        self.tx.send_tensor(x)

    def recv(self) -> Any:
        import jax

        return jax.block_until_ready(self.rx.recv_tensor())

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


def _trial(transport: Any, x: Any, calls: int, nbytes: int) -> harness.Trial:
    def run(n: int) -> Any:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                for _ in range(n):
                    transport.send(x)
            except BaseException as e:  # reported by the receiving side
                errors.append(e)

        t = threading.Thread(target=sender)
        t.start()
        out = None
        for _ in range(n):
            out = transport.recv()
        t.join()
        if errors:
            raise errors[0]
        return out

    def check(out: Any) -> dict[str, Any]:
        return {"ok": bool(np.array_equal(np.asarray(out), np.asarray(x)))}

    return harness.Trial(
        once=lambda: run(1),
        check=check,
        loop=lambda: run(calls),
        args=(),
        calls=calls,
        extra={"bytes_moved": nbytes},
    )


def _cases(transports: Sequence[str], sizes: Sequence[int], budget_bytes: int, opened: list) -> list[harness.Case]:
    cases = []
    for size in sizes:
        calls = max(1, min(64, budget_bytes // size))
        for kind in transports:

            def build(kind: str = kind, size: int = size, calls: int = calls) -> harness.Trial:
                import jax

                rng = np.random.default_rng(size)
                x = rng.integers(0, 255, size, dtype=np.uint8)
                if kind == "naive":
                    transport: Any = _Naive()
                elif kind == "raw":
                    transport = _Raw(x)
                else:
                    transport = _Pipe(kind)
                    if kind == "transfer_server":
                        x = jax.device_put(x, jax.devices()[1])
                opened.append(transport)
                return _trial(transport, x, calls, size)

            cases.append(harness.Case(key={"transport": kind, "size": harness.format_size(size)}, build=build))
    return cases


def _derive(row: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    for base in ("naive", "raw"):
        ref = [r for r in earlier if r.get("transport") == base and r.get("size") == row["size"] and "GBps" in r]
        if ref and row["transport"] != base:
            row[f"ratio_{base}"] = row["GBps"] / ref[-1]["GBps"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m spmd.bench.kv_transfer", description=__doc__, formatter_class=harness.HelpFormatter
    )
    p.add_argument(
        "--sizes",
        type=lambda t: harness.parse_list(t, harness.parse_size, what="sizes"),
        default=harness.parse_list(DEFAULT_SIZES, harness.parse_size, what="sizes"),
        help=f"message sizes (default {DEFAULT_SIZES})",
    )
    p.add_argument(
        "--transports",
        type=lambda t: harness.parse_list(t, str, what="transports"),
        default=list(TRANSPORTS),
        help=f"which of {','.join(TRANSPORTS)} (default: all; naive and raw first, as baselines)",
    )
    p.add_argument(
        "--bytes-per-row",
        type=harness.parse_size,
        default=harness.parse_size("1GiB"),
        help="bytes moved per timed run of a row (messages = this / size, 1..64)",
    )
    p.add_argument("--repeats", type=harness.positive_int, default=5, help="timed runs per row; the best is kept")
    p.add_argument("--json", default="kv_transfer.json", help="where to write the results")
    p.add_argument("--cpu-devices", type=harness.positive_int, default=2, help="CPU devices to simulate (on CPU)")
    args = p.parse_args(argv)
    bad = [t for t in args.transports if t not in TRANSPORTS]
    if bad:
        p.error(f"unknown transports {bad}; expected some of {list(TRANSPORTS)}")
    devices = harness.start_devices("cpu", args.cpu_devices)
    order = [t for t in TRANSPORTS if t in args.transports]
    opened: list = []
    columns = [
        harness.Column("transport", "transport", 16),
        harness.Column("size", "size", 9),
        harness.Column("GBps", "GB/s", 8, ".2f"),
        harness.Column("ratio_naive", "x naive", 8, ".2f"),
        harness.Column("ratio_raw", "x raw", 7, ".2f"),
        harness.Column("ok", "check", 6),
    ]
    try:
        rows = harness.run_cases(
            _cases(order, args.sizes, args.bytes_per_row, opened),
            columns,
            devices=devices,
            repeats=args.repeats,
            derive=_derive,
        )
    finally:
        for t in opened:
            t.close()
    meta = harness.metadata("python -m spmd.bench.kv_transfer", argv, devices, link="loopback TCP")
    return harness.finish(rows, meta, args.json, prog="spmd.bench.kv_transfer")


if __name__ == "__main__":
    sys.exit(main())
