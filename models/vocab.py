"""vLLM's vocabulary-parallel layers: the embedding table split over "tp" by rows, and the LM head.

``VocabParallelEmbedding`` (``[vocab_padded, hidden]``, rows over "tp", the vocabulary padded to
``64 x tp``): a masked lookup, then an all-reduce. ``ParallelLMHead`` (as the embedding, or tied to
it): ``all_gather(x @ E_r^T)[:vocab]``. Conventions as :mod:`models.layers` (whose helpers these use).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spmd
from models import decode_kernels
from models.layers import DEFAULT_VOCAB_PADDING_SIZE, _check_tp, _param, _rank, _rows, _split, resolve_tp_size
from spmd import TP

__all__ = ["ParallelLMHead", "VocabParallelEmbedding", "pad_vocab_size"]


def pad_vocab_size(vocab_size: int, pad_to: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``pad_to``."""
    return -(-vocab_size // pad_to) * pad_to


class VocabParallelEmbedding(nnx.Module):
    """An embedding table whose rows (the vocabulary) are split over "tp" (vLLM's ``VocabParallelEmbedding``).

    The vocabulary is padded to a multiple of ``padding_size x tp`` (padding rows are zero); each
    rank looks up the ids in its range, zeros the others, and the ranks' results are summed.

    Args:
      num_embeddings: the vocabulary size.
      embedding_dim: the hidden size.
      params_dtype: the table's dtype.
      org_num_embeddings: accepted for vLLM compatibility (LoRA-added tokens); must equal
        ``num_embeddings`` if given.
      padding_size: pad the vocabulary to a multiple of ``padding_size x tp``; ``0`` for no
        padding (then the vocabulary must divide by the TP size).
      tp_size, rngs: as :class:`ColumnParallelLinear`.

    Raises:
      ValueError: with ``padding_size=0``, a vocabulary that does not split over the TP size.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        params_dtype: Any = jnp.float32,
        org_num_embeddings: int | None = None,
        padding_size: int = DEFAULT_VOCAB_PADDING_SIZE,
        tp_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        if org_num_embeddings not in (None, num_embeddings):
            raise ValueError(
                f"{type(self).__name__}: org_num_embeddings={org_num_embeddings} differs from num_embeddings="
                f"{num_embeddings}; added (LoRA) vocabulary is not supported."
            )
        self.tp_size = resolve_tp_size(tp_size)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_size:
            self.num_embeddings_padded = pad_vocab_size(self.num_embeddings, padding_size * self.tp_size)
        else:
            _split(type(self).__name__, "num_embeddings", self.num_embeddings, self.tp_size)
            self.num_embeddings_padded = self.num_embeddings
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        vocab = self.num_embeddings

        def init(key, shape, dtype):
            w = jax.random.normal(key, shape, dtype)
            return w.at[vocab:].set(0)

        self.weight = _param(init, (TP, None), rngs, (self.num_embeddings_padded, self.embedding_dim), params_dtype)

    def weight_loader(self, param: str, loaded: Sequence[Any], index: tuple[slice, ...]) -> np.ndarray:
        """One device's rows of the table from the checkpoint's ``[vocab, hidden]`` tensor (zero padding)."""
        (t,) = loaded
        n = self.num_embeddings_per_partition
        start = _rank(index, 0, n) * n
        stop = min(start + n, self.num_embeddings)
        rows = _rows(t, start, stop) if stop > start else np.zeros((0, self.embedding_dim), np.float32)
        out = np.zeros((n, self.embedding_dim), rows.dtype)
        out[: len(rows)] = rows
        return out

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """``int[...] -> T[..., embedding_dim]``: the ids' rows, the same on every TP rank."""
        _check_tp(self)
        n = self.num_embeddings_per_partition
        start = spmd.axis_index(TP) * n
        in_shard = (input_ids >= start) & (input_ids < start + n)
        local = jnp.where(in_shard, input_ids - start, 0)
        rows = jnp.take(self.weight[...], local, axis=0)
        rows = jnp.where(in_shard[..., None], rows, jnp.zeros((), rows.dtype))
        return spmd.tensor_model_parallel_all_reduce(rows)

    def compute_logits(self, hidden_states: jax.Array) -> jax.Array:
        """``T[..., embedding_dim] -> f32[..., num_embeddings]``: the table as an LM head, gathered over "tp"."""
        _check_tp(self)
        logits = decode_kernels.matmul(hidden_states, self.weight[...], layout="nk", out_dtype=jnp.float32)
        logits = spmd.tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to the vocabulary, rows split over "tp" (vLLM's ``ParallelLMHead``).

    Use :meth:`compute_logits`; :meth:`tie_weights` returns the embedding to use instead when the
    checkpoint ties them (``tie_word_embeddings``), as vLLM does.

    Args:
      num_embeddings, embedding_dim: vocabulary and hidden size.
      bias: not supported (Llama and Mixtral have none); must be ``False``.
      **kwargs: as :class:`VocabParallelEmbedding`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bias: bool = False, **kwargs: Any):
        if bias:
            raise ValueError("ParallelLMHead: bias=True is not supported; expected bias=False.")
        super().__init__(num_embeddings, embedding_dim, **kwargs)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> VocabParallelEmbedding:
        """The LM head to use when tied: ``embed_tokens`` itself (one table, no copy).

        Raises:
          ValueError: the embedding's shape differs.
        """
        if (embed_tokens.num_embeddings, embed_tokens.embedding_dim) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"ParallelLMHead.tie_weights: expected an embedding of {self.num_embeddings} x {self.embedding_dim}, "
                f"got {embed_tokens.num_embeddings} x {embed_tokens.embedding_dim}."
            )
        return embed_tokens
