"""Decode-time skinny matrix products (GEMV for ``M <= 64``) in Pallas, their reference and tuning table.

:mod:`.ops` holds the kernel (Triton lowering; any backend in interpret mode) and
:func:`reference_matmul`; :mod:`.table` the measured table that says, per device kind and shape,
which tiling beats XLA's own fusion (and for which shapes XLA stays). Which product a layer runs
is decided in ``models.decode_kernels``. This package imports only JAX and NumPy.
"""

from kernels.gemv.ops import LAYOUTS, GemvConfig, gemv, ineligibility, reference_matmul
from kernels.gemv.table import TABLE_PATH, TableEntry, load_table, lookup

__all__ = [
    "LAYOUTS",
    "TABLE_PATH",
    "GemvConfig",
    "TableEntry",
    "gemv",
    "ineligibility",
    "load_table",
    "lookup",
    "reference_matmul",
]
