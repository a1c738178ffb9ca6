"""vLLM's communication ops, by name, over the tensor-parallel group.

Each is a thin function over :func:`spmd.get_tp_group`, traced inside ``shard_map`` over the
global mesh (``spmd.shard_map``). They accept a single array or a pytree of arrays.
"""

from __future__ import annotations

from typing import Any

from spmd import host
from spmd import parallel_state as ps
from spmd import tensor_dict as td
from spmd.axes import TP
from spmd.collectives import all_reduce, axis_is_bound

__all__ = [
    "broadcast_tensor_dict",
    "custom_all_reduce",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_all_reduce_add_rms_norm",
    "tensor_model_parallel_reduce_scatter",
]


def tensor_model_parallel_all_reduce(input_: Any) -> Any:
    """Sum ``input_`` over the TP group; every TP rank gets the same result.

    Used after a row-parallel linear layer (attention output, MLP down projection).
    """
    return ps.get_tp_group().all_reduce(input_)


def custom_all_reduce(input_: Any, use_custom: bool = True) -> Any:
    """Sum ``input_`` over the TP group with the custom all-reduce kernel when it takes it (the seed's op).

    vLLM's ``custom_all_reduce(input_, use_custom=True)``: small tensors go to the custom kernel, the
    rest to the standard all-reduce. Here "takes it" is the TP group communicator's plan
    (:meth:`PallasCommunicator.custom_all_reduce <spmd.communicators.PallasCommunicator.custom_all_reduce>`):
    a supported dtype, at most the tuning table's ``max_bytes`` for this platform and world size
    (vLLM's ``CUSTOM_ALLREDUCE_THRESHOLD``, measured per world size), ``shard_map(..., check_vma=False)``,
    and on GPUs the group's peer buffers. On CPU communicators, and on groups initialized with
    ``disable_custom_all_reduce=True``, nothing takes it.

    Args:
      input_: an array or a pytree of arrays, traced inside ``shard_map`` over the global mesh.
      use_custom: ``False`` always uses XLA's all-reduce (``psum``), the seed's standard path.

    Returns:
      The sum on every TP rank: the kernel's (float32 in rank order, the same bits on every rank) or
      XLA's, which is what :func:`tensor_model_parallel_all_reduce` computes for input the kernel does not take.

    Raises:
      RuntimeError: model parallel is not initialized.
    """
    group = ps.get_tp_group()
    if use_custom:
        out = group.device_communicator.custom_all_reduce(input_)
        if out is not None:
            return out
    return all_reduce(input_, group.axis_name)


def tensor_model_parallel_all_reduce_add_rms_norm(
    input_: Any, residual: Any, weight: Any, eps: float
) -> tuple[Any, Any]:
    """``(rms_norm(all_reduce(input_) + residual), all_reduce(input_) + residual)`` over the TP group.

    A row-parallel layer's partial sums reduced, the residual added and the next RMSNorm applied
    (Hugging Face's formula: float32, cast back, times ``weight``): one kernel launch on GPUs with
    the custom all-reduce's peer buffers for decode-sized inputs (as vLLM and TensorRT-LLM fuse it),
    the three steps elsewhere. Returns ``(normalised, new residual)``.
    """
    return ps.get_tp_group().all_reduce_add_rms_norm(input_, residual, weight, eps)


def tensor_model_parallel_all_gather(input_: Any, dim: int = -1) -> Any:
    """Concatenate every TP rank's shard along ``dim``.

    Used after a column-parallel linear layer whose full output every rank needs.
    """
    return ps.get_tp_group().all_gather(input_, dim)


def tensor_model_parallel_reduce_scatter(input_: Any, dim: int = -1) -> Any:
    """Sum over the TP group and keep this rank's slice of ``dim``."""
    return ps.get_tp_group().reduce_scatter(input_, dim)


def broadcast_tensor_dict(tensor_dict: dict[Any, Any] | None = None, src: int = 0) -> dict[Any, Any] | None:
    """Rank ``src``'s dict on every rank of the group (vLLM's ``broadcast_tensor_dict``).

    Which group, as in vLLM: the TP group once :func:`spmd.initialize_model_parallel` has run
    (``get_tp_group().broadcast_tensor_dict``); before that, the world of processes, where rank
    ``src`` is process ``src`` (so ``broadcast_tensor_dict(config, src=0)`` right after
    :func:`spmd.init_distributed_environment` reaches every process). ``src`` is always a rank in
    that group.

    Settings:

    * inside ``shard_map`` (the "tp" axis bound): the array values of TP rank ``src`` reach every
      TP rank, bit for bit, in one fused broadcast; other values pass through, since every rank
      traced them. This holds on any mesh with a "tp" axis, initialized or not;
    * on the host of a multi-process job: the process owning rank ``src`` passes the dict and the
      others ``None``; metadata goes first as JSON, then every array in one packed collective
      (see :mod:`spmd.tensor_dict` and :mod:`spmd.host`);
    * a single process, outside ``shard_map``: that process holds every rank and gets its dict
      back (vLLM's behaviour without ``torch.distributed``).

    Raises:
      ValueError: ``src`` is out of range for the group, or ``tensor_dict`` is ``None`` inside ``shard_map``.
      TypeError: host level, on the sender: not a dict, or a value that cannot cross processes (named by its key).
      RuntimeError: host level, on the receivers: the sender could not send.
    """
    if ps.model_parallel_is_initialized():
        return ps.get_tp_group().broadcast_tensor_dict(tensor_dict, src=src)
    if axis_is_bound(TP):
        return td.broadcast_pytree_arrays(tensor_dict, TP, src=src)
    return host.broadcast_tensor_dict_across_processes(tensor_dict, src)
