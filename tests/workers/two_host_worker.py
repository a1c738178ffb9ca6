"""Worker for the two-host tests, one per "host" (network namespace), started by spmd-launch:
``python two_host_worker.py MODE SEED``.

Modes:

* ``collectives``: ``broadcast_tensor_dict`` from a process on either host, a TP all-reduce whose
  group spans both hosts (row-parallel, against numpy), the host-level messages over direct TCP
  (not the key-value store), then the custom all-reduce's peer buffers: every process learns
  that the job spans machines and every group stays on psum (the CUDA calls are faked: no GPU
  here; the machine records and their exchange across the hosts are real).
* ``die``: after a first barrier, process 1 kills itself (SIGKILL) while process 0 waits in a barrier.

Prints ``OK <mode>`` when every check passed; a failed check raises (non-zero exit).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import spmd
import spmd.host

spmd.init_distributed_environment()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers
from helpers import assert_same  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

MODE, SEED = sys.argv[1], int(sys.argv[2])
PID, NPROC, NDEV = jax.process_index(), jax.process_count(), jax.device_count()


def random_dict(rng: np.random.Generator) -> dict:
    return {
        "step": int(rng.integers(0, 1 << 30)),
        "weights": {
            "w": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
            "b": rng.standard_normal((8,)).astype(np.float32),
            "ids": rng.integers(-1000, 1000, (3, 5)).astype(np.int32),
        },
        "names": ["q_proj", f"k_{rng.integers(0, 100)}"],
    }


def check_tensor_dicts() -> None:
    spmd.initialize_model_parallel(tensor_model_parallel_size=NDEV)
    for src_process in (0, 1):  # a process on either host sends
        want = random_dict(np.random.default_rng([SEED, src_process]))
        got = spmd.broadcast_tensor_dict(want if PID == src_process else None, src=src_process * (NDEV // NPROC))
        got["weights"] = {k: np.asarray(v) for k, v in got["weights"].items()}
        assert_same(got, want)
    print(f"broadcast_tensor_dict ok from both hosts (process {PID} on {os.uname().nodename})", flush=True)
    peers = spmd.host._PEERS.connections
    assert peers is not None and peers.mode == "tcp", "host messages not over TCP"


def row_parallel_error() -> float:
    """A TP all-reduce over every device of both hosts, against numpy."""
    mesh = spmd.get_mesh()
    rng = np.random.default_rng([SEED, 7])
    x = rng.standard_normal((4, 8 * NDEV)).astype(np.float32)
    w = rng.standard_normal((8 * NDEV, 16)).astype(np.float32)
    put = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])
    f = jax.jit(
        spmd.shard_map(
            lambda xs, ws: spmd.tensor_model_parallel_all_reduce(jnp.dot(xs, ws, precision="highest")),
            in_specs=(P(None, "tp"), P("tp", None)),
            out_specs=P(),
        )
    )
    y = np.asarray(multihost_utils.process_allgather(f(put(x, P(None, "tp")), put(w, P("tp", None))), tiled=True))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


def check_peer_buffers_fall_back() -> None:
    """The custom all-reduce's peer buffers across hosts: NotOneHost on every process, every group on psum."""
    from kernels import symmetric_memory
    from kernels.symmetric_memory import _ipc
    from spmd import compat

    spmd.destroy_model_parallel()
    raised, real_allocate = [], symmetric_memory.allocate

    def allocate(*args, **kwargs):
        try:
            return real_allocate(*args, **kwargs)
        except symmetric_memory.NotOneHost as e:
            raised.append(str(e))
            raise

    compat.mesh_platform = lambda mesh: "gpu"  # pretend: a GPU job of one device per process
    symmetric_memory.unsupported = _ipc.unsupported = lambda mesh: None
    symmetric_memory.allocate = allocate
    symmetric_memory.cuda.mem_alloc = lambda ordinal, nbytes: 4096
    symmetric_memory.cuda.ipc_handle = lambda ordinal, ptr: bytes(symmetric_memory.cuda.IPC_HANDLE_BYTES)
    freed = []
    symmetric_memory.cuda.mem_free = lambda ordinal, ptr: freed.append(ptr)
    spmd.initialize_model_parallel(tensor_model_parallel_size=NDEV)
    assert len(raised) == 1 and "runs on another machine" in raised[0], raised
    assert freed == [4096], freed
    for name in ("world", "tp", "dp", "pp", "ep"):
        comm = getattr(spmd, f"get_{name}_group")().device_communicator
        assert getattr(comm, "peer_buffers", None) is None, name
    print(f"peer buffers: process {PID} fell back to psum ({raised[0][:60]}...)", flush=True)


if MODE == "collectives":
    check_tensor_dicts()
    err = row_parallel_error()
    assert err < 1e-5, err
    print(f"TP all-reduce over {NDEV} devices on {NPROC} hosts: max rel err {err:.1e}", flush=True)
    check_peer_buffers_fall_back()
    err = row_parallel_error()  # the same all-reduce, now that the groups know they span hosts
    assert err < 1e-5, err
elif MODE == "die":
    spmd.host.barrier(timeout_s=60)
    if PID == 1:
        print("process 1 kills itself", flush=True)
        time.sleep(0.5)  # process 0 is in the barrier by now
        os.kill(os.getpid(), signal.SIGKILL)
    spmd.host.barrier(timeout_s=60)
    raise AssertionError("process 0 passed a barrier that process 1 never reached")
else:
    raise SystemExit(f"unknown mode {MODE!r}")
spmd.host.barrier()
print(f"OK {MODE}", flush=True)
