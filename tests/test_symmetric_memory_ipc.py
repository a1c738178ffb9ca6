"""Peer buffers across processes (kernels.symmetric_memory.allocate over CUDA IPC), simulated on CPU.

Each process of a job is a thread here, with its own process index and its own registry of
buffers; the CUDA driver is a fake whose addresses say who allocated them and whose mappings say
who opened whose buffer; the coordination service's key-value store is a dict with blocking reads
and deadlines, as the real one. The expectations (each process's own buffer at its native
address, every other process's at its mapping by that process, the key names) are written from
those rules, not read back from the code under test. The real thing, two processes on a GPU, is
tests/workers/gpu_mp_all_reduce.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from kernels import compat, machine, rendezvous, symmetric_memory
from kernels.symmetric_memory import Layout, _ipc, _registry

NATIVE, MAPPED = 0x7000_0000_0000, 0x2000_0000_0000


def native(p: int, k: int) -> int:
    """The address of process ``p``'s ``k``-th allocation (from 0), in process ``p``."""
    return NATIVE + p * 2**32 + k * 2**24


def mapped(q: int, p: int, k: int) -> int:
    """Where process ``q`` maps process ``p``'s ``k``-th allocation."""
    return MAPPED + q * 2**40 + p * 2**32 + k * 2**24


def handle_of(p: int, ptr: int) -> bytes:
    """The (fake) IPC handle of process ``p``'s allocation at ``ptr``."""
    return b"fake" + p.to_bytes(2, "little") + ptr.to_bytes(8, "little") + bytes(50)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    local_hardware_id: int
    platform: str = "gpu"


_LOCAL = threading.local()  # .pid: the simulated process running on this thread


class FakeCuda:
    """kernels.symmetric_memory.cuda, faked: handles carry the owner and the address."""

    IPC_HANDLE_BYTES = 64
    CudaError = type("CudaError", (RuntimeError,), {})

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.allocs: list[tuple[int, int, int]] = []  # (pid, ordinal, nbytes)
        self.opens: list[tuple[int, int, int]] = []  # (pid, ordinal, owner)
        self.fail: dict[tuple[int, str], str] = {}  # (pid, function) -> error
        self.freed: list[tuple[int, int, int]] = []  # (pid, ordinal, ptr)
        self.closed: list[tuple[int, int]] = []  # (pid, mapped address)
        self.reports: dict[int, int | None] = {}  # owner -> the size its mappings report (None: not reported)
        self.driver = True

    def available(self) -> bool:
        return self.driver

    def _maybe_fail(self, fn: str) -> None:
        if (_LOCAL.pid, fn) in self.fail:
            raise self.CudaError(self.fail[(_LOCAL.pid, fn)])

    def mem_alloc(self, ordinal: int, nbytes: int) -> int:
        self._maybe_fail("mem_alloc")
        with self.lock:
            k = sum(a[0] == _LOCAL.pid for a in self.allocs)
            self.allocs.append((_LOCAL.pid, ordinal, nbytes))
        return native(_LOCAL.pid, k)

    def mem_free(self, ordinal: int, ptr: int) -> None:
        with self.lock:
            self.freed.append((_LOCAL.pid, ordinal, ptr))

    def ipc_handle(self, ordinal: int, ptr: int) -> bytes:
        return handle_of(_LOCAL.pid, ptr)

    def ipc_open(self, ordinal: int, handle: bytes) -> int:
        self._maybe_fail("ipc_open")
        assert len(handle) == 64 and handle[:4] == b"fake", handle
        owner, ptr = int.from_bytes(handle[4:6], "little"), int.from_bytes(handle[6:14], "little")
        with self.lock:
            self.opens.append((_LOCAL.pid, ordinal, owner))
        return mapped(_LOCAL.pid, owner, (ptr - native(owner, 0)) // 2**24)

    def allocation_size(self, ordinal: int, ptr: int) -> int:
        """The size of the allocation a mapping (or a native address) lies in, from the address's own fields."""
        owner, k = ((ptr - MAPPED) % 2**40) // 2**32, (ptr % 2**32) // 2**24
        if owner in self.reports:
            if self.reports[owner] is None:
                raise self.CudaError("CUDA_ERROR_INVALID_VALUE: not reported")
            return self.reports[owner]
        with self.lock:
            return [n for pid, _, n in self.allocs if pid == owner][k]

    def ipc_close(self, ordinal: int, ptr: int) -> None:
        with self.lock:
            self.closed.append((_LOCAL.pid, ptr))


class FakeStore:
    """The coordination service's key-value store: no overwrites, blocking reads with a deadline."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.writes: list[tuple[int, str]] = []
        self.cond = threading.Condition()

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        assert isinstance(value, bytes)
        with self.cond:
            if key in self.data and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already exists.")
            self.data[key] = value
            self.writes.append((_LOCAL.pid, key))
            self.cond.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.data, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue({key}) timed out")
            return self.data[key]


class PerProcess:
    """The module's registry, one per simulated process (thread)."""

    def __init__(self) -> None:
        object.__setattr__(self, "local", threading.local())

    def _own(self):
        if not hasattr(self.local, "reg"):
            self.local.reg = _registry.Registry()
        return self.local.reg

    def __getattr__(self, name):
        return getattr(self._own(), name)

    def __setattr__(self, name, value):
        setattr(self._own(), name, value)


@pytest.fixture
def job(monkeypatch):
    fake, store = FakeCuda(), FakeStore()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_gpu_shard_autotuning=false")
    monkeypatch.setattr(_ipc, "cuda", fake)
    monkeypatch.setattr(_ipc, "process_index", lambda: _LOCAL.pid)
    monkeypatch.setattr(_registry, "REGISTRY", PerProcess())
    monkeypatch.setattr(compat, "distributed_client", lambda: store)
    return fake, store


def run_processes(fn, pids, *, limit_s=30.0):
    """``{pid: fn(pid)'s result or exception}``, each pid on its own thread (bounded wait)."""
    out = {}

    def body(pid):
        _LOCAL.pid = pid
        try:
            out[pid] = fn(pid)
        except Exception as e:
            out[pid] = e

    threads = [threading.Thread(target=body, args=(p,), daemon=True) for p in pids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s)
    assert not any(t.is_alive() for t in threads), "a simulated process hung"
    return out


def fake_mesh(shape, names, owners, *, platform="gpu", rng=None):
    """A mesh of fake devices; device ``i`` (flat order) belongs to process ``owners[i]``."""
    rng = rng or np.random.default_rng(0)
    ids = rng.choice(100, size=len(owners), replace=False) + 10
    devs = [FakeDevice(int(i), int(p), 3 + int(p), platform) for i, p in zip(ids, owners, strict=True)]
    return jax.sharding.Mesh(np.array(devs, dtype=object).reshape(shape), names)


def ok(results):
    for r in results.values():
        if isinstance(r, Exception):
            raise r
    return results


# ---------------------------------------------------------------------------------------------
# Each process's view


def _row(bufs, shape, names, axis, pos):
    """The peer table that the device at ``pos`` of a mesh of this shape would be given."""
    mesh = jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))],
                         axis_types=(AxisType.Explicit,) * len(shape))  # fmt: skip
    f = jax.jit(jax.shard_map(lambda: bufs.peer_table(axis)[None], mesh=mesh, in_specs=(), out_specs=P(names)))
    return np.asarray(f())[np.ravel_multi_index(pos, shape)]


@pytest.mark.parametrize(
    "shape,names,axis",
    [((2,), ("tp",), "tp"), ((2, 2), ("dp", "tp"), "tp"), ((2, 2), ("dp", "tp"), "dp"),
     ((2, 2), ("dp", "tp"), ("dp", "tp")), ((1, 4), ("dp", "tp"), "tp")],
)  # fmt: skip
def test_each_process_holds_its_own_buffer_and_maps_the_others(job, shape, names, axis, rng):
    fake, _ = job
    size = int(np.prod(shape))
    owners = rng.permutation(size).tolist()  # device i (flat order) is process owners[i]'s only device
    mesh = fake_mesh(shape, names, owners, rng=rng)
    got = ok(run_processes(lambda p: symmetric_memory.allocate(mesh, axis, timeout_s=20), range(size)))
    group = (axis,) if isinstance(axis, str) else axis
    n = int(np.prod([shape[names.index(a)] for a in group]))
    for p in range(size):
        want = [native(p, 0) if owners[i] == p else mapped(p, owners[i], 0) for i in range(size)]
        assert got[p].addresses == tuple(want)
        assert got[p].group == group and got[p].layout == Layout(max_ranks=n)
    assert sorted(fake.allocs) == [(p, 3 + p, Layout(max_ranks=n).nbytes) for p in range(size)]
    assert sorted(fake.opens) == [(q, 3 + q, p) for q in range(size) for p in range(size) if p != q]
    # The table of the device each process drives: its rank, then its group's addresses as it sees them.
    gaxes = [names.index(a) for a in group]
    for i in range(size):
        p, pos = owners[i], np.unravel_index(i, shape)
        members = []
        for sub in np.ndindex(*[shape[a] for a in gaxes]):
            q = list(pos)
            for a, v in zip(gaxes, sub, strict=True):
                q[a] = v
            members.append(int(np.ravel_multi_index(q, shape)))
        want = [members.index(i)]
        for m in members:
            addr = native(p, 0) if m == i else mapped(p, owners[m], 0)
            want += [np.uint32(addr & 0xFFFFFFFF).view(np.int32), np.uint32(addr >> 32).view(np.int32)]
        np.testing.assert_array_equal(_row(got[p], shape, names, axis, pos), np.array(want, np.int32))


def test_keys_number_the_allocations_and_a_repeat_makes_none(job):
    fake, store = job
    mesh = fake_mesh((2, 2), ("dp", "tp"), [0, 1, 2, 3])

    def calls(p):
        tp = symmetric_memory.allocate(mesh, "tp", timeout_s=20)
        dp = symmetric_memory.allocate(mesh, "dp", timeout_s=20)
        return tp, dp, symmetric_memory.allocate(mesh, "tp", timeout_s=20)

    got = ok(run_processes(calls, range(4)))
    want_keys = {
        f"spmd/symmetric_memory/{n}/{stage}/{p}" for n in (1, 2) for stage in ("handle", "opened") for p in range(4)
    }
    assert set(store.data) == want_keys
    assert len(store.writes) == len(want_keys)  # the repeat wrote nothing
    assert sorted(store.writes) == sorted((int(k.rsplit("/", 1)[1]), k) for k in want_keys)  # each its own keys
    for p in range(4):
        tp, dp, again = got[p]
        assert again is tp
        assert tp.addresses == tuple(native(p, 0) if q == p else mapped(p, q, 0) for q in range(4))
        assert dp.addresses == tuple(native(p, 1) if q == p else mapped(p, q, 1) for q in range(4))
        record = json.loads(store.data[f"spmd/symmetric_memory/2/handle/{p}"])
        assert bytes.fromhex(record["handle"]) == handle_of(p, native(p, 1))
        assert record["group"] == ["dp"] and record["nbytes"] == Layout(max_ranks=2).nbytes
    assert len(fake.allocs) == 8 and len(fake.opens) == 2 * 4 * 3


# ---------------------------------------------------------------------------------------------
# Failures: bounded waits, clear errors, no process left waiting on one that gave up


def test_a_process_that_never_comes_times_out_with_a_clear_error(job):
    _, store = job
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    t0 = time.monotonic()
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=0.3), [0])
    assert time.monotonic() - t0 < 10
    with pytest.raises(TimeoutError, match=r"waited 0\.3 s for process 1 and got nothing \(its handle record.*same"):
        raise got[0]
    # It said so, for a late process 1.
    late = rendezvous.Rendezvous(store, 1.0, "late")
    with pytest.raises(rendezvous.PeerFailed, match=r"late: process 0 failed \(opened\): TimeoutError: "):
        late.read("spmd/symmetric_memory/1/opened/0", who="process 0")


@pytest.mark.parametrize("where,stage", [("mem_alloc", "handle"), ("ipc_open", "opened")])
def test_a_process_that_fails_stops_the_others_at_once(job, where, stage):
    fake, _ = job
    fake.fail[(1, where)] = "CUDA_ERROR_OUT_OF_MEMORY (2)"
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    t0 = time.monotonic()
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=60), [0, 1])
    assert time.monotonic() - t0 < 10  # not the 60 s timeout
    assert isinstance(got[1], fake.CudaError)
    with pytest.raises(RuntimeError, match=rf"process 1 failed \({stage}\): CudaError: CUDA_ERROR_OUT_OF_MEMORY"):
        raise got[0]


def test_different_allocations_are_refused(job):
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    layouts = {0: None, 1: Layout(max_ranks=4)}
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", layouts[p], timeout_s=20), [0, 1])
    for p in (0, 1):
        with pytest.raises(RuntimeError, match=r"the processes made different allocations: this process"):
            raise got[p]


def test_a_foreign_record_is_refused(job):
    _, store = job
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    store.data["spmd/symmetric_memory/1/handle/1"] = b"pickle?"
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=20), [0])
    with pytest.raises(RuntimeError, match=r"a record this module did not write under"):
        raise got[0]


# ---------------------------------------------------------------------------------------------
# Meshes this cannot serve: refused before anything is allocated or published


@pytest.mark.parametrize(
    "owners,platform,driver,match",
    [
        ([0, 1], "cpu", True, r"devices are cpu; across processes the buffers are shared by CUDA IPC, which needs"),
        ([0, 0, 1, 1], "gpu", True, r"process 0 holds 2 devices of the mesh; .*one device of the mesh per process"),
        ([1, 2], "gpu", True, r"this process \(0\) holds no device of the mesh"),
        ([0, 1], "gpu", False, r"the CUDA driver \(libcuda\.so\.1\) does not load here"),
    ],
)
def test_meshes_it_cannot_serve_are_refused(job, owners, platform, driver, match):
    fake, store = job
    fake.driver = driver
    mesh = fake_mesh((len(owners),), ("tp",), owners, platform=platform)
    got = run_processes(lambda p: (symmetric_memory.unsupported(mesh), symmetric_memory.allocate(mesh, "tp")), [0])
    with pytest.raises(ValueError, match=match + r".*Leave this group on psum"):
        raise got[0]
    assert run_processes(lambda p: symmetric_memory.unsupported(mesh), [0])[0] is not None
    assert not store.data and not fake.allocs


@pytest.mark.parametrize(
    "flags,off",
    [
        ("", False),
        ("--xla_gpu_shard_autotuning", False),
        ("--xla_gpu_shard_autotuning=true", False),
        ("--xla_gpu_shard_autotuning=false", True),
        ("--xla_gpu_shard_autotuning=0 --xla_gpu_autotune_level=2", True),
        ("--xla_gpu_shard_autotuning=false --xla_gpu_shard_autotuning=true", False),  # the last one counts
        ("--xla_gpu_shard_autotuning=true --xla_gpu_shard_autotuning=False", True),
    ],
)
def test_across_processes_xla_sharded_autotuning_must_be_off(job, monkeypatch, flags, off):
    """Each process's program holds its own addresses; XLA's sharded autotuning expects one program (it hangs)."""
    fake, store = job
    monkeypatch.setenv("XLA_FLAGS", flags)
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    problem = run_processes(lambda p: symmetric_memory.unsupported(mesh), [0])[0]
    if off:
        assert problem is None
        return
    assert "start every process with XLA_FLAGS=--xla_gpu_shard_autotuning=false" in problem
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp"), [0])
    with pytest.raises(ValueError, match=r"XLA's sharded autotuning is on .*Leave this group on psum"):
        raise got[0]
    assert not store.data and not fake.allocs


def test_argument_errors(job, monkeypatch):
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    for bad in (0, -1.0, float("nan"), "5"):
        got = run_processes(lambda p, t=bad: symmetric_memory.allocate(mesh, "tp", timeout_s=t), [0])
        with pytest.raises(ValueError, match=r"expected timeout_s > 0 seconds"):
            raise got[0]
    monkeypatch.setattr(compat, "distributed_client", lambda: None)
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp"), [0])
    with pytest.raises(RuntimeError, match=r"jax\.distributed is not initialized here"):
        raise got[0]


def test_one_process_keeps_jax_arrays_and_never_touches_the_store(job):
    fake, store = job
    mesh = jax.make_mesh((2,), ("tp",), devices=jax.devices()[:2], axis_types=(AxisType.Explicit,))
    got = ok(run_processes(lambda p: (symmetric_memory.unsupported(mesh), symmetric_memory.allocate(mesh, "tp")), [0]))
    problem, bufs = got[0]
    assert problem is None
    assert bufs.addresses == tuple(int(a.unsafe_buffer_pointer()) for a in bufs._arrays)
    assert not store.data and not fake.allocs and not fake.opens


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, "--xla_gpu_shard_autotuning=false"),
        ("--xla_dump_to=/tmp/d", "--xla_dump_to=/tmp/d --xla_gpu_shard_autotuning=false"),
        ("--xla_gpu_shard_autotuning=true", "--xla_gpu_shard_autotuning=true"),  # the user's choice stands
    ],
)
def test_joining_a_multi_process_job_switches_sharded_autotuning_off(monkeypatch, before, after):
    """init_distributed_environment sets the flag the cross-process peer buffers need, before the backend starts."""
    from spmd import compat, distributed

    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    joined = {}
    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setattr(compat, "backends_started", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: joined.update(kw))
    monkeypatch.setattr(distributed, "_cuda_possible", lambda: True)
    distributed.init_distributed_environment("127.0.0.1:1", 2, 0)
    assert joined["num_processes"] == 2
    assert os.environ["XLA_FLAGS"] == after
    assert _ipc._shard_autotuning_off() == ("=false" in after)


def test_processes_on_two_machines_all_refuse_and_open_nothing(job, monkeypatch):
    """A multi-node job: every process learns it from the same records, frees its buffer, raises NotOneHost."""
    fake, _ = job

    def on_machine() -> str:
        return "node-b/2" if _LOCAL.pid >= 2 and not getattr(_LOCAL, "moved", False) else "node-a/1"

    monkeypatch.setattr(machine, "machine_id", on_machine)
    mesh = fake_mesh((2, 2), ("dp", "tp"), [0, 1, 2, 3])

    def process(p):
        try:
            symmetric_memory.allocate(mesh, "tp", timeout_s=20)
        except symmetric_memory.NotOneHost as e:
            first = e
        else:
            first = None
        _LOCAL.moved = True  # the next allocation: every process on one machine (its own keys)
        return first, symmetric_memory.allocate(mesh, "dp", timeout_s=20)

    got = ok(run_processes(process, range(4)))
    for p in range(4):
        first, again = got[p]
        assert isinstance(first, symmetric_memory.NotOneHost) and "runs on another machine" in str(first)
        assert again.addresses and again.group == ("dp",)
    assert sorted(f[0] for f in fake.freed) == [0, 1, 2, 3]
    assert {o[0] for o in fake.opens} == {0, 1, 2, 3}  # opens came from the second allocation only
    assert len(fake.opens) == 4 * 3


def test_no_autotuning_flag_where_no_gpu_can_run(monkeypatch):
    from spmd import compat, distributed

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setattr(compat, "backends_started", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)
    monkeypatch.setattr(distributed, "jax", type("J", (), {"config": type("C", (), {"jax_platforms": "tpu"})})())
    assert not distributed._cuda_possible()
    monkeypatch.undo()  # (the whole module's jax was faked just for that question)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    monkeypatch.setattr(distributed._Joined, "done", False)
    monkeypatch.setattr(compat, "backends_started", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)
    monkeypatch.setattr(distributed, "_cuda_possible", lambda: False)
    distributed.init_distributed_environment("127.0.0.1:1", 2, 0)
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"


# ---------------------------------------------------------------------------------------------
# A peer's record is checked before any kernel writes through it (issue 22, item 10)


def test_a_handle_that_maps_less_than_the_allocation_is_refused_and_unmapped(job):
    fake, _ = job
    fake.reports[1] = Layout(max_ranks=2).nbytes - 4096  # process 1's handle maps one page too few
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    t0 = time.monotonic()
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=30), [0, 1])
    assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match=r"process 1's handle maps \d+ bytes, fewer than the \d+ of this allocation"):
        raise got[0]
    assert fake.closed == [(0, mapped(0, 1, 0))]  # the short mapping is closed again
    with pytest.raises(RuntimeError, match=r"process 0 failed \(opened\): RuntimeError: .*process 1's handle maps"):
        raise got[1]  # process 1 hears of it at once


def test_a_driver_that_does_not_report_mappings_leaves_the_records_size(job):
    fake, _ = job
    fake.reports[1] = None
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    got = ok(run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=30), [0, 1]))
    assert got[0].addresses == (native(0, 0), mapped(0, 1, 0))


def test_a_key_someone_else_wrote_first_is_an_error_naming_it_on_every_process(job):
    fake, store = job
    key = "spmd/symmetric_memory/1/handle/1"
    forged = {"v": 1, "call": 1, "group": ["tp"], "devices": [], "nbytes": 1, "handle": "00" * 64, "host": "x"}
    store.data[key] = json.dumps(forged).encode()
    mesh = fake_mesh((2,), ("tp",), [0, 1])
    t0 = time.monotonic()
    got = run_processes(lambda p: symmetric_memory.allocate(mesh, "tp", timeout_s=30), [0, 1])
    assert time.monotonic() - t0 < 10  # nobody waits out the timeout
    with pytest.raises(rendezvous.KeyTaken, match=rf"the key '{key}' is already in the coordination service's"):
        raise got[1]
    assert isinstance(got[0], RuntimeError), got[0]
    assert (1, 4, native(1, 0)) in fake.freed  # process 1 gave its allocation back
    assert not fake.opens  # nobody opened the forged handle
