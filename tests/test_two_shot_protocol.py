"""The GPU two-shot's flag protocol, emulated step by step on weak memory, and its data movement against numpy.

The kernel (kernels/custom_all_reduce/two_shot.py) runs only on NVIDIA GPUs. Here:

- an emulation of its protocol, mixed with the pull one-shot's (they share the per-block epoch
  counters, the flags and the staging slots): every step of every block of every rank is one
  atomic action and a random scheduler interleaves them (blocks of one kernel in any order,
  kernels of one rank in order, ranks independently). Stores are weak: each block's data stores
  wait in its own buffer and reach memory one at a time in any order, unless a fence (the
  release before a flag) pushes them all out; a flag store is seen at once (the worst case for
  a missing fence). Data are integers, so sums are exact. Each deliberate break (a missing
  fence in either round, a reused epoch, one epoch per call, a wrong chunk owner, the staging
  parity of the second epoch) gives a wrong sum or a hang under some interleaving (the scheduler and
  the weak memory: tests/protocol_emulation.py, shared with tests/test_pull_protocol.py);
- the kernel's split of a message (``padded_plan``, ``chunk_bytes``, ``thread_rounds``) replayed
  in numpy at uneven sizes: every 16-byte unit is reduced exactly once, and the result is
  numpy's float32 rank-order sum, bit for bit.
"""

from __future__ import annotations

import random

import ml_dtypes
import numpy as np
import pytest
from protocol_emulation import WeakMemory, random_calls, run_kernels, wrong_sums

from kernels.custom_all_reduce import peer, two_shot
from kernels.symmetric_memory import TILE_BYTES, Layout

BUGS = ("no_fence_stage", "no_fence_gather", "reused_epoch", "one_epoch_per_call", "wrong_owner", "parity_of_e2")


def _passes(flag: int, epoch: int) -> bool:
    return (flag - epoch) % 2**32 <= 1  # the kernels' unsigned window: epoch or epoch + 1


def emulate(n, calls, *, seed, bug=None, cells_per_rank=2):
    """Run ``calls`` (``(kind, blocks, data[rank][block][cell])``) on ``n`` emulated ranks.

    Returns ``("done" | "hang", {(rank, call, block): cells})``.
    """
    rnd = random.Random(seed)
    mem = WeakMemory(rnd)
    counters = {}
    results = {}
    cells = n * cells_per_rank

    def wait(agent, r, b, epoch):
        for s in range(n):
            while not _passes(mem.load(agent, ("flag", r, b, s), 0), epoch):
                yield "spin"

    def signal(agent, r, b, epoch, fence=True):
        if fence:
            mem.fence(agent)
            yield
        for s in range(n):
            mem.mem[("flag", s, b, r)] = epoch  # relaxed store: seen at once
            yield

    def pull(r, k, b):
        x = calls[k][2][r][b]
        agent = (r, b)
        epoch = counters.get(agent, 0) + 1
        p = epoch % 2
        for c in range(cells):
            mem.store(agent, ("stage", r, p, b, c), x[c])
            yield
        yield from signal(agent, r, b, epoch)
        yield from wait(agent, r, b, epoch)
        out = [0] * cells
        for j in range(n):
            for c in range(cells):
                out[c] += mem.load(agent, ("stage", j, p, b, c), 10**9)  # never staged: garbage
                yield
        results[(r, k, b)] = out
        counters[agent] = epoch

    def two_shot_block(r, k, b):
        x = calls[k][2][r][b]
        agent = (r, b)
        e1 = 1 if bug == "reused_epoch" else counters.get(agent, 0) + 1
        e2 = e1 + 1
        p = (e2 if bug == "parity_of_e2" else e1) % 2
        for c in range(cells):
            mem.store(agent, ("stage", r, p, b, c), x[c])
            yield
        yield from signal(agent, r, b, e1, fence=bug != "no_fence_stage")
        yield from wait(agent, r, b, e1)
        owner = (r + 1) % n if bug == "wrong_owner" and r == 0 else r  # rank 0 takes rank 1's chunk
        for c in range(owner * cells_per_rank, (owner + 1) * cells_per_rank):
            total = 0
            for j in range(n):  # reduce-scatter: read every rank's copy of my chunk
                total += mem.load(agent, ("stage", j, p, b, c), 10**9)
                yield
            for j in range(n):  # all-gather: write the sum into every rank's slot
                mem.store(agent, ("stage", j, p, b, c), total)
                yield
        yield from signal(agent, r, b, e2, fence=bug != "no_fence_gather")
        yield from wait(agent, r, b, e2)
        out = []
        for c in range(cells):
            out.append(mem.load(agent, ("stage", r, p, b, c), 10**9))
            yield
        results[(r, k, b)] = out
        counters[agent] = e1 if bug == "one_epoch_per_call" else e2

    def block(r, k, b):
        return pull(r, k, b) if calls[k][0] == "pull" else two_shot_block(r, k, b)

    return run_kernels(n, calls, block, rnd, spin_limit=50_000, memory=mem), results


def _calls(n, count, rng, *, cells_per_rank=2):
    return random_calls(n, count, rng, max_blocks=3, cells=n * cells_per_rank, kinds=("pull", "two_shot"))


@pytest.mark.parametrize("n", [2, 4])
def test_two_shot_protocol_is_exact_under_weak_memory_and_random_interleavings(n, rng):
    for seed in range(25):
        calls = _calls(n, 10, rng)
        state, results = emulate(n, calls, seed=seed)
        assert state == "done"
        assert wrong_sums(n, calls, results) == 0


@pytest.mark.parametrize("bug", BUGS)
def test_two_shot_protocol_emulation_catches_each_broken_variant(bug, rng):
    """Each deliberate break gives a wrong sum or a hang under some interleaving (30 tried)."""
    caught = 0
    for seed in range(30):
        calls = _calls(2, 10, rng)
        state, results = emulate(2, calls, seed=seed, bug=bug)
        caught += state == "hang" or wrong_sums(2, calls, results) > 0
        if caught:  # one exposure is the finding; the rest (a hang costs the whole spin limit) add nothing
            break
    assert caught > 0, f"no interleaving exposed the {bug} variant"


def test_weak_memory_lets_a_flag_overtake_unfenced_data():
    """The model itself: without a fence another agent may see the flag and still read the old value."""
    mem = WeakMemory(random.Random(0))
    mem.store("a", "data", 1)
    mem.mem["flag"] = 1
    assert mem.load("a", "data") == 1 and mem.load("b", "data", 0) == 0  # the writer sees it, others not yet
    mem.fence("a")
    assert mem.load("b", "data", 0) == 1
    mem.store("a", "x", 1)
    mem.store("a", "x", 2)
    while mem.drain_one():
        pass
    assert mem.mem["x"] == 2  # per-address order is kept


# ---------------------------------------------------------------------------------------------
# The kernel's split of a message, replayed in numpy at uneven sizes


def replay_two_shot(xs: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """What the kernel computes for per-rank inputs ``xs[n, numel]``: ``(output of every rank, times
    each 16-byte unit of the padded message was reduced)``, following its plan unit by unit."""
    n, numel = xs.shape
    itemsize = xs.dtype.itemsize
    padded_bytes, plan, _ = peer.padded_plan(numel * itemsize, layout, "pull")
    per_unit = two_shot.UNIT_BYTES // itemsize
    staging = np.zeros((n, padded_bytes // itemsize), xs.dtype)
    staging[:, :numel] = xs  # step 1: every rank stages its input (padding zeros)
    chunk = two_shot.chunk_bytes(plan.tiles_per_block, n)
    offsets = []  # step 2: rank r reduces its chunk of block b, thread t the unit t + 128 k of round k
    for b in range(plan.blocks):
        for r in range(n):
            for k, busy in enumerate(two_shot.thread_rounds(plan.tiles_per_block, n)):
                t = np.arange(busy)
                offsets.append(b * plan.tiles_per_block * TILE_BYTES + r * chunk + (k * two_shot.THREADS + t) * 16)
    offsets = np.concatenate(offsets)
    reduced = np.bincount(offsets // two_shot.UNIT_BYTES, minlength=padded_bytes // two_shot.UNIT_BYTES)
    idx = (offsets // itemsize)[:, None] + np.arange(per_unit)[None, :]
    acc = staging[0, idx].astype(np.float32)
    for j in range(1, n):  # rank order, float32
        acc = acc + staging[j, idx].astype(np.float32)
    staging[:, idx] = acc.astype(xs.dtype)[None]  # written into every rank's slot
    return staging[:, :numel], reduced  # step 3: every rank copies its slot out


def _rank_order_sum(xs: np.ndarray) -> np.ndarray:
    acc = xs[0].astype(np.float32)
    for j in range(1, len(xs)):
        acc = acc + xs[j].astype(np.float32)
    return acc.astype(xs.dtype)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize(
    "dtype,numel",
    [
        (ml_dtypes.bfloat16, 8),  # 16 bytes: a sliver of one tile
        (ml_dtypes.bfloat16, 1000),  # not whole tiles
        (np.float32, 3 * 512 + 4),  # 3 tiles + 16 bytes: not divisible by any world size in tiles
        (np.float16, 131 * 1024),  # 131 tiles: no even split over 128 blocks (padded to 132)
        (ml_dtypes.bfloat16, 262 * 1024 - 8),  # hidden 2048 x 131 tokens, less one unit
        (np.float32, 300 * 512 + 12),  # 300 tiles + 48 bytes: 3 tiles per block, not a multiple of n
        (ml_dtypes.bfloat16, 1 << 20),  # the staging area's 2 MiB: 8 tiles per block
    ],
)
def test_two_shot_split_reduces_every_unit_once_and_matches_numpy(n, dtype, numel, rng):
    xs = rng.standard_normal((n, numel)).astype(np.float32).astype(dtype)
    out, reduced = replay_two_shot(xs, Layout())
    assert (reduced == 1).all(), f"units reduced {sorted(set(reduced.tolist()))} times, expected once each"
    want = _rank_order_sum(xs)
    for r in range(n):
        np.testing.assert_array_equal(out[r].view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize(
    "tpb,n,want",
    [(1, 2, [64]), (1, 8, [16]), (3, 2, [128, 64]), (8, 2, [128] * 4), (3, 4, [96]), (8, 8, [128]), (5, 4, [128, 32])],
)
def test_thread_rounds_literal_values(tpb, n, want):
    assert two_shot.thread_rounds(tpb, n) == want
    assert sum(want) * two_shot.UNIT_BYTES == two_shot.chunk_bytes(tpb, n) == tpb * TILE_BYTES // n
