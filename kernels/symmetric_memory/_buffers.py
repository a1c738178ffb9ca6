"""One group's persistent buffers on a mesh's devices, and the peer table a kernel reads them by."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels.symmetric_memory._layout import Layout

__all__ = ["SymmetricBuffers", "group_of"]


def group_of(axis_name: Any) -> tuple[str, ...]:
    """An axis name or tuple of names as a tuple of names."""
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


@dataclasses.dataclass(frozen=True, eq=False)
class SymmetricBuffers:
    """One persistent buffer per device of ``mesh``, and their device addresses.

    Attributes:
      mesh: the mesh whose devices hold the buffers.
      group: the axes of the one group these buffers serve.
      layout: the buffer layout.
      addresses: device address of each buffer, in ``mesh.devices.flat`` order, as this process
        sees it: its own buffers' addresses, and (across processes) its mappings of the others'.
    """

    mesh: jax.sharding.Mesh
    group: tuple[str, ...]
    layout: Layout
    addresses: tuple[int, ...]
    _arrays: tuple[jax.Array, ...] = dataclasses.field(repr=False)

    def peer_table(self, axis_name: Any) -> jax.Array:
        """``int32[1 + 2 n]``: this device's rank along ``axis_name``, then each rank's buffer address.

        Traced inside ``shard_map`` over every axis of :attr:`mesh`; each address travels as two
        ``int32`` words (low, high), so the table needs no 64-bit types. Built from
        ``lax.axis_index`` and a constant table; XLA hoists it out of loops.

        Raises:
          ValueError: ``axis_name`` is not the group these buffers were allocated for.
        """
        names = tuple(self.mesh.axis_names)
        group = group_of(axis_name)
        if group != self.group:
            raise ValueError(
                f"SymmetricBuffers.peer_table: these buffers serve the group {self.group}, got axis_name="
                f"{axis_name!r}; allocate the group's own with symmetric_memory.allocate(mesh, {axis_name!r})."
            )
        sizes = dict(zip(names, self.mesh.devices.shape, strict=True))
        n = math.prod(sizes[a] for a in group)
        strides = dict(zip(names, np.cumprod((1, *self.mesh.devices.shape[::-1]))[::-1][1:].tolist(), strict=True))
        coords = {a: lax.axis_index(a) for a in names}
        rank = jnp.int32(0)
        for a in group:
            rank = rank * sizes[a] + coords[a]
        base = sum(coords[a] * strides[a] for a in names if a not in group)
        linear = []
        for j in range(n):
            lin, rest = base, j
            for a in reversed(group):
                lin = lin + (rest % sizes[a]) * strides[a]
                rest //= sizes[a]
            linear.append(lin)
        words = np.array(self.addresses, np.uint64)
        table = np.stack([words & 0xFFFFFFFF, words >> 32], axis=1).astype(np.uint32).view(np.int32)
        pairs = jnp.asarray(table)[jnp.stack([jnp.asarray(v, jnp.int32) for v in linear])]
        return jnp.concatenate([jnp.reshape(rank, (1,)).astype(jnp.int32), pairs.reshape(-1)])
