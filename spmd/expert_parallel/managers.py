"""Three all-to-all managers: naive, capacity all-to-all, and ragged (dropless).

========  ==========================================  ===============  ==========================
manager   wire                                         drops tokens     expert-token layout
========  ==========================================  ===============  ==========================
naive     all-gather tokens over "ep"; reduce-scatter  never            padded, every token
          the weighted outputs back                                     to every local expert
capacity  one all_to_all each way of fixed buckets     over capacity    padded ``[E_local, ep*C]``
          ``[E, C, hidden]``                           (counted)
ragged    ``lax.ragged_all_to_all`` of exactly the     never            ragged, grouped by expert
          routed rows (GPU); the same exchange as a                     (``lax.ragged_dot``)
          padded all_to_all where XLA lacks it (CPU)
========  ==========================================  ===============  ==========================

Each manager supplies the steps :class:`~spmd.expert_parallel.base.All2AllManagerBase` leaves
open (``_dispatch``, ``_combine``, the bucket wire) and its own routing state, a frozen pytree
that names every array ``combine`` needs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spmd import collectives
from spmd.axes import EP, TP
from spmd.expert_parallel.base import (
    All2AllManagerBase,
    ExpertTokens,
    RoutingState,
    _check_capacity,
    slot_arrays,
    weighted_sum,
)
from spmd.expert_parallel.buckets import (
    combine_by_all_gather,
    combine_by_all_to_all,
    scatter_by_all_gather,
    scatter_by_all_to_all,
)

__all__ = [
    "CapacityAll2AllManager",
    "CapacityRoutingState",
    "NaiveAll2AllManager",
    "NaiveRoutingState",
    "RaggedAll2AllManager",
    "RaggedRoutingState",
    "ragged_all_to_all_dense",
]


def _pytree_state(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True, kw_only=True)(cls))


# Naive ---------------------------------------------------------------------------------------------


@_pytree_state
class NaiveRoutingState(RoutingState):
    """The naive manager's routing state.

    Attributes:
      gate: ``f32[E_local, ep * tokens]``: the weight of (local expert, gathered token), zero
        where the token did not pick the expert.
    """

    gate: jax.Array


class NaiveAll2AllManager(All2AllManagerBase):
    """All-gather every token over "ep"; each rank runs its local experts on all of them.

    Dropless and simple; moves ``ep`` times the tokens and computes every token on every local
    expert (weights of unrouted pairs are zero). The reference the other managers are checked against.
    """

    name = "naive"
    state_type = NaiveRoutingState

    def _scatter_buckets(self, buckets):
        return scatter_by_all_gather(buckets, axis_name=self.ep_axis)

    def _combine_buckets(self, hidden_states):
        return combine_by_all_gather(hidden_states, axis_name=self.ep_axis)

    def _dispatch(self, hidden_states, topk_weights, topk_ids):
        e_local = self.local_experts()
        t, k = topk_ids.shape
        ids, weights, _, valid = slot_arrays(topk_ids, topk_weights, self.num_experts)
        x_all = collectives.all_gather(hidden_states, self.ep_axis, axis=0)  # [ep*T, H]
        ids_all = collectives.all_gather(ids.reshape(t, k), self.ep_axis, axis=0)
        w_all = collectives.all_gather(weights.reshape(t, k), self.ep_axis, axis=0)
        local = collectives.axis_index(self.ep_axis) * e_local + jnp.arange(e_local, dtype=jnp.int32)
        # gate[e, t] = sum_j w[t, j] * [ids[t, j] == e]
        gate = jnp.einsum("tk,tke->et", w_all, (ids_all[:, :, None] == local[None, None, :]).astype(jnp.float32))
        tokens = jnp.broadcast_to(x_all[None], (e_local, *x_all.shape))
        state = NaiveRoutingState(
            topk_weights=weights.reshape(t, k), num_dropped=jnp.sum(~valid).astype(jnp.int32), gate=gate
        )
        return ExpertTokens(tokens=tokens), state

    def _combine(self, expert_outputs, state):
        y = jnp.einsum("et,eth->th", state.gate, expert_outputs.tokens.astype(jnp.float32))  # my experts only
        return collectives.reduce_scatter(y, self.ep_axis, axis=0)  # sum over owners, keep my tokens


# Capacity ------------------------------------------------------------------------------------------


@_pytree_state
class CapacityRoutingState(RoutingState):
    """The capacity manager's routing state, one entry per (token, choice) slot.

    Attributes:
      expert: ``int32[tokens * k]``: the slot's global expert (0 for a dropped slot).
      position: ``int32[tokens * k]``: the slot's row in its expert's bucket (the capacity for a
        dropped slot).
      kept: ``bool[tokens * k]``: the slot reached its expert.
    """

    expert: jax.Array
    position: jax.Array
    kept: jax.Array


class CapacityAll2AllManager(All2AllManagerBase):
    """Fixed per-expert buckets of ``expert_capacity`` tokens, one all_to_all each way.

    Args:
      num_experts, ep_axis, tp_axis: as for :class:`All2AllManagerBase`.
      expert_capacity: slots per expert per source rank; default
        ``ceil(capacity_factor * tokens * k / num_experts)``.
      capacity_factor: used when ``expert_capacity`` is ``None`` (default 1.25).

    Slots past an expert's capacity are dropped, first come first served in token order, and
    counted in ``RoutingState.num_dropped``.

    Raises:
      ValueError: ``expert_capacity`` is not a positive int (bools included) or ``None``;
        ``capacity_factor`` is not a positive finite number.
    """

    name = "capacity"
    state_type = CapacityRoutingState

    def __init__(
        self,
        num_experts: int,
        *,
        expert_capacity: int | None = None,
        capacity_factor: float = 1.25,
        ep_axis: str = EP,
        tp_axis: str | None = TP,
        use_fp8: bool = False,
    ):
        super().__init__(num_experts, ep_axis=ep_axis, tp_axis=tp_axis, use_fp8=use_fp8)
        if expert_capacity is not None:
            _check_capacity("CapacityAll2AllManager", expert_capacity)
            expert_capacity = int(expert_capacity)
        if (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float, np.integer, np.floating))
            or not (0 < capacity_factor < math.inf)
        ):
            raise ValueError(
                f"CapacityAll2AllManager: expected a positive finite capacity_factor, got {capacity_factor!r}."
            )
        self.expert_capacity = expert_capacity
        self.capacity_factor = float(capacity_factor)

    def capacity(self, tokens: int, k: int) -> int:
        """Bucket rows per expert for ``tokens`` tokens routed to ``k`` experts each."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        return max(1, math.ceil(self.capacity_factor * tokens * k / self.num_experts))

    def _scatter_buckets(self, buckets):
        return scatter_by_all_to_all(buckets, axis_name=self.ep_axis)

    def _combine_buckets(self, hidden_states):
        return combine_by_all_to_all(hidden_states, axis_name=self.ep_axis)

    def _dispatch(self, hidden_states, topk_weights, topk_ids):
        t, k = topk_ids.shape
        c, e = self.capacity(t, k), self.num_experts
        ids, weights, token, valid = slot_arrays(topk_ids, topk_weights, e)
        with jax.named_scope("capacity_dispatch/assign_positions"):
            onehot = (ids[:, None] == jnp.arange(e, dtype=jnp.int32)[None, :]) & valid[:, None]  # [S, E]
            earlier = jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - onehot  # slots before me, per expert
            position = jnp.take_along_axis(earlier, jnp.clip(ids, 0, e - 1)[:, None], axis=1)[:, 0]
            kept = valid & (position < c)
            position = jnp.where(kept, position, c)  # out of bounds: dropped by the scatter below
            expert = jnp.where(kept, ids, 0)
        with jax.named_scope("capacity_dispatch/fill_buckets"):
            buckets = jnp.zeros((e, c, hidden_states.shape[1]), hidden_states.dtype)
            buckets = buckets.at[expert, position].set(hidden_states[token], mode="drop")
        state = CapacityRoutingState(
            topk_weights=jnp.where(kept, weights, 0.0).reshape(t, k),
            num_dropped=jnp.sum(~kept).astype(jnp.int32),
            expert=expert,
            position=position,
            kept=kept,
        )
        return ExpertTokens(tokens=self._scatter_buckets(buckets)), state

    def _combine(self, expert_outputs, state):
        back = self._combine_buckets(expert_outputs.tokens)  # [E, C, H] on the source rank
        c = back.shape[1]
        slot_out = back[state.expert, jnp.minimum(state.position, c - 1)]
        slot_out = slot_out * state.kept[:, None].astype(back.dtype)
        return weighted_sum(slot_out, state.topk_weights)


# Ragged --------------------------------------------------------------------------------------------


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
    dest = jnp.where(j[None, :] < recv_sizes[:, None], where[:, None] + j[None, :], output.shape[0])  # OOB: dropped
    return output.at[dest.reshape(-1)].set(got.reshape(n * rows, -1), mode="drop")


@_pytree_state
class RaggedRoutingState(RoutingState):
    """The ragged manager's routing state.

    Attributes:
      order: ``int32[tokens * k]``: the slots sorted by expert (dropped slots last); sorted row
        ``i`` is slot ``order[i]``.
      destination: ``int32[rows]``: where each received row (source-rank-major) sits in the
        expert-major layout the experts saw (``rows`` for padding).
      send_sizes: ``int32[ep]``: rows this rank sent to each rank.
      recv_sizes: ``int32[ep]``: rows this rank received from each rank.
      recv_offsets: ``int32[ep]``: where each source rank's rows start among the received rows.
      return_offsets: ``int32[ep]``: where this rank's rows start in each source rank's sorted slots.
    """

    order: jax.Array
    destination: jax.Array
    send_sizes: jax.Array
    recv_sizes: jax.Array
    recv_offsets: jax.Array
    return_offsets: jax.Array


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _expert_major_destination(counts_from_src: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Where each received row goes when the received rows are regrouped expert-major.

    Received rows are source-rank-major, ``[src 0: its rows for my experts 0, 1, ...][src 1: ...]``;
    the experts want ``[expert 0: from src 0, src 1, ...][expert 1: ...]``.

    Args:
      counts_from_src: ``int32[ep(src), E_local]``: rows each source sent each local expert.
      rows: the length of the receive buffer.

    Returns:
      ``(destination int32[rows], group_sizes int32[E_local])``; padding rows get ``rows``.
    """
    ep, e_local = counts_from_src.shape
    recv_sizes = counts_from_src.sum(1)  # [src]
    src_start = _exclusive_cumsum(recv_sizes)  # [src]: a source's block among the received rows
    expert_start_in_src = _exclusive_cumsum(counts_from_src, axis=1)  # [src, E_local]
    group_sizes = counts_from_src.sum(0).astype(jnp.int32)  # [E_local]
    group_start = _exclusive_cumsum(group_sizes)  # [E_local]: an expert's group in the output
    src_start_in_group = _exclusive_cumsum(counts_from_src, axis=0)  # [src, E_local]

    r = jnp.arange(rows, dtype=jnp.int32)
    src = jnp.clip(jnp.searchsorted(src_start + recv_sizes, r, side="right"), 0, ep - 1).astype(jnp.int32)
    in_src = r - src_start[src]
    expert_end_in_src = (expert_start_in_src + counts_from_src)[src]  # [rows, E_local]
    expert = jnp.clip(jnp.sum(in_src[:, None] >= expert_end_in_src, axis=1), 0, e_local - 1).astype(jnp.int32)
    in_group = src_start_in_group[src, expert] + in_src - expert_start_in_src[src, expert]
    destination = jnp.where(r < recv_sizes.sum(), group_start[expert] + in_group, rows)
    return destination.astype(jnp.int32), group_sizes


class RaggedAll2AllManager(All2AllManagerBase):
    """Dropless: exactly the routed rows cross the wire (``lax.ragged_all_to_all``).

    Args:
      num_experts, ep_axis, tp_axis: as for :class:`All2AllManagerBase`.
      use_ragged_collective: ``True`` uses ``lax.ragged_all_to_all``; ``False`` the padded
        all_to_all emulation; ``None`` (default) picks by platform (XLA:CPU has no ragged
        all-to-all). Results are the same.

    ``dispatch`` runs in four named phases (``jax.named_scope``, visible in profiles):
    ``sort_by_expert`` (this rank's slots, expert-major), ``plan_exchange`` (sizes and offsets
    for both directions, from every rank's per-expert counts), ``exchange`` (the ragged
    all-to-all) and ``group_by_expert`` (received rows, source-major, regrouped expert-major for
    ``lax.ragged_dot``). ``combine`` undoes them: ``ungroup``, ``exchange_back``, ``unsort``.

    Raises:
      ValueError: ``use_ragged_collective`` is not a bool or ``None``.
    """

    name = "ragged"
    state_type = RaggedRoutingState

    def __init__(
        self,
        num_experts: int,
        *,
        use_ragged_collective: bool | None = None,
        ep_axis: str = EP,
        tp_axis: str | None = TP,
        use_fp8: bool = False,
    ):
        super().__init__(num_experts, ep_axis=ep_axis, tp_axis=tp_axis, use_fp8=use_fp8)
        if use_ragged_collective is not None and not isinstance(use_ragged_collective, bool):
            raise ValueError(
                f"RaggedAll2AllManager: expected use_ragged_collective to be True, False or None, "
                f"got {use_ragged_collective!r}."
            )
        self.use_ragged_collective = use_ragged_collective

    def _scatter_buckets(self, buckets):
        return scatter_by_all_to_all(buckets, axis_name=self.ep_axis)

    def _combine_buckets(self, hidden_states):
        return combine_by_all_to_all(hidden_states, axis_name=self.ep_axis)

    def _exchange(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        use = self.use_ragged_collective
        if use is None:
            use = jax.default_backend() != "cpu"
        fn = lax.ragged_all_to_all if use else ragged_all_to_all_dense
        return fn(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=self.ep_axis)

    def _dispatch(self, hidden_states, topk_weights, topk_ids):
        ep, e_local, e = self.ep_size(), self.local_experts(), self.num_experts
        t, k = topk_ids.shape
        ids, weights, token, valid = slot_arrays(topk_ids, topk_weights, e)

        with jax.named_scope("ragged_dispatch/sort_by_expert"):
            expert_or_e = jnp.where(valid, ids, e)  # dropped slots sort last
            order = jnp.argsort(expert_or_e, stable=True).astype(jnp.int32)
            counts = jnp.zeros((e,), jnp.int32).at[expert_or_e].add(1, mode="drop")  # [E]

        with jax.named_scope("ragged_dispatch/plan_exchange"):
            me = collectives.axis_index(self.ep_axis)
            all_counts = collectives.all_gather(counts[None], self.ep_axis, axis=0)  # [src, E]
            per_pair = all_counts.reshape(ep, ep, e_local).sum(2)  # [src, dst]: rows src sends dst
            send_sizes = counts.reshape(ep, e_local).sum(1)  # [dst]
            input_offsets = _exclusive_cumsum(send_sizes)  # [dst]: my rows for dst in my sorted slots
            recv_sizes = lax.dynamic_index_in_dim(per_pair, me, axis=1, keepdims=False)  # [src]
            before_me = jnp.arange(ep) < me
            output_offsets = jnp.where(before_me[:, None], per_pair, 0).sum(0)  # [dst]: my block at dst
            return_offsets = jnp.where(before_me[None, :], per_pair, 0).sum(1)  # [src]: my rows in src's slots
            counts_from_src = lax.dynamic_slice_in_dim(all_counts, me * e_local, e_local, axis=1)  # [src, E_local]

        with jax.named_scope("ragged_dispatch/exchange"):
            rows = ep * t * k  # worst case: every rank sends me every slot
            received = self._exchange(
                hidden_states[token[order]],
                jnp.zeros((rows, hidden_states.shape[1]), hidden_states.dtype),
                input_offsets,
                send_sizes,
                output_offsets,
                recv_sizes,
            )

        with jax.named_scope("ragged_dispatch/group_by_expert"):
            destination, group_sizes = _expert_major_destination(counts_from_src, rows)
            grouped = jnp.zeros_like(received).at[destination].set(received, mode="drop")

        state = RaggedRoutingState(
            topk_weights=weights.reshape(t, k),
            num_dropped=jnp.sum(~valid).astype(jnp.int32),
            order=order,
            destination=destination,
            send_sizes=send_sizes,
            recv_sizes=recv_sizes,
            recv_offsets=_exclusive_cumsum(recv_sizes),
            return_offsets=return_offsets,
        )
        return ExpertTokens(tokens=grouped, group_sizes=group_sizes), state

    def _combine(self, expert_outputs, state):
        out = expert_outputs.tokens
        with jax.named_scope("ragged_combine/ungroup"):
            per_source = jnp.take(out, state.destination, axis=0, mode="fill", fill_value=0)  # source-major again
        with jax.named_scope("ragged_combine/exchange_back"):
            slots = state.order.shape[0]
            back = self._exchange(
                per_source,
                jnp.zeros((slots, out.shape[1]), out.dtype),
                state.recv_offsets,
                state.recv_sizes,
                state.return_offsets,
                state.send_sizes,
            )
        with jax.named_scope("ragged_combine/unsort"):
            slot_out = jnp.zeros_like(back).at[state.order].set(back)  # slot order again
        return weighted_sum(slot_out, state.topk_weights)


MANAGERS: dict[str, type[All2AllManagerBase]] = {
    "naive": NaiveAll2AllManager,
    "capacity": CapacityAll2AllManager,
    "ragged": RaggedAll2AllManager,
}
