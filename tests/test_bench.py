"""The README's main job (spmd-bench) runs, checks every op and writes JSON; bad flags are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spmd.bench.collectives import format_size, parse_size


def _run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "spmd.bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    r = _run(
        "--sizes",
        "2KiB,4KiB",
        "--tp",
        "2,8",
        "--iters",
        "2",
        "--repeats",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "20 ok, 0 wrong" in r.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["num_devices"] == 8 and data["meta"]["platform"] == "cpu"
    assert {row["op"] for row in data["results"]} == {
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "all_to_all",
        "broadcast",
    }
    assert all(row["ok"] and row["us_per_call"] > 0 for row in data["results"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--ops", "all_reduce,allreduce"], "unknown op"),
        (["--sizes", "3XB"], "expected a size like 2KiB"),
        (["--sizes", "0"], "positive whole number"),
        (["--iters", "0"], "must be positive"),
    ],
)
def test_bench_bad_flags(tmp_path, args, match):
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr


def test_size_parsing():
    assert parse_size("2KiB") == 2048 and parse_size("1mib") == 1 << 20 and parse_size("512") == 512
    assert format_size(2048) == "2 KiB" and format_size(3 << 20) == "3 MiB" and format_size(100) == "100 B"
