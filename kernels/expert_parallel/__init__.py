"""Expert-parallel low-latency exchange: a Pallas kernel on persistent peer buffers, and its reference.

:mod:`.exchange` holds the kernel (Mosaic GPU, raw peer addresses, epoch flags) and the
``all_to_all`` form every other platform runs; :mod:`.emulation` runs the kernel's flag protocol
step by step on CPU. The manager that uses them is ``spmd.expert_parallel.LowLatencyAll2AllManager``.
"""

from __future__ import annotations

from kernels.expert_parallel.exchange import (
    DEFAULT_TIMEOUT_NS,
    FORMS,
    ExchangeLayout,
    exchange_rows_peer,
    exchange_rows_reference,
    row_words,
    symmetric_layout,
)

__all__ = [
    "DEFAULT_TIMEOUT_NS",
    "FORMS",
    "ExchangeLayout",
    "exchange_rows_peer",
    "exchange_rows_reference",
    "row_words",
    "symmetric_layout",
]
