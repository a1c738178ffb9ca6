"""Tiny Llama / Mixtral configs and random checkpoints shared by the model tests (imported, not collected).

The one place the tests' model configs are made: ``models.generate.tiny_config`` (the CLIs' demo
model: Llama 3-style GQA with 8 heads over 2 KV heads and llama3 RoPE, or Mixtral) with the sizes
cut down to what a float64 numpy reference runs in milliseconds (:data:`SMALL_LLAMA`,
:data:`SMALL_MIXTRAL`), and the one other shape the decode-kernel tests need (:data:`WIDE_HEADS`).
A test changes a field or two on top (``llama_config(tie_word_embeddings=True)``) for what it tests.
"""

from __future__ import annotations

import dataclasses

import helpers
import numpy as np

import models
from models.config import ModelConfig
from models.generate import tiny_config

# llama3 RoPE whose three bands all hold a frequency at head_dim 8, theta 10000:
# wavelengths 2*pi*[1, 10, 100, 1000] against 2048 / 4 = 512 (high) and 2048 / 1 (low)
LLAMA3 = (
    ("factor", 8.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 2048),
    ("rope_type", "llama3"),
)


# What the tests' models change of tiny_config's: sizes (heads stay 8 over 2 KV heads, Mixtral's top-2).
SMALL_LLAMA = dict(
    vocab_size=250,  # padded to 256 / 512: the padding is exercised
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    head_dim=8,
    rope_theta=10000.0,
    rope_scaling=LLAMA3,
    max_position_embeddings=4096,
)
SMALL_MIXTRAL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    head_dim=8,
    num_local_experts=4,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=4096,
)
# The decode kernels' tests: head_dim 32 (the GPU kernels' smallest tile), 4 query heads over 2 KV heads.
WIDE_HEADS = dict(hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)


def llama_config(**kw) -> ModelConfig:
    """``tiny_config("llama")`` at :data:`SMALL_LLAMA`'s sizes, with ``kw`` on top."""
    return dataclasses.replace(tiny_config("llama"), **{**SMALL_LLAMA, **kw})


def mixtral_config(**kw) -> ModelConfig:
    """``tiny_config("mixtral")`` at :data:`SMALL_MIXTRAL`'s sizes, with ``kw`` on top."""
    return dataclasses.replace(tiny_config("mixtral"), **{**SMALL_MIXTRAL, **kw})


def init(tp: int = 1, ep: int = 1, dp: int = 1) -> None:
    """A mesh of exactly tp x ep x dp devices (:func:`helpers.init`, in the order the model tests name them)."""
    helpers.init(dp=dp, ep=ep, tp=tp)


def usable_prefix(margins: list[float], min_margin: float = 1e-4) -> int:
    """How many greedy steps have an unambiguous argmax (a near-tie may flip in float32)."""
    for i, m in enumerate(margins):
        if m < min_margin:
            return i
    return len(margins)


def checkpoint_without_near_ties(config: ModelConfig, rng: np.random.Generator, lengths, new_tokens: int):
    """Fresh random weights and prompts whose reference greedy tokens have no near-tie (a few draws at most).

    Returns:
      ``(weights, prompts, [(reference tokens, margins) per prompt])``.
    """
    import np_reference

    hf = config.to_hf()
    for _ in range(8):
        weights = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)))
        prompts = random_prompts(rng, config.vocab_size, lengths)
        greedy = [np_reference.greedy(hf, weights, p, new_tokens) for p in prompts]
        if all(usable_prefix(m) == new_tokens for _, m in greedy):
            return weights, prompts, greedy
    raise AssertionError("8 random checkpoints in a row had a greedy near-tie; the test's configs need a look")


def random_prompts(rng: np.random.Generator, vocab: int, lengths) -> list[list[int]]:
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


__all__ = [
    "LLAMA3",
    "SMALL_LLAMA",
    "SMALL_MIXTRAL",
    "WIDE_HEADS",
    "checkpoint_without_near_ties",
    "init",
    "llama_config",
    "mixtral_config",
    "models",
    "random_prompts",
    "usable_prefix",
]
