"""Checkpoint round trips through safetensors files (both config styles, tied and untied, sharded
and not, bf16 on disk) and every loading error, each naming what is wrong."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import np_reference
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from model_fixtures import init, llama_config

import models
import spmd
from models.config import ModelConfig


@pytest.fixture
def ids(rng):
    return rng.integers(0, 250, (2, 9))


def _reference(config, weights, ids, style="hub"):
    hf = config.to_hf(style=style)
    return np.stack([np_reference.forward(hf, weights, row) for row in ids])


def test_hub_style_untied_single_file(tmp_path, rng, ids):
    config = llama_config()
    weights = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)))
    models.write_checkpoint(tmp_path, config, weights, style="hub")
    assert json.loads((tmp_path / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    init(2)
    model = models.from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config == config
    np.testing.assert_allclose(np.asarray(models.score(model, ids)), _reference(config, weights, ids), atol=1e-3)


def test_transformers5_style_tied_in_two_shards(tmp_path, rng, ids):
    config = llama_config(tie_word_embeddings=True, rope_scaling=None, rope_theta=500000.0)
    weights = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)))
    assert "lm_head.weight" not in weights
    models.write_checkpoint(tmp_path, config, weights, num_shards=2, style="transformers5")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in cfg and cfg["rope_parameters"]["rope_theta"] == 500000.0
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) == 2
    init(4)
    model = models.from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config == config
    ref = _reference(config, weights, ids, style="transformers5")
    np.testing.assert_allclose(np.asarray(models.score(model, ids)), ref, atol=1e-3)
    # each device holds its shard only: q heads 8/4, one KV head (replicated), [q_r | k_r | v_r]
    qkv = model.module.model.layers[0].self_attn.qkv_proj.weight[...]
    assert qkv.sharding.spec == P(None, "tp")
    assert {s.data.shape for s in qkv.addressable_shards} == {(64, (2 + 1 + 1) * 8)}


def test_bf16_on_disk_with_biases_and_head_dim(tmp_path, rng, ids):
    config = llama_config(attention_bias=True, mlp_bias=True, head_dim=16)
    weights = models.random_checkpoint(config, seed=int(rng.integers(1 << 30)), dtype=ml_dtypes.bfloat16)
    models.write_checkpoint(tmp_path, config, weights)
    init(2)
    model = models.from_pretrained(tmp_path, dtype=jnp.float32)  # cast as it loads
    ref = _reference(config, {k: v.astype(np.float32) for k, v in weights.items()}, ids)
    np.testing.assert_allclose(np.asarray(models.score(model, ids)), ref, atol=1e-3)


def test_config_styles_parse_alike():
    config = llama_config(eos_token_id=(1, 2), bos_token_id=0)
    for style in ("hub", "transformers5"):
        assert ModelConfig.from_hf(config.to_hf(style=style)) == config
    legacy = {**config.to_hf(), "rope_scaling": {**dict(config.rope_scaling), "type": "llama3"}}
    del legacy["rope_scaling"]["rope_type"]
    del legacy["head_dim"]  # derived: hidden / heads = 8
    assert ModelConfig.from_hf(legacy) == config


# errors ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    config = llama_config()
    return config, models.random_checkpoint(config, seed=0)


def test_missing_and_misshapen_tensors_are_named(tmp_path, small):
    config, weights = small
    init(2)
    broken = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        models.load_state_dict(config, broken)
    models.write_checkpoint(tmp_path, config, {**weights, "model.layers.0.mlp.up_proj.weight": np.zeros((64, 64))})
    with pytest.raises(
        ValueError,
        match=r"tensor 'model.layers.0.mlp.up_proj.weight' in .*model.safetensors has shape \(64, 64\); "
        r"expected \(128, 64\) from config.json",
    ):
        models.from_pretrained(tmp_path)
    untied = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head.weight'"):
        models.load_state_dict(config, untied)


def test_unsupported_architecture_and_unsplittable_sizes(small):
    config, _ = small
    with pytest.raises(ValueError, match=r"architecture 'GPT2LMHeadModel' is not supported; expected one of"):
        ModelConfig.from_hf({**config.to_hf(), "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported"):
        ModelConfig.from_hf({**config.to_hf(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    init(8)
    odd = llama_config(num_attention_heads=12, num_key_value_heads=4, head_dim=8, hidden_size=96)
    with pytest.raises(
        ValueError,
        match=r"LlamaForCausalLM cannot be split over tp=8, ep=1: num_attention_heads=12 does not divide by tp=8\. "
        r"TP sizes that work: \[1, 2, 4\]",
    ):
        models.load_state_dict(odd, models.random_checkpoint(odd))


def test_file_errors(tmp_path, small):
    config, weights = small
    spmd.destroy_model_parallel()
    models.write_checkpoint(tmp_path / "ok", config, weights, num_shards=2)
    with pytest.raises(RuntimeError, match=r"model parallel is not initialized; call spmd.initialize_model_parallel"):
        models.from_pretrained(tmp_path / "ok")
    init(2)
    with pytest.raises(FileNotFoundError, match=r"no config.json in"):
        models.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config.to_hf()))
    with pytest.raises(FileNotFoundError, match=r"expected model.safetensors or model.safetensors.index.json in"):
        models.from_pretrained(tmp_path / "empty")
    os.remove(tmp_path / "ok" / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"lists model-00002-of-00002.safetensors \(for .*\), which is missing"):
        models.from_pretrained(tmp_path / "ok")
