"""Environment variables, read in one place.

``spmd-launch`` sets these for each process it starts; a job started some other way (by hand,
by SLURM, by Open MPI) may set them itself or leave them unset and let
``jax.distributed.initialize`` detect the cluster.

| variable | meaning |
|---|---|
| ``SPMD_COORDINATOR_ADDRESS`` | ``host:port`` of the coordination service (process 0 serves it) |
| ``SPMD_NUM_PROCESSES`` | processes in the whole job, all hosts together |
| ``SPMD_PROCESS_ID`` | this process's index, ``0 <= id < SPMD_NUM_PROCESSES`` |
| ``SPMD_LOCAL_RANK`` | this process's index on its host |
| ``SPMD_LOCAL_WORLD_SIZE`` | processes on this host |
| ``SPMD_LOCAL_DEVICE_IDS`` | comma-separated local accelerator ids this process drives (e.g. ``0``) |
| ``SPMD_CPU_DEVICES_PER_PROCESS`` | run on CPU with this many simulated devices per process (gloo across processes) |
| ``SPMD_INIT_TIMEOUT_S`` | seconds to wait for every process to join (default 300) |
| ``SPMD_COLLECTIVE_TIMEOUT_S`` | seconds any host-level wait may block, every side (default 300; float) |
| ``SPMD_HOST_MAX_BYTES`` | most bytes of arrays (or of JSON tree) one host-level message may carry (default 4 GiB) |
| ``SPMD_HOST_TRANSPORT`` | host-level messages over ``auto`` (default), ``tcp`` or ``store``; the same everywhere |
| ``SPMD_HOST_ADDRESS`` | this host's address, reachable by the others: gloo and the host-level connections use it |
| ``SPMD_ALLOW_WILDCARD_HOST_ADDRESS`` | ``1``: ``SPMD_HOST_ADDRESS`` may be a wildcard (``0.0.0.0``, ``::``) |

Also read: ``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE``, ``PMI_SIZE`` (a cluster manager started
several processes: ``jax.distributed.initialize`` then finds the coordinator itself).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping

from spmd.net import is_wildcard

__all__ = ["HOST_TRANSPORTS", "SpmdEnv", "host_env"]

_ALLOW_WILDCARD = "SPMD_ALLOW_WILDCARD_HOST_ADDRESS"

HOST_TRANSPORTS = ("auto", "tcp", "store")
"""Values of ``SPMD_HOST_TRANSPORT`` (see :mod:`spmd.host`)."""


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer.") from None


def _seconds(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"environment variable {name}={raw!r}: expected a positive number of seconds (e.g. 30 or 2.5)."
        )
    return value


def _positive_int(env: Mapping[str, str], name: str) -> int | None:
    value = _int(env, name)
    if value is not None and value < 1:
        raise ValueError(f"environment variable {name}={value}: expected a positive integer.")
    return value


def _ids(env: Mapping[str, str], name: str) -> tuple[int, ...] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return tuple(int(p) for p in raw.split(","))
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected comma-separated integers.") from None


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if raw.lower() not in choices:
        raise ValueError(f"environment variable {name}={raw!r}: expected one of {', '.join(choices)}.")
    return raw.lower()


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"environment variable {name}={env[name]!r}: expected 1 or 0 (true/false, yes/no, on/off).")


def _address(env: Mapping[str, str], name: str, *, allow_wildcard: bool) -> str | None:
    """A host name or IP address (IPv6 with or without brackets); a wildcard (``0.0.0.0``) only if allowed."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    host = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    if host in ("*", "") or (is_wildcard(host) and not allow_wildcard):
        raise ValueError(
            f"environment variable {name}={raw!r}: expected this host's address that the other processes can reach "
            f"(e.g. 10.0.0.5), not a wildcard: a wildcard listens on every interface, so every network this host "
            f"is on can reach the port. To listen on every interface all the same, also set "
            f"{_ALLOW_WILDCARD}=1 (the address the others dial is then chosen as without {name})."
        )
    return host


@dataclasses.dataclass(frozen=True)
class SpmdEnv:
    """The ``SPMD_*`` variables of one process, parsed."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_rank: int | None = None
    local_world_size: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_devices_per_process: int | None = None
    init_timeout_s: int = 300
    collective_timeout_s: float = 300.0
    host_max_bytes: int = 4 << 30
    host_transport: str = "auto"
    host_address: str | None = None
    cluster_launched: bool = False
    """SLURM, Open MPI or another PMI launcher started several processes (jax.distributed detects them)."""

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> SpmdEnv:
        env = os.environ if env is None else env
        init_timeout = _int(env, "SPMD_INIT_TIMEOUT_S")
        coll_timeout = _seconds(env, "SPMD_COLLECTIVE_TIMEOUT_S")
        host_max_bytes = _positive_int(env, "SPMD_HOST_MAX_BYTES")
        host_transport = _choice(env, "SPMD_HOST_TRANSPORT", HOST_TRANSPORTS)
        return cls(
            coordinator_address=env.get("SPMD_COORDINATOR_ADDRESS") or None,
            num_processes=_int(env, "SPMD_NUM_PROCESSES"),
            process_id=_int(env, "SPMD_PROCESS_ID"),
            local_rank=_int(env, "SPMD_LOCAL_RANK"),
            local_world_size=_int(env, "SPMD_LOCAL_WORLD_SIZE"),
            local_device_ids=_ids(env, "SPMD_LOCAL_DEVICE_IDS"),
            cpu_devices_per_process=_int(env, "SPMD_CPU_DEVICES_PER_PROCESS"),
            init_timeout_s=300 if init_timeout is None else init_timeout,
            collective_timeout_s=300.0 if coll_timeout is None else coll_timeout,
            host_max_bytes=(4 << 30) if host_max_bytes is None else host_max_bytes,
            host_transport=host_transport or "auto",
            host_address=_address(env, "SPMD_HOST_ADDRESS", allow_wildcard=_flag(env, _ALLOW_WILDCARD)),
            cluster_launched=any(
                (_int(env, name) or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
            ),
        )


_HOST_VARS = (
    "SPMD_COLLECTIVE_TIMEOUT_S",
    "SPMD_HOST_MAX_BYTES",
    "SPMD_HOST_TRANSPORT",
    "SPMD_HOST_ADDRESS",
    _ALLOW_WILDCARD,
)


def host_env() -> SpmdEnv:
    """The settings of host-level calls (:mod:`spmd.host`), from ``os.environ``; the other fields default.

    Every host-level call reads them: they are parsed again only when one of them changes.

    Raises:
      ValueError: a variable with a bad value (named, with what it expects).
    """
    return _host_env(tuple(os.environ.get(k) for k in _HOST_VARS))


@functools.lru_cache(maxsize=8)
def _host_env(raw: tuple[str | None, ...]) -> SpmdEnv:
    return SpmdEnv.from_environ({k: v for k, v in zip(_HOST_VARS, raw, strict=True) if v is not None})
