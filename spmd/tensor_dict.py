"""Tensor dicts: vLLM's ``broadcast_tensor_dict`` and pipeline hand-offs, in-graph and on the host.

Two settings, one meaning of ``src`` (a rank in the group, as in vLLM):

* **in-graph** (inside ``shard_map``, the group's axis bound): every rank traces the same program,
  so every rank passes a dict of the same structure; rank ``src``'s array leaves reach every rank
  of its group bit for bit, and non-array leaves (ints, strings, ``None``) pass through.
* **host level** (outside ``shard_map``, across the processes of a multi-controller job): rank
  ``src`` of a group is a device, and the process that owns that device is the sender; every
  other process of the group receives its dict. The metadata and bytes travel through
  :mod:`spmd.host` (JSON, no pickle). Every process of the job makes the call, as for any
  collective; groups whose source processes differ are served by the same call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from spmd import collectives, host
from spmd.axes import AxisName

__all__ = [
    "broadcast_pytree_arrays",
    "group_source_processes",
    "host_all_gather_object_in_group",
    "host_broadcast_in_group",
    "map_array_leaves",
    "shift_pytree_arrays",
]


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def map_array_leaves(tree: Any, fn: Callable[[list], list]) -> Any:
    """Apply ``fn`` to the list of ``tree``'s array leaves at once; other leaves pass through."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda v: v is None)
    positions = [i for i, v in enumerate(leaves) if _is_array(v)]
    for i, v in zip(positions, fn([leaves[i] for i in positions]), strict=True):
        leaves[i] = v
    return jax.tree.unflatten(treedef, leaves)


def broadcast_pytree_arrays(tree: Any, axis_name: AxisName, *, src: int = 0, op: str = "broadcast_tensor_dict") -> Any:
    """In-graph: rank ``src``'s array leaves of ``tree`` on every rank; other leaves pass through.

    Raises:
      ValueError: ``tree`` is ``None`` (every rank must pass the same-structured dict), or ``src``
        out of range for the axis.
      UnboundAxisError: ``axis_name`` is not bound.
    """
    n = collectives.axis_size(axis_name, op=op)
    collectives._check_rank(op, "src", src, n, axis_name)
    if tree is None:
        raise ValueError(
            f"{op}: got tensor_dict=None inside shard_map. Every rank of an SPMD program runs the same "
            f"code, so pass the same-structured dict on every rank; rank src={src}'s array values are the "
            f"ones every rank gets back."
        )
    return map_array_leaves(tree, lambda arrays: collectives.broadcast(arrays, axis_name, src=src) if arrays else [])


def shift_pytree_arrays(tree: Any, axis_name: AxisName, *, offset: int = 1) -> Any:
    """In-graph pipeline hand-off: rank ``r``'s array leaves arrive at rank ``r + offset``.

    The first ``offset`` ranks (no sender) receive zeros; non-array leaves pass through.
    """
    return map_array_leaves(tree, lambda arrays: collectives.shift(arrays, axis_name, offset=offset, wrap=False))


# Host level ----------------------------------------------------------------------------------------


def _check_group_rank(op: str, src: Any, world_size: int, group_name: str) -> int:
    if isinstance(src, bool) or not isinstance(src, (int, np.integer)) or not 0 <= src < world_size:
        raise ValueError(
            f"{op}: src={src!r} is out of range for the {group_name} group of size {world_size}; "
            f"expected 0 <= src < {world_size} (src is a rank in the group)."
        )
    return int(src)


def _process_of_device() -> dict[int, int]:
    return {d.id: d.process_index for d in jax.devices()}


def _my_groups(device_groups: Sequence[Sequence[int]], op: str, group_name: str) -> list[Sequence[int]]:
    mine = {d.id for d in jax.local_devices()}
    groups = [g for g in device_groups if mine.intersection(g)]
    if not groups:
        raise ValueError(
            f"{op}: process {jax.process_index()} holds no device of the {group_name} group's mesh, so it has "
            f"no rank in it; call host-level ops on a group only from processes whose devices are in the mesh."
        )
    return groups


def group_source_processes(
    device_groups: Sequence[Sequence[int]], src: int, *, op: str, group_name: str
) -> tuple[int, tuple[int, ...]]:
    """``(this process's source, every group's source)`` for rank ``src`` of each group.

    Rank ``src`` of a group is a device; the process that owns it sends to the group. A process
    whose devices sit in several groups must find the same source process for all of them.

    Raises:
      ValueError: this process holds no device of the groups, or its groups disagree on the source.
    """
    owner = _process_of_device()
    sources = tuple(sorted({owner[g[src]] for g in device_groups}))
    mine = {owner[g[src]] for g in _my_groups(device_groups, op, group_name)}
    if len(mine) != 1:
        raise ValueError(
            f"{op}: process {jax.process_index()} holds devices of several {group_name} groups whose rank "
            f"src={src} lives on different processes {sorted(mine)}; a host-level message has one sender "
            f"per process. Lay the mesh out so that each process's devices share one source."
        )
    return next(iter(mine)), sources


def host_broadcast_in_group(
    value: Any,
    src: int,
    *,
    device_groups: Sequence[Sequence[int]],
    world_size: int,
    group_name: str,
    op: str,
    require_dict: bool = False,
    timeout_s: float | None = None,
) -> Any:
    """Host level: every process gets the value of the process owning rank ``src`` of its group.

    Raises:
      ValueError: ``src`` out of range for the group, or a layout with no single sender per process.
      TypeError: on the sender, a value that cannot travel (or not a dict, with ``require_dict``).
      RuntimeError: on the receivers, when the sender could not send.
      TimeoutError: the sender did not send within the timeout.
    """
    src = _check_group_rank(op, src, world_size, group_name)
    source, sources = group_source_processes(device_groups, src, op=op, group_name=group_name)

    def must_be_dict(v: Any) -> None:
        if not isinstance(v, dict) and not (v is None and jax.process_count() == 1):  # vLLM: no-op alone
            raise TypeError(f"{op}: rank src={src} of the {group_name} group must pass a dict, got {type(v).__name__}.")

    return host.broadcast_from(
        value, source, sources=sources, op=op, timeout_s=timeout_s, check=must_be_dict if require_dict else None
    )


def host_all_gather_object_in_group(
    obj: Any, *, device_groups: Sequence[Sequence[int]], group_name: str, timeout_s: float | None = None
) -> list[Any]:
    """Host level: for each rank of this process's group, the object of the process owning it.

    Raises:
      ValueError: this process's devices sit in several groups (no single answer).
    """
    op = "all_gather_object"
    owner = _process_of_device()
    layouts = {tuple(owner[d] for d in g) for g in _my_groups(device_groups, op, group_name)}
    if len(layouts) != 1:
        raise ValueError(
            f"{op}: process {jax.process_index()} holds devices of several {group_name} groups whose ranks live "
            f"on different processes {sorted(layouts)}; the answer would differ per group. Use "
            f"spmd.host.all_gather_object for one entry per process."
        )
    per_process = host.all_gather_object(obj, timeout_s=timeout_s)
    return [per_process[p] for p in next(iter(layouts))]
