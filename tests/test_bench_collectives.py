"""spmd-bench collectives as nccl-tests reads it: the formulas, the sizes, the table, the checks, torch beside.

The expected numbers are written out by hand from nccl-tests' doc/PERFORMANCE.md and src/*.cu
(version 2.19.6): algbw = S / t, busbw = algbw x (2(n-1)/n | (n-1)/n | 1), S = the larger buffer of
one rank; they do not come from the code under test.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spmd.bench import cli, collectives, expected, nccl_format, table, torch_collectives
from spmd.bench.cli_args import BenchError, parse_size

HAS_TORCH = importlib.util.find_spec("torch") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "spmd.bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------
# nccl-tests' definitions, on known times (hand-computed)


@pytest.mark.parametrize(
    "kind,n,size,seconds,algbw,busbw",
    [
        ("all_reduce", 4, 1 << 30, 10e-3, 107.3741824, 161.0612736),  # x 2*3/4 = 1.5
        ("all_reduce", 2, 1 << 20, 100e-6, 10.48576, 10.48576),  # x 2*1/2 = 1
        ("all_reduce", 8, 8 << 20, 50e-6, 167.77216, 293.60128),  # x 2*7/8 = 1.75
        ("all_gather", 8, 8 << 20, 100e-6, 83.88608, 73.40032),  # x 7/8
        ("reduce_scatter", 2, 4 << 20, 20e-6, 209.7152, 104.8576),  # x 1/2
        ("all_to_all", 4, 1 << 30, 8e-3, 134.217728, 100.663296),  # x 3/4
        ("broadcast", 8, 1 << 30, 4e-3, 268.435456, 268.435456),  # x 1
    ],
)
def test_algbw_and_busbw_are_nccl_tests_numbers(kind, n, size, seconds, algbw, busbw):
    assert nccl_format.algbw(size, seconds) == pytest.approx(algbw, rel=1e-12)
    assert nccl_format.busbw(kind, size, seconds, n) == pytest.approx(busbw, rel=1e-12)


def test_sizes_are_what_nccl_tests_prints():
    # all_gather_perf -b 1M over 4 ranks, float: count 65536 per rank, size 1048576 (the gathered buffer)
    assert nccl_format.sizes_for("all_gather", 1 << 20, 4, 4) == nccl_format.Sizes(65536, 65536, 262144, 1 << 20)
    # reduce_scatter_perf: the size is the input (n chunks), the count one rank's output
    assert nccl_format.sizes_for("reduce_scatter", 1 << 20, 4, 4) == nccl_format.Sizes(65536, 262144, 65536, 1 << 20)
    assert nccl_format.sizes_for("all_to_all", 1 << 20, 8, 2) == nccl_format.Sizes(65536, 524288, 524288, 1 << 20)
    assert nccl_format.sizes_for("all_reduce", 1 << 20, 8, 2) == nccl_format.Sizes(524288, 524288, 524288, 1 << 20)
    assert nccl_format.sizes_for("broadcast", 8, 8, 4) == nccl_format.Sizes(2, 2, 2, 8)
    # rounded up to whole elements per rank (nccl-tests would print 0 here): one float per rank
    assert nccl_format.sizes_for("all_gather", 8, 4, 4) == nccl_format.Sizes(1, 1, 4, 16)
    assert nccl_format.sizes_for("reduce_scatter", 6, 2, 2) == nccl_format.Sizes(2, 4, 2, 8)
    assert nccl_format.sizes_for("all_reduce", 3, 2, 2) == nccl_format.Sizes(2, 2, 2, 4)


def test_sweep_is_b_e_f():
    s = nccl_format.sweep(8, 1 << 30, 2)
    assert len(s) == 28 and s[0] == 8 and s[-1] == 1 << 30 and all(b == 2 * a for a, b in itertools.pairwise(s))
    assert nccl_format.sweep(8, 100, 4) == [8, 32]
    assert nccl_format.sweep(5, 5, 2) == [5]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: nccl_format.sweep(64, 8, 2), "-b 64 is larger than -e 8"),
        (lambda: nccl_format.sweep(8, 64, 1), "-f 1: expected a factor of at least 2"),
        (lambda: nccl_format.sweep(0, 64, 2), "at least 1 byte"),
        (lambda: nccl_format.sizes_for("allreduce", 8, 2, 4), "unknown collective 'allreduce'"),
        (lambda: nccl_format.busbw("gather", 8, 1.0, 2), "unknown collective 'gather'"),
        (lambda: nccl_format.algbw(8, 0.0), "expected a positive time"),
        (lambda: nccl_format.KINDS["all_reduce"].factor(0), "at least 1 rank"),
        (lambda: expected.input_length("all_reduce", "inplace", 4, 2), "unknown mode 'inplace'"),
    ],
)
def test_definitions_refuse_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_size_parser_reads_nccl_tests_units():
    assert parse_size("8") == 8 and parse_size("1G") == 1 << 30 and parse_size("64K") == 65536
    assert parse_size("1.5K") == 1536 and parse_size("2 MiB") == 2 << 20 and parse_size("1gb") == 1 << 30
    assert parse_size("32m") == 32 << 20 and parse_size("4kib") == 4096 and parse_size("16B") == 16
    for bad, match in (("3XB", "expected a size like"), ("-1", "positive whole"), ("0.5", "positive whole")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse_size(bad)


# ----------------------------------------------------------------------------------------------
# The table: nccl-tests' printf formats (src/util.cu), applied here with Python's % operator


def test_table_lines_are_nccl_tests_format():
    hdr = "# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s  %6s  %6s"
    lines = nccl_format.header_lines()
    assert lines[1] == hdr % ("size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time",
                              "algbw", "busbw", "#wrong")  # fmt: skip
    assert lines[2] == hdr % ("(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)",
                              "(GB/s)", "")  # fmt: skip
    oop = {"time_us": 1234.5678, "algbw": 0.849, "busbw": 1.27, "wrong": 0}
    ip = {"time_us": 123456.0, "algbw": 1234.567, "busbw": 12345.6, "wrong": 3}
    row = {"size": 1048576, "count": 262144, "type": "float", "redop": "sum", "root": -1, "out_of_place": oop,
           "in_place": ip}  # fmt: skip
    want = "%12li  %12li  %8s  %6s  %6s" % (1048576, 262144, "float", "sum", "    -1")  # noqa: UP031
    want += "  %7s  %6s  %6s  %6g" % ("1234.57", "  0.85", "  1.27", 0)  # noqa: UP031
    want += "  %7s  %6s  %6s  %6g" % ("123456", "1234.6", " 12346", 3)  # noqa: UP031
    assert nccl_format.row_line(row) == want
    blank = nccl_format.row_line({**row, "out_of_place": None})
    assert blank[: len(want.split("  1234.57")[0])] == want.split("  1234.57")[0] and blank.endswith("       3")
    assert len(blank) == len(want)  # a mode that was not run keeps the columns in place
    assert nccl_format.float_str(12345678.0, 7) == "1.2e+07" and nccl_format.float_str(3.14159, 6) == "  3.14"


def test_ratio_to_torch_compares_out_of_place_with_torchs_call():
    jax_row = {"out_of_place": {"busbw": 300.0}, "in_place": {"busbw": 1.0}}
    ar = {"us": 1.0, "out_of_place": None, "in_place": {"busbw": 200.0}}  # dist.all_reduce: in place only
    ag = {"us": 1.0, "out_of_place": {"busbw": 400.0}, "in_place": {"busbw": 100.0}}
    assert table.ratio_to_torch(jax_row, ar) == 1.5 and table.ratio_to_torch(jax_row, ag) == 0.75
    assert table.ratio_to_torch(jax_row, None) is None and table.ratio_to_torch(jax_row, {"error": "x"}) is None


# ----------------------------------------------------------------------------------------------
# The expected outputs: the index formulas against a plain numpy construction


def _naive(kind, mode, pats, k, count, n, root=0):
    lin = expected.input_length(kind, mode, count, n)
    x = [np.resize(pats[r], lin) for r in range(n)]  # x_r[i] = p_r[i % P]
    if kind == "all_reduce":
        return sum(x)
    if kind == "broadcast":
        return x[root]
    if kind == "all_gather":
        return np.concatenate([x[r] if mode == "out_of_place" else x[r][r * count : (r + 1) * count] for r in range(n)])
    if kind == "all_to_all":
        return np.concatenate([x[r][k * count : (k + 1) * count] for r in range(n)])
    mine = sum(x)[k * count : (k + 1) * count]
    if mode == "out_of_place":
        return mine
    out = x[k].copy()
    out[k * count : (k + 1) * count] = mine
    return out


@pytest.mark.parametrize("kind", expected.OPS_WITH_MODES)
@pytest.mark.parametrize("mode", ["out_of_place", "in_place"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_expected_matches_a_plain_construction(kind, mode, n):
    rng = np.random.default_rng()
    for count in (1, 5, int(rng.integers(2, 3000)), 4100):
        plen = expected.pattern_length(kind, mode, count, n)
        pats = rng.integers(-8, 8, (n, plen)).astype(np.float32)
        lout = expected.output_length(kind, mode, count, n)
        for k in range(n):
            got = expected.expected(kind, mode, pats, k, count, np.arange(lout))
            np.testing.assert_array_equal(got, _naive(kind, mode, pats, k, count, n))


# ----------------------------------------------------------------------------------------------
# The JAX sweep in-process (8 simulated CPU devices), with a broken collective on purpose


def _sweep(tmp_path, *args):
    path = tmp_path / "c.json"
    status = collectives.main(["--platform", "cpu", "--torch", "off", "--iters", "2", "--repeats", "1",
                               "--json", str(path), *args])  # fmt: skip
    return status, (json.loads(path.read_text()) if path.exists() else None)


def test_sweep_rows_json_and_formulas(tmp_path, capsys):
    status, data = _sweep(tmp_path, "--ops", "all_reduce,all_gather", "--tp", "4", "-b", "64", "-e", "1K", "-f", "16")
    assert status == 0
    out = capsys.readouterr().out
    assert "# all_reduce over 4 ranks (2 groups at once): psum" in out and "# Out of bounds values : 0 OK" in out
    rows = data["results"]
    assert [(r["op"], r["size"]) for r in rows] == [("all_reduce", 64), ("all_reduce", 1024), ("all_gather", 64),
                                                    ("all_gather", 1024)]  # fmt: skip
    for r in rows:
        for mode in ("out_of_place", "in_place"):
            m = r[mode]
            assert m["wrong"] == 0 and m["time_us"] > 0
            assert m["algbw"] == pytest.approx(r["size"] / (m["time_us"] * 1e-6) / 1e9)
            factor = 1.5 if r["op"] == "all_reduce" else 0.75
            assert m["busbw"] == pytest.approx(m["algbw"] * factor)
    assert rows[2]["count"] == 4 and rows[2]["redop"] == "none" and rows[0]["type"] == "float"
    assert data["meta"]["sizes"] == [64, 1024] and data["meta"]["command"].startswith("spmd-bench collectives")


@pytest.mark.parametrize("op", collectives.OPS)
def test_every_op_is_right_in_both_modes_at_4_ranks(tmp_path, op):
    status, data = _sweep(tmp_path, "--ops", op, "--tp", "4", "--sizes", "100")
    (row,) = data["results"]
    assert status == 0 and row["out_of_place"]["wrong"] == 0 and row["in_place"]["wrong"] == 0
    assert row["root"] == (0 if "broadcast" in op else -1) and row["size"] >= 100


@pytest.mark.parametrize(
    "target,broken",
    [
        ("all_gather", lambda x, axis_name, axis=0: spmd_rev(x, axis_name)),  # blocks in the wrong rank order
        ("all_reduce", lambda x, axis_name: x * 2),  # no communication at all
        ("reduce_scatter", lambda x, axis_name, axis=0: x[: x.shape[0] // _n(axis_name)]),  # no sum, slot 0
    ],
)
def test_a_wrong_collective_is_counted_and_fails_the_run(tmp_path, capsys, monkeypatch, target, broken):
    import spmd

    monkeypatch.setattr(spmd, target, broken)
    status, data = _sweep(tmp_path, "--ops", target, "--tp", "2", "--sizes", "1K")
    assert status == 1
    (row,) = data["results"]
    assert row["out_of_place"]["wrong"] > 0 and row["in_place"]["wrong"] > 0 and row["ok"] is False
    assert "# Out of bounds values : " in capsys.readouterr().out


def _n(axis_name):
    from jax import lax

    return lax.axis_size(axis_name)


def spmd_rev(x, axis_name):
    from jax import lax

    g = lax.all_gather(x, axis_name, axis=0, tiled=False)
    return g[::-1].reshape(-1)


def test_an_interrupted_sweep_keeps_what_it_measured(tmp_path, capsys, monkeypatch):
    real, calls = collectives._row, []

    def row_then_interrupt(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGTERM (`timeout`) and Ctrl-C become
        return real(*a)

    monkeypatch.setattr(collectives, "_row", row_then_interrupt)
    status, data = _sweep(tmp_path, "--ops", "all_reduce", "--tp", "2", "--sizes", "8,16,32")
    assert status == 130 and data["meta"]["interrupted"] is True
    assert [r["size"] for r in data["results"]] == [8]
    assert "interrupted; writing the 1 rows measured so far" in capsys.readouterr().err


def test_torch_failing_beside_fails_the_run_but_jax_rows_still_run(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise BenchError("torch worker rank 1 exited with status 1; its last lines:\nNCCL error")

    monkeypatch.setattr(torch_collectives, "backend_for", lambda platform, mode: "gloo")
    monkeypatch.setattr(torch_collectives, "run", boom)
    path = tmp_path / "c.json"
    argv = ["--platform", "cpu", "--torch", "on", "--ops", "broadcast", "--tp", "2", "--sizes", "64"]
    assert collectives.main([*argv, "--iters", "1", "--repeats", "1", "--json", str(path)]) == 1
    rows = json.loads(path.read_text())["results"]
    assert rows[0]["impl"] == "gloo" and "exited with status 1" in rows[0]["error"]
    assert rows[1]["impl"] == "jax" and rows[1]["ok"] and "vs_torch" not in rows[1]
    assert "gloo beside failed at tp=2: torch worker rank 1" in capsys.readouterr().err


@pytest.mark.slow
def test_every_op_runs_at_2_and_4_devices_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    status, data = _sweep(tmp_path, "--tp", "2,4", "--sizes", "8,4K", "--plot", str(png), "--peak-gbps", "1")
    assert status == 0 and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    ops = {(r["op"], r["tp"]) for r in data["results"]}
    assert ops == {(op, tp) for op in collectives.OPS for tp in (2, 4)}
    assert all(r["ok"] for r in data["results"]) and data["meta"]["peak_gbps"] == 1.0


# ----------------------------------------------------------------------------------------------
# torch beside (gloo on CPU), the front door, --help, --plot without matplotlib


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_gloo_beside_at_2_and_4_devices(tmp_path):
    out = tmp_path / "c.json"
    r = _run("collectives", "--platform", "cpu", "--tp", "2,4", "--sizes", "1K", "--iters", "2", "--repeats", "1",
             "--torch", "on", "--json", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    gloo = [x for x in rows if x["impl"] == "gloo"]
    assert {(x["kind"], x["tp"]) for x in gloo} == {(k, t) for k in nccl_format.KINDS for t in (2, 4)}
    assert all(x["ok"] for x in gloo)
    assert gloo[0]["out_of_place"] is None and gloo[0]["in_place"]["busbw"] > 0  # dist.all_reduce: in place
    jax_rows = [x for x in rows if x["impl"] == "jax"]
    assert len(jax_rows) == 2 * len(collectives.OPS) and all(x["vs_torch"] > 0 for x in jax_rows)
    assert "# all_reduce over 2 ranks: torch.distributed gloo" in r.stdout and "x gloo" in r.stdout


@pytest.mark.multiprocess
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_torch_workers_past_the_deadline_are_killed_with_a_clear_error():
    with pytest.raises(BenchError, match=r"did not finish within 0.5 s \(--torch-timeout-s\)"):
        torch_collectives.run(["all_reduce"], [8], 2, dtype="float32", iters=1, repeats=1, backend="gloo",
                              timeout_s=0.5)  # fmt: skip


def test_torch_backend_choice(monkeypatch):
    assert torch_collectives.backend_for("cpu", "off") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert torch_collectives.backend_for("gpu", "auto") is None
    assert torch_collectives.backend_for("gpu", "on").startswith("error: --torch on: torch is not installed")


def test_front_door_dispatches_and_refuses_unknown_subcommands(capsys):
    assert cli.main(["--help"]) == 0 and "custom-all-reduce" in capsys.readouterr().out
    assert cli.main(["collective"]) == 2 and "unknown subcommand 'collective'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["custom-all-reduce", "--help"])
    assert e.value.code == 0 and "--world-sizes" in capsys.readouterr().out
    for name, (module, _) in cli.SUBCOMMANDS.items():
        assert importlib.util.find_spec(module) is not None, name


def test_help_shows_units_and_defaults():
    text = " ".join(collectives.build_parser().format_help().split())
    assert "binary: 1K = 1024" in text and "(default: 8 on every platform)" in text
    assert "(default: 1G on GPU/TPU, 32K on CPU)" in text and "(default: float32)" in text
    assert "Per-platform defaults:" in text and "(default: 64M)" in text


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        argv = ["--platform", "cpu", "--torch", "off", "--json", str(tmp_path / "x.json")]
        collectives.main([*argv, "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "pip install -e '.[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
