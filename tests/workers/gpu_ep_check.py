"""The low-latency EP manager's GPU kernel, checked bit for bit on NVIDIA GPUs (prints PASS / FAIL lines).

Usage (from the repository root)::

    python tests/workers/gpu_ep_check.py --mode single         # one process, every local GPU an EP rank (1 GPU: ep 1)
    python tests/workers/gpu_ep_check.py --mode mp             # two processes sharing GPU 0 (CUDA IPC peer buffers)
    python tests/workers/gpu_ep_check.py --mode mp --gpus 0,1  # process i on GPU i

Each run, on a mesh ``("ep",)``: peer buffers from ``allocate_low_latency_buffers`` (one process:
JAX arrays; several: ``cuMemAlloc`` + CUDA IPC), the manager forced onto its kernel
(``wire="peer"``: ineligibility raises instead of falling back), and

1. the compiled program holds Mosaic GPU calls and no XLA all-to-all;
2. three dispatch + combine calls on fresh small-integer tokens with power-of-two weights, bf16
   and fp8 dispatch (exact in both), experts scaling by ``global expert + 1``, routing with two
   experts of one token on one rank, compared bit for bit with numpy; with ``--mode single``
   and 2+ GPUs also with the naive manager's result in the same process;
3. ``--stress`` calls (default 10,000) with a different number of routed tokens per rank each call
   (0 to ``max_tokens``), generated on the device and checked there against a closed form;
   the count of wrong elements must be 0 and the run must not hang (the kernel traps after 20 s);
   PARTIAL: no wrong element, but fewer calls than asked fitted in ``--stress-seconds``.

Exit status: 0 all passed, 1 a check failed, 3 setup failed (not a verdict on the kernel), 4 timed out.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository (this file: tests/workers/)
PASS, FAIL, SETUP_FAILED, TIMED_OUT = 0, 1, 3, 4
M, H, K = 64, 512, 2  # max tokens per rank, hidden, top-k


def _checks(jax, mesh, label: str, args) -> bool:
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from spmd.expert_parallel import LowLatencyAll2AllManager, NaiveAll2AllManager, allocate_low_latency_buffers

    ep = int(mesh.shape["ep"])
    e = 4 * ep
    e_local = e // ep
    spec = P("ep")
    sharding = NamedSharding(mesh, spec)
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    ok = True

    def manager(fp8):
        if args.cpu_dry_run:  # the script's own logic on CPU: the all_to_all form, no kernel
            return LowLatencyAll2AllManager(e, max_tokens=M, use_fp8=fp8, wire="all_to_all", tp_axis=None)
        bufs = allocate_low_latency_buffers(mesh, max_tokens=M, hidden=H, top_k=K, use_fp8=fp8, timeout_s=60)
        return LowLatencyAll2AllManager(
            e, max_tokens=M, use_fp8=fp8, buffers=bufs, wire="peer", tp_axis=None, combine_form=args.combine_form
        )

    def scaled(m):
        def body(x, w, ids):
            inputs, state = m.dispatch(x, w, ids)
            ex = inputs.tokens.astype(jnp.float32)
            first = jax.lax.axis_index("ep") * e_local
            if inputs.is_ragged:
                ends = jnp.cumsum(inputs.group_sizes)
                local = jnp.sum(jnp.arange(ex.shape[0])[:, None] >= ends[None, :], axis=1)
                ex = ex * (first + local + 1).astype(jnp.float32)[:, None]
            else:
                ex = ex * (first + jnp.arange(e_local) + 1).astype(jnp.float32)[:, None, None]
            return m.combine(inputs.with_tokens(ex.astype(x.dtype)), state)

        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False))

    def put(a):
        return jax.make_array_from_single_device_arrays(
            a.shape, sharding, [jax.device_put(a[i * M : (i + 1) * M], mesh.devices.flat[i]) for i in mine]
        )

    def local(y):
        return np.concatenate(
            [np.asarray(s.data) for s in sorted(y.addressable_shards, key=lambda s: s.index[0].start)]
        )

    for fp8 in [d == "fp8" for d in args.dtypes.split(",")]:
        name = f"{label} {'fp8' if fp8 else 'bf16'} dispatch"
        try:
            _step(f"{name}: allocating the peer buffers and building the manager")
            m = manager(fp8)
            f = scaled(m)
            structs = [jax.ShapeDtypeStruct((ep * M, H), jnp.bfloat16, sharding=sharding),
                       jax.ShapeDtypeStruct((ep * M, K), jnp.float32, sharding=sharding),
                       jax.ShapeDtypeStruct((ep * M, K), jnp.int32, sharding=sharding)]  # fmt: skip
            text = f.lower(*structs).as_text()
            path_ok = ("mosaic_gpu" in text and "all_to_all" not in text) or args.cpu_dry_run
            print(f"{'PASS' if path_ok else 'FAIL'} {name}: the program has the Mosaic GPU kernel and no all_to_all")
            ok &= path_ok
            _step(f"{name}: compiling (XLA + Mosaic GPU + ptxas)")
            f.lower(*structs).compile()
            _step(f"{name}: compiled")
        except Exception as e:
            print(f"FAIL {name}: building: {type(e).__name__}: {str(e)[:1500]}", flush=True)
            traceback.print_exc()
            return False
        for trial in range(args.calls):
            rng = np.random.default_rng([trial, int(fp8)])
            x = rng.integers(-6, 7, (ep * M, H)).astype(ml_dtypes.bfloat16)
            r = rng.integers(0, ep, ep * M)  # half the tokens: both experts on one rank
            ids = np.stack([rng.choice(e, K, replace=False) for _ in range(ep * M)]).astype(np.int32)
            same = rng.random(ep * M) < 0.5
            ids[same] = np.stack([r[same] * e_local, r[same] * e_local + 1], axis=1)
            n_tokens = [int(rng.integers(0, M + 1)) for _ in range(ep)]
            for q in range(ep):
                ids[q * M + n_tokens[q] : (q + 1) * M] = -1  # a varying number of routed tokens per rank
            w = rng.choice([0.25, 0.5, 1.0], (ep * M, K)).astype(np.float32)
            valid = ids >= 0
            want = ((w * valid * (np.where(valid, ids, 0) + 1))[:, :, None] * x.astype(np.float32)[:, None, :]).sum(1)
            want = want.astype(ml_dtypes.bfloat16)
            t0 = time.perf_counter()
            try:
                _step(f"{name} call {trial}: launching (tokens per rank {n_tokens}); a hang here is the kernel")
                y = local(jax.block_until_ready(f(put(x), put(w), put(ids))))
                _step(f"{name} call {trial}: returned")
            except Exception as e:
                print(f"FAIL {name} call {trial}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                return False
            dt = (time.perf_counter() - t0) * 1e3
            ref = np.concatenate([want[i * M : (i + 1) * M] for i in mine])
            bad = int(np.count_nonzero(y.view(np.uint16) != ref.view(np.uint16)))
            ok &= bad == 0
            print(f"{'PASS' if bad == 0 else 'FAIL'} {name} call {trial}: {bad} of {ref.size} elements differ from "
                  f"numpy (tokens per rank {n_tokens}); {dt:.1f} ms with the transfers", flush=True)  # fmt: skip
            if args.mode == "single" and ep > 1 and not fp8:
                yn = local(scaled(NaiveAll2AllManager(e, tp_axis=None))(put(x), put(w), put(ids)))
                bad = int(np.count_nonzero(y.view(np.uint16) != yn.view(np.uint16)))
                ok &= bad == 0
                print(f"{'PASS' if bad == 0 else 'FAIL'} {name} call {trial}: {bad} elements differ from naive's")
        if args.stress > 0:
            ok &= _stress(jax, mesh, m, name, args, e, e_local, local)
    return ok


_T0 = time.monotonic()


def _step(what: str) -> None:
    """A progress line (``STEP +seconds what``), flushed, so a hang shows where it stopped."""
    print(f"STEP +{time.monotonic() - _T0:.1f}s {what}", flush=True)


def _stress(jax, mesh, m, name, args, e, e_local, local) -> bool:
    """``args.stress`` calls in jitted chunks; each call's routing from its index, checked on the device."""
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    def per_device(start):
        rank = jax.lax.axis_index("ep")
        t = jnp.arange(M)[:, None]

        def body(i, bad):
            i = i + start[0]
            x = ((t * 3 + jnp.arange(H)[None, :] + i + rank) % 13 - 6).astype(jnp.bfloat16)
            a = (jnp.arange(M) * 5 + i * 7 + rank) % e
            ids = jnp.stack([a, (a + 1 + i % (e - 1)) % e], axis=1).astype(jnp.int32)
            n = (i * 37 + rank * 11) % (M + 1)  # routed tokens on this rank this call: 0 .. M
            ids = jnp.where(t < n, ids, -1)
            w = jnp.broadcast_to(jnp.array([0.5, 0.25], jnp.float32), (M, 2))
            inputs, state = m.dispatch(x, w, ids)
            ends = jnp.cumsum(inputs.group_sizes)
            loc = jnp.sum(jnp.arange(inputs.tokens.shape[0])[:, None] >= ends[None, :], axis=1)
            ex = inputs.tokens.astype(jnp.float32) * (rank * e_local + loc + 1).astype(jnp.float32)[:, None]
            y = m.combine(inputs.with_tokens(ex.astype(jnp.bfloat16)), state)
            v = ids >= 0
            want = (jnp.where(v, w * (ids + 1), 0.0).sum(1)[:, None] * x.astype(jnp.float32)).astype(jnp.bfloat16)
            return bad + jnp.sum(y != want).astype(jnp.int32)

        return jax.lax.fori_loop(0, args.chunk, body, jnp.zeros((), jnp.int32))[None]

    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P("ep"), check_vma=False))
    done, bad, t0 = 0, 0, time.perf_counter()
    try:
        while done < args.stress and time.perf_counter() - t0 < args.stress_seconds:
            out = f(np.array([done], np.int32))
            bad += int(local(out).sum())
            done += args.chunk
    except Exception as ex:
        print(f"FAIL {name} stress after {done} calls: {type(ex).__name__}: {str(ex)[:1500]}", flush=True)
        return False
    dt = time.perf_counter() - t0
    word = "FAIL" if bad else ("PASS" if done >= args.stress else "PARTIAL")
    print(f"{word} {name} stress: {done} of {args.stress} dispatch+combine calls (routed tokens 0..{M} per rank, "
          f"varying), {bad} wrong elements on this process's ranks, {dt:.1f} s"
          + ("" if done >= args.stress else f" (stopped at the {args.stress_seconds:g} s budget; two processes "
             "sharing one GPU time-slice it, so each call may wait for a context switch)"), flush=True)  # fmt: skip
    return bad == 0 and done > 0


def main_single(args) -> int:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = [d for d in jax.devices() if d.platform == ("cpu" if args.cpu_dry_run else "gpu")]
    if not devices:
        print("SETUP FAILED: no GPU")
        return SETUP_FAILED
    devices = devices[: args.max_ep]
    print(f"SETUP OK one process, {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    ok = _checks(jax, Mesh(np.array(devices), ("ep",)), f"single ep={len(devices)}", args)
    return PASS if ok else FAIL


def main_kernel(args) -> int:
    """The bare exchange kernel on one GPU (ep = 1, ``--chunks`` blocks, no manager): recv must equal send."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels import symmetric_memory
    from kernels.expert_parallel import ExchangeLayout, exchange_rows_peer, symmetric_layout

    devices = [d for d in jax.devices() if d.platform == "gpu"][:1]
    if not devices:
        print("SETUP FAILED: no GPU")
        return SETUP_FAILED
    mesh = Mesh(np.array(devices), ("ep",))
    lay = ExchangeLayout(1, args.tokens, 4, args.chunks)
    print(f"SETUP OK bare kernel, {lay}, jax {jax.__version__}", flush=True)
    _step("allocating the peer buffer")
    bufs = symmetric_memory.allocate(mesh, "ep", symmetric_layout(lay.end, 1))

    def f(send, counts):
        r, c = exchange_rows_peer(send[0], counts[0], bufs.peer_table("ep"), layout=lay)
        return r[None], c[None]

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("ep"),) * 2, out_specs=(P("ep"),) * 2, check_vma=False))
    sh = NamedSharding(mesh, P("ep"))
    ok = True
    for call in range(args.calls):
        send = np.random.default_rng(call).integers(0, 2**32, (1, 1, lay.max_rows, 4), dtype=np.uint32)
        n = (call % lay.max_rows) + 1
        _step(f"bare kernel call {call}: launching ({n} of {lay.max_rows} rows, {lay.blocks} blocks)")
        recv, cnt = jax.block_until_ready(g(jax.device_put(send, sh), jax.device_put(np.array([[n]], np.int32), sh)))
        _step(f"bare kernel call {call}: returned")
        recv, cnt = np.asarray(recv), np.asarray(cnt)
        good = int(cnt[0, 0]) == n and np.array_equal(recv[0, 0, :n], send[0, 0, :n])
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} bare kernel call {call}: count {int(cnt[0, 0])} (want {n}), "
              f"rows {'equal' if good else 'differ'}", flush=True)  # fmt: skip
    return PASS if ok else FAIL


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_parent(args) -> int:
    gpus = args.gpus.split(",")
    port = _free_port()
    procs, outs = [], []
    for pid, gpu in enumerate(gpus):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, XLA_PYTHON_CLIENT_MEM_FRACTION="0.3",
                   XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")  # fmt: skip
        env.pop("JAX_PLATFORMS", None)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_shard_autotuning=false".strip()
        cmd = [sys.executable, __file__, "--mode", "worker", "--worker", str(pid), "--port", str(port),
               "--nproc", str(len(gpus)), "--stress", str(args.stress), "--chunk", str(args.chunk),
               "--stress-seconds", str(args.stress_seconds), "--calls", str(args.calls), "--dtypes", args.dtypes,
            "--tokens", str(args.tokens), "--hidden", str(args.hidden),
            "--combine-form", args.combine_form]  # fmt: skip
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []

        def pump(p=p, tag=f"p{pid}", lines=lines):
            for line in p.stdout:
                lines.append(line.rstrip("\n"))
                print(f"[{tag}] {line}", end="", flush=True)

        threading.Thread(target=pump, daemon=True).start()
        procs.append(p)
        outs.append(lines)
    deadline = time.monotonic() + args.timeout
    status = []
    for pid, p in enumerate(procs):
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"TIMED OUT: process {pid} still running after {args.timeout:g} s: killing it", flush=True)
            p.kill()
            p.wait(10)
            status.append(TIMED_OUT)
            continue
        said = [int(line.split()[1]) for line in outs[pid] if line.startswith("STATUS ")]
        status.append(said[-1] if said else SETUP_FAILED)
    final = SETUP_FAILED if SETUP_FAILED in status else max(status)
    word = {PASS: "PASS", FAIL: "FAIL", SETUP_FAILED: "SETUP FAILED", TIMED_OUT: "TIMED OUT"}[final]
    print(f"{word}: two-process low-latency EP on GPUs {gpus}: statuses {status}", flush=True)
    return final


def main_worker(args) -> int:
    import spmd

    try:
        spmd.init_distributed_environment(f"127.0.0.1:{args.port}", args.nproc, args.worker, local_device_ids=[0],
                                          timeout_s=60)  # fmt: skip
        import jax
        import numpy as np
        from jax.sharding import Mesh

        devices = jax.devices()
    except Exception as e:
        print(f"SETUP FAILED: jax.distributed: {type(e).__name__}: {e}", flush=True)
        return SETUP_FAILED
    print(f"SETUP OK process {jax.process_index()} of {jax.process_count()}, devices {devices}", flush=True)
    try:
        ok = _checks(jax, Mesh(np.array(devices), ("ep",)), f"mp ep={len(devices)}", args)
    except Exception as e:
        print(f"FAIL: {type(e).__name__}: {str(e)[:1500]}", flush=True)
        traceback.print_exc()
        return FAIL
    return PASS if ok else FAIL


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("single", "mp", "worker", "kernel"), default="single")
    p.add_argument("--gpus", default="0,0", help="--mode mp: the GPU of each process")
    p.add_argument("--max-ep", type=int, default=8, help="--mode single: at most this many GPUs")
    p.add_argument("--stress", type=int, default=10_000, help="stress calls")
    p.add_argument("--chunk", type=int, default=1000, help="stress calls per jitted call")
    p.add_argument("--stress-seconds", type=float, default=60.0, help="stop the stress after this long (FAIL)")
    p.add_argument("--timeout", type=float, default=170.0, help="--mode mp: kill the workers after this long")
    p.add_argument("--chunks", type=int, default=1, help="--mode kernel: thread blocks")
    p.add_argument("--combine-form", choices=("push", "pull"), default="push", help="the kernel's combine form")
    p.add_argument("--calls", type=int, default=3, help="checked dispatch+combine calls per dtype")
    p.add_argument("--dtypes", default="bf16,fp8", help="dispatch dtypes: bf16, fp8 or both (comma-separated)")
    p.add_argument("--tokens", type=int, default=64, help="max tokens per rank (M)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (H, a multiple of 4)")
    p.add_argument(
        "--spin-seconds",
        type=float,
        default=None,
        help="the kernel's spin bound ($SPMD_EP_SPIN_TIMEOUT_NS): a lost flag traps after this long",
    )
    p.add_argument("--cpu-dry-run", action="store_true", help="--mode single on CPU devices, all_to_all wire")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if any(d not in ("bf16", "fp8") for d in args.dtypes.split(",")):
        p.error(f"--dtypes: expected bf16, fp8 or bf16,fp8, got {args.dtypes!r}")
    if args.tokens < 1 or args.hidden < 4 or args.hidden % 4:
        p.error(f"--tokens must be >= 1 and --hidden a positive multiple of 4, got {args.tokens}, {args.hidden}")
    global M, H
    M, H = args.tokens, args.hidden
    if args.spin_seconds is not None:  # before JAX traces the kernel; the workers inherit it
        os.environ["SPMD_EP_SPIN_TIMEOUT_NS"] = str(max(1, int(args.spin_seconds * 1e9)))
    sys.path.insert(0, str(ROOT))
    if args.mode == "mp":
        return main_parent(args)
    mains = {"single": main_single, "worker": main_worker, "kernel": main_kernel}
    code = mains[args.mode](args)
    print(f"STATUS {code}", flush=True)
    if args.mode == "worker":
        try:
            import jax

            jax.distributed.shutdown()
        except Exception as e:
            print(f"(jax.distributed.shutdown: {type(e).__name__}: {e})", flush=True)
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
