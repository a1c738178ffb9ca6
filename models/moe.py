"""A Mixtral-style MoE block on the "ep" axis: router, softmax top-k, SwiGLU experts via an all-to-all manager.

Experts are stacked weights, ``w_gate, w_up: [E, hidden, ffn]`` and ``w_down: [E, ffn, hidden]``,
sharded over "ep" (expert dimension) and "tp" (``ffn``): each EP rank holds ``E / ep`` experts
and each TP rank a slice of every local expert's ``ffn``, so expert outputs are partial sums over
"tp" that the manager's ``combine`` finishes.

Everything here is per-device math, called inside ``shard_map``: the functional API
(:func:`route`, :func:`apply_experts`, :func:`moe_forward`) and :class:`MoEBlock`, whose
parameters record their sharding as metadata. :func:`shard_moe_block` (over
:func:`models.sharding.shard_module`) runs a block on global arrays::

    spmd.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=4)
    block = MoEBlock(hidden=1024, ffn=4096, num_experts=8, top_k=2, manager="ragged", rngs=nnx.Rngs(0))
    moe = shard_moe_block(block)          # jit(shard_map(block.__call__)), built once
    y, dropped = moe(x)                   # x: T[tokens, hidden]; dropped: int32[devices]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.sharding import ShardedModule, partitioned, shard_module
from spmd import DP, EP, MESH_AXES, TP
from spmd.expert_parallel import (
    DEFAULT_MAX_TOKENS,
    All2AllManagerBase,
    ExpertTokens,
    LowLatencyAll2AllManager,
    allocate_low_latency_buffers,
    get_all2all_manager,
    plan_low_latency,
)

__all__ = [
    "MoEBlock",
    "apply_experts",
    "auto_low_latency",
    "dense_moe_reference",
    "moe_forward",
    "moe_token_spec",
    "prepare_low_latency",
    "route",
    "shard_moe_block",
]


def route(x: jax.Array, w_router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax over experts, top-k, weights renormalised to sum to 1.

    Args:
      x: ``T[tokens, hidden]``.
      w_router: ``T[hidden, num_experts]``.
      top_k: experts per token.

    Returns:
      ``(weights f32[tokens, top_k], ids int32[tokens, top_k])``, highest probability first.

    Raises:
      ValueError: ``top_k`` outside ``[1, num_experts]``, or shapes that do not chain.
    """
    if x.ndim != 2 or w_router.ndim != 2 or x.shape[1] != w_router.shape[0]:
        raise ValueError(
            f"route: expected x: [tokens, hidden] and w_router: [hidden, num_experts], got "
            f"{tuple(x.shape)} and {tuple(w_router.shape)}."
        )
    num_experts = w_router.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
        raise ValueError(f"route: expected top_k between 1 and the number of experts {num_experts}, got {top_k!r}.")
    logits = jnp.dot(x, w_router, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = lax.top_k(probs, top_k)
    weights = weights / weights.sum(-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _swiglu(x, w_gate, w_up, w_down, dot):
    h = jax.nn.silu(dot(x, w_gate)) * dot(x, w_up)
    return dot(h.astype(x.dtype), w_down)


def apply_experts(inputs: ExpertTokens, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> ExpertTokens:
    """Run the local SwiGLU experts ``silu(x @ w_gate) * (x @ w_up) @ w_down`` on either layout.

    Args:
      inputs: what ``dispatch`` gave: padded ``[E_local, C, hidden]`` or ragged ``[rows, hidden]``.
      w_gate, w_up: ``T[E_local, hidden, ffn']``; w_down: ``T[E_local, ffn', hidden]`` (this rank's
        experts and, under TP, this rank's slice ``ffn'`` of their width).

    Returns:
      The outputs in the layout of ``inputs`` (partial sums over "tp" when ``ffn`` is sharded).
    """
    if inputs.is_ragged:

        def dot(a, w):
            return lax.ragged_dot(a, w, inputs.group_sizes, preferred_element_type=jnp.float32)

    else:

        def dot(a, w):
            return jnp.einsum("ech,ehf->ecf", a, w, preferred_element_type=jnp.float32)

    x = inputs.tokens
    return inputs.with_tokens(_swiglu(x, w_gate, w_up, w_down, dot).astype(x.dtype))


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
    """Per-device MoE forward (inside ``shard_map``).

    Args:
      x: ``T[tokens, hidden]``, this rank's tokens (this TP rank's share of them under sequence
        parallelism).
      w_router: ``T[hidden, num_experts]``, replicated.
      w_gate, w_up, w_down: this rank's local experts' (TP-sharded) weights.
      manager: the all-to-all manager.
      top_k: experts per token.
      is_sequence_parallel: ``x`` is sharded over "tp" too.

    Returns:
      ``(T[tokens, hidden], dropped int32[])``: the block's output for ``x``, and the slots of
      this rank's tokens that reached no expert.
    """
    weights, ids = route(x, w_router, top_k)
    inputs, state = manager.dispatch(x, weights, ids, is_sequence_parallel=is_sequence_parallel)
    outputs = apply_experts(inputs, w_gate, w_up, w_down)
    return manager.combine(outputs, state), state.num_dropped


def dense_moe_reference(x, w_router, w_gate, w_up, w_down, top_k: int) -> jax.Array:
    """Every token through its top-k experts on one device, float32 (no manager, no sharding)."""
    weights, ids = route(x, w_router, top_k)
    xf = x.astype(jnp.float32)
    h = jax.nn.silu(jnp.einsum("th,ehf->tef", xf, w_gate.astype(jnp.float32)))
    h = h * jnp.einsum("th,ehf->tef", xf, w_up.astype(jnp.float32))
    y = jnp.einsum("tef,efh->teh", h, w_down.astype(jnp.float32))  # [T, E, H]
    picked = jnp.take_along_axis(y, ids[:, :, None], axis=1)  # [T, k, H]
    return (picked * weights[:, :, None]).sum(1)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"MoEBlock: expected a positive int {name}, got {value!r}.")
    return int(value)


class MoEBlock(nnx.Module):
    """An MoE feed-forward block with experts on "ep" and each expert's ``ffn`` on "tp".

    Its call is per-device math (run it inside ``shard_map``, or through :func:`shard_moe_block`);
    its parameters carry their sharding as metadata (``out_sharding``): ``w_router`` replicated,
    ``w_gate``/``w_up`` ``(EP, None, TP)``, ``w_down`` ``(EP, TP, None)``.

    Args:
      hidden: model width.
      ffn: each expert's intermediate width (divisible by the TP size).
      num_experts: experts (divisible by the EP size).
      top_k: experts per token.
      manager: "naive", "capacity", "ragged" or "low_latency" (or an :class:`All2AllManagerBase`);
        the low-latency manager uses its GPU kernel once :func:`prepare_low_latency` gave it buffers.
      dtype: the experts' parameter dtype (the router stays float32).
      rngs: ``nnx.Rngs`` for initialisation.
      **manager_kwargs: options for the named manager (``expert_capacity=``, ...).

    Raises:
      ValueError: a size that is not a positive int, ``top_k`` outside ``[1, num_experts]``, an
        unknown manager name, or a manager built for another expert count.
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
        hidden, ffn = _positive_int("hidden", hidden), _positive_int("ffn", ffn)
        num_experts = _positive_int("num_experts", num_experts)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEBlock: expected top_k between 1 and num_experts={num_experts}, got {top_k!r}.")
        if isinstance(manager, All2AllManagerBase):
            if manager_kwargs:
                raise ValueError(
                    f"MoEBlock: manager options {sorted(manager_kwargs)} need a manager name, not an instance."
                )
            if manager.num_experts != num_experts:
                raise ValueError(
                    f"MoEBlock: expected a manager for num_experts={num_experts}, got one for {manager.num_experts}."
                )
        else:
            manager = get_all2all_manager(manager, num_experts, **manager_kwargs)
        self.top_k = int(top_k)
        self.num_experts = num_experts
        self.manager = manager
        init = nnx.initializers.normal(stddev=hidden**-0.5)
        down_init = nnx.initializers.normal(stddev=ffn**-0.5)
        self.w_router = nnx.Param(partitioned(init, (None, None))(rngs.params(), (hidden, num_experts), jnp.float32))
        self.w_gate = nnx.Param(partitioned(init, (EP, None, TP))(rngs.params(), (num_experts, hidden, ffn), dtype))
        self.w_up = nnx.Param(partitioned(init, (EP, None, TP))(rngs.params(), (num_experts, hidden, ffn), dtype))
        self.w_down = nnx.Param(
            partitioned(down_init, (EP, TP, None))(rngs.params(), (num_experts, ffn, hidden), dtype)
        )

    def __call__(self, x: jax.Array, *, is_sequence_parallel: bool = False) -> tuple[jax.Array, jax.Array]:
        """Per-device forward, inside ``shard_map`` over a mesh with the manager's axes.

        Args:
          x: ``T[tokens, hidden]``: this device's tokens.
          is_sequence_parallel: ``x`` is this TP rank's share of its EP rank's tokens.

        Returns:
          ``(T[tokens, hidden], dropped int32[1])``: the output for ``x``, and this device's count
          of (token, choice) slots that reached no expert, as a length-1 vector so that a
          ``shard_map`` can lay every device's count side by side.
        """
        y, dropped = moe_forward(
            x,
            self.w_router[...],
            self.w_gate[...],
            self.w_up[...],
            self.w_down[...],
            manager=self.manager,
            top_k=self.top_k,
            is_sequence_parallel=is_sequence_parallel,
        )
        return y, dropped[None]


def moe_token_spec(*, is_sequence_parallel: bool = False) -> P:
    """How a block's tokens ``[tokens, hidden]`` are split: over ("dp", "ep"), and "tp" too under SP."""
    return P((DP, EP, TP) if is_sequence_parallel else (DP, EP), None)


def shard_moe_block(block: MoEBlock, *, is_sequence_parallel: bool = False, mesh: Mesh | None = None) -> ShardedModule:
    """``block`` as one ``jit(shard_map(...))`` on global arrays: ``x: T[tokens, hidden] -> (y, dropped)``.

    Args:
      block: the block.
      is_sequence_parallel: tokens are split over "tp" as well as ("dp", "ep").
      mesh: defaults to the global mesh.

    Returns:
      A :class:`~models.sharding.ShardedModule` returning ``(T[tokens, hidden], dropped
      int32[devices])`` (device order: the mesh's, "tp" fastest).

    Raises:
      TypeError: ``block`` is not a :class:`MoEBlock`.
      ValueError: its parameters do not divide over the mesh (e.g. experts over "ep").
    """
    if not isinstance(block, MoEBlock):
        raise TypeError(f"shard_moe_block: expected a MoEBlock, got {type(block).__name__}.")
    tokens = moe_token_spec(is_sequence_parallel=is_sequence_parallel)
    return shard_module(
        block,
        in_specs=tokens,
        out_specs=(tokens, P(MESH_AXES)),
        mesh=mesh,
        call_kwargs={"is_sequence_parallel": is_sequence_parallel},
    )


def prepare_low_latency(
    module: nnx.Module, *, max_tokens: int = DEFAULT_MAX_TOKENS, mesh: Mesh | None = None
) -> list[str]:
    """Give every low-latency manager in ``module`` peer buffers, so its MoE blocks use the GPU kernel.

    An explicit request (no opt-in needed; :func:`auto_low_latency` is the automatic, opt-in form). For
    each :class:`MoEBlock` whose manager is a :class:`LowLatencyAll2AllManager` without buffers, where
    :func:`spmd.expert_parallel.plan_low_latency` finds the mesh eligible (NVIDIA GPUs, 2 to 8 EP ranks,
    buffers shareable: one process, or one GPU per process of one host), allocate buffers for
    ``max_tokens`` tokens per EP rank of the block's hidden size and top-k (blocks of one shape share
    them) and set the manager's ``buffers`` and ``max_tokens``. Elsewhere nothing changes: the manager
    runs its fallback (or the ``all_to_all`` form). A collective across processes: call it in every
    process, in the same order.

    Args:
      module: a block, or a model holding blocks.
      max_tokens: tokens per EP rank one call may carry (a larger call takes the fallback).
      mesh: defaults to the global mesh.

    Returns:
      One line per block saying what it got (buffers, or why not).
    """
    import spmd

    mesh = spmd.get_mesh() if mesh is None else mesh
    lines = []
    for path, block in nnx.iter_graph(module):
        if not isinstance(block, MoEBlock) or not isinstance(block.manager, LowLatencyAll2AllManager):
            continue
        where = "/".join(str(p) for p in path) or "block"
        manager = block.manager
        plan = plan_low_latency(mesh, ep_axis=manager.ep_axis, max_tokens=max_tokens, enabled=True)
        if not plan:
            lines.append(f"{where}: no buffers ({plan.reason})")
            continue
        hidden = int(block.w_gate[...].shape[1])
        try:
            manager.buffers = allocate_low_latency_buffers(
                mesh,
                max_tokens=max_tokens,
                hidden=hidden,
                top_k=block.top_k,
                use_fp8=manager.use_fp8,
                dtype=block.w_gate[...].dtype,
                ep_axis=manager.ep_axis,
            )
        except ValueError as e:  # processes on several hosts (NotOneHost), ...: the fallback stays
            lines.append(f"{where}: no buffers ({e})")
            continue
        manager.max_tokens = max_tokens
        lines.append(f"{where}: buffers for {max_tokens} tokens x {hidden} x top-{block.top_k}")
    return lines


def auto_low_latency(
    module: nnx.Module,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    mesh: Mesh | None = None,
    enabled: bool | None = None,
) -> list[str]:
    """The automatic choice: :func:`prepare_low_latency` where the plan allows it, else one line saying why not.

    OFF by default until the kernel passes its GPU check: it acts only with ``enabled=True`` or
    ``SPMD_EP_LOW_LATENCY=1`` (:func:`spmd.expert_parallel.plan_low_latency` says why in every other
    case). Blocks without a low-latency manager (CPU meshes build ``naive`` ones) are left alone.

    Args:
      module: a block, or a model holding blocks.
      max_tokens: tokens per EP rank one call may carry; a call of more takes the fallback manager.
      mesh: defaults to the global mesh.
      enabled: the opt-in; ``None`` reads ``$SPMD_EP_LOW_LATENCY``.

    Returns:
      What happened, one line per block (or one line for the whole module when the plan says no).

    Raises:
      ValueError: a bad ``enabled``, ``$SPMD_EP_LOW_LATENCY`` or ``max_tokens``.
    """
    import spmd

    mesh = spmd.get_mesh() if mesh is None else mesh
    managers = [
        b.manager
        for _, b in nnx.iter_graph(module)
        if isinstance(b, MoEBlock) and isinstance(b.manager, LowLatencyAll2AllManager)
    ]
    axis = managers[0].ep_axis if managers else EP
    plan = plan_low_latency(mesh, ep_axis=axis, max_tokens=max_tokens, enabled=enabled)
    if not managers:
        return []
    if not plan:
        return [f"low_latency: not used ({plan.reason}); the fallback manager runs"]
    return prepare_low_latency(module, max_tokens=max_tokens, mesh=mesh)
