"""The custom all-reduce across two processes (CUDA IPC peer buffers), checked bit for bit on a GPU.

Usage (from the repository root, on a machine with an NVIDIA GPU)::

    python tests/workers/gpu_mp_all_reduce.py                  # both processes on GPU 0 (one H200 is enough)
    python tests/workers/gpu_mp_all_reduce.py --gpus 0,1       # process i on GPU i (two GPUs)
    python tests/workers/gpu_mp_all_reduce.py --two-shot --stress 10000 --stress-budget 60   # + the GPU two-shot

It starts the two worker processes itself (``--worker``; each sees one GPU through
``CUDA_VISIBLE_DEVICES``, with ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.3`` and
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so two fit on one card, and
``--xla_gpu_shard_autotuning=false`` added to ``XLA_FLAGS``: each process's program holds its
own peer addresses, and XLA's sharded autotuning, which expects the same program in every
process, hung the first compilation without it), streams their output prefixed ``[p0]`` /
``[p1]`` and returns the combined status:

    0  every check passed
    1  a wrong result, a failed call, or dispatch did not take the custom kernel
    3  SETUP FAILED: jax.distributed or the GPU client refused this layout (two processes on one
       GPU, NCCL needed and refusing two ranks on one device, ...): not a verdict on the kernel
    4  a process did not finish within --timeout (it is killed)

Each worker joins ``jax.distributed`` (coordinator on a free local port), then:

1. builds the 2-device global mesh ``("tp",)``, calls ``kernels.symmetric_memory.allocate``
   (each process allocates its buffer with cuMemAlloc and opens the other's through CUDA IPC)
   and runs ``spmd.communicators.custom_all_reduce(x, "tp", buffers=...)`` under
   ``jax.jit(jax.shard_map(..., check_vma=False))``;
2. the library's public path: ``spmd.initialize_model_parallel(2)`` (which allocates the groups'
   buffers the same way) and ``spmd.tensor_model_parallel_all_reduce`` under ``spmd.shard_map``;

for bf16 messages of 4 KiB, 64 KiB and 1 MiB per rank, ``--repeats`` calls each with fresh
per-rank random data, compared bit for bit with numpy's float32 sum in rank order cast to bf16;
with ``--two-shot``, also the GPU two-shot (``algorithm="two_shot"``) at uneven sizes (not whole
tiles, not whole blocks: 6 KiB + 16 B, 262 KiB + 16 B, 1 MiB, 2 MiB - 16 B) the same way; and with
``--stress N``, N two-shot calls (two uneven sizes, pull and ll one-shots between them: epochs mix)
chained in jitted loops of integer-valued float32 data, every result checked on the device
(exact sums), in chunks until N calls or ``--stress-budget`` seconds (process 0 decides after each
chunk and tells process 1 through the coordination service: both always run the same calls).
It prints which path dispatch took (the custom kernel or psum, and the protocol); psum is a
failure here and is not run (with two processes on one GPU NCCL would refuse it). Every wait is
bounded: joining 60 s, the handle exchange 60 s, the kernel traps after 20 s by itself, and the
parent kills what is still running after ``--timeout``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository (this file: tests/workers/)
SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20}
TWO_SHOT_SIZES = {
    "6KiB+16B": (6 << 10) + 16,
    "262KiB+16B": (262 << 10) + 16,
    "1MiB": 1 << 20,
    "2MiB-16B": (2 << 20) - 16,
}
# One stress step: (float32 elements, algorithm); the two-shot sizes are uneven (tiles, blocks), and
# one-shots of both protocols sit between them (1 MiB: pull, which shares the staging slots and flags;
# 8 KiB: ll), so every kind of epoch step mixes with the two-shot's two per call.
STRESS_STEP = ((3000, "two_shot"), (262144, "one_shot"), (65540, "two_shot"), (2048, "one_shot"))
PASS, FAIL, SETUP_FAILED, TIMED_OUT = 0, 1, 3, 4


# ---------------------------------------------------------------------------------------------
# Parent: start both workers, stream their output, combine their status


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(proc: subprocess.Popen, tag: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print(f"[{tag}] {line}", end="", flush=True)


def main_parent(args: argparse.Namespace) -> int:
    gpus = args.gpus.split(",")
    if len(gpus) != 2:
        print(f"SETUP FAILED: --gpus expects two GPU indices (one per process), got {args.gpus!r}", flush=True)
        return SETUP_FAILED
    port = _free_port()
    procs, outputs, readers = [], [], []
    for pid, gpu in enumerate(gpus):
        env = dict(os.environ)
        env.update(
            CUDA_VISIBLE_DEVICES=gpu,
            XLA_PYTHON_CLIENT_MEM_FRACTION="0.3",
            XLA_PYTHON_CLIENT_PREALLOCATE="false",
            PYTHONUNBUFFERED="1",
        )
        env.pop("JAX_PLATFORMS", None)
        if not args.leave_shard_autotuning:  # each process's program differs (its addresses): see the docstring
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_shard_autotuning=false".strip()
        cmd = [sys.executable, __file__, "--worker", str(pid), "--port", str(port), "--repeats", str(args.repeats),
               "--stack-after", str(args.stack_after), "--stress", str(args.stress),
               "--stress-budget", str(args.stress_budget)] + (["--two-shot"] if args.two_shot else [])  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=_stream, args=(proc, f"p{pid}", lines), daemon=True)
        reader.start()
        procs.append(proc)
        outputs.append(lines)
        readers.append(reader)
    deadline = time.monotonic() + args.timeout
    codes = []
    for pid, proc in enumerate(procs):
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"process {pid} still running after {args.timeout:g} s: killing it", flush=True)
            proc.kill()
            proc.wait(10)
        codes.append(proc.returncode)
    for reader in readers:
        reader.join(5)
    status = []
    for pid, lines in enumerate(outputs):
        said = [line for line in lines if line.startswith("STATUS ")]
        if said:  # what the worker concluded (its exit code may come from the runtime's shutdown)
            status.append(int(said[-1].split()[1]))
        elif not any(line.startswith("SETUP OK") for line in lines):
            status.append(TIMED_OUT if codes[pid] in (-9, None) else SETUP_FAILED)
        else:
            status.append(TIMED_OUT if codes[pid] in (-9, None) else FAIL)
    final = max(status) if SETUP_FAILED not in status else SETUP_FAILED
    word = {PASS: "PASS", FAIL: "FAIL", SETUP_FAILED: "SETUP FAILED", TIMED_OUT: "TIMED OUT"}[final]
    print(f"{word}: processes ended with status {status} (exit codes {codes}) on GPUs {gpus}", flush=True)
    return final


# ---------------------------------------------------------------------------------------------
# Worker: one process of the job


class SetupFailed(Exception):
    pass


def _setup(pid: int, port: int):
    import spmd

    try:
        spmd.init_distributed_environment(f"127.0.0.1:{port}", 2, pid, local_device_ids=[0], timeout_s=60)
        import jax

        devices = jax.devices()
    except Exception as e:
        raise SetupFailed(f"jax.distributed with 2 processes: {type(e).__name__}: {e}") from e
    if len(devices) != 2 or any(d.platform != "gpu" for d in devices):
        raise SetupFailed(f"expected 2 GPU devices in the job (one per process), got {devices}")
    print(f"SETUP OK process {jax.process_index()} of {jax.process_count()}, devices {devices}", flush=True)
    return jax, spmd


def _data(seed: int, rank: int, numel: int):
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng([seed, rank])
    return rng.standard_normal(numel).astype(np.float32).astype(ml_dtypes.bfloat16)


def _reference(seed: int, numel: int):
    import ml_dtypes
    import numpy as np

    total = np.zeros(numel, np.float32)
    for r in range(2):  # rank order, in float32, as the kernel sums
        total = total + _data(seed, r, numel).astype(np.float32)
    return total.astype(ml_dtypes.bfloat16)


def _path(text: str) -> str:
    if "mosaic_gpu" in text:
        return "custom kernel (Mosaic GPU custom call)"
    if "all-reduce" in text or "all_reduce" in text:
        return "psum (XLA all-reduce)"
    return "unknown (neither a Mosaic GPU call nor an all-reduce in the program)"


def _check(jax, label: str, fn, mesh, spec, rank: int, repeats: int, reason: str, sizes=SIZES, kernel=None) -> bool:
    """Run ``fn`` (per-device ``bf16[numel] -> bf16[numel]``) for every size; print one line per check.

    ``kernel``: ``"two_shot"`` when ``fn`` forces it (else the one-shot's protocol is the tuning row's).
    """
    import numpy as np
    from jax.sharding import NamedSharding

    from spmd.communicators import tuning

    ok = True
    f = jax.jit(jax.shard_map(lambda v: fn(v[0])[None], mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
    sharding = NamedSharding(mesh, spec)
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    entry = tuning.tuning_table().get(("gpu", 2))
    for name, nbytes in sizes.items():
        numel = nbytes // 2
        shape = (mesh.size, numel)  # row r: rank r's data (spec shards the rows over every mesh axis)
        proto = "ll" if entry is not None and nbytes <= entry.ll_max_bytes else "pull"
        proto = "two-shot" if kernel == "two_shot" else f"one-shot {proto} (tuning row)"
        print(f"{label} {name}: compiling", flush=True)
        try:
            x_struct = jax.ShapeDtypeStruct(shape, jax.numpy.bfloat16, sharding=sharding)
            path = _path(f.lower(x_struct).as_text())
        except Exception as e:
            print(f"FAIL {label} {name}: tracing failed: {type(e).__name__}: {e}", flush=True)
            ok = False
            continue
        if not path.startswith("custom kernel"):
            print(f"FAIL {label} {name}: dispatch took {path}; {reason}", flush=True)
            ok = False
            continue
        for k in range(repeats):
            seed = 1000 * k + nbytes
            local = _data(seed, rank, numel).reshape(1, numel)
            try:
                x = jax.make_array_from_single_device_arrays(shape, sharding, [jax.device_put(local, device)])
                t0 = time.perf_counter()
                out = np.asarray(f(x).addressable_data(0)).reshape(numel)
                dt = time.perf_counter() - t0
            except Exception as e:
                if "nccl" in str(e).lower():
                    raise SetupFailed(f"{label} {name}: the GPU client needed NCCL: {type(e).__name__}: {e}") from e
                print(f"FAIL {label} {name} call {k}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                ok = False
                break
            want = _reference(seed, numel)
            bad = int(np.count_nonzero(out.view(np.uint16) != want.view(np.uint16)))
            verdict = "PASS" if bad == 0 else "FAIL"
            ok &= bad == 0
            print(
                f"{verdict} {label} bf16 {name} call {k}: {bad} of {numel} elements differ from numpy's rank-order "
                f"sum; path: {path}, {proto}; {dt * 1e3:.1f} ms with the transfer",
                flush=True,
            )
    return ok


def _stress(jax, bufs, mesh, rank: int, total: int, budget_s: float) -> bool:
    """``total`` two-shot calls (:data:`STRESS_STEP`), chained on the device, every result checked there.

    Each call's input is ``iota % 1024 + step + rank + k`` in float32, so every element differs
    and every sum is an exact integer: a wrong chunk, unit or block, or stale data, shows.
    Process 0 decides after each chunk whether to go on (within ``budget_s``) and publishes it.
    """
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kernels import compat
    from spmd.communicators import custom_all_reduce

    n = mesh.size
    per_step = sum(a == "two_shot" for _, a in STRESS_STEP)

    def run(arg):
        start, count = arg[0, 0], arg[0, 1]
        me = jax.lax.axis_index("tp").astype(jnp.float32)

        def step(i, wrong):
            fi = (start + i).astype(jnp.float32)
            for k, (size, algorithm) in enumerate(STRESS_STEP):
                iota = (jnp.arange(size, dtype=jnp.int32) % 1024).astype(jnp.float32)
                y = custom_all_reduce(iota + fi + me + k, "tp", buffers=bufs, algorithm=algorithm)
                want = n * (iota + fi + k) + n * (n - 1) / 2
                wrong = wrong + jnp.sum(y != want).astype(jnp.int32)
            return wrong

        return jax.lax.fori_loop(0, count, step, jnp.int32(0))[None]

    f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
    sharding = NamedSharding(mesh, P("tp"))
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    client = compat.distributed_client()
    steps_total = -(-total // per_step)
    done, chunk, wrong, t0, k = 0, 50, 0, time.perf_counter(), 0
    while True:
        count = min(chunk, steps_total - done)
        arg = np.array([[done, count]], np.int32)
        x = jax.make_array_from_single_device_arrays((n, 2), sharding, [jax.device_put(arg, d) for d in local])
        try:
            if k == 0:  # compile first: the budget estimate must time the calls only
                t1 = time.perf_counter()
                f = f.lower(x).compile()
                print(f"stress: compiled in {time.perf_counter() - t1:.1f} s", flush=True)
            t1 = time.perf_counter()
            bad = int(np.asarray(f(x).addressable_data(0))[0])
        except Exception as e:
            print(
                f"FAIL stress: chunk {k} (steps {done}..{done + count}): {type(e).__name__}: {str(e)[:1500]}",
                flush=True,
            )
            return False
        dt = time.perf_counter() - t1
        done, wrong = done + count, wrong + bad
        print(f"stress: {done * per_step} two-shot calls, {bad} wrong elements in this chunk, {dt:.2f} s", flush=True)
        key = f"gpu_mp_all_reduce/stress/{k}"
        if rank == 0:  # go on while the next chunk (at 500 steps) fits in the budget
            go = done < steps_total and (time.perf_counter() - t0) + dt * 500 / count < budget_s
            client.key_value_set(key, "go" if go else "stop")
        else:
            go = client.blocking_key_value_get(key, 120_000) == "go"
        if not go:
            break
        k, chunk = k + 1, 500
    calls = done * per_step
    elapsed = time.perf_counter() - t0
    what = (f"{calls} two-shot calls at {STRESS_STEP[0][0] * 4} and {STRESS_STEP[2][0] * 4} bytes, one-shots (pull, "
            f"ll) between them, {elapsed:.1f} s ({elapsed / max(done, 1) * 1e3:.2f} ms a step of 4 calls)")  # fmt: skip
    if wrong:
        print(f"FAIL stress: {wrong} wrong elements in {what}", flush=True)
        return False
    if calls < total:
        print(f"PARTIAL stress: {what}, 0 wrong, stopped by the {budget_s:g} s budget before {total}", flush=True)
    else:
        print(f"PASS stress: {what}, 0 wrong elements, no hang", flush=True)
    return True


def main_worker(args: argparse.Namespace) -> int:
    try:
        jax, spmd = _setup(args.worker, args.port)
    except SetupFailed as e:
        print(f"SETUP FAILED: {e}", flush=True)
        return SETUP_FAILED
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from kernels import symmetric_memory
    from spmd.communicators import custom_all_reduce

    ok = True
    try:
        # 1. The mesh ("tp",), its buffers allocated directly, the kernel called with them.
        mesh = Mesh(np.array(jax.devices()), ("tp",))
        rank = [d.process_index for d in mesh.devices.flat].index(jax.process_index())
        t0 = time.perf_counter()
        try:
            bufs = symmetric_memory.allocate(mesh, "tp", timeout_s=60)
        except Exception as e:
            print(f"FAIL allocate: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            return FAIL
        print(
            f"allocate: {(time.perf_counter() - t0) * 1e3:.1f} ms; this process is rank {rank}; its table "
            f"{[hex(a) for a in bufs.addresses]} (entry {rank}: its own cuMemAlloc buffer, the other: its IPC "
            f"mapping of the peer's)",
            flush=True,
        )
        ok &= _check(
            jax, "direct", lambda v: custom_all_reduce(v, "tp", buffers=bufs), mesh, P("tp"), rank, args.repeats,
            "the buffers were passed explicitly",
        )  # fmt: skip
        if args.two_shot:
            two_shot = lambda v: custom_all_reduce(v, "tp", buffers=bufs, algorithm="two_shot")
            forced = "algorithm='two_shot' was forced"
            ok &= _check(jax, "two-shot", two_shot, mesh, P("tp"), rank, args.repeats, forced, sizes=TWO_SHOT_SIZES,
                         kernel="two_shot")  # fmt: skip
        if args.stress:
            ok &= _stress(jax, bufs, mesh, rank, args.stress, args.stress_budget)

        # 2. The public path: initialize_model_parallel allocates, the TP all-reduce dispatches.
        gmesh = spmd.initialize_model_parallel(2)
        comm = spmd.get_tp_group().device_communicator
        reason = (
            f"communicator {type(comm).__name__}, peer_buffers "
            f"{'set' if getattr(comm, 'peer_buffers', None) is not None else 'None'}, "
            f"symmetric_memory.unsupported(mesh) = {symmetric_memory.unsupported(gmesh)!r}"
        )
        print(f"public path: {reason}", flush=True)
        grank = [d.process_index for d in gmesh.devices.flat].index(jax.process_index())
        ok &= _check(
            jax, "public", spmd.tensor_model_parallel_all_reduce, gmesh, P(spmd.MESH_AXES), grank, args.repeats, reason
        )
    except SetupFailed as e:
        print(f"SETUP FAILED: {e}", flush=True)
        return SETUP_FAILED
    except Exception as e:
        print(f"FAIL: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        traceback.print_exc()
        return FAIL
    return PASS if ok else FAIL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="0,0", help="the GPU of each process (default: both on GPU 0)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per size, each with fresh data")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds before the parent kills the workers")
    parser.add_argument("--stack-after", type=float, default=120.0, help="a worker prints its stacks every N s")
    parser.add_argument(
        "--leave-shard-autotuning",
        action="store_true",
        help="do not add --xla_gpu_shard_autotuning=false to the workers' XLA_FLAGS (allocate must then refuse)",
    )
    parser.add_argument("--two-shot", action="store_true", help="also check the GPU two-shot at uneven sizes")
    parser.add_argument("--stress", type=int, default=0, help="two-shot calls to chain and check (default: none)")
    parser.add_argument("--stress-budget", type=float, default=60.0, help="seconds the stress may take at most")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        return main_parent(args)
    sys.path.insert(0, str(ROOT))
    faulthandler.dump_traceback_later(args.stack_after, repeat=True)  # where a stuck worker is stuck
    code = main_worker(args)
    faulthandler.cancel_dump_traceback_later()
    print(f"STATUS {code}", flush=True)
    try:  # leave the job together (bounded by the runtime's shutdown timeout and the parent's)
        import jax

        jax.distributed.shutdown()
    except Exception as e:
        print(f"(jax.distributed.shutdown: {type(e).__name__}: {e})", flush=True)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
