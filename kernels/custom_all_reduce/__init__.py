"""Pallas one-shot and two-shot all-reduce kernels for small tensors, and their pure-JAX reference.

Two lowerings: Mosaic GPU on persistent peer buffers (:mod:`.peer`, one-shot; :mod:`.two_shot`;
their building blocks in :mod:`.peer_ir`; the buffers are :mod:`kernels.symmetric_memory`) and the
TPU form (:mod:`.tpu`, one-shot and two-shot with remote DMAs on the plan of :mod:`.planning`; on
CPU it runs in Pallas's TPU interpret mode).
This package imports only JAX and NumPy. Which kernel runs for a given call, and the psum
fallback, are decided by ``spmd.communicators.allreduce_plan``.
"""

from kernels.custom_all_reduce.ops import LOWERINGS, all_reduce_kernel, reference_all_reduce
from kernels.custom_all_reduce.planning import (
    ALIGN_BYTES,
    KERNEL_ALGORITHMS,
    LANES,
    SUPPORTED_DTYPES,
    SUPPORTED_WORLD_SIZES,
    Plan,
    make_plan,
)
from kernels.custom_all_reduce.tpu import one_shot_tpu, two_shot_tpu

__all__ = [
    "ALIGN_BYTES",
    "KERNEL_ALGORITHMS",
    "LANES",
    "LOWERINGS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_WORLD_SIZES",
    "Plan",
    "all_reduce_kernel",
    "make_plan",
    "one_shot_peer",
    "one_shot_tpu",
    "reference_all_reduce",
    "two_shot_peer",
    "two_shot_tpu",
]


def __getattr__(name: str):
    # The Mosaic GPU lowering is imported on first use: it pulls in Mosaic GPU, which CPU-only
    # and TPU programs never need.
    if name == "one_shot_peer":
        from kernels.custom_all_reduce import peer

        return peer.one_shot_peer
    if name == "two_shot_peer":
        from kernels.custom_all_reduce import two_shot

        return two_shot.two_shot_peer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
