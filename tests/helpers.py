"""Shared test helpers: run a per-device function on every device, and dense references."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

import spmd

# (dp, pp, ep, tp) shapes over 8 devices: tp in 1, 2, 4, 8, mixed with dp / ep / pp.
MESH_SHAPES = [
    (8, 1, 1, 1),
    (4, 1, 1, 2),
    (2, 1, 1, 4),
    (1, 1, 1, 8),
    (1, 1, 2, 4),
    (2, 1, 2, 2),
    (1, 2, 2, 2),
]
MESH_IDS = [f"dp{d}pp{p}ep{e}tp{t}" for d, p, e, t in MESH_SHAPES]
DTYPES = [np.float32, ml_dtypes.bfloat16]
AXIS_POS = {"dp": 0, "pp": 1, "ep": 2, "tp": 3}


def init(shape: tuple[int, int, int, int] | None = None, *, dp: int = 1, pp: int = 1, ep: int = 1, tp: int = 1):
    """Parallel state on exactly ``dp x pp x ep x tp`` of the simulated devices (the first ones).

    The one way the tests set up a mesh: ``init((dp, pp, ep, tp))`` as :data:`MESH_SHAPES` lists
    shapes, or ``init(tp=2, ep=2)``.
    """
    if shape is not None:
        dp, pp, ep, tp = shape
    return spmd.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        data_parallel_size=dp,
        expert_model_parallel_size=ep,
        devices=jax.devices()[: dp * pp * ep * tp],
    )


def random_array(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Standard normal values in ``dtype`` (never all zeros or ones)."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def per_device(fn: Callable, x_global, *, n_out: int = 1, jit: bool = True):
    """Run ``fn(x_local)`` on every device; ``x_global[i]`` is device ``i``'s input.

    Device ``i`` is the ``i``-th device of the mesh in row-major ("tp" fastest) order.
    Returns numpy arrays stacked the same way.
    """
    spec = P(spmd.MESH_AXES)

    def body(x):
        out = fn(jax.tree.map(lambda v: v[0], x))
        return jax.tree.map(lambda v: jnp.asarray(v)[None], out)

    f = spmd.shard_map(body, in_specs=spec, out_specs=spec)
    if jit:
        f = jax.jit(f)
    return jax.tree.map(np.asarray, f(x_global))


def groups(shape: tuple[int, int, int, int], axes: tuple[str, ...]) -> np.ndarray:
    """Device positions of every group along ``axes``: ``int[num_groups, group_size]``."""
    ids = np.arange(int(np.prod(shape))).reshape(shape)
    pos = [AXIS_POS[a] for a in axes]
    rest = [i for i in range(4) if i not in pos]
    size = int(np.prod([shape[i] for i in pos]))
    return np.transpose(ids, rest + pos).reshape(-1, size)


def tolerance(dtype, n: int) -> dict:
    """Tolerances for a sum of ``n`` terms computed in ``dtype`` against a float64 reference."""
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return {"rtol": 2e-2, "atol": 2e-2 * n}
    return {"rtol": 1e-5, "atol": 1e-5 * n}


def assert_same(a, b, path: str = "v") -> None:
    """``a`` is ``b`` rebuilt: same types, keys and order, arrays equal bit for bit (dtype and shape too)."""
    assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array)), (path, type(a), type(b))
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), (path, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic, jax.Array)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert a.tobytes() == b.tobytes(), path  # bit for bit
    else:
        assert a == b, (path, a, b)


def fused_add_rms_norm_reference(parts: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float):
    """numpy: float32 rank-order sum of ``parts`` cast to their dtype, plus the residual (cast), then
    Hugging Face's RMSNorm (float32, cast, times ``weight``). Returns ``(normed, new residual)``."""
    dt = parts.dtype
    acc = parts[0].astype(np.float32)
    for p in parts[1:]:
        acc = acc + p.astype(np.float32)
    h = (acc.astype(dt).astype(np.float32) + residual.astype(np.float32)).astype(dt)
    x32 = h.astype(np.float32)
    ms = np.mean(x32.astype(np.float64) ** 2, axis=-1, keepdims=True).astype(np.float32)
    y = (x32 / np.sqrt(ms + np.float32(eps))).astype(dt)
    return (weight.astype(np.float32) * y.astype(np.float32)).astype(dt), h
