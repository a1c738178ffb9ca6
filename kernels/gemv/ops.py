"""Skinny matrix products for decoding: ``y[M, N] = x[M, K] @ W`` with ``M <= 64``, bound by reading ``W``.

At decode time a projection reads its whole weight to produce a few rows: the time is the weight's
bytes over HBM bandwidth, plus latency. XLA's fusions for ``M = 1`` read bf16 weights at about half
of the H200's 4.8 TB/s (../shared/ANCHORS.md); this kernel splits the work so every SM streams its
own part of the weight:

* grid ``(N / block_n, splits)``: program ``(j, s)`` reads rows ``s * K / splits ...`` (a slice of
  ``K``) of the ``block_n`` columns ``j``, i.e. one ``[K / splits, block_n]`` tile of ``W``, in
  ``block_k``-row steps, and accumulates in float32;
* ``M = 1``: products and sums on the vector units, the reduction over ``K`` deferred to the end of
  the loop (``acc[block_k, block_n]``, summed once); ``M > 1``: ``pltriton.dot`` on the tensor cores with
  ``x`` padded to 16, 32 or 64 rows;
* each program writes a float32 partial ``[M, block_n]``; the ``splits`` partials are summed (and
  cast) by XLA, which fuses that sum into whatever consumes the result.

A prologue may build ``x`` inside the kernel: ``prologue="swiglu"`` takes the gate/up projection's
float32 split-K partials ``[S, M, 2K]`` (gate columns first) and computes ``silu(gate) * up`` for
its own ``K`` slice as it streams ``W``, each step rounded to the weight's dtype as the unfused
``jax.nn.silu(gate) * up`` rounds: the MLP's down projection then needs no separate launch for the
activation.

Two weight layouts: ``"kn"`` (``W[K, N]``, JAX's kernel layout, every linear layer) and ``"nk"``
(``W[N, K]``, ``y = x @ W.T``: a tied embedding used as the LM head).

The kernel is Pallas with the Triton lowering (GPUs); ``interpret=True`` runs it anywhere (CPU tests).
:func:`reference_matmul` is the plain-JAX product it must equal.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["LAYOUTS", "PROLOGUES", "GemvConfig", "gemv", "ineligibility", "reference_matmul", "swiglu"]

LAYOUTS = ("kn", "nk")
PROLOGUES = ("none", "swiglu")
_DOT_ROWS = 16  # the tensor cores' smallest M


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """One tiling of the kernel.

    Attributes:
      block_n: output columns per program (a power of two).
      block_k: rows of ``W`` per loop step (a power of two).
      splits: programs sharing one column block, each over ``K / splits`` rows.
      num_warps, num_stages: Triton's launch and pipelining parameters (``None``: Triton's default).
    """

    block_n: int
    block_k: int
    splits: int
    num_warps: int | None = 4
    num_stages: int | None = 3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemvConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def ineligibility(m: int, k: int, n: int, config: GemvConfig, layout: str = "kn") -> str | None:
    """Why :func:`gemv` cannot run this shape with this tiling (``None``: it can)."""
    if layout not in LAYOUTS:
        return f"layout {layout!r} is not one of {LAYOUTS}"
    if not 1 <= m <= 64:
        return f"M={m} rows: the kernel is for 1 to 64"
    c = config
    if not all(_pow2(v) for v in (c.block_n, c.block_k, c.splits)):
        return f"block_n={c.block_n}, block_k={c.block_k} and splits={c.splits} must be powers of two"
    if n % c.block_n:
        return f"N={n} is not a multiple of block_n={c.block_n}"
    if k % (c.splits * c.block_k):
        return f"K={k} is not a multiple of splits x block_k = {c.splits * c.block_k}"
    return None


def reference_matmul(x: jax.Array, w: jax.Array, layout: str = "kn") -> jax.Array:
    """``x @ W`` (``"kn"``) or ``x @ W.T`` (``"nk"``), accumulated in float32, in ``x``'s dtype."""
    wk = w if layout == "kn" else w.T
    return jnp.dot(x, wk, preferred_element_type=jnp.float32).astype(x.dtype)


def swiglu(gate: jax.Array, up: jax.Array, dtype: Any) -> jax.Array:
    """``silu(gate) * up`` computed in float32 and rounded to ``dtype`` after each step, as XLA rounds
    ``jax.nn.silu(gate) * up`` on ``dtype`` operands (sigmoid, the product with ``gate``, the product with ``up``)."""

    def rounded(v):
        return v.astype(dtype).astype(jnp.float32)

    g, u = rounded(gate), rounded(up)
    return rounded(rounded(g * rounded(1.0 / (1.0 + jnp.exp(-g)))) * u)


def _x_loader(x_refs, prologue: str, block_k: int, dtype: Any):
    """``load(i, rows)``: float32 ``x[rows, i-th block_k slice]`` (``rows``: a row index or ``slice(None)``)."""
    if prologue == "none":
        (x_ref,) = x_refs
        return lambda i, rows: x_ref[rows, pl.ds(i * block_k, block_k)].astype(jnp.float32)
    gate_ref, up_ref = x_refs  # [S, rows, K / splits] each: the gate/up partials of this program's K slice

    def load(i, rows):
        g = jnp.sum(gate_ref[:, rows, pl.ds(i * block_k, block_k)].astype(jnp.float32), axis=0)
        u = jnp.sum(up_ref[:, rows, pl.ds(i * block_k, block_k)].astype(jnp.float32), axis=0)
        return swiglu(g, u, dtype)

    return load


def _vector_kernel(*refs, block_k: int, steps: int, layout: str, prologue: str):
    """``M = 1``: ``o[0, bn] = sum_k x[0, k] * W[k, n]`` over this program's K slice."""
    *x_refs, w_ref, o_ref = refs
    load = _x_loader(x_refs, prologue, block_k, w_ref.dtype)
    if layout == "kn":  # w_ref: [K / splits, bn]

        def body(i, acc):
            xs = load(i, 0)
            ws = w_ref[pl.ds(i * block_k, block_k), :].astype(jnp.float32)
            return acc + xs[:, None] * ws

        shape, axis = (block_k, w_ref.shape[1]), 0
    else:  # w_ref: [bn, K / splits]

        def body(i, acc):
            xs = load(i, 0)
            ws = w_ref[:, pl.ds(i * block_k, block_k)].astype(jnp.float32)
            return acc + ws * xs[None, :]

        shape, axis = (w_ref.shape[0], block_k), 1
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    o_ref[0, :] = jnp.sum(acc, axis=axis)


def _dot_kernel(*refs, block_k: int, steps: int, layout: str, prologue: str):
    """``M > 1``: ``o[M, bn] = x[M, K slice] @ W[K slice, bn]`` on the tensor cores (IEEE for float32)."""
    *x_refs, w_ref, o_ref = refs
    tf32 = w_ref.dtype != jnp.float32
    if prologue == "none":
        x_ref = x_refs[0]
        load = lambda i: x_ref[:, pl.ds(i * block_k, block_k)]  # (the operands' own dtype)
    else:
        build = _x_loader(x_refs, prologue, block_k, w_ref.dtype)
        load = lambda i: build(i, slice(None)).astype(w_ref.dtype)

    def body(i, acc):
        xs = load(i)
        if layout == "kn":
            ws = w_ref[pl.ds(i * block_k, block_k), :]
            return acc + pltriton.dot(xs, ws, allow_tf32=tf32)
        ws = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + pltriton.dot(xs, ws, trans_b=True, allow_tf32=tf32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("config", "layout", "out_dtype", "reduce", "prologue", "interpret"))
def gemv(
    x: jax.Array,
    w: jax.Array,
    *,
    config: GemvConfig,
    layout: str = "kn",
    out_dtype: Any = None,
    reduce: bool = True,
    prologue: str = "none",
    interpret: bool = False,
) -> jax.Array:
    """``x @ W`` for a few rows of ``x``, the weight streamed by ``N / block_n x splits`` programs.

    Args:
      x: ``T[M, K]``, ``1 <= M <= 64``.
      w: ``T[K, N]`` (``layout="kn"``) or ``T[N, K]`` (``"nk"``: the product is ``x @ W.T``).
      config: the tiling (:class:`GemvConfig`); see :func:`ineligibility`.
      layout: ``"kn"`` or ``"nk"``.
      out_dtype: the result's dtype (default: ``x``'s).
      reduce: sum the split-K partials (``False``: return them, ``f32[splits, M, N]``, for a consumer
        that sums them itself).
      prologue: ``"none"``, or ``"swiglu"``: ``x`` is the gate/up projection's float32 partials
        ``[S, M, 2K]`` (gate columns first) and the product is ``silu(gate) * up @ W`` (rounded as
        :func:`swiglu` says; ``out_dtype`` defaults to ``W``'s dtype).
      interpret: run the kernel in Pallas's interpreter (any backend; for tests).

    Returns:
      ``[M, N]`` in ``out_dtype``, accumulated in float32.

    Raises:
      ValueError: shapes that do not match, or a tiling that does not fit them.
    """
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv: prologue {prologue!r} is not one of {PROLOGUES}.")
    if prologue == "swiglu":
        if x.ndim != 3 or x.shape[-1] % 2 or w.ndim != 2:
            raise ValueError(
                f"gemv: the swiglu prologue expects gate/up partials [S, M, 2K] and a 2-D weight, "
                f"got shapes {x.shape} and {w.shape}."
            )
        m, k = x.shape[1], x.shape[2] // 2
    elif x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"gemv: expected x[M, K] and a 2-D weight, got shapes {x.shape} and {w.shape}.")
    else:
        m, k = x.shape
    out_dtype = out_dtype or (w.dtype if prologue == "swiglu" else x.dtype)
    n, wk = (w.shape[1], w.shape[0]) if layout == "kn" else w.shape
    if wk != k:
        raise ValueError(f"gemv: x is [{m}, {k}] but the weight ({layout}) is {w.shape}: K differs.")
    reason = ineligibility(m, k, n, config, layout)
    if reason:
        raise ValueError(f"gemv: {reason}.")
    c = config
    ks = k // c.splits
    steps = ks // c.block_k
    rows = 1 if m == 1 else max(_DOT_ROWS, 1 << (m - 1).bit_length())  # Triton blocks are powers of two
    if rows != m:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - m), (0, 0)])
    body = _vector_kernel if m == 1 else _dot_kernel
    if prologue == "none":
        xs, x_specs = (x,), [pl.BlockSpec((rows, ks), lambda j, s: (0, s))]
    else:  # K slice s of the gate is column block s of x; of the up, block s + splits
        sx = x.shape[0]
        xs = (x, x)
        x_specs = [
            pl.BlockSpec((sx, rows, ks), lambda j, s: (0, 0, s)),
            pl.BlockSpec((sx, rows, ks), lambda j, s: (0, 0, s + c.splits)),
        ]
    if layout == "kn":
        w_spec = pl.BlockSpec((ks, c.block_n), lambda j, s: (s, j))
    else:
        w_spec = pl.BlockSpec((c.block_n, ks), lambda j, s: (j, s))
    params = None if interpret else pltriton.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages)
    partials = pl.pallas_call(
        functools.partial(body, block_k=c.block_k, steps=steps, layout=layout, prologue=prologue),
        out_shape=jax.ShapeDtypeStruct((c.splits, rows, n), jnp.float32),
        grid=(n // c.block_n, c.splits),
        in_specs=[*x_specs, w_spec],
        out_specs=pl.BlockSpec((None, rows, c.block_n), lambda j, s: (s, 0, j)),
        interpret=interpret,
        compiler_params=params,
        name="gemv",
    )(*xs, w)
    if not reduce:
        return partials[:, :m]
    return jnp.sum(partials, axis=0)[:m].astype(out_dtype)
