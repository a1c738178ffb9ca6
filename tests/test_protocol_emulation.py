"""The shared emulation machinery itself (tests/protocol_emulation.py): what the protocol tests rely on
the scheduler and the weak memory to do, each shown by a tiny program that needs it."""

from __future__ import annotations

import random

import numpy as np
import pytest
from protocol_emulation import WeakMemory, random_calls, run_kernels, wrong_sums


@pytest.mark.parametrize("seed", range(5))
def test_blocks_of_one_kernel_interleave(seed):
    """Block 0 waits for a step of block 1 of the same kernel: only an interleaving scheduler finishes."""
    seen = set()

    def block(r, k, b):
        if b == 0:
            while 1 not in seen:
                yield "spin"
        else:
            seen.add(1)
            yield

    assert run_kernels(1, [("", 2, None)], block, random.Random(seed), spin_limit=1000) == "done"


@pytest.mark.parametrize("seed", range(5))
def test_weak_stores_drain_while_their_writer_still_runs(seed):
    """Rank 0 stores without a fence and waits for rank 1 to see it: the memory must drain on its own."""
    rnd = random.Random(seed)
    mem = WeakMemory(rnd)
    seen = []

    def block(r, k, b):
        if r == 0:
            mem.store((0, 0), "x", 7)
            yield
            while not seen:
                yield "spin"
        else:
            while mem.load((1, 0), "x") != 7:
                yield "spin"
            seen.append(True)

    assert run_kernels(2, [("", 1, None)], block, rnd, spin_limit=10_000, memory=mem) == "done"


@pytest.mark.parametrize("seed", range(5))
def test_a_kernels_end_publishes_its_stores(seed):
    """Stream order: what kernel 0 stored (no fence) is visible to another agent when kernel 1 starts."""
    rnd = random.Random(seed)
    mem = WeakMemory(rnd)
    got = []

    def block(r, k, b):
        if k == 0:
            for i in range(20):
                mem.store((0, 0), i, i)
                yield
        else:
            got.extend(mem.load("someone else", i) for i in range(20))
            yield

    assert run_kernels(1, [("", 1, None), ("", 1, None)], block, rnd, spin_limit=10, memory=mem) == "done"
    assert got == list(range(20))


def test_a_wait_that_never_ends_is_a_hang():
    def block(r, k, b):
        while True:
            yield "spin"

    assert run_kernels(2, [("", 1, None)], block, random.Random(0), spin_limit=50) == "hang"


def test_random_calls_and_wrong_sums(rng):
    calls = random_calls(3, 6, rng, max_blocks=2, cells=4, kinds=("a", "b"))
    assert all(kind in ("a", "b") and 1 <= blocks <= 2 for kind, blocks, _ in calls)
    right = {
        (r, k, b): np.sum([data[s][b] for s in range(3)], axis=0).tolist()
        for k, (_, blocks, data) in enumerate(calls)
        for b in range(blocks)
        for r in range(3)
    }
    assert wrong_sums(3, calls, right) == 0
    key = next(iter(right))
    right[key] = [v + 1 for v in right[key]]
    assert wrong_sums(3, calls, right) == 1
