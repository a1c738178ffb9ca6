"""KV-cache transfer between a prefill and a decode worker (the seed's ``KVPipeBase`` API).

Pipes (all :class:`KVPipeBase`: ``send_tensor`` / ``recv_tensor`` / ``close``):

* :class:`TCPKVPipe`: framed arrays over one TCP connection (JSON header, HMAC handshake, no pickle);
* :class:`DevicePutKVPipe`: device to device between two disjoint process meshes of one
  ``jax.distributed`` job (cross-process ``jax.device_put``);
* :class:`TransferServerKVPipe`: device to device between independent processes
  (``jax.experimental.transfer``), ids and metadata on a small TCP control pipe;
* :class:`IpcKVPipe`: device to device between independent processes on one host, through
  shared memory (CUDA IPC on GPUs, ``/dev/shm`` on CPU).

KV caches travel split by KV heads (:mod:`spmd.kv_transfer.heads`), so prefill and decode may use
different TP sizes. See ``docs/kv_transfer.md``.
"""

from spmd.kv_transfer.base import KVPipeBase
from spmd.kv_transfer.device_put import DevicePutKVPipe
from spmd.kv_transfer.heads import (
    KVPiece,
    kv_head_ranges,
    kv_head_sharding,
    kv_transfer_plan,
    merge_kv_heads,
    reshard_kv_heads,
    split_kv_heads,
)
from spmd.kv_transfer.ipc import IpcKVPipe
from spmd.kv_transfer.tcp import TCPKVPipe
from spmd.kv_transfer.transfer_server import TransferServerKVPipe

__all__ = [
    "DevicePutKVPipe",
    "IpcKVPipe",
    "KVPiece",
    "KVPipeBase",
    "TCPKVPipe",
    "TransferServerKVPipe",
    "kv_head_ranges",
    "kv_head_sharding",
    "kv_transfer_plan",
    "merge_kv_heads",
    "reshard_kv_heads",
    "split_kv_heads",
]
