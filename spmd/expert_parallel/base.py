"""The all-to-all manager interface for expert parallelism, and what its methods exchange.

Per device (inside ``shard_map``), an EP rank holds its own tokens ``x: T[tokens, hidden]`` and
their routing, ``topk_ids: int[tokens, k]`` (global expert ids) and ``topk_weights:
float[tokens, k]``. The ``num_experts`` experts are split evenly over the "ep" axis: rank ``r``
owns experts ``[r * E_local, (r + 1) * E_local)``.

``dispatch`` moves every (token, choice) slot to the rank owning its expert and returns
:class:`ExpertTokens` (the tokens each local expert must process) and a routing state (a
pytree: nothing is hidden in the manager). The experts run and give back their outputs as
:class:`ExpertTokens` in the same layout, then ``combine`` brings them back and sums each
token's top-k outputs with its weights.

Both directions are templates: the base class does what every manager shares, a subclass
supplies one step.

* ``dispatch`` = check the routing; under sequence parallelism all-gather the tokens over "tp";
  then the manager's ``_dispatch``.
* ``combine`` = the manager's ``_combine`` (this rank's tokens, partial sums over "tp"); then
  finish the "tp" sum (all-reduce, or reduce-scatter under sequence parallelism).
* the seed's ``scatter`` = check the buckets; under sequence parallelism all-gather them over
  "tp"; then the manager's ``_scatter_buckets``. Its ``combine`` = ``_combine_buckets``, then
  under sequence parallelism keep this TP rank's slice of the capacity axis.

Expert matrices may be sharded over "tp" (column-parallel up/gate, row-parallel down), so
expert outputs are partial sums over "tp". With ``is_sequence_parallel=True`` tokens arrive
sharded over "tp" as well, ``dispatch`` all-gathers them, and ``combine`` hands each TP rank
its own tokens back with a reduce-scatter.

Ids outside ``[0, num_experts)`` cannot be checked inside ``jit``: such slots are dropped (they
contribute nothing) and counted in ``RoutingState.num_dropped``. Concrete (non-traced) ids are
checked and raise ``ValueError``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spmd import collectives
from spmd.axes import EP, TP
from spmd.expert_parallel.fp8 import check_use_fp8, pack_fp8_rows, unpack_fp8_rows

__all__ = ["All2AllManagerBase", "ExpertInputs", "ExpertTokens", "RoutingState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertTokens:
    """Tokens laid out per local expert: what ``dispatch`` hands the experts, and what they hand ``combine``.

    Two layouts:

    * padded (``group_sizes is None``): ``tokens: T[E_local, capacity, hidden]``, rows beyond
      what an expert received are zeros;
    * ragged: ``tokens: T[rows, hidden]`` grouped by local expert, ``group_sizes: int32[E_local]``
      rows each (trailing rows past ``sum(group_sizes)`` are padding), as ``lax.ragged_dot`` takes.
    """

    tokens: jax.Array
    group_sizes: jax.Array | None = None

    @property
    def is_ragged(self) -> bool:
        return self.group_sizes is not None

    def with_tokens(self, tokens: jax.Array) -> ExpertTokens:
        """The same layout holding other rows (the experts' outputs)."""
        return ExpertTokens(tokens=tokens, group_sizes=self.group_sizes)


ExpertInputs = ExpertTokens  # the earlier name, kept importable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingState:
    """What ``combine`` needs to undo ``dispatch``: a pytree. Each manager has its own subclass.

    Attributes:
      topk_weights: ``f32[tokens, k]``, zero for dropped slots.
      num_dropped: ``int32[]``: slots of this rank's tokens that reached no expert (over
        capacity, or an id outside ``[0, num_experts)``).
      is_sequence_parallel: static; whether ``dispatch`` all-gathered tokens over "tp".
    """

    topk_weights: jax.Array
    num_dropped: jax.Array
    is_sequence_parallel: bool = dataclasses.field(default=False, metadata={"static": True})


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_capacity(op: str, expert_capacity: Any) -> None:
    if isinstance(expert_capacity, bool) or not isinstance(expert_capacity, (int, np.integer)) or expert_capacity < 1:
        raise ValueError(f"{op}: expected a positive int expert_capacity, got {expert_capacity!r}.")


class All2AllManagerBase(abc.ABC):
    """Routes MoE tokens to the experts on the "ep" axis and back.

    Args:
      num_experts: experts in the layer, all EP ranks together; divisible by the EP size.
      ep_axis: the mesh axis experts are sharded over.
      tp_axis: the mesh axis each expert's matrices are sharded over (``None``: not sharded).
      use_fp8: ``dispatch`` sends the tokens as float8 e4m3 with a float32 scale per token
        (:mod:`spmd.expert_parallel.fp8`); the experts get them dequantized; ``combine`` is unchanged.

    Raises:
      ValueError: ``num_experts`` is not a positive int, ``use_fp8`` not a bool.
    """

    name: ClassVar[str] = "base"
    state_type: ClassVar[type[RoutingState]] = RoutingState
    packs_fp8_itself: ClassVar[bool] = False  # True: the manager's own rows carry fp8 (no generic packing)

    def __init__(self, num_experts: int, *, ep_axis: str = EP, tp_axis: str | None = TP, use_fp8: bool = False):
        if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
            raise ValueError(f"{type(self).__name__}: expected a positive int num_experts, got {num_experts!r}.")
        self.num_experts = int(num_experts)
        self.ep_axis = ep_axis
        self.tp_axis = tp_axis
        self.use_fp8 = check_use_fp8(type(self).__name__, use_fp8)

    # Sizes (traced context) ----------------------------------------------------------------------
    def ep_size(self) -> int:
        return collectives.axis_size(self.ep_axis, op=f"{type(self).__name__}.dispatch")

    def local_experts(self) -> int:
        """Experts per EP rank.

        Raises:
          ValueError: ``num_experts`` is not divisible by the EP size.
        """
        ep = self.ep_size()
        if self.num_experts % ep:
            raise ValueError(
                f"{type(self).__name__}: num_experts={self.num_experts} is not divisible by the EP size {ep} "
                f"(axis {self.ep_axis!r}); choose an expert count that is a multiple of {ep}."
            )
        return self.num_experts // ep

    def tp_size(self) -> int:
        """Devices along ``tp_axis`` (1 when there is none or it is not bound here)."""
        if self.tp_axis is None or not collectives.axis_is_bound(self.tp_axis):
            return 1
        return collectives.axis_size(self.tp_axis)

    # vLLM's interface: templates ---------------------------------------------------------------------
    def dispatch(
        self,
        hidden_states: jax.Array,
        topk_weights: jax.Array,
        topk_ids: jax.Array,
        *,
        is_sequence_parallel: bool = False,
    ) -> tuple[ExpertTokens, RoutingState]:
        """Route ``hidden_states: T[tokens, hidden]`` to the ranks owning their top-k experts.

        Args:
          hidden_states: this rank's tokens (this TP rank's share under sequence parallelism).
          topk_weights: ``float[tokens, k]``.
          topk_ids: ``int[tokens, k]``, global expert ids.
          is_sequence_parallel: tokens are sharded over "tp" too; they are all-gathered first.

        Returns:
          ``(expert_tokens, routing_state)``: the local experts' tokens and what ``combine`` needs.

        Raises:
          ValueError, TypeError: routing of the wrong shape or dtype, top-k above the expert
            count, concrete ids out of range, experts not divisible by the EP size; with ``use_fp8``,
            hidden states that are not floating point.
        """
        self._check_routing(hidden_states, topk_weights, topk_ids)
        dtype, packed = hidden_states.dtype, self.use_fp8 and not self.packs_fp8_itself
        if packed:  # quantize before the first exchange; the scale rides in each row
            hidden_states = pack_fp8_rows(hidden_states)
        if is_sequence_parallel:
            hidden_states, topk_weights, topk_ids = self._gather_sequence(hidden_states, topk_weights, topk_ids)
        expert_tokens, state = self._dispatch(hidden_states, topk_weights, topk_ids)
        if packed:  # dequantize after the last one, before the experts
            expert_tokens = expert_tokens.with_tokens(unpack_fp8_rows(expert_tokens.tokens, dtype))
        return expert_tokens, dataclasses.replace(state, is_sequence_parallel=is_sequence_parallel)

    def combine(self, hidden_states: Any, routing_state: Any = None, is_sequence_parallel: bool = False) -> Any:
        """Bring expert outputs back.

        Two forms:

        * ``combine(expert_outputs, routing_state)`` (vLLM's): ``expert_outputs`` an
          :class:`ExpertTokens` in the layout ``dispatch`` gave; returns ``T[tokens, hidden]``,
          each token's top-k outputs summed with its weights, TP partial sums finished.
        * ``combine(hidden_states, is_sequence_parallel=False)`` (the seed's): the inverse of
          :meth:`scatter`, ``T[E_local, ep * capacity', hidden] -> T[num_experts, capacity, hidden]``.

        Raises:
          TypeError: ``routing_state`` is neither this manager's routing state nor a bool.
        """
        if isinstance(routing_state, RoutingState):
            if not isinstance(routing_state, self.state_type):
                raise TypeError(
                    f"{type(self).__name__}.combine: expected a {self.state_type.__name__} from this manager's "
                    f"dispatch, got {type(routing_state).__name__}."
                )
            y = self._combine(hidden_states, routing_state)
            y = self._finish_tp(y, routing_state.is_sequence_parallel)
            return y.astype(hidden_states.tokens.dtype)
        if isinstance(routing_state, bool):  # the seed's positional form: combine(h, True)
            is_sequence_parallel = routing_state
        elif routing_state is not None:
            raise TypeError(
                f"{type(self).__name__}.combine: expected a {self.state_type.__name__} from dispatch (or nothing), "
                f"got {type(routing_state).__name__}."
            )
        out = self._combine_buckets(hidden_states)
        if is_sequence_parallel:
            out = self._slice_sequence(out)
        return out

    # The seed's interface: template ------------------------------------------------------------------
    def scatter(self, input_: jax.Array, expert_capacity: int, is_sequence_parallel: bool = False) -> jax.Array:
        """Send bucketed tokens to their experts.

        Args:
          input_: ``T[num_experts, expert_capacity, hidden]``: this rank's tokens, bucketed per
            global expert and padded to the capacity.
          expert_capacity: the bucket size.
          is_sequence_parallel: the buckets hold this TP rank's share of the tokens only;
            they are all-gathered over "tp" (concatenated along the capacity axis) first.

        Returns:
          ``T[E_local, ep * capacity', hidden]``: for each local expert, what every EP rank sent
          it, source-rank-major (``capacity' = tp * capacity`` under sequence parallelism).

        Raises:
          ValueError: ``expert_capacity`` is not a positive int, or ``input_`` is not
            ``[num_experts, expert_capacity, hidden]``.
        """
        op = f"{type(self).__name__}.scatter"
        _check_capacity(op, expert_capacity)
        if input_.ndim != 3 or input_.shape[0] != self.num_experts or input_.shape[1] != expert_capacity:
            raise ValueError(
                f"{op}: expected input_ of shape [num_experts={self.num_experts}, expert_capacity={expert_capacity}, "
                f"hidden], got {tuple(input_.shape)}."
            )
        if is_sequence_parallel and self.tp_size() > 1:
            input_ = collectives.all_gather(input_, self.tp_axis, axis=1)
        return self._scatter_buckets(input_)

    # What a manager supplies -------------------------------------------------------------------------
    @abc.abstractmethod
    def _dispatch(
        self, hidden_states: jax.Array, topk_weights: jax.Array, topk_ids: jax.Array
    ) -> tuple[ExpertTokens, RoutingState]:
        """Checked (and sequence-gathered) routing -> the local experts' tokens and this manager's state."""

    @abc.abstractmethod
    def _combine(self, expert_outputs: ExpertTokens, state: RoutingState) -> jax.Array:
        """Expert outputs -> ``f32[tokens, hidden]`` for this rank's tokens, still partial over "tp"."""

    @abc.abstractmethod
    def _scatter_buckets(self, buckets: jax.Array) -> jax.Array:
        """``T[E, C, H] -> T[E_local, ep * C, H]``: the communication step of the seed's ``scatter``."""

    @abc.abstractmethod
    def _combine_buckets(self, hidden_states: jax.Array) -> jax.Array:
        """``T[E_local, ep * C, H] -> T[E, C, H]``: the inverse of :meth:`_scatter_buckets`."""

    # Shared steps ------------------------------------------------------------------------------------
    def _check_routing(self, hidden_states, topk_weights, topk_ids) -> None:
        op = f"{type(self).__name__}.dispatch"
        if hidden_states.ndim != 2:
            raise ValueError(
                f"{op}: expected hidden_states of shape [tokens, hidden], got {tuple(hidden_states.shape)}."
            )
        t = hidden_states.shape[0]
        if topk_ids.ndim != 2 or topk_ids.shape[0] != t:
            raise ValueError(f"{op}: expected topk_ids of shape [{t}, k], got {tuple(topk_ids.shape)}.")
        if tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(
                f"{op}: topk_weights has shape {tuple(topk_weights.shape)} but topk_ids has "
                f"{tuple(topk_ids.shape)}; they must match."
            )
        if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
            raise TypeError(f"{op}: expected integer topk_ids, got {topk_ids.dtype}.")
        if not jnp.issubdtype(topk_weights.dtype, jnp.floating):
            raise TypeError(f"{op}: expected floating-point topk_weights, got {topk_weights.dtype}.")
        if self.use_fp8 and not jnp.issubdtype(hidden_states.dtype, jnp.floating):
            raise TypeError(
                f"{op}: use_fp8 quantizes floating-point tokens; got hidden_states of {hidden_states.dtype} "
                "(pass float tokens, or build the manager with use_fp8=False)."
            )
        k = topk_ids.shape[1]
        if k > self.num_experts:
            raise ValueError(f"{op}: top-k {k} is larger than the number of experts {self.num_experts}.")
        if _is_concrete(topk_ids):
            ids = np.asarray(topk_ids)
            bad = ids[(ids < 0) | (ids >= self.num_experts)]
            if bad.size:
                raise ValueError(
                    f"{op}: expert ids must be in [0, {self.num_experts}); got {sorted(set(bad.tolist()))[:8]}."
                )
        self.local_experts()  # experts divisible by the EP size

    def _gather_sequence(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """Sequence parallelism: every TP rank's tokens, concatenated in TP-rank order."""
        if self.tp_size() == 1:
            return arrays
        return tuple(collectives.all_gather(a, self.tp_axis, axis=0) for a in arrays)

    def _slice_sequence(self, buckets: jax.Array) -> jax.Array:
        """Sequence parallelism, the seed's form: this TP rank's slice of the capacity axis of ``T[E, tp*C, H]``."""
        tp = self.tp_size()
        if tp == 1:
            return buckets
        c = buckets.shape[1] // tp
        return lax.dynamic_slice_in_dim(buckets, collectives.axis_index(self.tp_axis) * c, c, axis=1)

    def _finish_tp(self, y: jax.Array, is_sequence_parallel: bool) -> jax.Array:
        """Expert outputs are partial sums over "tp": all-reduce, or reduce-scatter under SP."""
        if self.tp_size() == 1:
            return y
        if is_sequence_parallel:
            return collectives.reduce_scatter(y, self.tp_axis, axis=0)
        return collectives.all_reduce(y, self.tp_axis)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_experts={self.num_experts}, ep_axis={self.ep_axis!r}, tp_axis={self.tp_axis!r}"
            + (", use_fp8=True)" if self.use_fp8 else ")")
        )


def slot_arrays(topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int):
    """Flatten routing to slots: ``(ids int32[T*k], weights f32[T*k], token int32[T*k], valid bool[T*k])``."""
    t, k = topk_ids.shape
    ids = topk_ids.reshape(-1).astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_experts)
    weights = jnp.where(valid, topk_weights.reshape(-1).astype(jnp.float32), 0.0)
    token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    return ids, weights, token, valid


def weighted_sum(slot_outputs: jax.Array, weights: jax.Array) -> jax.Array:
    """``y[t] = sum_j weights[t, j] * slot_outputs[t * k + j]`` in float32: ``f32[T, hidden]``."""
    t, k = weights.shape
    y = slot_outputs.astype(jnp.float32).reshape(t, k, -1) * weights.reshape(t, k, 1).astype(jnp.float32)
    return y.sum(1)
