"""The shared memory behind :class:`~spmd.kv_transfer.IpcKVPipe`: staging slots a peer process can map.

Two backends with one interface (``alloc`` / ``free`` / ``stage`` / ``flush`` on the sending side,
``open`` / ``fetch`` / ``close_mapping`` on the receiving side): :class:`Cuda` (device memory
shared by CUDA IPC handles, :mod:`kernels.symmetric_memory.cuda`) and :class:`Shm` (``/dev/shm``
files, CPU devices).
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels.symmetric_memory import machine_id as host_identity  # one definition of "one machine"

__all__ = ["Cuda", "Shm", "Slot", "host_identity"]

_SHM_NAME = re.compile(r"^spmd-kv-[A-Za-z0-9_]{1,64}$")
_SHM_OWNER = re.compile(r"^spmd-kv-(\d+)_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Slot:
    """One staging buffer: ``handle`` (what the peer opens), ``addr`` / ``view`` (what we write)."""

    def __init__(self, handle: str, capacity: int, addr: int = 0, view: Any = None, path: str = "") -> None:
        self.handle, self.capacity, self.addr, self.view, self.path = handle, capacity, addr, view, path


class Cuda:
    """Staging in device memory shared by CUDA IPC handles."""

    name = "cuda"

    def __init__(self) -> None:
        from kernels.symmetric_memory import cuda

        self.cuda = cuda
        if not cuda.available():
            raise RuntimeError("IpcKVPipe(backend='cuda'): the CUDA driver (libcuda.so.1) is not available here.")

    @staticmethod
    def ordinal(device: Any) -> int:
        return int(device.local_hardware_id)

    def alloc(self, device: Any, nbytes: int) -> Slot:
        ordinal = self.ordinal(device)
        addr = self.cuda.mem_alloc(ordinal, nbytes)
        try:
            return Slot(self.cuda.ipc_handle(ordinal, addr).hex(), nbytes, addr=addr)
        except BaseException:
            self.cuda.mem_free(ordinal, addr)
            raise

    def free(self, device: Any, slot: Slot) -> None:
        self.cuda.mem_free(self.ordinal(device), slot.addr)

    def stage(self, device: Any, slot: Slot, offset: int, piece: Any, nbytes: int) -> None:
        self.cuda.copy_async(self.ordinal(device), slot.addr + offset, piece.unsafe_buffer_pointer(), nbytes)

    def flush(self, devices: Sequence[Any]) -> None:
        for d in devices:
            self.cuda.synchronize(self.ordinal(d))

    def open(self, device: Any, handle: str) -> Any:
        if not re.fullmatch(r"[0-9a-f]{128}", handle):
            raise ValueError(f"IpcKVPipe: malformed CUDA IPC handle {handle!r:.80}")
        return self.cuda.ipc_open(self.ordinal(device), bytes.fromhex(handle))

    def close_mapping(self, device: Any, mapped: Any) -> None:
        self.cuda.ipc_close(self.ordinal(device), mapped)

    def fetch(self, device: Any, mapped: Any, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
        import jax
        import jax.numpy as jnp

        ordinal = self.ordinal(device)
        try:
            room = self.cuda.allocation_size(ordinal, mapped)
        except self.cuda.CudaError:  # (not checked on a GPU yet for IPC mappings: the sender's bound stands)
            room = None
        if room is not None and offset + nbytes > room:
            raise ValueError(f"IpcKVPipe: a piece at {offset} + {nbytes} bytes overruns the peer's staging buffer.")
        out = jax.block_until_ready(jnp.zeros(shape, dtype, device=device))
        if out.nbytes != nbytes:  # never write past the array (a dtype this JAX stores narrower)
            raise ValueError(f"IpcKVPipe: a {out.dtype}{list(out.shape)} array holds {out.nbytes} bytes, not {nbytes}.")
        self.cuda.copy_async(ordinal, out.unsafe_buffer_pointer(), mapped + offset, nbytes)
        return out


class Shm:
    """Staging in ``/dev/shm`` files (CPU devices), named ``spmd-kv-<pid>_<random>``.

    A process that dies without closing its pipes leaves its files behind (tmpfs outlives it):
    every new backend removes the files of processes that no longer exist.
    """

    name = "shm"

    def __init__(self) -> None:
        self.dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove the staging files of dead processes of this host; their names."""
        gone = []
        for name in os.listdir(self.dir):
            m = _SHM_OWNER.match(name)
            if m is None or _alive(int(m.group(1))):
                continue
            try:
                os.unlink(os.path.join(self.dir, name))
                gone.append(name)
            except OSError:
                pass
        return gone

    def alloc(self, device: Any, nbytes: int) -> Slot:
        fd, path = tempfile.mkstemp(prefix=f"spmd-kv-{os.getpid()}_", dir=self.dir)
        try:
            os.ftruncate(fd, nbytes)
            if hasattr(os, "posix_fallocate"):  # the pages now, or an error: not SIGBUS on a full tmpfs later
                os.posix_fallocate(fd, 0, nbytes)
            view = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return Slot(os.path.basename(path), nbytes, view=view, path=path)

    def free(self, device: Any, slot: Slot) -> None:
        slot.view.close()
        try:
            os.unlink(slot.path)
        except FileNotFoundError:
            pass

    def stage(self, device: Any, slot: Slot, offset: int, piece: Any, nbytes: int) -> None:
        src = np.ascontiguousarray(np.asarray(piece)).reshape(-1).view(np.uint8)
        np.frombuffer(slot.view, np.uint8, nbytes, offset)[:] = src

    def flush(self, devices: Sequence[Any]) -> None:
        pass

    def open(self, device: Any, handle: str) -> Any:
        if not _SHM_NAME.match(handle):
            raise ValueError(f"IpcKVPipe: malformed shared-memory name {handle!r:.80}")
        fd = os.open(os.path.join(self.dir, handle), os.O_RDONLY)
        try:
            return mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def close_mapping(self, device: Any, mapped: Any) -> None:
        mapped.close()

    def fetch(self, device: Any, mapped: Any, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
        import jax

        if offset + nbytes > len(mapped):
            raise ValueError(f"IpcKVPipe: a piece at {offset} + {nbytes} bytes overruns its {len(mapped)}-byte buffer.")
        host = np.frombuffer(mapped, np.uint8, nbytes, offset).copy().view(dtype).reshape(shape)
        return jax.device_put(host, device)
