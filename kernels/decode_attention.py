"""One decode step of GQA attention with RoPE and the KV-cache write fused into one kernel.

A decode step's attention is small work split into many launches by XLA (RoPE on q and k, two
cache writes, the scores, the mask, two softmax reductions, the probabilities times V, casts):
about a dozen kernels of 1-3 us each per layer, each bound by launch latency, not by bytes. This
kernel does all of it in one launch. Program ``(b, h)`` (a batch row and a KV head):

1. sums the fused QKV projection's split-K partials (the GEMV's output, so nothing runs between
   the projection and this kernel), for its ``G = heads / kv_heads`` query heads (loaded as 16 rows,
   the tensor cores' smallest M, the rows past ``G`` masked) and its new key and value;
2. rotates them by ``positions[b]`` (rotate-half RoPE in float32, cos/sin from ``inv_freq``),
   working on the two halves of ``head_dim`` apart, and writes the key and the value into row
   ``positions[b]`` of its cache (the caches are aliased to the outputs: updated in place when the
   caller donates them);
3. attends over rows ``0 .. positions[b]`` only, in blocks of ``block_s`` rows with an online softmax:
   scores and probabilities times V on the tensor cores in the cache's dtype (IEEE float32 for
   float32 caches), float32 accumulation, the new row taken from registers; rows past the position
   are never read.

The Triton lowering runs it on GPUs; ``interpret=True`` anywhere. :func:`reference_decode_attention`
is the plain-JAX computation it must equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["decode_attention", "decode_attention_ineligibility", "reference_decode_attention"]

_Q_ROWS = 16  # the query heads of one KV head, padded to the tensor cores' smallest M


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def decode_attention_ineligibility(heads: int, kv_heads: int, head_dim: int, max_len: int) -> str | None:
    """Why the kernel cannot run these shapes (``None``: it can)."""
    if kv_heads < 1 or heads % kv_heads:
        return f"{heads} query heads do not group over {kv_heads} KV heads"
    if heads // kv_heads > 16 or not _pow2(heads // kv_heads):
        return f"{heads // kv_heads} query heads per KV head (the kernel takes a power of two up to 16)"
    if head_dim % 2 or not _pow2(head_dim // 2) or head_dim < 32:
        return f"head_dim={head_dim}: half of it must be a power of two of at least 16 (tensor-core products)"
    if not _pow2(max_len) or max_len < 16:
        return f"cache length {max_len} is not a power of two of at least 16"
    return None


def _rotate(x1, x2, cos, sin):
    """Rotate-half RoPE on the halves of ``x``: ``[x1 cos - x2 sin, x2 cos + x1 sin]``."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def reference_decode_attention(qkv, k_cache, v_cache, positions, inv_freq, *, heads):
    """Plain JAX: RoPE, the cache write, masked softmax attention (float32), as the kernel computes it.

    Args:
      qkv: ``[P, B, heads + 2 * kv_heads, d]`` partials (summed here); the rest as :func:`decode_attention`.

    Returns:
      ``(C[B, heads, d], k_cache, v_cache)`` with row ``positions[b]`` of each cache written.
    """
    qkv = jnp.sum(qkv.astype(jnp.float32), axis=0)  # [B, heads + 2 kv, d]
    b, _, d = qkv.shape
    kv = k_cache.shape[1]
    q, k_new, v_new = qkv[:, :heads], qkv[:, heads : heads + kv], qkv[:, heads + kv :]
    half = d // 2
    ang = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [B, 1, d/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def rope(x):
        a, c = _rotate(x[..., :half], x[..., half:], cos, sin)
        return jnp.concatenate([a, c], axis=-1)

    qr, kr = rope(q), rope(k_new).astype(k_cache.dtype)

    def write(cache, new, pos):  # cache [KV, S, d], new [KV, d]
        return lax.dynamic_update_slice(cache, new[:, None], (0, pos, 0))

    k_cache = jax.vmap(write)(k_cache, kr, positions)
    v_cache = jax.vmap(write)(v_cache, v_new.astype(v_cache.dtype), positions)
    qg = qr.reshape(b, kv, heads // kv, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache.astype(jnp.float32)) * (d**-0.5)
    valid = jnp.arange(k_cache.shape[2])[None, :] <= positions[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache.astype(jnp.float32))
    return out.reshape(b, heads, d).astype(k_cache.dtype), k_cache, v_cache


def _kernel(pos_ref, freq_ref, qkv_ref, kc_ref, vc_ref, o_ref, kc_out, vc_out, *, heads, kv_heads, block_s):
    """Program ``(b, h)``: KV head ``h`` of batch row ``b`` and its query heads (rows padded to 16)."""
    half = freq_ref.shape[0]
    groups = heads // kv_heads
    h = pl.program_id(1)
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    pos = pos_ref[0]
    ang = pos.astype(jnp.float32) * freq_ref[...]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    dtype = kc_out.dtype
    exact = dtype == jnp.float32  # float32 caches: IEEE products, not TF32

    def summed(index):  # this step's projection, summed over the split-K partials
        total = None
        for p in range(qkv_ref.shape[0]):
            part = qkv_ref[(p, *index)].astype(jnp.float32)
            total = part if total is None else total + part
        return total

    rows = jnp.arange(_Q_ROWS)
    in_group = rows < groups
    q_rows = pl.ds(h * groups, _Q_ROWS)

    def q_half(cols):  # [16, half]: this KV head's query heads, the rows past the group zero
        total = None
        for p in range(qkv_ref.shape[0]):
            part = pltriton.load(qkv_ref.at[jnp.int32(p), q_rows, cols], mask=in_group[:, None], other=0.0)
            total = part.astype(jnp.float32) if total is None else total + part.astype(jnp.float32)
        return total

    k1, k2 = _rotate(summed((heads + h, lo)), summed((heads + h, hi)), cos, sin)
    v_new = summed((heads + kv_heads + h, slice(None)))
    row = pl.ds(pos, 1)
    kc_out[row, lo] = k1.astype(dtype)[None, :]
    kc_out[row, hi] = k2.astype(dtype)[None, :]
    vc_out[row, :] = v_new.astype(vc_out.dtype)[None, :]
    k1n, k2n, v_newc = k1.astype(dtype), k2.astype(dtype), v_new.astype(vc_out.dtype)

    scale = (2 * half) ** -0.5
    q1, q2 = _rotate(q_half(lo), q_half(hi), cos[None, :], sin[None, :])
    q1, q2 = (q1 * scale).astype(dtype), (q2 * scale).astype(dtype)

    def body(i, carry):
        m, denom, acc = carry
        start = i * block_s
        cols = start + jnp.arange(block_s)
        here = (cols == pos)[:, None]
        blk = pl.ds(start, block_s)
        kb1 = jnp.where(here, k1n[None, :], kc_ref[blk, lo])
        kb2 = jnp.where(here, k2n[None, :], kc_ref[blk, hi])
        vb = jnp.where(here, v_newc[None, :], vc_ref[blk, :])
        s = pltriton.dot(q1, kb1, trans_b=True, allow_tf32=not exact)
        s = s + pltriton.dot(q2, kb2, trans_b=True, allow_tf32=not exact)  # [16, block_s], float32
        s = jnp.where((cols <= pos)[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        pv = pltriton.dot(p.astype(vb.dtype), vb, allow_tf32=not exact)
        return m_new, denom * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    d = 2 * half
    init = (jnp.full((_Q_ROWS,), -jnp.inf, jnp.float32), jnp.zeros((_Q_ROWS,), jnp.float32),
            jnp.zeros((_Q_ROWS, d), jnp.float32))  # fmt: skip
    _, denom, acc = lax.fori_loop(0, pos // block_s + 1, body, init)
    out = acc / jnp.where(in_group, denom, 1.0)[:, None]
    pltriton.store(o_ref.at[q_rows, :], out.astype(o_ref.dtype), mask=in_group[:, None])


@functools.partial(jax.jit, static_argnames=("heads", "block_s", "num_warps", "num_stages", "interpret"))
def decode_attention(
    qkv, k_cache, v_cache, positions, inv_freq, *, heads, block_s=64, num_warps=4, num_stages=2, interpret=False
):
    """RoPE, the cache write and GQA attention of one decode step, in one kernel.

    Args:
      qkv: ``[P, B, heads + 2 * kv_heads, d]``: this step's fused QKV projection (query heads, then
        keys, then values), as ``P`` split-K partials that the kernel sums (``P = 1``: the projection
        itself); any float dtype. Keys and queries before RoPE.
      k_cache, v_cache: ``C[B, kv_heads, S, d]``; row ``positions[b]`` is written (in place if donated).
      positions: ``int32[B]``: each row's position (``< S``).
      inv_freq: ``f32[d / 2]``: RoPE's inverse frequencies (scaled as the model's config says).
      heads: the query heads (``heads / kv_heads`` share each KV head).
      block_s: cache rows per step of the online softmax (capped at ``S``).
      num_warps, num_stages: Triton's launch and pipelining parameters.
      interpret: run in Pallas's interpreter (any backend; for tests).

    Returns:
      ``(C[B, heads, d], k_cache, v_cache)``.

    Raises:
      ValueError: shapes that do not match or that the kernel does not take
        (:func:`decode_attention_ineligibility`).
    """
    parts, b, width, d = qkv.shape
    kv = (width - heads) // 2
    if k_cache.shape[:2] != (b, kv) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"decode_attention: qkv {qkv.shape} with {heads} query heads means caches [{b}, {kv}, S, {d}], got "
            f"{k_cache.shape} and {v_cache.shape}."
        )
    s = k_cache.shape[2]
    reason = decode_attention_ineligibility(heads, kv, d, s)
    if reason:
        raise ValueError(f"decode_attention: {reason}.")
    block_s = max(16, min(block_s, s))
    # The kernel reads and writes 16 head rows from each group's first; a GPU masks the rows past the
    # array, the interpreter clamps its slices instead: give it room.
    pad = _Q_ROWS if interpret else 0
    qkv = jnp.pad(qkv, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else qkv
    cache_spec = pl.BlockSpec((None, None, s, d), lambda i, j: (i, j, 0, 0))
    out, k_cache, v_cache = pl.pallas_call(
        functools.partial(_kernel, heads=heads, kv_heads=kv, block_s=block_s),
        out_shape=(
            jax.ShapeDtypeStruct((b, heads + pad, d), k_cache.dtype),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ),
        grid=(b, kv),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((d // 2,), lambda i, j: (0,)),
            pl.BlockSpec((parts, None, width + pad, d), lambda i, j: (0, i, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_specs=[pl.BlockSpec((None, heads + pad, d), lambda i, j: (i, 0, 0)), cache_spec, cache_spec],
        input_output_aliases={3: 1, 4: 2},
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="decode_attention",
    )(positions.astype(jnp.int32), inv_freq.astype(jnp.float32), qkv, k_cache, v_cache)
    return out[:, :heads], k_cache, v_cache
