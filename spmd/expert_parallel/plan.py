"""Whether a model's MoE blocks use the low-latency kernel: one decision, with the reason in words.

:func:`plan_low_latency` is the automatic choice (the all-reduce's :mod:`spmd.communicators.allreduce_plan`
does the same for its kernels): a :class:`LowLatencyPlan` that is true where the low-latency manager's
Pallas kernel may serve a mesh, else false with the first reason it cannot, one sentence per case:

1. not opted in: the choice is OFF by default until the kernel passes its GPU check (its first GPU call
   hung on 2026-12-04, docs/expert_parallel.md); opt in with ``SPMD_EP_LOW_LATENCY=1`` or ``enabled=True``;
2. the mesh's devices are not NVIDIA GPUs;
3. the EP group has one rank (nothing to exchange);
4. the EP group has more than 8 ranks (one NVLink host has at most 8 GPUs);
5. peer buffers cannot be shared for this mesh (``kernels.symmetric_memory.unsupported``: devices of
   several processes that are not one GPU each, no CUDA driver, XLA's sharded autotuning on, ...);
6. this call's tokens per rank are more than ``max_tokens`` (a call of more tokens takes the fallback).

Across processes, whether they run on one host is known only when the buffers are allocated (a
collective that exchanges machine ids); :func:`models.moe.prepare_low_latency` reports that case.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kernels import symmetric_memory
from spmd.axes import EP

__all__ = ["DEFAULT_MAX_TOKENS", "ENABLE_ENV", "LowLatencyPlan", "low_latency_enabled", "plan_low_latency"]

ENABLE_ENV = "SPMD_EP_LOW_LATENCY"  # "1": the automatic choice may pick the kernel; unset / "0": never
DEFAULT_MAX_TOKENS = 128  # tokens per EP rank the blocks' buffers hold (DeepEP's low-latency regime)
MAX_GROUP = 8  # GPUs of one NVLink host
NOT_ENABLED = (
    "the low-latency kernel is off by default until it passes its GPU check (tests/workers/gpu_ep_check.py; "
    f"docs/expert_parallel.md); set {ENABLE_ENV}=1 or pass enabled=True to opt in"
)


def low_latency_enabled(enabled: bool | None = None) -> bool:
    """``enabled`` if given, else ``$SPMD_EP_LOW_LATENCY`` (``"1"`` on; unset, empty or ``"0"`` off).

    Raises:
      ValueError: ``enabled`` is not a bool or None, or the variable holds anything else.
    """
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise ValueError(f"plan_low_latency: expected enabled True, False or None, got {enabled!r}.")
        return enabled
    raw = os.environ.get(ENABLE_ENV, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{ENABLE_ENV}: expected 1 (opt in) or 0 / unset (off), got {raw!r}.")
    return raw == "1"


@dataclasses.dataclass(frozen=True)
class LowLatencyPlan:
    """The automatic choice for one mesh: true when the kernel may run.

    Attributes:
      eligible: whether the low-latency kernel may serve this mesh (and call).
      reason: why not, in words (``""`` when eligible).
      ep: the EP group's size.
      max_tokens: tokens per rank the buffers are sized for.
    """

    eligible: bool
    reason: str
    ep: int
    max_tokens: int

    def __bool__(self) -> bool:
        return self.eligible


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"plan_low_latency: expected a positive int {name}, got {value!r}.")
    return value


def plan_low_latency(
    mesh: Any,
    *,
    ep_axis: str = EP,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    tokens: int | None = None,
    enabled: bool | None = None,
) -> LowLatencyPlan:
    """Whether the low-latency kernel may serve ``mesh``'s EP group (and a call of ``tokens`` tokens per rank).

    Args:
      mesh: the mesh (anything with ``devices``, ``shape`` and ``axis_names`` as a ``jax.sharding.Mesh``).
      ep_axis: the EP axis.
      max_tokens: tokens per rank the buffers would hold.
      tokens: this call's tokens per rank, or ``None`` (the mesh alone).
      enabled: the opt-in; ``None`` reads ``$SPMD_EP_LOW_LATENCY``.

    Returns:
      A :class:`LowLatencyPlan`; its ``reason`` names the first case that rules the kernel out.

    Raises:
      ValueError: ``ep_axis`` is not an axis of ``mesh``; ``max_tokens`` / ``tokens`` not a positive int;
        a bad ``enabled`` or ``$SPMD_EP_LOW_LATENCY``.
    """
    max_tokens = _positive_int("max_tokens", max_tokens)
    if tokens is not None:
        tokens = _positive_int("tokens", tokens)
    if ep_axis not in tuple(mesh.axis_names):
        raise ValueError(f"plan_low_latency: ep_axis {ep_axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}.")
    ep = int(mesh.shape[ep_axis])

    def no(reason: str) -> LowLatencyPlan:
        return LowLatencyPlan(False, reason, ep, max_tokens)

    if not low_latency_enabled(enabled):
        return no(NOT_ENABLED)
    platforms = sorted({str(d.platform) for d in mesh.devices.flat})
    if platforms != ["gpu"]:
        return no(f"the mesh's devices are {platforms}, not NVIDIA GPUs")
    if ep < 2:
        return no(f"the EP group ({ep_axis!r}) has {ep} rank: nothing to exchange")
    if ep > MAX_GROUP:
        return no(f"the EP group ({ep_axis!r}) has {ep} ranks; the kernel serves one NVLink host (at most {MAX_GROUP})")
    why = symmetric_memory.unsupported(mesh)
    if why is not None:
        return no(f"peer buffers cannot be shared for this mesh: {why}")
    if tokens is not None and tokens > max_tokens:
        return no(f"{tokens} tokens per rank is more than max_tokens={max_tokens} (the fallback manager runs)")
    return LowLatencyPlan(True, "", ep, max_tokens)
