"""The all-to-all manager interface for expert parallelism, and what its methods exchange.

Per device (inside ``shard_map``), an EP rank holds its own tokens ``x: T[tokens, hidden]`` and
their routing, ``topk_ids: int[tokens, k]`` (global expert ids) and ``topk_weights:
float[tokens, k]``. The ``num_experts`` experts are split evenly over the "ep" axis: rank ``r``
owns experts ``[r * E_local, (r + 1) * E_local)``.

``dispatch`` moves every (token, choice) slot to the rank owning its expert and returns
:class:`ExpertInputs` (the tokens each local expert must process) and a routing state (a
pytree: nothing is hidden in the manager). The experts run, then ``combine`` brings their
outputs back and sums each token's top-k outputs with its weights.

Expert matrices may also be sharded over "tp" (column-parallel up/gate, row-parallel down), so
expert outputs are partial sums over "tp": ``combine`` finishes them with an all-reduce over
"tp", or, with ``is_sequence_parallel=True`` (tokens arrived sharded over "tp" as well, and
``dispatch`` all-gathered them), with a reduce-scatter that hands each TP rank its own tokens back.

Ids outside ``[0, num_experts)`` cannot be checked inside ``jit``: such slots are dropped (they
contribute nothing) and counted in ``RoutingState.num_dropped``. Concrete (non-traced) ids are
checked and raise ``ValueError``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spmd import collectives
from spmd.axes import EP, TP

__all__ = ["All2AllManagerBase", "ExpertInputs", "RoutingState"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertInputs:
    """Tokens for this rank's local experts.

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingState:
    """What ``combine`` needs to undo ``dispatch``: a pytree of arrays plus static metadata.

    Attributes:
      topk_weights: ``f32[tokens, k]``, zero for dropped slots.
      num_dropped: ``int32[]``: slots of this rank's tokens that reached no expert (over
        capacity, or an id outside ``[0, num_experts)``).
      arrays: manager-specific index arrays.
      is_sequence_parallel: static; whether ``dispatch`` all-gathered tokens over "tp".
    """

    topk_weights: jax.Array
    num_dropped: jax.Array
    arrays: dict[str, jax.Array]
    is_sequence_parallel: bool = dataclasses.field(default=False, metadata={"static": True})


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


class All2AllManagerBase(abc.ABC):
    """Routes MoE tokens to the experts on the "ep" axis and back.

    Args:
      num_experts: experts in the layer, all EP ranks together; divisible by the EP size.
      ep_axis: the mesh axis experts are sharded over.
      tp_axis: the mesh axis each expert's matrices are sharded over (``None``: not sharded).
    """

    name = "base"

    def __init__(self, num_experts: int, *, ep_axis: str = EP, tp_axis: str | None = TP):
        if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
            raise ValueError(f"{type(self).__name__}: expected a positive int num_experts, got {num_experts!r}.")
        self.num_experts = int(num_experts)
        self.ep_axis = ep_axis
        self.tp_axis = tp_axis

    # Sizes (traced context) ----------------------------------------------------------------------
    def ep_size(self) -> int:
        return collectives.axis_size(self.ep_axis, op=f"{self.name}.dispatch")

    def local_experts(self) -> int:
        ep = self.ep_size()
        if self.num_experts % ep:
            raise ValueError(
                f"{type(self).__name__}: num_experts={self.num_experts} is not divisible by the EP size {ep} "
                f"(axis {self.ep_axis!r}); choose an expert count that is a multiple of {ep}."
            )
        return self.num_experts // ep

    def _tp_size(self) -> int:
        if self.tp_axis is None or not collectives.axis_is_bound(self.tp_axis):
            return 1
        return collectives.axis_size(self.tp_axis)

    # Validation ------------------------------------------------------------------------------------
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

    # Sequence parallelism ---------------------------------------------------------------------------
    def _gather_sequence(self, *arrays):
        if self._tp_size() == 1:
            return arrays
        return tuple(collectives.all_gather(a, self.tp_axis, axis=0) for a in arrays)

    def _finish_tp(self, y: jax.Array, is_sequence_parallel: bool) -> jax.Array:
        """Expert outputs are partial sums over "tp": all-reduce, or reduce-scatter under SP."""
        if self._tp_size() == 1:
            return y
        if is_sequence_parallel:
            return collectives.reduce_scatter(y, self.tp_axis, axis=0)
        return collectives.all_reduce(y, self.tp_axis)

    # The seed's interface ---------------------------------------------------------------------------
    @abc.abstractmethod
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
        """

    def combine(self, hidden_states: Any, routing_state: Any = None, is_sequence_parallel: bool = False) -> Any:
        """Bring expert outputs back.

        Two forms:

        * ``combine(expert_outputs, routing_state)`` (vLLM's): ``expert_outputs`` in the layout
          ``dispatch`` gave; returns ``T[tokens, hidden]``, each token's top-k outputs summed
          with its weights, TP partial sums finished.
        * ``combine(hidden_states, is_sequence_parallel=False)`` (the seed's): the inverse of
          :meth:`scatter`, ``T[E_local, ep * capacity', hidden] -> T[num_experts, capacity, hidden]``.
        """
        if isinstance(routing_state, RoutingState):
            return self._combine_routed(hidden_states, routing_state)
        if isinstance(routing_state, bool):  # the seed's positional form: combine(h, True)
            is_sequence_parallel = routing_state
        elif routing_state is not None:
            raise TypeError(
                f"{type(self).__name__}.combine: expected a RoutingState from dispatch (or nothing), got "
                f"{type(routing_state).__name__}."
            )
        return self._combine_buckets(hidden_states, is_sequence_parallel)

    # vLLM's interface --------------------------------------------------------------------------------
    @abc.abstractmethod
    def dispatch(
        self,
        hidden_states: jax.Array,
        topk_weights: jax.Array,
        topk_ids: jax.Array,
        *,
        is_sequence_parallel: bool = False,
    ) -> tuple[ExpertInputs, RoutingState]:
        """Route ``hidden_states: T[tokens, hidden]`` to the ranks owning their top-k experts."""

    @abc.abstractmethod
    def _combine_routed(self, expert_outputs: ExpertInputs, state: RoutingState) -> jax.Array: ...

    @abc.abstractmethod
    def _combine_buckets(self, hidden_states: jax.Array, is_sequence_parallel: bool) -> jax.Array: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_experts={self.num_experts}, ep_axis={self.ep_axis!r}, tp_axis={self.tp_axis!r})"
        )


def slot_arrays(topk_ids: jax.Array, topk_weights: jax.Array, num_experts: int):
    """Flatten routing to slots: ``(ids int32[T*k], weights f32[T*k], token int32[T*k], valid bool[T*k])``."""
    t, k = topk_ids.shape
    ids = topk_ids.reshape(-1).astype(jnp.int32)
    valid = (ids >= 0) & (ids < num_experts)
    weights = jnp.where(valid, topk_weights.reshape(-1).astype(jnp.float32), 0.0)
    token = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    return ids, weights, token, valid


def weighted_sum(slot_outputs: jax.Array, weights: jax.Array, t: int, k: int, dtype) -> jax.Array:
    """``sum_k weights[t, k] * slot_outputs[t * k + j]`` in float32 -> ``T[t, hidden]``."""
    y = slot_outputs.astype(jnp.float32).reshape(t, k, -1) * weights.reshape(t, k, 1)
    return y.sum(1).astype(dtype)
