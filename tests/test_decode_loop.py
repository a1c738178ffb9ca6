"""Decode on the device (``CausalLM.decode_loop`` through ``models.generate``): chunks, EOS per sequence,
the token budget, seeded sampling, streaming, TP x DP meshes, against the numpy reference model
(tests/np_reference.py) and the documented per-sequence random streams.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import np_reference
import numpy as np
import pytest
from conftest import SESSION_SEED
from model_fixtures import WIDE_HEADS, checkpoint_without_near_ties, init, llama_config

import models
import spmd
from models.generation import generate_stream, generate_with_stats, prefill

CONFIG = llama_config()
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt():
    rng = np.random.default_rng([SESSION_SEED, 23])
    weights, prompts, greedy = checkpoint_without_near_ties(CONFIG, rng, (7, 3, 5), NEW_TOKENS)
    return {"weights": weights, "prompts": prompts, "greedy": [g for g, _ in greedy]}


_MODELS: dict = {}


def _model(ckpt, tp, dp):
    spmd.destroy_model_parallel()
    init(tp, dp=dp)
    if (tp, dp) not in _MODELS:
        _MODELS[(tp, dp)] = models.load_state_dict(CONFIG, ckpt["weights"])
    return _MODELS[(tp, dp)]


# The fast lane keeps a chunk that does not divide the budget on a TP x DP mesh, and chunk 1 on one device (both
# models other tests here load); the full suite adds TP 4 and TP 8 (KV heads replicated: tests/test_llama.py's
# greedy test runs TP 8 in the fast lane; a chunk past the budget: test_budget_is_exact_for_every_chunk_size).
@pytest.mark.parametrize(
    ("tp", "dp", "chunk"),
    [
        (1, 1, 1),
        (2, 4, 3),
        pytest.param(4, 2, 32, marks=pytest.mark.slow),
        pytest.param(8, 1, 4, marks=pytest.mark.slow),
    ],
)
def test_chunked_greedy_tokens_match_reference(ckpt, tp, dp, chunk):
    out = models.generate(_model(ckpt, tp, dp), ckpt["prompts"], NEW_TOKENS, chunk_size=chunk)
    assert out == ckpt["greedy"]


@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_budget_is_exact_for_every_chunk_size(ckpt, chunk):
    for n in (1, 2, 5, 9):
        out = models.generate(_model(ckpt, 2, 4), ckpt["prompts"], n, chunk_size=chunk)
        assert out == [g[:n] for g in ckpt["greedy"]]


def _first_seen(seq, tokens):
    return min((seq.index(t) for t in tokens if t in seq), default=None)


def test_eos_ends_each_sequence_at_its_own_step(ckpt):
    """Each sequence stops at its first EOS (included); the others go on to the budget."""
    model = _model(ckpt, 2, 4)
    greedy = ckpt["greedy"]
    eos = {greedy[0][2], greedy[2][6]}  # the first prompt stops early, the third later (or earlier, if it repeats)
    out = models.generate(model, ckpt["prompts"], NEW_TOKENS, eos_token_id=sorted(eos), chunk_size=3)
    for seq, ref in zip(out, greedy, strict=True):
        j = _first_seen(ref, eos)
        assert seq == (ref if j is None else ref[: j + 1])


@pytest.mark.parametrize("greedy", [False, True])
def test_one_call_runs_a_static_chunk_of_reference_steps(ckpt, greedy):
    """The loop's call: ``chunk`` greedy steps from the prefill, column i the token of step i (the reference's).

    At temperature 0 both builds give the argmax: ``greedy=False`` by selecting it, ``True`` alone."""
    model = _model(ckpt, 2, 4)
    pre = prefill(model, ckpt["prompts"], NEW_TOKENS)
    loop = model.decode_loop(NEW_TOKENS - 1, greedy=greedy)
    tokens, positions, _, new = loop(
        model.state, pre.cache, pre.tokens, pre.lengths, jnp.int32(1), jax.random.key(0), jnp.float32(0),
        jnp.float32(1),
    )  # fmt: skip
    new = np.asarray(new)
    for i, ref in enumerate(ckpt["greedy"]):
        np.testing.assert_array_equal(new[i], ref[1:])
    np.testing.assert_array_equal(np.asarray(tokens)[:3], new[:3, -1])
    np.testing.assert_array_equal(np.asarray(positions), np.asarray(pre.lengths) + NEW_TOKENS - 1)


def test_host_stops_dispatching_once_every_sequence_is_done(ckpt):
    """After the chunk in which the last sequence samples its EOS, at most the one already queued runs."""
    model = _model(ckpt, 2, 4)
    greedy = ckpt["greedy"]
    eos = [greedy[0][3], greedy[1][3], greedy[2][3]]
    last = max(_first_seen(g, eos) for g in greedy)  # the new-token index that ends the batch
    chunk, budget = 2, 40
    loop = model.decode_loop(chunk, greedy=True)
    calls = []
    model._steps["decode"][chunk, True] = lambda *a: calls.append(1) or loop(*a)
    out = models.generate(model, ckpt["prompts"], budget, eos_token_id=eos, chunk_size=chunk)
    assert out == [g[: _first_seen(g, eos) + 1] for g in greedy]
    needed = -(-last // chunk)  # the chunks that hold decode steps 1 .. last
    assert needed <= len(calls) <= needed + 1 < (budget - 1) // chunk


def test_with_stats_counts_the_steps_that_ran(ckpt):
    model = _model(ckpt, 1, 1)
    greedy = ckpt["greedy"]
    out, stats = generate_with_stats(model, ckpt["prompts"], NEW_TOKENS, eos_token_id=[g[0] for g in greedy])
    assert out == [[g[0]] for g in greedy] and stats.decode_steps == 0 and stats.new_tokens == 3
    out, stats = generate_with_stats(model, ckpt["prompts"], NEW_TOKENS, chunk_size=4)
    assert stats.decode_steps == NEW_TOKENS - 1 and stats.new_tokens == 3 * NEW_TOKENS


def test_stream_yields_the_prefill_token_then_chunks(ckpt):
    model = _model(ckpt, 2, 4)
    pieces = list(generate_stream(model, ckpt["prompts"], NEW_TOKENS, chunk_size=4))
    assert [len(p) for p in pieces[0]] == [1, 1, 1]
    assert all(len(s) <= 4 for p in pieces[1:] for s in p)
    assert len(pieces) == 1 + -(-(NEW_TOKENS - 1) // 4)
    joined = [[t for p in pieces for t in p[i]] for i in range(3)]
    assert joined == ckpt["greedy"]


def _reference_sample(logits, key, step, row, temperature, top_p):
    """The documented draw: ``categorical(fold_in(fold_in(key, step), row))`` over the top-p nucleus."""
    scaled = np.asarray(logits, np.float32) / np.float32(temperature)
    order = np.argsort(-scaled, kind="stable")
    s = scaled[order]
    p = np.exp(s - s.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    s = np.where(before < top_p, s, -np.inf)
    k = jax.random.fold_in(jax.random.fold_in(key, step), row)
    return int(order[int(jax.random.categorical(k, jnp.asarray(s)))])


# The streams are the reference's on each mesh, chunking and batch split, so the same on all of them; the fast
# lane runs the one that splits the batch (a local row index in place of the global one fails there).
@pytest.mark.parametrize(
    ("tp", "dp", "chunk"), [(2, 4, 4), pytest.param(1, 1, 1, marks=pytest.mark.slow)], ids=["tp2dp4", "tp1dp1"]
)
def test_sampled_tokens_follow_the_per_sequence_streams(ckpt, rng, tp, dp, chunk):
    """Teacher-forced against the numpy model: step s of row r draws with fold_in(fold_in(key, s), r)."""
    seed, temperature, top_p = int(rng.integers(1 << 30)), 0.8, 0.9
    model = _model(ckpt, tp, dp)
    out = models.generate(model, ckpt["prompts"], 6, temperature=temperature, top_p=top_p, seed=seed, chunk_size=chunk)
    key, hf = jax.random.key(seed), CONFIG.to_hf()
    for row, (prompt, seq) in enumerate(zip(ckpt["prompts"], out, strict=True)):
        logits = np_reference.forward(hf, ckpt["weights"], prompt + seq[:-1])[len(prompt) - 1 :]
        want = [_reference_sample(logits[s], key, s, row, temperature, top_p) for s in range(len(seq))]
        assert seq == want


def test_decode_loop_compiles_once_per_chunk_size_and_sampling_kind(ckpt):
    init(2, dp=1)
    config = llama_config(num_hidden_layers=1)  # what is counted does not depend on the depth; compiles cost less
    model = models.load_state_dict(config, models.random_checkpoint(config, seed=1))  # fresh: its own trace counts
    models.generate(model, ckpt["prompts"], 8, chunk_size=3)
    models.generate(model, ckpt["prompts"], 8, eos_token_id=1, chunk_size=3)
    assert model.trace_counts["decode"] == 1
    models.generate(model, ckpt["prompts"], 8, temperature=0.5, chunk_size=3)
    models.generate(model, ckpt["prompts"], 8, temperature=0.7, top_p=0.5, chunk_size=3)
    assert model.trace_counts["decode"] == 2  # greedy and sampling: two builds, any temperature in the second
    models.generate(model, ckpt["prompts"], 8, chunk_size=5)
    assert model.trace_counts["decode"] == 3


def _host_conditionals(lowered) -> int:
    """``lax.cond``/``switch`` in a lowered program (StableHLO ``if``/``case``): on GPUs XLA copies each one's
    predicate to the host and waits for it, so one inside the decode loop stalls every step."""
    text = lowered.as_text()
    return text.count("stablehlo.if") + text.count("stablehlo.case")


def test_the_decode_and_prefill_steps_have_no_conditional(ckpt):
    model = _model(ckpt, 2, 4)
    pre = prefill(model, ckpt["prompts"], NEW_TOKENS)
    rest = (jnp.int32(1), jax.random.key(0), jnp.float32(0.5), jnp.float32(0.9))
    for greedy in (True, False):
        loop = model.decode_loop(4, greedy=greedy)
        assert _host_conditionals(loop.lower(model.state, pre.cache, pre.tokens, pre.lengths, *rest)) == 0
        ids, lens = np.ones((8, 8), np.int32), np.full(8, 8, np.int32)
        lowered = model.prefill_step().lower(model.state, ids, lens, *rest[1:], max_len=16, greedy=greedy)
        assert _host_conditionals(lowered) == 0
    # the detector sees one where there is one
    with_cond = jax.jit(lambda t, x: jax.lax.cond(t > 0, lambda x: x + 1, lambda x: x - 1, x))
    assert _host_conditionals(with_cond.lower(jnp.float32(0), jnp.ones(3))) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(chunk_size=0), r"generate: expected a positive int chunk_size \(decode steps per call\), got 0"),
        (dict(chunk_size=True), "expected a positive int chunk_size"),
        (dict(chunk_size=2.0), "expected a positive int chunk_size"),
        (dict(eos_token_id="2"), r"expected eos_token_id as a token id or a list of them, got '2'"),
        (dict(eos_token_id=[1, -1]), r"expected eos_token_id as a token id or a list of them, got \[1, -1\]"),
        (dict(eos_token_id=[True]), "expected eos_token_id as a token id"),
    ],
)
def test_decode_argument_errors(ckpt, kwargs, message):
    model = _model(ckpt, 1, 1)
    with pytest.raises(ValueError, match=message):
        models.generate(model, [[1, 2]], 4, **kwargs)
    with pytest.raises(ValueError, match=message):
        generate_stream(model, [[1, 2]], 4, **kwargs)  # at the call, not at the first item


@pytest.mark.parametrize(("tp", "dp"), [(1, 1), (2, 2)])
def test_decode_with_the_decode_kernels_matches_reference(tp, dp, monkeypatch):
    """The decode kernels (Pallas, interpreted on CPU): the GEMV in every product, the LM head included, the
    fused attention in every layer's decode step and, at TP 1, the fused residual add + RMSNorm."""
    import kernels.add_rms_norm
    import kernels.decode_attention
    import kernels.gemv

    traced, attended, normed = [], [], []
    real_norm = kernels.add_rms_norm.add_rms_norm
    monkeypatch.setattr(
        kernels.add_rms_norm, "add_rms_norm", lambda *a, **kw: normed.append(a[0].shape) or real_norm(*a, **kw)
    )
    real, real_attention = kernels.gemv.gemv, kernels.decode_attention.decode_attention
    monkeypatch.setattr(
        kernels.gemv, "gemv", lambda x, w, **kw: traced.append((x.shape, kw.get("layout", "kn"))) or real(x, w, **kw)
    )
    monkeypatch.setattr(
        kernels.decode_attention,
        "decode_attention",
        lambda *a, **kw: attended.append(a[0].shape) or real_attention(*a, **kw),
    )
    config = llama_config(**WIDE_HEADS)
    rng = np.random.default_rng([SESSION_SEED, 29, tp])
    weights, prompts, greedy = checkpoint_without_near_ties(config, rng, (7, 3, 5), 6)
    spmd.destroy_model_parallel()
    init(tp, dp=dp)
    model = models.load_state_dict(config, weights).with_kernels("interpret")
    out = models.generate(model, prompts, 6, chunk_size=4)
    assert out == [g for g, _ in greedy]
    # per layer: qkv, o, gate_up, down; then the LM head ("nk"); in the prefill (M = batch x prompt <= 64) and the loop
    layers = config.num_hidden_layers
    assert [layout for _, layout in traced].count("nk") == 2 and len(traced) == 2 * (4 * layers + 1)
    assert len(attended) == layers  # the decode loop's step (the prefill attends with XLA)
    # each norm after the embedding's (the first layer's input norm has nothing to add): 2 per layer - 1 + the
    # final one, reading the GEMV's split-K partials (TP > 1: the all-reduce's fused call instead)
    assert len(normed) == (2 * layers if tp == 1 else 0)
    assert all(shape[0] > 1 for shape in normed)
    traced.clear()
    attended.clear()
    normed.clear()
    xla = models.generate(model.with_kernels("xla"), prompts, 6, chunk_size=4)
    assert xla == out and not traced and not attended and not normed
    with pytest.raises(ValueError, match=r"with_kernels: expected one of \('auto', 'xla', 'pallas', 'interp"):
        model.with_kernels("gpu")


def test_steps_past_the_budget_stay_inside_the_cache(monkeypatch, rng):
    """A chunk longer than the budget computes extra steps: they must not write past the cache's last row
    (the GPU kernel's store has no bounds check), and the tokens returned are the budget's."""
    import kernels.decode_attention

    config = llama_config(**WIDE_HEADS, num_hidden_layers=1)  # every layer's step writes at the same positions
    seen = []
    real = kernels.decode_attention.decode_attention

    def spy(qkv, k_cache, v_cache, positions, *a, **kw):
        jax.debug.callback(lambda p, s=k_cache.shape[2]: seen.append((int(p.max()), s)), positions)
        return real(qkv, k_cache, v_cache, positions, *a, **kw)

    monkeypatch.setattr(kernels.decode_attention, "decode_attention", spy)
    spmd.destroy_model_parallel()
    init(1)
    model = models.load_state_dict(config, models.random_checkpoint(config, seed=3)).with_kernels("interpret")
    prompts = [rng.integers(0, config.vocab_size, 8).tolist()]
    out = models.generate(model, prompts, 8, chunk_size=16)  # cache of 16 rows, 7 steps budgeted, 16 computed
    assert len(out[0]) == 8
    assert seen and all(p < s for p, s in seen) and max(p for p, _ in seen) == 15
