"""spmd.ray: an SPMD job as Ray actors, and ``spmd-launch --backend ray``.

One local Ray instance serves the whole module (4 CPUs, no dashboard); the command-line tests
join it with ``--ray-address``. Every job is 2 actors x 2 simulated CPU devices. After each test,
no actor of the job may be alive and no placement group left.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import spmd.ray  # noqa: E402

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_CPUS = 4


def _clean_env() -> dict[str, str]:
    """The test session's environment without its 8-device JAX settings (the ranks set their own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES")}
    env["SPMD_COLLECTIVE_TIMEOUT_S"] = "60"
    return env


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module; its workers start without the session's XLA_FLAGS."""
    removed = {k: os.environ.pop(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES") if k in os.environ}
    try:
        ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.update(removed)  # what ray.init added (its auth token) stays, for the command-line tests
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable in the actors
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _running(pid: int) -> bool:
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _leftovers() -> list[str]:
    """What a finished job left behind in the cluster: live placement groups, live actors, CPUs in use."""
    left = [f"placement group {k} {v['state']}" for k, v in ray.util.placement_group_table().items()]
    left = [x for x in left if not x.endswith("REMOVED")]
    try:
        from ray._private import state

        left += [f"actor {k} {v['State']}" for k, v in state.actors().items() if v.get("State") != "DEAD"]
    except (ImportError, AttributeError, KeyError):  # a Ray without this private table: the CPUs still tell
        pass
    if ray.available_resources().get("CPU", 0) != NUM_CPUS:
        left.append(f"CPUs in use: {ray.available_resources().get('CPU', 0)} of {NUM_CPUS} free")
    return left


@pytest.fixture
def ray_job(cluster):
    """Checks that the test's jobs left no actor, placement group or CPU reservation behind."""
    yield cluster
    deadline = time.monotonic() + 10
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers() == []


def _pids(tmp_path: pathlib.Path, n: int = 2) -> list[int]:
    """The pids the ranks wrote (a rank stopped while still starting wrote none)."""
    files = [tmp_path / f"pid.{r}" for r in range(n)]
    return [int(f.read_text()) for f in files if f.exists() and f.read_text()]


# --- what the actors run -------------------------------------------------------------------------------


def job_collectives(seed: int, out: str) -> dict:
    """Cross-process all-reduce (TP over 4 devices in 2 processes) and broadcast_tensor_dict."""
    import spmd

    spmd.init_distributed_environment()
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    pathlib.Path(out, f"pid.{jax.process_index()}").write_text(str(os.getpid()))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((jax.device_count(), 3, 5)).astype(np.float32)
    config = {"max_seq_len": 4096, "w": rng.standard_normal((4, 3)).astype(np.float32), "names": ["q", "k"]}
    got = spmd.broadcast_tensor_dict(config if jax.process_index() == 0 else None, src=0)
    mesh = spmd.initialize_model_parallel(tensor_model_parallel_size=jax.device_count())
    spec = P(spmd.MESH_AXES)
    xs = jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
    f = jax.jit(
        spmd.shard_map(lambda v: spmd.tensor_model_parallel_all_reduce(v[0])[None], in_specs=spec, out_specs=spec)
    )
    ar = np.asarray(multihost_utils.process_allgather(f(xs), tiled=True))
    return {
        "process": jax.process_index(),
        "devices": (jax.local_device_count(), jax.device_count()),
        "all_reduce": ar,
        "dict": {"max_seq_len": got["max_seq_len"], "w": np.asarray(got["w"]), "names": got["names"]},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("SPMD_", "XLA_FLAGS", "JAX_PLATFORMS"))},
        "pid": os.getpid(),
    }


def job_fails(mode: str, out: str) -> None:
    """Rank 1 fails while rank 0 waits for it in a barrier."""
    import spmd
    import spmd.host

    spmd.init_distributed_environment()
    import jax

    pathlib.Path(out, f"pid.{jax.process_index()}").write_text(str(os.getpid()))
    if jax.process_index() == 1:
        time.sleep(0.5)  # rank 0 is in the barrier by now
        if mode == "raise":
            raise ValueError("boom from rank 1")
        if mode == "exit3":
            sys.exit(3)
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        time.sleep(60)
    spmd.host.barrier(timeout_s=60)


# --- the API -----------------------------------------------------------------------------------------


def test_collectives_and_broadcast_tensor_dict_across_actors(ray_job, tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    results = spmd.ray.run(job_collectives, seed, str(tmp_path), num_processes=2, cpu_devices_per_process=2)
    rng = np.random.default_rng(seed)  # the reference: the same draws as every rank, summed densely
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    assert [r["process"] for r in results] == [0, 1]  # rank order
    coordinators = set()
    for rank, r in enumerate(results):
        assert r["devices"] == (2, 4)
        np.testing.assert_allclose(r["all_reduce"], np.broadcast_to(x.sum(0), x.shape), rtol=1e-5, atol=1e-5)
        assert r["dict"]["max_seq_len"] == 4096 and r["dict"]["names"] == ["q", "k"]
        np.testing.assert_array_equal(r["dict"]["w"], w)
        env = r["env"]
        assert env["SPMD_PROCESS_ID"] == str(rank) and env["SPMD_NUM_PROCESSES"] == "2"
        assert env["SPMD_LOCAL_RANK"] == str(rank) and env["SPMD_LOCAL_WORLD_SIZE"] == "2"
        assert env["SPMD_CPU_DEVICES_PER_PROCESS"] == "2" and env["JAX_PLATFORMS"] == "cpu"
        assert "XLA_FLAGS" not in env  # the driver's 8-device flag did not leak into the actors
        coordinators.add(env["SPMD_COORDINATOR_ADDRESS"])
    (coordinator,) = coordinators
    assert coordinator.startswith("127.0.0.1:")  # one node: the coordination service stays on loopback
    assert [_running(p) for p in _pids(tmp_path)] == [False, False]  # the actors are gone on return


@pytest.mark.parametrize(
    "mode,match,code",
    [
        ("raise", r"rank 1 raised ValueError: boom from rank 1; stopped ranks \[0\]", 1),
        ("exit3", r"rank 1 exited with code 3; stopped ranks \[0\]", 3),
        ("sigkill", r"rank 1's Ray actor died \(.*\); stopped ranks \[0\]", None),
    ],
)
def test_a_failing_rank_is_named_and_the_others_are_stopped(ray_job, tmp_path, mode, match, code):
    t0 = time.monotonic()
    with pytest.raises(spmd.ray.RankError, match=match) as info:
        spmd.ray.run(job_fails, mode, str(tmp_path), num_processes=2, cpu_devices_per_process=2, timeout_s=60)
    assert time.monotonic() - t0 < 30
    assert info.value.rank == 1 and info.value.exit_code == code
    if mode == "raise":
        tb = info.value.remote_traceback
        assert "Traceback (most recent call last)" in tb and "in job_fails" in tb, tb
        assert "spmd/ray.py" not in tb and "runpy" not in tb  # only the user's frames
    assert [_running(p) for p in _pids(tmp_path)] == [False, False]  # rank 0 was stopped, not left waiting


def job_hangs(out: str) -> None:
    pathlib.Path(out, f"pid.{os.environ['SPMD_PROCESS_ID']}").write_text(str(os.getpid()))
    time.sleep(60)


def test_timeout_stops_every_rank(ray_job, tmp_path):
    t0 = time.monotonic()
    # Which ranks are named depends on how far each got in 4 s (a loaded machine: one may still be starting).
    pattern = r"timed out after 4 s; ranks \[(0, 1|0|1)\] were still (running|starting); stopped every rank"
    with pytest.raises(TimeoutError, match=pattern):
        spmd.ray.run(job_hangs, str(tmp_path), num_processes=2, cpu_devices_per_process=2, timeout_s=4)
    assert time.monotonic() - t0 < 12
    assert not any(_running(p) for p in _pids(tmp_path))


def test_a_placement_that_cannot_be_met_times_out(ray_job):
    with pytest.raises(TimeoutError, match=r"waiting for Ray to place 2 bundles of \{'CPU': 1.0, 'GPU': 1.0\}"):
        spmd.ray.run(job_fails, "hang", ".", num_processes=2, timeout_s=1.5)  # GPUs, on a cluster without any


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_processes": 0}, "num_processes must be a positive integer, got 0"),
        ({"num_processes": 2, "devices_per_process": 1, "cpu_devices_per_process": 2}, "pass one of them"),
        ({"num_processes": 2, "placement_strategy": "pack"}, "placement_strategy must be one of"),
        ({"num_processes": 2, "timeout_s": -1}, "timeout_s must be a positive number"),
        ({"num_processes": 2, "resources": {"GPU": -1}}, r"resources\['GPU'\] must be a non-negative number"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spmd.ray.run(job_fails, "hang", ".", **kwargs)


# --- spmd-launch --backend ray -------------------------------------------------------------------------


def _launch(address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spmd.launch", "--backend", "ray", "--ray-address", address, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "script,expect",
    [
        (["tests/workers/mp_worker.py", "collectives"], "OK collectives"),
        (
            ["docs/examples/multi_process.py"],
            "broadcast_tensor_dict ok: max_seq_len=4096, layer1.weight bfloat16[8, 4]",
        ),
    ],
    ids=["mp_worker", "docs-example"],
)
def test_spmd_launch_backend_ray_runs_the_multiprocess_scripts(ray_job, script, expect):
    r = _launch(ray_job, "--nproc", "2", "--cpu-devices-per-process", "2", "--timeout", "90", *script)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert expect in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]


RANKS = textwrap.dedent(
    """
    import os, pathlib, sys, time
    import spmd, spmd.host
    spmd.init_distributed_environment()
    import jax
    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    (out / f"pid.{jax.process_index()}").write_text(str(os.getpid()))
    assert __name__ == "__main__" and sys.argv[0].endswith("ranks.py"), (__name__, sys.argv)
    if jax.process_index() == 1 and mode != "hang":
        time.sleep(0.5)
        if mode == "raise":
            raise ValueError("boom from rank 1")
        sys.exit(int(mode))
    if mode == "hang":
        time.sleep(60)
    spmd.host.barrier(timeout_s=60)
    """
)


@pytest.mark.parametrize(
    "mode,code,message",
    [
        ("raise", 1, "spmd-launch: rank 1 raised ValueError: boom from rank 1; stopped ranks [0]"),
        ("3", 3, "spmd-launch: rank 1 exited with code 3; stopped ranks [0]"),
        ("hang", 124, "spmd-launch: timed out after 6 s; ranks [0, 1] were still"),
    ],
)
def test_spmd_launch_backend_ray_exit_codes(ray_job, tmp_path, mode, code, message):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    r = _launch(
        ray_job,
        "--nproc",
        "2",
        "--cpu-devices-per-process",
        "1",
        "--timeout",
        "6" if mode == "hang" else "60",
        str(script),
        str(tmp_path),
        mode,
    )
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-3000:]
    assert message in r.stderr, r.stderr[-3000:]
    if mode == "raise":
        assert "[rank 1] ValueError: boom from rank 1" in r.stdout
        assert "spmd/ray.py" not in r.stdout and "runpy" not in r.stdout
    assert not any(_running(p) for p in _pids(tmp_path))


def test_spmd_launch_backend_ray_ctrl_c_stops_every_rank(ray_job, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    cmd = [sys.executable, "-m", "spmd.launch", "--backend", "ray", "--ray-address", ray_job, "--nproc", "2"]
    cmd += ["--cpu-devices-per-process", "1", str(script), str(tmp_path), "hang"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid.{r}").exists() for r in range(2)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        pids = _pids(tmp_path)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "spmd-launch: interrupted; stopped every rank" in err
    assert [_running(pid) for pid in pids] == [False, False]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--nproc", "2", "--nnodes", "2", "x.py"], "--nnodes is for --backend local"),
        (["--nproc", "2", "--coordinator", "h:1", "x.py"], "--coordinator is for --backend local"),
        (["x.py"], "--nproc N is required with --backend ray"),
        (["--nproc", "0", "x.py"], "--nproc must be a positive integer, got 0"),
        (
            ["--nproc", "2", "--devices-per-process", "1", "--cpu-devices-per-process", "2", "x.py"],
            "exclude each other",
        ),
    ],
)
def test_spmd_launch_backend_ray_bad_arguments(args, match):
    cmd = [sys.executable, "-m", "spmd.launch", "--backend", "ray", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and match in r.stderr, r.stderr


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError, match=r"pip install 'spmd-distributed\[ray\]'"):
        spmd.ray.run(job_hangs, ".", num_processes=2, cpu_devices_per_process=2)


def test_import_spmd_does_not_import_ray():
    code = "import sys, spmd, spmd.launch; assert 'ray' not in sys.modules, 'import spmd imported ray'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
