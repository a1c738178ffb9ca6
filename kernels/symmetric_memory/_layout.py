"""The layout of one device's peer buffer: staging, flags, counters and inbox, in bytes.

Layout of one device's buffer, :class:`Layout`::

    staging[2][max_blocks][tiles_per_block_max * TILE_BYTES]    pull protocol, by epoch parity
    flags[max_blocks][max_ranks]   uint32                       epoch written by rank r for block b
    counters[max_blocks]           uint32                       this device's epoch per block
    inbox[2][max_blocks][max_ranks][ll_tiles_per_block_max * 2 * TILE_BYTES]
                                   low-latency protocol: rank r's (word, epoch) pairs for block b
"""

from __future__ import annotations

import dataclasses

__all__ = ["TILE_BYTES", "Layout"]

TILE_BYTES = 2048  # one warpgroup (128 threads) x 16 bytes: the unit every kernel moves


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things live in one device's buffer.

    Attributes:
      max_blocks: thread blocks a kernel may use (each owns its staging slot and flags).
      tiles_per_block_max: tiles of :data:`TILE_BYTES` a block may stage per call.
      max_ranks: largest group size.
      ll_tiles_per_block_max: tiles a block may push per call in the low-latency protocol (every
        4-byte word travels with its epoch, so its inbox takes twice the bytes, per sender).
    """

    max_blocks: int = 128
    tiles_per_block_max: int = 8
    max_ranks: int = 8
    ll_tiles_per_block_max: int = 2

    def __post_init__(self):
        for name in ("max_blocks", "tiles_per_block_max", "max_ranks", "ll_tiles_per_block_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Layout: expected {name} to be a positive int, got {v!r}.")

    @property
    def slot_bytes(self) -> int:
        """Staging bytes of one block in one parity."""
        return self.tiles_per_block_max * TILE_BYTES

    @property
    def max_message_bytes(self) -> int:
        """The largest message (bytes per device) one call can stage."""
        return self.max_blocks * self.slot_bytes

    @property
    def flags_offset(self) -> int:
        return 2 * self.max_blocks * self.slot_bytes

    @property
    def counters_offset(self) -> int:
        return self.flags_offset + 4 * self.max_blocks * self.max_ranks

    @property
    def inbox_offset(self) -> int:
        return -(-(self.counters_offset + 4 * self.max_blocks) // 4096) * 4096

    @property
    def inbox_slot_bytes(self) -> int:
        """Inbox bytes of one (parity, block, sender)."""
        return self.ll_tiles_per_block_max * 2 * TILE_BYTES

    @property
    def ll_max_message_bytes(self) -> int:
        """The largest message (bytes per device) the low-latency protocol takes."""
        return self.max_blocks * self.ll_tiles_per_block_max * TILE_BYTES

    @property
    def nbytes(self) -> int:
        return self.inbox_offset + 2 * self.max_blocks * self.max_ranks * self.inbox_slot_bytes
