"""Moving per-expert buckets between EP ranks: the seed's ``scatter`` / ``combine`` step, as free functions.

A source rank holds buckets ``T[E, C, H]``: up to ``C`` rows for each of the ``E`` global
experts. ``scatter`` leaves each owner rank with ``T[E_local, ep * C, H]``: for each of its
local experts, the bucket every source rank filled for it, source-rank-major. ``combine`` is
the inverse. Two wires do this:

* ``*_by_all_to_all``: one ``all_to_all`` each way; each rank sends only the owner's buckets.
* ``*_by_all_gather``: every rank all-gathers every bucket and keeps its own experts' (the
  naive manager's wire: ``ep`` times the traffic, no all-to-all).
"""

from __future__ import annotations

import jax
from jax import lax

from spmd import collectives

__all__ = [
    "combine_by_all_gather",
    "combine_by_all_to_all",
    "from_local_experts",
    "scatter_by_all_gather",
    "scatter_by_all_to_all",
    "to_local_experts",
]


def to_local_experts(per_source: jax.Array) -> jax.Array:
    """``T[ep(src), E_local, C, H] -> T[E_local, ep * C, H]`` (source-rank-major rows per expert)."""
    ep, e_local, c, h = per_source.shape
    return per_source.transpose(1, 0, 2, 3).reshape(e_local, ep * c, h)


def from_local_experts(x: jax.Array, ep: int) -> jax.Array:
    """``T[E_local, ep * C, H] -> T[ep(src), E_local, C, H]``: the inverse of :func:`to_local_experts`."""
    e_local, rows, h = x.shape
    return x.reshape(e_local, ep, rows // ep, h).transpose(1, 0, 2, 3)


def scatter_by_all_to_all(buckets: jax.Array, *, axis_name: str) -> jax.Array:
    """``T[E, C, H]`` on every source rank -> ``T[E_local, ep * C, H]`` on every owner, one all_to_all."""
    ep = collectives.axis_size(axis_name, op="scatter")
    e, c, h = buckets.shape
    received = collectives.all_to_all(buckets.reshape(ep, e // ep, c, h), axis_name, split_axis=0, concat_axis=0)
    return to_local_experts(received)


def combine_by_all_to_all(x: jax.Array, *, axis_name: str) -> jax.Array:
    """``T[E_local, ep * C, H]`` on every owner -> ``T[E, C, H]`` on every source rank, one all_to_all."""
    ep = collectives.axis_size(axis_name, op="combine")
    back = collectives.all_to_all(from_local_experts(x, ep), axis_name, split_axis=0, concat_axis=0)
    _, e_local, c, h = back.shape
    return back.reshape(ep * e_local, c, h)


def scatter_by_all_gather(buckets: jax.Array, *, axis_name: str) -> jax.Array:
    """As :func:`scatter_by_all_to_all`, by all-gathering every bucket and keeping this rank's experts."""
    ep = collectives.axis_size(axis_name, op="scatter")
    e_local = buckets.shape[0] // ep
    gathered = collectives.all_gather(buckets[None], axis_name, axis=0)  # [ep(src), E, C, H]
    first = collectives.axis_index(axis_name) * e_local
    return to_local_experts(lax.dynamic_slice_in_dim(gathered, first, e_local, axis=1))


def combine_by_all_gather(x: jax.Array, *, axis_name: str) -> jax.Array:
    """As :func:`combine_by_all_to_all`, by all-gathering every owner's rows and keeping this source's."""
    ep = collectives.axis_size(axis_name, op="combine")
    gathered = collectives.all_gather(from_local_experts(x, ep)[None], axis_name, axis=0)  # [owner, src, E_local, C, H]
    mine = lax.dynamic_index_in_dim(gathered, collectives.axis_index(axis_name), axis=1, keepdims=False)
    _, e_local, c, h = mine.shape  # [owner, E_local, C, H]
    return mine.reshape(ep * e_local, c, h)
