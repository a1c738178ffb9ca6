"""What every KV pipe checks about the arrays it takes and makes: dtypes, host views, shapes, KV heads.

The dtypes that may travel are :data:`spmd.wire.ALLOWED_DTYPES`, named by :func:`spmd.wire.dtype_from_name`
(one table for host-level messages and KV pipes). A shape announced by a peer is checked here before
anything is allocated for it (:func:`array_spec`): non-negative ints, at most 64 dimensions, and
a byte count that an ``int64`` can hold (numpy's own size arithmetic would wrap around silently).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from spmd.wire import ALLOWED_DTYPES, dtype_from_name

__all__ = [
    "MAX_NDIM",
    "array_spec",
    "as_device_array",
    "as_host_array",
    "check_dtype",
    "check_head_axis",
    "check_shape",
    "dtype_from_name",
    "dtype_name",
    "num_heads",
]

MAX_NDIM = 64
_INT64_MAX = (1 << 63) - 1
_64BIT = frozenset(["int64", "uint64", "float64", "complex128"])


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: Any) -> str:
    """``np.dtype(dtype)``'s name (``"bfloat16"`` for ml_dtypes' types), remembered per dtype."""
    return str(np.dtype(dtype))


def as_host_array(tensor: Any, *, fn: str) -> np.ndarray:
    """A C-contiguous, native-order numpy view of ``tensor`` (a copy only when it must be made contiguous).

    Raises:
      TypeError: not a numpy / JAX array, or a dtype outside :data:`~spmd.wire.ALLOWED_DTYPES`.
    """
    if isinstance(tensor, (np.ndarray, np.generic)):
        a = np.asarray(tensor)
    elif hasattr(tensor, "__jax_array__") or type(tensor).__module__.startswith(("jax", "jaxlib")):
        a = np.asarray(tensor)
    else:
        raise TypeError(f"{fn}: expected a numpy or JAX array (or None), got {type(tensor).__qualname__}.")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if dtype_name(a.dtype) not in ALLOWED_DTYPES:
        raise TypeError(f"{fn}: cannot send an array of dtype {a.dtype}; allowed: {sorted(ALLOWED_DTYPES)}.")
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return a


def check_dtype(a: Any, fn: str) -> None:
    """64-bit arrays cannot live on devices unless ``jax_enable_x64`` is on: refuse, never truncate.

    Raises:
      TypeError: a 64-bit dtype with ``jax_enable_x64`` off.
    """
    import jax

    name = dtype_name(a.dtype)
    if name in _64BIT and not jax.config.jax_enable_x64:
        raise TypeError(
            f"{fn}: a {name} array would be truncated to 32 bits on the device (jax_enable_x64 is off); "
            f"enable jax_enable_x64 or send it through TCPKVPipe."
        )


def as_device_array(tensor: Any, fn: str) -> Any:
    """``tensor`` as a ``jax.Array`` as is, or a host view (:func:`as_host_array`), that fits on a device.

    Raises:
      TypeError: not an array, a dtype that cannot travel, or a 64-bit dtype with ``jax_enable_x64`` off.
    """
    import jax

    if not isinstance(tensor, jax.Array):
        tensor = as_host_array(tensor, fn=fn)
    check_dtype(tensor, fn)
    return tensor


def check_shape(shape: Any, itemsize: int, fn: str) -> tuple[int, ...]:
    """``shape`` as a tuple, once it is a list of at most 64 non-negative ints whose bytes fit in an ``int64``.

    Raises:
      ValueError: anything else (no such array can have been sent).
    """
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ValueError(f"{fn}: malformed array shape {shape!r:.200}; expected at most {MAX_NDIM} ints >= 0.")
    if math.prod(shape) * itemsize > _INT64_MAX:  # Python ints: the product itself cannot overflow
        raise ValueError(
            f"{fn}: an array of shape {list(shape)!r:.200} with {itemsize}-byte elements holds more bytes than an "
            f"int64 can count; no such array can have been sent."
        )
    return tuple(shape)


def array_spec(meta: dict[str, Any], fn: str) -> tuple[np.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` of a peer's array metadata (``{"dtype": name, "shape": [...]}``), validated.

    Raises:
      ValueError: malformed metadata, a dtype that may not travel, or a shape :func:`check_shape` refuses.
    """
    dtype, shape = meta.get("dtype"), meta.get("shape")
    if not isinstance(dtype, str) or not isinstance(shape, list):
        raise ValueError(f"{fn}: malformed array metadata {meta!r:.200}")
    dt = dtype_from_name(dtype)
    try:
        return dt, check_shape(shape, dt.itemsize, fn)
    except ValueError as e:
        raise ValueError(f"{fn}: malformed array metadata {meta!r:.200} ({e})") from None


def check_head_axis(head_axis: Any) -> None:
    """Raise ``ValueError`` unless ``head_axis`` is a non-negative int (``bool`` is not one)."""
    if isinstance(head_axis, bool) or not isinstance(head_axis, int) or head_axis < 0:
        raise ValueError(f"send_kv_cache: head_axis must be a non-negative int, got {head_axis!r}.")


def num_heads(layers: list[Any], head_axis: int) -> int:
    """The number of KV heads every layer holds on ``head_axis``.

    Raises:
      ValueError: a bad ``head_axis``, a layer without heads on it, or layers that disagree.
    """
    check_head_axis(head_axis)
    shapes = [tuple(np.shape(x)) for x in layers]
    for i, s in enumerate(shapes):
        if len(s) <= head_axis or s[head_axis] < 1:
            raise ValueError(f"send_kv_cache: layer {i} has shape {list(s)}, with no KV heads on axis {head_axis}.")
    heads = {s[head_axis] for s in shapes}
    if len(heads) != 1:
        raise ValueError(f"send_kv_cache: layers disagree on the number of KV heads: {sorted(heads)}.")
    return heads.pop()
