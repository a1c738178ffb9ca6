"""Collectives as pure functions over mesh axis names.

Each function is traced inside ``jax.shard_map`` (or any context that binds ``axis_name``) and
works on a single array or a pytree of arrays. Options are keyword-only. Every function returns its
input untouched when the axis has size 1 (a reduction of a value that ``check_vma`` types as
varying over that axis keeps a no-op ``psum`` so its result is typed invariant, as for larger
axes), and raises a clear error when the axis is not bound, when a dimension is out of range or
when a size does not divide by the group size.

Semantics (``n`` is the size of ``axis_name``; ``r`` is this device's rank along it):

* ``all_reduce``: the elementwise sum over the ``n`` ranks, identical on every rank.
* ``all_gather``: every rank's block concatenated along ``axis`` in rank order.
* ``reduce_scatter``: the sum over ranks, then rank ``r`` keeps the ``r``-th of ``n`` equal slices
  of ``axis``.
* ``all_to_all``: ``split_axis`` cut into ``n`` blocks, block ``j`` sent to rank ``j``, received
  blocks concatenated along ``concat_axis`` in rank order.
* ``broadcast``: rank ``src``'s value on every rank, bit for bit.
* ``gather``: the ``all_gather`` result on rank ``dst``, zeros elsewhere.
* ``shift``: rank ``r`` receives rank ``r - offset``'s value (the in-graph ``send``/``recv``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spmd.axes import AxisName

__all__ = [
    "UnboundAxisError",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "axis_index",
    "axis_is_bound",
    "axis_size",
    "broadcast",
    "gather",
    "reduce_scatter",
    "shift",
    "varying_axes",
]


class UnboundAxisError(NameError, ValueError):
    """A collective was called where its mesh axis is not bound (outside ``shard_map``)."""


def _axis_label(axis_name: AxisName) -> str:
    return repr(axis_name) if isinstance(axis_name, tuple) else repr(str(axis_name))


def axis_size(axis_name: AxisName, *, op: str = "axis_size") -> int:
    """The number of devices along ``axis_name`` (a static int).

    Raises:
      UnboundAxisError: ``axis_name`` is not bound here (the call is not under ``shard_map``
        over a mesh with that axis).
    """
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise UnboundAxisError(
            f"{op}: found an unbound axis name: {_axis_label(axis_name)}. Collectives run inside "
            f"jax.shard_map over a mesh that has this axis: wrap the caller with "
            f"spmd.shard_map(fn, in_specs=..., out_specs=...) after spmd.initialize_model_parallel(...), "
            f"or jax.shard_map(fn, mesh=mesh, ...) with axis {_axis_label(axis_name)} in mesh.axis_names."
        ) from e


def axis_is_bound(axis_name: AxisName) -> bool:
    """Whether ``axis_name`` is bound here (the caller runs under ``shard_map`` over it)."""
    try:
        lax.axis_size(axis_name)
    except NameError:
        return False
    return True


def axis_index(axis_name: AxisName, *, op: str = "axis_index") -> jax.Array:
    """This device's rank along ``axis_name`` (a traced int32 scalar)."""
    axis_size(axis_name, op=op)
    return lax.axis_index(axis_name)


def _normalize_dim(op: str, x: jax.Array, dim: int) -> int:
    ndim = x.ndim
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
        raise TypeError(f"{op}: expected an int dimension, got {dim!r}.")
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{op}: dim {dim} is out of range for an array of shape {tuple(x.shape)} "
            f"(rank {ndim}); expected {-ndim} <= dim < {ndim}."
        )
    return int(dim) % ndim


def _check_divisible(op: str, x: jax.Array, dim: int, n: int, axis_name: AxisName) -> None:
    if x.shape[dim] % n:
        raise ValueError(
            f"{op}: dimension {dim} of shape {tuple(x.shape)} has size {x.shape[dim]}, which is not "
            f"divisible by the group size {n} (axis {_axis_label(axis_name)}). Pad that dimension to a "
            f"multiple of {n} or pick another dim."
        )


def _check_rank(op: str, what: str, value: int, n: int, axis_name: AxisName) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{op}: expected an int {what}, got {value!r}.")
    if not 0 <= value < n:
        raise ValueError(
            f"{op}: {what}={value} is out of range for axis {_axis_label(axis_name)} of size {n}; "
            f"expected 0 <= {what} < {n}."
        )
    return int(value)


def _as_array(op: str, leaf: Any) -> jax.Array:
    arr = jnp.asarray(leaf)
    if arr.dtype == jnp.bool_:
        raise TypeError(
            f"{op}: cannot sum a boolean array (shape {tuple(arr.shape)}); cast it to an integer "
            f"dtype first, e.g. x.astype(jnp.int32)."
        )
    return arr


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    return jax.tree.map(fn, tree)


def varying_axes(v: Any) -> frozenset[str]:
    """The mesh axes ``v`` is typed as varying over (``shard_map``'s ``check_vma`` types).

    Args:
      v: an array or tracer.

    Returns:
      The axis names; empty outside ``shard_map`` and under ``shard_map(..., check_vma=False)``.
    """
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _size_one_reduce(tree: Any, axis_name: AxisName) -> Any:
    """A reduction over a size-1 axis: the input itself, bit for bit.

    One subtlety keeps ``check_vma`` typing right: a leaf typed as varying over the axis goes
    through the bitwise broadcast from rank 0 (an integer ``psum`` over a group of one, exact)
    so its result is typed invariant, as it is when the axis is larger. Otherwise
    ``out_specs=P()`` would pass at tp=2 and fail at tp=1.
    """
    axes = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}
    return _map(lambda v: _broadcast_leaf(v, axis_name, 0) if axes & varying_axes(v) else v, tree)


def all_reduce(x: Any, axis_name: AxisName) -> Any:
    """Sum ``x`` over ``axis_name``; every rank gets the same result.

    Args:
      x: an array or a pytree of arrays, ``T[...]``.
      axis_name: a mesh axis name or a tuple of names.

    Returns:
      ``T[...]``: the elementwise sum over the group.

    Raises:
      UnboundAxisError: the axis is not bound (not under ``shard_map``).
      TypeError: a leaf is boolean.
    """
    n = axis_size(axis_name, op="all_reduce")
    leaves = _map(lambda v: _as_array("all_reduce", v), x)
    if n == 1:
        return _size_one_reduce(x, axis_name)
    return lax.psum(leaves, axis_name)


def all_gather(x: Any, axis_name: AxisName, *, axis: int = -1) -> Any:
    """Concatenate every rank's ``x`` along ``axis`` in rank order.

    Args:
      x: ``T[..., d, ...]`` (``d`` at ``axis``), or a pytree of such arrays.
      axis_name: a mesh axis name or a tuple of names.
      axis: the dimension to concatenate along; negative counts from the end.

    Returns:
      ``T[..., n * d, ...]``; rank ``r``'s block occupies ``[r * d, (r + 1) * d)``. The result is
      the same on every rank, and under ``shard_map(..., check_vma=True)`` it is typed so
      (invariant over ``axis_name``, JAX's ``all_gather(..., to="invarying")``), so
      ``out_specs=P()`` accepts it.

    Raises:
      UnboundAxisError: the axis is not bound.
      ValueError: ``axis`` is out of range for a leaf.
    """
    n = axis_size(axis_name, op="all_gather")
    axes = set(axis_name) if isinstance(axis_name, tuple) else {axis_name}

    def one(v: Any) -> jax.Array:
        v = jnp.asarray(v)
        d = _normalize_dim("all_gather", v, axis)
        typed = bool(axes & varying_axes(v))
        if n == 1:
            return _broadcast_leaf(v, axis_name, 0) if typed else v
        if typed:
            return lax.all_gather(v, axis_name, axis=d, tiled=True, to="invarying")
        return lax.all_gather(v, axis_name, axis=d, tiled=True)

    return _map(one, x)


def reduce_scatter(x: Any, axis_name: AxisName, *, axis: int = -1) -> Any:
    """Sum ``x`` over ``axis_name`` and keep this rank's slice of ``axis``.

    Args:
      x: ``T[..., n * d, ...]`` (``n * d`` at ``axis``), or a pytree of such arrays.
      axis_name: a mesh axis name or a tuple of names.
      axis: the dimension to scatter; its size must divide by the group size ``n``.

    Returns:
      ``T[..., d, ...]``: rows ``[r * d, (r + 1) * d)`` of the sum, on rank ``r``.

    Raises:
      UnboundAxisError: the axis is not bound.
      ValueError: ``axis`` is out of range, or its size is not divisible by ``n``.
      TypeError: a leaf is boolean.
    """
    n = axis_size(axis_name, op="reduce_scatter")

    def one(v: Any) -> jax.Array:
        v = _as_array("reduce_scatter", v)
        d = _normalize_dim("reduce_scatter", v, axis)
        _check_divisible("reduce_scatter", v, d, n, axis_name)
        if n == 1:
            return v
        return lax.psum_scatter(v, axis_name, scatter_dimension=d, tiled=True)

    return _map(one, x)


def all_to_all(x: Any, axis_name: AxisName, *, split_axis: int = 0, concat_axis: int = -1) -> Any:
    """Exchange blocks: block ``j`` of ``split_axis`` goes to rank ``j``.

    Args:
      x: ``T[...]`` whose ``split_axis`` divides by the group size ``n``, or a pytree of them.
      axis_name: a mesh axis name or a tuple of names.
      split_axis: the dimension cut into ``n`` blocks, one per destination rank.
      concat_axis: the dimension along which the ``n`` received blocks are concatenated, in
        source-rank order.

    Returns:
      An array with ``split_axis`` divided by ``n`` and ``concat_axis`` multiplied by ``n``
      (the shape is unchanged when the two axes are the same).

    Raises:
      UnboundAxisError: the axis is not bound.
      ValueError: an axis is out of range, or ``split_axis`` is not divisible by ``n``.
    """
    n = axis_size(axis_name, op="all_to_all")

    def one(v: Any) -> jax.Array:
        v = jnp.asarray(v)
        s = _normalize_dim("all_to_all", v, split_axis)
        c = _normalize_dim("all_to_all", v, concat_axis)
        _check_divisible("all_to_all", v, s, n, axis_name)
        if n == 1:
            return v
        return lax.all_to_all(v, axis_name, s, c, tiled=True)

    return _map(one, x)


_UINT_OF_WIDTH = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _masked_psum(v: jax.Array, axis_name: AxisName, src: int) -> jax.Array:
    keep = lax.axis_index(axis_name) == src
    return lax.psum(jnp.where(keep, v, jnp.zeros_like(v)), axis_name)


def _bitwise_broadcast(v: jax.Array, axis_name: AxisName, src: int) -> jax.Array:
    """Rank ``src``'s bits on every rank: a masked integer psum of the bit pattern (exact)."""
    if v.dtype == jnp.bool_:
        return _masked_psum(v.astype(jnp.uint8), axis_name, src).astype(jnp.bool_)
    width = v.dtype.itemsize
    if jnp.issubdtype(v.dtype, jnp.complexfloating) or width not in _UINT_OF_WIDTH:
        return lax.all_gather(v, axis_name, axis=0, tiled=False)[src]
    if width == 8 and not jax.config.jax_enable_x64:
        return lax.all_gather(v, axis_name, axis=0, tiled=False)[src]
    bits = lax.bitcast_convert_type(v, _UINT_OF_WIDTH[width])
    return lax.bitcast_convert_type(_masked_psum(bits, axis_name, src), v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _differentiable_broadcast(v: jax.Array, axis_name: AxisName, src: int) -> jax.Array:
    return _bitwise_broadcast(v, axis_name, src)


def _broadcast_fwd(v, axis_name, src):
    return _bitwise_broadcast(v, axis_name, src), v


def _broadcast_bwd(axis_name, src, v, ct):
    # The gradient of "take src's value" is the gradient of the masked sum it equals.
    _, vjp = jax.vjp(lambda u: _masked_psum(u, axis_name, src), v)
    return vjp(ct)


_differentiable_broadcast.defvjp(_broadcast_fwd, _broadcast_bwd)


def _broadcast_leaf(v: Any, axis_name: AxisName, src: int) -> jax.Array:
    v = jnp.asarray(v)
    if jnp.issubdtype(v.dtype, jnp.floating):
        return _differentiable_broadcast(v, axis_name, src)
    return _bitwise_broadcast(v, axis_name, src)


def broadcast(x: Any, axis_name: AxisName, *, src: int = 0) -> Any:
    """Every rank gets rank ``src``'s ``x``, bit for bit (NaN payloads and -0.0 kept).

    The bits travel as one integer all-reduce in which only ``src`` contributes, so the cost is
    one all-reduce of ``x``'s size. Differentiable for floating dtypes: the gradient flows to
    rank ``src`` only.

    Args:
      x: an array or a pytree of arrays of any dtype.
      axis_name: a mesh axis name or a tuple of names.
      src: the source rank along ``axis_name``, ``0 <= src < n``.

    Raises:
      UnboundAxisError: the axis is not bound.
      ValueError: ``src`` is out of range.
    """
    n = axis_size(axis_name, op="broadcast")
    src = _check_rank("broadcast", "src", src, n, axis_name)
    if n == 1:
        return _size_one_reduce(x, axis_name)

    return _map(lambda v: _broadcast_leaf(v, axis_name, src), x)


def gather(x: Any, axis_name: AxisName, *, dst: int = 0, axis: int = -1) -> Any:
    """Concatenate every rank's ``x`` along ``axis`` on rank ``dst``.

    An SPMD program has one shape on every rank, so ranks other than ``dst`` get zeros of the
    gathered shape (vLLM returns ``None`` there). Use :func:`all_gather` when every rank needs it.

    Raises:
      UnboundAxisError: the axis is not bound.
      ValueError: ``dst`` or ``axis`` is out of range.
    """
    n = axis_size(axis_name, op="gather")
    dst = _check_rank("gather", "dst", dst, n, axis_name)
    gathered = all_gather(x, axis_name, axis=axis)
    if n == 1:
        return gathered
    is_dst = lax.axis_index(axis_name) == dst
    return _map(lambda g: jnp.where(is_dst, g, jnp.zeros_like(g)), gathered)


def shift(x: Any, axis_name: AxisName, *, offset: int = 1, wrap: bool = True) -> Any:
    """Send ``x`` to rank ``r + offset``: rank ``r`` receives rank ``r - offset``'s value.

    This is vLLM's point-to-point ``send``/``recv`` pair in SPMD form (one ``ppermute``): every
    rank sends and receives at once. With ``wrap=False`` ranks with no sender receive zeros and
    values sent past either end are dropped (a pipeline's first and last stage).

    Raises:
      UnboundAxisError: the axis is not bound.
      TypeError: ``offset`` is not an int.
    """
    n = axis_size(axis_name, op="shift")
    if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool):
        raise TypeError(f"shift: expected an int offset, got {offset!r}.")
    if wrap:
        perm = [(i, (i + offset) % n) for i in range(n)]
    else:
        perm = [(i, i + offset) for i in range(n) if 0 <= i + offset < n]
    if all(s == d for s, d in perm) and len(perm) == n:
        return x
    return _map(lambda v: lax.ppermute(jnp.asarray(v), axis_name, perm), x)
