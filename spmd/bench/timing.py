"""Timing shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Run ``fn(*args)`` once to warm up (compile), then ``repeats`` times; the fastest wall time.

    ``fn`` returns JAX arrays; each run waits for them (``block_until_ready``).
    """
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best
