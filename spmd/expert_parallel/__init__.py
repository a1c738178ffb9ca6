"""Expert parallelism: all-to-all managers that route MoE tokens to experts on the "ep" axis."""

from __future__ import annotations

from spmd.expert_parallel.base import All2AllManagerBase, ExpertInputs, ExpertTokens, RoutingState
from spmd.expert_parallel.buckets import (
    combine_by_all_gather,
    combine_by_all_to_all,
    scatter_by_all_gather,
    scatter_by_all_to_all,
)
from spmd.expert_parallel.low_latency import (
    LowLatencyAll2AllManager,
    LowLatencyRoutingState,
    allocate_low_latency_buffers,
)
from spmd.expert_parallel.managers import MANAGERS as XLA_MANAGERS
from spmd.expert_parallel.managers import (
    CapacityAll2AllManager,
    CapacityRoutingState,
    NaiveAll2AllManager,
    NaiveRoutingState,
    RaggedAll2AllManager,
    RaggedRoutingState,
    ragged_all_to_all_dense,
)
from spmd.expert_parallel.plan import DEFAULT_MAX_TOKENS, ENABLE_ENV, LowLatencyPlan, plan_low_latency

MANAGERS = {**XLA_MANAGERS, "low_latency": LowLatencyAll2AllManager}  # every manager, by name

__all__ = [
    "All2AllManagerBase",
    "DEFAULT_MAX_TOKENS",
    "ENABLE_ENV",
    "CapacityAll2AllManager",
    "CapacityRoutingState",
    "ExpertInputs",
    "ExpertTokens",
    "LowLatencyAll2AllManager",
    "LowLatencyPlan",
    "LowLatencyRoutingState",
    "NaiveAll2AllManager",
    "NaiveRoutingState",
    "RaggedAll2AllManager",
    "RaggedRoutingState",
    "RoutingState",
    "allocate_low_latency_buffers",
    "combine_by_all_gather",
    "combine_by_all_to_all",
    "get_all2all_manager",
    "plan_low_latency",
    "ragged_all_to_all_dense",
    "scatter_by_all_gather",
    "scatter_by_all_to_all",
]


def get_all2all_manager(name: str, num_experts: int, **kwargs) -> All2AllManagerBase:
    """The manager called ``name`` ("naive", "capacity", "ragged" or "low_latency") for ``num_experts`` experts.

    Args:
      name: a key of ``MANAGERS``.
      num_experts: experts in the layer, all EP ranks together.
      **kwargs: the manager's own options (``expert_capacity=``, ``use_ragged_collective=``, ...).

    Raises:
      ValueError: an unknown name.
    """
    try:
        cls = MANAGERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"get_all2all_manager: unknown manager {name!r}; expected one of {sorted(MANAGERS)}."
        ) from None
    return cls(num_experts, **kwargs)
