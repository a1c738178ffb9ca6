"""The two workers of ``python -m models.disagg``: prefill (sends the KV cache) and decode (receives, continues).

Each runs in its own process (started by :mod:`models.disagg` with ``--worker``), on the devices
the command gave it: simulated CPU devices, or GPUs (prefill on the first ``P``, decode on the
next ``D``, or on the first ``D`` when both share the GPUs). Each prints its platform and devices,
then one ``DISAGG-RESULT`` line of JSON for the command's report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from models.kv_layout import kv_cache_from_layers, kv_layers_for_transfer

__all__ = ["RESULT", "demo_prompts", "run", "sampling"]

RESULT = "DISAGG-RESULT "


def demo_prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    return args.prompt or [rng.integers(0, vocab, k).tolist() for k in (12, 5)]


def _say(role: str, msg: str) -> None:
    print(f"[{role}] {msg}", flush=True)


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


def _load(args: argparse.Namespace, devices: list[Any]) -> Any:
    import jax.numpy as jnp

    import models
    import spmd

    spmd.initialize_model_parallel(tensor_model_parallel_size=len(devices), devices=devices)
    return models.from_pretrained(args.checkpoint, dtype=jnp.dtype(args.dtype))


def sampling(args: argparse.Namespace) -> dict[str, Any]:
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
    prompts = demo_prompts(args, model.config.vocab_size)
    prefill(model, prompts, args.max_new_tokens, **sampling(args))  # warm-up: compiles
    t0 = time.perf_counter()
    pre = prefill(model, prompts, args.max_new_tokens, **sampling(args))
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
    print(RESULT + json.dumps(result), flush=True)
    _end_of_job(args, layers)
    return 0


def _end_of_job(args: argparse.Namespace, *keep: Any) -> None:
    """device_put: the sender's half of a transfer is not waited for, so its arrays (``keep``) must outlive the
    receiver's half; both workers meet here before either returns (once seen: a sender gone, a receiver stuck)."""
    if args.pipe == "device_put":
        import spmd.host

        spmd.host.barrier(timeout_s=args.timeout)
        del keep


def _receive(args: argparse.Namespace, model: Any, devices: list[Any], n: int) -> tuple[Any, float, int, tuple]:
    """The first tokens and cache from the prefill worker, as a ``Prefill``; the transfer's seconds and bytes, and
    how many JAX compile steps ran inside the timed part (none: the warm-up transfer compiled everything) and
    in the warm-up."""
    import jax
    import numpy as np

    from models.generation import Prefill, buckets

    prompts = demo_prompts(args, model.config.vocab_size)
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
    prompts = demo_prompts(args, model.config.vocab_size)
    eos = model.config.eos_token_id
    # Warm-up while the prefill worker works: compile the decode step on an empty cache of the right shape.
    batch, _, max_len = buckets(model, prompts, args.max_new_tokens)
    shape, n = model.cache_shape(batch, max_len), model.config.num_hidden_layers
    empty = KVCache(*(tuple(jnp.zeros(shape, model.dtype) for _ in range(n)) for _ in range(2)))
    warm = Prefill(np.zeros(batch, np.int32), np.ones(batch, np.int32), empty, 1, 2)
    decode_from(model, warm, **sampling(args))
    _say("decode", f"TP {len(devices)}: decode step compiled; waiting for the KV cache on the {args.pipe} pipe")

    result: dict[str, Any] = {"role": "decode", "tp": len(devices), "failure": None}
    try:
        pre, result["transfer_s"], result["transfer_bytes"], compiles = _receive(args, model, devices, len(prompts))
        result["transfer_compiles"], result["warmup_compiles"] = compiles
    except Exception as e:  # any failed transfer: vLLM's recompute policy
        result["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        _say("decode", f"transfer FAILED ({result['failure']}); recomputing the prefill here (recompute policy)")
        t0 = time.perf_counter()
        pre = prefill(model, prompts, args.max_new_tokens, **sampling(args))
        result["recompute_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = decode_from(model, pre, eos_token_id=eos, **sampling(args))
    result["decode_s"] = time.perf_counter() - t0
    result["decode_steps"] = max(len(t) for t in tokens) - 1
    result["tokens"] = tokens
    print(RESULT + json.dumps(result), flush=True)
    _end_of_job(args)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the worker ``args.worker`` names on the devices the command chose for it; its exit code."""
    role = args.worker
    if role == "rank":  # one process of an spmd-launch job (the device_put pipe)
        from spmd.kv_transfer import DevicePutKVPipe

        DevicePutKVPipe.enable_transfers(timeout_s=int(args.transfer_timeout))
        import spmd

        spmd.init_distributed_environment()
        import jax

        role = "prefill" if jax.process_index() == 0 else "decode"
        local = jax.local_devices()
        first = 0
    else:
        import jax

        if args.platform == "cpu":
            try:
                jax.config.update("jax_num_cpu_devices", args.prefill_tp if role == "prefill" else args.decode_tp)
            except RuntimeError:  # the backend already started (an in-process caller): keep its devices
                pass
        local = jax.local_devices()
        first = args.decode_first_device if role == "decode" else 0
    tp = args.prefill_tp if role == "prefill" else args.decode_tp
    devices = local[first : first + tp]
    if len(devices) != tp:
        raise ValueError(f"the {role} worker needs devices {first}..{first + tp - 1}, this process has {local}")
    _say(role, f"on {devices[0].platform}: {', '.join(str(d) for d in devices)}")
    return (_prefill_worker if role == "prefill" else _decode_worker)(args, devices)
