"""Disaggregated prefill end to end: a prefill worker sends the KV cache and first tokens, a decode worker continues.

    python -m models.disagg --pipe tcp --prefill-tp 2 --decode-tp 4 --check
    python -m models.disagg --pipe device_put --prefill-tp 4 --decode-tp 2 --check
    python -m models.disagg --pipe transfer --check --fail-transfer     # the recompute path

The command writes the random demo Llama of ``python -m models.generate`` (8 query heads, 2 KV
heads) in the Hugging Face layout to a temporary directory (or takes ``--checkpoint``) and starts
two workers (:mod:`models.disagg_worker`) that both load it with ``models.from_pretrained``, on
GPUs when JAX sees any (``--platform auto``; prefill on the first ``P`` GPUs, decode on the next
``D``, or both on the first GPUs when there are fewer than ``P + D``, each worker capped by
``XLA_PYTHON_CLIENT_MEM_FRACTION`` without preallocation), else on simulated CPU devices
(``--platform cpu``). Each worker prints its platform and devices:

* the prefill worker (TP ``P``) runs :func:`models.generation.prefill` (after a warm-up run that
  compiles) and sends, over one KV pipe (:mod:`spmd.kv_transfer`): the first new token of each
  sequence (``int32[batch]``), then the KV cache with ``send_kv_cache(keys + values, head_axis=1)``:
  per layer ``[batch, kv_heads, max_len, head_dim]`` with EACH KV HEAD ONCE (when ``P`` exceeds the
  KV heads, the model keeps one copy per rank; :func:`models.kv_layout.kv_layers_for_transfer` drops the replicas
  without a copy, the device-side :func:`spmd.kv_transfer.merge_kv_heads`);
* the decode worker (TP ``D``) compiles its decode step on an empty cache while it waits, receives
  the cache split by heads for ITS TP size (replicated when ``D`` exceeds the KV heads),
  rebuilds its model's cache from the per-device pieces (:func:`models.kv_layout.kv_cache_from_layers`) and
  continues with :func:`models.generation.decode_from`.

Pipes: ``tcp`` (:class:`~spmd.kv_transfer.TCPKVPipe`), ``transfer``
(:class:`~spmd.kv_transfer.TransferServerKVPipe`) and ``ipc`` (:class:`~spmd.kv_transfer.IpcKVPipe`,
shared memory on one host) join two independent processes (``P`` and ``D`` devices);
``device_put`` (:class:`~spmd.kv_transfer.DevicePutKVPipe`) needs one ``jax.distributed`` job,
so the command runs ``spmd-launch`` with two processes (rank 0 prefills, rank 1 decodes).
The decode worker listens; the pipes authenticate with a random secret written to a private file.

Two hosts: ``--decode-host ADDR`` is where the decode worker listens (and the prefill worker dials),
and ``--prefill-exec`` / ``--decode-exec`` run a worker under a command prefix, e.g. in two network
namespaces (``--decode-exec 'ip netns exec B' --prefill-exec 'ip netns exec A'``, docs/multi_host.md);
the checkpoint and the run directory must be at the same paths for both.

Failures (vLLM's ``recompute`` policy): every wait has a timeout (``--transfer-timeout``); when the
transfer fails (the prefill worker died, timed out or sent something else), the decode worker
reports why and recomputes the prefill itself, so the run still ends with the right tokens.
``--fail-transfer`` exercises that: the prefill worker sends the first tokens and dies (``tcp``,
``transfer``) or, on ``device_put``, where a process that dies ends the whole ``jax.distributed``
job, sends ``None`` in place of the cache. ``--corrupt-kv-head`` (a test hook) negates KV head 0 of
every received layer, which ``--check`` must catch.

``--check`` generates with the same weights in this process on one device of the workers' platform and exits 1 unless
the tokens are identical. The command prints the tokens and where the time went: prefill (the
prefill worker, with the first token), transfer (at the decode worker, from the first tokens' arrival
to the whole cache on its devices: bytes and rate; an untimed warm-up transfer of the same cache
first compiles both sides, and the report counts the compile steps inside the timed parts, which
must be 0), decode (per token). Exit codes: 0 ok, 1 the tokens differ, 2 bad arguments, an
unusable ``--checkpoint`` (one line) or a worker failed without tokens, 124 ``--timeout`` passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from models import disagg_worker
from models.cli import PLATFORMS, positive_int, seconds, token_ids

__all__ = ["build_parser", "main"]

PROG = "python -m models.disagg"
PIPES = ("tcp", "device_put", "transfer", "ipc")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pipe", choices=PIPES, default="tcp", help="the KV pipe between the workers (default tcp)")
    p.add_argument("--prefill-tp", type=positive_int, default=2, help="the prefill worker's TP size (default 2)")
    p.add_argument("--decode-tp", type=positive_int, default=2, help="the decode worker's TP size (default 2)")
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="auto",
        help="where the workers run: gpu, cpu (simulated devices) or auto (GPUs when there are any; default)",
    )
    p.add_argument("--checkpoint", help="a local Hugging Face LlamaForCausalLM directory (default: the random demo)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the tokens equal one-device generation")
    p.add_argument("--prompt", type=token_ids, action="append", help="token ids, comma-separated (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="new tokens per prompt (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling, prompt and random-weight seed (default 0)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype (default float32)"
    )
    p.add_argument(
        "--transfer-timeout", type=seconds, default=60.0, help="the longest any pipe wait may take (default 60 s)"
    )
    p.add_argument("--timeout", type=seconds, default=300.0, help="the whole run, workers included (default 300 s)")
    p.add_argument(
        "--fail-transfer",
        action="store_true",
        help="test hook: the prefill worker abandons the transfer; the decode worker must recompute",
    )
    p.add_argument(
        "--corrupt-kv-head", action="store_true", help="test hook: the decode worker negates KV head 0 it received"
    )
    p.add_argument(
        "--decode-host",
        default="127.0.0.1",
        help="the address the decode worker listens on and the prefill worker dials (default 127.0.0.1)",
    )
    for role in ("prefill", "decode"):
        p.add_argument(
            f"--{role}-exec",
            default="",
            metavar="PREFIX",
            help=f"run the {role} worker under this command prefix, e.g. 'ip netns exec NS' (docs/multi_host.md)",
        )
    # The workers' own arguments (the command passes them).
    p.add_argument("--worker", choices=("prefill", "decode", "rank"), help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--decode-first-device", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _rate(nbytes: int, seconds: float) -> str:
    """Bytes per second in the unit that shows it (a small demo cache moves at kB/s to MB/s, not GB/s)."""
    rate = nbytes / max(seconds, 1e-12)
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6)):
        if rate >= scale:
            return f"{rate / scale:.2f} {unit}"
    return f"{rate / 1e3:.2f} kB/s"


# ---------------------------------------------------------------------------------------------------
# The command: start both workers, check, report


def _gpu_count() -> int:
    """The GPUs this process's JAX sees (0 without any; probing starts JAX, so no memory is preallocated)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # (this process may run the --check reference)
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def _placement(args: argparse.Namespace, gpus: int) -> tuple[int, float] | str:
    """``(decode's first GPU, memory fraction per process)`` for GPU workers, or why they cannot run."""
    p, d = args.prefill_tp, args.decode_tp
    if args.pipe == "device_put":  # one jax.distributed process per worker: no GPU shared (NCCL needs two)
        if gpus < 2 * max(p, d):
            return (
                f"--pipe device_put on GPUs runs one jax.distributed process per worker, each on max(--prefill-tp, "
                f"--decode-tp) GPUs of its own: it needs {2 * max(p, d)} GPUs, found {gpus}; use --platform cpu"
            )
        return 0, 0.9
    if gpus >= p + d:
        return p, 0.45  # (the --check reference shares GPU 0 with the prefill worker)
    if gpus >= max(p, d):
        return 0, 0.28  # both workers (and the --check reference) share the first GPUs
    return f"--prefill-tp {p} and --decode-tp {d} need at least {max(p, d)} GPUs, found {gpus}; use --platform cpu"


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["JAX_PLATFORMS"] = "cuda"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = repr(args.mem_fraction)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _forward(args: argparse.Namespace, path: str, run_dir: str, port: int) -> list[str]:
    """The arguments every worker gets (the command's own, with the checkpoint and the run directory)."""
    out = ["--pipe", args.pipe, "--prefill-tp", str(args.prefill_tp), "--decode-tp", str(args.decode_tp)]
    out += ["--platform", args.platform, "--decode-first-device", str(args.decode_first_device)]
    out += ["--checkpoint", path, "--run-dir", run_dir, "--port", str(port), "--seed", str(args.seed)]
    out += ["--decode-host", args.decode_host]
    out += ["--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype]
    out += ["--temperature", repr(args.temperature), "--top-p", repr(args.top_p)]
    out += ["--transfer-timeout", repr(args.transfer_timeout)]
    for p in args.prompt or []:
        out += ["--prompt", ",".join(map(str, p))]
    return out + ["--fail-transfer"] * args.fail_transfer + ["--corrupt-kv-head"] * args.corrupt_kv_head


def _start(args: argparse.Namespace, path: str, run_dir: str) -> list[tuple[str, subprocess.Popen, str]]:
    from spmd.net import free_port

    fwd = _forward(args, path, run_dir, free_port())
    me = [sys.executable, "-m", "models.disagg"]
    if args.pipe == "device_put":
        n = max(args.prefill_tp, args.decode_tp)
        launch = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", "2"]
        launch += ["--cpu-devices-per-process" if args.platform == "cpu" else "--devices-per-process", str(n)]
        launch += ["--timeout", repr(args.timeout), "-m", "models.disagg", "--worker", "rank"]
        commands = [("spmd-launch", launch + fwd)]
    else:  # the decode worker first: it listens
        prefix = {"prefill": shlex.split(args.prefill_exec), "decode": shlex.split(args.decode_exec)}
        commands = [(role, [*prefix[role], *me, "--worker", role, *fwd]) for role in ("decode", "prefill")]
    procs = []
    for name, cmd in commands:
        log = os.path.join(run_dir, f"{name}.log")
        with open(log, "w") as f:
            procs.append(
                (name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_worker_env(args), cwd=_ROOT), log)
            )
    return procs


def _reference(args: argparse.Namespace, path: str, prompts: list[list[int]]) -> list[list[int]]:
    """Single-process generation with the same weights, on one device of this process (the workers' platform)."""
    import jax

    import models
    import spmd

    if args.platform == "cpu":
        try:
            jax.config.update("jax_num_cpu_devices", 1)
        except RuntimeError:  # an in-process caller already started JAX: use its first CPU device
            pass
    spmd.destroy_model_parallel()
    spmd.initialize_model_parallel(devices=jax.devices(args.platform)[:1])
    try:
        model = models.from_pretrained(path, dtype=jax.numpy.dtype(args.dtype))
        return models.generate(
            model, prompts, args.max_new_tokens, eos_token_id=model.config.eos_token_id, **disagg_worker.sampling(args)
        )
    finally:
        spmd.destroy_model_parallel()


def _wait(procs: list[tuple[str, subprocess.Popen, str]], deadline: float) -> bool:
    """Wait for every worker until ``deadline``; kill what is left then. Whether all ended in time."""
    while any(p.poll() is None for _, p, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    in_time = True
    for name, p, _ in procs:
        if p.poll() is None:
            in_time = False
            print(f"{PROG}: the {name} worker is still running at --timeout; killing it", file=sys.stderr)
            p.kill()
            p.wait()
    return in_time


def _results(procs: list[tuple[str, subprocess.Popen, str]]) -> tuple[dict[str, dict], list[str]]:
    results, lines = {}, []
    for _, _, log in procs:
        with open(log) as f:
            for line in f:
                line = line.rstrip("\n")
                body = line.split("] ", 1)[1] if line.startswith("[rank ") else line
                if body.startswith(disagg_worker.RESULT):
                    r = json.loads(body[len(disagg_worker.RESULT) :])
                    results[r["role"]] = r
                elif body.startswith(("[prefill] ", "[decode] ")):
                    lines.append(body)
    return results, lines


def _report(args: argparse.Namespace, prompts, results: dict[str, dict], heads: int) -> None:
    pre, dec = results.get("prefill"), results["decode"]
    for i, (prompt, out) in enumerate(zip(prompts, dec["tokens"], strict=True)):
        print(f"prompt {i} ({len(prompt)} tokens): {prompt}\n  -> {out}")
    if pre is not None:
        print(f"prefill: {pre['prefill_s'] * 1e3:.2f} ms (TP {pre['tp']}, batch {len(prompts)}, with the first token)")
    if dec["failure"] is None:
        s, b = dec["transfer_s"], dec["transfer_bytes"]
        sent = "" if pre is None else f" and {pre['send_compiles']} at the prefill worker"
        print(
            f"transfer: {s * 1e3:.2f} ms, {b} bytes ({b / 2**20:.2f} MiB: first tokens + KV cache, {heads} KV heads "
            f"each once), {_rate(b, s)} over the {args.pipe} pipe (TP {args.prefill_tp} -> {args.decode_tp})\n"
            "  timed at the decode worker from the first tokens' arrival to the whole cache on its devices, after an "
            f"untimed warm-up transfer of the same cache that compiled both sides: {dec['transfer_compiles']} compile "
            f"steps at the decode worker (it counted {dec['warmup_compiles']} in the warm-up){sent} while timed"
        )
    else:
        print(f"transfer: FAILED ({dec['failure']})")
        print(
            f"recompute: the decode worker recomputed the prefill in {dec['recompute_s'] * 1e3:.2f} ms (TP {dec['tp']})"
        )
    steps = max(dec["decode_steps"], 1)
    print(
        f"decode: {dec['decode_s'] / steps * 1e3:.2f} ms/token over {dec['decode_steps']} steps (TP {dec['tp']}), "
        f"{dec['decode_s'] * 1e3:.2f} ms in all"
    )


def _choose_platform(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """Resolve ``--platform`` (and the workers' GPUs and memory fraction) in ``args``; a line saying where they run."""
    args.mem_fraction = 0.0
    gpus = 0 if args.platform == "cpu" else _gpu_count()
    if args.platform == "gpu" and not gpus:
        parser.error("--platform gpu: JAX sees no GPU here (is jax[cuda] installed?); use --platform cpu")
    placed = _placement(args, gpus) if gpus else "no GPU"
    if isinstance(placed, str):
        if args.platform == "gpu":
            parser.error(placed)
        args.platform = "cpu"
        return "workers on cpu (simulated devices)" + (f": {placed}" if gpus else "")
    args.platform = "gpu"
    args.decode_first_device, args.mem_fraction = placed
    p, d, first = args.prefill_tp, args.decode_tp, args.decode_first_device
    shared = " (shared)" if first < p else ""
    return (
        f"workers on gpu: prefill on GPUs {list(range(p))}, decode on GPUs {list(range(first, first + d))}{shared}; "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction} per worker, no preallocation"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return disagg_worker.run(args)

    import models
    from models.generate import tiny_config
    from models.loading import read_config

    if args.checkpoint:
        try:
            config = read_config(args.checkpoint, op="--checkpoint")
        except (OSError, ValueError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)  # one line
            return 2
    else:
        config = tiny_config("llama")
    if config.is_moe:
        parser.error("the disaggregated demo runs LlamaForCausalLM checkpoints only")
    if args.pipe == "device_put" and (args.prefill_exec or args.decode_exec or args.decode_host != "127.0.0.1"):
        parser.error("--pipe device_put runs both workers in one spmd-launch job on this host; --decode-host and "
                     "--prefill-exec / --decode-exec are for the tcp, transfer and ipc pipes")  # fmt: skip
    for flag, tp in (("--prefill-tp", args.prefill_tp), ("--decode-tp", args.decode_tp)):
        try:
            config.check_parallel(tp)
        except ValueError as e:
            parser.error(f"{flag} {tp}: {e}")
    where = _choose_platform(args, parser)
    with tempfile.TemporaryDirectory(prefix="models-disagg-") as run_dir:
        if args.checkpoint:
            path = os.path.abspath(args.checkpoint)
        else:
            path = os.path.join(run_dir, "checkpoint")
            models.write_checkpoint(path, config, models.random_checkpoint(config, seed=args.seed))
        prompts = disagg_worker.demo_prompts(args, config.vocab_size)
        fd = os.open(os.path.join(run_dir, "secret"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        heads = config.num_key_value_heads
        print(
            f"{config.architecture} ({config.num_hidden_layers} layers, {config.num_attention_heads} heads / "
            f"{heads} KV heads) at {path}; prefill TP {args.prefill_tp} -> decode TP {args.decode_tp} "
            f"over the {args.pipe} pipe" + ("" if not args.fail_transfer else " (--fail-transfer)") + f"\n{where}",
            flush=True,
        )
        deadline = time.monotonic() + args.timeout
        t0 = time.perf_counter()
        procs = _start(args, path, run_dir)
        try:
            want = _reference(args, path, prompts) if args.check else None  # while the workers run
            in_time = _wait(procs, deadline)
        finally:
            for _, p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results, lines = _results(procs)
        for line in sorted(lines, key=lambda line: not line.startswith("[prefill]")):  # stable: each in order
            print(line)
        for name, p, _ in procs:
            if p.returncode:
                print(f"the {name} worker exited with code {p.returncode}")
        if "decode" not in results:
            for name, _, log in procs:
                with open(log) as f:
                    print(f"--- {name} output (last lines) ---\n" + "".join(f.readlines()[-30:]), file=sys.stderr)
            return 124 if not in_time else 2
        print(f"both workers done in {time.perf_counter() - t0:.1f} s")
        _report(args, prompts, results, heads)
        if want is None:
            return 0
        if results["decode"]["tokens"] != want:
            print(f"check FAILED: single-process generation on one device gave {want}", file=sys.stderr)
            return 1
        how = "a recomputed prefill" if results["decode"]["failure"] else f"a transfer over the {args.pipe} pipe"
        print(f"check: the tokens equal single-process generation on one device (after {how})")
        return 0


if __name__ == "__main__":
    sys.exit(main())
