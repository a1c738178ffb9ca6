"""A decode step's residual add and RMSNorm in one kernel, reading the projection's split-K partials.

Between two projections of a decode step the residual stream takes an add and a norm: the output
(or down) projection's split-K partials are summed and cast, added to the residual, and the sum is
normalised for the next projection. XLA makes two or three fusions of that (the partial sum, the
norm's mean, the scaling), each a launch of a few microseconds for a few kilobytes. This kernel is
one launch; program ``b`` handles batch row ``b``:

1. sums ``delta[:, b, :]`` over the partials in float32 and casts it to the residual's dtype (the
   projection's output, as XLA's path rounds it);
2. adds the residual (float32, rounded to the dtype): ``h``, the new residual stream;
3. normalises ``h`` as Hugging Face's RMSNorm: ``weight * cast(h / sqrt(mean(h^2) + eps))``.

The Triton lowering runs it on GPUs; ``interpret=True`` anywhere. :func:`reference_add_rms_norm`
is the plain-JAX computation it must equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["add_rms_norm", "add_rms_norm_ineligibility", "reference_add_rms_norm"]


def add_rms_norm_ineligibility(hidden: int) -> str | None:
    """Why the kernel cannot take rows of ``hidden`` elements (``None``: it can)."""
    if hidden < 16 or hidden & (hidden - 1):
        return f"hidden size {hidden} is not a power of two of at least 16 (one Triton block per row)"
    return None


def reference_add_rms_norm(delta, residual, weight, eps):
    """Plain JAX: ``h = cast(sum_p delta[p]) + residual``; ``(weight * cast(h * rsqrt(mean(h^2) + eps)), h)``."""
    dtype = residual.dtype
    h = (jnp.sum(delta.astype(jnp.float32), axis=0).astype(dtype) + residual).astype(dtype)
    h32 = h.astype(jnp.float32)
    normed = (h32 * lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)).astype(dtype)
    return (weight * normed).astype(dtype), h


def _kernel(delta_ref, res_ref, w_ref, n_ref, h_ref, *, eps):
    dtype = h_ref.dtype
    total = None
    for p in range(delta_ref.shape[0]):  # the partials in order: a fixed summation order
        part = delta_ref[p, :].astype(jnp.float32)
        total = part if total is None else total + part
    h = (total.astype(dtype).astype(jnp.float32) + res_ref[...].astype(jnp.float32)).astype(dtype)
    h32 = h.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(h32 * h32) / h32.shape[0] + eps)
    normed = (h32 * inv).astype(dtype)
    n_ref[...] = (w_ref[...].astype(jnp.float32) * normed.astype(jnp.float32)).astype(n_ref.dtype)
    h_ref[...] = h


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(delta, residual, weight, *, eps, num_warps=4, interpret=False):
    """``(normed, h)`` for one decode step's residual add + RMSNorm, in one kernel.

    Args:
      delta: ``[P, B, D]``: what the residual gets, as ``P`` partial sums (a GEMV's split-K partials
        in float32, or ``P = 1``: the projection's output); any float dtype.
      residual: ``T[B, D]``: the residual stream (``T`` sets the dtype of both results).
      weight: ``[D]``: the norm's weight.
      eps: the norm's epsilon.
      num_warps: Triton's launch parameter.
      interpret: run in Pallas's interpreter (any backend; for tests).

    Returns:
      ``(T[B, D] normalised, T[B, D] h = cast(sum(delta)) + residual)``.

    Raises:
      ValueError: shapes that do not match, or a hidden size the kernel does not take.
    """
    parts, b, d = delta.shape
    if residual.shape != (b, d) or weight.shape != (d,):
        raise ValueError(
            f"add_rms_norm: delta {delta.shape} means a residual [{b}, {d}] and a weight [{d}], got "
            f"{residual.shape} and {weight.shape}."
        )
    reason = add_rms_norm_ineligibility(d)
    if reason:
        raise ValueError(f"add_rms_norm: {reason}.")
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=float(eps)),
        out_shape=(jax.ShapeDtypeStruct((b, d), residual.dtype), jax.ShapeDtypeStruct((b, d), residual.dtype)),
        grid=(b,),
        in_specs=[pl.BlockSpec((parts, None, d), lambda i: (0, i, 0)), row, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row, row],
        interpret=interpret,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="add_rms_norm",
    )(delta, residual, weight)
