"""TPU communicator: XLA collectives over ICI.

XLA's TPU collectives are already latency-optimised; a Pallas TPU kernel for small all-reduces
(the same algorithm the CPU tests check in interpret mode) plugs in the way ``gpu.py`` shows.
"""

from __future__ import annotations

from spmd.communicators.base import DeviceCommunicatorBase


class TpuCommunicator(DeviceCommunicatorBase):
    """Collectives on TPU devices, lowered through XLA."""
