"""Three all-to-all managers: naive, capacity all-to-all, and ragged (dropless).

========  ==========================================  ===============  ==========================
manager   wire                                         drops tokens     expert-input layout
========  ==========================================  ===============  ==========================
naive     all-gather tokens over "ep"; reduce-scatter  never            padded, every token
          the weighted outputs back                                     to every local expert
capacity  one all_to_all each way of fixed buckets     over capacity    padded ``[E_local, ep*C]``
          ``[E, C, hidden]``                           (counted)
ragged    ``lax.ragged_all_to_all`` of exactly the     never            ragged, grouped by expert
          routed rows (GPU); the same exchange as a                     (``lax.ragged_dot``)
          padded all_to_all where XLA lacks it (CPU)
========  ==========================================  ===============  ==========================
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from spmd import collectives
from spmd.axes import EP, TP
from spmd.expert_parallel.base import (
    All2AllManagerBase,
    ExpertInputs,
    RoutingState,
    slot_arrays,
    weighted_sum,
)

__all__ = ["CapacityAll2AllManager", "NaiveAll2AllManager", "RaggedAll2AllManager", "ragged_all_to_all_dense"]


def _to_local_experts(buckets: jax.Array, ep: int, e_local: int) -> jax.Array:
    """``[ep(src), E_local, C, H] -> [E_local, ep * C, H]``."""
    c, h = buckets.shape[-2:]
    return buckets.transpose(1, 0, 2, 3).reshape(e_local, ep * c, h)


def _from_local_experts(x: jax.Array, ep: int) -> jax.Array:
    """``[E_local, ep * C, H] -> [ep(src), E_local, C, H]``."""
    e_local, rows, h = x.shape
    return x.reshape(e_local, ep, rows // ep, h).transpose(1, 0, 2, 3)


class _BucketMixin:
    """The seed's ``scatter`` / bucket ``combine`` over all_to_all (capacity and ragged managers)."""

    def scatter(self, input_, expert_capacity, is_sequence_parallel=False):
        self._check_buckets(input_, expert_capacity)
        if is_sequence_parallel:
            (input_,) = self._gather_capacity(input_)
        ep, e_local = self.ep_size(), self.local_experts()
        h = input_.shape[-1]
        sent = input_.reshape(ep, e_local, input_.shape[1], h)
        received = collectives.all_to_all(sent, self.ep_axis, split_axis=0, concat_axis=0)
        return _to_local_experts(received, ep, e_local)

    def _combine_buckets(self, hidden_states, is_sequence_parallel):
        ep = self.ep_size()
        back = collectives.all_to_all(_from_local_experts(hidden_states, ep), self.ep_axis, split_axis=0, concat_axis=0)
        out = back.reshape(self.num_experts, back.shape[2], back.shape[3])
        if is_sequence_parallel and self._tp_size() > 1:
            tp = self._tp_size()
            rank = collectives.axis_index(self.tp_axis)
            c = out.shape[1] // tp
            out = lax.dynamic_slice_in_dim(out, rank * c, c, axis=1)
        return out

    def _check_buckets(self, input_, expert_capacity):
        op = f"{type(self).__name__}.scatter"
        if input_.ndim != 3 or input_.shape[0] != self.num_experts or input_.shape[1] != expert_capacity:
            raise ValueError(
                f"{op}: expected input_ of shape [num_experts={self.num_experts}, expert_capacity={expert_capacity}, "
                f"hidden], got {tuple(input_.shape)}."
            )

    def _gather_capacity(self, input_):
        if self._tp_size() == 1:
            return (input_,)
        return (collectives.all_gather(input_, self.tp_axis, axis=1),)


class NaiveAll2AllManager(All2AllManagerBase):
    """All-gather every token over "ep"; each rank runs its local experts on all of them.

    Dropless and simple; moves ``ep`` times the tokens and computes every token on every local
    expert (weights of unrouted pairs are zero). The reference the other managers are checked against.
    """

    name = "naive"

    def scatter(self, input_, expert_capacity, is_sequence_parallel=False):
        _BucketMixin._check_buckets(self, input_, expert_capacity)
        if is_sequence_parallel:
            (input_,) = _BucketMixin._gather_capacity(self, input_)
        ep, e_local = self.ep_size(), self.local_experts()
        gathered = collectives.all_gather(input_[None], self.ep_axis, axis=0)  # [ep, E, C, H]
        rank = collectives.axis_index(self.ep_axis)
        mine = lax.dynamic_slice_in_dim(gathered, rank * e_local, e_local, axis=1)  # [ep, E_local, C, H]
        return _to_local_experts(mine, ep, e_local)

    def _combine_buckets(self, hidden_states, is_sequence_parallel):
        ep = self.ep_size()
        per_src = _from_local_experts(hidden_states, ep)  # [ep(src), E_local, C, H]
        gathered = collectives.all_gather(per_src[None], self.ep_axis, axis=0)  # [owner, src, E_local, C, H]
        rank = collectives.axis_index(self.ep_axis)
        mine = lax.dynamic_index_in_dim(gathered, rank, axis=1, keepdims=False)  # [owner, E_local, C, H]
        out = mine.reshape(self.num_experts, mine.shape[2], mine.shape[3])
        if is_sequence_parallel and self._tp_size() > 1:
            tp = self._tp_size()
            c = out.shape[1] // tp
            out = lax.dynamic_slice_in_dim(out, collectives.axis_index(self.tp_axis) * c, c, axis=1)
        return out

    def dispatch(self, hidden_states, topk_weights, topk_ids, *, is_sequence_parallel=False):
        self._check_routing(hidden_states, topk_weights, topk_ids)
        if is_sequence_parallel:
            hidden_states, topk_weights, topk_ids = self._gather_sequence(hidden_states, topk_weights, topk_ids)
        e_local = self.local_experts()
        t, k = topk_ids.shape
        ids, weights, _, valid = slot_arrays(topk_ids, topk_weights, self.num_experts)
        x_all = collectives.all_gather(hidden_states, self.ep_axis, axis=0)  # [ep*T, H]
        ids_all = collectives.all_gather(ids.reshape(t, k), self.ep_axis, axis=0)
        w_all = collectives.all_gather(weights.reshape(t, k), self.ep_axis, axis=0)
        first = collectives.axis_index(self.ep_axis) * e_local
        local = first + jnp.arange(e_local, dtype=jnp.int32)
        # combine weight of (local expert e, token t): sum_k w[t, k] * [ids[t, k] == e]
        gate = jnp.einsum("tk,tke->et", w_all, (ids_all[:, :, None] == local[None, None, :]).astype(jnp.float32))
        tokens = jnp.broadcast_to(x_all[None], (e_local, *x_all.shape))
        dropped = jnp.sum(~valid).astype(jnp.int32)
        state = RoutingState(
            topk_weights=weights.reshape(t, k),
            num_dropped=dropped,
            arrays={"gate": gate},
            is_sequence_parallel=is_sequence_parallel,
        )
        return ExpertInputs(tokens=tokens), state

    def _combine_routed(self, expert_outputs, state):
        gate = state.arrays["gate"]  # [E_local, ep*T]
        out = expert_outputs.tokens
        y = jnp.einsum("et,eth->th", gate, out.astype(jnp.float32))  # [ep*T, H], this rank's experts only
        y = collectives.reduce_scatter(y, self.ep_axis, axis=0)  # sum over owners, keep my tokens
        y = self._finish_tp(y, state.is_sequence_parallel)
        return y.astype(out.dtype)


class CapacityAll2AllManager(_BucketMixin, All2AllManagerBase):
    """Fixed per-expert buckets of ``expert_capacity`` tokens, one all_to_all each way.

    Args:
      expert_capacity: slots per expert per source rank; default
        ``ceil(capacity_factor * tokens * k / num_experts)``.
      capacity_factor: used when ``expert_capacity`` is ``None`` (default 1.25).

    Slots past an expert's capacity are dropped, first come first served in token order, and
    counted in ``RoutingState.num_dropped``.
    """

    name = "capacity"

    def __init__(
        self,
        num_experts: int,
        *,
        expert_capacity: int | None = None,
        capacity_factor: float = 1.25,
        ep_axis: str = EP,
        tp_axis: str | None = TP,
    ):
        super().__init__(num_experts, ep_axis=ep_axis, tp_axis=tp_axis)
        if expert_capacity is not None and (not isinstance(expert_capacity, int) or expert_capacity < 1):
            raise ValueError(
                f"CapacityAll2AllManager: expected a positive int expert_capacity, got {expert_capacity!r}."
            )
        if not capacity_factor > 0:
            raise ValueError(f"CapacityAll2AllManager: expected a positive capacity_factor, got {capacity_factor!r}.")
        self.expert_capacity = expert_capacity
        self.capacity_factor = float(capacity_factor)

    def capacity(self, tokens: int, k: int) -> int:
        if self.expert_capacity is not None:
            return self.expert_capacity
        return max(1, math.ceil(self.capacity_factor * tokens * k / self.num_experts))

    def dispatch(self, hidden_states, topk_weights, topk_ids, *, is_sequence_parallel=False):
        self._check_routing(hidden_states, topk_weights, topk_ids)
        if is_sequence_parallel:
            hidden_states, topk_weights, topk_ids = self._gather_sequence(hidden_states, topk_weights, topk_ids)
        t, k = topk_ids.shape
        c = self.capacity(t, k)
        ids, weights, token, valid = slot_arrays(topk_ids, topk_weights, self.num_experts)
        onehot = (ids[:, None] == jnp.arange(self.num_experts, dtype=jnp.int32)[None, :]) & valid[:, None]
        position = (
            jnp.cumsum(onehot, axis=0, dtype=jnp.int32)[jnp.arange(ids.size), jnp.clip(ids, 0, self.num_experts - 1)]
            - 1
        )
        kept = valid & (position < c)
        pos = jnp.where(kept, position, c)  # out of bounds: dropped by the scatter below
        eid = jnp.where(kept, ids, 0)
        buckets = jnp.zeros((self.num_experts, c, hidden_states.shape[1]), hidden_states.dtype)
        buckets = buckets.at[eid, pos].set(hidden_states[token], mode="drop")
        tokens = self.scatter(buckets, c)
        state = RoutingState(
            topk_weights=jnp.where(kept, weights, 0.0).reshape(t, k),
            num_dropped=jnp.sum(~kept).astype(jnp.int32),
            arrays={"expert": eid, "position": pos, "kept": kept},
            is_sequence_parallel=is_sequence_parallel,
        )
        return ExpertInputs(tokens=tokens), state

    def _combine_routed(self, expert_outputs, state):
        out = expert_outputs.tokens
        back = self._combine_buckets(out, False)  # [E, C, H] on the source rank
        c = back.shape[1]
        eid, pos, kept = state.arrays["expert"], state.arrays["position"], state.arrays["kept"]
        slot_out = back[eid, jnp.minimum(pos, c - 1)] * kept[:, None].astype(back.dtype)
        t, k = state.topk_weights.shape
        y = weighted_sum(slot_out, state.topk_weights, t, k, jnp.float32)
        return self._finish_tp(y, state.is_sequence_parallel).astype(out.dtype)


def ragged_all_to_all_dense(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``lax.ragged_all_to_all`` computed with a padded ``all_to_all`` (same result, padded wire).

    For platforms whose XLA lacks ragged all-to-all (CPU). Rank ``r`` sends rows
    ``[input_offsets[d], +send_sizes[d])`` of ``operand`` to rank ``d``, which writes them at
    ``output_offsets[d]`` (an offset in ``d``'s ``output``, given by the sender) onwards.
    """
    n = collectives.axis_size(axis_name, op="ragged_all_to_all")
    rows = operand.shape[0]
    j = jnp.arange(rows, dtype=jnp.int32)
    src_idx = jnp.clip(input_offsets[:, None] + j[None, :], 0, rows - 1)  # [n, rows]
    blocks = operand[src_idx] * (j[None, :] < send_sizes[:, None])[..., None].astype(operand.dtype)
    got = collectives.all_to_all(blocks, axis_name, split_axis=0, concat_axis=0)  # [n(src), rows, H]
    where = collectives.all_to_all(output_offsets.reshape(n, 1), axis_name, split_axis=0, concat_axis=0)[:, 0]
    sizes = recv_sizes
    dest = jnp.where(j[None, :] < sizes[:, None], where[:, None] + j[None, :], output.shape[0])  # OOB -> dropped
    return output.at[dest.reshape(-1)].set(got.reshape(n * rows, -1), mode="drop")


class RaggedAll2AllManager(_BucketMixin, All2AllManagerBase):
    """Dropless: exactly the routed rows cross the wire (``lax.ragged_all_to_all``).

    Args:
      use_ragged_collective: ``True`` uses ``lax.ragged_all_to_all``; ``False`` the padded
        all_to_all emulation; ``None`` (default) picks by platform (XLA:CPU has no ragged
        all-to-all). Results are the same.
    """

    name = "ragged"

    def __init__(
        self,
        num_experts: int,
        *,
        use_ragged_collective: bool | None = None,
        ep_axis: str = EP,
        tp_axis: str | None = TP,
    ):
        super().__init__(num_experts, ep_axis=ep_axis, tp_axis=tp_axis)
        self.use_ragged_collective = use_ragged_collective

    def _exchange(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        use = self.use_ragged_collective
        if use is None:
            use = jax.default_backend() not in ("cpu",)
        fn = lax.ragged_all_to_all if use else ragged_all_to_all_dense
        return fn(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=self.ep_axis)

    def dispatch(self, hidden_states, topk_weights, topk_ids, *, is_sequence_parallel=False):
        self._check_routing(hidden_states, topk_weights, topk_ids)
        if is_sequence_parallel:
            hidden_states, topk_weights, topk_ids = self._gather_sequence(hidden_states, topk_weights, topk_ids)
        ep, e_local = self.ep_size(), self.local_experts()
        e = self.num_experts
        t, k = topk_ids.shape
        s = t * k
        ids, weights, token, valid = slot_arrays(topk_ids, topk_weights, e)
        key = jnp.where(valid, ids, e)
        order = jnp.argsort(key, stable=True).astype(jnp.int32)  # slots sorted by expert; invalid last
        counts = jnp.zeros((e,), jnp.int32).at[jnp.where(valid, ids, e)].add(1, mode="drop")  # [E]
        send_sizes = counts.reshape(ep, e_local).sum(1)  # rows to each rank
        input_offsets = jnp.cumsum(send_sizes) - send_sizes
        all_counts = collectives.all_gather(counts[None], self.ep_axis, axis=0)  # [ep(src), E]
        me = collectives.axis_index(self.ep_axis)
        per_dst = all_counts.reshape(ep, ep, e_local).sum(2)  # [src, dst]
        recv_sizes = lax.dynamic_index_in_dim(per_dst, me, axis=1, keepdims=False)  # from each src
        before_me = (jnp.arange(ep) < me).astype(jnp.int32)
        output_offsets = (before_me[:, None] * per_dst).sum(0)  # my block's offset at each dst
        rows = ep * s  # worst case: every rank sends me every slot
        sorted_x = hidden_states[token[order]]
        received = self._exchange(
            sorted_x,
            jnp.zeros((rows, hidden_states.shape[1]), hidden_states.dtype),
            input_offsets,
            send_sizes,
            output_offsets,
            recv_sizes,
        )
        # Received rows are [src 0: my experts in order][src 1: ...]; regroup expert-major.
        mine = lax.dynamic_slice_in_dim(all_counts, me * e_local, e_local, axis=1)  # [src, E_local]
        src_start = jnp.cumsum(recv_sizes) - recv_sizes  # [src]
        within = jnp.cumsum(mine, axis=1) - mine  # offset of expert block inside a src block
        r = jnp.arange(rows, dtype=jnp.int32)
        total = recv_sizes.sum()
        src_of = jnp.clip(jnp.searchsorted(src_start + recv_sizes, r, side="right"), 0, ep - 1).astype(jnp.int32)
        off_in_src = r - src_start[src_of]
        bounds = within[src_of] + mine[src_of]  # [rows, E_local] exclusive ends
        exp_of = jnp.sum(off_in_src[:, None] >= bounds, axis=1).astype(jnp.int32)
        sort_key = jnp.where(r < total, exp_of * ep + src_of, e_local * ep)
        perm = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
        grouped = received[perm]
        group_sizes = mine.sum(0).astype(jnp.int32)
        state = RoutingState(
            topk_weights=weights.reshape(t, k),
            num_dropped=jnp.sum(~valid).astype(jnp.int32),
            arrays={
                "order": order,
                "perm": perm,
                "send_sizes": send_sizes,
                "input_offsets": input_offsets,
                "recv_sizes": recv_sizes,
                "src_start": src_start,
                "return_offsets": lax.dynamic_slice_in_dim(
                    jnp.cumsum(all_counts, axis=1) - all_counts, me * e_local, 1, axis=1
                )[:, 0],
            },
            is_sequence_parallel=is_sequence_parallel,
        )
        return ExpertInputs(tokens=grouped, group_sizes=group_sizes), state

    def _combine_routed(self, expert_outputs, state):
        a = state.arrays
        out = expert_outputs.tokens
        unperm = jnp.zeros_like(out).at[a["perm"]].set(out)  # back to [src 0 block][src 1 block]...
        s = a["order"].shape[0]
        back = self._exchange(
            unperm,
            jnp.zeros((s, out.shape[1]), out.dtype),
            a["src_start"],
            a["recv_sizes"],
            a["return_offsets"],
            a["send_sizes"],
        )
        slot_out = jnp.zeros_like(back).at[a["order"]].set(back)  # unsort: slot order
        t, k = state.topk_weights.shape
        y = weighted_sum(slot_out, state.topk_weights, t, k, jnp.float32)
        return self._finish_tp(y, state.is_sequence_parallel).astype(out.dtype)


MANAGERS = {"naive": NaiveAll2AllManager, "capacity": CapacityAll2AllManager, "ragged": RaggedAll2AllManager}
