"""spmd-launch's process management: signals, the first failing rank, exit codes, the runner.

The signal tests use a plain script (no JAX) that ignores SIGTERM as JAX's preemption notifier
does; the failure tests run real JAX ranks, one of them waiting in ``spmd.host.barrier()``.
Every launch has a short ``--timeout`` and a subprocess timeout, so a regression fails instead
of hanging.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).parent.parent

PLAIN = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    out, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["SPMD_PROCESS_ID"])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as JAX's preemption notifier does
    (out / f"pid.{rank}").write_text(str(os.getpid()))
    if mode == "both_fail":  # rank 1 fails first, rank 0 0.2 s later
        marker = out / "rank1.failed"
        if rank == 1:
            marker.write_text("x")
            os._exit(3)
        while not marker.exists():
            time.sleep(0.001)
        time.sleep(0.2)
        sys.exit(5)
    elif mode == "argv":
        spmd_dir = os.path.join(ROOT_DIR, "spmd")
        print("argv", sys.argv, "name", __name__, "path0", sys.path[0], "spmd_dir_on_path", spmd_dir in sys.path)
    else:
        time.sleep(600)
    """
)

JAX_RANKS = textwrap.dedent(
    """
    import os, sys, time
    import spmd, spmd.host
    spmd.init_distributed_environment()
    import jax
    mode = sys.argv[1]
    if jax.process_index() == 1:
        time.sleep(1.0)  # rank 0 is in the barrier by now
        print("rank 1 fails:", mode, flush=True)
        if mode == "exit3":
            sys.exit(3)
        if mode == "raise":
            raise ValueError("boom from rank 1")
        if mode == "sigkill":
            os.kill(os.getpid(), 9)
    spmd.host.barrier(timeout_s=100)
    print("rank", jax.process_index(), "passed the barrier", flush=True)
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["SPMD_COLLECTIVE_TIMEOUT_S"] = "100"
    return env


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "spmd.launch", *args]


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for a reaper counts as gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_for_pids(tmp_path: pathlib.Path, n: int, launcher: subprocess.Popen, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = [tmp_path / f"pid.{r}" for r in range(n)]
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def _kill_leftovers(pids: list[int]) -> None:
    for p in pids:
        if _running(p):
            os.kill(p, signal.SIGKILL)


def _start_plain(tmp_path: pathlib.Path, mode: str = "sleep") -> subprocess.Popen:
    script = tmp_path / "plain.py"
    script.write_text(PLAIN.replace("ROOT_DIR", repr(str(ROOT))))
    return subprocess.Popen(
        _launcher("--nproc-per-node", "2", "--timeout", "60", str(script), str(tmp_path), mode),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_to_the_launcher_stops_every_rank(tmp_path, sig):
    launcher = _start_plain(tmp_path)
    pids = _wait_for_pids(tmp_path, 2, launcher)
    try:
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=20)
        assert launcher.returncode == 128 + sig, err
        assert f"spmd-launch: got {sig.name}; stopping every rank" in err
        assert _gone_within(pids, 1.0) == []
    finally:
        _kill_leftovers(pids)
        if launcher.poll() is None:
            launcher.kill()


def test_sigkill_to_the_launcher_ends_every_rank(tmp_path):
    launcher = _start_plain(tmp_path)
    pids = _wait_for_pids(tmp_path, 2, launcher)
    try:
        launcher.kill()
        launcher.communicate(timeout=20)
        assert _gone_within(pids, 5.0) == [], "ranks outlived a SIGKILLed launcher"
    finally:
        _kill_leftovers(pids)


def test_the_first_rank_to_fail_is_named_not_the_lowest_or_the_last(tmp_path):
    launcher = _start_plain(tmp_path, "both_fail")
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 3, err
    assert "spmd-launch: rank 1 exited with code 3" in err
    assert "rank 0 exited" not in err


@pytest.mark.parametrize(
    "mode,code,message",
    [
        ("exit3", 3, "spmd-launch: rank 1 exited with code 3; stopping ranks [0]"),
        ("raise", 1, "spmd-launch: rank 1 exited with code 1; stopping ranks [0]"),
        ("sigkill", 128 + 9, "spmd-launch: rank 1 was killed by SIGKILL; stopping ranks [0]"),
    ],
)
def test_a_failing_rank_ends_the_job_promptly_with_its_code(tmp_path, mode, code, message):
    """Rank 1 fails while rank 0 waits for it in a barrier: the job ends at once, naming rank 1."""
    script = tmp_path / "ranks.py"
    script.write_text(JAX_RANKS)
    t0 = time.monotonic()
    r = subprocess.run(
        _launcher("--nproc-per-node", "2", "--cpu-devices-per-process", "1", "--timeout", "60", str(script), mode),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == code, r.stdout[-3000:] + r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "rank 0 exited" not in r.stderr and "rank 0 was killed" not in r.stderr
    assert "passed the barrier" not in r.stdout
    assert elapsed < 45, f"took {elapsed:.0f} s"
    if mode == "raise":
        assert "[rank 1] ValueError: boom from rank 1" in r.stdout
        assert "_launch_runner" not in r.stdout and "runpy" not in r.stdout  # only the script's frames


@pytest.mark.parametrize(
    "args,match",
    [
        (["no_such_script.py"], "script 'no_such_script.py' (relative to"),
        (["-m", "no_such_module_spmd"], "no module named 'no_such_module_spmd'"),
        (["tests"], "'tests' (relative to"),
    ],
    ids=["missing-script", "missing-module", "directory"],
)
def test_a_target_that_cannot_run_is_refused_before_any_rank_starts(args, match):
    r = subprocess.run(
        _launcher("--nproc-per-node", "2", *args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    assert f"spmd-launch: {match}" in r.stderr
    assert "[rank" not in r.stdout + r.stderr


def test_the_runner_keeps_python_script_and_module_semantics(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN.replace("ROOT_DIR", repr(str(ROOT))))
    as_script = subprocess.run(
        _launcher("--nproc-per-node", "2", "--timeout", "60", str(script), str(tmp_path), "argv"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    env = _env()
    env["PYTHONPATH"] = str(tmp_path)
    as_module = subprocess.run(
        _launcher("--nproc-per-node", "1", "--timeout", "60", "-m", "plain", str(tmp_path), "argv"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    for r, nproc, path0 in ((as_script, 2, str(tmp_path)), (as_module, 1, str(ROOT))):
        assert r.returncode == 0, r.stdout + r.stderr
        argv = [str(script), str(tmp_path), "argv"]
        for rank in range(nproc):
            want = f"[rank {rank}] argv {argv} name __main__ path0 {path0} spmd_dir_on_path False"
            assert want in r.stdout, r.stdout


def test_excepthook_is_left_alone_outside_spmd_launch():
    """Only ranks under spmd-launch exit at once on an uncaught exception; a plain process keeps Python's hook."""
    code = textwrap.dedent(
        """
        import sys
        import spmd, spmd.launch
        assert sys.excepthook is sys.__excepthook__, "import spmd replaced sys.excepthook"
        port = spmd.launch.free_port()
        spmd.init_distributed_environment(f"127.0.0.1:{port}", num_processes=1, process_id=0, timeout_s=30)
        assert sys.excepthook is sys.__excepthook__, "init_distributed_environment replaced sys.excepthook"
        print("hook untouched")
        """
    )
    env = _env()
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "hook untouched" in r.stdout, r.stderr[-2000:]


# Bad --coordinator / --timeout, and the ranks' children (issue 22, items 15 and 16) -------------------


@pytest.fixture
def taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--coordinator", "127.0.0.1:notaport"], r"port must be an integer from 1 to 65535, got 'notaport'"),
        (["--coordinator", "127.0.0.1:0"], r"from 1 to 65535, got '0'"),
        (["--coordinator", "127.0.0.1:65536"], r"from 1 to 65535, got '65536'"),
        (["--coordinator", "127.0.0.1"], r"--coordinator: expected HOST:PORT"),
        (["--coordinator", "::1:29500"], r"an IPv6 host goes in brackets"),
        (["--coordinator", "no-such-host.invalid:29500"], r"cannot resolve the host 'no-such-host.invalid'"),
        (["--coordinator", "127.0.0.1:TAKEN"], r"port TAKEN is already in use on this host"),
        (["--coordinator", "10.255.255.1:TAKEN"], r"port TAKEN is already in use on this host"),  # JAX binds [::]
        (["--timeout", "nan"], r"--timeout must be a positive, finite number of seconds, got nan"),
        (["--timeout", "inf"], r"--timeout must be a positive, finite number of seconds, got inf"),
        (["--timeout", "-1"], r"--timeout must be a positive, finite number of seconds, got -1"),
        (["--timeout", "0"], r"--timeout must be a positive, finite number of seconds, got 0"),
    ],
)
def test_a_bad_coordinator_or_timeout_exits_2_before_any_rank_starts(args, match, taken_port, capsys):
    from spmd import launch

    args = [a.replace("TAKEN", str(taken_port)) for a in args]
    with pytest.raises(SystemExit) as e:
        launch.main(["--nproc-per-node", "1", *args, "docs/examples/multi_process.py"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match.replace("TAKEN", str(taken_port)), err), err


def test_a_taken_port_is_only_checked_on_node_0(taken_port):
    from spmd import launch

    node1 = ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "1"]
    a = launch._parse([*node1, "--coordinator", f"127.0.0.1:{taken_port}", "x.py"])
    assert a.coordinator == f"127.0.0.1:{taken_port}"


FORKS = textwrap.dedent(
    """
    import os, pathlib, subprocess, sys, time
    out = pathlib.Path(sys.argv[1])
    if os.environ["SPMD_PROCESS_ID"] == "1":
        child = subprocess.Popen(["sleep", "600"])  # in the rank's process group, holding its stdout
        away = subprocess.Popen(["sleep", "600"], start_new_session=True)  # left the group, holds stdout too
        (out / "children").write_text(f"{child.pid} {away.pid}")
        (out / "exit_time").write_text(repr(time.time()))
        os._exit(3)
    time.sleep(600)
    """
)


def test_stopping_the_ranks_stops_their_children_and_does_not_wait_on_their_pipes(tmp_path):
    """Rank 1 forks two children and fails: the one in its process group is stopped; the one that left it
    (setsid) keeps the rank's stdout open, and the launcher still ends within seconds, not the child's 600 s."""
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    pids: list[int] = []
    try:
        r = subprocess.run(
            _launcher("--nproc-per-node", "2", "--timeout", "60", str(script), str(tmp_path)),
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        ended = time.time()
        pids = [int(p) for p in (tmp_path / "children").read_text().split()]
        assert r.returncode == 3, r.stderr
        assert "spmd-launch: rank 1 exited with code 3; stopping ranks [0]" in r.stderr
        assert _gone_within(pids[:1], 1.0) == [], "a child in a failed rank's process group outlived the job"
        waited = ended - float((tmp_path / "exit_time").read_text())
        assert waited < 5.0, f"the launcher took {waited:.1f} s after rank 1 failed"
    finally:
        _kill_leftovers(pids)
