"""Run a Flax NNX module of per-device layers over the global mesh: one ``jit`` + ``shard_map``, built once.

Layers in ``models`` are per-device math: a layer's ``__call__`` computes on this device's shard
of its parameters and inputs and calls ``spmd``'s collectives; it never builds a ``jit`` or a
``shard_map`` itself. Its sharding is metadata on its parameters::

    self.w = nnx.Param(partitioned(nnx.initializers.lecun_normal(), (None, TP))(rngs.params(), (d, f)))

The model-level wrapper turns that metadata into placement and one compiled program::

    model = Mlp(..., rngs=nnx.Rngs(0))                      # full-size parameters, on the host
    sharded = shard_module(model, in_specs=P(DP, None), out_specs=P(DP, None))
    y = sharded(x)                                          # jit(shard_map(per-device call)), traced once

:func:`shard_module` splits the module (``nnx.split``), reads each parameter's partition spec
from its metadata (``nnx.get_partition_spec``), places the state on the mesh (``jax.device_put``
with a ``NamedSharding`` per parameter), and builds ``jax.jit(spmd.shard_map(lambda state,
*args: nnx.merge(graphdef, state)(*args)))`` once. Calls with the same shapes reuse the trace.

Inside a ``shard_map`` of one's own, a layer is called directly: pass ``sharded.state`` with
``in_specs=sharded.state_specs`` and ``nnx.merge(sharded.graphdef, state)`` in the body.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import spmd

__all__ = ["ShardedModule", "partitioned", "shard_module", "shard_state", "state_partition_specs"]


def partitioned(initializer: Callable[..., jax.Array], spec: tuple[str | tuple[str, ...] | None, ...]):
    """An initializer whose ``nnx.Param`` records ``spec`` (mesh axes per dimension) as metadata.

    ``nnx.with_partitioning`` with eager sharding off: the parameter is created whole, wherever the
    module is built (no mesh needed), and :func:`shard_module` / :func:`shard_state` place it.

    Args:
      initializer: ``(key, shape, dtype) -> array``, as ``nnx.initializers`` gives.
      spec: one entry per dimension: a mesh axis name, a tuple of names, or ``None`` (replicated).

    Returns:
      The wrapped initializer; its value goes straight into ``nnx.Param``.
    """
    return nnx.with_partitioning(initializer, tuple(spec), eager_sharding=False)


def state_partition_specs(state: nnx.State) -> nnx.State:
    """The ``PartitionSpec`` of every variable in ``state`` (``P()``, replicated, where none was recorded).

    The result has the structure of ``state``, so it is the ``in_specs`` entry for ``state`` in a
    ``shard_map``.
    """
    return nnx.get_partition_spec(state)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _check_shardable(state: nnx.State, mesh: Mesh) -> None:
    for path, variable in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        shape = tuple(getattr(variable.get_value(), "shape", ()))
        spec = nnx.get_partition_spec(variable).get_value()
        if len(spec) > len(shape):
            raise ValueError(
                f"shard_module: parameter {name} of shape {shape} has a partition spec {spec} with "
                f"{len(spec)} entries; expected at most {len(shape)}, one per dimension."
            )
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            names = axes if isinstance(axes, tuple) else (axes,)
            unknown = [a for a in names if a not in mesh.shape]
            if unknown:
                raise ValueError(
                    f"shard_module: parameter {name} is sharded over {unknown[0]!r}; expected one of the "
                    f"mesh axes {tuple(mesh.axis_names)}."
                )
            n = math.prod(mesh.shape[a] for a in names)
            if shape[dim] % n:
                raise ValueError(
                    f"shard_module: parameter {name} of shape {shape} cannot be sharded by {spec}: expected "
                    f"dimension {dim} ({shape[dim]}) to be divisible by the {n} devices of {names}."
                )


def shard_state(state: nnx.State, *, mesh: Mesh | None = None) -> tuple[nnx.State, nnx.State]:
    """Place ``state`` on the mesh as its variables' metadata says.

    Args:
      state: from ``nnx.split(module)`` or ``nnx.state(module)``.
      mesh: defaults to the global mesh (``spmd.get_mesh()``).

    Returns:
      ``(placed_state, specs)``: the state as global arrays with a ``NamedSharding`` each, and
      the ``PartitionSpec`` tree (:func:`state_partition_specs`).

    Raises:
      ValueError: a spec names an axis the mesh lacks, has more entries than the array has
        dimensions, or splits a dimension that does not divide by its axes' size.
      RuntimeError: no ``mesh`` and model parallel is not initialized.
    """
    mesh = spmd.get_mesh() if mesh is None else mesh
    _check_shardable(state, mesh)
    specs = state_partition_specs(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.device_put(state, shardings), specs


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedModule:
    """A module's per-device ``__call__`` compiled once as ``jit(shard_map(...))`` over a mesh.

    Build it with :func:`shard_module`. Calling it runs the module on global arrays: ``args``
    are split by ``in_specs``, each device runs the module's ``__call__`` on its shards, and the
    outputs are assembled by ``out_specs``.

    Attributes:
      graphdef: the module's structure (``nnx.split``'s first half).
      state: its variables as global arrays, placed on ``mesh`` by their partition specs. The
        wrapper holds this copy; changes to the original module after wrapping do not reach it.
      state_specs: the ``PartitionSpec`` of every variable, structured like ``state``.
      in_specs, out_specs: the specs of the call's positional arguments and outputs.
      call_kwargs: static keyword arguments given to the module on every call.
      mesh: the mesh.
    """

    graphdef: nnx.GraphDef
    state: nnx.State
    state_specs: nnx.State
    in_specs: tuple[Any, ...]
    out_specs: Any
    call_kwargs: Mapping[str, Any]
    mesh: Mesh
    _run: Callable[..., Any] = dataclasses.field(repr=False)

    def __call__(self, *args: Any) -> Any:
        """Run the module on global arrays ``args`` (one per entry of ``in_specs``)."""
        if len(args) != len(self.in_specs):
            raise TypeError(
                f"ShardedModule: expected {len(self.in_specs)} positional argument(s), one per in_specs entry, "
                f"got {len(args)}."
            )
        return self._run(self.state, *args)

    @property
    def module(self) -> nnx.Module:
        """The module rebuilt around the placed state (``nnx.merge(graphdef, state)``)."""
        return nnx.merge(self.graphdef, self.state)


def shard_module(
    module: nnx.Module,
    *,
    in_specs: Any,
    out_specs: Any,
    mesh: Mesh | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
    check_vma: bool = False,
) -> ShardedModule:
    """Wrap a module of per-device layers as one ``jax.jit(spmd.shard_map(...))`` over the mesh.

    Args:
      module: an ``nnx.Module`` whose ``__call__`` is per-device math (collectives over mesh axes)
        and whose parameters record their sharding (:func:`partitioned`); parameters without a
        recorded spec are replicated.
      in_specs: a sequence with the ``PartitionSpec`` (or pytree of them) of each positional
        argument of the call; a single ``PartitionSpec`` means one argument.
      out_specs: the ``PartitionSpec`` pytree of the outputs, as for ``jax.shard_map``.
      mesh: defaults to the global mesh (``spmd.get_mesh()``).
      call_kwargs: static keyword arguments for every call (e.g. ``{"is_sequence_parallel": True}``);
        wrap the module again for other values.
      check_vma: as for ``jax.shard_map``; off by default, since layers mix replicated parameters
        with per-device values without marking them (``pvary``).

    Returns:
      A :class:`ShardedModule`; calls with same-shaped arguments reuse one trace.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``.
      ValueError: a parameter's spec does not fit its shape or the mesh (see :func:`shard_state`).
      RuntimeError: no ``mesh`` and model parallel is not initialized.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"shard_module: expected an nnx.Module, got {type(module).__name__}.")
    mesh = spmd.get_mesh() if mesh is None else mesh
    in_specs = (in_specs,) if isinstance(in_specs, P) else tuple(in_specs)
    kwargs = dict(call_kwargs or {})
    graphdef, state = nnx.split(module)
    placed, specs = shard_state(state, mesh=mesh)

    def per_device(state: nnx.State, *args: Any) -> Any:
        return nnx.merge(graphdef, state)(*args, **kwargs)

    run = jax.jit(
        spmd.shard_map(per_device, in_specs=(specs, *in_specs), out_specs=out_specs, mesh=mesh, check_vma=check_vma)
    )
    return ShardedModule(
        graphdef=graphdef,
        state=placed,
        state_specs=specs,
        in_specs=in_specs,
        out_specs=out_specs,
        call_kwargs=kwargs,
        mesh=mesh,
        _run=run,
    )
