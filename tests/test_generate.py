"""``python -m models.generate``, the README's main job, as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from model_fixtures import mixtral_config

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # as on a fresh shell
    return subprocess.run(
        [sys.executable, "-m", "models.generate", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_main_job_check_passes():
    r = _run("--check", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mesh: dp=2, pp=1, ep=1, tp=4 on 8 x cpu" in r.stdout
    assert "check: the tokens on one device are identical to those on dp=2 x tp=4" in r.stdout
    for phase in ("prefill:", "ms/token", "tokens/s"):
        assert phase in r.stdout


def test_main_job_on_a_mixtral_checkpoint(tmp_path):
    config = mixtral_config()
    models.write_checkpoint(tmp_path, config, models.random_checkpoint(config, seed=1), style="transformers5")
    r = _run(
        "--checkpoint", str(tmp_path), "--tp", "2", "--ep", "2", "--dp", "1", "--no-custom-all-reduce",
        "--check", "--prompt", "1,2,3", "--prompt", "7", "--max-new-tokens", "4",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mesh: dp=1, pp=1, ep=2, tp=2 on 4 x cpu" in r.stdout
    assert "prompt 1 (1 tokens): [7]" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--tp", "0"], "expected a positive int, got '0'"), (["--prompt", "a"], "expected comma-separated token ids")],
)
def test_main_job_rejects_bad_flags(args, message, capsys):
    from models.generate import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(args)
    assert message in capsys.readouterr().err


def test_importing_the_cli_module_keeps_models_generate_callable():
    """``import models.generate`` (the CLI) must not turn ``models.generate`` into an uncallable module."""
    import importlib

    import models.generation

    cli = importlib.import_module("models.generate")
    assert callable(models.generate) and models.generate is cli
    calls = []
    real = models.generation.generate
    try:
        models.generation.generate = lambda *a, **k: calls.append((a, k)) or "ok"
        assert models.generate("m", [[1]], 2, temperature=0.5) == "ok"
    finally:
        models.generation.generate = real
    assert calls == [(("m", [[1]], 2), {"temperature": 0.5})]
