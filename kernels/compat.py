"""The few private JAX internals ``kernels`` uses, in one place (``kernels`` imports only JAX, not ``spmd``).

Each has no public equivalent in the JAX versions we support (0.10.2 through 0.12.x); when one
appears, only this module changes. ``spmd.compat`` is the same for ``spmd`` and ``models`` (it
takes :func:`distributed_client` from here, so the client is read in one place).
"""

from __future__ import annotations

from typing import Any

__all__ = ["distributed_client", "mlir_dialects"]


def distributed_client() -> Any:
    """The coordination-service client of ``jax.distributed`` (``None`` outside a multi-process job).

    Private: ``jax._src.distributed.global_state.client``. Its key-value store carries the CUDA IPC
    handles of the peer buffers (:mod:`kernels.symmetric_memory`) and ``spmd``'s host-level messages;
    JAX exposes it publicly only through ``multihost_utils`` helpers that pickle or lack timeouts.
    """
    from jax._src import distributed

    return distributed.global_state.client


def mlir_dialects() -> tuple[Any, ...]:
    """``(ir, arith, gpu, llvm, memref, scf)``: the MLIR builders the Mosaic GPU kernels emit inline code with.

    Private: ``jax._src.lib.mlir`` (``ir`` and its dialects). ``jax.experimental.mosaic.gpu`` takes
    and returns these objects but does not re-export the modules. Imported on call: CPU-only
    programs never load them.
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, scf

    return ir, arith, gpu, llvm, memref, scf
