"""Llama end to end: logits and greedy tokens against the numpy reference (tests/np_reference.py, itself
checked against Hugging Face transformers: docs/models.md), on TP 1, 2, 4, 8 (8 query heads, 2 KV
heads: KV heads replicated at 4 and 8), the KV cache against recomputation, batching, sampling, EOS,
and one trace of the decode step per generation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import np_reference
import numpy as np
import pytest
from conftest import SESSION_SEED
from flax import nnx
from jax.sharding import PartitionSpec as P
from model_fixtures import checkpoint_without_near_ties, init, llama_config, random_prompts

import models
import spmd
from models.runner import BATCH_AXES

CONFIG = llama_config()
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt():
    """(weights, config.json dict, score ids, reference logits, prompts, reference greedy tokens + margins)."""
    rng = np.random.default_rng([SESSION_SEED, 11])
    weights, prompts, greedy = checkpoint_without_near_ties(CONFIG, rng, (9, 4), NEW_TOKENS)
    ids = rng.integers(0, CONFIG.vocab_size, (2, 13))
    ref = np.stack([np_reference.forward(CONFIG.to_hf(), weights, row) for row in ids])
    return {"weights": weights, "ids": ids, "ref": ref, "prompts": prompts, "greedy": greedy}


_MODELS: dict = {}


def _model(ckpt, tp, dp=1, dtype=jnp.float32):
    """The model on a tp x dp mesh, loaded once per module (the mesh is re-initialized each test)."""
    init(tp, dp=dp)
    key = (tp, dp, jnp.dtype(dtype).name, id(ckpt["weights"]))
    if key not in _MODELS:
        _MODELS[key] = models.load_state_dict(CONFIG, ckpt["weights"], dtype=dtype)
    return _MODELS[key]


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_score_matches_reference(tp, ckpt):
    logits = models.score(_model(ckpt, tp), ckpt["ids"])
    assert logits.shape == (2, 13, CONFIG.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ckpt["ref"], rtol=0, atol=1e-3)


# The fast lane: KV heads split (TP 2, DP 4) and replicated (TP 8); the full suite adds TP 1 (generated on one
# device by tests/test_decode_loop.py's fast lane) and TP 4 (replicated as at TP 8; its cache is checked against
# recomputation by test_decode_with_cache_equals_recomputation).
@pytest.mark.parametrize("tp", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow), 8])
def test_greedy_tokens_match_reference(tp, ckpt):
    """Two prompts of different lengths in one batch, over tp x dp = 8 devices (dp splits the batch)."""
    model = _model(ckpt, tp, dp=8 // tp)
    out = models.generate(model, ckpt["prompts"], NEW_TOKENS)
    assert out == [want for want, _ in ckpt["greedy"]]


def test_batch_equals_each_prompt_alone(ckpt):
    model = _model(ckpt, 2, dp=4)
    p1, p2 = ckpt["prompts"]
    extra = [p2[:2], p1[:7] + p2]  # four prompts of lengths 9, 4, 2, 11
    batch = models.generate(model, [p1, p2, *extra], 8)
    alone = [models.generate(model, [p], 8)[0] for p in (p1, p2, *extra)]
    assert batch == alone


def test_decode_with_cache_equals_recomputation(ckpt, rng):
    """Teacher-forced decode steps against the cache give the logits of scoring the whole sequence."""
    tp = 4  # one KV head per rank, replicated twice
    model = _model(ckpt, tp)
    prompt_len, steps = 5, 6
    seq = rng.integers(0, CONFIG.vocab_size, prompt_len + steps)
    full = np.asarray(models.score(model, seq[None]))[0]
    ids = rng.integers(0, CONFIG.vocab_size, (1, 8)).astype(np.int32)  # garbage after the prompt
    ids[0, :prompt_len] = seq[:prompt_len]
    continuation = seq[None, prompt_len:].astype(np.int32)
    graphdef = model.graphdef

    def run(state, ids, lengths, continuation):
        module = nnx.merge(graphdef, state)
        logits, cache = module.prefill(ids, lengths, 16)
        out, pos = [logits], lengths
        for j in range(steps - 1):
            logits, cache = module.decode(continuation[:, j], pos, cache)
            out.append(logits)
            pos = pos + 1
        assert cache.keys[0].shape == (1, 1, 16, CONFIG.head_dim)  # per device: batch, its KV head, max_len, d
        return jnp.stack(out, axis=1)

    rows = P(BATCH_AXES)
    f = jax.jit(spmd.shard_map(run, in_specs=(model.state_specs, rows, rows, rows), out_specs=rows, check_vma=False))
    got = np.asarray(f(model.state, ids, np.array([prompt_len], np.int32), continuation))[0]
    np.testing.assert_allclose(got, full[prompt_len - 1 : prompt_len - 1 + steps], rtol=0, atol=1e-4)


def test_generating_16_tokens_traces_decode_once(ckpt, rng):
    init(2, dp=1)
    config = llama_config(num_hidden_layers=1)  # what is counted does not depend on the depth; compiles cost less
    model = models.load_state_dict(config, models.random_checkpoint(config, seed=2))
    out = models.generate(model, ckpt["prompts"], 16)
    assert [len(o) for o in out] == [16, 16]
    assert model.trace_counts["decode"] == 1 and model.trace_counts["prefill"] == 1
    models.generate(model, random_prompts(rng, CONFIG.vocab_size, (12, 3)), 16)
    assert model.trace_counts["decode"] == 1 and model.trace_counts["prefill"] == 1  # same buckets
    models.generate(model, random_prompts(rng, CONFIG.vocab_size, (12, 3)), 16, temperature=0.7, seed=5)
    models.generate(model, random_prompts(rng, CONFIG.vocab_size, (12, 3)), 16, temperature=0.3, seed=6)
    assert model.trace_counts["decode"] == 2 and model.trace_counts["prefill"] == 2  # + the sampling build


def test_sampling_is_seeded_and_eos_stops(ckpt):
    model = _model(ckpt, 2, dp=4)
    prompts = ckpt["prompts"]
    a = models.generate(model, prompts, 10, temperature=1.0, seed=3)
    assert a == models.generate(model, prompts, 10, temperature=1.0, seed=3)
    assert a != models.generate(model, prompts, 10, temperature=1.0, seed=4)
    greedy = models.generate(model, prompts, 10)
    assert models.generate(model, prompts, 10, temperature=1.0, top_p=1e-6, seed=3) == greedy  # nucleus of one
    eos = greedy[0][3]
    stopped = models.generate(model, prompts, 10, eos_token_id=eos)
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    second = greedy[1][: greedy[1].index(eos) + 1] if eos in greedy[1] else greedy[1]
    assert stopped[1] == second


def test_bf16_model_scores_close_to_reference(ckpt):
    logits = np.asarray(models.score(_model(ckpt, 2, dtype=jnp.bfloat16), ckpt["ids"]))
    assert np.abs(logits - ckpt["ref"]).max() < 0.05 * np.abs(ckpt["ref"]).max()


def test_generate_and_score_errors(ckpt):
    model = _model(ckpt, 1)
    v = CONFIG.vocab_size
    with pytest.raises(ValueError, match="expected prompts as a non-empty list"):
        models.generate(model, [], 4)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty list of token ids"):
        models.generate(model, [[1], []], 4)
    with pytest.raises(ValueError, match=f"token id {v} is out of range for a vocabulary of {v}"):
        models.generate(model, [[1, v]], 4)
    with pytest.raises(ValueError, match="expected a positive int max_new_tokens, got 0"):
        models.generate(model, [[1]], 0)
    with pytest.raises(ValueError, match=r"expected temperature >= 0 \(0: greedy\), got -1.0"):
        models.generate(model, [[1]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"expected 0 < top_p <= 1, got 0.0"):
        models.generate(model, [[1]], 2, top_p=0.0)
    with pytest.raises(TypeError, match=r"expected a model from models\.from_pretrained, got dict"):
        models.generate({}, [[1]], 2)
    with pytest.raises(ValueError, match=r"expected input_ids int\[batch, tokens\].*shape \(3,\)"):
        models.score(model, [1, 2, 3])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        models.score(model, [[1, -1]])
