"""The wire format of host-level messages: values as tagged JSON plus packed array bytes, no pickle.

:func:`encode` turns a value into a JSON-able tree and the list of its arrays; :func:`decode`
rebuilds it, validating every node, so a malformed or hostile message raises
:class:`MalformedMessageError` (a ``ValueError``) instead of anything else. Allowed values:
``None``, ``bool``, ``int`` (any size, sent in hex), ``float`` (bit-exact, NaN sign included),
``str``, ``bytes``, lists, tuples and dicts of them (dict keys: ``str``, ``int``, ``float``,
``bool``, ``None`` or tuples of those), numpy or JAX arrays of the dtypes in
:data:`ALLOWED_DTYPES`, and numpy scalars of those dtypes (they arrive as numpy scalars of the
same dtype). Subclasses arrive as their base type (an ``IntEnum`` as ``int``). Containers nest at
most :data:`MAX_DEPTH` levels. The payload layout (:func:`layout`, :func:`pack_into`,
:func:`views`) places arrays at 64-byte offsets in one buffer, and checks announced sizes against
a cap before anything is allocated. :mod:`spmd.host` moves these messages between processes.
"""

from __future__ import annotations

import base64
import functools
import math
import struct
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_DEPTH",
    "MalformedMessageError",
    "array_specs",
    "decode",
    "dtype_from_name",
    "encode",
    "fail",
    "layout",
    "nbytes",
    "pack_into",
    "specs_of",
    "views",
]

ALLOWED_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
    ]
)
MAX_DEPTH = 64
"""Deepest nesting of containers (lists, tuples, dicts) a host-level message may hold."""
_MAX_NDIM = 64
_ALIGN = 64  # byte offset of every array in a payload
_F64 = struct.Struct("<d")


class MalformedMessageError(ValueError):
    """A host-level message that does not follow the wire format (or announces too many bytes)."""


@functools.lru_cache(maxsize=64)
def _dtype_name(dt: np.dtype) -> str:
    return str(dt)  # (numpy computes the name in Python each time: this is on every message's path)


_DTYPES = types.MappingProxyType({name: np.dtype(jnp.dtype(name)) for name in sorted(ALLOWED_DTYPES)})
"""The one table from a dtype's name to its numpy dtype (``ml_dtypes``' for ``bfloat16`` and ``float8_*``)."""


def dtype_from_name(name: str) -> np.dtype:
    """``"bfloat16"`` -> its numpy dtype; only the names in :data:`ALLOWED_DTYPES`.

    Raises:
      ValueError: any other name (or not a string).
    """
    dt = _DTYPES.get(name) if isinstance(name, str) else None
    if dt is None:
        raise ValueError(f"dtype {name!r:.40} is not allowed; expected one of {sorted(ALLOWED_DTYPES)}.")
    return dt


def specs_of(arrays: list[np.ndarray]) -> list[tuple[str, list[int]]]:
    """``(dtype name, shape)`` of each array, as :func:`array_specs` reads them back from a tree."""
    return [(_dtype_name(a.dtype), list(a.shape)) for a in arrays]


# Encoding ---------------------------------------------------------------------------------------


def _path_str(path: str) -> str:
    return path or "the value"


def encode(value: Any, *, inline_arrays: bool = False) -> tuple[Any, list[np.ndarray]]:
    """Encode ``value`` as a JSON-able tree and the list of its arrays (in order).

    With ``inline_arrays`` the array bytes go into the tree (base64) and the list is empty.

    Raises:
      TypeError: a value (or dict key) of a type that cannot travel; the message names its path.
      ValueError: containers nested deeper than :data:`MAX_DEPTH` (or a cycle); the message names the path.
    """
    arrays: list[np.ndarray] = []

    def array_node(v: Any, path: str) -> dict[str, Any]:
        kind = "jax" if isinstance(v, jax.Array) else "scalar" if isinstance(v, np.generic) else "numpy"
        a = np.asarray(v)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        name = _dtype_name(a.dtype)
        if name not in ALLOWED_DTYPES:
            raise TypeError(
                f"{_path_str(path)}: cannot send an array of dtype {name}; allowed: {sorted(ALLOWED_DTYPES)}."
            )
        node: dict[str, Any] = {"dtype": name, "shape": list(a.shape), "kind": kind}
        if inline_arrays:
            node["b64"] = base64.b64encode(a.tobytes()).decode("ascii")
        else:
            node["index"] = len(arrays)
            arrays.append(a)
        return {"array": node}

    def key_node(k: Any, path: str, depth: int) -> Any:
        if isinstance(k, np.generic):
            raise TypeError(f"{_path_str(path)}: cannot send a dict key of type {type(k).__name__} ({k!r}).")
        if k is None or isinstance(k, (bool, int, float, str)):
            return go(k, path, depth)
        if isinstance(k, tuple):
            return {"tuple": [key_node(x, path, depth + 1) for x in k]}
        raise TypeError(f"{_path_str(path)}: cannot send a dict key of type {type(k).__name__} ({k!r}).")

    def go(v: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(
                f"{_path_str(path)}: containers nested deeper than MAX_DEPTH={MAX_DEPTH} levels (or a cycle); "
                f"host-level messages allow at most {MAX_DEPTH}. Flatten the value."
            )
        # Arrays and numpy scalars first: np.float64 is a float subclass, np.bool_ is not a bool.
        if isinstance(v, (jax.Array, np.ndarray, np.generic)):
            return array_node(v, path)
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str):
            return str(v)
        if isinstance(v, int):
            return {"int": hex(int(v))}  # hex: no 4300-digit limit, linear time
        if isinstance(v, float):
            return {"float": _F64.pack(float(v)).hex()}  # bit-exact: -0.0, NaN sign and payload
        if isinstance(v, bytes):
            return {"bytes": base64.b64encode(v).decode("ascii")}
        if isinstance(v, list):
            return {"list": [go(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, tuple):
            return {"tuple": [go(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {
                "dict": [
                    [key_node(k, f"{path}[{k!r}]", depth + 1), go(x, f"{path}[{k!r}]", depth + 1)] for k, x in v.items()
                ]
            }
        raise TypeError(
            f"{_path_str(path)}: cannot send a value of type {type(v).__module__}.{type(v).__qualname__}. "
            f"Allowed: None, bool, int, float, str, bytes, list, tuple, dict, and numpy/JAX arrays and scalars "
            f"(no pickle crosses processes)."
        )

    try:
        return go(value, "", 0), arrays
    finally:
        go = key_node = None  # break the closures' reference cycle: the arrays are freed without waiting for gc


def fail(msg: str) -> None:
    raise MalformedMessageError(f"malformed host-level message: {msg}")


def _array_spec(node: Any) -> tuple[str, list[int], str]:
    """``(dtype, shape, kind)`` of an encoded array node, validated."""
    if not isinstance(node, dict) or not {"dtype", "shape", "kind"} <= node.keys():
        fail(f"bad array node {node!r:.80}")
    dtype, shape, kind = node["dtype"], node["shape"], node["kind"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES or kind not in ("jax", "numpy", "scalar"):
        fail(f"array dtype {dtype!r:.40} / kind {kind!r:.40} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        fail(f"bad array shape {shape!r:.80}")
    if kind == "scalar" and shape:
        fail(f"a scalar of shape {shape}")
    return dtype, shape, kind


def nbytes(dtype: str, shape: list[int]) -> int:
    return math.prod(shape) * _DTYPES[dtype].itemsize  # Python ints: no overflow


def _check_key(k: Any) -> Any:
    if k is None or isinstance(k, (bool, int, float, str)):
        return k
    if isinstance(k, tuple):
        for x in k:
            _check_key(x)
        return k
    fail(f"a dict key of type {type(k).__name__}")


def decode(tree: Any, arrays: list[np.ndarray] | None = None) -> Any:
    """Rebuild a value from :func:`encode`'s tree and arrays, validating every node.

    Raises:
      MalformedMessageError: (a ``ValueError``) anything that :func:`encode` cannot have written.
    """
    arrays = arrays or []

    def array_from(node: Any) -> Any:
        dtype, shape, kind = _array_spec(node)
        if "b64" in node:
            raw = base64.b64decode(node["b64"], validate=True)
            if len(raw) != nbytes(dtype, shape):
                fail(f"array of {dtype}{shape} with {len(raw)} bytes")
            a = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape).copy()
        else:
            i = node.get("index")
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(arrays):
                fail(f"bad array index {i!r:.40}")
            a = arrays[i]
        if kind == "scalar":
            return a[()]
        return jnp.asarray(a) if kind == "jax" else a

    def go(n: Any, depth: int) -> Any:
        if depth > 3 * MAX_DEPTH:
            fail(f"nested deeper than {MAX_DEPTH} levels")
        if n is None or isinstance(n, (bool, str)):
            return n
        if not isinstance(n, dict) or len(n) != 1:
            fail(f"unexpected node {n!r:.80}")
        (tag, body) = next(iter(n.items()))
        if tag == "int":
            if not isinstance(body, str):
                fail("int body is not a string")
            return int(body, 16)
        if tag == "float":
            if not isinstance(body, str) or len(body) != 16:
                fail(f"bad float {body!r:.40}")
            return _F64.unpack(bytes.fromhex(body))[0]
        if tag == "bytes":
            if not isinstance(body, str):
                fail("bytes body is not a string")
            return base64.b64decode(body, validate=True)
        if tag == "array":
            return array_from(body)
        if tag in ("list", "tuple"):
            if not isinstance(body, list):
                fail(f"{tag} body is not a list")
            items = [go(x, depth + 1) for x in body]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                fail("dict body is not a list of pairs")
            return {_check_key(go(k, depth + 1)): go(v, depth + 1) for k, v in body}
        fail(f"unknown tag {tag!r:.40}")

    try:
        return go(tree, 0)
    except MalformedMessageError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, KeyError, AttributeError, struct.error) as e:
        raise MalformedMessageError(f"malformed host-level message: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        go = array_from = None  # break the closures' reference cycle: received buffers are freed without gc


# Payload layout ---------------------------------------------------------------------------------


def array_specs(tree: Any) -> list[tuple[str, list[int]]]:
    specs: dict[int, tuple[str, list[int]]] = {}

    def walk(n: Any, depth: int) -> None:
        if depth > 3 * MAX_DEPTH:
            fail(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(n, dict):
            if "array" in n and len(n) == 1 and isinstance(n["array"], dict) and "index" in n["array"]:
                dtype, shape, _ = _array_spec(n["array"])
                i = n["array"]["index"]
                if not isinstance(i, int) or isinstance(i, bool) or i in specs:
                    fail(f"bad array index {i!r:.40}")
                specs[i] = (dtype, shape)
                return
            for v in n.values():
                walk(v, depth + 1)
        elif isinstance(n, list):
            for v in n:
                walk(v, depth + 1)

    walk(tree, 0)
    if sorted(specs) != list(range(len(specs))):
        fail("array indices are not 0..n-1")
    return [specs[i] for i in range(len(specs))]


def layout(specs: list[tuple[str, list[int]]], max_bytes: int, *, what: str) -> tuple[list[int], int]:
    """Byte offsets (aligned to 64) of each array in the packed payload, and its total size.

    Raises:
      MalformedMessageError: the payload would exceed ``max_bytes`` (checked before any allocation).
    """
    offsets, end = [], 0
    for dtype, shape in specs:
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        end = start + nbytes(dtype, shape)
        if end > max_bytes:
            raise MalformedMessageError(
                f"{what} announces more than {max_bytes} bytes of arrays ({dtype}{shape} ends at byte {end}), "
                f"over the limit SPMD_HOST_MAX_BYTES={max_bytes}; raise it to send larger messages."
            )
    return offsets, end


def pack_into(dst: np.ndarray, start: int, arrays: list[np.ndarray], offsets: list[int]) -> None:
    """Copy the payload bytes ``[start, start + len(dst))`` of ``arrays`` at ``offsets`` into ``dst`` (zeroed)."""
    stop = start + dst.size
    for a, off in zip(arrays, offsets, strict=True):
        lo, hi = max(off, start), min(off + a.nbytes, stop)
        if lo < hi:
            dst[lo - start : hi - start] = a.reshape(-1).view(np.uint8)[lo - off : hi - off]


def views(buf: Any, specs: list[tuple[str, list[int]]], offsets: list[int]) -> list[np.ndarray]:
    """Zero-copy arrays over ``buf`` (a writable buffer holding the packed payload)."""
    out = []
    for (dtype, shape), off in zip(specs, offsets, strict=True):
        dt = _DTYPES[dtype]
        count = math.prod(shape)
        if count == 0:
            out.append(np.empty(shape, dt))
        else:
            out.append(np.frombuffer(buf, dtype=dt, count=count, offset=off).reshape(shape))
    return out
