"""The shared memory behind :class:`~spmd.kv_transfer.IpcKVPipe`: staging slots a peer process can map.

Two backends with one interface (``alloc`` / ``free`` / ``stage`` / ``flush`` on the sending side,
``open`` / ``fetch`` / ``close_mapping`` on the receiving side): :class:`Cuda` (device memory
shared by CUDA IPC handles, :mod:`kernels.symmetric_memory.cuda`) and :class:`Shm` (``/dev/shm``
files, CPU devices).

A ``/dev/shm`` file comes from another process, so the receiver trusts nothing about it: it opens
it with ``O_NOFOLLOW | O_NONBLOCK`` (a symbolic link is refused, a FIFO does not block), checks
with ``fstat`` that it is a regular file of this user before reading, and again, with its size,
before every read; it reads with ``pread`` into its own buffer, never through a mapping, so a file
truncated under it is a short read (an error), never a ``SIGBUS``.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from kernels.machine import machine_id as host_identity  # one definition of "one machine"

__all__ = ["Cuda", "Shm", "Slot", "host_identity", "shm_name"]

_SHM_NAME = re.compile(r"^spmd-kv-\d{1,20}-\d{1,10}_[A-Za-z0-9_]{1,64}$")
_SHM_OWNER = re.compile(r"^spmd-kv-(\d{1,20})-(\d{1,10})_[A-Za-z0-9_]{1,64}$")
_PID_MAX = 1 << 22  # the kernel's largest pid_max


def shm_name(name: str) -> bool:
    """Whether ``name`` is one this module writes in ``/dev/shm`` (``spmd-kv-<namespace>-<pid>_<random>``)."""
    return bool(_SHM_NAME.match(name))


def _pid_namespace() -> int:
    """This process's PID namespace (the inode of ``/proc/self/ns/pid``); 0 when it cannot be told."""
    try:
        m = re.fullmatch(r"pid:\[(\d{1,20})\]", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def _dead(pid: int) -> bool:
    """Whether no process ``pid`` exists (in this PID namespace); an unanswerable question is ``False``."""
    if not 0 < pid <= _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (PermissionError: another user's process, alive)
        return False
    return False


class _ShmFile:
    """A peer's staging file, open for reading (``pread``: no mapping, so no ``SIGBUS``)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name


class Slot:
    """One staging buffer: ``handle`` (what the peer opens), ``addr`` / ``view`` (what we write), ``id``."""

    def __init__(self, handle: str, capacity: int, addr: int = 0, view: Any = None, path: str = "") -> None:
        self.handle, self.capacity, self.addr, self.view, self.path = handle, capacity, addr, view, path
        self.id = 0


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

    def check_room(self, device: Any, mapped: Any, end: int) -> None:
        """Raise ``ValueError`` unless the peer's mapping holds ``end`` bytes (when the driver can tell)."""
        try:
            room = self.cuda.allocation_size(self.ordinal(device), mapped)
        except self.cuda.CudaError:  # (not checked on a GPU yet for IPC mappings: the sender's bound stands)
            return
        if end > room:
            raise ValueError(f"IpcKVPipe: a piece ending at byte {end} overruns the peer's {room}-byte staging buffer.")

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
    """Staging in ``/dev/shm`` files (CPU devices), named ``spmd-kv-<PID namespace>-<pid>_<random>``.

    A process that dies without closing its pipes leaves its files behind (tmpfs outlives it):
    every new backend removes the files it can prove are its own kind and dead: named by this
    module, a regular file of this user, written by a process of THIS PID namespace that no
    longer exists. Anything else under the prefix (another user's file, another namespace's, a
    name it did not write) is left alone and never stops a pipe.
    """

    name = "shm"

    def __init__(self) -> None:
        self.dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        self.namespace = _pid_namespace()
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove the staging files of dead processes of this user and PID namespace; their names."""
        gone: list[str] = []
        if not self.namespace:  # which pids are dead cannot be told: delete nothing
            return gone
        try:
            names = os.listdir(self.dir)
        except OSError:
            return gone
        for name in names:
            m = _SHM_OWNER.match(name)
            if m is None or int(m.group(1)) != self.namespace or not _dead(int(m.group(2))):
                continue
            path = os.path.join(self.dir, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                    continue
                os.unlink(path)
                gone.append(name)
            except OSError:
                pass
        return gone

    def alloc(self, device: Any, nbytes: int) -> Slot:
        fd, path = tempfile.mkstemp(prefix=f"spmd-kv-{self.namespace}-{os.getpid()}_", dir=self.dir)
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

    def open(self, device: Any, handle: str) -> _ShmFile:
        """Open a peer's staging file for reading, after checking what it is.

        Raises:
          ValueError: a malformed name, a symbolic link, not a regular file (a FIFO, a device), or
            another user's file. FileNotFoundError: it is gone (the peer closed).
        """
        if not _SHM_NAME.match(handle):
            raise ValueError(f"IpcKVPipe: malformed shared-memory name {handle!r:.80}")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(os.path.join(self.dir, handle), flags)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"IpcKVPipe: the staging file {handle!r} is a symbolic link; refused.") from None
            raise ValueError(f"IpcKVPipe: cannot open the staging file {handle!r}: {e}") from None
        f = _ShmFile(fd, handle)
        try:
            self._check(f, 0)
        except BaseException:
            os.close(fd)
            raise
        return f

    @staticmethod
    def _check(f: _ShmFile, end: int) -> None:
        """``fstat``: a regular file of this user, holding at least ``end`` bytes."""
        st = os.fstat(f.fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"IpcKVPipe: the staging file {f.name!r} is not a regular file (mode {st.st_mode:o}).")
        if st.st_uid != os.getuid():
            raise ValueError(
                f"IpcKVPipe: the staging file {f.name!r} belongs to uid {st.st_uid}, not to this process's user "
                f"({os.getuid()}); refused."
            )
        if st.st_size < end:
            raise ValueError(
                f"IpcKVPipe: the staging file {f.name!r} holds {st.st_size} bytes, the piece ends at byte {end}: "
                f"it was truncated (or the metadata lies)."
            )

    def close_mapping(self, device: Any, mapped: _ShmFile) -> None:
        os.close(mapped.fd)

    def fetch(self, device: Any, mapped: _ShmFile, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
        import jax

        self._check(mapped, offset + nbytes)
        host = np.empty(nbytes, np.uint8)
        view, got = memoryview(host), 0
        while got < nbytes:
            n = os.preadv(mapped.fd, [view[got:]], offset + got)
            if n <= 0:  # truncated since the check: a short read, never a SIGBUS
                raise ValueError(
                    f"IpcKVPipe: the staging file {mapped.name!r} ended {got} bytes into a {nbytes}-byte piece: "
                    f"it was truncated while being read."
                )
            got += n
        return jax.device_put(host.view(dtype).reshape(shape), device)
