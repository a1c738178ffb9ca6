"""Host-level communication between the processes of a multi-controller job.

vLLM's ``broadcast_tensor_dict`` / ``broadcast_object`` / ``all_gather_object`` / ``barrier``
run on CPU process groups. Here they run on JAX's own runtime:

* metadata (the structure of the dict, plain Python values, array shapes and dtypes) travels as
  JSON through the coordination service's key-value store, with a timeout on every wait;
* array bytes travel in ONE device collective (``multihost_utils.broadcast_one_to_all``) of a
  single packed ``uint8`` buffer, padded to a power of two so that repeated calls reuse one
  compiled program.

No pickle: the wire format is JSON with tagged containers, validated on receipt. Allowed values
are ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, lists, tuples and dicts of them
(dict keys: ``str``, ``int``, ``float``, ``bool``, ``None`` or tuples of those), and numpy or JAX
arrays of the dtypes in :data:`ALLOWED_DTYPES`. Anything else raises ``TypeError`` on the sender,
naming the key, before anything is sent, and the receivers get a ``RuntimeError`` that says so.

Every process must make the same sequence of host-level calls (as with any collective): the
calls are matched by their position in that sequence.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmd import parallel_state as ps
from spmd.envs import SpmdEnv

__all__ = [
    "ALLOWED_DTYPES",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "broadcast_tensor_dict_across_processes",
    "decode",
    "encode",
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
_MIN_BUCKET = 1024


# Encoding ---------------------------------------------------------------------------------------


def _path_str(path: str) -> str:
    return path or "the value"


def encode(value: Any, *, inline_arrays: bool = False) -> tuple[Any, list[np.ndarray]]:
    """Encode ``value`` as a JSON-able tree and the list of its arrays (in order).

    With ``inline_arrays`` the array bytes go into the tree (base64) and the list is empty.

    Raises:
      TypeError: a value (or dict key) of a type that cannot travel; the message names its path.
    """
    arrays: list[np.ndarray] = []

    def array_node(v: Any, path: str) -> dict[str, Any]:
        kind = "jax" if isinstance(v, jax.Array) else "scalar" if isinstance(v, np.generic) else "numpy"
        a = np.asarray(v)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        name = str(a.dtype)
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

    def key_node(k: Any, path: str) -> Any:
        if k is None or isinstance(k, (bool, int, float, str)):
            return go(k, path)
        if isinstance(k, tuple):
            return {"tuple": [key_node(x, path) for x in k]}
        raise TypeError(f"{_path_str(path)}: cannot send a dict key of type {type(k).__name__} ({k!r}).")

    def go(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return {"int": str(v)}
        if isinstance(v, float):
            return {"float": repr(v)}
        if isinstance(v, bytes):
            return {"bytes": base64.b64encode(v).decode("ascii")}
        if isinstance(v, (jax.Array, np.ndarray, np.generic)):
            return array_node(v, path)
        if isinstance(v, list):
            return {"list": [go(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, tuple):
            return {"tuple": [go(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {"dict": [[key_node(k, f"{path}[{k!r}]"), go(x, f"{path}[{k!r}]")] for k, x in v.items()]}
        raise TypeError(
            f"{_path_str(path)}: cannot send a value of type {type(v).__module__}.{type(v).__qualname__}. "
            f"Allowed: None, bool, int, float, str, bytes, list, tuple, dict, and numpy/JAX arrays "
            f"(no pickle crosses processes)."
        )

    return go(value, ""), arrays


def _fail(msg: str) -> None:
    raise ValueError(f"malformed host-level message: {msg}")


def _array_spec(node: Any) -> tuple[str, list[int], str]:
    """``(dtype, shape, kind)`` of an encoded array node, validated."""
    if not isinstance(node, dict) or not {"dtype", "shape", "kind"} <= node.keys():
        _fail(f"bad array node {node!r}")
    dtype, shape, kind = node["dtype"], node["shape"], node["kind"]
    if dtype not in ALLOWED_DTYPES or kind not in ("jax", "numpy", "scalar"):
        _fail(f"array dtype {dtype!r} / kind {kind!r} not allowed")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        _fail(f"bad array shape {shape!r}")
    return dtype, shape, kind


def decode(tree: Any, arrays: list[np.ndarray] | None = None) -> Any:
    """Rebuild a value from :func:`encode`'s tree and arrays, validating every node."""
    arrays = arrays or []

    def array_from(node: Any) -> Any:
        dtype, shape, kind = _array_spec(node)
        if "b64" in node:
            raw = base64.b64decode(node["b64"])
            a = np.frombuffer(raw, dtype=jnp.dtype(dtype)).reshape(shape).copy()
        else:
            i = node.get("index")
            if not isinstance(i, int) or not 0 <= i < len(arrays):
                _fail(f"bad array index {i!r}")
            a = arrays[i]
        if kind == "scalar":
            if a.shape != ():
                _fail(f"a scalar of shape {a.shape}")
            return a[()]
        return jnp.asarray(a) if kind == "jax" else a

    def go(n: Any) -> Any:
        if n is None or isinstance(n, (bool, str)):
            return n
        if not isinstance(n, dict) or len(n) != 1:
            _fail(f"unexpected node {n!r:.80}")
        (tag, body) = next(iter(n.items()))
        if tag == "int":
            return int(body)
        if tag == "float":
            return float(body)
        if tag == "bytes":
            return base64.b64decode(body)
        if tag == "array":
            return array_from(body)
        if tag in ("list", "tuple"):
            if not isinstance(body, list):
                _fail(f"{tag} body is not a list")
            items = [go(x) for x in body]
            return items if tag == "list" else tuple(items)
        if tag == "dict":
            if not isinstance(body, list) or not all(isinstance(p, list) and len(p) == 2 for p in body):
                _fail("dict body is not a list of pairs")
            return {go(k): go(v) for k, v in body}
        _fail(f"unknown tag {tag!r}")

    return go(tree)


# Transport --------------------------------------------------------------------------------------


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _timeout_s(timeout_s: float | None) -> float:
    return SpmdEnv.from_environ().collective_timeout_s if timeout_s is None else float(timeout_s)


def _next_key(kind: str) -> str:
    return f"spmd/{kind}/{ps.next_host_op_id()}"


def _kv_get(key: str, timeout_s: float, *, op: str, waiting_for: str) -> str:
    try:
        return _client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as e:  # the runtime raises its own error type on deadline
        raise TimeoutError(
            f"{op}: waited {timeout_s:g} s for {waiting_for} and got nothing ({type(e).__name__}: "
            f"{str(e)[:200]}). Every process must make the same host-level calls in the same order; "
            f"check that {waiting_for} is alive and reached this call, or raise SPMD_COLLECTIVE_TIMEOUT_S."
        ) from e


def _check_src(op: str, src: Any) -> int:
    n = jax.process_count()
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < n:
        raise ValueError(f"{op}: src={src!r} is out of range for {n} processes; expected 0 <= src < {n}.")
    return int(src)


def _bucket(nbytes: int) -> int:
    return max(_MIN_BUCKET, 1 << math.ceil(math.log2(max(nbytes, 1))))


def _broadcast_payload(arrays: list[np.ndarray], specs: list[tuple[str, list[int]]], is_source: bool) -> list:
    from jax.experimental import multihost_utils

    sizes = [int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dt).itemsize for dt, shape in specs]
    total = sum(sizes)
    if total == 0:
        return [np.zeros(shape, jnp.dtype(dt)) for dt, shape in specs]
    buf = np.zeros(_bucket(total), np.uint8)
    if is_source:
        offset = 0
        for a, size in zip(arrays, sizes, strict=True):
            buf[offset : offset + size] = a.reshape(-1).view(np.uint8)  # encode() made it C-contiguous
            offset += size
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=is_source))
    out, offset = [], 0
    for (dt, shape), size in zip(specs, sizes, strict=True):
        out.append(np.frombuffer(buf[offset : offset + size].tobytes(), jnp.dtype(dt)).reshape(shape))
        offset += size
    return out


def _array_specs(tree: Any) -> list[tuple[str, list[int]]]:
    specs: dict[int, tuple[str, list[int]]] = {}

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            if "array" in n and len(n) == 1 and isinstance(n["array"], dict) and "index" in n["array"]:
                dtype, shape, _ = _array_spec(n["array"])
                specs[n["array"]["index"]] = (dtype, shape)
                return
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(tree)
    if sorted(specs) != list(range(len(specs))):
        _fail("array indices are not 0..n-1")
    return [specs[i] for i in range(len(specs))]


def _broadcast_tree(value: Any, src: int, *, op: str, timeout_s: float | None, check: Any = None) -> Any:
    src = _check_src(op, src)
    timeout = _timeout_s(timeout_s)
    me = jax.process_index()

    def encode_checked() -> tuple[Any, list[np.ndarray]]:
        if check is not None:
            check(value)
        return encode(value)

    if jax.process_count() == 1:
        encode_checked()  # the same validation as in a multi-process job
        return value
    key = _next_key(op)
    client = _client()
    if me == src:
        try:
            tree, arrays = encode_checked()
        except TypeError as e:
            client.key_value_set(key, json.dumps({"error": str(e)}))
            raise
        client.key_value_set(key, json.dumps({"tree": tree}))
        _broadcast_payload(arrays, [(str(a.dtype), list(a.shape)) for a in arrays], True)
        return value
    msg = json.loads(_kv_get(key, timeout, op=op, waiting_for=f"process {src}"))
    if "error" in msg:
        raise RuntimeError(f"{op}: process {src} could not send its value: {msg['error']}")
    if "tree" not in msg:
        _fail("no tree")
    specs = _array_specs(msg["tree"])
    arrays = _broadcast_payload([], specs, False)
    return decode(msg["tree"], arrays)


def broadcast_tensor_dict_across_processes(
    tensor_dict: dict[Any, Any] | None, src: int = 0, *, timeout_s: float | None = None
) -> dict[Any, Any]:
    """Every process gets process ``src``'s dict (the others pass ``None``).

    Metadata first (JSON through the coordination service), then every array in one packed
    device collective. Arrays come back as the kind they were sent as (numpy or JAX).

    Raises:
      TypeError: on ``src``, a value that cannot travel (named by its key), or no dict at all,
        before anything is sent.
      RuntimeError: on the other processes, when ``src`` could not send.
      TimeoutError: ``src`` did not send within the timeout.
      ValueError: ``src`` out of range.
    """

    def must_be_dict(v: Any) -> None:
        if not isinstance(v, dict):
            raise TypeError(f"broadcast_tensor_dict: process src={src} must pass a dict, got {type(v).__name__}.")

    return _broadcast_tree(tensor_dict, src, op="broadcast_tensor_dict", timeout_s=timeout_s, check=must_be_dict)


def broadcast_object(obj: Any, src: int = 0, *, timeout_s: float | None = None) -> Any:
    """Every process gets process ``src``'s ``obj`` (the same safe values as ``broadcast_tensor_dict``)."""
    return _broadcast_tree(obj, src, op="broadcast_object", timeout_s=timeout_s)


def all_gather_object(obj: Any, *, timeout_s: float | None = None) -> list[Any]:
    """Every process gets the list of every process's ``obj``, in process order.

    Raises:
      TypeError: ``obj`` holds a value that cannot travel (the others get a ``RuntimeError``).
      TimeoutError: a process did not contribute within the timeout.
    """
    op = "all_gather_object"
    if jax.process_count() == 1:
        encode(obj)
        return [obj]
    timeout = _timeout_s(timeout_s)
    key = _next_key(op)
    me = jax.process_index()
    client = _client()
    try:
        tree, _ = encode(obj, inline_arrays=True)
    except TypeError as e:
        client.key_value_set(f"{key}/{me}", json.dumps({"error": str(e)}))
        raise
    client.key_value_set(f"{key}/{me}", json.dumps({"tree": tree}))
    out = []
    for p in range(jax.process_count()):
        if p == me:
            out.append(obj)
            continue
        msg = json.loads(_kv_get(f"{key}/{p}", timeout, op=op, waiting_for=f"process {p}"))
        if "error" in msg:
            raise RuntimeError(f"{op}: process {p} could not send its value: {msg['error']}")
        out.append(decode(msg["tree"]))
    return out


def barrier(*, timeout_s: float | None = None) -> None:
    """Wait for this process's queued device work, then for every process to arrive.

    Raises:
      TimeoutError: some process did not arrive within the timeout.
    """
    jax.effects_barrier()
    jax.block_until_ready(jax.live_arrays())
    if jax.process_count() == 1:
        return
    timeout = _timeout_s(timeout_s)
    key = _next_key("barrier")
    try:
        _client().wait_at_barrier(key, int(timeout * 1000))
    except Exception as e:
        raise TimeoutError(
            f"barrier: not every process arrived within {timeout:g} s ({type(e).__name__}: {str(e)[:200]})."
        ) from e
