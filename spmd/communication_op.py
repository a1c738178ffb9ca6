"""vLLM's communication ops, by name, over the tensor-parallel group.

Each is a thin function over :func:`spmd.get_tp_group`, traced inside ``shard_map`` over the
global mesh (``spmd.shard_map``). They accept a single array or a pytree of arrays.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from spmd import parallel_state as ps
from spmd.axes import TP

__all__ = [
    "broadcast_tensor_dict",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_reduce_scatter",
]


def tensor_model_parallel_all_reduce(input_: Any) -> Any:
    """Sum ``input_`` over the TP group; every TP rank gets the same result.

    Used after a row-parallel linear layer (attention output, MLP down projection).
    """
    return ps.get_tp_group().all_reduce(input_)


def tensor_model_parallel_all_gather(input_: Any, dim: int = -1) -> Any:
    """Concatenate every TP rank's shard along ``dim``.

    Used after a column-parallel linear layer whose full output every rank needs.
    """
    return ps.get_tp_group().all_gather(input_, dim)


def tensor_model_parallel_reduce_scatter(input_: Any, dim: int = -1) -> Any:
    """Sum over the TP group and keep this rank's slice of ``dim``."""
    return ps.get_tp_group().reduce_scatter(input_, dim)


def _tp_axis_is_bound() -> bool:
    try:
        lax.axis_size(TP)
    except NameError:
        return False
    return True


def broadcast_tensor_dict(tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any] | None:
    """Every TP rank gets rank ``src``'s dict.

    Three settings:

    * model parallel not initialized: returns ``tensor_dict`` unchanged (vLLM's behaviour without
      ``torch.distributed``);
    * inside ``shard_map`` (the "tp" axis bound): the array values of TP rank ``src`` reach every
      TP rank (one fused broadcast); other values pass through, since every rank traced them;
    * on the host of a single-process job: every device is driven by this one process, which
      already holds the dict, so it is returned unchanged.

    Raises:
      ValueError: ``src`` is out of range for the TP group, or ``tensor_dict`` is ``None`` inside
        ``shard_map``.
    """
    if not ps.model_parallel_is_initialized():
        return tensor_dict
    group = ps.get_tp_group()
    if _tp_axis_is_bound():
        return group.broadcast_tensor_dict(tensor_dict, src=src)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < group.world_size:
        raise ValueError(
            f"broadcast_tensor_dict: src={src!r} is out of range for the TP group of size "
            f"{group.world_size}; expected 0 <= src < {group.world_size}."
        )
    if jax.process_count() == 1:
        return tensor_dict
    raise NotImplementedError(
        "broadcast_tensor_dict across processes is not implemented yet; call it inside shard_map."
    )
