"""Custom all-reduce for small tensors: Pallas one-shot and two-shot kernels, psum otherwise."""

from kernels.custom_all_reduce.ops import auto_algorithms, custom_all_reduce, reference_all_reduce
from kernels.custom_all_reduce.planning import (
    ALGORITHMS,
    TuningEntry,
    ineligibility,
    select_algorithm,
    should_use_custom_all_reduce,
    tuning_table,
)

__all__ = [
    "ALGORITHMS",
    "TuningEntry",
    "auto_algorithms",
    "custom_all_reduce",
    "ineligibility",
    "reference_all_reduce",
    "select_algorithm",
    "should_use_custom_all_reduce",
    "tuning_table",
]
