"""Which kernel a layer's product runs at decode time: the measured GEMV kernel or XLA's own.

A projection that sees at most 64 rows (a decode step's batch) reads its whole weight for a few
outputs; on GPUs where :mod:`kernels.gemv`'s tuning table lists the shape (measured faster than
XLA in the same run), :func:`matmul` runs the Pallas kernel, else ``jnp.dot``. The layers call it;
users call nothing new. :func:`kernel_mode` overrides the choice for the steps traced inside it:
``"xla"`` (always XLA), ``"interpret"`` (the kernel in Pallas's interpreter, for any shape it can
tile: CPU tests of the model path), ``"auto"`` (the default).
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
from kernels import gemv as gemv_kernels

__all__ = ["KERNEL_MODES", "choose_gemv", "kernel_mode", "matmul"]

KERNEL_MODES = ("auto", "xla", "interpret")
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


def _interpret_config(k: int, n: int) -> gemv_kernels.GemvConfig:
    block_k = _largest_pow2_divisor(k, 64)
    splits = 2 if (k // block_k) % 2 == 0 else 1
    return gemv_kernels.GemvConfig(_largest_pow2_divisor(n, 128), block_k, splits)


def choose_gemv(m: int, k: int, n: int, dtype: Any, layout: str = "kn") -> gemv_kernels.GemvConfig | None:
    """The GEMV tiling for ``[m, k] x (k, n)`` under the current mode and device, or ``None`` (XLA)."""
    mode = _MODE.get()
    if mode == "xla" or not 1 <= m <= 64:
        return None
    if mode == "interpret":
        config = _interpret_config(k, n)
        return None if gemv_kernels.ineligibility(m, k, n, config, layout) else config
    device = _device()
    if device.platform != "gpu":
        return None
    entries = gemv_kernels.load_table()
    return gemv_kernels.lookup(entries, device.device_kind, jnp.dtype(dtype).name, layout, m, k, n)


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
