"""Disaggregated prefill end to end: a prefill worker sends the KV cache and first tokens, a decode worker continues.

    python -m models.disagg --pipe tcp --prefill-tp 2 --decode-tp 4 --check
    python -m models.disagg --pipe device_put --prefill-tp 4 --decode-tp 2 --check
    python -m models.disagg --pipe transfer --check --fail-transfer     # the recompute path

The command writes the random demo Llama of ``python -m models.generate`` (8 query heads, 2 KV
heads) in the Hugging Face layout to a temporary directory (or takes ``--checkpoint``) and starts
two workers on simulated CPU devices that both load it with ``models.from_pretrained``:

* the prefill worker (TP ``P``) runs :func:`models.generation.prefill` (after a warm-up run that
  compiles) and sends, over one KV pipe (:mod:`spmd.kv_transfer`): the first new token of each
  sequence (``int32[batch]``), then the KV cache with ``send_kv_cache(keys + values, head_axis=1)``:
  per layer ``[batch, kv_heads, max_len, head_dim]`` with EACH KV HEAD ONCE (when ``P`` exceeds the
  KV heads, the model keeps one copy per rank; :func:`kv_layers_for_transfer` drops the replicas
  without a copy, the device-side :func:`spmd.kv_transfer.merge_kv_heads`);
* the decode worker (TP ``D``) compiles its decode step on an empty cache while it waits, receives
  the cache split by heads for ITS TP size (replicated when ``D`` exceeds the KV heads),
  rebuilds its model's cache from the per-device pieces (:func:`kv_cache_from_layers`) and
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

``--check`` generates with the same weights in this process on one CPU device and exits 1 unless
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
from collections.abc import Sequence
from typing import Any

from models.generate import positive_int, token_ids

__all__ = ["build_parser", "kv_cache_from_layers", "kv_layers_for_transfer", "main", "tp_devices"]

PROG = "python -m models.disagg"
PIPES = ("tcp", "device_put", "transfer", "ipc")
_RESULT = "DISAGG-RESULT "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# The KV cache on the wire: each KV head once, split by heads


def tp_devices(mesh: Any) -> list[Any]:
    """A TP-only mesh's devices in TP rank order.

    Raises:
      ValueError: the mesh has other axes larger than 1 (a worker here is TP only).
    """
    if mesh.devices.size != mesh.shape["tp"]:
        raise ValueError(
            f"tp_devices: expected a mesh of TP only, got {dict(mesh.shape)}; initialize the worker's "
            f"model parallel state with tensor_model_parallel_size equal to its devices."
        )
    return list(mesh.devices.flat)


def _cache_sharding(mesh: Any) -> Any:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from models.runner import BATCH_AXES
    from spmd import TP

    return NamedSharding(mesh, P(BATCH_AXES, TP, None, None))


def kv_layers_for_transfer(cache: Any, *, mesh: Any, num_kv_heads: int) -> list[Any]:
    """A model's KV cache as the layers a pipe sends: keys then values, each KV head once.

    Args:
      cache: a :class:`models.KVCache` placed on ``mesh`` (per layer ``[batch, max(kv_heads, tp),
        max_len, head_dim]``, sharded over "tp" on axis 1: with tp > kv_heads, each rank's copy).
      mesh: the model's TP-only mesh.
      num_kv_heads: the model's KV heads.

    Returns:
      ``2 * layers`` arrays ``[batch, num_kv_heads, max_len, head_dim]``, sharded by
      :func:`spmd.kv_transfer.kv_head_sharding` over the TP devices: the same per-device buffers
      (no copy), with the replicas of a head seen as one head (as :func:`merge_kv_heads` of the
      per-rank shards, without moving them).
    """
    import jax

    from spmd.kv_transfer import kv_head_sharding

    devices = tp_devices(mesh)
    sharding = kv_head_sharding(devices, num_kv_heads, head_axis=1)
    out = []
    for x in (*cache.keys, *cache.values):
        by_device = {s.device: s.data for s in x.addressable_shards}
        shape = (x.shape[0], num_kv_heads, *x.shape[2:])
        out.append(jax.make_array_from_single_device_arrays(shape, sharding, [by_device[d] for d in devices]))
    return out


def kv_cache_from_layers(layers: Sequence[Any], *, mesh: Any, num_kv_heads: int) -> Any:
    """The inverse of :func:`kv_layers_for_transfer` on the receiver's mesh (any TP size that fits the heads).

    Args:
      layers: keys then values, each ``[batch, num_kv_heads, max_len, head_dim]`` (as
        ``recv_kv_cache`` gives them: sharded by heads over the mesh's TP devices; else placed so).
      mesh: the decode model's TP-only mesh.

    Returns:
      A :class:`models.KVCache` in the model's layout (``[batch, max(kv_heads, tp), max_len,
      head_dim]``, replicated heads as each rank's copy), built from the per-device pieces.

    Raises:
      ValueError: an odd number of layers, or layers without ``num_kv_heads`` heads on axis 1.
    """
    import jax

    from models.llama import KVCache
    from spmd.kv_transfer import kv_head_sharding

    layers = list(layers)
    if not layers or len(layers) % 2:
        raise ValueError(
            f"kv_cache_from_layers: expected keys then values (an even number of layers), got {len(layers)}."
        )
    devices = tp_devices(mesh)
    by_heads = kv_head_sharding(devices, num_kv_heads, head_axis=1)
    target = _cache_sharding(mesh)
    out = []
    for i, x in enumerate(layers):
        if len(x.shape) != 4 or x.shape[1] != num_kv_heads:
            raise ValueError(
                f"kv_cache_from_layers: layer {i} has shape {list(x.shape)}; expected [batch, {num_kv_heads}, "
                f"max_len, head_dim]."
            )
        x = jax.device_put(x, by_heads)  # a no-op when the pipe placed it so
        by_device = {s.device: s.data for s in x.addressable_shards}
        shape = (x.shape[0], max(num_kv_heads, len(devices)), *x.shape[2:])
        out.append(jax.make_array_from_single_device_arrays(shape, target, [by_device[d] for d in devices]))
    n = len(out) // 2
    return KVCache(tuple(out[:n]), tuple(out[n:]))


# ---------------------------------------------------------------------------------------------------
# Arguments


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--pipe", choices=PIPES, default="tcp", help="the KV pipe between the workers (default tcp)")
    p.add_argument("--prefill-tp", type=positive_int, default=2, help="the prefill worker's TP size (default 2)")
    p.add_argument("--decode-tp", type=positive_int, default=2, help="the decode worker's TP size (default 2)")
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
        "--transfer-timeout", type=_seconds, default=60.0, help="the longest any pipe wait may take (default 60 s)"
    )
    p.add_argument("--timeout", type=_seconds, default=300.0, help="the whole run, workers included (default 300 s)")
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
    return p


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    return args.prompt or [rng.integers(0, vocab, k).tolist() for k in (12, 5)]


def _say(role: str, msg: str) -> None:
    print(f"[{role}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# The workers


class _CompileCounter:
    """Counts JAX's compile steps (tracing, lowering, backend compile) while active: a timed part must have none."""

    def __enter__(self) -> _CompileCounter:
        import jax.monitoring

        self.count = self.timed = 0

        def listener(event: str, duration: float, **kwargs: Any) -> None:
            if event.startswith("/jax/core/compile/"):
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._listener)


def _rate(nbytes: int, seconds: float) -> str:
    """Bytes per second in the unit that shows it (a small demo cache moves at kB/s to MB/s, not GB/s)."""
    rate = nbytes / max(seconds, 1e-12)
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6)):
        if rate >= scale:
            return f"{rate / scale:.2f} {unit}"
    return f"{rate / 1e3:.2f} kB/s"


def _load(args: argparse.Namespace, devices: list[Any]) -> Any:
    import jax.numpy as jnp

    import models
    import spmd

    spmd.initialize_model_parallel(tensor_model_parallel_size=len(devices), devices=devices)
    return models.from_pretrained(args.checkpoint, dtype=jnp.dtype(args.dtype))


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _secret(args: argparse.Namespace) -> bytes:
    with open(os.path.join(args.run_dir, "secret"), "rb") as f:
        return f.read()


def _open_pipe(args: argparse.Namespace, role: str, devices: list[Any]) -> Any:
    """The worker's end of the pipe: the decode worker listens, the prefill worker connects."""
    from spmd.kv_transfer import DevicePutKVPipe, IpcKVPipe, TCPKVPipe, TransferServerKVPipe

    kw = dict(role="server" if role == "decode" else "client", timeout_s=args.transfer_timeout, secret=_secret(args))
    if args.pipe == "tcp":
        return TCPKVPipe(args.decode_host, args.port, **kw)
    if args.pipe == "transfer":
        return TransferServerKVPipe(args.decode_host, args.port, devices=devices, **kw)
    if args.pipe == "ipc":
        return IpcKVPipe(args.decode_host, args.port, devices=devices, **kw)
    import jax

    side = [[d for d in jax.devices() if d.process_index == i] for i in (0, 1)]
    return DevicePutKVPipe(
        side[0][: args.prefill_tp], side[1][: args.decode_tp], timeout_s=args.transfer_timeout, name="disagg"
    )


def _prefill_worker(args: argparse.Namespace, devices: list[Any]) -> int:
    import jax

    from models.generation import prefill

    model = _load(args, devices)
    prompts = _prompts(args, model.config.vocab_size)
    prefill(model, prompts, args.max_new_tokens, **_sampling(args))  # warm-up: compiles
    t0 = time.perf_counter()
    pre = prefill(model, prompts, args.max_new_tokens, **_sampling(args))
    prefill_s = time.perf_counter() - t0
    layers = kv_layers_for_transfer(pre.cache, mesh=model.mesh, num_kv_heads=model.config.num_key_value_heads)
    _say("prefill", f"TP {len(devices)}: prefilled {len(prompts)} prompts in {prefill_s * 1e3:.2f} ms; sending")
    with _open_pipe(args, "prefill", devices) as pipe, _CompileCounter() as compiles:
        # Warm-up: one untimed transfer of the same cache compiles both sides' packing and unpacking.
        pipe.send_kv_cache(layers, head_axis=1)
        compiles.count = 0
        t1 = time.perf_counter()
        pipe.send_tensor(pre.tokens)
        if args.fail_transfer:
            if args.pipe != "device_put":
                _say("prefill", "--fail-transfer: dying after the first tokens, before the KV cache")
                os._exit(3)
            _say("prefill", "--fail-transfer: sending None in place of the KV cache (a dead process ends the job)")
            pipe.send_tensor(None)
        else:
            pipe.send_kv_cache(layers, head_axis=1)
            jax.block_until_ready(layers)
        send_s = time.perf_counter() - t1
        compiles.timed = compiles.count
        if args.pipe != "device_put" and not args.fail_transfer:
            pipe.recv_tensor()  # the decode worker's "received": the buffers stay alive until then
    nbytes = sum(x.nbytes for x in layers)
    result = {"role": "prefill", "tp": len(devices), "prefill_s": prefill_s, "send_s": send_s, "cache_bytes": nbytes}
    result["send_compiles"] = compiles.timed
    print(_RESULT + json.dumps(result), flush=True)
    return 0


def _receive(args: argparse.Namespace, model: Any, devices: list[Any], n: int) -> tuple[Any, float, int, tuple]:
    """The first tokens and cache from the prefill worker, as a ``Prefill``; the transfer's seconds and bytes, and
    how many JAX compile steps ran inside the timed part (none: the warm-up transfer compiled everything) and
    in the warm-up."""
    import jax
    import numpy as np

    from models.generation import Prefill, buckets

    prompts = _prompts(args, model.config.vocab_size)
    batch, _, max_len = buckets(model, prompts, args.max_new_tokens)
    heads = model.config.num_key_value_heads
    recv = (lambda: pipe.recv_kv_cache(devices=devices)) if args.pipe == "tcp" else (lambda: pipe.recv_kv_cache())
    with _open_pipe(args, "decode", devices) as pipe, _CompileCounter() as compiles:
        jax.block_until_ready(recv())  # the untimed warm-up transfer: compiles, then is dropped
        tokens = pipe.recv_tensor()
        warmup_compiles, compiles.count = compiles.count, 0
        t0 = time.perf_counter()
        if tokens is None or tuple(np.shape(tokens)) != (batch,) or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"expected int32[{batch}] first tokens, got {None if tokens is None else list(np.shape(tokens))}"
            )
        first = np.asarray(tokens)[:n]
        if first.min() < 0 or first.max() >= model.config.vocab_size:
            raise ValueError(f"first tokens {first.tolist()} outside the vocabulary of {model.config.vocab_size}")
        layers = recv()
        jax.block_until_ready(layers)
        seconds = time.perf_counter() - t0
        timed_compiles = compiles.count
        want = (batch, heads, max_len, model.config.head_dim)
        if len(layers) != 2 * model.config.num_hidden_layers or any(tuple(x.shape) != want for x in layers):
            raise ValueError(f"expected {2 * model.config.num_hidden_layers} layers of {list(want)}")
        if args.pipe != "device_put":
            pipe.send_tensor(None)  # received
    nbytes = int(sum(x.nbytes for x in layers) + np.asarray(tokens).nbytes)
    if args.corrupt_kv_head:
        layers = [x.at[:, 0].multiply(-1) for x in layers]
    cache = kv_cache_from_layers(layers, mesh=model.mesh, num_kv_heads=heads)
    lengths = np.ones(batch, np.int32)
    lengths[:n] = [len(p) for p in prompts]
    return Prefill(tokens, lengths, cache, n, args.max_new_tokens), seconds, nbytes, (timed_compiles, warmup_compiles)


def _decode_worker(args: argparse.Namespace, devices: list[Any]) -> int:
    import jax.numpy as jnp
    import numpy as np

    from models.generation import Prefill, buckets, decode_from, prefill
    from models.llama import KVCache

    model = _load(args, devices)
    prompts = _prompts(args, model.config.vocab_size)
    eos = model.config.eos_token_id
    # Warm-up while the prefill worker works: compile the decode step on an empty cache of the right shape.
    batch, _, max_len = buckets(model, prompts, args.max_new_tokens)
    shape, n = model.cache_shape(batch, max_len), model.config.num_hidden_layers
    empty = KVCache(*(tuple(jnp.zeros(shape, model.dtype) for _ in range(n)) for _ in range(2)))
    warm = Prefill(np.zeros(batch, np.int32), np.ones(batch, np.int32), empty, 1, 2)
    decode_from(model, warm, **_sampling(args))
    _say("decode", f"TP {len(devices)}: decode step compiled; waiting for the KV cache on the {args.pipe} pipe")

    result: dict[str, Any] = {"role": "decode", "tp": len(devices), "failure": None}
    try:
        pre, result["transfer_s"], result["transfer_bytes"], compiles = _receive(args, model, devices, len(prompts))
        result["transfer_compiles"], result["warmup_compiles"] = compiles
    except Exception as e:  # any failed transfer: vLLM's recompute policy
        result["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        _say("decode", f"transfer FAILED ({result['failure']}); recomputing the prefill here (recompute policy)")
        t0 = time.perf_counter()
        pre = prefill(model, prompts, args.max_new_tokens, **_sampling(args))
        result["recompute_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = decode_from(model, pre, eos_token_id=eos, **_sampling(args))
    result["decode_s"] = time.perf_counter() - t0
    result["decode_steps"] = max(len(t) for t in tokens) - 1
    result["tokens"] = tokens
    print(_RESULT + json.dumps(result), flush=True)
    return 0


def _worker(args: argparse.Namespace) -> int:
    role = args.worker
    if role == "rank":  # one process of an spmd-launch job (the device_put pipe)
        from spmd.kv_transfer import DevicePutKVPipe

        DevicePutKVPipe.enable_transfers(timeout_s=int(args.transfer_timeout))
        import spmd

        spmd.init_distributed_environment()
        import jax

        role = "prefill" if jax.process_index() == 0 else "decode"
        local = jax.local_devices()
    else:
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", args.prefill_tp if role == "prefill" else args.decode_tp)
        except RuntimeError:  # the backend already started (an in-process caller): keep its devices
            pass
        local = jax.local_devices()
    devices = local[: args.prefill_tp if role == "prefill" else args.decode_tp]
    return (_prefill_worker if role == "prefill" else _decode_worker)(args, devices)


# ---------------------------------------------------------------------------------------------------
# The command: start both workers, check, report


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _forward(args: argparse.Namespace, path: str, run_dir: str, port: int) -> list[str]:
    """The arguments every worker gets (the command's own, with the checkpoint and the run directory)."""
    out = ["--pipe", args.pipe, "--prefill-tp", str(args.prefill_tp), "--decode-tp", str(args.decode_tp)]
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
        launch = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", "2", "--cpu-devices-per-process", str(n)]
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
                (name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_worker_env(), cwd=_ROOT), log)
            )
    return procs


def _reference(args: argparse.Namespace, path: str, prompts: list[list[int]]) -> list[list[int]]:
    """Single-process generation with the same weights, on one CPU device of this process."""
    import jax

    import models
    import spmd

    try:
        jax.config.update("jax_num_cpu_devices", 1)
    except RuntimeError:  # an in-process caller already started JAX: use its first CPU device
        pass
    spmd.destroy_model_parallel()
    spmd.initialize_model_parallel(devices=jax.devices("cpu")[:1])
    try:
        model = models.from_pretrained(path, dtype=jax.numpy.dtype(args.dtype))
        return models.generate(
            model, prompts, args.max_new_tokens, eos_token_id=model.config.eos_token_id, **_sampling(args)
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
                if body.startswith(_RESULT):
                    r = json.loads(body[len(_RESULT) :])
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

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
    with tempfile.TemporaryDirectory(prefix="models-disagg-") as run_dir:
        if args.checkpoint:
            path = os.path.abspath(args.checkpoint)
        else:
            path = os.path.join(run_dir, "checkpoint")
            models.write_checkpoint(path, config, models.random_checkpoint(config, seed=args.seed))
        prompts = _prompts(args, config.vocab_size)
        fd = os.open(os.path.join(run_dir, "secret"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        heads = config.num_key_value_heads
        print(
            f"{config.architecture} ({config.num_hidden_layers} layers, {config.num_attention_heads} heads / "
            f"{heads} KV heads) at {path}; prefill TP {args.prefill_tp} -> decode TP {args.decode_tp} "
            f"over the {args.pipe} pipe" + ("" if not args.fail_transfer else " (--fail-transfer)"),
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
