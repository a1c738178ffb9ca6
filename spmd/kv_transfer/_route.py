"""A whole KV cache in one transfer per device pair: the routes, and the packing on both sides.

:class:`KVRoute` is the plan both ends of a device pipe derive from the same metadata (the layers'
dtypes and shapes, the number of KV heads, the head axis and the two TP sizes). Receiver rank
``g`` (the first rank of each DISTINCT head group, see :func:`spmd.kv_transfer._device.groups`)
builds its shard of every layer from the pieces :func:`~spmd.kv_transfer.kv_transfer_plan` names,
each cut from one sender rank's local shard. Pieces are grouped by device PAIR ``(sender rank s,
receiver rank g)``; a pair carries, in layer order, every piece ``s`` owes ``g``.

Two ways to move a pair's pieces (``pack``; the sender chooses, its metadata tells the receiver):

* packed: one flat buffer per pair and element width (the pieces' bits as unsigned integers), made
  on the sender device by one jitted concatenation and cut back into every layer's shard by one
  jitted function on the receiver device: one transfer per device pair, whatever the number of
  layers, for a copy on each side;
* pieces: the pieces themselves, all in ONE batched ``jax.device_put`` per pair (no copy when
  every piece is a whole shard on both sides, as with equal TP sizes).

Why one ``device_put`` call per device pair, never one call for several pairs: JAX groups the
arrays of a batched ``device_put`` by (source devices, destination devices) in an unordered hash
map and issues one cross-process copy per group in the map's iteration order, each taking the next
transfer key of a per-process counter; two processes may iterate differently, so one pair's
pieces land in another's (seen as swapped heads; see ``docs/kv_transfer.md``). Inside one group
the arrays pair up by position, so one call per pair, in the same order on both sides, is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from spmd.kv_transfer import _arrays, _device
from spmd.kv_transfer import heads as _heads


@dataclasses.dataclass(frozen=True)
class KVRoute:
    """What moves between which devices for one KV cache (the same on both sides).

    Build it with :func:`kv_route` (the sender) or :meth:`from_metadata` (the receiver, from the
    sender's metadata), which keep the routes of recent shapes: everything below is worked out once
    per shape, not per message.

    Attributes:
      num_heads: the KV heads of every layer.
      src_tp, dst_tp: the sender's and the receiver's TP sizes.
      head_axis: the layers' head axis.
      layers: ``(dtype name, shape)`` per layer.
    """

    num_heads: int
    src_tp: int
    dst_tp: int
    head_axis: int
    layers: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_metadata(cls, kv: Any, src_tp: int, dst_tp: int, fn: str) -> KVRoute:
        """The route a sender's KV metadata names, checked against this pipe's TP sizes.

        ``kv`` is the JSON the sender wrote: ``{"heads", "head_axis", "src_tp", "dst_tp", "layers":
        [[dtype name, shape], ...]}`` (other keys are the pipe's own).

        Raises:
          ValueError: malformed metadata, a cache cut for other TP sizes, a layer without ``heads``
            heads on the head axis, or TP sizes that do not fit the heads.
        """
        if not isinstance(kv, dict) or not isinstance(kv.get("layers"), list) or not kv["layers"]:
            raise ValueError(f"{fn}: malformed KV-cache metadata {kv!r:.200}.")
        heads, axis = kv.get("heads"), kv.get("head_axis")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, axis)) or heads < 1 or axis < 0:
            raise ValueError(f"{fn}: malformed KV-cache metadata (heads={heads!r}, head_axis={axis!r}).")
        if (kv.get("src_tp"), kv.get("dst_tp")) != (src_tp, dst_tp):
            raise ValueError(
                f"{fn}: the sender cut the cache for TP {kv.get('src_tp')!r} -> {kv.get('dst_tp')!r}, but this pipe "
                f"is TP {src_tp} -> {dst_tp}; both sides must build the pipe alike."
            )
        specs = []
        for i, entry in enumerate(kv["layers"]):
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"{fn}: malformed metadata for layer {i}: {entry!r:.100}.")
            dtype, shape = _arrays.array_spec({"dtype": entry[0], "shape": entry[1]}, fn)
            if len(shape) <= axis or shape[axis] != heads:
                raise ValueError(f"{fn}: layer {i} has shape {list(shape)}, not {heads} heads on axis {axis}.")
            specs.append((str(dtype), shape))
        try:
            _heads.kv_head_ranges(heads, src_tp)
            _heads.kv_head_ranges(heads, dst_tp)
        except ValueError as e:
            raise ValueError(f"{fn}: {e}") from None
        return kv_route(heads, src_tp, dst_tp, axis, tuple(specs))

    @functools.cached_property
    def groups(self) -> list[tuple[int, int, list[int]]]:
        """``(head_start, head_stop, receiver ranks)`` per distinct head group."""
        return _device.groups(self.num_heads, self.dst_tp)

    @functools.cached_property
    def plan(self) -> list[list[_heads.KVPiece]]:
        return _heads.kv_transfer_plan(self.num_heads, self.src_tp, self.dst_tp)

    @functools.cached_property
    def live(self) -> list[int]:
        """The layers with at least one element (empty ones never travel: the receiver makes them)."""
        return [i for i, (_, shape) in enumerate(self.layers) if int(np.prod(shape))]

    @functools.cached_property
    def pairs(self) -> list[tuple[int, int]]:
        """``(sender rank, receiver rank)`` of every transfer, in the order both sides issue them."""
        if not self.live:
            return []
        return sorted({(p.src_rank, ranks[0]) for _, _, ranks in self.groups for p in self.plan[ranks[0]]})

    @functools.cached_property
    def _units(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        return {
            (s, g): [(i, k) for i in self.live for k, p in enumerate(self.plan[g]) if p.src_rank == s]
            for s, g in self.pairs
        }

    def units(self, s: int, g: int) -> list[tuple[int, int]]:
        """``(layer, piece index in plan[g])`` of the pieces sender ``s`` owes receiver ``g``, in order."""
        return self._units[(s, g)]

    def piece_shape(self, i: int, k: int, g: int) -> tuple[int, ...]:
        p = self.plan[g][k]
        return _device.piece_shape(self.layers[i][1], self.head_axis, p.src_start, p.src_stop)

    @functools.cached_property
    def dtypes(self) -> list[np.dtype]:
        """Every layer's ``np.dtype``."""
        return [_arrays.dtype_from_name(d) for d, _ in self.layers]

    @functools.cached_property
    def empty(self) -> list[int]:
        """The layers without elements (never sent: the receiver makes them)."""
        return [i for i, (_, shape) in enumerate(self.layers) if not int(np.prod(shape))]

    def carrier(self, i: int) -> str:
        """The unsigned integer dtype layer ``i`` travels as when packed (its bits; ``bool`` as ``uint8``)."""
        return f"uint{8 * self.dtypes[i].itemsize}"

    def carriers(self, s: int, g: int) -> list[str]:
        """The dtypes of the pair's packed buffers, in order of first appearance."""
        return list(dict.fromkeys(self.carrier(i) for i, _ in self.units(s, g)))

    @functools.cached_property
    def _specs(self) -> dict[tuple[int, int, bool], list[tuple[np.dtype, tuple[int, ...]]]]:
        out = {}
        for s, g in self.pairs:
            units = self.units(s, g)
            out[(s, g, False)] = [(self.dtypes[i], self.piece_shape(i, k, g)) for i, k in units]
            sizes = dict.fromkeys(self.carriers(s, g), 0)
            for i, k in units:
                sizes[self.carrier(i)] += int(np.prod(self.piece_shape(i, k, g)))
            out[(s, g, True)] = [(np.dtype(c), (n,)) for c, n in sizes.items()]
        return out

    def buffer_specs(self, s: int, g: int, pack: bool) -> list[tuple[np.dtype, tuple[int, ...]]]:
        """``(dtype, shape)`` of every array the pair moves, in the order of the ``device_put`` call."""
        return self._specs[(s, g, pack)]

    @functools.cached_property
    def _piece_bytes(self) -> list[int]:
        return [
            int(np.prod(shape)) * dtype.itemsize for s, g in self.pairs for dtype, shape in self._specs[(s, g, False)]
        ]

    def mean_piece_bytes(self) -> float:
        """The average size of the pieces (0 when nothing moves)."""
        return sum(self._piece_bytes) / len(self._piece_bytes) if self._piece_bytes else 0.0

    def pieces_per_pair(self) -> float:
        """The average number of pieces a device pair carries (0 when nothing moves)."""
        return len(self._piece_bytes) / len(self.pairs) if self.pairs else 0.0

    def whole_shards(self, s: int, g: int) -> bool:
        """Whether every piece sender ``s`` owes receiver ``g`` is a whole local shard of ``s`` (no cut)."""
        a, b = _heads.kv_head_ranges(self.num_heads, self.src_tp)[s]
        return all((p.src_start, p.src_stop) == (0, b - a) for p in self.plan[g] if p.src_rank == s)

    def one_piece(self, g: int) -> bool:
        """Whether receiver ``g``'s shard of a layer is one piece (nothing to join on arrival)."""
        return len(self.plan[g]) == 1


@functools.lru_cache(maxsize=64)
def kv_route(
    num_heads: int, src_tp: int, dst_tp: int, head_axis: int, layers: tuple[tuple[str, tuple[int, ...]], ...]
) -> KVRoute:
    """The :class:`KVRoute` of these arguments (the same object for the same shapes, its plan worked out once)."""
    return KVRoute(num_heads, src_tp, dst_tp, head_axis, layers)


def sender_plan(layers: list[Any], head_axis: int, devices: list[Any], dst_tp: int) -> tuple[KVRoute, Any, dict]:
    """``(route, the layers' KV-head sharding over devices, the cache's metadata)`` of a cache of this shape.

    Raises:
      ValueError: layers without the same number of heads on ``head_axis``, or TP sizes that do not fit them.
    """
    heads = _arrays.num_heads(layers, head_axis)
    _heads.kv_head_ranges(heads, len(devices))
    _heads.kv_head_ranges(heads, dst_tp)
    specs = tuple((_arrays.dtype_name(x.dtype), tuple(x.shape)) for x in layers)
    route = kv_route(heads, len(devices), dst_tp, head_axis, specs)
    kv = {"heads": heads, "head_axis": head_axis, "src_tp": len(devices), "dst_tp": dst_tp}
    kv["layers"] = [[d, list(shape)] for d, shape in specs]
    return route, _heads.kv_head_sharding(devices, heads, head_axis=head_axis), kv


def _to_bits(x: Any, carrier: str) -> Any:
    import jax

    if x.dtype == np.bool_:
        return x.astype(carrier)
    return x if x.dtype == np.dtype(carrier) else jax.lax.bitcast_convert_type(x, np.dtype(carrier))


def from_bits(bits: Any, dtype: str) -> Any:
    import jax

    dt = _arrays.dtype_from_name(dtype)
    if dt == np.bool_:
        return bits != 0
    return bits if dt == bits.dtype else jax.lax.bitcast_convert_type(bits, dt)


# ---------------------------------------------------------------------------------------------------
# The sender: local shards -> the arrays of each pair's device_put


def local_shards(layer: Any, sharding: Any, src_devices: list[Any]) -> list[Any]:
    """``layer``'s single-device shard on each sender rank, ``sharding`` being :func:`kv_head_sharding`'s.

    A layer placed otherwise (numpy, one device, another layout) is resharded by heads first.
    """
    import jax

    if len(src_devices) == 1 and isinstance(layer, jax.Array) and layer.devices() == {src_devices[0]}:
        return [layer]  # one device: the layer is its own shard
    if not (
        isinstance(layer, jax.Array)
        and (layer.sharding == sharding or layer.sharding.is_equivalent_to(sharding, layer.ndim))
    ):
        layer = jax.device_put(layer, sharding)
    by_device = {s.device: s.data for s in layer.addressable_shards}
    return [by_device[d] for d in src_devices]


@functools.lru_cache(maxsize=256)
def _pack_fn(route: KVRoute, s: int, g: int, pack: bool) -> Any:
    """A jitted function: the pair's source shards (one per unit) -> its packed buffers (or cut pieces)."""
    import jax
    import jax.numpy as jnp

    units = route.units(s, g)
    cuts = [(route.plan[g][k].src_start, route.plan[g][k].src_stop) for _, k in units]
    carriers = [route.carrier(i) for i, _ in units]
    ax = route.head_axis

    def cut(x: Any, a: int, b: int) -> Any:
        return jax.lax.slice_in_dim(x, a, b, axis=ax) if (a, b) != (0, x.shape[ax]) else x

    def fn(*shards: Any) -> tuple[Any, ...]:
        pieces = [cut(x, a, b) for x, (a, b) in zip(shards, cuts, strict=True)]
        if not pack:
            return tuple(pieces)
        # Concatenated as unsigned integers of the same width: the bits, whatever the dtype (and
        # XLA's CPU concatenation of bf16 is 30x slower than of uint16).
        bits = [_to_bits(p.reshape(-1), c) for p, c in zip(pieces, carriers, strict=True)]
        return tuple(
            jnp.concatenate([b for b, cc in zip(bits, carriers, strict=True) if cc == c]) for c in route.carriers(s, g)
        )

    return jax.jit(fn)


def sender_arrays(route: KVRoute, shards: list[list[Any]], s: int, g: int, pack: bool) -> list[Any]:
    """The arrays of pair ``(s, g)``'s ``device_put``, on sender device ``s`` (``shards[layer][rank]``)."""
    units = route.units(s, g)
    inputs = [shards[i][s] for i, _ in units]
    if not pack and route.whole_shards(s, g):
        return inputs  # each piece is a whole shard: no copy
    return list(_pack_fn(route, s, g, pack)(*inputs))


# ---------------------------------------------------------------------------------------------------
# The receiver: what arrived at receiver rank g -> its shard of every live layer


@functools.lru_cache(maxsize=256)
def unpack_fn(route: KVRoute, g: int, pack: bool) -> Any:
    """A jitted function: everything pairs ``(*, g)`` brought -> receiver ``g``'s shard of every live layer."""
    import jax
    import jax.numpy as jnp

    senders = [s for s, gg in route.pairs if gg == g]
    ax = route.head_axis

    def fn(*arrived: Any) -> tuple[Any, ...]:
        pieces: dict[tuple[int, int], Any] = {}  # (layer, piece index) -> array
        it = iter(arrived)
        for s in senders:
            units = route.units(s, g)
            if not pack:
                for u in units:
                    pieces[u] = next(it)
                continue
            for c in route.carriers(s, g):
                flat, offset = next(it), 0
                for i, k in units:
                    if route.carrier(i) != c:
                        continue
                    shape = route.piece_shape(i, k, g)
                    n = int(np.prod(shape))
                    bits = jax.lax.slice_in_dim(flat, offset, offset + n)
                    pieces[(i, k)] = from_bits(bits, route.layers[i][0]).reshape(shape)
                    offset += n
        out = []
        for i in route.live:
            parts = [pieces[(i, k)] for k in range(len(route.plan[g]))]
            out.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=ax))
        return tuple(out)

    return jax.jit(fn)


def receiver_shards(route: KVRoute, arrived: dict[tuple[int, int], list[Any]], g: int, pack: bool) -> list[Any]:
    """Receiver ``g``'s shard of every live layer, from ``arrived[(s, g)]`` (each pair's arrays)."""
    flat = [x for s, gg in route.pairs if gg == g for x in arrived[(s, gg)]]
    if not pack and route.one_piece(g):
        return flat  # one piece per layer (its whole shard), already in layer order
    return list(unpack_fn(route, g, pack)(*flat))


def receiver_layers(
    route: KVRoute,
    arrived: dict[tuple[int, int], list[Any]] | None,
    devices: list[Any],
    pack: bool,
    sharding: Any,
    shards_of: Any = None,
) -> list[Any]:
    """Every layer of the cache, sharded by heads over ``devices`` (``sharding``), from what each pair brought.

    Each head group's first receiver cuts its shards out of ``arrived`` (:func:`receiver_shards`), or
    ``shards_of(rank)`` gives them; its replicas (``tp > kv_heads``) get local copies; empty layers are made here.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    by_rank: dict[int, list[Any]] = {}
    for _, _, ranks in route.groups:
        if not route.live:
            shards = []
        elif shards_of is not None:
            shards = shards_of(ranks[0])
        else:
            shards = receiver_shards(route, arrived, ranks[0], pack)
        by_rank[ranks[0]] = shards
        for r in ranks[1:]:  # replicated heads: local copies, one batched call per replica device
            by_rank[r] = jax.device_put(shards, [SingleDeviceSharding(devices[r])] * len(shards))
    out, live = [], {i: j for j, i in enumerate(route.live)}
    for i, (dtype, shape) in enumerate(route.layers):
        j = live.get(i)
        if j is None:
            out.append(jax.device_put(jnp.zeros(shape, dtype), sharding))
            continue
        out.append(
            jax.make_array_from_single_device_arrays(shape, sharding, [by_rank[r][j] for r in range(len(devices))])
        )
    return out
