"""A model's KV cache as KV pipes move it, and back: each KV head once, split by heads over TP devices.

:class:`models.KVCache` keeps, per layer, ``[batch, max(kv_heads, tp), max_len, head_dim]`` sharded
over "tp" on axis 1 (with tp > kv_heads, each rank's copy of its head). A pipe's
``send_kv_cache(layers, head_axis=1)`` wants each head once (``[batch, kv_heads, max_len,
head_dim]`` sharded by :func:`spmd.kv_transfer.kv_head_sharding`). :func:`kv_layers_for_transfer`
and :func:`kv_cache_from_layers` convert between the two without copying the per-device buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["kv_cache_from_layers", "kv_layers_for_transfer", "tp_devices"]


def tp_devices(mesh: Any) -> list[Any]:
    """A TP-only mesh's devices in TP rank order.

    Raises:
      ValueError: the mesh has other axes larger than 1 (a worker here is TP only).
    """
    if mesh.devices.size != mesh.shape["tp"]:
        raise ValueError(
            f"tp_devices: expected a mesh of TP only, got {dict(mesh.shape)}; initialize the worker's "
            f"model parallel state with tensor_model_parallel_size equal to its devices."
        )
    return list(mesh.devices.flat)


def _cache_sharding(mesh: Any) -> Any:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from models.runner import BATCH_AXES
    from spmd import TP

    return NamedSharding(mesh, P(BATCH_AXES, TP, None, None))


def kv_layers_for_transfer(cache: Any, *, mesh: Any, num_kv_heads: int) -> list[Any]:
    """A model's KV cache as the layers a pipe sends: keys then values, each KV head once.

    Args:
      cache: a :class:`models.KVCache` placed on ``mesh`` (per layer ``[batch, max(kv_heads, tp),
        max_len, head_dim]``, sharded over "tp" on axis 1: with tp > kv_heads, each rank's copy).
      mesh: the model's TP-only mesh.
      num_kv_heads: the model's KV heads.

    Returns:
      ``2 * layers`` arrays ``[batch, num_kv_heads, max_len, head_dim]``, sharded by
      :func:`spmd.kv_transfer.kv_head_sharding` over the TP devices: the same per-device buffers
      (no copy), with the replicas of a head seen as one head (as :func:`merge_kv_heads` of the
      per-rank shards, without moving them).
    """
    import jax

    from spmd.kv_transfer import kv_head_sharding

    devices = tp_devices(mesh)
    sharding = kv_head_sharding(devices, num_kv_heads, head_axis=1)
    out = []
    for x in (*cache.keys, *cache.values):
        by_device = {s.device: s.data for s in x.addressable_shards}
        shape = (x.shape[0], num_kv_heads, *x.shape[2:])
        out.append(jax.make_array_from_single_device_arrays(shape, sharding, [by_device[d] for d in devices]))
    return out


def kv_cache_from_layers(layers: Sequence[Any], *, mesh: Any, num_kv_heads: int) -> Any:
    """The inverse of :func:`kv_layers_for_transfer` on the receiver's mesh (any TP size that fits the heads).

    Args:
      layers: keys then values, each ``[batch, num_kv_heads, max_len, head_dim]`` (as
        ``recv_kv_cache`` gives them: sharded by heads over the mesh's TP devices; else placed so).
      mesh: the decode model's TP-only mesh.

    Returns:
      A :class:`models.KVCache` in the model's layout (``[batch, max(kv_heads, tp), max_len,
      head_dim]``, replicated heads as each rank's copy), built from the per-device pieces.

    Raises:
      ValueError: an odd number of layers, or layers without ``num_kv_heads`` heads on axis 1.
    """
    import jax

    from models.llama import KVCache
    from spmd.kv_transfer import kv_head_sharding

    layers = list(layers)
    if not layers or len(layers) % 2:
        raise ValueError(
            f"kv_cache_from_layers: expected keys then values (an even number of layers), got {len(layers)}."
        )
    devices = tp_devices(mesh)
    by_heads = kv_head_sharding(devices, num_kv_heads, head_axis=1)
    target = _cache_sharding(mesh)
    out = []
    for i, x in enumerate(layers):
        if len(x.shape) != 4 or x.shape[1] != num_kv_heads:
            raise ValueError(
                f"kv_cache_from_layers: layer {i} has shape {list(x.shape)}; expected [batch, {num_kv_heads}, "
                f"max_len, head_dim]."
            )
        x = jax.device_put(x, by_heads)  # a no-op when the pipe placed it so
        by_device = {s.device: s.data for s in x.addressable_shards}
        shape = (x.shape[0], max(num_kv_heads, len(devices)), *x.shape[2:])
        out.append(jax.make_array_from_single_device_arrays(shape, target, [by_device[d] for d in devices]))
    n = len(out) // 2
    return KVCache(tuple(out[:n]), tuple(out[n:]))
