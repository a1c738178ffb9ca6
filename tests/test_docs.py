"""Every ```python snippet in the README and docs/ runs as written, pasted into a fresh interpreter.

Each snippet runs alone in a fresh interpreter (so it must carry its own imports and set-up, the
simulated CPU device count included: the environment sets none), from the repository root. A
snippet preceded by ``<!-- snippet: multiprocess N -->`` runs under ``spmd-launch`` with N
processes of 2 CPU devices each.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- snippet: (?P<opts>[^>]*) -->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def snippets() -> list:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            line = text[: m.start("code")].count("\n") + 1
            out.append(pytest.param(path, m.group("code"), (m.group("opts") or "").strip(), id=f"{path.name}:{line}"))
    return out


def test_docs_have_snippets():
    assert len(snippets()) >= 3


@pytest.mark.multiprocess
@pytest.mark.parametrize("path,code,opts", snippets())
def test_snippet_runs(path, code, opts, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    # As pasted into a fresh shell: no device count from the environment, so a snippet that needs
    # several CPU devices sets jax_num_cpu_devices itself (JAX_PLATFORMS=cpu only keeps a GPU host on CPU).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", SPMD_COLLECTIVE_TIMEOUT_S="60")
    if opts.startswith("multiprocess"):
        n = opts.split()[1]
        cmd = [sys.executable, "-m", "spmd.launch", "--nproc-per-node", n, "--cpu-devices-per-process", "2"]
        cmd += ["--timeout", "120", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    output = r.stdout[-2000:] + r.stderr[-3000:]
    assert r.returncode == 0, f"{path.name} snippet failed:\n{code}\n--- output ---\n{output}"
