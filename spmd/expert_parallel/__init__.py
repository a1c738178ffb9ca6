"""Expert parallelism: all-to-all managers that route MoE tokens to experts on the "ep" axis."""

from __future__ import annotations

from spmd.expert_parallel.base import All2AllManagerBase, ExpertInputs, RoutingState
from spmd.expert_parallel.managers import (
    MANAGERS,
    CapacityAll2AllManager,
    NaiveAll2AllManager,
    RaggedAll2AllManager,
    ragged_all_to_all_dense,
)

__all__ = [
    "All2AllManagerBase",
    "CapacityAll2AllManager",
    "ExpertInputs",
    "NaiveAll2AllManager",
    "RaggedAll2AllManager",
    "RoutingState",
    "get_all2all_manager",
    "ragged_all_to_all_dense",
]


def get_all2all_manager(name: str, num_experts: int, **kwargs) -> All2AllManagerBase:
    """The manager called ``name`` ("naive", "capacity" or "ragged") for ``num_experts`` experts.

    Raises:
      ValueError: an unknown name.
    """
    try:
        cls = MANAGERS[name]
    except KeyError:
        raise ValueError(
            f"get_all2all_manager: unknown manager {name!r}; expected one of {sorted(MANAGERS)}."
        ) from None
    return cls(num_experts, **kwargs)
