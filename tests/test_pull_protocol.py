"""The pull one-shot's flag protocol (kernels/custom_all_reduce/peer.py), emulated step by step on CPU.

Every step of every block of every rank is one atomic action and a random scheduler interleaves
them (kernels on one GPU run in order, blocks of one kernel in any order, GPUs independently).
Data are integers, so sums are exact. Each deliberate break (one staging buffer instead of two,
a reused epoch, a signal before the data is staged, an equality test that misses a fast peer)
gives a wrong sum or a hang under some interleaving. The two-shot's protocol, mixed with this one
on weak memory: tests/test_two_shot_protocol.py; the scheduler both use: tests/protocol_emulation.py.
"""

from __future__ import annotations

import random

import pytest
from protocol_emulation import random_calls, run_kernels, wrong_sums


def _emulate(n, calls, *, seed, bug=None, max_blocks=4):
    """Run ``calls`` (``(kind, blocks, data[rank][block][cell])``) on ``n`` ranks: ``("done" | "hang", results)``."""
    rnd = random.Random(seed)
    stage = {}  # (rank, parity, block) -> values
    flags = {(r, b, s): 0 for r in range(n) for b in range(max_blocks) for s in range(n)}
    counters = {(r, b): 0 for r in range(n) for b in range(max_blocks)}
    results = {}

    def block_steps(r, k, b):
        x = calls[k][2][r][b]
        epoch = counters[(r, b)] + 1
        parity = 0 if bug == "single_buffer" else epoch % 2
        if bug == "reused_epoch":
            epoch = 1
        if bug != "signal_first":
            stage[(r, parity, b)] = list(x)
            yield
        for s in range(n):
            flags[(s, b, r)] = epoch
            yield
        if bug == "signal_first":
            stage[(r, parity, b)] = list(x)
            yield
        for s in range(n):
            while not (flags[(r, b, s)] == epoch if bug == "equality" else flags[(r, b, s)] - epoch >= 0):
                yield "spin"
        out = [0] * len(x)
        for j in range(n):
            vals = stage.get((j, parity, b), [10**9] * len(x))  # never staged: garbage
            yield
            out = [o + v for o, v in zip(out, vals, strict=True)]
        results[(r, k, b)] = out
        counters[(r, b)] = epoch

    return run_kernels(n, calls, block_steps, rnd, spin_limit=100_000), results  # memory: these dicts (SC)


def _calls(n, count, rng):
    return random_calls(n, count, rng, max_blocks=4, cells=3, kinds=("pull",))


@pytest.mark.parametrize("n", [2, 4])
def test_flag_protocol_emulated_is_exact_under_random_interleavings(n, rng):
    for seed in range(30):
        calls = _calls(n, 12, rng)
        state, results = _emulate(n, calls, seed=seed)
        assert state == "done"
        assert wrong_sums(n, calls, results) == 0


@pytest.mark.parametrize("bug", ["single_buffer", "reused_epoch", "signal_first", "equality"])
def test_flag_protocol_emulation_catches_broken_variants(bug, rng):
    """Each deliberate break of the protocol gives a wrong sum or a hang under some interleaving."""
    caught = 0
    for seed in range(60):
        calls = _calls(2, 12, rng)
        state, results = _emulate(2, calls, seed=seed, bug=bug)
        caught += state == "hang" or wrong_sums(2, calls, results) > 0
        if caught:  # one exposure is the finding; the rest (a hang costs the whole spin limit) add nothing
            break
    assert caught > 0, f"no interleaving exposed the {bug} variant"
