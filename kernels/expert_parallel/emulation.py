"""The low-latency dispatch/combine, step by step on CPU: the kernel's flag protocol under a random scheduler.

Every step of every thread block of every rank is one atomic action, and a seeded random
scheduler interleaves them: blocks of one kernel in any order, the kernels of one rank in stream
order (dispatch, then combine, then the next call's dispatch), ranks independently. Stores to a
peer are weak: each is queued and delivered whenever the scheduler chooses, in any order, unless
a fence (``fence.acq_rel.sys``) makes the block wait until everything it stored has landed. A
wait (``ld.acquire.sys`` spin) is an action that can run only once its condition holds; when
nothing can run and work is left, the run has hung. Each call routes fresh integer tokens to
experts that multiply by ``expert + 1``, with integer weights, so every sum is exact and a result
either equals the dense reference or is wrong.

The protocol is :mod:`kernels.expert_parallel.exchange`'s (one chunk per destination here).
``breaks`` removes one safeguard on purpose, to show the emulation catches it:

* ``"no_fence"``: the flag store is not preceded by a fence (data may land after it);
* ``"reused_epoch"``: the epoch counter never moves (every call waits for epoch 1);
* ``"wrong_slot"``: a sender writes its rows into the destination's own slot instead of its own;
* ``"one_buffer"``: no double buffering (parity always 0). Harmless when every dispatch is
  followed by its combine (the combine's flags hold a fast peer back by a whole exchange: found
  by this emulation), wrong for exchanges back to back (``combine=False``), which the kernel
  allows, so the parity stays;
* ``"count_twice"``: a token is sent once per chosen expert instead of once per rank.

The combine runs in one of two forms (``combine_form``):

* ``"push"`` (the kernel's): the owner writes each source's partial sums into the source's buffer
  (the exchange above, its own region and epochs);
* ``"pull"``: the owner stages each source's partial sums in its OWN buffer (``pdata[p][source]``,
  plain local stores), fences, and stores the epoch into the source's flag; the source spins on that
  flag, then reads the rows from the owner's buffer (peer loads), as many as it sent there (it knows
  its own counts). Nothing is written to a peer but the flag. The same breaks apply: ``no_fence``
  (the flag may overtake the staged rows), ``reused_epoch`` (a stale flag passes), ``wrong_slot``
  (the owner stages a source's rows in its own index's slot), ``count_twice``; ``one_buffer`` is
  harmless here too while every combine follows its dispatch (an owner restages parity ``p`` only
  after the next dispatch, which every source starts after finishing its reads).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["BREAKS", "COMBINE_FORMS", "EmulationResult", "emulate"]

BREAKS = ("no_fence", "reused_epoch", "wrong_slot", "one_buffer", "count_twice")
COMBINE_FORMS = ("push", "pull")


@dataclasses.dataclass
class EmulationResult:
    """What a run saw: ``wrong`` calls (call index, rank), whether it ``hung``, and the actions run."""

    wrong: list[tuple[int, int]]
    hung: bool
    steps: int

    @property
    def ok(self) -> bool:
        return not self.wrong and not self.hung


class _World:
    def __init__(self, ep: int, rng: random.Random):
        self.mem: list[dict[Any, Any]] = [{} for _ in range(ep)]
        self.pending: dict[tuple[int, int], list[tuple[int, Any, Any]]] = {}
        self.rng = rng

    def store(self, who: tuple[int, int], rank: int, addr: Any, value: Any) -> None:
        self.pending.setdefault(who, []).append((rank, addr, value))

    def deliver_one(self) -> bool:
        live = [k for k, v in self.pending.items() if v]
        if not live:
            return False
        q = self.pending[self.rng.choice(live)]
        rank, addr, value = q.pop(self.rng.randrange(len(q)))
        self.mem[rank][addr] = value
        return True

    def flushed(self, who: tuple[int, int]) -> bool:
        return not self.pending.get(who)


def _block(world: _World, me: int, b: int, region: int, send: list, counts: list, out: dict, ep: int, brk: str):
    """One thread block's program (a generator of ``("step",)`` / ``("wait", predicate)`` actions)."""
    mem, who = world.mem[me], (me, region * 1000 + b)
    counter = ("counter", region, b)
    epoch = (0 if brk == "reused_epoch" else mem.get(counter, 0)) + 1
    p = 0 if brk == "one_buffer" else epoch % 2
    yield ("step",)
    d, s = (me + b) % ep, (me - b) % ep
    slot = d if brk == "wrong_slot" else me
    for i in range(counts[d]):
        world.store(who, d, ("data", region, p, slot, i), send[d][i])
        yield ("step",)
    world.store(who, d, ("rowcount", region, p, b, me), counts[d])
    yield ("step",)
    if brk != "no_fence":
        yield ("wait", lambda: world.flushed(who))
    world.store(who, d, ("flag", region, b, me), epoch)
    yield ("step",)
    yield ("wait", lambda: 0 <= mem.get(("flag", region, b, s), 0) - epoch <= 1)
    n = mem.get(("rowcount", region, p, b, s), 0)
    rows = []
    for i in range(n):
        rows.append(mem.get(("data", region, p, s, i)))
        yield ("step",)
    out[s] = rows
    mem[counter] = epoch
    yield ("step",)


def _pull_block(world: _World, me: int, b: int, region: int, back: list, sent: list, out: dict, ep: int, brk: str):
    """One thread block of the pull combine: stage rows for source ``d`` here, flag ``d``; read mine from ``o``.

    ``back[d]``: this owner's partial sums for source ``d``'s rows; ``sent[o]``: how many rows this
    rank sent owner ``o`` at dispatch (the rows it reads back).
    """
    mem, who = world.mem[me], (me, region * 1000 + b)
    counter = ("counter", region, b)
    epoch = (0 if brk == "reused_epoch" else mem.get(counter, 0)) + 1
    p = 0 if brk == "one_buffer" else epoch % 2
    yield ("step",)
    d, o = (me + b) % ep, (me - b) % ep  # stage for d (whose block b reads from me); read from o
    slot = me if brk == "wrong_slot" else d
    for i, row in enumerate(back[d]):
        world.store(who, me, ("pdata", region, p, slot, i), row)  # local, but weak until delivered
        yield ("step",)
    if brk != "no_fence":
        yield ("wait", lambda: world.flushed(who))
    world.store(who, d, ("flag", region, b, me), epoch)
    yield ("step",)
    yield ("wait", lambda: 0 <= mem.get(("flag", region, b, o), 0) - epoch <= 1)
    rows = []
    for i in range(sent[o]):
        rows.append(world.mem[o].get(("pdata", region, p, me, i)))  # a peer load from the owner's buffer
        yield ("step",)
    out[o] = rows
    mem[counter] = epoch
    yield ("step",)


def _plan(x: np.ndarray, ids: np.ndarray, w: np.ndarray, ep: int, e_local: int, brk: str):
    """Per destination: the rows (token index, payload, local ids, weights) and their count."""
    send: list[list] = [[] for _ in range(ep)]
    for t in range(x.shape[0]):
        ranks = ids[t] // e_local
        for j, d in enumerate(ranks):
            if brk != "count_twice" and d in ranks[:j]:
                continue  # one copy per destination rank
            mine = [(int(ids[t, q] - d * e_local), int(w[t, q])) for q in range(ids.shape[1]) if ranks[q] == d]
            send[d].append((t, tuple(x[t].tolist()), tuple(mine)))
    return send, [len(s) for s in send]


def _rank_program(world, me, calls, ep, e_local, results, brk, combine, form="push", only_combine=False):
    """Yields the kernels of rank ``me`` one after another (each a list of block generators)."""
    brk_dispatch = None if only_combine and brk != "count_twice" else brk  # count_twice is the plan's
    yield from _kernels(world, me, calls, ep, e_local, results, brk, brk_dispatch, combine, form)


def _kernels(world, me, calls, ep, e_local, results, brk, brk_dispatch, combine, form) -> Iterator[list]:
    for c, (x, ids, w) in enumerate(calls):
        send, counts = _plan(x[me], ids[me], w[me], ep, e_local, brk)
        recv: dict[int, list] = {}
        yield [_block(world, me, b, 0, send, counts, recv, ep, brk_dispatch) for b in range(ep)]
        if not combine:  # the exchange alone: what arrived must be what every source planned for me
            want = [_plan(x[s], ids[s], w[s], ep, e_local, None)[0][me] for s in range(ep)]
            results.append((c, me, all(recv[s] == want[s] for s in range(ep))))
            continue
        back: list[list] = [[] for _ in range(ep)]  # owner: partial sums of every received row, in order
        for s in range(ep):
            for row in recv[s]:
                if row is None:
                    back[s].append(None)
                    continue
                _, payload, mine = row
                total = np.zeros(len(payload), np.int64)
                for e, weight in mine:  # choice order
                    total += weight * (me * e_local + e + 1) * np.asarray(payload, np.int64)
                back[s].append(tuple(total.tolist()))
        got: dict[int, list] = {}
        if form == "pull":
            yield [_pull_block(world, me, b, 1, back, counts, got, ep, brk) for b in range(ep)]
        else:
            yield [_block(world, me, b, 1, back, [len(r) for r in back], got, ep, brk) for b in range(ep)]
        y = np.zeros_like(x[me], dtype=np.int64)
        for o in range(ep):  # owner rank order
            for i, (t, _, _) in enumerate(send[o]):
                part = got[o][i] if i < len(got[o]) else None
                if part is None:
                    y[t] += 10**9  # a row that never arrived: certainly wrong
                else:
                    y[t] += np.asarray(part, np.int64)
        want = (x[me][:, None, :] * (w[me] * (ids[me] + 1))[:, :, None]).sum(1)
        results.append((c, me, bool(np.array_equal(y, want))))


def emulate(
    ep: int, *, calls: int = 4, tokens: tuple[int, ...] = (3, 0, 5), e_local: int = 2, top_k: int = 2,
    seed: int = 0, breaks: str | None = None, combine: bool = True, combine_form: str = "push",
    break_only_combine: bool = False, max_steps: int = 1_000_000,
) -> EmulationResult:  # fmt: skip
    """Run ``calls`` dispatch + combine rounds on ``ep`` emulated ranks under one random interleaving.

    Args:
      ep: ranks.
      calls: rounds; round ``c`` gives every rank ``tokens[c % len(tokens)]`` (+ its rank) tokens.
      e_local: experts per rank.
      top_k: experts per token (distinct; two of them may live on one rank).
      seed: the scheduler's and the data's seed.
      breaks: one of :data:`BREAKS` to break on purpose, or ``None``.
      combine: run each dispatch's combine after it (the manager's use); ``False``: dispatch
        exchanges back to back, checked on the rows received.
      combine_form: ``"push"`` (owners write partial sums into the sources' buffers) or ``"pull"``
        (sources read them from the owners' buffers).
      break_only_combine: ``breaks`` applies to the combine's blocks only (the dispatch keeps every
        safeguard), so a catch is the combine form's own.
      max_steps: actions before the run counts as hung.

    Returns:
      The calls whose result differed from the dense reference, and whether the run hung.

    Raises:
      ValueError: an unknown ``breaks`` or ``combine_form``.
    """
    if breaks is not None and breaks not in BREAKS:
        raise ValueError(f"emulate: expected breaks in {BREAKS} or None, got {breaks!r}.")
    if combine_form not in COMBINE_FORMS:
        raise ValueError(f"emulate: expected combine_form in {COMBINE_FORMS}, got {combine_form!r}.")
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    experts = ep * e_local
    rounds = []
    for c in range(calls):
        per = [tokens[c % len(tokens)] + r for r in range(ep)]
        x = [nrng.integers(-8, 9, size=(n, 3)) for n in per]
        ids = [
            np.array([nrng.choice(experts, top_k, replace=False) for _ in range(n)], np.int64).reshape(n, top_k)
            for n in per
        ]
        w = [nrng.integers(1, 4, size=(n, top_k)) for n in per]
        rounds.append((x, ids, w))
    world = _World(ep, rng)
    results: list[tuple[int, int, bool]] = []
    programs = [
        _rank_program(world, r, rounds, ep, e_local, results, breaks, combine, combine_form, break_only_combine)
        for r in range(ep)
    ]
    running: list[list] = [next(p, []) for p in programs]
    waiting: dict[int, Any] = {}  # id(block) -> its current wait predicate
    steps = 0
    while steps < max_steps:
        runnable = []
        for r in range(ep):
            for blk in running[r]:
                pred = waiting.get(id(blk))
                if pred is None or pred():
                    runnable.append((r, blk))
        can_deliver = any(world.pending.values())
        if not runnable and not can_deliver:
            break
        steps += 1
        if can_deliver and (not runnable or rng.random() < 0.3):
            world.deliver_one()
            continue
        r, blk = rng.choice(runnable)
        waiting.pop(id(blk), None)
        action = next(blk, None)
        if action is None:
            running[r].remove(blk)
            if not running[r]:
                running[r] = next(programs[r], [])
        elif action[0] == "wait":
            waiting[id(blk)] = action[1]
    hung = any(running)
    return EmulationResult(wrong=[(c, r) for c, r, ok in results if not ok], hung=hung, steps=steps)
