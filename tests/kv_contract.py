"""The contract every KV pipe keeps, as cases split into a sender's and a receiver's half (imported, not collected).

``tests/test_kv_contract.py`` runs each case over every pipe: in one process (the halves in two
threads) for TCP, IPC (CPU shared memory) and the transfer-server pipe, and in a two-process
``jax.distributed`` job for :class:`DevicePutKVPipe` (``tests/workers/kv_contract_worker.py``: one
process per half). Both halves draw the same data from one seed; the receiver compares what
arrives with numpy's own copy of what was sent, bit for bit.

What differs between pipes is named in :class:`Caps`, nowhere else: whether arrays arrive on a
device (then 64-bit dtypes are refused without ``jax_enable_x64``), whether the pipe goes both
ways, and what a receiver sees once its peer closed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from spmd.wire import ALLOWED_DTYPES

_64BIT = {"int64", "uint64", "float64", "complex128"}
LARGE = 20 << 10  # bytes: more than the device pipes' 16 KiB inline limit, so the data path moves it


@dataclasses.dataclass(frozen=True)
class Caps:
    """What a pipe promises beyond the common contract.

    Attributes:
      on_device: arrays arrive as ``jax.Array`` on the receiver's first device (else as numpy).
      two_way: either end may send.
      peer_closed: the error a receiver raises once the peer closed, and its message.
      timed_out: the TimeoutError's message when nothing arrived within the pipe's timeout.
    """

    on_device: bool
    two_way: bool
    peer_closed: tuple[type[BaseException], str]
    timed_out: str

    def dtypes(self) -> list[str]:
        """Every dtype the pipe carries here (device pipes: no 64-bit without ``jax_enable_x64``)."""
        names = sorted(ALLOWED_DTYPES)
        if self.on_device and not jax.config.jax_enable_x64:
            names = [n for n in names if n not in _64BIT]
        return names


_CLOSED = (ConnectionError, "the peer closed the pipe")
_SILENT = r"TCPKVPipe.recv_tensor: no message within 0\.5 s \(the pipe is still open\)"  # (the control channel's)
CAPS = {
    "tcp": Caps(on_device=False, two_way=True, peer_closed=_CLOSED, timed_out=_SILENT),
    "ipc": Caps(
        on_device=True,
        two_way=True,
        peer_closed=_CLOSED,
        timed_out=r"IpcKVPipe.recv_tensor: no message from the peer within 0\.5 s",
    ),
    "ts": Caps(on_device=True, two_way=True, peer_closed=_CLOSED, timed_out=_SILENT),
    # One job, no connection of its own: a receiver whose sender closed waits out its timeout.
    "devput": Caps(
        on_device=True,
        two_way=False,
        peer_closed=(TimeoutError, "no message from process 0 within"),
        timed_out=r"DevicePutKVPipe.recv_tensor: no message from process 0 within 0\.5 s",
    ),
}


@dataclasses.dataclass
class Side:
    """One half's view: its pipe end, the pipe's caps, the case's data seed, and a barrier with the other half."""

    pipe: Any
    caps: Caps
    seed: int
    sync: Callable[[str], None]

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def devices(self) -> list[Any]:
        """This end's devices in rank order (a TCP pipe receives on this process's local devices)."""
        if hasattr(self.pipe, "src_devices"):  # DevicePutKVPipe: one object names both sides
            return list(self.pipe.src_devices if self.pipe.role == "sender" else self.pipe.dst_devices)
        return list(getattr(self.pipe, "devices", None) or jax.local_devices())


def random_of(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Fresh random values of ``dtype`` (integers over their whole range, floats standard normal)."""
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    if np.issubdtype(dt, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    return (rng.standard_normal(shape) * 3).astype(dt)  # float16/32/64, bfloat16, float8 (finite)


def check(got: Any, want: Any, side: Side, what: str) -> None:
    """``got`` is ``want`` as the pipe promises: None for None; else its values, shape and native dtype, bit for bit."""
    if want is None:
        assert got is None, f"{what}: sent None, got {type(got).__name__}"
        return
    assert got is not None, f"{what}: sent an array, got None"
    want = np.asarray(want)
    native = want.dtype.newbyteorder("=")
    if side.caps.on_device:
        assert isinstance(got, jax.Array), f"{what}: expected a jax.Array, got {type(got).__name__}"
        assert got.devices() == {side.devices()[0]}, f"{what}: on {got.devices()}, not the first device"
    else:
        assert isinstance(got, np.ndarray), f"{what}: expected a numpy array, got {type(got).__name__}"
    g = np.asarray(got)
    assert (g.dtype, g.shape) == (native, want.shape), f"{what}: got {g.dtype}{g.shape}, sent {want.dtype}{want.shape}"
    assert g.tobytes() == want.astype(native).tobytes(), f"{what}: the values differ"


def _send_all(side: Side, msgs: list[Any]) -> None:
    for m in msgs:
        side.pipe.send_tensor(m)


def _recv_all(side: Side, msgs: list[Any], what: str) -> None:
    for i, m in enumerate(msgs):
        check(side.pipe.recv_tensor(), m, side, f"{what} message {i}")


# The cases: each a function of (side, role) building its data from side.rng() ---------------------------


def _dtypes_data(side: Side) -> list[Any]:
    """Every dtype small and large (the inline and the data path), big-endian inputs, and JAX arrays."""
    rng, out = side.rng(), []
    for name in side.caps.dtypes():
        dt = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
        out.append(random_of(rng, dt, (3, 5)))
        out.append(random_of(rng, dt, (-(-LARGE // dt.itemsize) // 8, 8)))
        if dt.itemsize > 1 and dt.kind in "iufc" and dt.byteorder != "|":
            out.append(random_of(rng, dt, (4, 3)).astype(dt.newbyteorder(">")))  # arrives in native order
    out += [jnp.asarray(random_of(rng, np.float32, (6, 4)), jnp.bfloat16), jnp.asarray(random_of(rng, np.int8, (9,)))]
    return out


def dtypes(side: Side, role: str) -> None:
    msgs = _dtypes_data(side)
    _send_all(side, msgs) if role == "send" else _recv_all(side, msgs, "dtypes")


def dtypes_x64(side: Side, role: str) -> None:
    """With ``jax_enable_x64`` on (in this thread), device pipes carry the 64-bit dtypes too."""
    with jax.enable_x64(True):
        dtypes(side, role)


def _order_data(side: Side) -> tuple[list[Any], list[Any]]:
    """40 messages of mixed sizes (some on the data path) with None among them; 3 for the way back."""
    rng = side.rng()
    sizes = rng.integers(0, 3000, 40)
    sizes[rng.choice(40, 4, replace=False)] = 1 << 18  # 1 MiB
    sizes[rng.integers(40)] = 1 << 22  # 16 MiB: more than a socket buffer holds (partial sends)
    msgs = [
        None if i % 7 == 3 else random_of(rng, [np.float32, np.int32][i % 2], (int(n),)) for i, n in enumerate(sizes)
    ]
    back = [random_of(rng, np.float32, (int(n),)) for n in (5, 1 << 14, 7)]
    return msgs, back


def order(side: Side, role: str) -> None:
    msgs, back = _order_data(side)
    if role == "send":
        _send_all(side, msgs)
        if side.caps.two_way:
            _recv_all(side, back, "order, the way back,")
    else:
        _recv_all(side, msgs, "order")
        if side.caps.two_way:
            _send_all(side, back)


def none_is_a_flag(side: Side, role: str) -> None:
    """``None`` is a flag of the message: zeros, -1 and empty arrays come back as themselves."""
    msgs = [None, np.zeros(0, np.float32), np.array(-1), np.zeros((), np.float32), np.zeros(3, np.int32), None]
    msgs[2] = msgs[2].astype(np.int32)  # (a device pipe carries no int64 without x64)
    _send_all(side, msgs) if role == "send" else _recv_all(side, msgs, "none")


def empty(side: Side, role: str) -> None:
    rng = side.rng()
    shapes = [(0,), (0, 5), (3, 0, 2), (0, 0)]
    msgs = [random_of(rng, dt, s) for s in shapes for dt in (np.float32, ml_dtypes.bfloat16, np.int8, np.bool_)]
    _send_all(side, msgs) if role == "send" else _recv_all(side, msgs, "empty")


def scalars(side: Side, role: str) -> None:
    """0-d arrays (numpy scalars, 0-d arrays, a JAX scalar) arrive as 0-d arrays."""
    rng = side.rng()
    msgs = [
        np.float32(rng.standard_normal()),
        np.array(rng.integers(-100, 100), np.int32),
        np.array(rng.random() > 0.5),
        np.array(rng.standard_normal(), ml_dtypes.bfloat16),
        jnp.asarray(rng.standard_normal(), jnp.float32),
    ]
    _send_all(side, msgs) if role == "send" else _recv_all(side, msgs, "scalars")


def noncontiguous(side: Side, role: str) -> None:
    """Strided, Fortran-ordered, transposed, reversed and broadcast views arrive as their values."""
    rng = side.rng()
    base = random_of(rng, np.float32, (12, 18))
    big = random_of(rng, ml_dtypes.bfloat16, (96, 258))
    msgs = [
        base[::2, 1::3],
        np.asfortranarray(base),
        base.T,
        base[::-1, ::-2],
        np.broadcast_to(base[:1], (5, 18)),  # stride 0
        big[:, ::2],  # on the data path
        random_of(rng, np.int8, (40, 40, 3))[:, :, 1],
    ]
    _send_all(side, msgs) if role == "send" else _recv_all(side, msgs, "noncontiguous")


def kv_cache(side: Side, role: str) -> None:
    """A KV cache (``[batch, kv_heads, tokens, head_dim]``, mixed dtypes, an empty layer) split for the
    receiver's TP size, checked shard by shard against numpy's own cut; then a cache of one empty layer;
    then a tensor received as a KV cache: refused by name, and the pipe stays in step."""
    rng, heads = side.rng(), 2
    layers = [random_of(rng, dt, (3, heads, 5, 4)) for dt in (np.float32, ml_dtypes.bfloat16, np.int8, np.bool_)]
    layers.insert(2, random_of(rng, np.float32, (3, heads, 0, 4)))
    stray, after = random_of(rng, np.float32, (4, 4)), random_of(rng, np.float32, (6,))
    if role == "send":
        if side.caps.on_device:
            from spmd.kv_transfer import kv_head_sharding

            sharding = kv_head_sharding(side.devices(), heads, head_axis=1)
            side.pipe.send_kv_cache([jax.device_put(x, sharding) for x in layers], head_axis=1)
        else:
            side.pipe.send_kv_cache(layers, head_axis=1)
        side.pipe.send_kv_cache(layers[2:3], head_axis=1)
        side.pipe.send_tensor(stray)
        side.pipe.send_tensor(after)
        return
    devices = side.devices()
    got = side.pipe.recv_kv_cache()
    assert len(got) == len(layers)
    tp = len({s.device for s in got[0].addressable_shards})
    assert tp == len(devices), (tp, devices)
    for i, (x, y) in enumerate(zip(layers, got, strict=True)):
        assert (y.dtype, y.shape) == (x.dtype, x.shape), (i, y.dtype, y.shape)
        np.testing.assert_array_equal(np.asarray(y), x, err_msg=f"layer {i}")
        for shard in y.addressable_shards:
            r = devices.index(shard.device)
            # rank r of tp holds heads [r*h/tp, (r+1)*h/tp), or head r // (tp/h) when tp > h (replicated)
            lo, hi = (r * heads // tp, (r + 1) * heads // tp) if tp <= heads else (r * heads // tp, r * heads // tp + 1)
            np.testing.assert_array_equal(np.asarray(shard.data), x[:, lo:hi], err_msg=f"layer {i} rank {r}")
    (y,) = side.pipe.recv_kv_cache()
    assert y.shape == (3, heads, 0, 4) and y.dtype == np.float32
    with pytest.raises(ValueError, match=r"expected the KV[- ]cache.*sent by send_kv_cache"):
        side.pipe.recv_kv_cache()
    check(side.pipe.recv_tensor(), after, side, "the message after the refused one")


def bad_input(side: Side, role: str) -> None:
    """What cannot travel is refused before anything is sent, with a TypeError/ValueError naming it;
    the pipe then carries the next message as if nothing had happened."""
    ok = random_of(side.rng(), np.float32, (5,))
    if role == "recv":
        check(side.pipe.recv_tensor(), ok, side, "the message after the refused ones")
        return
    p = side.pipe
    with pytest.raises(TypeError, match=r"send_tensor: expected a numpy or JAX array \(or None\), got list"):
        p.send_tensor([1.0, 2.0])
    with pytest.raises(TypeError, match=r"expected a numpy or JAX array \(or None\), got str"):
        p.send_tensor("text")
    with pytest.raises(TypeError, match=r"cannot send an array of dtype object; allowed: \["):
        p.send_tensor(np.array([object()]))
    with pytest.raises(TypeError, match=r"cannot send an array of dtype <U1"):
        p.send_tensor(np.array(["a"]))
    if side.caps.on_device and not jax.config.jax_enable_x64:
        for dt in sorted(_64BIT):
            with pytest.raises(TypeError, match=rf"a {dt} array would be truncated to 32 bits"):
                p.send_tensor(np.zeros(3, dt))
    with pytest.raises(ValueError, match="send_kv_cache: expected at least one layer, got none"):
        p.send_kv_cache([])
    with pytest.raises(ValueError, match=r"send_kv_cache: layers disagree on the number of KV heads: \[2, 4\]"):
        p.send_kv_cache([np.zeros((2, 4), np.float32), np.zeros((4, 4), np.float32)])
    with pytest.raises(ValueError, match="send_kv_cache: head_axis must be a non-negative int, got -1"):
        p.send_kv_cache([np.zeros((2, 4), np.float32)], head_axis=-1)
    with pytest.raises(ValueError, match=r"send_kv_cache: layer 0 has shape \[2\], with no KV heads on axis 1"):
        p.send_kv_cache([np.zeros(2, np.float32)], head_axis=1)
    p.send_tensor(ok)


def closing(side: Side, role: str) -> None:
    """close() is idempotent; a closed end refuses both calls; the peer's receive raises (``Caps.peer_closed``)."""
    p = side.pipe
    if role == "send":
        assert not p.closed
        p.close()
        p.close()
        assert p.closed
        with pytest.raises(ValueError, match=r"send_tensor: the pipe is closed"):
            p.send_tensor(np.ones(2, np.float32))
        with pytest.raises(ValueError, match=r"recv_tensor: the pipe is closed"):
            p.recv_tensor()
        side.sync("closed")
        return
    side.sync("closed")
    error, match = side.caps.peer_closed
    with pytest.raises(error, match=match):
        p.recv_tensor()
    with p:  # a context manager: closed on exit, after a close by the peer too
        pass
    assert p.closed
    p.close()
    with pytest.raises(ValueError, match=r"recv_tensor: the pipe is closed"):
        p.recv_tensor()


def recv_timeout(side: Side, role: str) -> None:
    """A receive with nothing sent raises TimeoutError after the pipe's timeout and consumes nothing."""
    x = random_of(side.rng(), np.float32, (1 << 13,))
    if role == "send":
        side.sync("timed out")
        side.pipe.send_tensor(x)
        return
    with pytest.raises(TimeoutError, match=side.caps.timed_out):
        side.pipe.recv_tensor()
    side.sync("timed out")
    check(side.pipe.recv_tensor(), x, side, "the message after the timeout")


_ALL = (dtypes, dtypes_x64, order, none_is_a_flag, empty, scalars, noncontiguous, kv_cache, bad_input, closing)
CASES: dict[str, Callable[[Side, str], None]] = {f.__name__: f for f in (*_ALL, recv_timeout)}
TIMEOUT_S = {"recv_timeout": 0.5, "closing": 2.0}
"""The pipes' timeout per case (default :data:`DEFAULT_TIMEOUT_S`): short where the case waits one out."""
DEFAULT_TIMEOUT_S = 20.0
