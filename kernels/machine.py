"""Which machine this process runs on: what two processes must share to map each other's memory.

CUDA IPC handles and ``/dev/shm`` files only mean something between processes of one machine
(one kernel, one boot). The peer buffers (:mod:`kernels.symmetric_memory`) and the KV pipe over
shared memory (``spmd.kv_transfer.IpcKVPipe``) compare this before they map anything; it lives
here, apart from both, so neither takes it from the other. Imports nothing beyond the standard
library.
"""

from __future__ import annotations

import socket

__all__ = ["machine_id"]


def machine_id() -> str:
    """This machine: host name and boot id (what two processes must share for CUDA IPC or /dev/shm)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"
