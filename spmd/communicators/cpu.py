"""CPU communicator: XLA:CPU collectives in one process, gloo across processes.

Both come from XLA and JAX's runtime (``jax.distributed`` selects gloo for CPU collectives), so
the XLA lowering of the base class is already the right one.
"""

from __future__ import annotations

from spmd.communicators.base import DeviceCommunicatorBase


class CpuCommunicator(DeviceCommunicatorBase):
    """Collectives on CPU devices (simulated in one process, or gloo across processes)."""
