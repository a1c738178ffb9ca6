"""What the step-by-step flag-protocol emulations share (tests/test_pull_protocol.py, tests/test_two_shot_protocol.py).

A protocol is a function ``block(rank, call, block_index) -> generator``: each ``next`` is one
atomic action of that thread block; it yields ``"spin"`` for a wait whose condition does not hold
yet (anything else is a step). :func:`run_kernels` interleaves them as GPUs would: the blocks of one
kernel in any order (a seeded random choice), the kernels of one rank in stream order (the next
starts when every block of the previous has finished), ranks independently. With a
:class:`WeakMemory`, stores wait in per-agent buffers and reach memory one at a time in any order
(drained at random between actions), unless a fence pushes them out; the end of a kernel publishes
its blocks' stores (stream order). Without one the protocol's own dicts are its memory (sequentially
consistent). Calls are ``(kind, blocks, data[rank][block][cell])`` with integer data, so every sum
is exact and a result is right or wrong.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np

__all__ = ["WeakMemory", "random_calls", "run_kernels", "wrong_sums"]


class WeakMemory:
    """Committed memory plus, per agent (a rank's block), stores not yet visible to others."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.mem: dict = {}
        self.pending: dict = {}

    def load(self, agent, key, default=None):
        for k, v in reversed(self.pending.get(agent, [])):  # an agent sees its own stores
            if k == key:
                return v
        return self.mem.get(key, default)

    def store(self, agent, key, value) -> None:
        self.pending.setdefault(agent, []).append((key, value))

    def fence(self, agent) -> None:
        for k, v in self.pending.pop(agent, []):
            self.mem[k] = v

    def drain_one(self) -> bool:
        """One waiting store reaches memory (any agent's, any of them: stores to other addresses reorder)."""
        agents = [a for a, q in self.pending.items() if q]
        if not agents:
            return False
        q = self.pending[self.rnd.choice(agents)]
        i = self.rnd.randrange(len(q))
        key, value = q[i]
        self.mem[key] = value
        q[:] = [e for j, e in enumerate(q) if j > i or e[0] != key]  # older stores to the same address are gone
        return True


def run_kernels(
    n: int,
    calls: list,
    block: Callable[[int, int, int], Iterator],
    rnd: random.Random,
    *,
    spin_limit: int,
    memory: WeakMemory | None = None,
) -> str:
    """Run every rank's kernels (call ``k`` has ``calls[k][1]`` blocks) under one random interleaving.

    Returns ``"done"``, or ``"hang"`` once ``spin_limit`` spins have been taken.
    """

    def rank_program(r):
        for k, (_, blocks, _) in enumerate(calls):
            running = [block(r, k, b) for b in range(blocks)]
            while running:  # one kernel: its blocks interleave; the next starts when all are done
                g = rnd.choice(running)
                try:
                    yield next(g)
                except StopIteration:
                    running.remove(g)
            if memory is not None:
                for b in range(blocks):  # a kernel's end publishes its stores (stream order)
                    memory.fence((r, b))

    progs = {r: rank_program(r) for r in range(n)}
    spins = 0
    while progs:
        if memory is not None and rnd.random() < 0.3 and memory.drain_one():
            continue
        r = rnd.choice(list(progs))
        try:
            if next(progs[r]) == "spin":
                spins += 1
                if spins > spin_limit:
                    return "hang"
        except StopIteration:
            del progs[r]
    return "done"


def random_calls(n: int, count: int, rng: np.random.Generator, *, max_blocks: int, cells: int, kinds=("",)) -> list:
    """``count`` calls ``(kind, blocks in [1, max_blocks], data int[n][blocks][cells] in [-50, 50))``."""
    calls = []
    for _ in range(count):
        blocks = int(rng.integers(1, max_blocks + 1))
        data = rng.integers(-50, 50, size=(n, blocks, cells)).tolist()
        calls.append((str(rng.choice(kinds)), blocks, data))
    return calls


def wrong_sums(n: int, calls: list, results: dict) -> int:
    """How many ``results[(rank, call, block)]`` differ from the sum over ranks of that block's data."""
    bad = 0
    for k, (_, blocks, data) in enumerate(calls):
        for b in range(blocks):
            want = np.sum(np.array([data[r][b] for r in range(n)]), axis=0).tolist()
            bad += sum(results.get((r, k, b)) != want for r in range(n))
    return bad
