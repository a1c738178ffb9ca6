"""The few private JAX internals this package uses, in one place.

Each has no public equivalent in the JAX versions we support (0.10.2 through 0.12.x); when
one appears, only this module changes. Every function degrades to a safe answer when the
private name is gone.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["backends_started", "distributed_client", "mesh_platform"]


def backends_started() -> bool:
    """Whether JAX has created its backends (after which devices can no longer be configured).

    Private: ``jax._src.xla_bridge.backends_are_initialized``. ``jax.distributed.initialize``
    and ``jax_num_cpu_devices`` must run before it turns true, and JAX offers no public query.
    """
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without the private module: assume not started
        return False
    return bool(xla_bridge.backends_are_initialized())


def distributed_client() -> Any:
    """The coordination-service client of ``jax.distributed`` (``None`` outside a multi-process job).

    Private: ``jax._src.distributed.global_state.client``. Its key-value store
    (``key_value_set`` / ``blocking_key_value_get`` / ``key_value_delete``) and
    ``wait_at_barrier`` carry the host-level messages of :mod:`spmd.host`; JAX exposes them
    publicly only through ``multihost_utils`` helpers that pickle or lack timeouts.
    """
    from jax._src import distributed

    return distributed.global_state.client


def mesh_platform(mesh: Any) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) of a mesh's devices.

    Uses the first device's public ``platform``. Abstract meshes (what ``jax.typeof(x).sharding``
    holds while tracing) carry no devices: for them the private ``_platform`` (or a public
    ``platform`` where a JAX version has one) is the answer, else the default backend.
    """
    try:
        devices = mesh.devices
    except (AttributeError, ValueError):  # AbstractMesh raises ValueError("does not implement devices")
        devices = None
    if devices is not None and getattr(devices, "size", 0):
        return str(devices.flat[0].platform)
    platform = getattr(mesh, "_platform", None) or getattr(mesh, "platform", None)
    return str(platform) if platform else jax.default_backend()
