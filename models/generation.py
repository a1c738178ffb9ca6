"""Scoring and generation over a :class:`~models.runner.CausalLM`: shape buckets, the decode loop, EOS.

Shapes are padded to buckets so that each jitted step compiles once per bucket, never per call or
per token: the batch to a power of two (and a multiple of the ("dp", "ep") devices), the prompt
length to a power of two (at least 8), the KV cache to a power of two that holds the longest
prompt plus the new tokens (at least 16). Prompts are right-padded; padding rows and positions are
computed and ignored.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.llama import KVCache
from models.runner import BATCH_AXES, CausalLM

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GenerationStats",
    "Prefill",
    "bucket",
    "buckets",
    "decode_from",
    "generate",
    "generate_stream",
    "generate_with_stats",
    "prefill",
    "score",
]


DEFAULT_CHUNK_SIZE = 16  # decode steps per device call


def bucket(n: int, *, minimum: int = 1, multiple: int = 1) -> int:
    """The smallest power of two ``>= max(n, minimum)``, rounded up to a multiple of ``multiple``."""
    b = 1 << max(0, (max(n, minimum) - 1).bit_length())
    return -(-b // multiple) * multiple


def _check_model(op: str, model: Any) -> None:
    if not isinstance(model, CausalLM):
        raise TypeError(f"{op}: expected a model from models.from_pretrained, got {type(model).__name__}.")


def _check_ids(op: str, ids: np.ndarray, vocab: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"{op}: token id {bad} is out of range for a vocabulary of {vocab}.")


def score(model: CausalLM, input_ids: Any) -> jax.Array:
    """Logits for every position of a batch of prompts of one length.

    Args:
      model: from :func:`models.from_pretrained`.
      input_ids: ``int[batch, tokens]`` (an array or equal-length lists).

    Returns:
      ``f32[batch, tokens, vocab]``: the logits at position t predict token t + 1.

    Raises:
      ValueError: not a 2-D batch of ids, or an id outside the vocabulary.
    """
    _check_model("score", model)
    try:
        ids = np.asarray(input_ids)
    except ValueError:
        ids = np.asarray(input_ids, dtype=object)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"score: expected input_ids int[batch, tokens] with tokens >= 1, got an array of shape {ids.shape} "
            f"and dtype {ids.dtype} (prompts of different lengths: call score per prompt)."
        )
    _check_ids("score", ids, model.config.vocab_size)
    b, t = ids.shape
    bp, tp = bucket(b, multiple=model.batch_multiple), bucket(t, minimum=8)
    padded = np.zeros((bp, tp), np.int32)
    padded[:b, :t] = ids
    positions = np.broadcast_to(np.arange(tp, dtype=np.int32), (bp, tp))
    return model.score_step()(model.state, padded, positions)[:b, :t]


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Wall times of one :func:`generate_with_stats` call (including compilation if it happened)."""

    prefill_s: float
    decode_s: float
    decode_steps: int
    new_tokens: int

    @property
    def per_token_decode_s(self) -> float:
        return self.decode_s / max(self.decode_steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-12)


def _check_prompts(prompts: Any, vocab: int) -> list[list[int]]:
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
        raise ValueError(f"generate: expected prompts as a non-empty list of lists of token ids, got {prompts!r:.80}.")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"generate: prompt {i} must be a non-empty list of token ids, got {p!r:.80}.")
        _check_ids("generate", ids, vocab)
        out.append([int(x) for x in ids])
    return out


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: expected a positive int max_new_tokens, got {max_new_tokens!r}.")
    if not temperature >= 0:
        raise ValueError(f"generate: expected temperature >= 0 (0: greedy), got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: expected 0 < top_p <= 1, got {top_p!r}.")


def buckets(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int, int]:
    """The ``(batch, prompt length, cache length)`` buckets :func:`generate` uses for these prompts.

    A prefill worker and a decode worker that agree on the prompts agree on these, so the decode
    worker knows the KV cache's shape (``model.cache_shape(batch, cache_length)``) before it arrives.
    """
    lengths = [len(p) for p in prompts]
    bp = bucket(len(lengths), multiple=model.batch_multiple)
    tp = bucket(max(lengths), minimum=8)
    return bp, tp, bucket(max(tp, max(lengths) + max_new_tokens), minimum=16)


@dataclasses.dataclass(frozen=True)
class Prefill:
    """What a prefill hands to decoding (:func:`prefill` -> :func:`decode_from`).

    Attributes:
      tokens: ``int32[batch]``: the first new token of each sequence (the batch padded to its bucket).
      lengths: ``int32[batch]``: the prompt lengths, i.e. each sequence's next position (numpy or JAX).
      cache: the KV cache, per layer keys and values ``[batch, kv_heads (x replicas), max_len, head_dim]``.
      num_prompts: the real sequences (rows past it are padding).
      max_new_tokens: the most new tokens per sequence, the first one included.
    """

    tokens: Any
    lengths: Any
    cache: KVCache
    num_prompts: int
    max_new_tokens: int


def _prefill(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, opts: _Options) -> Prefill:
    n = len(prompts)
    bp, tp, max_len = buckets(model, prompts, max_new_tokens)
    ids = np.zeros((bp, tp), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lens = np.ones(bp, np.int32)
    lens[:n] = [len(p) for p in prompts]
    tokens, positions, cache = model.prefill_step()(
        model.state, ids, lens, opts.key, opts.temperature, opts.top_p, max_len=max_len, greedy=opts.greedy
    )
    return Prefill(tokens, positions, cache, n, max_new_tokens)


@dataclasses.dataclass(frozen=True)
class _Options:
    """Validated sampling and decoding arguments, as the jitted steps take them."""

    key: Any
    temperature: Any
    top_p: Any
    eos: set[int]
    chunk_size: int
    greedy: bool = False  # temperature == 0: the steps leave the sampling out (a static argument)


def _options(op, max_new_tokens, temperature, top_p, seed, eos_token_id, chunk_size) -> _Options:
    _check_sampling(max_new_tokens, temperature, top_p)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: expected a positive int chunk_size (decode steps per call), got {chunk_size!r}.")
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < 2**31 for t in eos):
        raise ValueError(f"{op}: expected eos_token_id as a token id or a list of them, got {eos_token_id!r}.")
    return _Options(
        jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p), {int(t) for t in eos}, chunk_size,
        temperature == 0,
    )  # fmt: skip


def _decode_chunks(model: CausalLM, pre: Prefill, opts: _Options) -> Iterator[list[list[int]]]:
    """Decode on the device, ``opts.chunk_size`` steps per call; yield each chunk's new tokens per prompt.

    The first yield is the prefill's tokens. Calls return at once (the loop's trip count is static and
    it holds no conditional), so two chunks are kept queued: the device runs one while the host reads
    the one before, and the host's work per chunk (one dispatch, one read) hides behind the device's.
    The first chunks are queued before the prefill's tokens are read, so the device never waits for
    the host between the prefill and the decode. A sequence's tokens end with its first EOS or at the
    budget; once every sequence has ended, no chunk is dispatched (those already queued still run: at
    most two chunks of steps past the last EOS).
    """
    n, eos, chunk = pre.num_prompts, opts.eos, opts.chunk_size
    loop = model.decode_loop(chunk, greedy=opts.greedy)
    tokens, positions, cache = pre.tokens, pre.lengths, pre.cache
    total, dispatched, pending = pre.max_new_tokens - 1, 0, []

    def fill():  # one chunk runs while the one before is read
        nonlocal tokens, positions, cache, dispatched
        while dispatched < total and len(pending) < 2:
            tokens, positions, cache, new = loop(
                model.state, cache, tokens, positions, jnp.int32(1 + dispatched), opts.key, opts.temperature,
                opts.top_p,
            )  # fmt: skip
            pending.append((new, min(chunk, total - dispatched)))  # the steps past the budget are dropped
            dispatched += chunk

    first = pre.tokens
    fill()
    first = np.asarray(first)
    finished = np.isin(first[:n], list(eos)) if eos else np.zeros(n, bool)
    yield [[int(t)] for t in first[:n]]

    while not finished.all():
        fill()
        if not pending:
            return
        new, steps = pending.pop(0)
        out = []
        for i, row in enumerate(np.asarray(new)[:n, :steps]):
            seq = []
            for tok in row if not finished[i] else ():
                seq.append(int(tok))
                if tok in eos:
                    finished[i] = True
                    break
            out.append(seq)
        yield out


def prefill(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Prefill:
    """The prefill half of :func:`generate`: the prompts' KV cache and first new tokens.

    What a disaggregated prefill worker computes and sends; :func:`decode_from` continues from it
    (on this model or on another placement of the same weights) with the tokens :func:`generate` gives.

    Raises:
      ValueError / TypeError: as :func:`generate`.
    """
    _check_model("prefill", model)
    prompts = _check_prompts(prompts, model.config.vocab_size)
    opts = _options("prefill", max_new_tokens, temperature, top_p, seed, None, 1)
    pre = _prefill(model, prompts, max_new_tokens, opts)
    jax.block_until_ready(pre.tokens)
    return pre


def _placed(model: CausalLM, pre: Prefill) -> Prefill:
    """``pre`` checked against the model's decode shapes and placed on its mesh (a no-op when it is there)."""
    if not isinstance(pre, Prefill):
        raise TypeError(f"decode_from: expected a models.generation.Prefill, got {type(pre).__name__}.")
    batch = int(np.shape(pre.lengths)[0])
    max_len = int(np.shape(pre.cache.keys[0])[2]) if pre.cache.keys else 0
    want = model.cache_shape(batch, max_len)
    layers = model.config.num_hidden_layers
    shapes = [tuple(np.shape(x)) for x in (*pre.cache.keys, *pre.cache.values)]
    if len(pre.cache.keys) != layers or len(pre.cache.values) != layers or any(s != want for s in shapes):
        raise ValueError(
            f"decode_from: expected {layers} layers of keys and of values, each {list(want)}; got "
            f"{len(pre.cache.keys)} and {len(pre.cache.values)} layers of shapes {sorted(set(shapes))}."
        )
    if tuple(np.shape(pre.tokens)) != (batch,) or not 0 < pre.num_prompts <= batch:
        raise ValueError(
            f"decode_from: expected int32[{batch}] first tokens for {pre.num_prompts} prompts, got "
            f"{list(np.shape(pre.tokens))}."
        )
    rows = NamedSharding(model.mesh, P(BATCH_AXES))
    specs = model.cache_specs()
    cache = jax.device_put(
        pre.cache, jax.tree.map(lambda s: NamedSharding(model.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    )
    tokens, lengths = (jax.device_put(jnp.asarray(x, jnp.int32), rows) for x in (pre.tokens, pre.lengths))
    return dataclasses.replace(pre, tokens=tokens, lengths=lengths, cache=cache)


def decode_from(
    model: CausalLM,
    pre: Prefill,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[int]]:
    """The decode half of :func:`generate`: continue from a :class:`Prefill` (the same sampling arguments).

    The first tokens and the cache are placed on this model's mesh (a no-op when they are there
    already); the cache is donated to the decode loop.

    Returns:
      The new token ids of each prompt, the prefill's first token included.

    Raises:
      ValueError: the cache or the tokens do not have the shapes this model's decode steps take, or
        arguments as :func:`generate`.
    """
    _check_model("decode_from", model)
    pre = _placed(model, pre)
    opts = _options("decode_from", pre.max_new_tokens, temperature, top_p, seed, eos_token_id, chunk_size)
    return _collect(_decode_chunks(model, pre, opts))


def _collect(pieces: Iterator[list[list[int]]]) -> list[list[int]]:
    out: list[list[int]] = []
    for piece in pieces:
        out = [seq + new for seq, new in zip(out, piece, strict=True)] if out else piece
    return out


def generate_stream(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Iterator[list[list[int]]]:
    """:func:`generate`, yielding the new tokens as they come: first the prefill's, then each chunk's.

    Each item holds, per prompt, the tokens produced since the last item (empty once the sequence
    ended); concatenated, the items give exactly :func:`generate`'s result for the same arguments.
    Decoding runs on the device ``chunk_size`` steps per call, so tokens arrive in chunks of that size.

    Raises:
      ValueError / TypeError: as :func:`generate`, at the call (before the first item).
    """
    _check_model("generate", model)
    prompts = _check_prompts(prompts, model.config.vocab_size)
    opts = _options("generate", max_new_tokens, temperature, top_p, seed, eos_token_id, chunk_size)
    pre = _prefill(model, prompts, max_new_tokens, opts)
    return _decode_chunks(model, pre, opts)


def generate_with_stats(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[list[list[int]], GenerationStats]:
    """:func:`generate`, also returning the wall time of the prefill and of the decode loop."""
    _check_model("generate", model)
    prompts = _check_prompts(prompts, model.config.vocab_size)
    opts = _options("generate", max_new_tokens, temperature, top_p, seed, eos_token_id, chunk_size)
    t0 = time.perf_counter()
    pre = _prefill(model, prompts, max_new_tokens, opts)
    jax.block_until_ready(pre.tokens)
    t1 = time.perf_counter()
    out = _collect(_decode_chunks(model, pre, opts))
    t2 = time.perf_counter()
    stats = GenerationStats(t1 - t0, t2 - t1, max(map(len, out)) - 1, sum(map(len, out)))
    return out, stats


def generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` new tokens for each prompt.

    The prefill is one call; decoding runs on the device, ``chunk_size`` steps per call (a
    ``lax.fori_loop``), two calls queued at a time, and the host reads the tokens back once per chunk
    and stops dispatching once every sequence has sampled an EOS or the budget is spent (the chunk
    already queued then runs to its end: up to ``2 * chunk_size - 1`` steps computed past the last
    EOS, never returned).

    Args:
      model: from :func:`models.from_pretrained`.
      prompts: token ids per prompt; lengths may differ (one batch, right-padded).
      max_new_tokens: the most new tokens per prompt.
      temperature: ``0``: greedy; else sampling at this temperature (seeded by ``seed``).
      top_p: sample from the smallest set of tokens whose probability reaches ``top_p``.
      seed: the sampling seed. Each sequence draws from its own stream (the seed, the step and its
        row in the batch), so the same seed and prompts give the same tokens on any mesh.
      eos_token_id: a token id (or several) that ends a sequence; it is included in the output.
      chunk_size: decode steps per device call (the granularity of :func:`generate_stream`).

    Returns:
      The new token ids of each prompt, in order.

    Raises:
      ValueError: empty prompts, ids outside the vocabulary, ``max_new_tokens < 1``, a negative
        temperature, ``top_p`` outside ``(0, 1]``, ``chunk_size < 1`` or a bad ``eos_token_id``.
      TypeError: ``model`` is not a loaded model.
    """
    tokens, _ = generate_with_stats(
        model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        eos_token_id=eos_token_id, chunk_size=chunk_size,
    )  # fmt: skip
    return tokens
