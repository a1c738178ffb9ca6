"""A Mixtral-style MoE block on the "ep" axis: router, softmax top-k, experts via an all-to-all manager.

Experts are stacked weights, ``w_gate, w_up: [E, hidden, ffn]`` and ``w_down: [E, ffn, hidden]``,
sharded over "ep" (expert dimension) and "tp" (``ffn``): each EP rank holds ``E / ep`` experts
and each TP rank a slice of every local expert's ``ffn``, so expert outputs are partial sums over
"tp" that the manager's ``combine`` finishes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from spmd import parallel_state as ps
from spmd.axes import DP, EP, TP
from spmd.expert_parallel import All2AllManagerBase, ExpertInputs, get_all2all_manager

__all__ = ["MoEBlock", "apply_experts", "dense_moe_reference", "moe_forward", "route"]


def route(x: jax.Array, w_router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts, top-k, weights renormalised to sum to 1: ``(f32[T, k], int32[T, k])``."""
    num_experts = w_router.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"route: top_k={top_k} must be between 1 and the number of experts {num_experts}.")
    logits = jnp.dot(x, w_router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = lax.top_k(probs, top_k)
    weights = weights / weights.sum(-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _swiglu(x, w_gate, w_up, w_down, dot):
    h = jax.nn.silu(dot(x, w_gate)) * dot(x, w_up)
    return dot(h.astype(x.dtype), w_down)


def apply_experts(inputs: ExpertInputs, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> ExpertInputs:
    """Run the local experts (SwiGLU) on either layout; returns outputs in the same layout."""
    x = inputs.tokens
    if inputs.is_ragged:
        gs = inputs.group_sizes

        def dot(a, w):
            return lax.ragged_dot(a, w, gs, preferred_element_type=jnp.float32)

        y = _swiglu(x, w_gate, w_up, w_down, dot)
    else:

        def dot(a, w):
            return jnp.einsum("ech,ehf->ecf", a, w, preferred_element_type=jnp.float32)

        y = _swiglu(x, w_gate, w_up, w_down, dot)
    return ExpertInputs(tokens=y.astype(x.dtype), group_sizes=inputs.group_sizes)


def moe_forward(
    x: jax.Array,
    w_router: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    manager: All2AllManagerBase,
    top_k: int,
    is_sequence_parallel: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-device MoE forward (inside ``shard_map``): ``(T[tokens, hidden], dropped int32[])``.

    ``x`` is this rank's tokens (this TP rank's share of them under sequence parallelism);
    ``w_*`` are this rank's local experts' (TP-sharded) weights.
    """
    weights, ids = route(x, w_router, top_k)
    inputs, state = manager.dispatch(x, weights, ids, is_sequence_parallel=is_sequence_parallel)
    outputs = apply_experts(inputs, w_gate, w_up, w_down)
    return manager.combine(outputs, state), state.num_dropped


def dense_moe_reference(x, w_router, w_gate, w_up, w_down, top_k: int) -> jax.Array:
    """Every token through its top-k experts on one device, float32: the test reference."""
    weights, ids = route(x, w_router, top_k)
    xf = x.astype(jnp.float32)
    h = jax.nn.silu(jnp.einsum("th,ehf->tef", xf, w_gate.astype(jnp.float32)))
    h = h * jnp.einsum("th,ehf->tef", xf, w_up.astype(jnp.float32))
    y = jnp.einsum("tef,efh->teh", h, w_down.astype(jnp.float32))  # [T, E, H]
    picked = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # [T, k, H]
    return (picked * weights[:, :, None]).sum(1)


class MoEBlock(nnx.Module):
    """An MoE feed-forward block with experts on "ep" and each expert's ``ffn`` on "tp".

    Args:
      hidden: model width.
      ffn: each expert's intermediate width (divisible by the TP size).
      num_experts: experts (divisible by the EP size).
      top_k: experts per token.
      manager: "naive", "capacity" or "ragged" (or an :class:`All2AllManagerBase`).
      rngs: ``nnx.Rngs`` for initialisation.

    Calling the block runs ``shard_map`` over the global mesh: tokens are sharded over
    ("dp", "ep"), or over ("dp", "ep", "tp") with ``is_sequence_parallel=True``. Each parameter
    records its mesh axes in its ``mesh_axes`` metadata (``block.w_gate.mesh_axes``).
    """

    def __init__(
        self,
        hidden: int,
        ffn: int,
        num_experts: int,
        top_k: int,
        *,
        manager: str | All2AllManagerBase = "ragged",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        **manager_kwargs,
    ):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEBlock: top_k={top_k} must be between 1 and num_experts={num_experts}.")
        init = nnx.initializers.normal(stddev=hidden**-0.5)
        self.top_k = top_k
        self.num_experts = num_experts
        self.manager = (
            manager
            if isinstance(manager, All2AllManagerBase)
            else get_all2all_manager(manager, num_experts, **manager_kwargs)
        )
        self.w_router = nnx.Param(init(rngs.params(), (hidden, num_experts), jnp.float32), mesh_axes=(None, None))
        self.w_gate = nnx.Param(init(rngs.params(), (num_experts, hidden, ffn), dtype), mesh_axes=(EP, None, TP))
        self.w_up = nnx.Param(init(rngs.params(), (num_experts, hidden, ffn), dtype), mesh_axes=(EP, None, TP))
        self.w_down = nnx.Param(
            nnx.initializers.normal(stddev=ffn**-0.5)(rngs.params(), (num_experts, ffn, hidden), dtype),
            mesh_axes=(EP, TP, None),
        )

    def __call__(self, x: jax.Array, *, is_sequence_parallel: bool = False) -> tuple[jax.Array, jax.Array]:
        """``x: T[tokens, hidden]`` -> ``(T[tokens, hidden], dropped slots per device int32[devices])``."""
        tokens = P((DP, EP, TP) if is_sequence_parallel else (DP, EP), None)
        expert = P(EP, None, TP)

        def body(x, wr, wg, wu, wd):
            y, dropped = moe_forward(
                x, wr, wg, wu, wd, manager=self.manager, top_k=self.top_k, is_sequence_parallel=is_sequence_parallel
            )
            return y, dropped[None]

        f = ps.shard_map(
            body,
            in_specs=(tokens, P(), expert, expert, P(EP, TP, None)),
            out_specs=(tokens, P(ps.MESH_AXES)),
            check_vma=False,
        )
        return jax.jit(f)(x, self.w_router[...], self.w_gate[...], self.w_up[...], self.w_down[...])
