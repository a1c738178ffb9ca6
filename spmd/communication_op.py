"""vLLM's communication ops, by name, over the tensor-parallel group.

Each is a thin function over :func:`spmd.get_tp_group`, traced inside ``shard_map`` over the
global mesh (``spmd.shard_map``). They accept a single array or a pytree of arrays.
"""

from __future__ import annotations

from typing import Any

import jax

from spmd import host
from spmd import parallel_state as ps
from spmd.axes import TP
from spmd.collectives import axis_is_bound

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


def broadcast_tensor_dict(tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any] | None:
    """Every rank gets rank ``src``'s dict (vLLM's ``broadcast_tensor_dict`` over the TP group).

    Three settings:

    * inside ``shard_map`` (the "tp" axis bound): the array values of TP rank ``src`` reach every
      TP rank, bit for bit, in one fused broadcast; other values pass through, since every rank
      traced them;
    * on the host of a multi-process job: process ``src`` passes the dict and the others pass
      ``None``; metadata goes first as JSON, then every array in one packed collective, and every
      process returns an equal dict (see :mod:`spmd.host`);
    * a single process, outside ``shard_map``: that process already holds the dict, which is
      returned unchanged (vLLM's behaviour without ``torch.distributed``).

    Raises:
      ValueError: ``src`` is out of range, or ``tensor_dict`` is ``None`` inside ``shard_map``.
      TypeError: host level, on ``src``: a value that cannot cross processes (named by its key).
      RuntimeError: host level, on the others: ``src`` could not send.
    """
    if axis_is_bound(TP):
        if ps.model_parallel_is_initialized():
            return ps.get_tp_group().broadcast_tensor_dict(tensor_dict, src=src)
        return ps.broadcast_pytree_arrays(tensor_dict, TP, src=src)
    if jax.process_count() > 1:
        return host.broadcast_tensor_dict_across_processes(tensor_dict, src)
    if ps.model_parallel_is_initialized():
        n = ps.get_tp_group().world_size
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < n:
            raise ValueError(
                f"broadcast_tensor_dict: src={src!r} is out of range for the TP group of size {n}; "
                f"expected 0 <= src < {n}."
            )
    return tensor_dict
