"""Run an SPMD job as Ray actors, one per process, the way vLLM's Ray executor runs its workers.

    import spmd.ray

    def step(scale):                       # runs in every process
        spmd.init_distributed_environment()  # reads the SPMD_* variables set below
        ...
        return jax.process_index() * scale

    spmd.ray.run(step, 10, num_processes=4)             # one GPU per process: [0, 10, 20, 30]
    spmd.ray.run(step, 10, num_processes=2, cpu_devices_per_process=2)   # CPU, gloo

How :func:`run` works:

1. it reserves a placement group with one bundle per process (``{"CPU": 1, "GPU": G}``, or
   ``{"CPU": 1}`` for simulated CPU devices, plus ``resources``), packed on one node or spread
   across nodes as ``placement_strategy`` asks, and waits until Ray has placed it;
2. it numbers the processes node by node (the bundles on the first bundle's node first), so the
   ranks of one node are contiguous, as ``spmd-launch --nnodes`` numbers them;
3. it starts one actor per bundle. Every actor is a fresh worker process whose environment holds
   the ``SPMD_*`` variables that ``spmd-launch`` gives a process (see :mod:`spmd.envs`), so
   ``spmd.init_distributed_environment()`` inside ``fn`` works unchanged; JAX has not started a
   backend in it. Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's own GPUs;
4. it asks rank 0's actor for a free port on its node: the coordinator address is a loopback one
   when every actor is on one node (the coordination service then binds to loopback only), and
   rank 0's node IP when the actors span several nodes;
5. it calls ``fn(*args, **kwargs)`` on every actor (arguments and results travel through Ray's
   object store) and returns the results in rank order.

Failures end the job the way ``spmd-launch`` ends it: the first rank to fail (an exception,
``sys.exit(n != 0)``, or its actor dying: killed, out of memory, node lost) is named in a
:class:`RankError` that carries the remote traceback, and every other actor is killed; past
``timeout_s`` the actors are killed and :class:`TimeoutError` is raised; Ctrl-C (or any
exception) in the driver kills them too. The placement group is removed on every path.

``spmd-launch --backend ray --nproc N script.py`` runs a script this way (see :mod:`spmd.launch`).
Ray is an optional dependency (``pip install 'spmd-distributed[ray]'``); ``import spmd`` never
imports it, and this module imports it only when a function here is called.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spmd._launch_runner import exit_code_of, flush, run_target, user_traceback
from spmd.net import free_port

__all__ = ["RankError", "init_cluster", "run", "run_script"]

_log = logging.getLogger(__name__)
_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
_JOB_WIDE = ("SPMD_COLLECTIVE_TIMEOUT_S", "SPMD_HOST_MAX_BYTES", "SPMD_INIT_TIMEOUT_S")  # forwarded from the driver
_POLL_S = 0.2
_KILL_WAIT_S = 10.0  # how long run() waits for killed actors to be gone
_PLACEMENT_NOTE_S = 30.0  # how often a placement group that does not fit is reported


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "spmd.ray needs Ray, which is not installed. To fix this: pip install 'spmd-distributed[ray]'"
        ) from None
    return ray


class RankError(RuntimeError):
    """A rank of a :func:`run` job failed; the others were stopped.

    Attributes:
      rank: the first rank to fail (by the time the driver saw it).
      exit_code: the code ``spmd-launch`` would exit with for this rank: 1 for an uncaught
        exception, ``n`` for ``sys.exit(n)``, ``None`` when the actor died (killed, node lost).
      remote_traceback: the rank's traceback, as its process formatted it (``None`` when it died).
    """

    def __init__(self, message: str, *, rank: int, exit_code: int | None, remote_traceback: str | None) -> None:
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code
        self.remote_traceback = remote_traceback


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What one rank's call came to (built in the actor, read by the driver)."""

    ok: bool
    value: Any = None
    what: str = ""  # "raised ValueError: boom" / "exited with code 3"
    exit_code: int = 0
    traceback: str | None = None


class _Rank:
    """One process of the job, as a Ray actor (made a Ray actor class by :func:`run`)."""

    def __init__(self, rank: int) -> None:
        from spmd import compat

        self._rank = rank
        if compat.backends_started():  # a reused worker process: it can no longer join a job
            raise RuntimeError(
                f"spmd.ray: rank {rank}'s Ray worker process has already started JAX's backend, so it cannot "
                "join the job. Ray reused a worker that ran JAX code before; run the job in fresh actors."
            )

    def __repr__(self) -> str:  # Ray prefixes the actor's output with this: "(rank 1 pid=...)"
        return f"rank {self._rank}"

    def node(self) -> tuple[str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def coordinator(self, loopback: bool) -> str:
        import ray

        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        return f"{host}:{free_port(host)}"

    def call(self, env: Mapping[str, str], task: tuple[Callable, tuple, dict]) -> _Outcome:
        """Set the rank's last variables, run ``fn``; failures come back as an outcome, not a raise."""
        os.environ.update(env)
        fn, args, kwargs = task
        try:
            return _Outcome(ok=True, value=fn(*args, **kwargs))
        except SystemExit as e:
            code = exit_code_of(e)
            if code == 0:
                return _Outcome(ok=True)
            message = None if isinstance(e.code, int) else str(e.code)  # sys.exit("message")
            return _Outcome(ok=False, what=f"exited with code {code}", exit_code=code, traceback=message)
        except BaseException as e:
            tb = user_traceback(e.__traceback__, run_script.__code__.co_filename)
            text = "".join(traceback.format_exception(type(e), e, tb))
            return _Outcome(ok=False, what=f"raised {type(e).__name__}: {e}", exit_code=1, traceback=text)
        finally:
            flush()


def run_script(target: str, script_args: Sequence[str] = (), *, module: bool = False, cwd: str | None = None) -> None:
    """Run a script (or ``-m`` module) in this process as ``python SCRIPT ARGS...`` would.

    What ``spmd-launch --backend ray`` runs in each actor: ``__name__ == "__main__"``, the same
    ``sys.argv``, the script's directory (the working directory for ``-m``) as ``sys.path[0]``,
    and ``cwd`` (the launcher's working directory) as the working directory when it exists here.
    """
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    run_target(target, script_args, module=module)


def init_cluster(address: str | None = None) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS, or a running local one), else start one here."""
    ray = _ray()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return
    try:
        ray.init(address="auto")
    except ConnectionError:  # no cluster is running: a local one, for this job alone
        ray.init(include_dashboard=False)


def _bundle(devices: int | None, cpu_devices: int | None, resources: Mapping[str, float] | None) -> dict[str, float]:
    bundle: dict[str, float] = {"CPU": 1.0}
    if cpu_devices is None:
        bundle["GPU"] = float(1 if devices is None else devices)
    bundle.update(resources or {})
    return {k: v for k, v in bundle.items() if v}


def _check(num_processes, devices, cpu_devices, resources, timeout_s, strategy) -> None:
    def positive_int(name, v, fix):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"spmd.ray.run: {name} must be a positive integer, got {v!r}. {fix}")

    positive_int("num_processes", num_processes, "Pass the number of processes, e.g. num_processes=4.")
    if devices is not None:
        positive_int("devices_per_process", devices, "Pass the GPUs each process drives, e.g. 1.")
    if cpu_devices is not None:
        positive_int("cpu_devices_per_process", cpu_devices, "Pass the simulated CPU devices per process, e.g. 2.")
        if devices is not None:
            raise ValueError(
                "spmd.ray.run: got both devices_per_process (GPUs) and cpu_devices_per_process (simulated CPU "
                "devices); pass one of them."
            )
    for k, v in (resources or {}).items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"spmd.ray.run: resources[{k!r}] must be a non-negative number, got {v!r}.")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"spmd.ray.run: timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if strategy not in _STRATEGIES:
        raise ValueError(f"spmd.ray.run: placement_strategy must be one of {_STRATEGIES}, got {strategy!r}.")


def _rank_order(bundle_nodes: Mapping[int, str], n: int) -> list[int]:
    """Bundle index of each rank: node by node (in order of each node's first bundle), then by bundle."""
    first: dict[str, int] = {}
    for b in range(n):
        first.setdefault(bundle_nodes[b], b)
    return sorted(range(n), key=lambda b: (first[bundle_nodes[b]], b))


def _rank_envs(nodes: Sequence[str], cpu_devices: int | None, timeout_s: float | None, extra) -> list[dict[str, str]]:
    """The ``SPMD_*`` environment of each rank (all but the coordinator address), in rank order."""
    envs = []
    for rank, node in enumerate(nodes):
        same = [r for r, other in enumerate(nodes) if other == node]
        env = {k: os.environ[k] for k in _JOB_WIDE if os.environ.get(k)}
        env.update(
            SPMD_NUM_PROCESSES=str(len(nodes)),
            SPMD_PROCESS_ID=str(rank),
            SPMD_LOCAL_RANK=str(same.index(rank)),
            SPMD_LOCAL_WORLD_SIZE=str(len(same)),
            SPMD_LOCAL_DEVICE_IDS="",  # Ray's CUDA_VISIBLE_DEVICES already narrows each actor to its GPUs
            SPMD_CPU_DEVICES_PER_PROCESS=str(cpu_devices or ""),
            PYTHONUNBUFFERED="1",
        )
        if cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
        if timeout_s is not None:
            env.setdefault("SPMD_INIT_TIMEOUT_S", str(max(1, int(timeout_s))))
        env.update(extra or {})
        envs.append(env)
    return envs


class _Deadline:
    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> float | None:
        return None if self._end is None else self._end - time.monotonic()

    def step(self) -> float:
        left = self.left()
        return _POLL_S if left is None else max(0.0, min(_POLL_S, left))

    def passed(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def _reserve(ray, bundle: dict[str, float], n: int, strategy: str, deadline: _Deadline):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([dict(bundle)] * n, strategy=strategy, name=f"spmd-{os.getpid()}-{time.time_ns()}")
    try:
        ready = pg.ready()
        waited = 0.0
        while not ray.wait([ready], timeout=deadline.step())[0]:
            if deadline.passed():
                raise TimeoutError(
                    f"spmd.ray.run: timed out after {deadline.timeout_s:g} s waiting for Ray to place {n} bundles "
                    f"of {bundle} ({strategy}); the cluster has {ray.available_resources()} available of "
                    f"{ray.cluster_resources()}. Ask for fewer processes or resources, or add nodes."
                )
            waited += _POLL_S
            if waited >= _PLACEMENT_NOTE_S:
                waited = 0.0
                _log.warning("spmd.ray.run: still waiting for Ray to place %d bundles of %s (%s)", n, bundle, strategy)
    except BaseException:
        remove_placement_group(pg)
        raise
    return pg


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie waits only for its reaper
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _stop(ray, actors: Sequence[Any], local_pids: Sequence[int]) -> None:
    """Kill every actor (rank 0, the coordinator, last) and wait, bounded, until each is gone.

    Ray marks a killed actor dead before its process has exited; the processes on this node are
    waited for too, so that the next job on the same GPUs finds their memory free.
    """
    for a in reversed(actors):
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone
            pass
    end = time.monotonic() + _KILL_WAIT_S
    for ping in [a.node.remote() for a in actors]:
        try:
            ray.get(ping, timeout=max(0.1, end - time.monotonic()))
        except Exception:  # RayActorError: it is dead, which is what we wait for
            pass
    while not all(_gone(p) for p in local_pids) and time.monotonic() < end:
        time.sleep(0.02)


def _died(rank: int, err: Exception) -> str:
    """``rank N's Ray actor died (...)`` with the gist of Ray's (long) explanation."""
    text = " ".join(str(err).split())
    kind = text.split("Worker exit type: ", 1)[1].split()[0] if "Worker exit type: " in text else None
    detail = text.split("Worker exit detail: ", 1)[1] if "Worker exit detail: " in text else text
    detail = detail.split(" Some common causes", 1)[0][:200]
    return f"rank {rank}'s Ray actor died ({f'{kind}: ' if kind else ''}{detail})"


def run(
    fn: Callable[..., Any],
    *args: Any,
    num_processes: int,
    devices_per_process: int | None = None,
    cpu_devices_per_process: int | None = None,
    resources: Mapping[str, float] | None = None,
    placement_strategy: str = "PACK",
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``num_processes`` Ray actors that form one SPMD job.

    Connects to Ray with ``ray.init()`` when this process has not (a running cluster, else a new
    local one). See the module docstring for the steps and :mod:`spmd.envs` for the environment.

    Args:
      fn: what every process runs; it calls ``spmd.init_distributed_environment()`` first.
        Pickled by Ray (cloudpickle), so a function of an importable module, or a closure.
      *args, **kwargs: passed to ``fn`` on every rank, through Ray's object store.
      num_processes: processes (actors) in the job.
      devices_per_process: GPUs per process (Ray's ``GPU`` resource; default 1).
      cpu_devices_per_process: run on CPU instead, with this many simulated devices per process
        (gloo between processes); each process then reserves 1 CPU and no GPU.
      resources: per-process Ray resources added to (or overriding) the bundle, e.g.
        ``{"CPU": 8}`` or ``{"TPU": 4, "GPU": 0}``.
      placement_strategy: Ray's placement-group strategy: ``"PACK"`` (one node when it fits),
        ``"STRICT_PACK"`` (one node, or wait), ``"SPREAD"``, ``"STRICT_SPREAD"`` (one per node).
      env: more environment variables for every process (they override the ``SPMD_*`` ones).
      timeout_s: seconds the whole run may take, placement included.

    Returns:
      ``[fn's result on rank 0, on rank 1, ...]``.

    Raises:
      RankError: a rank raised, exited non-zero, or its actor died; the others were stopped.
      TimeoutError: ``timeout_s`` passed (placing the bundles or running ``fn``); the actors were stopped.
      ValueError: a bad argument (nothing was started).
      ImportError: Ray is not installed.
    """
    _check(num_processes, devices_per_process, cpu_devices_per_process, resources, timeout_s, placement_strategy)
    ray = _ray()
    from ray.util.placement_group import placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    deadline = _Deadline(timeout_s)
    if not ray.is_initialized():
        ray.init()
    bundle = _bundle(devices_per_process, cpu_devices_per_process, resources)
    n = num_processes
    pg = _reserve(ray, bundle, n, placement_strategy, deadline)
    actors: list[Any] = []
    local_pids: list[int] = []
    try:
        bundle_nodes = {int(b): node for b, node in placement_group_table(pg)["bundles_to_node_id"].items()}
        order = _rank_order(bundle_nodes, n)
        nodes = [bundle_nodes[b] for b in order]
        envs = _rank_envs(nodes, cpu_devices_per_process, timeout_s, env)
        actor_cls = ray.remote(max_restarts=0)(_Rank)
        extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        for rank, b in enumerate(order):
            actors.append(
                actor_cls.options(
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    resources=extra,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b),
                    runtime_env={"env_vars": envs[rank]},
                ).remote(rank)
            )
        here = ray.get_runtime_context().get_node_id()
        started = _collect(ray, {a.node.remote(): r for r, a in enumerate(actors)}, deadline, "starting")
        local_pids.extend(pid for node, pid in started.values() if node == here)
        loopback = len(set(nodes)) == 1
        coordinator = _collect(ray, {actors[0].coordinator.remote(loopback): 0}, deadline, "starting")[0]
        payload = ray.put((fn, args, kwargs))  # once into the object store, read by every actor
        env_last = {"SPMD_COORDINATOR_ADDRESS": coordinator}
        results = _collect(
            ray, {a.call.remote(env_last, payload): r for r, a in enumerate(actors)}, deadline, "running"
        )
        return [results[r].value for r in range(n)]
    finally:
        try:
            _stop(ray, actors, local_pids)
        finally:  # even when a second Ctrl-C cuts the stop short
            remove_placement_group(pg)


def _collect(ray, pending: dict[Any, int], deadline: _Deadline, doing: str) -> dict[int, Any]:
    """Every rank's value of ``pending`` (object ref -> rank); the first failure or the deadline raises."""
    pending = dict(pending)
    values: dict[int, Any] = {}
    while pending:
        if deadline.passed():
            raise TimeoutError(
                f"spmd.ray.run: timed out after {deadline.timeout_s:g} s; ranks {sorted(set(pending.values()))} "
                f"were still {doing}; stopped every rank"
            )
        done, _ = ray.wait(list(pending), num_returns=1, timeout=deadline.step())
        for ref in done:
            rank = pending.pop(ref)
            others = _others(pending.values(), rank)
            try:
                got = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise RankError(_died(rank, e) + others, rank=rank, exit_code=None, remote_traceback=None) from None
            except ray.exceptions.RayError as e:  # e.g. a result that Ray cannot pickle
                text = str(e)
                first = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
                raise RankError(
                    f"rank {rank} failed: {first}{others}\n{text}", rank=rank, exit_code=1, remote_traceback=text
                ) from None
            if isinstance(got, _Outcome) and not got.ok:
                tb = f"\n{got.traceback}" if got.traceback else ""
                raise RankError(
                    f"rank {rank} {got.what}{others}{tb}",
                    rank=rank,
                    exit_code=got.exit_code,
                    remote_traceback=got.traceback,
                )
            values[rank] = got
    return values


def _others(ranks, failed: int) -> str:
    others = sorted(set(ranks) - {failed})
    return f"; stopped ranks {others}" if others else ""
