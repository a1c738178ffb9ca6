"""Joining a multi-process job: ``init_distributed_environment`` over ``jax.distributed``.

vLLM's ``init_distributed_environment`` creates the ``torch.distributed`` world. Here JAX's own
runtime is the world: ``jax.distributed.initialize`` starts (on process 0) or joins the
coordination service, after which ``jax.devices()`` lists every process's devices and XLA's
collectives (NCCL on GPU, gloo on CPU) span processes. Nothing here changes process-wide hooks:
``spmd-launch`` runs each rank through a runner that ends it promptly on an uncaught error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax

from spmd import compat, net
from spmd.envs import SpmdEnv

__all__ = ["distributed_is_initialized", "init_distributed_environment", "job_host_address"]


class _Joined:
    """Whether this process has run :func:`init_distributed_environment` (it runs once)."""

    done = False


def distributed_is_initialized() -> bool:
    """Whether :func:`init_distributed_environment` has run in this process."""
    return _Joined.done


def _is_loopback(address: str) -> bool:
    return net.is_loopback(address.rpartition(":")[0].strip("[]"))


def job_host_address(configured: str | None) -> net.HostAddress | None:
    """This host's address in the job this process joined (:func:`spmd.net.host_address`); ``None``: loopback.

    Args:
      configured: ``SPMD_HOST_ADDRESS`` as :mod:`spmd.envs` parsed it (or ``None``).

    Raises:
      ValueError: the address is a loopback one but the coordinator is not (set ``SPMD_HOST_ADDRESS``).
    """
    return net.host_address(compat.coordinator_address(), configured)


def _cuda_possible() -> bool:
    """Whether this process may run on NVIDIA GPUs: a CUDA plugin is installed and not excluded by platforms."""
    import importlib.util

    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def _no_sharded_autotuning() -> None:
    """Switch off XLA's sharded GPU autotuning for this process (unless ``XLA_FLAGS`` already sets it).

    Sharded autotuning has every process of a job autotune part of a program and assumes they all
    compile the same one. With the custom all-reduce's peer buffers shared across processes
    (CUDA IPC), each process compiles its own buffer addresses in, so the programs differ and the
    first compile hangs in every process (docs/custom_all_reduce.md, cross-process peer buffers).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_shard_autotuning" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_shard_autotuning=false".strip()


def init_distributed_environment(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    cpu_devices_per_process: int | None = None,
    timeout_s: int | None = None,
) -> None:
    """Join JAX's multi-process runtime (``jax.distributed``); harmless when repeated.

    Arguments left ``None`` are read from the ``SPMD_*`` variables ``spmd-launch`` sets (see
    :mod:`spmd.envs`); with none of those either, ``jax.distributed.initialize`` detects SLURM or
    Open MPI when one of them started several processes, and otherwise the job is a single
    process and there is nothing to start.

    The coordination service binds to the coordinator's own address when that is a loopback
    address (one host), and to every interface only when a non-loopback address was given.
    gloo (the CPU collectives across processes) binds to and advertises this host's address
    (:func:`spmd.net.host_address`): ``SPMD_HOST_ADDRESS`` when set, else the local address of the
    route to the coordinator, else the hostname; loopback when the coordinator is on loopback. A
    multi-process job that may run on NVIDIA GPUs (a CUDA plugin installed, not excluded by
    ``JAX_PLATFORMS``) gets ``--xla_gpu_shard_autotuning=false`` in ``XLA_FLAGS`` unless it sets
    the flag already: the custom all-reduce's cross-process peer buffers need it.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: processes in the job.
      process_id: this process's index.
      local_device_ids: the local accelerators this process drives (e.g. ``[0]``).
      cpu_devices_per_process: run on CPU with this many devices per process, gloo between processes.
      timeout_s: seconds to wait for every process to join.

    Raises:
      ValueError: this host's address is a loopback one while the coordinator is not (the other
        hosts would dial themselves; set ``SPMD_HOST_ADDRESS``), or ``coordinator_address`` is not
        ``host:port``.
      RuntimeError: JAX already started its backend in this process (an array was made or a
        computation ran), so devices can no longer be configured or a job joined; the coordination
        service did not come up within ``timeout_s`` (processes other than 0 wait for it); or joining failed.
    """
    if _Joined.done:
        return
    env = SpmdEnv.from_environ()
    coordinator_address = coordinator_address or env.coordinator_address
    num_processes = env.num_processes if num_processes is None else num_processes
    process_id = env.process_id if process_id is None else process_id
    if local_device_ids is None:
        local_device_ids = env.local_device_ids
    cpu = env.cpu_devices_per_process if cpu_devices_per_process is None else cpu_devices_per_process
    timeout = env.init_timeout_s if timeout_s is None else timeout_s
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    multi = explicit or env.cluster_launched
    if (multi or cpu) and compat.backends_started():
        raise RuntimeError(
            "init_distributed_environment: JAX has already started its backend in this process (an array "
            "was created or a computation ran), so it can no longer "
            + ("join a multi-process job" if multi else f"set {cpu} CPU devices")
            + ". Call spmd.init_distributed_environment() first, before any JAX computation."
        )
    if cpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if multi and not cpu and _cuda_possible():
        _no_sharded_autotuning()
    address = None
    if multi and coordinator_address is not None:  # before joining: a host that others cannot reach fails here
        address = net.host_address(coordinator_address, env.host_address)
    if multi:
        started = time.monotonic()
        if coordinator_address is not None and process_id:  # it may start before process 0: wait, bounded
            _wait_for_coordinator(coordinator_address, timeout)
        left = max(1, round(timeout - (time.monotonic() - started)))
        kwargs: dict[str, Any] = {"initialization_timeout": left}
        if explicit:
            kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
            if coordinator_address is not None and _is_loopback(coordinator_address):
                kwargs["coordinator_bind_address"] = coordinator_address
        if local_device_ids is not None and not cpu:
            kwargs["local_device_ids"] = list(local_device_ids)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:
            raise RuntimeError(
                f"init_distributed_environment: could not join the job (coordinator {coordinator_address}, "
                f"process {process_id} of {num_processes}, timeout {timeout} s): {type(e).__name__}: {e}"
            ) from e
        if coordinator_address is None:  # SLURM / Open MPI: JAX found the coordinator
            address = job_host_address(env.host_address)
        _gloo_address(address, compat.coordinator_address() or coordinator_address)
    _Joined.done = True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until the coordination service at ``address`` accepts connections (process 0 may start later).

    JAX's own client ends the process (SIGABRT, in C++) when the service is not there in time; this
    wait turns that into an error that says what to do.

    Raises:
      RuntimeError: nothing listened there within ``timeout_s``.
    """
    host, port = net.split_host_port(address, what="the coordinator address")
    last = net.wait_until_listening(host, port, timeout_s)
    if last is not None:
        raise RuntimeError(
            f"init_distributed_environment: the coordination service at {address} (process 0 serves it) did not "
            f"accept connections within {timeout_s:g} s (last: {last}). Start process 0 (on node 0: spmd-launch "
            f"--node-rank 0), check that this host reaches {host} (routes, firewall), or raise SPMD_INIT_TIMEOUT_S "
            f"(spmd-launch --timeout)."
        )


def _gloo_address(address: net.HostAddress | None, coordinator: str | None) -> None:
    """Give gloo this host's address: ``address.advertise``, or the coordinator's loopback host on one host."""
    if address is not None:
        host = address.advertise
    elif coordinator is not None and net.is_loopback(coordinator.rpartition(":")[0].strip("[]")):
        host = coordinator.rpartition(":")[0].strip("[]")
        host = "127.0.0.1" if host.lower().startswith("localhost") else host
    else:
        return
    compat.gloo_on_address(host)
