"""IpcKVPipe's readiness protocol (``spmd.kv_transfer._slots``), run step by step under a weak memory model.

A sender and a receiver run the pipe's own protocol generators (``publish`` / ``receive``),
interleaved by a seeded random scheduler. Shared memory is emulated with store buffers: a store is
pending until the scheduler commits it, in ANY order, except that stores issued before a
``release`` commit before stores issued after it; loads see committed bytes only. Acks travel on
an emulated channel that delivers them late. Every run checks that the receiver got each message's
exact bytes, in order, without an error. The protocol passes every schedule drawn; each of the
bugs it guards against (no release before the epoch, an epoch reused, a slot reused before its
ack) is planted once below and caught.
"""

from __future__ import annotations

import json
import random

import pytest

from spmd.kv_transfer import _slots

CHUNKS, CHUNK = 4, 8


class WeakMemory:
    """Header and data regions per slot, written through a store buffer that commits out of order."""

    def __init__(self, rng: random.Random, releases: bool = True) -> None:
        self.rng, self.releases = rng, releases
        self.mem: dict[tuple[str, int], bytearray] = {}
        self.pending: list[tuple[int, tuple[str, int], int, bytes]] = []
        self.fences = 0

    def _region(self, key):
        return self.mem.setdefault(key, bytearray(_slots.HEADER_BYTES))

    def _store(self, key, offset, data):
        self.pending.append((self.fences, key, offset, bytes(data)))

    def store(self, slot, offset, data):  # the header (the protocol's own stores)
        self._store(("h", slot), offset, data)

    def store_data(self, slot, offset, data):
        self._store(("d", slot), offset, data)

    def release(self, slot):
        if self.releases:
            self.fences += 1

    def commit_one(self) -> None:
        oldest = min(p[0] for p in self.pending)
        i = self.rng.choice([i for i, p in enumerate(self.pending) if p[0] == oldest])
        _, key, offset, data = self.pending.pop(i)
        self._region(key)[offset : offset + len(data)] = data

    def load(self, slot, offset, n):
        return bytes(self._region(("h", slot))[offset : offset + n])

    def load_data(self, slot, offset, n):
        return bytes(self._region(("d", slot))[offset : offset + n])

    def acquire(self, slot):
        pass


def payload(seq: int) -> list[bytes]:
    return [bytes([seq % 251, i]) * (CHUNK // 2) for i in range(CHUNKS)]


def run_schedule(seed: int, messages: int = 6, *, releases: bool = True, ignore_acks: bool = False):
    """One seeded interleaving of a sender and a receiver; what the receiver got (or the error it raised)."""
    rng = random.Random(seed)
    mem = WeakMemory(rng, releases)
    state = {"acked": 0, "acks_in_flight": []}

    def write_data(seq):
        def gen(slot):
            for i, chunk in enumerate(payload(seq)):
                mem.store_data(slot, i * CHUNK, chunk)
                yield _slots.STEP

        return gen

    def read_data(layout, inline):
        slot, out = layout["seq"] % _slots.SLOTS, []
        for i in range(layout["n"]):
            out.append(mem.load_data(slot, i * CHUNK, CHUNK))
            yield _slots.STEP
        return out

    def sender():
        for seq in range(messages):
            layout = json.dumps({"seq": seq, "n": CHUNKS}).encode()
            acked = (lambda: 1 << 30) if ignore_acks else (lambda: state["acked"])
            yield from _slots.publish(mem, seq, layout, write_data(seq), acked)

    got: list = []

    def receiver():
        for seq in range(messages):
            got.append((yield from _slots.receive(mem, seq, read_data, "emulation")))
            state["acks_in_flight"].append(seq + 1)  # batched: "taken up to seq + 1"

    actors = {"sender": sender(), "receiver": receiver()}
    for _ in range(20000):
        moves = list(actors) + ["commit"] * bool(mem.pending) + ["ack"] * bool(state["acks_in_flight"])
        if not actors and not mem.pending:
            return got
        move = rng.choice(moves)
        if move == "commit":
            mem.commit_one()
        elif move == "ack":
            state["acked"] = state["acks_in_flight"].pop(0)
        else:
            try:
                next(actors[move])
            except StopIteration:
                del actors[move]
            except ValueError as e:
                return e
    raise AssertionError("the emulation did not finish in 20000 steps (a livelock)")


def first_failure(seeds, **kw):
    want = [payload(s) for s in range(6)]
    for seed in seeds:
        got = run_schedule(seed, **kw)
        if got != want:
            return seed, got
    return None


def test_the_protocol_passes_every_schedule_drawn():
    assert first_failure(range(400)) is None


def test_a_missing_release_is_caught():
    """Without the release, the epoch may land before the data: the receiver copies stale bytes."""
    assert first_failure(range(400), releases=False) is not None


def test_a_reused_epoch_is_caught(monkeypatch):
    """Epochs by slot parity (1, 2, 1, 2, ...): a slot's previous message passes for the next one."""
    monkeypatch.setattr(_slots, "epoch_of", lambda seq: seq % _slots.SLOTS + 1)
    failure = first_failure(range(400))
    assert failure is not None


def test_a_slot_reused_before_its_ack_is_caught():
    """A sender that does not wait for acks overwrites a slot the receiver is still reading."""
    failure = first_failure(range(400), ignore_acks=True)
    assert failure is not None


def test_the_receiver_refuses_an_epoch_from_neither_this_nor_the_previous_message():
    mem = WeakMemory(random.Random(0))
    mem.store(0, 8, (7).to_bytes(8, "little"))
    mem.commit_one()
    with pytest.raises(ValueError, match="slot 0 holds epoch 7, expected 1"):
        _slots.run(_slots.receive(mem, 0, None, "recv"), lambda: None)


@pytest.mark.parametrize(
    ("layout", "match"),
    [(b"\xff", "malformed layout"), (b"[1]", "expected the layout of message 0"), (b'{"seq": 3}', "message 0")],
)
def test_the_receiver_refuses_a_malformed_layout(layout, match):
    mem = WeakMemory(random.Random(0))
    gen = _slots.publish(mem, 0, layout, lambda slot: iter(()), lambda: 0)
    _slots.run(gen, lambda: None)
    while mem.pending:
        mem.commit_one()
    with pytest.raises(ValueError, match=match):
        _slots.run(_slots.receive(mem, 0, None, "recv"), lambda: None)
