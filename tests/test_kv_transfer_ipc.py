"""IpcKVPipe on CPU (the shared-memory backend) inside one process, beyond the pipe contract
(tests/test_kv_contract.py): slots, acks, TP splits, closing with staged messages, hellos, files and their sweep."""

from __future__ import annotations

import gc
import os
import threading
import time

import jax
import kv_pipes
import ml_dtypes
import numpy as np
import pytest
from kv_pipes import free_port  # (test_kv_transfer_ipc_wire imports it from here)

from spmd.kv_transfer import IpcKVPipe, TCPKVPipe, _device
from spmd.kv_transfer import _shared_memory as ipc_mod


def pair(**kw):
    """A connected IPC (server, client) pair (``kv_pipes.pair``; also what test_kv_transfer_ipc_kernel uses)."""
    return kv_pipes.pair("ipc", **kw)


def shm_files() -> set[str]:
    """This process's staging files (another pytest-xdist worker makes its own at the same time)."""
    d = ipc_mod.Shm().dir
    return {f for f in os.listdir(d) if f.startswith("spmd-kv-") and f.split("_")[0].endswith(f"-{os.getpid()}")}


def test_sender_runs_one_message_ahead_then_waits(rng):
    a, b, x = (rng.standard_normal(1 << 16).astype(np.float32) for _ in range(3))
    s, c = pair(timeout_s=1.0)
    with s, c:
        s.send_tensor(a)
        s.send_tensor(b)  # the second slot: no wait
        with pytest.raises(TimeoutError, match="has not taken message 0"):
            s.send_tensor(x)  # needs message 0's slot again
    s, c = pair(timeout_s=10.0)
    with s, c:
        s.send_tensor(a)
        s.send_tensor(b)
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), a)
        s.send_tensor(x)  # message 0 was taken: its slot is free
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), b)
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)


def test_acks_interleaved_with_data_from_the_other_side(rng):
    """Each side sends while the other's acks and data share the control channel."""
    xs = [rng.standard_normal(1 << 14 + k).astype(np.float32) for k in range(4)]
    ys = [rng.standard_normal((1 << 13) + k).astype(np.float32) for k in range(4)]
    s, c = pair()
    with s, c:
        for x, y in zip(xs, ys, strict=True):
            s.send_tensor(x)
            c.send_tensor(y)
            np.testing.assert_array_equal(np.asarray(s.recv_tensor()), y)
            np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)


def test_slots_grow_and_values_stay_right(rng):
    sizes = [1 << 18, 1 << 22, 1 << 16, 3 << 21, 1 << 20]
    xs = [rng.standard_normal(n // 4).astype(np.float32) for n in sizes]
    s, c = pair()
    with s, c:
        for x in xs:
            s.send_tensor(x)
            np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)


@pytest.mark.parametrize(("src", "dst", "heads"), [(2, 4, 2), (4, 2, 4), (2, 2, 8), (1, 4, 2)])
def test_kv_cache_between_tp_sizes(rng, src, dst, heads):
    s, c = pair(server_devices=src, client_devices=dst)
    # models.llama's KVCache layout: [batch, kv_heads, max_len, head_dim] (head_axis=1).
    layers = [rng.standard_normal((3, heads, 40, 16)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    from spmd.kv_transfer import kv_head_sharding, split_kv_heads

    with s, c:
        sharded = [jax.device_put(x, kv_head_sharding(s.devices, heads, head_axis=1)) for x in layers]
        s.send_kv_cache(sharded, head_axis=1)
        got = c.recv_kv_cache()
        for x, y in zip(layers, got, strict=True):
            np.testing.assert_array_equal(np.asarray(y), x)
            want = split_kv_heads(x, dst, head_axis=1)
            for shard in y.addressable_shards:
                r = c.devices.index(shard.device)
                np.testing.assert_array_equal(np.asarray(shard.data), want[r], err_msg=f"decode rank {r}")


def test_mismatched_receive_calls_drop_the_message_and_the_pipe_goes_on(rng):
    layers = [rng.standard_normal((2, 40, 16)).astype(np.float32) for _ in range(2)]
    x = rng.standard_normal(1 << 15).astype(np.float32)
    s, c = pair(server_devices=1, client_devices=1)
    with s, c:
        s.send_kv_cache(layers)
        with pytest.raises(ValueError, match=r"receive it with recv_kv_cache\. It was dropped"):
            c.recv_tensor()
        s.send_tensor(x)
        with pytest.raises(ValueError, match=r"KV cache sent by send_kv_cache, got a tensor float32\[32768\]"):
            c.recv_kv_cache()
        s.send_tensor(None)
        with pytest.raises(ValueError, match="got None"):
            c.recv_kv_cache()
        for _ in range(3):  # every slot was freed: the sender never waits
            s.send_kv_cache(layers)
            for want, got in zip(layers, c.recv_kv_cache(), strict=True):
                np.testing.assert_array_equal(np.asarray(got), want)


def test_closing_both_ends_leaves_no_files(rng):
    """(Close semantics themselves: the contract's ``closing``.)"""
    before = shm_files()
    s, c = pair(timeout_s=2.0)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    s.send_tensor(x)
    np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
    assert len(shm_files() - before) == 1 + 2 * 2  # one staging slot in use, two slot headers per side
    s.close()
    with pytest.raises(ConnectionError):
        c.recv_tensor()
    c.close()
    assert shm_files() - before == set()


def test_close_right_after_send_loses_nothing(rng):
    before = shm_files()
    s, c = pair(timeout_s=10.0)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    got = {}

    def late_reader():
        time.sleep(0.3)
        got["x"] = np.asarray(c.recv_tensor())

    t = threading.Thread(target=late_reader)
    t.start()
    s.send_tensor(x)
    s.close()  # waits for the reader's ack
    t.join()
    np.testing.assert_array_equal(got["x"], x)
    c.close()
    assert shm_files() - before == set()


def test_close_with_a_reader_that_never_comes(rng):
    before = shm_files()
    s, c = pair(timeout_s=0.5)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    s.send_tensor(x)
    t0 = time.monotonic()
    s.close()  # gives up after timeout_s; the shared-memory files go (no reader had the staging open)
    assert 0.4 < time.monotonic() - t0 < 5
    assert shm_files() - before == set(c._headers.names)  # the reader's own slot headers stay until it closes
    with pytest.raises(ConnectionError, match="closed before this message was taken"):
        c.recv_tensor()
    c.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        IpcKVPipe("127.0.0.1", 1, backend="nccl")
    with pytest.raises(ValueError, match="at least one device"):
        IpcKVPipe("127.0.0.1", 1, devices=[])


def fake_peer(hello: dict, then: list | None = None, timeout_s=5.0):
    """A raw control channel pretending to be the other end: sends ``hello``, then ``then``."""
    port = free_port()
    box: dict = {}

    def serve():
        p = TCPKVPipe("127.0.0.1", port, timeout_s=timeout_s)
        box["p"] = p
        p.recv_tensor()  # the pipe's hello
        p.send_tensor(_device.meta_bytes(hello))
        for m in then or []:
            p.send_tensor(m)

    t = threading.Thread(target=serve)
    t.start()
    return port, t, box


def good_hello(**kw):
    return {"backend": "shm", "tp": 1, "host": ipc_mod.host_identity(), **kw}


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (good_hello(host="elsewhere/1234"), "another machine"),
        (good_hello(backend="cuda"), "backend"),
        (good_hello(tp=0), "malformed hello"),
        (good_hello(tp=True), "malformed hello"),
    ],
)
def test_hello_checks(hello, match):
    port, t, box = fake_peer(hello)
    try:
        with pytest.raises(ValueError, match=match):
            IpcKVPipe("127.0.0.1", port, role="client", timeout_s=5.0, devices=jax.devices()[:1])
    finally:
        t.join()
        box["p"].close()


def test_cuda_backend_needs_gpus():
    with pytest.raises(ValueError, match="'shm' moves CPU arrays"):
        IpcKVPipe("127.0.0.1", 1, backend="shm", devices=[_FakeGpu()])


class _FakeGpu:
    platform = "gpu"


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def _my_pid_namespace() -> int:
    return int(os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]"))


@pytest.mark.multiprocess
@pytest.mark.skipif(not os.path.exists("/proc/self/ns/pid"), reason="needs /proc/self/ns/pid")
def test_the_sweep_deletes_only_files_it_can_prove_are_its_own_and_dead():
    """Items 6 of issue 22: odd names, other namespaces, other users, FIFOs, links: left alone, and no error."""
    d = ipc_mod.Shm().dir
    ns, dead = _my_pid_namespace(), _dead_pid()
    stale = f"spmd-kv-{ns}-{dead}_stale"
    keep = {
        f"spmd-kv-{ns}-{os.getpid()}_live": "file",  # a live process of this namespace
        f"spmd-kv-{ns + 1}-{dead}_otherns": "file",  # a dead pid number, but of another PID namespace
        f"spmd-kv-{dead}_oldform": "file",  # not this module's form
        "spmd-kv-99999999999999999999_x": "file",  # a number no pid can be (was: OverflowError for every pipe)
        f"spmd-kv-{ns}-99999999999_x": "file",
        f"spmd-kv-{ns}-{dead}_fifo": "fifo",  # not a regular file
        f"spmd-kv-{ns}-{dead}_link": "link",  # a symbolic link (to the stale file)
        f"spmd-kv-{ns}-{dead}_nobody": "nobody",  # another user's file
    }
    made = []
    try:
        for name, kind in [(stale, "file"), *keep.items()]:
            path = os.path.join(d, name)
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "link":
                os.symlink(os.path.join(d, stale), path)
            else:
                with open(path, "wb") as f:
                    f.write(b"x")
            made.append(path)
            if kind == "nobody":
                try:
                    os.chown(path, 65534, 65534)
                except PermissionError:
                    keep.pop(name)  # (not root: another user's file cannot be made here)
        shm = ipc_mod.Shm()  # every new backend sweeps (an IpcKVPipe on CPU makes one)
        assert not os.path.exists(os.path.join(d, stale))  # the stale file of a dead process of this user
        assert shm.sweep() == []
        for name in keep:
            assert os.path.lexists(os.path.join(d, name)), name
        s, c = pair()  # and new pipes work among them
        with s, c:
            x = np.arange(1 << 13, dtype=np.float32)
            s.send_tensor(x)
            np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
    finally:
        for path in made:
            if os.path.lexists(path):
                os.unlink(path)


def test_soak_a_thousand_messages_and_fifty_pipes_leave_nothing_behind(rng):
    def fd_targets() -> list[str]:
        out = []
        for f in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{f}"))
            except OSError:  # listdir's own descriptor, closed by now
                pass
        return sorted(out)

    def open_fds() -> int:
        return len(fd_targets())

    gc.collect()  # a pipe an earlier test dropped unclosed is finalized now, not in the middle of the counts
    before_files = shm_files()
    xs = [rng.standard_normal(n).astype(np.float32) for n in (1 << 14, 100, 1 << 13)]  # staged, inline, staged
    fds = open_fds()
    s, c = pair()
    with s, c:
        for x in xs + xs:  # both slots exist from here on (each mapping holds a descriptor)
            s.send_tensor(x)
            c.recv_tensor()
        targets = fd_targets()
        for i in range(1000):
            x = xs[i % 3]
            s.send_tensor(x)
            got = c.recv_tensor()
            if i % 97 == 0:
                np.testing.assert_array_equal(np.asarray(got), x)
        now = fd_targets()
        assert now == targets, ([t for t in now if t not in targets], [t for t in targets if t not in now])
    for _ in range(50):
        s, c = pair()
        s.send_tensor(xs[0])
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), xs[0])
        s.close()
        c.close()
    assert open_fds() == fds
    assert shm_files() - before_files == set()


def test_a_peer_dripping_its_hello_cannot_stretch_the_constructors_deadline():
    """The control channel's handshake passes; then the hello arrives one byte every 50 ms (issue 22, item 1)."""
    port, stop = free_port(), threading.Event()
    box: dict = {}

    def serve():
        p = box["p"] = TCPKVPipe("127.0.0.1", port, timeout_s=5.0)
        frame = bytearray()  # what send_tensor would write: captured, then dripped
        real, p._sock = p._sock, type("Capture", (), {"sendmsg": lambda self, parts: frame.extend(b"".join(parts))
                                                      or sum(len(x) for x in parts)})()  # fmt: skip
        p.send_tensor(_device.meta_bytes(good_hello()))
        p._sock = real
        for b in frame:
            if stop.wait(0.05):
                return
            real.sendall(bytes([b]))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="did not arrive in time"):
            IpcKVPipe("127.0.0.1", port, role="client", timeout_s=0.8, devices=jax.devices()[:1])
        assert time.monotonic() - t0 < 1.6, time.monotonic() - t0
    finally:
        stop.set()
        t.join(5)
        box["p"].close()


# A peer's staging file is not trusted: links, FIFOs, other users' files, truncation (issue 22, item 7) ---


def _staged_pair(rng):
    """A pair after one staged message each way, so the receiver holds the sender's slot-0 file open."""
    s, c = pair()
    x = rng.standard_normal(1 << 13).astype(np.float32)
    s.send_tensor(x)
    np.testing.assert_array_equal(np.asarray(c.recv_tensor()), x)
    return s, c


def _swap_in(path: str, kind: str, target: str) -> None:
    """Replace the staging file at ``path`` by a symlink to ``target``, a FIFO, or a file of another user."""
    size = os.path.getsize(path)
    os.unlink(path)
    if kind == "link":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.truncate(size)
        os.chown(path, 65534, 65534)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("link", "is a symbolic link; refused"),
        ("fifo", "is not a regular file"),
        ("nobody", "belongs to uid 65534, not to this process's user"),
    ],
)
def test_a_swapped_staging_file_is_refused_and_the_receiver_goes_on(kind, match, rng, tmp_path):
    if kind == "nobody" and os.getuid() != 0:
        pytest.skip("making another user's file needs root")
    secret = tmp_path / "secret"
    secret.write_bytes(b"the contents of /etc/shadow " * 2000)  # larger than the piece: readable through a link
    s, c = pair()
    with s, c:
        x = rng.standard_normal(1 << 13).astype(np.float32)
        s.send_tensor(x)  # staged in slot 0's file; the receiver has not opened it yet
        _swap_in(s._slots[(0, 0)].path, kind, str(secret))
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=match):
            c.recv_tensor()
        assert time.monotonic() - t0 < 2  # a FIFO did not block the receiver
        y = rng.standard_normal(1 << 13).astype(np.float32)  # the message was dropped: the pipe is in step
        s.send_tensor(y)
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), y)


def test_a_staging_file_truncated_after_the_receiver_opened_it_is_an_error_not_a_sigbus(rng):
    s, c = _staged_pair(rng)
    with s, c:
        slot = s._slots[(0, 0)]
        y = rng.standard_normal(1 << 13).astype(np.float32)
        s.send_tensor(y)  # slot 1
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), y)
        z = rng.standard_normal(1 << 13).astype(np.float32)
        s.send_tensor(z)  # slot 0 again, whose file the receiver holds open
        os.truncate(slot.path, 100)
        with pytest.raises(ValueError, match=r"holds 100 bytes, the piece ends at byte 32768: it was truncated"):
            c.recv_tensor()
        os.truncate(slot.path, slot.capacity)  # (the sender writes this slot again below)
        w = rng.standard_normal(1 << 13).astype(np.float32)
        s.send_tensor(w)
        np.testing.assert_array_equal(np.asarray(c.recv_tensor()), w)
