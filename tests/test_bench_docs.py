"""The tables in docs/ that come from docs/results/*.json still say what their JSON says.

``spmd-bench docs-tables`` regenerates them; this test fails when one was edited by hand or its
JSON changed without regenerating (the fix: run ``spmd-bench docs-tables`` and commit the docs).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from spmd.bench import docs_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_repo_docs(tmp_path):
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    return tmp_path


def _check(root) -> int:
    return docs_tables.main(["--docs", str(root / "docs"), "--root", str(root), "--check"])


def test_docs_tables_match_their_json(capsys):
    status = docs_tables.main(["--docs", os.path.join(ROOT, "docs"), "--root", ROOT, "--check"])
    out = capsys.readouterr().out
    assert status == 0, f"{out}\nrun `spmd-bench docs-tables` from the repository root and commit docs/"
    count = int(out.split()[0])
    assert count >= 3  # the two decode tables and the collectives table of docs/benchmarks.md


def test_a_number_edited_by_hand_fails_the_check(tmp_path, capsys):
    root = _copy_repo_docs(tmp_path)
    page = root / "docs" / "benchmarks.md"
    text = page.read_text()
    assert "| 1 | psum | 4.4 | 1702.2 |" in text
    page.write_text(text.replace("| 1 | psum | 4.4 | 1702.2 |", "| 1 | psum | 4.4 | 1602.2 |"))
    assert _check(root) == 1
    assert "docs/benchmarks.md: decode_tp docs/results/decode_4xH200_2026-11-28.json" in capsys.readouterr().out
    assert docs_tables.main(["--docs", str(root / "docs"), "--root", str(root)]) == 0  # regenerate: fixed
    assert page.read_text() == text and _check(root) == 0


def test_a_changed_json_fails_the_check(tmp_path, capsys):
    root = _copy_repo_docs(tmp_path)
    path = root / "docs" / "results" / "decode_loop_1xH200_2026-12-04.json"
    data = json.loads(path.read_text())
    data["results"][1]["us"] *= 1.1
    path.write_text(json.dumps(data))
    assert _check(root) == 1
    assert "decode_loop docs/results/decode_loop_1xH200_2026-12-04.json" in capsys.readouterr().out


def test_a_dropped_row_and_a_changed_caption_fail_the_check(tmp_path, capsys):
    root = _copy_repo_docs(tmp_path)
    page = root / "docs" / "benchmarks.md"
    text = page.read_text()
    page.write_text(text.replace("| 32 | auto | **1071.6** |", "| 32 | auto | 1071.6 |"))
    assert _check(root) == 1
    page.write_text(text.replace("4 x NVIDIA H200 (gpu), 2026-11-28", "4 x NVIDIA H100 (gpu), 2026-11-28"))
    assert _check(root) == 1


def test_rendered_collectives_table_follows_the_json(tmp_path):
    meta = {"num_devices": 2, "device_kind": "cpu", "platform": "cpu", "date": "2026-12-04T18:00:00+00:00",
            "jax": "0.10.2", "command": "spmd-bench collectives --platform cpu", "torch_backend": "gloo"}  # fmt: skip
    m = lambda t, bw, w=0: {"time_us": t, "algbw": bw, "busbw": bw, "wrong": w}
    rows = [
        {"impl": "jax", "op": "all_reduce", "kind": "all_reduce", "tp": 2, "size": 1024, "us": 5.0,
         "out_of_place": m(5.0, 0.2), "in_place": m(6.0, 0.17, 1), "vs_torch": 2.0},
        {"impl": "gloo", "op": "all_reduce", "kind": "all_reduce", "tp": 2, "size": 1024, "us": 10.0,
         "out_of_place": None, "in_place": m(10.0, 0.1)},
        {"impl": "jax", "op": "broadcast", "kind": "broadcast", "tp": 2, "size": 8, "us": 3.0,
         "out_of_place": m(3.0, 0.0027), "in_place": m(3.5, 0.0023)},
    ]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps({"meta": meta, "results": rows}))
    body = docs_tables.render("collectives", "r.json", {}, str(tmp_path))
    lines = body.splitlines()
    assert lines[0] == "2 x cpu (cpu), 2026-12-04, jax 0.10.2: `spmd-bench collectives --platform cpu` (raw: `r.json`)"
    assert lines[4] == "| all_reduce | 2 | 1024 | 5.0 | 0.2 | 6.0 | 0.17 | 1 | 0.1 | 2.00 |"
    assert lines[5] == "| broadcast | 2 | 8 | 3.0 | 0.0027 | 3.5 | 0.0023 | 0 | - | - |"
    only = docs_tables.render("collectives", "r.json", {"ops": "broadcast"}, str(tmp_path)).splitlines()
    assert len(only) == 5 and only[4].startswith("| broadcast |")


@pytest.mark.parametrize(
    "marker,match",
    [
        ("<!-- generated: nope docs/results/x.json -->\n<!-- /generated -->", "unknown renderer 'nope'"),
        ("<!-- generated: decode_tp docs/results/missing.json -->\n<!-- /generated -->", "cannot read the results"),
    ],
)
def test_bad_markers_are_errors(tmp_path, capsys, marker, match):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(f"# x\n\n{marker}\n")
    assert _check(tmp_path) == 2 and match in capsys.readouterr().err
