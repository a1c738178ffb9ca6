"""The benchmarks: the harness's rules (check, time, report, exit status) and each benchmark's command line.

Every benchmark runs in a subprocess as a user runs it (``python -m ...``), on simulated CPU
devices, with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spmd.bench import collectives, custom_all_reduce, expert_parallel, harness
from spmd.bench.collectives import format_size, parse_size

BENCHES = {
    "spmd.bench": collectives,
    "spmd.bench.expert_parallel": expert_parallel,
    "spmd.bench.custom_all_reduce": custom_all_reduce,
}


def _run(module, *args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------
# spmd-bench (collectives)


@pytest.mark.multiprocess
def test_collectives_bench_runs_and_writes_json(tmp_path):
    """The old command line (no subcommand, --sizes, --tp) still runs the collectives sweep."""
    out = tmp_path / "b.json"
    r = _run(
        "spmd.bench",
        *("--platform", "cpu", "--sizes", "3,2KiB", "--tp", "2,8", "--iters", "2", "--repeats", "1"),
        *("--ops", "all_reduce,all_gather", "--torch", "off", "--json", str(out)),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 ok, 0 wrong, 0 failed, 0 skipped" in r.stdout
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["num_devices"] == 8 and meta["platform"] == "cpu" and meta["device_kind"]
    assert meta["command"].startswith("spmd-bench collectives --platform cpu") and meta["date"][:2] == "20"
    rows = data["results"]
    assert {row["op"] for row in rows} == {"all_reduce", "all_gather"}
    assert all(row["ok"] and row["us"] > 0 and row["in_place"]["wrong"] == 0 for row in rows)
    # 3 bytes is rounded up to whole float32 elements: one element (all-reduce), one per rank (all-gather)
    small = {(row["op"], row["tp"], row["size_requested"], row["size"]) for row in rows if row["size_requested"] == 3}
    assert small == {
        ("all_reduce", 2, 3, 4),
        ("all_reduce", 8, 3, 4),
        ("all_gather", 2, 3, 8),
        ("all_gather", 8, 3, 32),
    }


@pytest.mark.multiprocess
def test_collectives_bench_refuses_a_platform_it_does_not_have(tmp_path):
    out = tmp_path / "b.json"
    out.write_text("keep me")
    r = _run("spmd.bench", "--platform", "gpu", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "--platform gpu: JAX found no gpu devices" in r.stderr
    assert out.read_text() == "keep me"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "args,match",
    [
        (["--ops", "all_reduce,allreduce"], "unknown op 'allreduce'"),
        (["--sizes", "3XB"], "expected a size like 2KiB"),
        (["--sizes", "0"], "positive whole number"),
        (["--iters", "0"], "expected a positive int, got '0'"),
        (["--tp", "3", "--platform", "cpu"], "--tp 3: a TP size must divide the 8 devices"),
    ],
)
def test_collectives_bench_bad_flags(tmp_path, args, match):
    r = _run("spmd.bench", *args, "--json", str(tmp_path / "x.json"), cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not (tmp_path / "x.json").exists()


def test_collectives_progress_counts_the_whole_run_and_the_columns_say_what_they_are(monkeypatch, capsys, tmp_path):
    """Two TP sizes, two tables: the progress counts 4 cases in all, not 2 per table (issue 22, item 21)."""
    monkeypatch.setattr(harness, "PROGRESS_EVERY_S", 0.0)
    argv = ["--platform", "cpu", "--ops", "all_reduce,broadcast", "--tp", "2,4", "--sizes", "2KiB", "--torch", "off"]
    assert collectives.main([*argv, "--iters", "1", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    captured = capsys.readouterr()
    assert re.findall(r"^\[(\d+)/(\d+)\]", captured.err, re.M) == [("1", "4"), ("2", "4"), ("3", "4")]
    assert "#       size         count      type   redop    root     time   algbw   busbw  #wrong" in captured.out


def test_collectives_default_tp_sizes_are_what_the_help_says():
    help_text = " ".join(collectives.build_parser().format_help().split())
    assert "default: every power of two from 2 up to the device count that divides it" in help_text
    for n in range(1, 70):
        want = [t for t in range(2, n + 1) if n % t == 0 and t & (t - 1) == 0]
        assert collectives.default_tp_sizes(n) == want, n


def test_size_parsing():
    assert parse_size("2KiB") == 2048 and parse_size("1mib") == 1 << 20 and parse_size("512") == 512
    assert format_size(2048) == "2 KiB" and format_size(3 << 20) == "3 MiB" and format_size(100) == "100 B"


# ----------------------------------------------------------------------------------------------
# Every benchmark's --help


@pytest.mark.parametrize("module", sorted(BENCHES))
def test_every_option_has_help_and_shows_its_default(module):
    p = BENCHES[module].build_parser()
    formatter = harness.HelpFormatter(p.prog)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{module} {action.option_strings} has no help line"
        shown = formatter._get_help_string(action)
        assert "%(default)" in shown or "default:" in shown or action.default is False, (module, action.dest)
    text = p.format_help()
    assert "(default: auto)" in text and "(default: bench_" in text


# ----------------------------------------------------------------------------------------------
# python -m spmd.bench.custom_all_reduce


@pytest.mark.multiprocess
def test_custom_all_reduce_bench_on_cpu_checks_the_kernels(tmp_path):
    out = tmp_path / "car.json"
    r = _run("spmd.bench.custom_all_reduce", "--platform", "cpu", "--sizes", "100", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: 100 B rounded up to 112 B" in r.stdout and "4 ok, 0 wrong, 0 failed" in r.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python -m spmd.bench.custom_all_reduce --platform cpu")
    rows = data["results"]
    assert [row["variant"] for row in rows] == ["xla", "one_shot", "two_shot", "auto"]
    assert all(row["ok"] and row["identical_on_ranks"] and row["bytes"] == 112 and row["world"] == 2 for row in rows)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "args,match",
    [
        (["--variants", "xla,peer_flags,ll"], "--variants peer_flags,ll: GPU-only"),
        (["--write-tuning", "t.json"], "--write-tuning needs GPU or TPU timings"),
        (["--world-sizes", "4"], "at most the 2 devices, got [4]"),
        (["--variants", "fast"], "unknown variant 'fast'"),
    ],
)
def test_custom_all_reduce_bench_bad_flags(tmp_path, args, match):
    r = _run("spmd.bench.custom_all_reduce", "--platform", "cpu", *args, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr, r.stderr
    assert not (tmp_path / "t.json").exists()


def test_crossovers_from_measured_rows():
    def rows(world, size, **us):
        return [{"world": world, "bytes": size, "variant": v, "us": t, "ok": True} for v, t in us.items()]

    measured = [
        *rows(2, 2048, xla=10.0, one_shot=4.0, two_shot=6.0),  # one-shot wins
        *rows(2, 8192, xla=12.0, one_shot=9.0, two_shot=7.0),  # two-shot wins
        *rows(2, 32768, xla=15.0, one_shot=20.0, two_shot=16.0),  # psum wins: stop
        *rows(2, 131072, xla=30.0, one_shot=40.0, two_shot=20.0),  # a win after a loss does not count
        *rows(4, 2048, xla=10.0, one_shot=11.0, two_shot=12.0),  # never wins
    ]
    assert custom_all_reduce.crossovers(measured, 2) == (8192, 2048, 0)
    assert custom_all_reduce.crossovers(measured, 4) == (0, 0, 0)
    wrong = [dict(r, ok=False) if r["variant"] == "one_shot" else r for r in measured]
    assert custom_all_reduce.crossovers(wrong, 2) == (8192, 0, 0)  # a wrong kernel is no candidate


def test_crossovers_read_the_gpu_protocols():
    def rows(size, **us):
        return [{"world": 2, "bytes": size, "variant": v, "us": t, "ok": True} for v, t in us.items()]

    measured = [
        *rows(2048, xla=12.0, ll=4.0, pull=6.0),  # ll best
        *rows(8192, xla=12.0, ll=5.0, pull=5.5),  # ll best
        *rows(32768, xla=12.0, ll=7.0, pull=6.5),  # pull best: the ll switch stops here
        *rows(131072, xla=13.0, ll=6.0, pull=8.0),  # ll better again: does not count
        *rows(524288, xla=17.0, pull=10.0),  # no ll row
        *rows(2097152, xla=25.0, pull=26.0),  # psum wins
    ]
    assert custom_all_reduce.crossovers(measured, 2) == (524288, 524288, 8192)
    bad_ll = [dict(r, ok=False) if r["variant"] == "ll" else r for r in measured]
    assert custom_all_reduce.crossovers(bad_ll, 2) == (524288, 524288, 0)


# ----------------------------------------------------------------------------------------------
# python -m spmd.bench.expert_parallel


@pytest.mark.slow  # about 10 s or more on 2 shared cores
@pytest.mark.multiprocess
def test_expert_parallel_bench_defaults_fit_a_cpu(tmp_path):
    """With only --platform cpu it runs small shapes on 8 simulated devices and checks every manager."""
    out = tmp_path / "ep.json"
    r = _run("spmd.bench.expert_parallel", "--platform", "cpu", "--json", str(out), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    assert data["meta"]["ep"] == 8 and data["meta"]["iters"] == 5
    rows = data["results"]
    assert {(row["tokens"], row["hidden"]) for row in rows} == {(1, 256), (16, 256)}
    assert {row["manager"] for row in rows} == {"naive", "capacity", "ragged", "low_latency"}
    assert all(row["ok"] and row["memory_estimate_bytes"] > 0 for row in rows)


@pytest.mark.multiprocess
def test_expert_parallel_bench_skips_rows_over_the_memory_budget(tmp_path):
    out = tmp_path / "ep.json"
    r = _run(
        "spmd.bench.expert_parallel",
        *("--platform", "cpu", "--tokens", "4", "--managers", "ragged", "--max-memory-gb", "0.000001"),
        *("--json", str(out)),
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "SKIPPED needs ~" in r.stdout and "over the 0.00 GB budget" in r.stdout
    assert "nothing was measured" in r.stderr and not out.exists()


@pytest.mark.multiprocess
def test_expert_parallel_bench_needs_two_devices(tmp_path):
    r = _run("spmd.bench.expert_parallel", "--platform", "cpu", "--cpu-devices", "1", cwd=tmp_path)
    assert r.returncode == 2 and "needs at least 2 devices as EP ranks, found 1" in r.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "args,match",
    [
        (["--configs", "8x4"], "top-k 8 is larger than the 4 experts"),
        (["--configs", "8"], "expected TOPKxEXPERTS like 2x8"),
        (["--managers", "fast"], "unknown manager 'fast'"),
        (["--tokens", "0"], "expected a positive int, got '0'"),
    ],
)
def test_expert_parallel_bench_bad_flags(tmp_path, args, match):
    r = _run("spmd.bench.expert_parallel", *args, cwd=tmp_path)
    assert r.returncode == 2 and match in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# The harness itself (in-process, no compilation)


def _case(name, *, ok=True, fails=False):
    def build():
        if fails:
            raise RuntimeError("kernel exploded")
        x = jnp.arange(4.0)
        return harness.Trial(
            once=lambda: np.asarray(x), check=lambda out: {"ok": ok}, loop=lambda v: v + 1, args=(x,), calls=2
        )

    return harness.Case(key={"name": name}, build=build)


COLUMNS = [harness.Column("name", "name", 6), harness.Column("us", "us", 8, ".1f"), harness.Column("ok", "check", 6)]


def test_harness_reports_wrong_and_failed_rows_and_exits_non_zero(tmp_path, capsys):
    rows = harness.run_cases(
        [_case("good"), _case("wrong", ok=False), _case("boom", fails=True)],
        COLUMNS,
        devices=jax.devices(),
        repeats=1,
    )
    assert [r.get("ok") for r in rows] == [True, False, None]
    assert rows[0]["us"] > 0 and rows[2]["error"] == "RuntimeError: kernel exploded"
    printed = capsys.readouterr().out
    assert "WRONG" in printed and "boom ERROR RuntimeError: kernel exploded" in printed
    path = tmp_path / "r.json"
    assert harness.finish(rows, {"command": "x"}, str(path), prog="bench") == 1
    assert len(json.loads(path.read_text())["results"]) == 3
    assert harness.finish(rows[:1], {"command": "x"}, str(path), prog="bench") == 0


def test_harness_writes_nothing_when_nothing_was_measured(tmp_path, capsys):
    path = tmp_path / "r.json"
    rows = harness.run_cases([_case("boom", fails=True)], COLUMNS, devices=jax.devices(), repeats=1)
    assert harness.finish(rows, {}, str(path), prog="bench") == 1
    assert harness.finish([], {}, str(path), prog="bench") == 1
    assert "bench: nothing was measured" in capsys.readouterr().err and not path.exists()


def test_chain_counts_the_calls_it_times():
    fn, calls = harness.chain(lambda c: c * 2, 10, unroll=3)
    assert calls == 9 and float(jax.jit(fn)(jnp.float32(1))) == 2.0**9
    fn, calls = harness.chain(lambda c: c + 1, 2, unroll=5)
    assert calls == 5 and float(jax.jit(fn)(jnp.float32(0))) == 5.0


# ----------------------------------------------------------------------------------------------
# python -m spmd.bench.kv_ipc / spmd.bench.fused_norm


@pytest.mark.multiprocess
def test_kv_ipc_bench_runs_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "k.json"
    args = ("--platform", "cpu", "--sizes", "1MiB", "--pipes", "ipc", "--repeats", "1", "--json", str(out))
    r = _run("spmd.bench.kv_ipc", *args, cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ok, 0 wrong, 0 failed, 0 skipped" in r.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["command"] == "python -m spmd.bench.kv_ipc " + " ".join(args)
    assert {(row["pipe"], row["mode"], row["bytes"]) for row in data["results"]} == {
        ("ipc", "array", 1 << 20),
        ("ipc", "kv", 1 << 20),
    }
    assert all(row["ok"] and row["GBps"] > 0 for row in data["results"])


@pytest.mark.multiprocess
def test_kv_ipc_bench_refuses_a_size_the_cache_cannot_have(tmp_path):
    r = _run("spmd.bench.kv_ipc", "--platform", "cpu", "--sizes", "1000", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "comes in steps of" in r.stderr


@pytest.mark.multiprocess
def test_fused_norm_bench_needs_a_gpu(tmp_path):
    r = _run("spmd.bench.fused_norm", "--rows", "1", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "needs a GPU" in r.stderr


# ----------------------------------------------------------------------------------------------
# models.bench_decode and models.bench_gemv (CPU smoke runs: every row checks, times and is written)


@pytest.mark.slow  # about 10 s or more on 2 shared cores
@pytest.mark.multiprocess
def test_decode_bench_times_the_loop_and_the_generate_path(tmp_path):
    out = tmp_path / "decode.json"
    r = _run(
        "models.bench_decode",
        *("--platform", "cpu", "--tp", "1,2", "--batches", "1", "--all-reduce", "psum", "--kernels", "xla"),
        *("--chunk", "4", "--generate-tokens", "6", "--iters", "2", "--repeats", "1", "--json", str(out)),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["results"]
    phases = {(row["tp"], row["phase"]) for row in rows}
    assert phases == {(t, p) for t in (1, 2) for p in ("allreduce", "decode", "generate", "prefill")}
    for row in rows:
        assert row["ok"] and row["us"] > 0
        if row["phase"] in ("decode", "generate"):
            assert row["kernels_per_step"] > 0 and row["roofline_us"] > 0 and row["tok_per_s"] > 0
        if row["phase"] == "prefill":
            assert 0 < row["mfu_pct"] < 100


@pytest.mark.slow  # about 10 s or more on 2 shared cores
@pytest.mark.multiprocess
def test_gemv_bench_checks_every_tiling_it_times(tmp_path):
    out = tmp_path / "gemv.json"
    r = _run("models.bench_gemv", "--platform", "cpu", "--only", "qkv,down_swiglu", "--json", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(row["product"], row["prologue"]) for row in rows] == [("qkv", "none"), ("down_swiglu", "swiglu")]
    for row in rows:
        assert row["tried"] and all(t["rel_err"] < 1e-2 for t in row["tried"])
        assert row["best_us"] == min(t["us"] for t in row["tried"])
