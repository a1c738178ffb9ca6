"""``python -m models.generate``, the README's main job, as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import re
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


@pytest.mark.multiprocess
def test_main_job_check_passes():
    r = _run("--check", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mesh: dp=2, pp=1, ep=1, tp=4 on 8 x cpu" in r.stdout
    assert "check: the tokens on one device are identical to those on dp=2 x tp=4" in r.stdout
    for phase in ("prefill:", "ms/token", "tokens/s"):
        assert phase in r.stdout


@pytest.mark.multiprocess
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


# usage errors before any work (issue 22, item 17) ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "3"], r"--tp 3: num_attention_heads=8 does not divide by tp=3; .*TP sizes that fit "
         r"LlamaForCausalLM on 8 devices: \[1, 2, 4, 8\]"),
        (["--tp", "2", "--dp", "8"], r"--tp 2 --dp 8: tp x ep x dp = 16 is more than the 8 devices\. TP sizes that "
         r"fit LlamaForCausalLM on 8 devices --dp 8: \[1\]"),
        (["--model", "mixtral", "--tp", "2", "--ep", "3"], r"--tp 2 --ep 3: num_local_experts=8 does not divide by "
         r"ep=3; tp x ep = 6 does not divide the 8 devices .*TP sizes that fit MixtralForCausalLM on 8 devices with "
         r"--ep 3: \[\]"),
    ],
)  # fmt: skip
def test_a_mesh_that_does_not_fit_is_a_usage_error_before_any_checkpoint(args, message, capsys, monkeypatch):
    from models.generate import main

    monkeypatch.setattr(models, "write_checkpoint", lambda *a, **k: pytest.fail("wrote a checkpoint"))
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_a_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from models.disagg import main as disagg_main
    from models.generate import main as generate_main

    config = models.ModelConfig.from_hf(mixtral_config().to_hf())
    models.write_checkpoint(tmp_path / "ok", config, models.random_checkpoint(config))
    os.remove(tmp_path / "ok" / "model.safetensors")
    os.mkfifo(tmp_path / "ok" / "model.safetensors")
    cases = [
        (tmp_path / "missing", r"--checkpoint: .*missing is not a directory \(expected a checkpoint directory\)"),
        (tmp_path, r"--checkpoint: no config.json in"),
        (tmp_path / "ok", r"--checkpoint: from_pretrained: model.safetensors 'model.safetensors' in .* is a FIFO"),
    ]
    for main in (generate_main, disagg_main):
        for path, message in cases[:2] if main is disagg_main else cases:
            assert main(["--checkpoint", str(path), "--tp" if main is generate_main else "--decode-tp", "2"]) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


# --check after a one-device run (issue 22, item 20) ---------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
def test_check_on_one_device_is_not_a_check_of_itself():
    r = _run("--cpu-devices", "1", "--check", "--max-new-tokens", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "mesh: dp=1, pp=1, ep=1, tp=1 on 1 x cpu" in r.stdout
    assert "no TP check was possible" in r.stderr and "identical" not in r.stdout
    r = _run("--cpu-devices", "2", "--tp", "1", "--dp", "1", "--check", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: the tokens on tp=2 over 2 CPU devices are identical to those on one cpu device" in r.stdout
