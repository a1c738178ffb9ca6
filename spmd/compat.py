"""The few private JAX internals ``spmd`` and ``models`` use, in one place.

Each has no public equivalent in the JAX versions we support (0.10.2 through 0.12.x); when
one appears, only this module changes. Every function degrades to a safe answer when the
private name is gone. ``kernels``, which imports only JAX, keeps its own in ``kernels.compat``;
:func:`distributed_client` is that one (the coordination-service client is read in one place).
Nothing else in the project imports ``jax._src`` (``tests/test_architecture.py`` checks).
"""

from __future__ import annotations

from typing import Any

import jax

from kernels.compat import distributed_client

__all__ = ["backends_started", "coordinator_address", "distributed_client", "gloo_on_address", "mesh_platform"]


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


def coordinator_address() -> str | None:
    """``host:port`` of the coordination service this process joined (``None`` outside a multi-process job).

    Private: ``jax._src.distributed.global_state.coordinator_address``; it is also what JAX found
    itself under SLURM or Open MPI, where the caller gave none.
    """
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a JAX without the private module
        return None
    address = getattr(distributed.global_state, "coordinator_address", None)
    return address if isinstance(address, str) and address else None


def gloo_on_address(hostname: str) -> bool:
    """Have the CPU backend's gloo collectives bind to, and advertise, ``hostname`` (an address or a name).

    JAX builds gloo with the machine's hostname, which often resolves to loopback (containers,
    Debian's ``127.0.1.1`` line, hosts sharing a name): then processes on other hosts dial
    themselves. jaxlib's ``make_gloo_tcp_collectives(distributed_client, hostname=None,
    interface=None)`` takes the address (the same signature in JAX 0.10.2 through 0.12), but
    ``jax._src.xla_bridge.make_cpu_client`` calls it without one; so this registers a CPU backend
    factory that builds gloo with ``hostname`` and hands it to ``make_cpu_client(collectives=...)``
    (its public argument). Other implementations (``jax_cpu_collectives_implementation`` "mpi")
    and a process outside a multi-process job get JAX's own client, unchanged.

    Private: ``jax._src.xla_bridge.register_backend_factory`` / ``make_cpu_client``,
    ``jax._src.distributed.global_state`` and ``jax._src.lib._jax.make_gloo_tcp_collectives``.
    Call it before JAX starts its backends (the factory runs when they start).

    Returns:
      Whether the factory was registered (``False`` when this JAX lacks one of the private names,
      or the CPU backend already started: gloo then uses the machine's hostname, as without this call).
    """
    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        make_gloo = _jax.make_gloo_tcp_collectives
        make_cpu_client, register = xla_bridge.make_cpu_client, xla_bridge.register_backend_factory
    except (ImportError, AttributeError):  # pragma: no cover - a JAX that moved them: JAX's default gloo
        return False

    def cpu_client() -> Any:
        client = distributed.global_state.client
        if client is None or jax.config.jax_cpu_collectives_implementation != "gloo":
            return make_cpu_client()
        return make_cpu_client(collectives=make_gloo(distributed_client=client, hostname=hostname))

    try:
        register("cpu", cpu_client, priority=0, fail_quietly=False)
    except RuntimeError:  # the CPU backend already started: too late to choose gloo's address
        return False
    return True


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
