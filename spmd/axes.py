"""Mesh axis names: one constant per parallel dimension.

The global mesh has the axes ``("dp", "pp", "ep", "tp")`` in that order, "tp" innermost so that
tensor-parallel peers sit on the fastest links (device ids adjacent). A vLLM "process group" is
one of these axes (or a tuple of them); a "rank" is ``lax.axis_index`` along it.
"""

from __future__ import annotations

DP = "dp"
"""Data parallel: independent replicas of the model, each with its own batch."""
PP = "pp"
"""Pipeline parallel: consecutive layer stages."""
EP = "ep"
"""Expert parallel: MoE experts sharded across this axis (data parallel outside MoE blocks)."""
TP = "tp"
"""Tensor parallel: each weight matrix sharded across this axis."""

MESH_AXES: tuple[str, str, str, str] = (DP, PP, EP, TP)
"""Axis names of the global mesh, outermost first."""

AxisName = str | tuple[str, ...]
