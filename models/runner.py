"""A causal LM placed on the mesh, and its jitted steps: score, prefill, decode.

:class:`CausalLM` holds a decoder's state as global arrays (each parameter sharded as its metadata
says) and builds, once per model, one ``jax.jit(spmd.shard_map(...))`` per entry point:

* ``score``: logits for every position, ``f32[batch, tokens, vocab]``;
* ``prefill``: right-padded prompts -> the first sampled token per sequence and a new KV cache
  (compiled once per batch / prompt-length / cache-length bucket);
* ``decode``: ``chunk`` tokens per sequence against the cache in one call, a ``lax.fori_loop`` on
  the device (a static trip count: no per-step host sync); the cache donated (compiled once per
  batch bucket, cache length and chunk).

Sampling (greedy at temperature 0, else temperature + top-p, seeded per sequence) runs in the same
jitted step, so the host dispatches once per chunk, not once per token. Sequences are split over ("dp", "ep")
(the layout the MoE block expects), heads over "tp". ``trace_counts`` counts how often each step
was traced (a test checks decode is traced once for a whole generation).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import spmd
from models import decode_kernels
from models.config import ModelConfig
from models.llama import KVCache
from models.moe import auto_low_latency
from models.sharding import shard_state
from spmd import DP, EP, TP

__all__ = ["BATCH_AXES", "CausalLM", "sample_tokens", "shard_causal_lm"]

BATCH_AXES = (DP, EP)


def sample_tokens(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    rows: jax.Array,
    *,
    greedy: bool = False,
) -> jax.Array:
    """``f32[B, vocab] -> int32[B]``: argmax at ``temperature == 0``, else a draw from the top-p nucleus.

    The nucleus keeps the most probable tokens whose cumulative probability before them is below
    ``top_p`` (always at least one), as Hugging Face's ``TopPLogitsWarper``. Row ``b`` draws with
    ``fold_in(key, rows[b])`` (``rows``: the rows' global indices), so a sequence's draws do not
    depend on how the batch is split over devices.

    ``greedy=True`` (static: the caller knows ``temperature == 0``) is the argmax alone, without the
    sort. With ``greedy=False`` both are computed and ``temperature`` selects, so any temperature is
    right. Not a ``lax.cond``: on GPUs XLA reads a conditional's predicate back to the host and waits
    for it, which inside the decode loop stalled every step and made each call block.
    """

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)
        pick = jax.vmap(jax.random.categorical)(keys, sorted_logits)
        return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)

    if greedy:
        return argmax(logits)
    return jnp.where(temperature > 0, sampled(logits), argmax(logits))


@dataclasses.dataclass(frozen=True, eq=False)
class CausalLM:
    """A decoder on the mesh. Build it with :func:`models.from_pretrained` or :func:`shard_causal_lm`.

    Attributes:
      config: the model's config.
      graphdef, state, state_specs: the module split (``nnx.split``), its state placed on ``mesh``.
      mesh: the mesh it runs on.
      dtype: the parameters' dtype (the KV cache's too).
      kernels: which products the steps run (:func:`models.decode_kernels.kernel_mode`: ``"auto"``,
        the measured GEMV kernel where it is faster; ``"xla"``; ``"interpret"``); see :meth:`with_kernels`.
      moe_paths: what the MoE blocks' low-latency choice gave (:func:`models.moe.auto_low_latency`: buffers,
        or why the fallback manager runs); empty for a dense model.
      trace_counts: how many times each step (``"score"``, ``"prefill"``, ``"decode"``) was traced.
    """

    config: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    state_specs: nnx.State
    mesh: Mesh
    dtype: Any
    kernels: str = "auto"
    moe_paths: tuple[str, ...] = ()
    trace_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _steps: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def module(self) -> nnx.Module:
        """The module around the placed state."""
        return nnx.merge(self.graphdef, self.state)

    @property
    def tp_size(self) -> int:
        return self.mesh.shape[TP]

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this (the ("dp", "ep") devices sharing them)."""
        return self.mesh.shape[DP] * self.mesh.shape[EP]

    def cache_specs(self) -> KVCache:
        spec = P(BATCH_AXES, TP, None, None)
        n = self.config.num_hidden_layers
        return KVCache((spec,) * n, (spec,) * n)

    def cache_shape(self, batch: int, max_len: int) -> tuple[int, int, int, int]:
        """One layer's key (or value) cache, global: ``[batch, kv_heads (x replicas), max_len, head_dim]``."""
        c = self.config
        return (batch, max(c.num_key_value_heads, self.tp_size), max_len, c.head_dim)

    def _shardings(self, specs: Any) -> Any:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    def with_kernels(self, kernels: str) -> CausalLM:
        """The same model (the same placed weights) whose steps run ``kernels`` products (traced anew).

        Raises:
          ValueError: ``kernels`` is not one of :data:`models.decode_kernels.KERNEL_MODES`.
        """
        if kernels not in decode_kernels.KERNEL_MODES:
            raise ValueError(f"with_kernels: expected one of {decode_kernels.KERNEL_MODES}, got {kernels!r}.")
        return dataclasses.replace(self, kernels=kernels, trace_counts=collections.Counter(), _steps={})

    def _shard_map(self, fn, in_specs, out_specs):
        kernels = self.kernels

        def per_device(*args):
            with decode_kernels.kernel_mode(kernels):  # read by the layers while this traces
                return fn(*args)

        return spmd.shard_map(
            per_device, in_specs=(self.state_specs, *in_specs), out_specs=out_specs, mesh=self.mesh, check_vma=False
        )

    # the steps (built once per model) -------------------------------------------------------------

    def score_step(self):
        """``(state, ids int32[B, T], positions int32[B, T]) -> f32[B, T, vocab]``."""
        if "score" not in self._steps:
            graphdef, tokens = self.graphdef, P(BATCH_AXES, None)
            per_device = self._shard_map(
                lambda state, ids, pos: nnx.merge(graphdef, state)(ids, pos),
                (tokens, tokens),
                P(BATCH_AXES, None, None),
            )

            def step(state, ids, positions):
                self.trace_counts["score"] += 1
                return per_device(state, ids, positions)

            self._steps["score"] = jax.jit(step)
        return self._steps["score"]

    def prefill_step(self):
        """``(state, ids int32[B, T], lengths int32[B], key, temperature, top_p, *, max_len, greedy=False)
        -> (first new tokens int32[B], their positions int32[B] (the lengths), cache)``.

        ``greedy`` (static): ``temperature`` is 0, so the sampling is left out (:func:`sample_tokens`)."""
        if "prefill" not in self._steps:
            graphdef = self.graphdef
            cache_specs = self.cache_specs()

            def step(state, ids, lengths, key, temperature, top_p, *, max_len, greedy=False):
                self.trace_counts["prefill"] += 1
                per_device = self._shard_map(
                    lambda state, ids, lengths: nnx.merge(graphdef, state).prefill(ids, lengths, max_len),
                    (P(BATCH_AXES, None), P(BATCH_AXES)),
                    (P(BATCH_AXES, None), cache_specs),
                )
                logits, cache = per_device(state, ids, lengths)
                rows = jnp.arange(ids.shape[0], dtype=jnp.int32)
                first = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, top_p, rows, greedy=greedy)
                return first, lengths, cache

            rows = self._shardings(P(BATCH_AXES))
            self._steps["prefill"] = jax.jit(
                step, static_argnames=("max_len", "greedy"), out_shardings=(rows, rows, self._shardings(cache_specs))
            )
        return self._steps["prefill"]

    def decode_loop(self, chunk: int, *, greedy: bool = False):
        """``chunk`` decode steps in one call, on the device (a ``lax.fori_loop`` inside the sharded step).

        ``(state, cache, tokens int32[B], positions int32[B], start int32, key, temperature, top_p)
        -> (tokens, positions, cache, new int32[B, chunk])``

        Step ``i`` feeds the last tokens at ``positions`` (clamped to the cache: steps past a caller's
        budget compute garbage but never write outside it), writes them into the cache (donated),
        samples the next ones with ``fold_in(key, start + i)`` and stores them in column ``i`` of
        ``new``. The trip count is static: XLA runs the loop without reading a flag back to the host
        each step, and the call returns at once (the host can queue the next chunk while this one
        runs). Stopping on EOS or at a token budget is the caller's: it reads ``new`` per chunk.
        ``greedy=True`` is for ``temperature == 0`` only: argmax, no sampling (:func:`sample_tokens`).
        """
        if (chunk, greedy) not in self._steps.setdefault("decode", {}):
            graphdef = self.graphdef
            cache_specs = self.cache_specs()

            def per_device(state, cache, tokens, positions, start, key, temperature, top_p):
                module = nnx.merge(graphdef, state)
                b, last = tokens.shape[0], cache.keys[0].shape[2] - 1 if cache.keys else 0
                rows = spmd.axis_index(BATCH_AXES) * b + jnp.arange(b, dtype=jnp.int32)

                def body(i, carry):
                    tokens, positions, cache, new = carry
                    logits, cache = module.decode(tokens, jnp.minimum(positions, last), cache)
                    nxt = sample_tokens(
                        logits, jax.random.fold_in(key, start + i), temperature, top_p, rows, greedy=greedy
                    )
                    new = lax.dynamic_update_slice(new, nxt[:, None], (0, i))
                    return nxt, positions + 1, cache, new

                new = jnp.full((b, chunk), -1, jnp.int32)
                return lax.fori_loop(0, chunk, body, (tokens, positions, cache, new))

            rows, scalar = P(BATCH_AXES), P()
            sharded = self._shard_map(
                per_device,
                (cache_specs, rows, rows, scalar, scalar, scalar, scalar),
                (rows, rows, cache_specs, P(BATCH_AXES, None)),
            )

            def step(state, cache, tokens, positions, start, key, temperature, top_p):
                self.trace_counts["decode"] += 1
                return sharded(state, cache, tokens, positions, start, key, temperature, top_p)

            shard = self._shardings
            out = (shard(rows), shard(rows), shard(cache_specs), shard(P(BATCH_AXES, None)))
            self._steps["decode"][chunk, greedy] = jax.jit(step, donate_argnums=(1,), out_shardings=out)
        return self._steps["decode"][chunk, greedy]


def shard_causal_lm(module: nnx.Module, *, mesh: Mesh | None = None) -> CausalLM:
    """Place a decoder built with random (or already placed) weights on the mesh.

    Args:
      module: a :class:`~models.llama.LlamaForCausalLM` or :class:`~models.mixtral.MixtralForCausalLM`
        built for the mesh's TP size.
      mesh: defaults to the global mesh.

    Raises:
      ValueError: the module was built for another TP size, or its parameters do not split over
        the mesh (e.g. experts over "ep").
    """
    mesh = spmd.get_mesh() if mesh is None else mesh
    config = getattr(module, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"shard_causal_lm: expected a LlamaForCausalLM or MixtralForCausalLM, got {type(module).__name__}."
        )
    config.check_parallel(mesh.shape[TP], mesh.shape[EP])
    built_for = module.model.embed_tokens.tp_size
    if built_for != mesh.shape[TP]:
        raise ValueError(
            f"shard_causal_lm: the model was built for tp={built_for}, the mesh has tp={mesh.shape[TP]}; "
            f"build it after spmd.initialize_model_parallel(tensor_model_parallel_size={mesh.shape[TP]})."
        )
    # the low-latency EP kernel where eligible and opted in (SPMD_EP_LOW_LATENCY=1); before the split:
    # the managers (static, in the graphdef) take their buffers here
    moe_paths = tuple(auto_low_latency(module, mesh=mesh)) if config.is_moe else ()
    graphdef, state = nnx.split(module)
    placed, specs = shard_state(state, mesh=mesh)
    return CausalLM(config, graphdef, placed, specs, mesh, module.dtype, moe_paths=moe_paths)
