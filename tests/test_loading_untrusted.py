"""Checkpoints that lie: index entries outside the directory, symlinks out of it, FIFOs, absurd configs,
integer weights. Each is refused with a ValueError naming the entry, before anything is allocated."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import np_reference
import numpy as np
import pytest
from model_fixtures import init, llama_config, mixtral_config

import models
from models.config import MAX_EXPERTS, MAX_LAYERS, ModelConfig
from models.loading import fuse_experts

INDEX = "model.safetensors.index.json"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _scores_match(model, config, weights, rng):
    ids = rng.integers(0, config.vocab_size, (1, 7))
    ref = np_reference.forward(config.to_hf(), weights, ids[0])
    np.testing.assert_allclose(np.asarray(models.score(model, ids))[0], ref, atol=1e-3)


@pytest.fixture
def two(tmp_path, rng):
    """Two checkpoints of one config with different weights: ``victim`` (sharded) and ``other``."""
    config = llama_config()
    mine = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)))
    other = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)))
    models.write_checkpoint(tmp_path / "victim", config, mine, num_shards=2)
    models.write_checkpoint(tmp_path / "other", config, other, num_shards=2)
    return tmp_path / "victim", tmp_path / "other", config, mine


def _rewrite_index(path, fn):
    index = json.loads((path / INDEX).read_text())
    index["weight_map"] = {k: fn(v) for k, v in index["weight_map"].items()}
    (path / INDEX).write_text(json.dumps(index))


# 12: shard names stay inside the directory -----------------------------------------------------------


@pytest.mark.parametrize("entry", ["../other/{f}", "{abs}/other/{f}", "/etc/passwd", "sub/../../other/{f}"])
def test_index_entries_outside_the_directory_are_refused(two, entry):
    victim, _, _, _ = two
    second = "model-00002-of-00002.safetensors"
    name = entry.format(f=second, abs=os.fspath(victim.parent))
    _rewrite_index(victim, lambda f: name if f == second else f)
    init(2)
    with pytest.raises(ValueError, match=rf"index.json entry '.*' -> {name!r} points outside the checkpoint"):
        models.from_pretrained(victim, dtype=jnp.float32)


@pytest.mark.parametrize("which", ["model-00002-of-00002.safetensors", "config.json"])
def test_a_symlink_out_of_the_directory_is_refused(two, which):
    victim, other, _, _ = two
    os.remove(victim / which)
    os.symlink(other / which, victim / which)
    init(2)
    with pytest.raises(ValueError, match=rf"{which!r} in .*victim is a symlink to .*other/{which}, outside"):
        models.from_pretrained(victim, dtype=jnp.float32)


def test_the_single_file_as_a_symlink_out_is_refused(tmp_path, rng):
    config = llama_config()
    models.write_checkpoint(tmp_path / "other", config, models.random_checkpoint(config, seed=1))
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "config.json").write_text(json.dumps(config.to_hf()))
    os.symlink(tmp_path / "other" / "model.safetensors", tmp_path / "victim" / "model.safetensors")
    init(2)
    with pytest.raises(ValueError, match=r"model.safetensors 'model.safetensors' in .*victim is a symlink to"):
        models.from_pretrained(tmp_path / "victim", dtype=jnp.float32)


def test_symlinks_inside_the_directory_and_the_hub_cache_layout_load(two, rng, tmp_path):
    victim, _, config, mine = two
    # a shard in a subfolder, reached through a relative symlink that stays inside
    (victim / "sub").mkdir()
    os.rename(victim / "model-00001-of-00002.safetensors", victim / "sub" / "real.safetensors")
    os.symlink("sub/real.safetensors", victim / "model-00001-of-00002.safetensors")
    init(2)
    _scores_match(models.from_pretrained(victim, dtype=jnp.float32), config, mine, rng)
    # the hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    models.write_checkpoint(tmp_path / "plain", config, mine)
    for i, f in enumerate(("config.json", "model.safetensors")):
        os.rename(tmp_path / "plain" / f, repo / "blobs" / f"hash{i}")
        os.symlink(f"../../blobs/hash{i}", snap / f)
    _scores_match(models.from_pretrained(snap, dtype=jnp.float32), config, mine, rng)
    # ... but nowhere else, not even elsewhere in the repository's folder
    os.rename(repo / "blobs" / "hash1", repo / "elsewhere")
    os.remove(snap / "model.safetensors")
    os.symlink("../../elsewhere", snap / "model.safetensors")
    with pytest.raises(ValueError, match=r"is a symlink to .*tiny/elsewhere, outside the checkpoint directory"):
        models.from_pretrained(snap, dtype=jnp.float32)


@pytest.mark.parametrize("bad", [["a list"], 7, ""])
def test_malformed_index_entries(two, bad):
    victim, _, _, _ = two
    _rewrite_index(victim, lambda f: bad)
    init(2)
    with pytest.raises(ValueError, match=r"entry '.*' -> .* is not a file name; expected a relative path"):
        models.from_pretrained(victim, dtype=jnp.float32)
    (victim / INDEX).write_text('{"weight_map": [1, 2]}')
    with pytest.raises(ValueError, match=r"weight_map is not an object: \[1, 2\]"):
        models.from_pretrained(victim, dtype=jnp.float32)
    (victim / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=r"index.json in .* is not a checkpoint index"):
        models.from_pretrained(victim, dtype=jnp.float32)


# 13: regular files only -----------------------------------------------------------------------------


_LOAD_EACH = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import models, spmd
spmd.initialize_model_parallel(2)
for path in sys.argv[1:]:
    try:
        models.from_pretrained(path)
        print("loaded", path, flush=True)
    except Exception as e:
        print(type(e).__name__, e, flush=True)
"""


@pytest.mark.multiprocess
def test_a_fifo_is_an_error_not_a_hang(tmp_path):
    """In a subprocess: safetensors blocks in open() holding the GIL, so a hang would take the test runner."""
    config = llama_config()
    weights = models.random_checkpoint(config)
    paths = []
    for which in ("model-00002-of-00002.safetensors", "config.json", INDEX):
        path = tmp_path / which.replace(".", "_")
        models.write_checkpoint(path, config, weights, num_shards=2)
        os.remove(path / which)
        os.mkfifo(path / which)
        paths.append((path, which))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    cmd = [sys.executable, "-c", _LOAD_EACH, *(os.fspath(p) for p, _ in paths)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"from_pretrained hung on a FIFO; it printed: {e.stdout!r}")
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout + r.stderr
    for line, (path, which) in zip(lines, paths, strict=True):
        assert line.startswith("ValueError") and f"{which!r} in {path} is a FIFO; expected a regular file" in line


def test_a_directory_or_garbage_as_a_shard(two):
    victim, _, _, _ = two
    second = victim / "model-00002-of-00002.safetensors"
    os.remove(second)
    second.mkdir()
    init(2)
    with pytest.raises(ValueError, match=r"'model-00002-of-00002.safetensors' in .* is a directory; expected"):
        models.from_pretrained(victim, dtype=jnp.float32)
    second.rmdir()
    second.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors in .* is not a valid safetensors file"):
        models.from_pretrained(victim, dtype=jnp.float32)


# 14: configs checked against bounds and the checkpoint's own tensors ------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_hidden_layers", 10**9, rf"num_hidden_layers to be an int in \[1, {MAX_LAYERS}\], got 1000000000"),
        ("vocab_size", 2**40, r"vocab_size to be an int in \[1, 2147483647\]"),
        ("max_position_embeddings", 0, r"max_position_embeddings to be an int in \[1, .*\], got 0"),
        ("max_position_embeddings", -5, r"max_position_embeddings to be an int in \[1, .*\], got -5"),
        ("max_position_embeddings", 4.5, r"expected max_position_embeddings to be an int, got 4.5"),
        ("rms_norm_eps", float("nan"), r"rms_norm_eps to be a finite number > 0, got nan"),
        ("rms_norm_eps", float("inf"), r"rms_norm_eps to be a finite number > 0, got inf"),
        ("rms_norm_eps", 0.0, r"rms_norm_eps to be a finite number > 0, got 0.0"),
        ("rms_norm_eps", -1e-5, r"rms_norm_eps to be a finite number > 0, got -1e-05"),
        ("rms_norm_eps", "1e-5", r"expected rms_norm_eps to be a number, got '1e-5'"),
        ("rms_norm_eps", True, r"expected rms_norm_eps to be a number, got True"),
        ("rope_theta", float("nan"), r"rope_theta to be a finite number > 0, got nan"),
        ("num_attention_heads", 0, r"num_attention_heads to be an int in \[1, .*\], got 0"),
    ],
)
def test_absurd_config_values_are_refused(key, value, message):
    cfg = {**llama_config().to_hf(), key: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(cfg)


def test_absurd_values_in_config_json_fail_before_loading(tmp_path):
    config = llama_config()
    models.write_checkpoint(tmp_path, config, models.random_checkpoint(config))
    text = (tmp_path / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    (tmp_path / "config.json").write_text(text)
    init(2)
    with pytest.raises(ValueError, match=r"rms_norm_eps to be a finite number > 0, got nan"):
        models.from_pretrained(tmp_path)
    experts = {**mixtral_config().to_hf(), "num_local_experts": 10**9}
    with pytest.raises(ValueError, match=rf"num_local_experts to be an int in \[1, {MAX_EXPERTS}\]"):
        ModelConfig.from_hf(experts)
    scaling = {**config.to_hf(), "rope_scaling": {**dict(config.rope_scaling), "factor": float("inf")}}
    with pytest.raises(ValueError, match=r"rope_scaling\['factor'\] to be a finite number > 0, got inf"):
        ModelConfig.from_hf(scaling)


def test_more_layers_than_the_checkpoint_holds(tmp_path):
    config = llama_config()
    models.write_checkpoint(tmp_path, config, models.random_checkpoint(config), num_shards=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": MAX_LAYERS}))
    init(2)
    with pytest.raises(ValueError, match=rf"num_hidden_layers={MAX_LAYERS}, but the checkpoint .* holds tensors of 2"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize("fused", [False, True])
def test_more_experts_than_the_checkpoint_holds(tmp_path, fused):
    config = mixtral_config()
    weights = models.random_checkpoint(config)
    if fused:
        weights = fuse_experts(config, weights)
    more = ModelConfig(**{**config.__dict__, "num_local_experts": 8})
    init(2)
    with pytest.raises(ValueError, match=r"num_local_experts=8, but the checkpoint .* holds 4 experts per layer"):
        models.load_state_dict(more, weights)
    big = ModelConfig(**{**config.__dict__, "num_local_experts": MAX_EXPERTS, "num_hidden_layers": MAX_LAYERS})
    with pytest.raises(ValueError, match=r"num_hidden_layers=4096, but the checkpoint \(the state dict\) holds"):
        models.load_state_dict(big, weights)  # refused before 4096 x 65536 expert names are made
    models.write_checkpoint(tmp_path, more, weights)
    with pytest.raises(ValueError, match=r"num_local_experts=8, but the checkpoint .*model.safetensors\) holds 4"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize(("dtype", "name"), [(np.int64, "I64"), (np.bool_, "BOOL"), (np.int8, "I8")])
def test_an_integer_weight_is_an_error_not_a_cast(tmp_path, dtype, name):
    config = llama_config()
    weights = models.random_checkpoint(config)
    bad = "model.layers.1.post_attention_layernorm.weight"
    weights[bad] = np.ones(weights[bad].shape, dtype)
    init(2)
    with pytest.raises(ValueError, match=rf"tensor .{bad}. in the state dict has dtype {np.dtype(dtype).name}; exp"):
        models.load_state_dict(config, weights)
    models.write_checkpoint(tmp_path, config, weights)
    with pytest.raises(ValueError, match=rf"tensor '{bad}' in .*model.safetensors has dtype {name}; expected a float"):
        models.from_pretrained(tmp_path)
