"""The few CUDA driver calls that share device memory between processes (ctypes on ``libcuda``).

JAX owns its allocations, and they cannot be shared with CUDA's legacy IPC: a ``jax.Array``'s
buffer lives in XLA's virtual-memory pool, which ``cuIpcGetMemHandle`` refuses
(docs/kv_transfer.md). So what is to be shared is allocated here with ``cuMemAlloc``
(IPC-capable), in the device's primary context (the one XLA uses), and exported as a 64-byte
handle that any process on the same host opens with ``cuIpcOpenMemHandle``: plain bytes, sent
like any other metadata, no file descriptors. Opening a handle costs far more than exporting one
(docs/custom_all_reduce.md measures both), so callers keep what they open. Everything raises
:class:`CudaError` with the driver's error name; nothing is done at import time.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

__all__ = [
    "IPC_HANDLE_BYTES",
    "CudaError",
    "allocation_size",
    "available",
    "copy_async",
    "ipc_close",
    "ipc_handle",
    "ipc_open",
    "mem_alloc",
    "mem_free",
    "synchronize",
]

IPC_HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1
_STREAM_NON_BLOCKING = 1


class CudaError(RuntimeError):
    """A CUDA driver call failed (or there is no driver)."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


_LOCK = threading.RLock()
_STATE: dict[str, Any] = {"lib": None, "contexts": {}, "streams": {}}


def _lib() -> Any:
    with _LOCK:
        if _STATE["lib"] is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaError(f"CUDA IPC needs the NVIDIA driver (libcuda.so.1): {e}") from None
            lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
            rc = lib.cuInit(0)
            if rc:
                raise CudaError(f"cuInit failed: {_name(lib, rc)}")
            _STATE["lib"] = lib
        return _STATE["lib"]


def _name(lib: Any, rc: int) -> str:
    s = ctypes.c_char_p()
    if lib.cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value:
        return f"{s.value.decode()} ({rc})"
    return f"CUDA error {rc}"


def _check(fn: str, *args: Any) -> None:
    lib = _lib()
    rc = getattr(lib, fn)(*args)
    if rc:
        raise CudaError(f"{fn} failed: {_name(lib, rc)}")


def available() -> bool:
    """Whether the CUDA driver loads and initialises here."""
    try:
        _lib()
    except CudaError:
        return False
    return True


def _use(ordinal: int) -> None:
    """Make ``ordinal``'s primary context (XLA's) current on this thread."""
    with _LOCK:
        ctx = _STATE["contexts"].get(ordinal)
        if ctx is None:
            dev = ctypes.c_int()
            _check("cuDeviceGet", ctypes.byref(dev), int(ordinal))
            ctx = ctypes.c_void_p()
            _check("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
            _STATE["contexts"][ordinal] = ctx
    _check("cuCtxSetCurrent", ctx)


def _stream(ordinal: int) -> ctypes.c_void_p:
    with _LOCK:
        stream = _STATE["streams"].get(ordinal)
        if stream is None:
            _use(ordinal)
            stream = ctypes.c_void_p()
            _check("cuStreamCreate", ctypes.byref(stream), _STREAM_NON_BLOCKING)
            _STATE["streams"][ordinal] = stream
        return stream


def mem_alloc(ordinal: int, nbytes: int) -> int:
    """A zero-filled allocation of ``nbytes`` on device ``ordinal`` that can be exported; its address."""
    if nbytes <= 0:
        raise ValueError(f"mem_alloc: expected a positive size, got {nbytes}.")
    _use(ordinal)
    ptr = ctypes.c_uint64()
    _check("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
    try:  # zeroed before any peer maps it; a context-wide sync, once per allocation
        _check("cuMemsetD8_v2", ptr, ctypes.c_ubyte(0), ctypes.c_size_t(nbytes))
        _check("cuCtxSynchronize")
    except CudaError:
        _lib().cuMemFree_v2(ptr)
        raise
    return ptr.value


def mem_free(ordinal: int, ptr: int) -> None:
    """Free an allocation of :func:`mem_alloc` (after every peer is done with it)."""
    _use(ordinal)
    _check("cuMemFree_v2", ctypes.c_uint64(ptr))


def ipc_handle(ordinal: int, ptr: int) -> bytes:
    """The IPC handle (64 bytes) of the allocation :func:`mem_alloc` returned as ``ptr``."""
    _use(ordinal)
    handle = _Handle()
    _check("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(ptr))
    return ctypes.string_at(ctypes.addressof(handle), IPC_HANDLE_BYTES)


def ipc_open(ordinal: int, handle: bytes) -> int:
    """Map another process's allocation into device ``ordinal``'s context; its address here.

    Opening costs hundreds of microseconds: callers keep the mapping while they use the
    allocation (the same bytes always name the same allocation) and :func:`ipc_close` it after.
    """
    if not isinstance(handle, bytes | bytearray) or len(handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"ipc_open: expected a {IPC_HANDLE_BYTES}-byte handle, got {handle!r:.80}.")
    _use(ordinal)
    raw = _Handle()
    ctypes.memmove(ctypes.addressof(raw), bytes(handle), IPC_HANDLE_BYTES)
    ptr = ctypes.c_uint64()
    _check("cuIpcOpenMemHandle_v2", ctypes.byref(ptr), raw, _LAZY_ENABLE_PEER_ACCESS)
    return ptr.value


def allocation_size(ordinal: int, ptr: int) -> int:
    """Bytes from ``ptr`` to the end of the allocation (or IPC mapping) that holds it."""
    _use(ordinal)
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
    return base.value + size.value - ptr


def ipc_close(ordinal: int, ptr: int) -> None:
    """Unmap what :func:`ipc_open` mapped at ``ptr``."""
    _use(ordinal)
    _check("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))


def copy_async(ordinal: int, dst: int, src: int, nbytes: int) -> None:
    """Queue a device copy of ``nbytes`` on device ``ordinal``'s own stream (see :func:`synchronize`)."""
    if nbytes < 0:
        raise ValueError(f"copy_async: expected nbytes >= 0, got {nbytes}.")
    if nbytes == 0:
        return
    stream = _stream(ordinal)
    _use(ordinal)
    _check("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes), stream)


def synchronize(ordinal: int) -> None:
    """Wait for every copy queued on device ``ordinal``'s stream."""
    stream = _stream(ordinal)
    _use(ordinal)
    _check("cuStreamSynchronize", stream)
