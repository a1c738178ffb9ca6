"""Which kernels a decode step runs: the Pallas decode kernels or XLA's own fusions.

* Products: a projection that sees at most 64 rows (a decode step's batch) reads its whole weight
  for a few outputs; on GPUs where :mod:`kernels.gemv`'s tuning table lists the shape (measured
  faster than XLA in the same run), :func:`matmul` runs the Pallas GEMV, else ``jnp.dot``.
* Attention: on GPUs, :func:`decode_attention_mode` says the fused kernel of
  :mod:`kernels.decode_attention` (RoPE, cache write and attention in one launch instead of about
  a dozen) runs where it takes the shapes, for half-precision models.
* Residual add + RMSNorm: at TP 1 the layers keep the residual stream as ``h + sum(partials)`` and
  :func:`add_rms_norm` adds and normalises in one launch of :mod:`kernels.add_rms_norm` (GPUs,
  half precision, at most 64 rows), reading the output and down projections' split-K partials.
* SwiGLU + down projection: where the table lists the down projection with the ``"swiglu"``
  prologue (measured against the activation fusion + product apart), :func:`swiglu_matmul_partials`
  builds ``silu(gate) * up`` inside the GEMV from the gate/up projection's partials: one launch less per layer.

The layers call these; users call nothing new. :func:`kernel_mode` overrides the choice for the
steps traced inside it: ``"auto"`` (the default: the kernels where measured faster, as above),
``"xla"`` (always XLA), ``"pallas"`` (the kernels compiled for the device wherever they take the
shapes, any float dtype, the table's tiling or a default one: GPU tests) and ``"interpret"`` (the
same in Pallas's interpreter: CPU tests of the model path).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

import spmd
from kernels import add_rms_norm as norm_kernel
from kernels import decode_attention as attention_kernel
from kernels import gemv as gemv_kernels

__all__ = [
    "KERNEL_MODES",
    "add_rms_norm",
    "choose_gemv",
    "decode_attention",
    "decode_attention_mode",
    "kernel_mode",
    "matmul",
    "matmul_partials",
    "swiglu_matmul_partials",
]

KERNEL_MODES = ("auto", "xla", "pallas", "interpret")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("decode_kernel_mode", default="auto")


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Use ``mode`` for the products traced inside the ``with`` block (``jit`` caches what it traced).

    Raises:
      ValueError: ``mode`` is not one of :data:`KERNEL_MODES`.
    """
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel_mode: expected one of {KERNEL_MODES}, got {mode!r}.")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def _device() -> Any:
    """The device the layers run on: the model-parallel mesh's first, else JAX's default."""
    if spmd.model_parallel_is_initialized():
        return spmd.get_mesh().devices.flat[0]
    return jax.devices()[0]


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def _default_config(k: int, n: int) -> gemv_kernels.GemvConfig:
    block_k = _largest_pow2_divisor(k, 64)
    splits = 2 if (k // block_k) % 2 == 0 else 1
    return gemv_kernels.GemvConfig(_largest_pow2_divisor(n, 128), block_k, splits)


def choose_gemv(
    m: int, k: int, n: int, dtype: Any, layout: str = "kn", prologue: str = "none"
) -> gemv_kernels.GemvConfig | None:
    """The GEMV tiling for ``[m, k] x (k, n)`` (with ``prologue``) under the current mode and device, or
    ``None`` (XLA; for a prologue: the activation and the product apart)."""
    mode = _MODE.get()
    if mode == "xla" or not 1 <= m <= 64:
        return None
    device = _device()
    if mode == "auto" and device.platform != "gpu":
        return None
    kind, name = device.device_kind, jnp.dtype(dtype).name
    listed = gemv_kernels.lookup(gemv_kernels.load_table(), kind, name, layout, m, k, n, prologue)
    if mode == "auto" or listed is not None:
        return listed
    config = _default_config(k, n)  # "pallas" / "interpret": any shape the kernel can tile
    return None if gemv_kernels.ineligibility(m, k, n, config, layout) else config


def matmul_partials(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x[M, K] @ W[K, N]`` as float32 partial sums ``[P, M, N]`` (the GEMV's split-K partials, or ``P = 1``)."""
    m, k = x.shape
    n = w.shape[1]
    config = choose_gemv(m, k, n, x.dtype) if x.dtype == w.dtype else None
    if config is None:
        return jnp.dot(x, w, preferred_element_type=jnp.float32)[None]
    return gemv_kernels.gemv(x, w, config=config, reduce=False, interpret=_MODE.get() == "interpret")


def swiglu_matmul_partials(gate_up: jax.Array, w: jax.Array) -> jax.Array:
    """``(silu(gate) * up) @ W`` as float32 partials ``[P, M, N]``: one GEMV launch with the activation
    built in where the current mode and table choose it (``choose_gemv(..., prologue="swiglu")``), else
    the activation and :func:`matmul_partials` apart.

    Args:
      gate_up: the gate/up projection's float32 split-K partials ``[S, M, 2K]``, gate columns first.
      w: the down projection's weight ``[K, N]``; the activation is rounded to its dtype.

    Raises:
      ValueError: ``gate_up`` does not match ``w``.
    """
    k, n = w.shape
    if gate_up.ndim != 3 or gate_up.shape[-1] != 2 * k:
        raise ValueError(f"swiglu_matmul_partials: gate/up partials {gate_up.shape} do not match a [{k}, {n}] weight.")
    config = choose_gemv(gate_up.shape[1], k, n, w.dtype, prologue="swiglu")
    if config is None:
        gate, up = jnp.split(jnp.sum(gate_up, axis=0).astype(w.dtype), 2, axis=-1)
        return matmul_partials(jax.nn.silu(gate) * up, w)
    interpret = _MODE.get() == "interpret"
    return gemv_kernels.gemv(gate_up, w, config=config, reduce=False, prologue="swiglu", interpret=interpret)


def matmul(x: jax.Array, w: jax.Array, *, layout: str = "kn", out_dtype: Any = None) -> jax.Array:
    """``x @ W`` (``W[K, N]``, ``layout="kn"``) or ``x @ W.T`` (``W[N, K]``, ``"nk"``), float32 accumulation.

    Args:
      x: ``T[..., K]``.
      w: the weight, in ``layout``.
      layout: ``"kn"`` or ``"nk"``.
      out_dtype: the result's dtype (default: the operands' result type).

    Returns:
      ``[..., N]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or jnp.result_type(x.dtype, w.dtype)
    k = x.shape[-1]
    n = w.shape[1] if layout == "kn" else w.shape[0]
    m = math.prod(x.shape[:-1])
    config = choose_gemv(m, k, n, x.dtype, layout) if x.dtype == w.dtype else None
    if config is None:
        wk = w if layout == "kn" else w.T
        return jnp.dot(x, wk, preferred_element_type=jnp.float32).astype(out_dtype)
    y = gemv_kernels.gemv(
        x.reshape(m, k), w, config=config, layout=layout, out_dtype=out_dtype, interpret=_MODE.get() == "interpret"
    )
    return y.reshape(*x.shape[:-1], n)


def decode_attention_mode(heads: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any) -> str | None:
    """``"gpu"``, ``"pallas"`` or ``"interpret"`` where the fused decode-attention kernel runs, else ``None``.

    On GPUs it runs for half-precision caches (bf16, f16: serving); a float32 model keeps XLA's
    path, whose rounding the float32 checks against Hugging Face were made with.
    """
    mode = _MODE.get()
    if mode == "xla" or attention_kernel.decode_attention_ineligibility(heads, kv_heads, head_dim, max_len):
        return None
    if mode in ("interpret", "pallas"):
        return mode
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "gpu" if half and _device().platform == "gpu" else None


def decode_attention(qkv, k_cache, v_cache, positions, inv_freq, *, heads: int):
    """The fused kernel (:func:`kernels.decode_attention.decode_attention`) in the current mode's lowering.

    Args:
      qkv: ``[P, B, heads + 2 * kv_heads, head_dim]``: the QKV projection's partials (see :func:`matmul_partials`).

    Returns:
      ``(C[B, heads, head_dim], k_cache, v_cache)``: the attention output and the caches with this step's row.
    """
    return attention_kernel.decode_attention(
        qkv, k_cache, v_cache, positions, inv_freq, heads=heads, interpret=_MODE.get() == "interpret"
    )


def add_rms_norm(delta: jax.Array, residual: jax.Array, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(rms_norm(h), h)`` with ``h = cast(sum_p delta[p]) + residual``: the residual add and the next norm.

    One kernel (:func:`kernels.add_rms_norm.add_rms_norm`) where the mode allows it: on GPUs for
    half-precision residuals of at most 64 rows (a decode step), or in ``"pallas"``/``"interpret"``
    modes wherever it takes the shape; else the same steps in XLA (the same formula: the partials
    summed in float32 and cast, the add rounded to the dtype, Hugging Face's RMSNorm).

    Args:
      delta: ``[P, B, D]`` partial sums (a projection's split-K partials; ``P = 1``: its output).
      residual: ``T[B, D]``.
      weight, eps: the norm's.

    Returns:
      ``(T[B, D], T[B, D])``: the normalised rows and ``h``.
    """
    mode, (b, d) = _MODE.get(), residual.shape
    use = mode != "xla" and 1 <= b <= 64 and norm_kernel.add_rms_norm_ineligibility(d) is None
    if use and mode == "auto":
        half = residual.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        use = half and _device().platform == "gpu"
    if not use:
        return norm_kernel.reference_add_rms_norm(delta, residual, weight, eps)
    return norm_kernel.add_rms_norm(delta, residual, weight, eps=eps, interpret=mode == "interpret")
