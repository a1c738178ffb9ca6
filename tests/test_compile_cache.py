"""The tests' persistent compile cache (conftest): where it goes, when it is off, how it is kept small."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from conftest import compile_cache_dir, prune_compile_cache


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"JAX_PLATFORMS": "cpu", "HOME": "/h"}, "/h/.cache/spmd-tests/xla-cpu"),
        ({"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": "/x"}, "/x/spmd-tests/xla-cpu"),
        ({"JAX_PLATFORMS": "cpu", "SPMD_TEST_COMPILE_CACHE": "/c"}, "/c"),
        ({"JAX_PLATFORMS": "cpu", "SPMD_TEST_COMPILE_CACHE": "off"}, None),
        ({"JAX_PLATFORMS": "cpu", "SPMD_TEST_COMPILE_CACHE": "0"}, None),
        ({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": "/u"}, None),  # the user's own: JAX reads it
        ({"JAX_PLATFORMS": "cuda"}, None),
        ({}, None),
    ],
)
def test_where_the_cache_goes(environ, expected, monkeypatch):
    monkeypatch.setattr(os.path, "expanduser", lambda p: p.replace("~", environ.get("HOME", "/nohome")))
    assert compile_cache_dir(environ) == expected


def test_this_session_uses_it():
    mine = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # JAX reads the user's own itself
    assert jax.config.jax_compilation_cache_dir == (compile_cache_dir() or mine)


def test_prune_keeps_the_newest_under_the_low_mark(tmp_path, rng):
    sizes = rng.integers(1, 100, size=30)
    for i, size in enumerate(sizes):
        (tmp_path / f"e{i}").write_bytes(b"x" * int(size))
        os.utime(tmp_path / f"e{i}", ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # e0 oldest
    total = int(sizes.sum())
    assert prune_compile_cache(str(tmp_path), high=total, low=0) == []  # at the high mark: untouched
    low = total // 3
    # independent of the code: drop oldest first while the rest is over `low`
    keep_from = next(k for k in range(31) if sizes[k:].sum() <= low)
    deleted = prune_compile_cache(str(tmp_path), high=total - 1, low=low)
    assert deleted == [f"e{i}" for i in range(keep_from)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"e{i}" for i in range(keep_from, 30))
    assert np.sum([p.stat().st_size for p in tmp_path.iterdir()]) <= low


def test_prune_of_a_missing_directory_is_a_no_op(tmp_path):
    assert prune_compile_cache(str(tmp_path / "absent"), high=0, low=0) == []


def test_prune_stops_at_the_low_mark_exactly(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}").write_bytes(b"x" * 10)
        os.utime(tmp_path / f"e{i}", ns=(10**18 + i * 10**9,) * 2)
    assert prune_compile_cache(str(tmp_path), high=29, low=20) == ["e0"]
