"""fp8 dispatch: tokens cross the wire as float8 e4m3 with one float32 scale per token; combine stays in bf16/f32.

Every manager takes ``use_fp8=True``. The tokens are quantized per token before the first exchange
(the sequence-parallel all-gather over "tp" included), the scale travels in the same row as the
token's values (:func:`pack_fp8_rows`: ``uint8[tokens, hidden + 4]``, so any exchange that moves
rows moves the scales with them: all-gather, all_to_all, ragged_all_to_all, the low-latency kernel),
and the rows are dequantized after the exchange, before the experts. The combine (the experts'
outputs, the weighted sum) is untouched.

The quantization (:func:`quantize_fp8`), identical on every platform:

* ``scale = 2**p``, the smallest power of two with ``max|x| / scale <= 448`` (e4m3's largest finite
  value), ``p`` clipped to ``[-126, 127]`` (a normal float32); ``q = round_to_nearest_even(x / scale)``.
  Dividing by a power of two is exact, so the rounding to e4m3 is the only rounding.
* Error: for a token with ``max|x| >= 2**-117`` (``p`` not clipped), every element comes back within
  ``2**-4 * |x| + 2**-10 * scale <= 2**-4 * |x| + 2**-17.8 * max|x|`` (e4m3 keeps 3 mantissa bits;
  below its smallest normal, 2**-6, steps are 2**-9). bf16 keeps 7 bits: ``2**-8 * |x|``. A token
  whose largest value is below ``2**-117`` loses precision (its scaled values underflow e4m3).
* An all-zero token: ``q = 0`` (its scale, ``2**-9``, is immaterial); it comes back as zeros.
* NaN policy: a token holding a NaN or an infinity comes back as NaN in EVERY element (its scale is
  NaN, its values 0). The experts would mix the non-finite value into every output anyway; this
  makes the case explicit instead of leaving it to e4m3's lack of an infinity.
* Dequantization saturates at the target dtype's largest finite value: a finite token whose largest
  value rounds up past it (within 1/16 of float32's or bf16's maximum) comes back finite, not inf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["FP8_MAX", "check_use_fp8", "dequantize_fp8", "pack_fp8_rows", "quantize_fp8", "unpack_fp8_rows"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4  # one float32 per token, after its values


def check_use_fp8(op: str, use_fp8: Any) -> bool:
    """``use_fp8`` itself when it is a bool.

    Raises:
      ValueError: it is anything else (``1``, ``"yes"``, ...).
    """
    if not isinstance(use_fp8, bool):
        raise ValueError(f"{op}: expected use_fp8 True or False, got {use_fp8!r}.")
    return use_fp8


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token e4m3 with power-of-two scales: ``(q float8_e4m3fn[T, H], scale f32[T])``, ``x ~ q * scale``.

    See the module docstring for the scale, the error bound and the NaN policy.
    """
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    finite = jnp.isfinite(amax)
    m, e = jnp.frexp(jnp.where(finite, amax, 0.0))  # amax = m * 2**e, m in [0.5, 1)
    p = jnp.clip(jnp.where(m <= 0.875, e - 9, e - 8), -126, 127)  # 448 = 0.875 * 2**9
    q = jnp.where(finite[:, None], jnp.ldexp(x32, -p[:, None]), 0.0).astype(jnp.float8_e4m3fn)
    scale = jnp.where(finite, jnp.ldexp(jnp.ones_like(amax), p), jnp.nan)
    return q, scale


def dequantize_fp8(q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    """``q * scale`` (per row) in ``dtype``, saturated at its largest finite value (NaN stays NaN)."""
    big = float(jnp.finfo(dtype).max)
    return jnp.clip(q.astype(jnp.float32) * scale[..., None], -big, big).astype(dtype)


def pack_fp8_rows(x: jax.Array) -> jax.Array:
    """``T[tokens, hidden] -> uint8[tokens, hidden + 4]``: each token's e4m3 values, then its float32 scale."""
    q, scale = quantize_fp8(x)
    scale_bytes = lax.bitcast_convert_type(scale, jnp.uint8)  # [T, 4]
    return jnp.concatenate([lax.bitcast_convert_type(q, jnp.uint8), scale_bytes], axis=-1)


def unpack_fp8_rows(rows: jax.Array, dtype: Any) -> jax.Array:
    """``uint8[..., hidden + 4] -> dtype[..., hidden]``: the inverse of :func:`pack_fp8_rows` (zero rows: zeros).

    Raises:
      TypeError: ``rows`` is not uint8 with room for a scale.
    """
    if rows.dtype != jnp.uint8 or rows.shape[-1] <= SCALE_BYTES:
        raise TypeError(
            f"unpack_fp8_rows: expected uint8 rows of hidden + {SCALE_BYTES} bytes (pack_fp8_rows'), got "
            f"{rows.dtype}{list(rows.shape)}."
        )
    q = lax.bitcast_convert_type(rows[..., :-SCALE_BYTES], jnp.float8_e4m3fn)
    scale = lax.bitcast_convert_type(rows[..., -SCALE_BYTES:], jnp.float32)
    return dequantize_fp8(q, scale, dtype)
